"""Virtual wafer: layout, materials, milling, SE signal, ground-truth masks."""
from pathlib import Path

import numpy as np
import pytest

from devices.setup_config import WaferParams
from devices.sim.specimen import Specimen
from devices.sim.wafer import RESIN, SILICON, TISSUE, VACUUM, VirtualWafer

ISBI = Path(__file__).parents[3] / "shared" / "data" / "em" / "isbi2012"


def make(seed=0, **kw):
    return VirtualWafer(WaferParams(seed=seed, **kw), Specimen(seed=seed, procedural_size=512))


def shoelace(poly):
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


@pytest.fixture(scope="module")
def wafer():
    return make(seed=0)


def test_layout_is_deterministic_and_seed_dependent():
    a, b, c = make(7), make(7), make(8)
    for s, t in zip(a.sections, b.sections):
        np.testing.assert_array_equal(s.tissue_polygon_m, t.tissue_polygon_m)
    assert any(not np.allclose(s.center_m, t.center_m) for s, t in zip(a.sections, c.sections))
    np.testing.assert_array_equal(a.signal((1e-3, 2e-3), 1e-6, (100, 120)), b.signal((1e-3, 2e-3), 1e-6, (100, 120)))


def test_sections_lie_on_the_wafer_without_overlap():
    w = make(seed=2, sections=40, rotation_jitter_deg=10, spacing_um=100)
    assert len(w.sections) == 40 and [s.id for s in w.sections] == list(range(40))
    boxes = []
    for s in w.sections:
        assert np.hypot(*s.resin_polygon_m.T).max() < w.radius_m - 0.5e-3
        boxes.append((*s.resin_polygon_m.min(0), *s.resin_polygon_m.max(0)))
        # tissue sits inside its resin border and is about the nominal size
        assert np.all(s.tissue_polygon_m.min(0) >= s.resin_polygon_m.min(0))
        assert 0.8 < shoelace(s.tissue_polygon_m) / (s.size_m[0] * s.size_m[1]) <= 1.0
        assert abs(s.thickness_m - 250e-9) < 1e-15
    boxes = np.array(boxes)
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            a, b = boxes[i], boxes[j]
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (i, j)


def test_too_many_sections_is_a_clear_error():
    with pytest.raises(ValueError, match="at most \\d+ fit"):
        make(sections=5000, section_size_um=(2000.0, 1500.0))


def test_materials_at_known_places(wafer):
    s = wafer.sections[0]
    cx, cy = s.center_m
    corner = s.resin_polygon_m[0] * 0.995 + np.array(s.center_m) * 0.005     # just inside the resin corner
    xs = np.array([cx, corner[0], 11e-3, 0.0, 13e-3])
    ys = np.array([cy, corner[1], 0.0, -11e-3, 0.0])
    mat, thick = wafer.materials(xs, ys)
    assert list(mat) == [TISSUE, RESIN, SILICON, SILICON, VACUUM]
    np.testing.assert_allclose(thick, [250e-9, 250e-9, 0, 0, 0], atol=1e-12)


def test_frame_grid_fast_path_agrees_with_scattered_points(wafer):
    s = wafer.sections[1]
    jj, ii = np.meshgrid(np.arange(300), np.arange(200))
    xs = s.center_m[0] - 150e-6 + ii * 0.3e-6 + jj * 1.1e-6 + 12.3e-9
    ys = s.center_m[1] - 100e-6 + jj * 0.2e-6 + ii * 1.5e-6
    grid_mat, grid_th = wafer.materials(xs, ys)
    pts_mat, pts_th = wafer.materials(xs.ravel(), ys.ravel())
    assert (grid_mat.ravel() == pts_mat).mean() > 0.99
    assert {VACUUM, SILICON, RESIN, TISSUE} >= set(np.unique(grid_mat)) >= {SILICON, RESIN, TISSUE}


def test_milling_thins_and_finally_removes_the_section():
    w = make(seed=1, mill_inhomogeneity=0.05)
    s = w.sections[2]
    c = np.array([s.center_m[0]]), np.array([s.center_m[1]])
    w.mill(100e-9)
    _, th = w.materials(*c)
    assert 120e-9 < th[0] < 180e-9
    assert abs(w.milled_depth_m(2) - 100e-9) < 5e-9
    before = w.signal(s.center_m, 1e-6, (50, 50))
    w.mill(400e-9)
    mat, th = w.materials(*c)
    assert mat[0] == SILICON and th[0] == 0
    assert abs(w.milled_depth_m(2) - 250e-9) < 1e-12
    after = w.signal(s.center_m, 1e-6, (50, 50))
    assert abs(float(after.mean()) - 0.75) < 0.05 and after.std() < before.std()
    assert not w.section_mask(s.center_m, 1e-6, (50, 50)).any()


def test_inhomogeneity_spread_matches_configuration():
    w = make(seed=4, mill_inhomogeneity=0.1)
    w.mill(100e-9)
    s = w.sections[0]
    mask = w.section_mask(s.center_m, 1e-6, (700, 700))
    _, th = w.materials(*_grid(s.center_m, 1e-6, (700, 700)))
    removed = 250e-9 - th[mask == 1]
    assert abs(removed.mean() - 100e-9) < 3e-9
    assert 0.07 < removed.std() / 100e-9 < 0.13
    rem, (x0, y0, res) = w.remaining_map(0)
    assert rem.dtype == np.float32 and rem.max() <= 250e-9 and rem.min() == 0
    assert res == pytest.approx(2e-6)


def test_region_limits_which_sections_are_milled(wafer):
    w = make(seed=0)
    x, y = w.sections[0].center_m
    w.mill(50e-9, region=(x - 1e-6, x + 1e-6, y - 1e-6, y + 1e-6))
    assert w.milled_depth_m(0) > 40e-9 and w.milled_depth_m(5) == 0
    w.mill(np.arange(6) * 10e-9)
    assert w.milled_depth_m(5) == pytest.approx(50e-9, rel=0.05)
    with pytest.raises(ValueError):
        w.mill(-1e-9)


def test_section_mask_matches_truth(wafer):
    lab = wafer.section_mask((0.0, 0.0), 4e-6, (700, 700))
    assert set(np.unique(lab)) == set(range(len(wafer.sections) + 1))
    for s in wafer.sections:
        j = int(round(s.center_m[0] / 4e-6 + 349.5))
        i = int(round(s.center_m[1] / 4e-6 + 349.5))
        assert lab[i, j] == s.id + 1
        area = (lab == s.id + 1).sum() * 16e-12
        assert area == pytest.approx(shoelace(s.tissue_polygon_m), rel=0.04)
    rot = wafer.section_mask(wafer.sections[3].center_m, 2e-6, (101, 101), rotation_rad=0.7)
    assert rot[50, 50] == 4


def test_signal_levels_and_overview(wafer):
    s = wafer.sections[0]
    over = wafer.signal((0.0, 0.0), 4e-6, (800, 800))
    assert over.dtype == np.float32 and over.min() >= 0 and over.max() <= 1
    mask = wafer.section_mask((0.0, 0.0), 4e-6, (800, 800))
    mat, _ = wafer.materials(*_grid((0.0, 0.0), 4e-6, (800, 800)))
    si = np.median(over[mat == SILICON])
    resin = np.median(over[mat == RESIN])
    tissue = over[mask > 0]
    assert abs(si - 0.75) < 0.05 and abs(resin - 0.2) < 0.03
    assert 0.3 < tissue.mean() < 0.6 and tissue.std() > 0.01          # textured mid-grey
    fine = wafer.signal(s.center_m, 4e-9, (256, 256))
    assert 0.1 <= fine.min() and fine.max() <= 0.7 and fine.std() > 0.05
    whole = wafer.signal((0.0, 0.0), 50e-6, (600, 600))
    assert whole[0, 0] == 0 and abs(whole[300, 150] - 0.75) < 0.1      # vacuum outside the disk


def test_focus_offset_is_the_configured_tilt_plus_a_gentle_bow(wafer):
    d = 1e-3
    dzdx = (wafer.focus_offset_m(d, 0) - wafer.focus_offset_m(-d, 0)) / (2 * d)
    dzdy = (wafer.focus_offset_m(0, d) - wafer.focus_offset_m(0, -d)) / (2 * d)
    assert dzdx == pytest.approx(0.3e-3, abs=0.01e-3) and dzdy == pytest.approx(-0.2e-3, abs=0.01e-3)
    xs = np.linspace(-12e-3, 12e-3, 5)
    assert wafer.focus_offset_m(xs, xs).shape == (5,)
    assert abs(wafer.focus_offset_m(12e-3, 0) - 0.3e-3 * 12e-3) < 3e-6


def test_real_em_texture_shows_on_sections():
    files = sorted(ISBI.glob("isbi2012_train_*.png"))
    if not files:
        pytest.skip(f"ISBI images not available at {ISBI}")
    sp = Specimen(images=files[:6], texture_pixel_size_m=4e-9)
    w = VirtualWafer(WaferParams(), sp)
    s = w.sections[0]
    a = w.signal(s.center_m, 4e-9, (512, 512), rotation_rad=s.angle_rad)
    expect = 0.1 + 0.6 * sp.slice_image(0)
    assert np.corrcoef(a.ravel(), expect.ravel())[0, 1] > 0.99


def _grid(center, p, shape):
    h, w = shape
    jj, ii = np.meshgrid(np.arange(w), np.arange(h))
    return center[0] + (jj - (w - 1) / 2) * p, center[1] + (ii - (h - 1) / 2) * p


def test_high_magnification_frames_inside_and_across_the_tissue_edge_agree():
    w = make(seed=5)
    s = w.sections[0]
    p = 20e-9
    inside = w.signal(s.center_m, p, (64, 64))
    assert w.section_mask(s.center_m, p, (64, 64)).min() == 1
    assert (w.materials(*_grid(s.center_m, p, (64, 64)))[0] == TISSUE).all()
    # a wide frame on the same pixel grid, reaching past the tissue edge, shows the same tissue pixels
    edge = s.tissue_polygon_m[np.argmax(s.tissue_polygon_m[:, 0])]
    n = int(round((edge[0] - s.center_m[0]) / p))
    big = w.signal((s.center_m[0] + n * p, s.center_m[1]), p, (64, 64 + 2 * n))
    np.testing.assert_allclose(big[:, :64], inside, atol=0.05)
    assert np.abs(big[:, :64] - inside).mean() < 0.005
    assert (w.section_mask((s.center_m[0] + n * p, s.center_m[1]), p, (64, 64 + 2 * n))[:, -1] == 0).all()


def test_thin_remaining_film_lets_the_silicon_show():
    w = make(seed=6, mill_inhomogeneity=0.0)
    s = w.sections[0]
    tissue = float(w.signal(s.center_m, 1e-6, (40, 40)).mean())
    w.mill(240e-9)                                  # 10 nm left
    thin = float(w.signal(s.center_m, 1e-6, (40, 40)).mean())
    assert thin > tissue + 0.1 and thin < 0.75
    assert w.materials(np.array([s.center_m[0]]), np.array([s.center_m[1]]))[0][0] == TISSUE
