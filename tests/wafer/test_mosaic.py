"""Overview mosaic: tile positions refined from the overlaps, assembly in stage
coordinates, the OME-TIFF and its stage transform, and the whole path from an
overview plan through the engine to detected sections."""
from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from wafer.mosaic import MosaicTile, assemble, build_overview, load_overview, refine_positions, save_overview

ROOT = Path(__file__).resolve().parents[2]


def _texture(shape, seed=0):
    rng = np.random.default_rng(seed)
    big = cv2.GaussianBlur(rng.normal(0, 1, shape).astype(np.float32), (0, 0), 3)
    return np.clip(big / big.std() * 40 + 128, 0, 255).astype(np.uint8)


def _cut(src, rows=3, cols=4, w=256, h=192, ov=32, err=4, seed=1, noise=3.0):
    """Tiles from ``src`` at true positions off the recorded grid by up to ±err px."""
    rng = np.random.default_rng(seed)
    tiles, truth = [], []
    for r in range(rows):
        for c in range(cols):
            x0, y0 = 100 + c * (w - ov), 100 + r * (h - ov)
            tx, ty = x0 + int(rng.integers(-err, err + 1)), y0 + int(rng.integers(-err, err + 1))
            img = src[ty:ty + h, tx:tx + w].astype(np.float32) + rng.normal(0, noise, (h, w))
            tiles.append(MosaicTile(np.clip(img, 0, 255).astype(np.uint8), (x0 + w / 2, y0 + h / 2), 1.0, r, c))
            truth.append((tx + w / 2, ty + h / 2))
    return tiles, np.array(truth)


def _rel(centers, truth):
    """Error up to the mosaic's overall position (which nothing in the images fixes)."""
    e = np.asarray(centers) - truth
    return np.abs(e - e.mean(0)).max()


def test_refinement_recovers_true_tile_positions():
    tiles, truth = _cut(_texture((1000, 1400)))
    recorded = np.array([t.center_um for t in tiles])
    assert _rel(recorded, truth) > 2.0                      # the stage positions alone are off
    ref = refine_positions(tiles)
    assert _rel(ref.centers_um, truth) < 0.2
    assert ref.summary()["links_used"] == ref.summary()["links"] == 17
    assert ref.residual_px < 0.2


def test_featureless_overlaps_and_a_wrong_tile_do_not_move_the_others():
    src = _texture((1000, 1400))
    src[:, 700:] = 128                                      # right part: bare wafer, no texture
    tiles, truth = _cut(src, noise=0.0)
    tiles[1].image = _texture(tiles[1].image.shape, seed=9)  # a frame of something else entirely
    ref = refine_positions(tiles)
    used = [(lk.a, lk.b) for lk in ref.links if lk.used]
    assert all(1 not in pair for pair in used)
    assert all(not lk.used for lk in ref.links if lk.a in (3, 7, 11) or lk.b in (3, 7, 11))
    recorded = np.array([t.center_um for t in tiles])
    # tiles tied only to the bare wafer keep their recorded positions
    for i in (3, 7, 11):
        assert np.allclose(ref.centers_um[i], recorded[i], atol=0.05)
    textured = [0, 4, 5, 8, 9]
    assert _rel(ref.centers_um[textured], truth[textured]) < 0.3
    # the returned positions are the solve over exactly the links reported as used
    res = [np.hypot(*(ref.centers_um[lk.b] - ref.centers_um[lk.a] - lk.offset_um)) for lk in ref.links if lk.used]
    assert max(res) <= 2.0 and np.sqrt(np.mean(np.square(res))) == pytest.approx(ref.residual_px)


def test_assembled_overview_is_the_area_in_stage_coordinates():
    src = _texture((1000, 1400), seed=3)
    tiles, truth = _cut(src, err=0, noise=0.0)
    ov = assemble(tiles, 4.0)
    # stage µm = source pixel index here (recorded centre = source centre, 1 µm pixels)
    x0, y0 = ov.origin_um[0] - 2.0, ov.origin_um[1] - 2.0     # top-left corner of pixel (0, 0)
    H, W = ov.image.shape
    ref = cv2.resize(src[int(y0):int(y0) + 4 * H, int(x0):int(x0) + 4 * W], (W, H), interpolation=cv2.INTER_AREA)
    (sx, sy), _ = cv2.phaseCorrelate(ref.astype(np.float32), ov.image.astype(np.float32))
    assert abs(sx) < 0.1 and abs(sy) < 0.1
    assert np.abs(ov.image.astype(int) - ref).mean() < 2.0
    assert ov.transform.to_stage(0, 0) == ov.origin_um
    with pytest.raises(ValueError, match="at least the tiles' pixel size"):
        assemble(tiles, 0.5)


def test_saved_overview_carries_pixel_size_and_stage_transform(tmp_path):
    tiles, _ = _cut(_texture((1000, 1400)))
    ov = build_overview(tiles, 4.0)
    path = save_overview(tmp_path / "ov.ome.tif", ov)
    with tifffile.TiffFile(path) as tf:
        assert tf.is_ome
        assert np.array_equal(tf.asarray(), ov.image)
        assert 'PhysicalSizeX="4.0"' in tf.ome_metadata
    back = load_overview(path)
    assert back.pixel_um == 4.0 and np.allclose(back.origin_um, ov.origin_um)
    assert back.info["refinement"]["links_used"] == 17
    assert np.allclose(np.array(back.info["transform_col_row_to_stage_um"]) @ [10, 20, 1], ov.transform.to_stage(10, 20))
    with pytest.raises(FileExistsError):
        save_overview(path, ov)


def test_overview_plan_to_mosaic_to_sections(tmp_path):
    """configs/plans/overview_wafer.yaml through the engine, `wafer mosaic`,
    then `wafer detect` on the mosaic with the transform it carries: the
    simulated wafer's sections come out where they are on the stage."""
    from typer.testing import CliRunner

    from acq.cli import run_plan
    from devices.factory import build_setup
    from devices.setup_config import load_setup
    from main import app
    run = tmp_path / "run"
    assert run_plan(ROOT / "configs/plans/overview_wafer.yaml", out=run) == 0
    out = tmp_path / "ov.ome.tif"
    r = CliRunner().invoke(app, ["wafer", "mosaic", str(run), "--pixel-size-um", "4", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "12 of 1024 x 768 px @ 1 µm" in r.output
    sj = tmp_path / "sections.json"
    r = CliRunner().invoke(app, ["wafer", "detect", str(out), "--json", str(sj)])
    assert r.exit_code == 0, r.output
    found = json.loads(sj.read_text())["sections"]
    wafer = build_setup(load_setup(ROOT / "configs/sim.yaml")).world.wafer
    truth = [(s.center_m[0] * 1e6, s.center_m[1] * 1e6) for s in wafer.sections]
    assert len(found) == len(truth) == 6
    for t in truth:
        assert min(math.dist(t, f["center_um"]) for f in found) < 25.0
    r = CliRunner().invoke(app, ["wafer", "mosaic", str(run), "--out", str(out)])
    assert r.exit_code == 2 and "refusing to overwrite" in r.output
