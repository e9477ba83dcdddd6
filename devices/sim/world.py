"""The shared state of one simulated GCIB-SEM: specimen, wafer, stage truth,
hidden optics, ion beam and the virtual clock.

Every simulated driver (SEM, stage, ion-gun emulator, DMM chain) reads and
changes this one world, so milling seen by the SEM, focus lost by a stage
move and the current read by the multimeter are consistent.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from devices.clock import SimClock
from devices.interfaces import StagePosition
from devices.setup_config import Calibration, Safety, Simulation
from devices.sim.faults import FaultInjector

# Seed Table 2.1: mill rate per beam current (m³/C) vs electron dose (1e27 eV/cm³)
MILL_TABLE_DOSE = np.array([0.0, 0.25, 0.5, 1.0])
MILL_TABLE_RATE = np.array([5.453, 3.246, 1.948, 1.487]) * 1e-8


def mill_volume_per_charge(dose_1e27: float) -> float:
    return float(np.interp(dose_1e27, MILL_TABLE_DOSE, MILL_TABLE_RATE))


@dataclass
class IonBeamState:
    beam_on: bool = False
    blanked: bool = True
    raster_on: bool = False
    target_current_a: float = 0.0


@dataclass
class SemOpticsState:
    wd_m: float = 5e-3
    stig: tuple[float, float] = (0.0, 0.0)
    eht_v: float = 1500.0
    probe_current_a: float = 1.5e-9
    blanked: bool = True


@dataclass
class MillLog:
    seconds: float = 0.0
    depth_m: float = 0.0
    events: list = field(default_factory=list)


class SimWorld:
    def __init__(self, sim: Simulation, safety: Optional[Safety] = None,
                 calibration: Optional[Calibration] = None, plane: str = "wafer"):
        from devices.sim.specimen import Specimen      # heavy imports kept local

        self.params = sim
        self.safety = safety or Safety()
        self.calibration = calibration or Calibration()
        self.mp = sim.microscope
        self.rng = np.random.default_rng(sim.seed)
        self.clock = SimClock(sim.time_factor)
        self.faults = FaultInjector(sim.faults, seed=sim.seed)
        sp = sim.specimen
        self.specimen = Specimen(
            images=list(sp.images) or None,
            texture_pixel_size_m=None if sp.pixel_size_nm is None else sp.pixel_size_nm * 1e-9,
            slice_thickness_m=sp.slice_thickness_nm * 1e-9, seed=sp.seed)
        self.plane = plane
        self.wafer = None
        if plane == "wafer":
            from devices.sim.wafer import VirtualWafer
            self.wafer = VirtualWafer(sim.wafer, self.specimen, seed=sim.wafer.seed)
        self.lock = threading.RLock()
        # stage truth: where the specimen really is under the beam
        self.stage_actual = StagePosition()
        self.stage_focus_shift_m = 0.0      # accumulated z displacement from stage moves
        self.drift_m = np.zeros(2)
        self.sem = SemOpticsState(wd_m=self.mp.wd_focus_mm * 1e-3)
        self.ion = IonBeamState()
        self.raster_size_m: Callable[[], tuple[float, float]] = self._default_raster
        self.mill_log = MillLog()
        self.depth_m = 0.0                   # milled depth for the plain specimen plane
        self.clock.on_advance(self._advance)

    # ---------------------------------------------------------- optics truth
    def focus_baseline(self, x_m: float, y_m: float) -> tuple[float, float, float]:
        """(wd of best focus, stig x₀, stig y₀) at a stage position.

        Raising the specimen (stage z up, wafer bow, stage displacement)
        shortens the working distance of focus."""
        height = self.stage_actual.z + self.stage_focus_shift_m
        if self.wafer is not None:
            height += self.wafer.focus_offset_m(x_m, y_m)
        return self.mp.wd_focus_mm * 1e-3 - height, self.mp.stig_x0, self.mp.stig_y0

    def signal(self, center_m, pixel_size_m: float, shape, rotation_rad: float) -> np.ndarray:
        if self.wafer is not None:
            return self.wafer.signal(center_m, pixel_size_m, shape, rotation_rad)
        return self.specimen.sample(center_m, pixel_size_m, shape, rotation_rad, depth_m=self.depth_m)

    # ------------------------------------------------------------- ion beam
    def set_ion_state(self, **state) -> None:
        with self.lock:
            for k, v in state.items():
                setattr(self.ion, k, v)

    def _default_raster(self) -> tuple[float, float]:
        side = math.sqrt(self.params.mill_area_mm2) * 1e-3
        return side, side

    def ion_beam_hits_specimen(self) -> bool:
        return self.ion.beam_on and not self.ion.blanked and self.ion.target_current_a > 0

    def mill_depth_rate(self) -> float:
        """Mean depth removed per second under the current ion beam (m/s)."""
        w, h = self.raster_size_m()
        area = max(w * h, 1e-12)
        if self.params.mill_rate_nm_per_s_per_na > 0:
            return self.params.mill_rate_nm_per_s_per_na * 1e-9 * self.ion.target_current_a / 1e-9
        vq = mill_volume_per_charge(self.params.irradiation_dose_1e27_ev_cm3)
        return vq * self.ion.target_current_a / area

    def _advance(self, t0: float, dt: float) -> None:
        with self.lock:
            if not (self.ion_beam_hits_specimen() and self.ion.raster_on):
                return
            mp = self.safety.mill_position
            sx, sy = self.stage_actual.x, self.stage_actual.y
            if math.hypot(sx - mp.x_mm * 1e-3, sy - mp.y_mm * 1e-3) > mp.imaging_exclusion_mm * 1e-3:
                return          # the ion beam does not reach the wafer from here
            depth = self.mill_depth_rate() * dt
            w, h = self.raster_size_m()
            cx, cy = sx - mp.x_mm * 1e-3, sy - mp.y_mm * 1e-3     # wafer point under the ion beam
            region = (cx - w / 2, cx + w / 2, cy - h / 2, cy + h / 2)
            if self.wafer is not None:
                self.wafer.mill(depth, region=region)
            self.depth_m += depth
            self.mill_log.seconds += dt
            self.mill_log.depth_m += depth

    # ------------------------------------------------------- dose chain
    def specimen_current_a(self) -> float:
        """Current absorbed by the specimen (what the preamp measures): the
        probe current minus the emitted secondary/backscattered fraction."""
        if self.sem.blanked:
            return 0.0
        return 0.8 * self.sem.probe_current_a

    # ----------------------------------------------------------- helpers
    def random_tissue_location(self, rng: np.random.Generator) -> tuple[float, float]:
        if self.wafer is None or not self.wafer.sections:
            return tuple(rng.uniform(-1e-3, 1e-3, size=2))
        sec = self.wafer.sections[int(rng.integers(len(self.wafer.sections)))]
        return float(sec.center_m[0]), float(sec.center_m[1])
