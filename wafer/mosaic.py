"""Overview mosaic (seed ch. 2): tiles taken at stage positions (e.g. 1024×768
at 1 µm, 32 px overlap) → tile positions refined by cross-correlating the
overlaps → one image in stage coordinates at a chosen pixel size (4 µm for
section detection) → OME-TIFF carrying its stage transform.

Geometry follows the engine's tiles (acq/writers/layout.TileRecord): image
pixel (col j, row i) of a tile lies at centre + (j − w/2, i − h/2)·pixel in
stage µm (scan rotation 0 for overviews). The assembled overview is a
common.geometry.OverviewImage: pixel (col X, row Y) lies at stage
origin + (X, Y)·pixel, pixel (0, 0) being the centre of the top-left pixel
(the convention of ``wafer detect``, declared in common/geometry.py).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from common.geometry import OverviewImage

TRANSFORM_KEY = "acq.overview"          # MapAnnotation key of the stage transform (JSON)


@dataclass
class MosaicTile:
    image: np.ndarray                    # uint8 (h, w)
    center_um: tuple[float, float]       # recorded stage position of the frame centre
    pixel_um: float
    row: int
    col: int
    tile_id: str = ""
    t_start: Optional[float] = None       # when the frame began (epoch s), for the overview's AcquisitionDate
    instrument: Optional[dict] = None     # the tile's OME Instrument (ome_tiff.Instrument fields)


@dataclass
class Link:
    """Measured offset of tile b's centre relative to tile a's (µm)."""
    a: int
    b: int
    offset_um: tuple[float, float]
    response: float                      # phase-correlation peak height (0..1)
    used: bool = True


@dataclass
class Refinement:
    centers_um: np.ndarray               # (n, 2) refined tile centres
    links: list[Link] = field(default_factory=list)
    residual_px: float = 0.0             # RMS over used links, in tile pixels
    max_correction_px: float = 0.0       # largest move from the recorded position

    def summary(self) -> dict:
        used = [lk for lk in self.links if lk.used]
        return {"links": len(self.links), "links_used": len(used),
                "rms_residual_px": round(self.residual_px, 3),
                "max_correction_px": round(self.max_correction_px, 3)}


# ------------------------------------------------------------ overlaps
def _overlap_strips(a: MosaicTile, b: MosaicTile, d_px: tuple[int, int]):
    """The parts of a and b that show the same stage area if b's centre is
    ``d_px`` from a's; None if they hardly overlap."""
    h, w = a.image.shape
    dx, dy = d_px
    x0, x1 = max(0, dx), min(w, w + dx)
    y0, y1 = max(0, dy), min(h, h + dy)
    if x1 - x0 < 8 or y1 - y0 < 8:
        return None
    return a.image[y0:y1, x0:x1], b.image[y0 - dy:y1 - dy, x0 - dx:x1 - dx]


def _band_pass(img: np.ndarray) -> np.ndarray:
    """Shot noise (pixel scale) and wafer illumination gradients (hundreds
    of µm) out, section edges and texture in: a difference of Gaussians."""
    f = img.astype(np.float32)
    return cv2.GaussianBlur(f, (0, 0), 1.5) - cv2.GaussianBlur(f, (0, 0), 8.0)


def _subpixel(c: np.ndarray, i: int, j: int) -> tuple[float, float]:
    """Parabola through the peak and its neighbours, per axis."""
    def fit(m, z, p):
        return 0.0 if m == p else float(np.clip(0.5 * (m - p) / (m - 2 * z + p), -0.5, 0.5))
    dy = fit(c[i - 1, j], c[i, j], c[i + 1, j]) if 0 < i < c.shape[0] - 1 else 0.0
    dx = fit(c[i, j - 1], c[i, j], c[i, j + 1]) if 0 < j < c.shape[1] - 1 else 0.0
    return dx, dy


def measure_link(a: MosaicTile, b: MosaicTile, ia: int, ib: int, search_px: int = 8,
                 passes: int = 3) -> Optional[Link]:
    """Where b's content really sits: the middle of a's overlap strip (band-
    passed) searched by normalised cross-correlation within ±search_px in b's
    strip. The strips are re-cut at each estimate, so a shift of several pixels
    in a 32 px overlap ends as a small residual measured on common content.
    The response is the correlation peak (−1..1)."""
    d = np.subtract(b.center_um, a.center_um) / a.pixel_um
    resp = 0.0
    for _ in range(passes):
        di = (int(round(d[0])), int(round(d[1])))
        strips = _overlap_strips(a, b, di)
        if strips is None:
            return None
        fa, fb = (_band_pass(x) for x in strips)
        h, w = fa.shape
        mx, my = min(search_px, w // 4), min(search_px, h // 4)
        tpl = fa[my:h - my, mx:w - mx]
        if tpl.std() < 0.5 or fb.std() < 0.5:      # featureless (bare wafer): nothing to measure
            return Link(ia, ib, (d[0] * a.pixel_um, d[1] * a.pixel_um), 0.0, used=False)
        c = cv2.matchTemplate(fb, tpl, cv2.TM_CCOEFF_NORMED)
        _, resp, _, (j, i) = cv2.minMaxLoc(c)
        fx, fy = _subpixel(c, i, j)
        # b's strip shows a's content moved by (sx, sy): b sits that much the other way
        sx, sy = j + fx - mx, i + fy - my
        d = np.array([di[0] - sx, di[1] - sy])
        if abs(sx) < 0.5 and abs(sy) < 0.5:
            break
    return Link(ia, ib, (d[0] * a.pixel_um, d[1] * a.pixel_um), float(resp))


def neighbour_pairs(tiles: list[MosaicTile]) -> list[tuple[int, int]]:
    """Right and lower neighbours by grid index."""
    where = {(t.row, t.col): i for i, t in enumerate(tiles)}
    return [(i, where[(t.row + dr, t.col + dc)]) for i, t in enumerate(tiles)
            for dr, dc in ((0, 1), (1, 0)) if (t.row + dr, t.col + dc) in where]


def refine_positions(tiles: list[MosaicTile], min_response: float = 0.3, max_shift_px: float = 12.0,
                     prior_weight: float = 1e-3) -> Refinement:
    """Least-squares tile centres from the measured overlaps, each tile also
    weakly tied to its recorded position (keeps tiles without texture, and the
    mosaic as a whole, where the stage put them). Links weaker than
    ``min_response``, or further than ``max_shift_px`` from the recorded
    offset, are not used; after a first solve, links that disagree with the
    rest by more than 2 px are dropped and the solve repeated."""
    n = len(tiles)
    recorded = np.array([t.center_um for t in tiles], float)
    if n == 0:
        return Refinement(recorded)
    px = tiles[0].pixel_um
    links = [lk for i, j in neighbour_pairs(tiles) if (lk := measure_link(tiles[i], tiles[j], i, j)) is not None]
    for lk in links:
        nominal = recorded[lk.b] - recorded[lk.a]
        dev = np.hypot(*(np.asarray(lk.offset_um) - nominal)) / px
        lk.used = lk.used and lk.response >= min_response and dev <= max_shift_px
    rounds = 3
    for k in range(rounds):          # solve; drop links off by > 2 px; solve again (the last round only solves)
        used = [lk for lk in links if lk.used]
        centers = _solve(recorded, used, prior_weight)
        res = [np.hypot(*(centers[lk.b] - centers[lk.a] - lk.offset_um)) / px for lk in used]
        bad = [lk for lk, r in zip(used, res) if r > 2.0] if k < rounds - 1 else []
        if not bad:
            break
        for lk in bad:
            lk.used = False
    moved = np.hypot(*(centers - recorded).T) / px
    return Refinement(centers, links, float(np.sqrt(np.mean(np.square(res)))) if res else 0.0,
                      float(moved.max()))


def _solve(recorded: np.ndarray, links: list[Link], prior_weight: float) -> np.ndarray:
    """x and y separately: rows 'c_b − c_a = offset' (weight 1) and 'c_i = recorded_i' (prior_weight)."""
    n = len(recorded)
    A = np.zeros((len(links) + n, n))
    for k, lk in enumerate(links):
        A[k, lk.b], A[k, lk.a] = 1.0, -1.0
    A[len(links):] = np.eye(n) * prior_weight
    out = np.empty_like(recorded)
    for axis in range(2):
        rhs = np.concatenate([[lk.offset_um[axis] for lk in links], recorded[:, axis] * prior_weight])
        out[:, axis] = np.linalg.lstsq(A, rhs, rcond=None)[0]
    return out


# ------------------------------------------------------------ assembly
def _feather(h: int, w: int, ramp: int) -> np.ndarray:
    """Blend weight: 1 inside, falling linearly over ``ramp`` px to the edges."""
    ry = np.minimum(np.arange(h) + 1, np.arange(h)[::-1] + 1) / max(ramp, 1)
    rx = np.minimum(np.arange(w) + 1, np.arange(w)[::-1] + 1) / max(ramp, 1)
    return np.minimum(np.minimum.outer(ry, rx), 1.0).astype(np.float32)


def assemble(tiles: list[MosaicTile], pixel_um: float, centers_um: Optional[np.ndarray] = None,
             feather_px: int = 16) -> OverviewImage:
    """One image at ``pixel_um`` (≥ the tiles' pixel size) with every tile
    placed at its centre (refined, else recorded); overlaps are blended."""
    if not tiles:
        raise ValueError("no tiles to assemble")
    p = tiles[0].pixel_um
    if any(abs(t.pixel_um - p) > 1e-9 * p for t in tiles):
        raise ValueError("tiles have different pixel sizes")
    if not pixel_um >= p:
        raise ValueError(f"pixel_um = {pixel_um} must be at least the tiles' pixel size {p} µm")
    centers = np.array([t.center_um for t in tiles], float) if centers_um is None else np.asarray(centers_um)
    h, w = tiles[0].image.shape
    lo = (centers - np.array([w, h]) / 2 * p).min(0)
    hi = (centers + np.array([w, h]) / 2 * p).max(0)
    origin = lo + pixel_um / 2                      # centre of output pixel (0, 0)
    # floor: every output pixel lies wholly inside the tiles' union box
    W, H = (int(math.floor((hi[0] - lo[0]) / pixel_um)), int(math.floor((hi[1] - lo[1]) / pixel_um)))
    acc = np.zeros((H, W), np.float32)
    wsum = np.zeros((H, W), np.float32)
    s = p / pixel_um
    small_w, small_h = max(1, int(round(w * s))), max(1, int(round(h * s)))
    weight = _feather(small_h, small_w, max(1, int(round(feather_px * s))))
    for t, c in zip(tiles, centers):
        if t.image.shape != (h, w):
            raise ValueError(f"tile {t.tile_id or (t.row, t.col)} is {t.image.shape}, expected {(h, w)}")
        small = cv2.resize(t.image, (small_w, small_h), interpolation=cv2.INTER_AREA).astype(np.float32)
        # small pixel k spans tile pixels [k/s, (k+1)/s): its centre is at stage c + ((k+0.5)/s − w/2)·p
        fx = (c[0] + (0.5 / s - w / 2) * p - origin[0]) / pixel_um
        fy = (c[1] + (0.5 / s - h / 2) * p - origin[1]) / pixel_um
        x0, y0 = int(math.floor(fx)), int(math.floor(fy))
        bw, bh = min(small_w + 2, W - x0), min(small_h + 2, H - y0)
        M = np.float32([[1, 0, fx - x0], [0, 1, fy - y0]])
        # premultiplied: the sub-pixel shift blends tile edges with zero weight, not with black
        img = cv2.warpAffine(small * weight, M, (bw, bh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        wt = cv2.warpAffine(weight, M, (bw, bh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        acc[y0:y0 + bh, x0:x0 + bw] += img
        wsum[y0:y0 + bh, x0:x0 + bw] += wt
    out = np.where(wsum > 1e-6, acc / np.maximum(wsum, 1e-6), 0.0)
    return OverviewImage(np.clip(out + 0.5, 0, 255).astype(np.uint8), (float(origin[0]), float(origin[1])), pixel_um,
                    {"tiles": len(tiles), "tile_pixel_um": p, "tile_frame": [w, h]})


def build_overview(tiles: list[MosaicTile], pixel_um: float, refine: bool = True) -> OverviewImage:
    """Refine (optionally) and assemble; the refinement's summary goes in ``info``."""
    ref = refine_positions(tiles) if refine else None
    ov = assemble(tiles, pixel_um, None if ref is None else ref.centers_um)
    ov.info["refinement"] = ref.summary() if ref is not None else None
    starts = [t.t_start for t in tiles if t.t_start is not None]
    if starts:
        ov.info["t_start"] = min(starts)
    ins = next((t.instrument for t in tiles if t.instrument), None)
    if ins:
        ov.info["instrument"] = ins
    return ov


def overview_key_values(ov: OverviewImage) -> dict:
    """The overview's OME key-value pairs: the position convention, its
    geometry and how it was made."""
    from acq.writers.ome_tiff import POSITION_CONVENTION, POSITION_KEY
    h, w = ov.image.shape[:2]
    kv = {POSITION_KEY: POSITION_CONVENTION, "origin_x_um": ov.origin_um[0], "origin_y_um": ov.origin_um[1],
          "pixel_size_um": ov.pixel_um, "width_px": w, "height_px": h,
          "tiles": ov.info.get("tiles"), "tile_pixel_size_um": ov.info.get("tile_pixel_um")}
    for k, v in (ov.info.get("refinement") or {}).items():
        kv[f"refinement.{k}"] = v
    return kv


# ------------------------------------------------------------ files
def save_overview(path: Path, ov: OverviewImage) -> Path:
    """OME-TIFF: physical pixel size; Plane PositionX/Y = stage µm of the
    centre of pixel (0, 0) (the tiles' convention, declared under
    ``stage_position_refers_to``); the first tile's start as AcquisitionDate
    and its Instrument when known; key-value pairs (overview_key_values); the
    affine stage transform as JSON in a MapAnnotation. Never overwrites."""
    from common.atomic import atomic_write
    from acq.writers.ome_tiff import Instrument, TiffEncoder
    info = {"origin_um": list(ov.origin_um), "pixel_um": ov.pixel_um,
            "transform_col_row_to_stage_um": ov.transform.affine(), **ov.info}
    ins = ov.info.get("instrument")
    data = TiffEncoder().encode(ov.image, ov.pixel_um, name=Path(path).name, position_um=(*ov.origin_um, None),
                                annotation={TRANSFORM_KEY: json.dumps(info)}, key_values=overview_key_values(ov),
                                acquired=ov.info.get("t_start"), instrument=Instrument(**ins) if ins else None,
                                description="overview mosaic in stage coordinates")
    return atomic_write(path, bytes(data))


def load_overview(path: Path) -> OverviewImage:
    """An overview written by save_overview (image, origin, pixel size).
    ValueError for any other TIFF, before its pixels are read."""
    import tifffile

    from acq.writers.layout import map_annotation_json
    with tifffile.TiffFile(path) as tf:
        try:
            info = map_annotation_json(tf.ome_metadata, TRANSFORM_KEY, path)
        except ValueError:
            raise ValueError(f"{path}: not an overview mosaic (no {TRANSFORM_KEY} annotation)") from None
        img = tf.asarray()
    return OverviewImage(img, tuple(info.pop("origin_um")), float(info.pop("pixel_um")), info)


def tiles_from_run(run_dir: Path, cycle: Optional[int] = None) -> list[MosaicTile]:
    """The overview tiles an acquisition run wrote (latest version of each;
    the first cycle with overview tiles unless ``cycle`` is given)."""
    from acq.plan import OVERVIEW_SECTION
    import tifffile

    from acq.writers.layout import META_KEY, latest_versions, map_annotation_json, tile_relpath
    from acq.writers.ome_tiff import Instrument
    base = Path(run_dir) / f"tiles/{OVERVIEW_SECTION:04d}"
    cycles = sorted(int(p.name) for p in base.iterdir() if p.name.isdigit()) if base.is_dir() else []
    if not cycles:
        raise FileNotFoundError(f"{run_dir}: no overview tiles (expected under {base})")
    if cycle is None:
        cycle = cycles[0]
    elif cycle not in cycles:
        raise ValueError(f"cycle {cycle}: no overview tiles; cycles with overview tiles: {cycles}")
    tiles = []
    for tid, ver in sorted(latest_versions(run_dir, OVERVIEW_SECTION, cycle).items()):
        path = Path(run_dir) / tile_relpath(OVERVIEW_SECTION, cycle, tid, ver)
        with tifffile.TiffFile(path) as tf:             # header and pixels in one open
            h = map_annotation_json(tf.ome_metadata, META_KEY, path)
            ins = Instrument.from_ome_xml(tf.ome_metadata)
            if abs(float(h.get("rotation_deg") or 0.0)) > 1e-6:
                raise ValueError(f"{path}: overview tiles must be taken at scan rotation 0")
            image = tf.asarray()
        # the header's stage position is the frame centre (the Plane position is pixel (0, 0)'s)
        tiles.append(MosaicTile(image, (h["stage"]["x"] * 1e6, h["stage"]["y"] * 1e6),
                                h["pixel_size_m"] * 1e6, int(h["row"]), int(h["col"]), tid,
                                t_start=h.get("t_start"), instrument=None if ins is None else asdict(ins)))
    return tiles
