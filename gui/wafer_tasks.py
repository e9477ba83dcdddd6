"""The wafer workflow's long computations, run in workers: overview
acquisition, section detection, grid creation and tour optimisation. Plain
functions (no Qt): they take ``progress(done, total, text)`` and a cancel
``token`` and return data for the model."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from common.geometry import OverviewImage, Section
from devices.interfaces import ScanParams
from gui.wafer_model import GridSpec

Progress = Optional[Callable[[int, int, str], None]]


def _noop(*_a):
    pass


def overview_region(setup) -> tuple[float, float, float, float]:
    """Default overview area (x0, y0, x1, y1 µm): the wafer on a simulator,
    else the stage travel window."""
    world = getattr(setup, "world", None)
    if world is not None and world.wafer is not None:
        r = world.wafer.radius_m * 1e6
        return -r, -r, r, r
    t = setup.config.safety.stage
    return t.x_mm[0] * 1e3, t.y_mm[0] * 1e3, t.x_mm[1] * 1e3, t.y_mm[1] * 1e3


def acquire_overview(setup, region_um, pixel_um: float = 4.0, block: int = 1024, progress: Progress = None,
                     token=None) -> OverviewImage:
    """Overview of ``region_um`` in blocks of ``block`` px. On the simulator
    the wafer's SE yield is rendered directly (an overview at 4 µm is a
    mosaic of stage positions the simulated SEM would render the same way);
    on a real microscope each block is a frame at a stage position."""
    progress = progress or _noop
    x0, y0, x1, y1 = region_um
    w, h = int(math.ceil((x1 - x0) / pixel_um)), int(math.ceil((y1 - y0) / pixel_um))
    nx, ny = math.ceil(w / block), math.ceil(h / block)
    out = np.zeros((ny * block, nx * block), np.uint8)
    world = getattr(setup, "world", None)
    sim = world is not None and world.wafer is not None
    sem = setup.sem
    saved = None
    if not sim:
        saved = sem.scan()
        sem.set_scan(ScanParams(pixel_m=pixel_um * 1e-6, frame=(block, block), dwell_s=1e-6, rotation_rad=0.0))
        sem.set_blanked(False)
    try:
        total = nx * ny
        for k in range(total):
            if token is not None:
                token.check()
            i, j = divmod(k, nx)
            cx = x0 + (j * block + (block - 1) / 2) * pixel_um        # block centre, µm
            cy = y0 + (i * block + (block - 1) / 2) * pixel_um
            if sim:
                sig = world.wafer.signal((cx * 1e-6, cy * 1e-6), pixel_um * 1e-6, (block, block))
                tile = np.clip(sig * 255.0 + 0.5, 0, 255).astype(np.uint8)
            else:
                setup.stage.move_to(setup.stage.position().with_(x=cx * 1e-6, y=cy * 1e-6))
                tile = sem.acquire_frame().image
            out[i * block:(i + 1) * block, j * block:(j + 1) * block] = tile
            progress(k + 1, total, f"overview block {k + 1}/{total}")
    finally:
        if saved is not None:
            sem.set_blanked(True)
            sem.set_scan(saved)
    # a frame's pixel (0, 0) is centred (block - 1)/2 pixels before its centre (the SEM's and the
    # simulator's convention), so the overview's pixel (0, 0) is centred on (x0, y0)
    return OverviewImage(out[:h, :w].copy(), (x0, y0), pixel_um)


# ------------------------------------------------------------ detection
def detector_available(model_path=None) -> tuple[bool, str]:
    """(usable, why not): the module and its trained model (the shipped one, or
    ``model_path``, e.g. fine-tuned by `wafer train`) must both exist."""
    try:
        from wafer import detect
    except Exception as e:                 # missing module or torch: say which
        return False, f"section detection is not installed (wafer/detect.py: {e})"
    path = detect.DEFAULT_MODEL if model_path is None else model_path
    if not Path(path).is_file():
        return False, f"no trained section model at {path} (train one first)"
    return True, ""


def detect_sections(ov: OverviewImage, threshold: float = 0.5, band: int = 512, progress: Progress = None,
                    token=None, model_path=None) -> list[Section]:
    """wafer.detect's U-Net (mirror-averaged, as detect.probability_map) and
    post-processing, run band by band so the operator sees progress and can
    cancel between bands. ``model_path``:
    other weights than the shipped ones."""
    from wafer import detect
    progress = progress or _noop
    model = detect.load_model(model_path)
    img = detect.as_unit_float(ov.image)
    net_px = float(getattr(model, "net_pixel_um", ov.pixel_um))
    small = detect.resample(img, ov.pixel_um / net_px)
    h = small.shape[0]
    m = 64                                          # context rows above and below each band
    prob = np.empty(small.shape, np.float32)
    n = max(1, math.ceil(h / band))
    for k in range(n):
        if token is not None:
            token.check()
        r0, r1 = k * band, min(h, (k + 1) * band)
        a, b = max(0, r0 - m), min(h, r1 + m)
        part = detect.predict_mirrored(small[a:b], model)
        prob[r0:r1] = part[r0 - a:r0 - a + (r1 - r0)]
        progress(k + 1, n + 1, f"detecting: band {k + 1}/{n}")
    prob = np.clip(detect.resample(prob, 1.0, shape=img.shape), 0, 1)
    dets = detect.sections_from_probability(ov.image, prob, ov.pixel_um, ov.origin_um, model, threshold)
    progress(n + 1, n + 1, f"{len(dets)} sections found")
    return [Section.from_dict(d) for d in dets]


def truth_sections(setup) -> list[Section]:
    """The simulator's own sections (what detection should find)."""
    out = []
    for s in setup.world.wafer.sections:
        out.append(Section(int(s.id), (s.center_m[0] * 1e6, s.center_m[1] * 1e6),
                           (s.size_m[0] * 1e6, s.size_m[1] * 1e6), math.degrees(s.angle_rad),
                           np.asarray(s.tissue_polygon_m, float) * 1e6, 1.0))
    return out


# ------------------------------------------------------------ grids
def grids_available() -> tuple[bool, str]:
    try:
        from wafer import grids  # noqa: F401
    except Exception as e:
        return False, f"wafer/grids.py not available ({e}); grids cover each section's rectangle"
    return True, ""


def grid_for_section(sec: Section, template: GridSpec, grid_id: int = 0, margin_um: float = 0.0) -> GridSpec:
    """The smallest grid of the template's tiles covering the section outline
    (plus margin), turned with the section: wafer.grids.grid_for_section when
    present, else the section's rectangle covered tile by tile."""
    try:
        from wafer.grids import grid_for_section as external
    except ImportError:
        external = None
    t = template
    if external is not None:
        g = external(sec, frame_size_px=tuple(t.frame_size), pixel_size_nm=t.pixel_size_nm,
                     overlap_px=t.overlap_px, margin_um=margin_um, grid_id=grid_id)
        return from_wafer_grid(g, t, sec.id)
    (tw, th), (sx, sy) = t.tile_size_um(), t.step_um()
    w, h = sec.size_um[0] + 2 * margin_um, sec.size_um[1] + 2 * margin_um
    cols = max(1, math.ceil((w - tw) / sx - 1e-9) + 1)
    rows = max(1, math.ceil((h - th) / sy - 1e-9) + 1)
    return GridSpec(sec.id, grid_id, tuple(sec.center_um), sec.angle_deg, min(rows, 1000), min(cols, 1000),
                    t.pixel_size_nm, tuple(t.frame_size), t.overlap_px, t.dwell_ns)


def to_wafer_grid(spec: GridSpec):
    from wafer.grids import Grid, tile_geometry
    tile, ov = tile_geometry(spec.frame_size, spec.pixel_size_nm, spec.overlap_px)
    return Grid(id=spec.id, section_id=spec.section_id, origin_um=tuple(spec.center_um),
                rotation_deg=spec.rotation_deg, rows=spec.rows, cols=spec.cols, tile_size_um=tile, overlap_um=ov,
                pixel_size_nm=spec.pixel_size_nm, frame_size_px=tuple(spec.frame_size))


def from_wafer_grid(g, like: GridSpec, section_id: int, grid_id: Optional[int] = None) -> GridSpec:
    return GridSpec(section_id, g.id if grid_id is None else grid_id, (float(g.origin_um[0]), float(g.origin_um[1])),
                    float(g.rotation_deg), min(int(g.rows), 1000), min(int(g.cols), 1000), like.pixel_size_nm,
                    tuple(like.frame_size), like.overlap_px, like.dwell_ns)


def split_grid(spec: GridSpec, axis: str, new_id: int) -> tuple[GridSpec, GridSpec]:
    """Two grids whose tiles are exactly the original ones (wafer.grids.GridSet.split)."""
    from wafer.grids import GridSet
    a, b = GridSet([to_wafer_grid(spec)]).split(spec.id, axis)
    return from_wafer_grid(a, spec, spec.section_id), from_wafer_grid(b, spec, spec.section_id, new_id)


def merge_grids(a: GridSpec, b: GridSpec) -> GridSpec:
    """The smallest grid in a's frame covering both (wafer.grids.GridSet.merge)."""
    from wafer.grids import GridSet
    if a.section_id != b.section_id:
        raise ValueError("grids of different sections cannot be merged")
    m = GridSet([to_wafer_grid(a), to_wafer_grid(b)]).merge(a.id, b.id)
    return from_wafer_grid(m, a, a.section_id)


# ------------------------------------------------------------ MagC
def load_magc(path, template: GridSpec, margin_um: float = 0.0, landmarks_path=None):
    """(sections, grid specs, order, registration summary or "") from a MagC
    file: wafer.magc.import_magc with the template's tiles, mapped to the stage
    by the landmarks' affine when a stage landmark file is given."""
    from wafer.landmarks import load_stage_landmarks
    from wafer.magc import import_magc
    t = template
    stage = load_stage_landmarks(landmarks_path) if landmarks_path else None
    imp = import_magc(path, stage_landmarks=stage, frame_size_px=tuple(t.frame_size), pixel_size_nm=t.pixel_size_nm,
                      overlap_px=t.overlap_px, margin_um=margin_um)
    specs = [from_wafer_grid(g, t, g.section_id) for g in imp.grids]
    summary = imp.registration.summary() if imp.registration is not None else ""
    return imp.sections, specs, imp.order, summary


# ------------------------------------------------------------ order
def optimise_order(points_um: np.ndarray, ids: list[int], start_um, solver: str = "fast", progress: Progress = None,
                   token=None) -> tuple[list[int], float]:
    """(section ids in the new order, path length µm) from wafer.tour."""
    from wafer.tour import order_sections
    (progress or _noop)(0, 0, f"ordering {len(ids)} sections ({solver})")
    res = order_sections(points_um, start_um=start_um, solver=solver)
    return [ids[i] for i in res.order], float(res.length_um)
