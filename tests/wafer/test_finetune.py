"""Fine-tuning the section U-Net on lab annotations (wafer/finetune.py, `wafer train`).

The lab overview is a simulated wafer in a backscatter-like look the shipped model never
saw (brightness folded about the background level: tissue and silicon both bright against
darker resin): it finds under half the tissue there.  Labels are
made as `wafer annotate` makes them (save_annotation from tissue polygons), sparsely:
every second section outlined, nothing else drawn."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from wafer import detect_data as dd
from wafer.detect import DEFAULT_MODEL, detect_sections, load_model, match_sections
from wafer.finetune import file_sha256, load_annotated, read_labels, split, to_net, truth_in_block
from wafer.finetune_cli import app


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """(overview png, labels png, polygons json) of a backscatter-look 1280 x 768 px
    overview at 4 um; every second section annotated."""
    from devices.setup_config import WaferParams
    from wafer.annotate import save_annotation
    folder = tmp_path_factory.mktemp("lab")
    wafer = dd.make_wafer(WaferParams(sections=80, section_size_um=(300.0, 180.0), spacing_um=100.0, seed=306,
                                      rotation_deg=15.0, rotation_jitter_deg=10.0))
    ov = dd.render_overview(wafer, (0.0, 0.0), (768, 1280), np.random.default_rng(306))
    # a backscatter-like look the shipped model never saw: brightness folded about the
    # background level, so tissue and silicon both read bright against darker resin
    base = ov.image.astype(np.float32)
    img = np.clip(np.abs(base - np.median(base[ov.instances == 0])) * 3, 0, 255).astype(np.uint8)
    h, w = img.shape
    polys = []
    for s in wafer.sections:
        p = (np.asarray(s.tissue_polygon_m) * 1e6 - ov.origin_um) / ov.pixel_um
        if p[:, 0].max() >= 0 and p[:, 0].min() <= w - 1 and p[:, 1].max() >= 0 and p[:, 1].min() <= h - 1:
            polys.append(p)
    png = folder / "wafer1.png"
    cv2.imwrite(str(png), img)
    labels, poly_json = save_annotation(folder / "wafer1.labels.png", img.shape, polys[::2], [])
    return png, labels, poly_json


def _cli(*args):
    return CliRunner().invoke(app, ["train", *map(str, args)])


def test_split_holds_back_the_right_columns_and_keeps_the_ignore_class(lab):
    png, labels, _ = lab
    a = load_annotated(png, labels, 4.0)
    assert a.tissue_polys and a.files["polygons"].endswith("wafer1.labels.polygons.json")
    img_t, lab_t, blk, col = split(a, 0.25, 12.0)
    assert col == 960 and blk.image.shape == (768, 320) and blk.labels.shape == (768, 320)
    assert img_t.shape == lab_t.shape == (256, 320)                 # columns < 960 only, at 12 um
    assert set(np.unique(lab_t)) == {0, 1, 2}
    assert np.array_equal(blk.labels, a.labels[:, 960:])
    assert sum(t[4] for t in blk.truth) >= 3                        # outlined sections wholly in the block
    # non-integer factor: nearest neighbour keeps 0/1/2 and the image's shape
    small_img, small_lab = to_net(a.image, a.labels, 5.0, 12.0)
    assert small_img.shape == small_lab.shape and set(np.unique(small_lab)) == {0, 1, 2}
    # an outline crossing the block's edge is partial (neither required nor a false positive)
    sq = np.array([[950.0, 10], [990, 10], [990, 40], [950, 40]])
    (_, c, s, ang, inside), = truth_in_block([sq], 960, (768, 320), 4.0)
    assert not inside and c[0] == pytest.approx((970 - 960) * 4.0)


def test_label_image_must_hold_0_1_2(tmp_path):
    bad = tmp_path / "mask.png"
    cv2.imwrite(str(bad), np.full((32, 32), 255, np.uint8))
    with pytest.raises(ValueError, match="0 background, 1 tissue, 2 ignore"):
        read_labels(bad)


def test_finetune_improves_held_back_detection_and_never_overwrites(lab, tmp_path):
    png, labels, poly_json = lab
    out = tmp_path / "lab.pt"
    args = ["--overview", png, "--labels", labels, "--pixel-um", 4, "--out", out, "--steps", 200,
            "--batch", 4, "--patch", 64, "--threads", 1, "--seed", 0]
    r = _cli(*args)
    assert r.exit_code == 0, r.output
    assert "pixel IoU" in r.output and f"--model {out}" in r.output
    card = json.loads(out.with_suffix(".json").read_text())
    before, after = card["validation_before"], card["validation"]
    # measured (seed 0): pixel IoU 0.60 -> 0.91, F1 0.75 -> 1.0, mean IoU 0.80 -> 0.90
    assert before["pixel_iou"] < 0.7 and after["pixel_iou"] >= before["pixel_iou"] + 0.25, (before, after)
    assert after["sections"] >= 3 and after["f1"] > before["f1"] and after["f1"] >= 0.8, (before, after)
    assert after["mean_iou"] >= max(0.85, before["mean_iou"] + 0.05), (before, after)
    # the card: provenance, hashes, pixel sizes, holdout rule
    assert card["sha256"] == file_sha256(out) and card["file_bytes"] == out.stat().st_size
    assert card["continued_from"]["sha256"] == file_sha256(DEFAULT_MODEL)
    f = card["training_data"]["files"][0]
    assert f["overview_sha256"] == file_sha256(png) and f["labels_sha256"] == file_sha256(labels)
    assert f["polygons_sha256"] == file_sha256(poly_json) and f["holdout_from_column"] == 960
    parent = json.loads(DEFAULT_MODEL.with_suffix(".json").read_text())
    assert card["net_pixel_um"] == parent["net_pixel_um"] and card["overview_pixel_um"] == [4.0]
    assert card["holdout"]["fraction"] == 0.25 and "neither their pixels nor their labels" in card["holdout"]["rule"]
    assert card["sessions"][-1]["steps"] == 200 and card["steps"] > 200
    # detection picks the new weights up (wafer detect --model, the GUI's model choice)
    block = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)[:, 960:]
    blk = split(load_annotated(png, labels, 4.0), 0.25, 12.0)[2]
    m_new = match_sections(detect_sections(block, 4.0, model=load_model(out)), blk.truth)
    assert m_new["recall"] >= 0.8, m_new
    # a second run to the same --out is refused before any work, the files untouched
    data, card_text = out.read_bytes(), out.with_suffix(".json").read_text()
    r2 = _cli(*args)
    assert r2.exit_code == 2 and "refusing to overwrite" in r2.output and "step" not in r2.output
    assert out.read_bytes() == data and out.with_suffix(".json").read_text() == card_text


def test_mismatched_overview_and_label_counts_exit_2(lab, tmp_path):
    png, labels, _ = lab
    out = tmp_path / "x.pt"
    r = _cli("--overview", png, "--overview", png, "--labels", labels, "--pixel-um", 4, "--out", out)
    assert r.exit_code == 2
    assert "--overview" in r.output and "--labels" in r.output
    assert not out.exists() and not out.with_suffix(".json").exists()
