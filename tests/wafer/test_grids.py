"""Acquisition grids: coverage, overlap, minimality, and GUI edits with undo/redo."""

import math

import numpy as np
import pytest

from wafer.grids import Grid, GridSet, grid_for_section, tile_geometry
from wafer.sections import Section

FRAME = (4096, 3072)
PIX_NM = 10.0  # tiles of 40.96 x 30.72 µm


def irregular_section(seed, sid=1):
    """A star-shaped, non-rectangular outline roughly aligned with a random angle."""
    rng = np.random.default_rng(seed)
    angle = float(rng.uniform(-180, 180))
    w, h = rng.uniform(150, 500), rng.uniform(80, 300)
    th = np.sort(rng.uniform(0, 2 * np.pi, 11))
    rad = rng.uniform(0.7, 1.0, 11)
    local = np.c_[w / 2 * rad * np.cos(th), h / 2 * rad * np.sin(th)]
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    centre = rng.uniform(-10000, 10000, 2)
    poly = local @ np.array([[c, s], [-s, c]]) + centre
    return Section(id=sid, center_um=tuple(centre), size_um=(w, h), angle_deg=angle, polygon_um=poly.tolist())


def inside_polygon(points, poly):
    """Even-odd rule, independent of the code under test."""
    x, y = points[:, 0:1], points[:, 1:2]
    px, py = poly[:, 0], poly[:, 1]
    qx, qy = np.roll(px, -1), np.roll(py, -1)
    crosses = ((py > y) != (qy > y)) & (x < (qx - px) * (y - py) / (qy - py + 1e-300) + px)
    return crosses.sum(axis=1) % 2 == 1


def in_some_tile(points, tile_polys, tol=1e-6):
    """Point in any convex tile polygon (corners counter-clockwise)."""
    a = tile_polys[None, :, :, :]
    b = np.roll(tile_polys, -1, axis=1)[None]
    p = points[:, None, None, :]
    cross = (b[..., 0] - a[..., 0]) * (p[..., 1] - a[..., 1]) - (b[..., 1] - a[..., 1]) * (p[..., 0] - a[..., 0])
    return (cross >= -tol).all(axis=2).any(axis=1)


def sample_section_plus_margin(section, margin, n=4000, seed=0):
    rng = np.random.default_rng(seed)
    poly = np.asarray(section.polygon_um)
    lo, hi = poly.min(axis=0), poly.max(axis=0)
    pts = rng.uniform(lo, hi, (n, 2))
    pts = pts[inside_polygon(pts, poly)]
    # the margin ring: every vertex pushed out by the margin in 16 directions
    dirs = np.array([[math.cos(a), math.sin(a)] for a in np.linspace(0, 2 * np.pi, 16, endpoint=False)])
    ring = (poly[:, None, :] + margin * dirs[None, :, :]).reshape(-1, 2)
    return np.vstack([pts, poly, ring])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("overlap_px,margin", [(0, 0.0), (256, 5.0), (1000, 20.0)])
def test_grid_covers_section_polygon_with_margin(seed, overlap_px, margin):
    sec = irregular_section(seed)
    g = grid_for_section(sec, FRAME, PIX_NM, overlap_px=overlap_px, margin_um=margin)
    pts = sample_section_plus_margin(sec, margin, seed=seed)
    assert len(pts) > 100
    assert in_some_tile(pts, g.tile_corners_um()).all()
    assert g.rotation_deg == pytest.approx(sec.angle_deg)
    assert g.section_id == sec.id


@pytest.mark.parametrize("seed", range(4))
def test_adjacent_tiles_overlap_by_requested_amount(seed):
    sec = irregular_section(seed)
    g = grid_for_section(sec, FRAME, PIX_NM, overlap_px=300, margin_um=2.0)
    assert g.tile_size_um == pytest.approx((40.96, 30.72))
    assert g.overlap_um == pytest.approx((3.0, 3.0))
    assert g.rows >= 2 and g.cols >= 2
    c = g.tile_centres_um().reshape(g.rows, g.cols, 2)
    polys = g.tile_corners_um().reshape(g.rows, g.cols, 4, 2)
    a = math.radians(g.rotation_deg)
    ux, uy = np.array([math.cos(a), math.sin(a)]), np.array([-math.sin(a), math.cos(a)])
    # neighbours along a row: the overlap is the width of the shared strip
    right = polys[:, :-1] @ ux
    left = polys[:, 1:] @ ux
    np.testing.assert_allclose(right.max(axis=-1) - left.min(axis=-1), 3.0, atol=1e-9)
    up = polys[:-1] @ uy
    down = polys[1:] @ uy
    np.testing.assert_allclose(up.max(axis=-1) - down.min(axis=-1), 3.0, atol=1e-9)
    # and neighbours are offset purely along the grid axes
    np.testing.assert_allclose((c[:, 1:] - c[:, :-1]) @ uy, 0.0, atol=1e-9)
    np.testing.assert_allclose((c[1:] - c[:-1]) @ ux, 0.0, atol=1e-9)


def test_overlap_fraction_is_per_axis():
    (w, h), (ox, oy) = tile_geometry((2000, 1000), 5.0, overlap_fraction=0.1)
    assert (w, h) == pytest.approx((10.0, 5.0))
    assert (ox, oy) == pytest.approx((1.0, 0.5))
    with pytest.raises(ValueError):
        tile_geometry((2000, 1000), 5.0, overlap_px=10, overlap_fraction=0.1)


@pytest.mark.parametrize("seed", range(6))
def test_grid_is_minimal(seed):
    sec = irregular_section(seed)
    margin = 4.0
    g = grid_for_section(sec, FRAME, PIX_NM, overlap_px=200, margin_um=margin)
    pts = sample_section_plus_margin(sec, margin, seed=seed)
    # One fewer column or row is narrower than the section + margin, so no
    # placement can cover it; check the placement at the same centre explicitly.
    for rows, cols in ((g.rows - 1, g.cols), (g.rows, g.cols - 1)):
        if rows < 1 or cols < 1:
            continue
        smaller = Grid(id=0, section_id=1, origin_um=g.origin_um, rotation_deg=g.rotation_deg, rows=rows,
                       cols=cols, tile_size_um=g.tile_size_um, overlap_um=g.overlap_um)
        assert not in_some_tile(pts, smaller.tile_corners_um()).all()
        local = smaller.to_local(pts)
        span = local.max(axis=0) - local.min(axis=0)
        assert (np.array(smaller.extent_um) < span - 1e-9).any()


def test_single_tile_for_a_small_section():
    sec = Section(id=5, center_um=(100.0, -50.0), size_um=(10.0, 8.0), angle_deg=37.0, polygon_um=[])
    g = grid_for_section(sec, FRAME, PIX_NM, overlap_px=100)
    assert (g.rows, g.cols) == (1, 1)
    np.testing.assert_allclose(g.tile_centres_um(), [[100.0, -50.0]], atol=1e-9)


def base_grid(gid=0, **kw):
    args = dict(id=gid, section_id=gid, origin_um=(1000.0, 2000.0), rotation_deg=15.0, rows=3, cols=4,
                tile_size_um=(40.96, 30.72), overlap_um=(2.0, 2.0), pixel_size_nm=10.0, frame_size_px=FRAME)
    args.update(kw)
    return Grid(**args)


def centres_set(grids):
    return sorted(map(tuple, np.round(np.vstack([g.tile_centres_um() for g in grids]), 6)))


def test_edits_undo_redo_restore_state():
    gs = GridSet([base_grid(0)])
    initial = gs.grids
    states = [initial]
    gs.add(base_grid(1, origin_um=(1500.0, 2000.0)))
    states.append(gs.grids)
    moved = gs.move(0, 10.0, -5.0)
    assert moved.origin_um == pytest.approx((1010.0, 1995.0))
    states.append(gs.grids)
    rotated = gs.rotate(0, 30.0)
    assert rotated.rotation_deg == pytest.approx(45.0) and rotated.origin_um == moved.origin_um
    states.append(gs.grids)
    resized = gs.resize(1, 5, 2)
    assert (resized.rows, resized.cols) == (5, 2)
    states.append(gs.grids)
    a, b = gs.split(0, "cols")
    states.append(gs.grids)
    merged = gs.merge(a.id, b.id)
    states.append(gs.grids)
    gs.delete(1)
    states.append(gs.grids)
    assert [g.id for g in gs.grids] == [merged.id]

    for expected in reversed(states[:-1]):
        assert gs.undo() == expected
    assert gs.grids == initial and not gs.can_undo
    with pytest.raises(IndexError):
        gs.undo()
    for expected in states[1:]:
        assert gs.redo() == expected
    assert not gs.can_redo

    for _ in range(3):
        gs.undo()
    gs.move(merged.id, 1.0, 1.0)  # a new edit drops the redo branch
    assert not gs.can_redo


def test_snapshots_are_immutable():
    gs = GridSet([base_grid(0)])
    before = gs.grids
    gs.move(0, 5, 5)
    assert before[0].origin_um == (1000.0, 2000.0)
    with pytest.raises(Exception):
        before[0].rows = 9  # frozen dataclass


def test_split_keeps_exactly_the_original_tiles():
    for axis in ("rows", "cols"):
        g = base_grid(0, rows=5, cols=7)
        gs = GridSet([g])
        a, b = gs.split(0, axis)
        assert a.id == 0 and b.id == 1
        assert a.n_tiles + b.n_tiles == g.n_tiles
        assert centres_set([a, b]) == centres_set([g])
    with pytest.raises(ValueError):
        GridSet([base_grid(0, rows=1, cols=1)]).split(0, "rows")


def test_resize_with_corner_anchor_keeps_first_tile():
    gs = GridSet([base_grid(0)])
    first = gs.get(0).tile_centres_um()[0]
    g = gs.resize(0, 6, 6, anchor="corner")
    np.testing.assert_allclose(g.tile_centres_um()[0], first, atol=1e-9)


def test_merge_covers_both_and_needs_same_pixel_size():
    a = base_grid(0, rows=2, cols=2)
    b = base_grid(1, rows=2, cols=3, origin_um=(1300.0, 2150.0), rotation_deg=40.0)
    gs = GridSet([a, b])
    m = gs.merge(0, 1)
    corners = np.vstack([a.tile_corners_um().reshape(-1, 2), b.tile_corners_um().reshape(-1, 2)])
    assert in_some_tile(corners, m.tile_corners_um(), tol=1e-6).all()
    assert m.rotation_deg == a.rotation_deg and len(gs) == 1
    c = base_grid(2, pixel_size_nm=5.0)
    gs2 = GridSet([a, c])
    with pytest.raises(ValueError, match="pixel size"):
        gs2.merge(0, 2)
    assert len(gs2) == 2 and not gs2.can_undo  # a refused edit changes nothing


def test_invalid_edits():
    gs = GridSet([base_grid(0)])
    with pytest.raises(ValueError):
        gs.add(base_grid(0))
    with pytest.raises(KeyError):
        gs.move(42, 1, 1)
    with pytest.raises(ValueError):
        gs.resize(0, 0, 3)
    assert not gs.can_undo
