"""One section's sub-stack from a run folder: one image per cycle, in the
stage frame, registered slice to slice (GCIB post-processing, wafer/volume.py).

Where the images come from (read without locks, so a running run works too):
zarr/SSSS.ome.zarr (stage frame, z = cycle), placed by its NGFF metadata as
`view` reads it (acq/view_layers.ngff_placement); without one, the tiles'
OME-TIFFs placed by their stage position (acq/writers/stage_frame.resample).
Only cycles the journal lists as section_done for the section (when it lists
any), so a plane still being written is left out.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
from scipy import ndimage

from wafer import postprocess as pp

MAX_BYTES = 4 << 30             # one sub-stack in memory (float32); larger: a coarser --level
OVERVIEW_SECTION = 9999         # acq.plan.OVERVIEW_SECTION: overview tiles are no section


class VolumeError(ValueError):
    """Bad input: the message names the thing and what is allowed."""


@dataclass
class RunInfo:
    out_dir: Path
    plan: dict
    mill_s: dict[int, float]                    # cycle -> seconds milled
    done: dict[int, set[int]]                   # section -> cycles journaled as section_done

    def mill_before(self, cycles: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(seconds, mills) milled before each cycle's images were taken."""
        t = [sum(s for c, s in self.mill_s.items() if c < k) for k in cycles]
        n = [sum(1 for c in self.mill_s if c < k) for k in cycles]
        return np.asarray(t, float), np.asarray(n, float)


@dataclass
class SubStack:
    section_id: int
    stack: np.ndarray                           # (z, h, w) float32; NaN: not imaged in every slice
    cycles: list[int]
    pixel_um: float
    origin_um: tuple[float, float]              # stage (x, y) of the centre of pixel (0, 0)
    source: str
    dtype: str                                  # of the source pixels
    shifts_px: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))   # (dy, dx): slice moved vs the first

    @property
    def valid(self) -> np.ndarray:
        return np.isfinite(self.stack).all(0)


# ------------------------------------------------------------ the run
def read_run(out_dir: Path) -> RunInfo:
    from acq.journal import JOURNAL_NAME, JournalCorrupt, read_records
    from acq.run_folder import plan_copy
    out = Path(out_dir)
    if not out.is_dir():
        raise VolumeError(f"OUTDIR {out}: not a folder")
    if not (out / JOURNAL_NAME).is_file():
        raise VolumeError(f"OUTDIR {out}: no {JOURNAL_NAME}; expected the output folder of "
                          "`python main.py run PLAN --out OUTDIR`")
    plan = plan_copy(out)
    mill_s: dict[int, float] = {}
    done: dict[int, set[int]] = {}
    try:
        for r in read_records(out, absolute_files=False):
            if r.get("rec") == "mill_done":
                mill_s[int(r["cycle"])] = float(r.get("seconds") or 0.0)
            elif r.get("rec") == "section_done":
                done.setdefault(int(r["section"]), set()).add(int(r["cycle"]))
    except JournalCorrupt as e:
        raise VolumeError(str(e)) from None
    return RunInfo(out, plan, mill_s, done)


def run_sections(out_dir: Path) -> list[int]:
    """Sections with a volume or tiles in OUTDIR."""
    from acq.writers.layout import planes_on_disk
    from acq.writers.zarr_store import Volumes
    ids = Volumes(out_dir).sections() | {s for s, _ in planes_on_disk(out_dir)}
    return sorted(ids - {OVERVIEW_SECTION})


def pick_sections(out_dir: Path, wanted: Optional[list[int]]) -> list[int]:
    have = run_sections(out_dir)
    if not have:
        raise VolumeError(f"OUTDIR {out_dir}: no section images (neither zarr/SSSS.ome.zarr nor tiles/SSSS/)")
    bad = [s for s in wanted or [] if s not in have]
    if bad:
        raise VolumeError(f"--section {', '.join(map(str, bad))}: not in this run; allowed: "
                          f"{', '.join(map(str, have))}")
    return list(dict.fromkeys(wanted)) if wanted else have


# ------------------------------------------------------------ sub-stacks
def _check_size(sid: int, shape, what: str) -> None:
    if 4 * int(np.prod(shape)) > MAX_BYTES:
        raise VolumeError(f"section {sid}: {what} of {shape[0]} x {shape[1]} x {shape[2]} px does not fit in "
                          f"{MAX_BYTES >> 30} GiB; give a coarser --level")


def _wanted_cycles(run: RunInfo, sid: int, cycles: list[int]) -> list[int]:
    done = run.done.get(sid)
    return [c for c in cycles if done is None or c in done]      # a plane still being written is left out


def _from_zarr(run: RunInfo, sid: int, level: int) -> Optional[SubStack]:
    import zarr

    from acq.view_layers import ViewError, ngff_placement
    from acq.writers.zarr_store import Volumes
    store = Volumes(run.out_dir).path(sid)
    if not store.exists():
        return None
    try:
        p = ngff_placement(store)
    except ViewError as e:
        raise VolumeError(str(e)) from None
    ds = p["datasets"]
    if p["axes"] != ("z", "y", "x"):
        raise VolumeError(f"{store}: axes {list(p['axes'])}, expected z, y, x")
    if not 0 <= level < len(ds):
        raise VolumeError(f"--level {level}: {store} has levels 0..{len(ds) - 1}")
    coarse = zarr.open_array(str(store / ds[-1]["path"]), mode="r")
    fill = coarse.fill_value if coarse.fill_value is not None else 0
    union, cycles = np.zeros(coarse.shape[1:], bool), []
    for c in _wanted_cycles(run, sid, list(range(coarse.shape[0]))):
        plane = np.asarray(coarse[c]) != fill
        if plane.any():                                          # a cycle not imaged (yet) has no plane
            cycles.append(c)
            union |= plane
    if not cycles:
        return None
    ys, xs = np.nonzero(union)
    f = ds[-1]["scale"][1] / ds[level]["scale"][1]              # coarse pixels -> this level's
    arr = zarr.open_array(str(store / ds[level]["path"]), mode="r")
    y0, x0 = int(ys.min() * f), int(xs.min() * f)
    y1, x1 = min(int((ys.max() + 1) * f), arr.shape[1]), min(int((xs.max() + 1) * f), arr.shape[2])
    _check_size(sid, (len(cycles), y1 - y0, x1 - x0), f"{store} level {level}")
    stack = np.empty((len(cycles), y1 - y0, x1 - x0), np.float32)
    for k, c in enumerate(cycles):                               # plane by plane: zarr slicing is fast
        plane = np.asarray(arr[c, y0:y1, x0:x1])
        stack[k] = np.where(plane == fill, np.nan, plane)
    s, t = ds[level]["scale"], ds[level]["translation"]
    return SubStack(sid, stack, cycles, float(s[2]), (float(t[2] + x0 * s[2]), float(t[1] + y0 * s[1])),
                    f"{store} level {level}", str(arr.dtype))


def _from_tiles(run: RunInfo, sid: int, level: int) -> Optional[SubStack]:
    import tifffile

    from acq.writers.layout import TileRecord, latest_versions, planes_on_disk, read_tile_header, tile_relpath
    from acq.writers.stage_frame import footprint, resample
    cycles = _wanted_cycles(run, sid, [c for s, c in planes_on_disk(run.out_dir) if s == sid])
    tiles = {c: [] for c in cycles}
    for c in cycles:
        for tid, ver in sorted(latest_versions(run.out_dir, sid, c).items()):
            path = run.out_dir / tile_relpath(sid, c, tid, ver)
            try:
                tiles[c].append((TileRecord.from_header(read_tile_header(path)), path))
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise VolumeError(f"{path}: not a readable tile ({e})") from None
    cycles = [c for c in cycles if tiles[c]]
    if not cycles:
        return None
    recs = [r for c in cycles for r, _ in tiles[c]]
    px = {round(r.pixel_size_m, 12) for r in recs}
    if len(px) != 1:
        raise VolumeError(f"section {sid}: tiles with different pixel sizes {sorted(px)} m; one sub-stack "
                          "needs one pixel size")
    boxes = np.array([[*lo, *hi] for lo, hi in map(footprint, recs)])
    b = 2 ** level
    ox, oy = (np.floor(boxes[:, :2].min(0) / b) * b).astype(int)      # bins on a stage grid of b px
    w, h = (np.ceil(boxes[:, 2:].max(0)).astype(int) - (ox, oy) + 1)
    _check_size(sid, (len(cycles), h // b, w // b), "the tiles")
    stack = np.full((len(cycles), h // b, w // b), np.nan, np.float32)
    dtype = "uint8"
    for k, c in enumerate(cycles):
        plane = np.full((h, w), np.nan, np.float32)
        for rec, path in tiles[c]:                               # in id order; the last wins in overlaps
            img = tifffile.imread(path)
            dtype = str(img.dtype)
            x0, y0, pix, mask = resample(rec, img.astype(np.float32), (ox, oy))
            ph, pw = pix.shape
            sel = np.ones((ph, pw), bool) if mask is None else mask
            cy0, cx0, cy1, cx1 = max(y0, 0), max(x0, 0), min(y0 + ph, h), min(x0 + pw, w)
            sub = sel[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
            plane[cy0:cy1, cx0:cx1][sub] = pix[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0][sub]
        # exact b x b block mean (NaN where any pixel is missing), as the OME-Zarr levels
        hb, wb = h // b, w // b
        stack[k] = plane[:hb * b, :wb * b].reshape(hb, b, wb, b).mean((1, 3))
    pm = rec.pixel_size_m * 1e6
    half = (b - 1) / 2
    return SubStack(sid, stack, cycles, pm * b, ((ox + half) * pm, (oy + half) * pm),
                    f"{run.out_dir / 'tiles' / f'{sid:04d}'} (OME-TIFF tiles)", dtype)


def load_substack(run: RunInfo, sid: int, level: int = 0, source: str = "auto") -> SubStack:
    """The section's sub-stack in the stage frame (not yet registered)."""
    if source not in ("auto", "zarr", "tiles"):
        raise VolumeError(f"--source {source!r}: allowed auto, zarr, tiles")
    sub = _from_zarr(run, sid, level) if source in ("auto", "zarr") else None
    if sub is None and source == "zarr":
        raise VolumeError(f"section {sid}: no zarr/{sid:04d}.ome.zarr with images in this run; try --source tiles")
    if sub is None:
        sub = _from_tiles(run, sid, level)
    if sub is None:
        raise VolumeError(f"section {sid}: no finished cycle with images in this run")
    return sub


# ------------------------------------------------------------ registration
def filled(img: np.ndarray) -> np.ndarray:
    ok = np.isfinite(img)
    return np.where(ok, img, img[ok].mean() if ok.any() else 0.0).astype(np.float32)


def phase_shift(ref: np.ndarray, img: np.ndarray) -> tuple[float, float, float]:
    """(dy, dx, response): ``img`` shows ``ref`` moved by (dy, dx) px (cv2.phaseCorrelate,
    Hann window; unimaged pixels filled with the mean)."""
    a, b = filled(ref), filled(img)
    win = cv2.createHanningWindow(a.shape[::-1], cv2.CV_32F)
    (dx, dy), resp = cv2.phaseCorrelate(a - a.mean(), b - b.mean(), win)
    return float(dy), float(dx), float(resp)


def _shifted(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``img`` moved by (dy, dx) whole pixels; NaN where nothing comes in."""
    out = np.full_like(img, np.nan)
    h, w = img.shape
    if abs(dy) >= h or abs(dx) >= w:
        return out
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = img[max(-dy, 0):h - max(dy, 0),
                                                                     max(-dx, 0):w - max(dx, 0)]
    return out


def register(sub: SubStack, wafer: str = "auto", min_response: float = 0.2, min_tissue: float = 0.5,
             max_shift: float = 0.1) -> SubStack:
    """Translate every slice onto the first: phase correlation with the last
    registered slice, accumulated. Slices mostly wafer (tissue on less than
    ``min_tissue`` of the imaged area, by Otsu) have nothing to register by and
    keep the shift before them, as do weak or implausible matches (response
    < min_response, or over ``max_shift`` of the frame: the stage frame
    already places every slice to within the stage's error). Shifts are
    applied in whole pixels, so intensities stay as imaged."""
    s = sub.stack
    z, h, w = s.shape
    ok = np.isfinite(s)
    mask = pp.wafer_mask(s, wafer_bright=wafer_is_bright(s, wafer))
    tissue = ((~mask) & ok).sum((1, 2)) / np.maximum(ok.sum((1, 2)), 1)
    total, ref = np.zeros((z, 2)), 0
    for k in range(1, z):
        total[k] = total[k - 1]
        if tissue[k] < min_tissue or tissue[ref] < min_tissue:
            continue
        dy, dx, resp = phase_shift(s[ref], s[k])
        if resp >= min_response and abs(dy) <= max_shift * h and abs(dx) <= max_shift * w:
            total[k], ref = total[ref] + (dy, dx), k
    applied = np.rint(-total).astype(int)
    out = np.stack([_shifted(s[k], *applied[k]) for k in range(z)])
    valid = np.isfinite(out).all(0)
    if not valid.any():
        raise VolumeError(f"section {sub.section_id}: no pixel was imaged in every cycle {sub.cycles[0]}.."
                          f"{sub.cycles[-1]} (the tiles of different cycles do not overlap)")
    out[:, ~valid] = np.nan                                     # a pixel counts only if imaged in every slice
    ys, xs = np.nonzero(valid)                                  # the part imaged every cycle, and where it lies
    out = out[:, ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    origin = (sub.origin_um[0] + xs.min() * sub.pixel_um, sub.origin_um[1] + ys.min() * sub.pixel_um)
    return SubStack(sub.section_id, out, sub.cycles, sub.pixel_um, origin, sub.source, sub.dtype, -applied)


def denoise(stack: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of each slice over imaged pixels only (normalised
    convolution): single noisy pixels of wafer must not read as tissue."""
    if sigma <= 0:
        return stack
    ok = np.isfinite(stack)
    sig = (0, sigma, sigma)
    num = ndimage.gaussian_filter(np.where(ok, stack, 0.0).astype(np.float32), sig, mode="nearest")
    den = ndimage.gaussian_filter(ok.astype(np.float32), sig, mode="nearest")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, num / den, np.nan).astype(np.float32)


def wafer_is_bright(stack: np.ndarray, wafer: str = "auto") -> bool:
    if wafer not in ("auto", "bright", "dark"):
        raise VolumeError(f"--wafer {wafer!r}: allowed auto, bright, dark")
    if wafer != "auto":
        return wafer == "bright"
    return bool(np.nanmean(stack[-1]) > np.nanmean(stack[0]))      # the last slice is mostly wafer
