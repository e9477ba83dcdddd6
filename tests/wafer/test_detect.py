"""Section detection: U-Net shapes, sparse labels, post-processing geometry, seamless
tiling, the shipped model on an unseen simulated wafer, training smoke run, CLI."""
from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import torch
from scipy import ndimage

from common.geometry import normalise_rect
from wafer import detect_data as dd
from wafer.detect import (DEFAULT_MODEL, detect_sections, load_model, match_sections, postprocess,
                          predict_proba, probability_map, rect_iou)
from wafer.unet import UNet, count_parameters, fold_batchnorm


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_overview():
    """Unseen wafer (seed 10001 >= benchmark range), 640 x 640 px at 4 um around the centre."""
    from devices.setup_config import WaferParams
    wafer = dd.make_wafer(WaferParams(sections=80, spacing_um=150.0, seed=10001, rotation_deg=20.0,
                                      rotation_jitter_deg=10.0))
    return dd.render_overview(wafer, (150.0, -100.0), (640, 640), np.random.default_rng(1))


def test_unet_forward_shapes():
    torch.manual_seed(0)
    m = UNet(depth=5, start_filters=4).eval()
    with torch.no_grad():
        for shape in ((1, 1, 64, 64), (2, 1, 96, 128), (1, 1, 48, 208)):
            assert m(torch.zeros(shape)).shape == (shape[0], 2, *shape[2:])
    m3 = UNet(depth=3, start_filters=2).eval()
    with torch.no_grad():
        assert m3(torch.zeros(1, 1, 36, 20)).shape == (1, 2, 36, 20)
    with pytest.raises(ValueError):
        m(torch.zeros(1, 1, 40, 40))                 # not divisible by 2**4
    assert 30e6 < count_parameters(UNet(depth=5, start_filters=64)) < 32e6    # the seed's ~31 M
    x = torch.randn(1, 1, 64, 64)
    m.train()
    for _ in range(2):                                # give batch norm non-trivial running stats
        m(torch.randn(4, 1, 64, 64) * 2 + 1)
    m.eval()
    with torch.no_grad():
        assert torch.allclose(m(x), fold_batchnorm(m)(x), atol=1e-4)


def test_sparse_labels_from_polygons():
    square = np.array([[40, 40], [60, 40], [60, 60], [40, 60]], float)
    far = np.array([[100, 100], [110, 100], [110, 110], [100, 110]], float)
    lab = dd.labels_from_polygons((128, 128), [square], [far])
    assert lab.dtype == np.uint8 and set(np.unique(lab)) == {0, 1, 2}
    tissue = lab == 1
    ys, xs = np.nonzero(tissue)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (40, 60, 40, 60)   # vertices are pixel centres
    assert lab[50, 40 - 10] == 0 and lab[50, 40 - 11] == 2         # 10 dilations, 4-connected
    assert lab[50, 60 + 10] == 0 and lab[50, 60 + 11] == 2
    assert lab[40 - 5, 40 - 5] == 0 and lab[40 - 5, 40 - 6] == 2   # diamond ring at the corner
    assert lab[105, 105] == 0 and lab[5, 5] == 2                   # drawn background; elsewhere ignore
    ring = dd.labels_from_mask(tissue) == 0
    assert ring.sum() == (lab[:90, :90] == 0).sum()
    # drawn background never overrides tissue
    assert (dd.labels_from_polygons((128, 128), [square], [square]) == 1).sum() == tissue.sum()


def test_postprocess_recovers_rotated_rectangles():
    px, origin = 4.0, (-1000.0, 500.0)
    truth = [((120.3, 100.6), (110.0, 55.0), 17.0), ((330.0, 240.0), (90.0, 60.0), -62.0),
             ((140.0, 330.0), (130.0, 40.0), 88.0)]
    prob = np.full((420, 460), 0.05, np.float32)
    for c, s, a in truth:
        cv2.fillPoly(prob, [np.round(cv2.boxPoints((c, s, a)) * 16).astype(np.int32)], 0.9, cv2.LINE_8, 4)
    cv2.circle(prob, (400, 60), 6, 0.95, -1)          # ~113 px: below the seed's 200 px area
    dets = postprocess(prob, px, origin)
    assert len(dets) == 3
    for c, s, a in truth:
        tc = (origin[0] + c[0] * px, origin[1] + c[1] * px)
        d = min(dets, key=lambda d: math.dist(d["center_um"], tc))
        assert math.dist(d["center_um"], tc) < 1.0 * px
        assert abs(d["size_um"][0] - max(s) * px) < 1.0 * px and abs(d["size_um"][1] - min(s) * px) < 1.0 * px
        ta = normalise_rect(c, s, a)[2]
        assert abs((d["angle_deg"] - ta + 90) % 180 - 90) < 1.0
        assert 0.85 < d["confidence"] <= 0.9 + 1e-6
        assert len(d["polygon_um"]) == 4
        assert rect_iou((d["center_um"], d["size_um"], d["angle_deg"]), (tc, tuple(np.multiply(s, px)), a)) > 0.95
    assert [d["id"] for d in dets] == [0, 1, 2]


def test_tiled_prediction_is_seamless():
    torch.manual_seed(3)
    model = fold_batchnorm(UNet(depth=2, start_filters=4))   # receptive field < overlap / 2
    img = np.random.default_rng(0).random((150, 170)).astype(np.float32)
    full = predict_proba(img, model, patch=256, overlap=32)   # one tile
    tiled = predict_proba(img, model, patch=64, overlap=32, batch=3)   # 6 x 5 tiles
    assert full.shape == tiled.shape == img.shape
    assert np.abs(full - tiled).max() < 1e-5


def test_a_mirrored_overview_gives_the_mirrored_sections(small_overview):
    """The network answers on the overview and on its mirror image are averaged, so
    which way round the wafer was loaded does not move a section's edges."""
    model = load_model()
    img = small_overview.image
    prob = probability_map(img, dd.PIXEL_UM, model)
    mirrored = probability_map(np.ascontiguousarray(img[:, ::-1]), dd.PIXEL_UM, model)
    assert np.abs(mirrored[:, ::-1] - prob).max() < 1e-3
    single = probability_map(img, dd.PIXEL_UM, model, mirrored=False)
    assert np.abs(single - prob).max() > 0.05          # the mirror's answer does count


def test_the_gui_finds_the_sections_the_cli_finds(small_overview):
    """The GUI predicts band by band (progress, cancel); its sections are the CLI's."""
    from common.geometry import OverviewImage
    from gui.wafer_tasks import detect_sections as gui_detect
    ov = small_overview
    cli = detect_sections(ov.image, ov.pixel_um, ov.origin_um, model=load_model())
    gui = gui_detect(OverviewImage(ov.image, ov.origin_um, ov.pixel_um), band=96)
    assert len(gui) == len(cli) >= 5
    for g in gui:               # the same to well under a micrometre, not merely overlapping
        c = min(cli, key=lambda d: math.dist(d["center_um"], g.center_um))
        assert math.dist(c["center_um"], g.center_um) < 0.5
        assert max(abs(a - b) for a, b in zip(c["size_um"], g.size_um)) < 1.0


def test_shipped_model_detects_unseen_sections(small_overview):
    assert DEFAULT_MODEL.is_file(), "shipped weights missing"
    card = json.loads(DEFAULT_MODEL.with_suffix(".json").read_text())
    assert DEFAULT_MODEL.stat().st_size < 20e6 and card["parameters"] > 0
    ov = small_overview
    dets = detect_sections(ov.image, ov.pixel_um, ov.origin_um, model=load_model())
    m = match_sections(dets, ov.truth)
    assert m["tp"] + m["fn"] >= 5
    assert m["f1"] >= 0.9, m
    assert m["mean_iou"] >= 0.85


def test_training_smoke_writes_card(tmp_path):
    from wafer.train_sections import train
    out = tmp_path / "m.pt"
    card = train(steps=3, out=out, seed=1, start_filters=2, depth=3, patch=32, batch=2, log_every=1,
                 net_pixel_um=8.0, n_wafers=1, crops_per_wafer=1, crop_px=160, val_seeds=(5000,), val_px=160,
                 log=lambda s: None)
    assert out.is_file() and out.with_suffix(".json").is_file()
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["steps"] == 3 and saved["start_filters"] == 2 and saved["parameters"] == card["parameters"]
    for key in ("architecture", "precision", "training_data", "optimizer", "scheduler", "validation",
                "training_time_s", "date", "torch", "why_this_size"):
        assert key in saved
    model = load_model(out)
    assert model.net_pixel_um == 8.0
    assert isinstance(detect_sections(np.zeros((64, 64), np.uint8), 4.0, model=model), list)


def test_cli_writes_json_and_refuses_overwrite(tmp_path, small_overview):
    from typer.testing import CliRunner
    from wafer.detect_cli import app
    png = tmp_path / "ov.png"
    cv2.imwrite(str(png), small_overview.image)
    out = tmp_path / "sections.json"
    args = ["detect", str(png), "--pixel-size-um", "4", "--origin-um", *map(str, small_overview.origin_um),
            "--json", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "sections" in r.output and "mean confidence" in r.output
    data = json.loads(out.read_text())
    assert len(data["sections"]) >= 5
    s = data["sections"][0]
    assert set(s) == {"id", "center_um", "size_um", "angle_deg", "polygon_um", "confidence"}
    assert len(s["center_um"]) == 2 and len(s["polygon_um"]) == 4
    m = match_sections(data["sections"], small_overview.truth)
    assert m["f1"] >= 0.9
    before = out.read_text()
    r2 = CliRunner().invoke(app, args)
    assert r2.exit_code == 2 and "refusing to overwrite" in r2.output
    assert out.read_text() == before


def test_scratches_debris_and_faint_blobs_are_not_sections():
    prob = np.zeros((400, 600), np.float32)
    for x in (60, 240, 420):                       # three sections, 100 x 50 px
        prob[100:150, x:x + 100] = 0.95
    prob[300:306, 50:450] = 0.95                   # a scratch: 400 x 6 px
    prob[250:262, 500:512] = 0.95                  # a flake, a tenth of a section
    prob[200:250, 240:340] = 0.56                  # faint: barely above threshold
    dets = postprocess(prob, 4.0)
    assert len(dets) == 3
    assert np.allclose(sorted(d["center_um"][0] / 4 for d in dets), [109.5, 289.5, 469.5], atol=1.0)
    assert len(postprocess(prob, 4.0, min_confidence=0.5)) == 4     # the faint one is kept when asked


def test_cli_needs_a_pixel_size_for_a_plain_image(tmp_path):
    from typer.testing import CliRunner
    from wafer.detect_cli import app
    png = tmp_path / "ov.png"
    cv2.imwrite(str(png), np.zeros((64, 64), np.uint8))
    r = CliRunner().invoke(app, ["detect", str(png), "--json", str(tmp_path / "s.json")])
    assert r.exit_code == 2 and "--pixel-size-um is needed" in r.output
    assert not (tmp_path / "s.json").exists()


def test_partly_milled_sections_show_the_wafer_but_stay_whole_sections():
    plain = dd.sample_overviews(11, 1, (768, 768), wide=True)[0]
    milled = dd.sample_overviews(11, 1, (768, 768), wide=True, milled=True)[0]
    assert np.array_equal(milled.labels, plain.labels)          # a milled-through part is still the section
    changed = milled.image != plain.image
    tissue = plain.instances > 0
    near = ndimage.binary_dilation(tissue, iterations=8)           # the render's blur spreads an edge a little
    assert changed.any() and not (changed & ~near).any()         # only tissue changed; every other draw as before
    bare = ~tissue & ~ndimage.binary_dilation(tissue, iterations=40)
    wafer_level = np.median(plain.image[bare])
    inside = changed & tissue
    assert abs(np.median(milled.image[inside].astype(float)) - wafer_level) < 0.5 * abs(
        np.median(plain.image[inside].astype(float)) - wafer_level)   # the milled parts look like wafer
