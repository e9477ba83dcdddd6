"""common/geometry.py: tile grids, sections and the overview transform, and
that acquisition, the wafer tools and the GUI use this one geometry."""
import math
import random

import numpy as np
import pytest

from common import geometry
from common.geometry import OverviewImage, OverviewTransform, Section, TileGrid


# ------------------------------------------------------------ grids
def test_rotated_grid_tile_centres_by_hand():
    # 10 x 8 µm frames (1 µm pixels), 2 px overlap: steps of 8 and 6 µm; turned by 90°:
    # a local (u, v) lands at (-v, u)
    g = TileGrid.of_frames((100.0, 200.0), 90.0, 2, 3, 1000.0, (10, 8), 2)
    assert g.tile_size_um == (10.0, 8.0) and g.step_um == (8.0, 6.0) and g.overlap_um == (2.0, 2.0)
    expected = [(103, 192), (103, 200), (103, 208),          # row 0 (local v = -3), cols at u = -8, 0, 8
                (97, 192), (97, 200), (97, 208)]             # row 1 (local v = +3)
    np.testing.assert_allclose(g.tile_centres_um(), expected, atol=1e-12)
    assert [(r, c) for r, c, _, _ in g.tile_offsets()] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    # 30°: a row of two tiles 10 µm apart, centres ±5 µm along (cos 30°, sin 30°)
    h = TileGrid.of_frames((0.0, 0.0), 30.0, 1, 2, 1000.0, (10, 10), 0)
    np.testing.assert_allclose(h.tile_centres_um(), [[-5 * math.sqrt(3) / 2, -2.5], [5 * math.sqrt(3) / 2, 2.5]],
                               atol=1e-12)


def test_extent_outline_and_corners():
    g = TileGrid.of_frames((0.0, 0.0), 90.0, 2, 3, 1000.0, (10, 8), 2)
    assert g.extent_um == (10 + 2 * 8.0, 8 + 6.0)
    # the 26 x 14 µm outline turned by 90° spans 14 µm in x and 26 µm in y
    o = g.outline_um()
    np.testing.assert_allclose(o.max(0) - o.min(0), (14.0, 26.0), atol=1e-12)
    c = g.tile_corners_um()
    assert c.shape == (6, 4, 2)
    np.testing.assert_allclose(c.mean(1), g.tile_centres_um(), atol=1e-12)
    np.testing.assert_allclose(g.to_local(g.tile_centres_um()), g.local_centres_um(), atol=1e-12)


def _acquisition_reference(rows, cols, pixel_size_nm, frame, overlap, rotation_deg):
    """Tile offsets as acquisition has always computed them (acq/plan.py before
    common/geometry.py): the numbers run fingerprints record."""
    w, h = frame
    p = pixel_size_nm * 1e-3
    sx, sy = (w - overlap) * p, (h - overlap) * p
    c, s = math.cos(math.radians(rotation_deg)), math.sin(math.radians(rotation_deg))
    out = []
    for r in range(rows):
        for col in range(cols):
            u = (col - (cols - 1) / 2) * sx
            v = (r - (rows - 1) / 2) * sy
            out.append((r, col, c * u - s * v, s * u + c * v))
    return out


def test_tile_offsets_are_acquisitions_to_the_bit():
    rng = random.Random(7)
    for _ in range(300):
        args = (rng.randint(1, 12), rng.randint(1, 12), rng.choice([4.0, 10.0, 3.3, rng.uniform(0.5, 50)]),
                rng.choice([(1024, 768), (4096, 3072), (512, 512)]), rng.randint(0, 200), rng.uniform(-180, 180))
        rows, cols, px, frame, ov, rot = args
        assert TileGrid.of_frames((0, 0), rot, rows, cols, px, frame, ov).tile_offsets() == \
            _acquisition_reference(*args)


def _three_grids(center, rot, rows, cols, px, frame, overlap):
    from acq.plan import Grid as PlanGrid
    from gui.wafer_model import GridSpec
    from gui.wafer_tasks import to_wafer_grid
    plan = PlanGrid(id=1, center_um=center, rotation_deg=rot, rows=rows, cols=cols, pixel_size_nm=px,
                    frame_size=frame, overlap_px=overlap)
    spec = GridSpec(0, 1, center, rot, rows, cols, px, frame, overlap)
    return plan, spec, to_wafer_grid(spec)


@pytest.mark.parametrize("rot", [0.0, 17.3, -90.0, 133.0])
def test_plan_wafer_and_gui_grids_are_one_geometry(rot):
    plan, spec, wafer_grid = _three_grids((1234.5, -678.9), rot, 3, 4, 7.5, (2048, 1536), 100)
    for g in (plan, spec, wafer_grid):
        assert type(g.geometry) is TileGrid
    assert plan.geometry == spec.geometry                 # the same numbers in, the same object out
    plan_centres = [(plan.center_um[0] + dx, plan.center_um[1] + dy)
                    for _, _, dx, dy in plan.tile_offsets_um(plan.rotation_deg)]     # what acq/expand.py images
    for centres in (plan.geometry.tile_centres_um(), spec.tile_centres_um(), wafer_grid.tile_centres_um()):
        assert np.array_equal(centres, np.array(plan_centres))
    assert spec.extent_um() == wafer_grid.extent_um == plan.geometry.extent_um


def test_the_grid_models_keep_no_tile_arithmetic_of_their_own(monkeypatch):
    """Every grid model's tile centres go through TileGrid: patch it and all follow."""
    plan, spec, wafer_grid = _three_grids((0.0, 0.0), 0.0, 1, 2, 10.0, (1024, 768), 0)
    monkeypatch.setattr(TileGrid, "local_centres_um", lambda self: np.full((self.n_tiles, 2), 42.0))
    assert plan.tile_offsets_um(0.0)[0][2:] == (42.0, 42.0)
    for g in (spec, wafer_grid):
        assert np.array_equal(g.tile_centres_um(), np.full((2, 2), 42.0))


# ------------------------------------------------------------ sections
def test_section_defaults_to_its_rectangle_and_edits_keep_the_outline():
    s = Section(4, (10.0, 20.0), (4.0, 2.0), 90.0)
    np.testing.assert_allclose(s.polygon_um, [[11, 18], [11, 22], [9, 22], [9, 18]], atol=1e-12)
    assert not s.polygon_um.flags.writeable
    assert s == Section(4.0, [10, 20], [4, 2], 90, s.polygon_um.tolist())
    assert s != s.moved(1.0, 0.0)
    assert Section.from_dict(s.to_dict()) == s
    r = s.rotated(0.0)
    np.testing.assert_allclose(r.polygon_um, r.rectangle(), atol=1e-12)
    with pytest.raises(geometry.SectionFormatError, match="polygon_um"):
        Section(1, (0, 0), (1, 1), 0, [[0, 0], [1, 1]])


def test_wafer_gui_and_plan_share_the_section_type():
    from acq.plan import Grid as PlanGrid
    from acq.plan import Section as PlanSection
    from gui import wafer_model
    from wafer import sections
    assert sections.Section is Section and wafer_model.Section is Section
    plan_sec = PlanSection(id=3, grids=[PlanGrid(id=0, center_um=(5.0, 6.0), rotation_deg=30.0, rows=2, cols=2,
                                                 pixel_size_nm=1000.0, frame_size=(20, 16))])
    shape = plan_sec.geometry
    assert type(shape) is Section
    assert (shape.id, shape.center_um, shape.size_um, shape.angle_deg) == (3, (5.0, 6.0), (40.0, 32.0), 30.0)


# ------------------------------------------------------------ overview transform
def test_overview_origin_is_the_centre_of_the_top_left_pixel():
    t = OverviewTransform((-800.0, -600.0), 4.0)
    assert t.to_stage(0, 0) == (-800.0, -600.0)
    assert t.to_stage(1, 2) == (-796.0, -592.0)              # columns along +x, rows along +y
    assert t.bounds_um((300, 400)) == (-802.0, -602.0, 1600.0, 1200.0)   # pixel edges half a pixel out
    assert t.affine() == [[4.0, 0.0, -800.0], [0.0, 4.0, -600.0]]
    cols, rows = np.array([0.0, 3.5, 399.0]), np.array([0.0, -2.25, 299.0])
    back = t.to_pixel(*t.to_stage(cols, rows))
    np.testing.assert_allclose(back, (cols, rows), atol=1e-12)
    ov = OverviewImage(np.zeros((300, 400), np.uint8), (-800, -600), 4)
    assert ov.transform == t and ov.rect_um() == t.bounds_um((300, 400)) and ov.transform.to_stage(0, 0) == (-800.0, -600.0)


def test_the_mosaic_places_pixel_zero_as_declared():
    """One 8 x 6 px frame at 2 µm centred on (100, 50): its top-left pixel's
    centre is 3.5 and 2.5 pixels from the frame centre (the SEM's frame
    convention), and the assembled overview's origin must be exactly there."""
    from wafer.mosaic import MosaicTile, assemble
    img = np.zeros((6, 8), np.uint8)
    img[0, 0] = 255
    ov = assemble([MosaicTile(img, (100.0, 50.0), 2.0, 0, 0)], 2.0, feather_px=1)
    assert type(ov) is OverviewImage
    assert ov.origin_um == (100.0 - 3.5 * 2.0, 50.0 - 2.5 * 2.0)
    assert ov.image[0, 0] > 0 and ov.image.shape == (6, 8)


def test_the_guis_overview_acquisition_places_pixels_as_declared(sim_config):
    """The GUI's overview of the simulated wafer: every pixel shows the wafer
    where the overview's transform says it is (before, pixel (0, 0) was
    declared half a pixel away from where it was rendered)."""
    from devices.factory import build_setup
    from gui.wafer_tasks import acquire_overview
    with build_setup(sim_config) as setup:
        wafer = setup.world.wafer
        cx, cy = (v * 1e6 for v in wafer.sections[0].center_m)
        ov = acquire_overview(setup, (cx - 600, cy - 400, cx + 600, cy + 400), 4.0, block=128)
        assert ov.origin_um == (cx - 600, cy - 400)
        h, w = ov.image.shape
        mid = ov.transform.to_stage((w - 1) / 2, (h - 1) / 2)               # the image's centre, by the transform
        truth = wafer.signal((mid[0] * 1e-6, mid[1] * 1e-6), 4e-6, (h, w))
    rendered = np.clip(truth * 255.0 + 0.5, 0, 255).astype(np.uint8)
    assert np.abs(rendered.astype(float) - ov.image).mean() < 0.6       # half a pixel off: 1.3
