"""GCIB volume post-processing over a run folder (seed ch. 2.3.1-2.3.2): the
mill rate, flattening and sub-stack order of wafer/postprocess.py on each
section's registered sub-stack (wafer/substack.py).

Where the mill's numbers come from:
  mill time   journal mill_done records: seconds milled per cycle (an
              interrupted mill counts with the time it ran)
  thickness   --thickness-nm, else plan.json irradiation.thickness_nm, else
              the simulated wafer's thickness_nm in the plan's setup file
  current     --current-na, else plan.json mill.current_na (the run holds the
              measured current within mill.current_tolerance; it is not journaled)
  area        --raster-area-um2, else mill.raster_vpp x the setup's
              calibration.ion_raster_mm_per_vpp (the area the current spreads over)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from wafer import postprocess as pp
from wafer.substack import RunInfo, SubStack, VolumeError, denoise, filled, wafer_is_bright


# ------------------------------------------------------------ the mill's numbers
def _setup(run: RunInfo):
    """The plan's setup (None when the file is gone or no longer valid)."""
    from devices.setup_config import ConfigError, load_setup
    path = run.plan.get("setup")
    try:
        return load_setup(Path(path)) if path else None
    except (ConfigError, OSError):
        return None


def require_mills(run: RunInfo) -> None:
    if not run.mill_s:
        raise VolumeError(f"{run.out_dir}/journal.jsonl: no mill_done record: this run has not milled yet "
                          "(a plan without `mill:`, or stopped before its first mill)")


def section_thickness(run: RunInfo, thickness_nm: Optional[float] = None, setup=None) -> tuple[float, str]:
    """(nm, where it came from): the option, the plan's irradiation.thickness_nm
    (the d of the dose), or the simulated wafer's."""
    setup = _setup(run) if setup is None else setup
    if thickness_nm is not None:
        if not (thickness_nm > 0 and np.isfinite(thickness_nm)):
            raise VolumeError(f"--thickness-nm = {thickness_nm}: must be a number > 0")
        return float(thickness_nm), "--thickness-nm"
    if (run.plan.get("irradiation") or {}).get("thickness_nm"):
        return float(run.plan["irradiation"]["thickness_nm"]), "plan.json irradiation.thickness_nm"
    if setup is not None and setup.simulation is not None:
        return (float(setup.simulation.wafer.thickness_nm),
                f"setup {run.plan.get('setup')}: simulation.wafer.thickness_nm")
    raise VolumeError("section thickness unknown: plan.json has no irradiation.thickness_nm and the setup no "
                      "simulated wafer; give --thickness-nm")


@dataclass
class MillParams:
    thickness_nm: float
    current_na: float
    area_um2: float
    sources: dict                               # where each value came from


def mill_params(run: RunInfo, thickness_nm: Optional[float] = None, current_na: Optional[float] = None,
                area_um2: Optional[float] = None) -> MillParams:
    require_mills(run)
    mill = run.plan.get("mill") or {}
    setup, src = _setup(run), {}
    setup_name = f"setup {run.plan.get('setup')}"
    thickness_nm, src["thickness"] = section_thickness(run, thickness_nm, setup)
    if current_na is not None:
        src["current"] = "--current-na"
    elif mill.get("current_na"):
        current_na, src["current"] = float(mill["current_na"]), "plan.json mill.current_na"
    else:
        raise VolumeError("ion current unknown: plan.json has no mill.current_na; give --current-na")
    if area_um2 is not None:
        src["area"] = "--raster-area-um2"
    elif setup is not None and mill.get("raster_vpp"):
        (vx, vy), (kx, ky) = mill["raster_vpp"], setup.calibration.ion_raster_mm_per_vpp
        area_um2 = vx * kx * vy * ky * 1e6
        src["area"] = f"plan.json mill.raster_vpp x {setup_name}: calibration.ion_raster_mm_per_vpp"
    else:
        raise VolumeError(f"milled area unknown: the {setup_name} is not readable (its "
                          "calibration.ion_raster_mm_per_vpp sizes the raster); give --raster-area-um2")
    for name, v in (("--current-na", current_na), ("--raster-area-um2", area_um2)):
        if not (v > 0 and np.isfinite(v)):
            raise VolumeError(f"{name} = {v}: must be a number > 0")
    return MillParams(float(thickness_nm), float(current_na), float(area_um2), src)


# ------------------------------------------------------------ computations
@dataclass
class Breakthrough:
    denoised: np.ndarray                        # the stack as segmented
    segment: dict                               # wafer_bright, wafer_threshold (postprocess's keywords)
    index: np.ndarray                           # last tissue slice per pixel (smoothed)
    real: np.ndarray                            # pixels that milled through to the wafer


def breakthrough(sub: SubStack, wafer: str = "auto", sigma: float = 1.0, smooth_px: float = 1.5,
                 k: float = 4.0) -> Breakthrough:
    """Where and when each pixel milled through: postprocess.last_tissue_index
    on the denoised stack, the threshold ``k`` s.d. from the wafer's level (0:
    Otsu). Without wafer showing, a threshold only splits the tissue's own
    contrast and noise: so the section needs clearly more pixels going from
    tissue (first slice) to wafer (last) than the other way round, and a pixel
    counts only if its signal stepped by at least half the wafer-tissue
    contrast (postprocess.breakthrough_contrast)."""
    z = len(sub.cycles)
    if z < 2:
        raise VolumeError(f"section {sub.section_id}: {z} imaged cycle; a breakthrough needs at least 2")
    d = denoise(sub.stack, smooth_px)
    bright = wafer_is_bright(d, wafer)
    thr = pp.wafer_level_threshold(d, bright, k) if k > 0 else pp.otsu_threshold(d)
    seg = {"wafer_bright": bright, "wafer_threshold": thr}
    idx = pp.last_tissue_index(d, sigma=sigma, **seg)
    w0, w1 = pp.wafer_mask(d[[0, -1]], thr, bright) & sub.valid
    real = sub.valid & (idx >= 0) & (idx < z - 1)
    if (w1 & ~w0).sum() < max(10, 3 * (w0 & ~w1).sum()):     # wafer appearing, not noise going both ways
        real[:] = False
    else:
        gap = abs(float(np.median(d[-1][w1])) - float(np.median(d[0][sub.valid & ~w0])))
        real &= pp.breakthrough_contrast(d, idx) * (1 if bright else -1) >= 0.5 * gap
    if not real.any():
        raise VolumeError(f"section {sub.section_id}: no pixel breaks through to the wafer in cycles "
                          f"{sub.cycles[0]}..{sub.cycles[-1]}; mill more cycles (or check --wafer bright/dark)")
    return Breakthrough(d, seg, idx, real)


def millrate_maps(sub: SubStack, run: RunInfo, mp: MillParams, wafer: str = "auto", sigma: float = 1.0,
                  smooth_px: float = 1.5, k: float = 4.0) -> dict[str, np.ndarray]:
    """nm/cycle, nm/s and µm³/s per nA of ion current per pixel; NaN without a breakthrough."""
    b = breakthrough(sub, wafer, sigma, smooth_px, k)
    t, n = run.mill_before(sub.cycles)
    m = pp.mill_rate_map(b.denoised, mp.thickness_nm, t, n, sigma=sigma, **b.segment)
    m["um3_per_s_per_na"] = m["nm_per_s"] * 1e-3 * mp.area_um2 / mp.current_na
    for v in m.values():
        v[~b.real] = np.nan
    return m


def flattened(sub: SubStack, wafer: str = "auto", sigma: float = 1.0, smooth_px: float = 1.5,
              k: float = 4.0) -> np.ndarray:
    """The seed's flattening (postprocess.flatten, interp1d per column) of a
    registered sub-stack; columns without a breakthrough stay as imaged."""
    b = breakthrough(sub, wafer, sigma, smooth_px, k)
    out = pp.flatten(sub.stack, np.where(b.real, b.index, len(sub.cycles) - 1))
    out[:, ~sub.valid] = np.nan
    return out


def link_score(bottom: np.ndarray, top: np.ndarray, frac: float = 0.5) -> float:
    """How well ``top`` (a section's first slice) continues ``bottom``
    (another's last): the best NCC of the central part (``frac`` of each
    side) of ``top`` anywhere in ``bottom`` (cv2.matchTemplate). The search is
    the registration: two sections' frames show the specimen at offsets of up
    to the stage error, and small frames leave phase correlation unsure."""
    th, tw = (max(8, min(int(t * frac), b)) for t, b in zip(top.shape, bottom.shape))
    if th > top.shape[0] or tw > top.shape[1] or th > bottom.shape[0] or tw > bottom.shape[1]:
        return -1.0
    y0, x0 = (top.shape[0] - th) // 2, (top.shape[1] - tw) // 2
    t, s = filled(top[y0:y0 + th, x0:x0 + tw]), filled(bottom)
    if t.std() == 0 or s.std() == 0:
        return -1.0
    return float(cv2.matchTemplate(s, t, cv2.TM_CCOEFF_NORMED).max())


def order(tops: list[np.ndarray], bottoms: list[np.ndarray]) -> pp.SubstackOrder:
    """postprocess's greedy chain over S[a, b] = link_score(last slice of a, first of b)."""
    n = len(tops)
    S = np.full((n, n), -1.0)
    for a in range(n):
        for b in range(n):
            if a != b:
                S[a, b] = link_score(bottoms[a], tops[b])
    return pp.order_from_scores(S)
