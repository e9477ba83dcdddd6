"""Single simulated frames outside a setup: a specimen plane (no wafer) at
a chosen aberration relative to the hidden baseline. Used by `sim frame`,
the physics tests, autofocus training data and the autofocus bench."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import tifffile

from common.atomic import atomic_write
from devices.setup_config import SetupConfig, Simulation
from devices.sim import optics
from devices.sim.sem import electron_dose_per_nm2, render
from devices.sim.world import SimWorld


def specimen_world(sim: Simulation, specimen: list[Path], texture_pixel_m: Optional[float]) -> SimWorld:
    sim = sim.model_copy(deep=True)
    if specimen:
        sim.specimen.images = [Path(p) for p in specimen]
    if texture_pixel_m is not None:
        sim.specimen.pixel_size_nm = texture_pixel_m * 1e9
    return SimWorld(sim, plane="specimen")


def location_for_seed(seed: int) -> tuple[float, float]:
    rng = np.random.default_rng([seed, 7])
    return tuple(rng.uniform(-20e-6, 20e-6, size=2))


def render_frame(world: SimWorld, *, defocus_m: float, stig: tuple[float, float], dwell_s: float,
                 pixel_m: float, size: tuple[int, int], seed: int, current_a: Optional[float] = None,
                 rotation_rad: float = 0.0) -> tuple[np.ndarray, dict]:
    current = world.sem.probe_current_a if current_a is None else current_a
    ab = optics.Aberration(defocus_m, stig[0], stig[1])
    center = location_for_seed(seed)
    # independent shot noise per aberration (a real ±Δz pair is two scans), still reproducible
    key = [int(round(v * 1e3)) & 0xFFFFFFFF for v in (defocus_m * 1e6, stig[0], stig[1], dwell_s * 1e9)]
    rng = np.random.default_rng([seed, 11, *key])
    t0 = time.perf_counter()
    img = render(world, center, pixel_m, (size[1], size[0]), rotation_rad, ab, current, dwell_s, rng)
    md = {
        "simulated": True, "seed": seed, "defocus_um": round(defocus_m * 1e6, 6), "stig": list(stig),
        "dwell_ns": round(dwell_s * 1e9, 6), "pixel_size_nm": round(pixel_m * 1e9, 6), "frame_size": list(size),
        "probe_current_a": current, "center_m": list(center), "render_s": time.perf_counter() - t0,
        "scan_time_s": optics.scan_time(size[0], size[1], dwell_s, world.mp.flyback_s),
        "electrons_per_nm2": electron_dose_per_nm2(current, dwell_s, pixel_m),
    }
    return img, md


def render_frame_to_tiff(cfg: SetupConfig, out: Path, *, specimen, texture_pixel_m=None, **kw) -> dict:
    world = specimen_world(cfg.simulation or Simulation(), specimen, texture_pixel_m)
    img, md = render_frame(world, **kw)
    md["specimen"] = [str(p) for p in specimen] or "procedural"
    px_per_cm = 1e-2 / kw["pixel_m"]
    atomic_write(out, lambda tmp: tifffile.imwrite(
        tmp, img, description=json.dumps(md), resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER",
        metadata=None))
    return md
