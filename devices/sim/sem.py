"""Simulated SEM: renders frames from the world's specimen through the probe
model of devices.sim.optics, with shot noise, drift and scan noise."""
from __future__ import annotations

import math
import time

import numpy as np

from common.constants import E_CHARGE
from devices import errors
from devices.interfaces import SEM, BeamOff, Capability, Frame
from devices.sim import optics, se_contrast
from devices.sim.faults import SEM_FRAME
from devices.sim.world import SimWorld

MAX_FRAME = (8192, 8192)


class SimSEM(SEM):
    capabilities = (Capability.FREEZE | Capability.SCAN_ROTATION | Capability.BEAM_BLANKING
                    | Capability.EHT_CONTROL)

    def __init__(self, world: SimWorld, name: str = "sem"):
        self.world = world
        self.name = name
        self._pixel = 10e-9
        self._dwell = 100e-9
        self._frame = (1024, 768)
        self._rotation = 0.0
        self._connected = False
        self._last: np.ndarray | None = None
        self._rng = np.random.default_rng(world.params.seed + 101)
        self.frames_acquired = 0
        self._eht_on = True          # the gun: a test (or a fault) switches it off

    def reseed(self, seed) -> None:
        """Restart the frame noise (and drift steps) from ``seed`` (an int or a
        sequence of ints, as numpy takes it): the bench gives each location
        its own reproducible noise."""
        self._rng = np.random.default_rng(seed)

    # life cycle
    def connect(self) -> None:
        self._connected = True

    def close(self) -> None:
        self.set_blanked(True)
        self._connected = False

    def identity(self) -> str:
        return "Simulated SEM (devices.sim)"

    def _need(self):
        if not self._connected:
            raise errors.NotConnected("not connected", device=self.name)

    # settings (plain state; the safety guard checks windows before these)
    def eht(self): return self.world.sem.eht_v
    def set_eht(self, volts): self.world.sem.eht_v = float(volts)
    def probe_current(self): return self.world.sem.probe_current_a
    def set_probe_current(self, amperes): self.world.sem.probe_current_a = float(amperes)
    def working_distance(self): return self.world.sem.wd_m
    def set_working_distance(self, metres): self.world.sem.wd_m = float(metres)
    def stig(self): return self.world.sem.stig
    def set_stig(self, x, y): self.world.sem.stig = (float(x), float(y))
    def pixel_size(self): return self._pixel
    def dwell_time(self): return self._dwell
    def frame_size(self): return self._frame
    def scan_rotation(self): return self._rotation
    def set_scan_rotation(self, radians): self._rotation = float(radians)
    def blanked(self): return self.world.sem.blanked
    def set_blanked(self, blanked): self.world.sem.blanked = bool(blanked)

    def eht_on(self): return self._eht_on
    def eht_state(self): return "Beam On" if self._eht_on else "EHT Off"
    def set_eht_on(self, on, *, wait=True): self._eht_on = bool(on)

    def set_pixel_size(self, metres):
        if not 0 < metres <= 1e-4:
            raise errors.LimitViolation("pixel_size", metres, "(0, 100 µm]", device=self.name)
        self._pixel = float(metres)

    def set_dwell_time(self, seconds):
        if not 10e-9 <= seconds <= 100e-6:
            raise errors.LimitViolation("dwell_time", seconds, "[10 ns, 100 µs]", device=self.name)
        self._dwell = float(seconds)

    def set_frame_size(self, width, height):
        if not (16 <= width <= MAX_FRAME[0] and 16 <= height <= MAX_FRAME[1]):
            raise errors.LimitViolation("frame_size", (width, height), f"16..{MAX_FRAME[0]} per side",
                                        device=self.name)
        self._frame = (int(width), int(height))

    # ------------------------------------------------------------- imaging
    def aberration(self) -> optics.Aberration:
        """Hidden truth: the current deviation from the focus baseline."""
        w = self.world
        wd0, sx0, sy0 = w.focus_baseline(w.stage_actual.x, w.stage_actual.y)
        sx, sy = w.sem.stig
        return optics.Aberration(w.sem.wd_m - wd0, sx - sx0, sy - sy0)

    def acquire_frame(self) -> Frame:
        self._need()
        if not self._eht_on:
            raise BeamOff("EHT is off: no frame", device=self.name, operation="acquire_frame")
        w = self.world
        fault = w.faults.check(self.name, SEM_FRAME)
        t_start = w.clock.now()
        width, height = self._frame
        mp = w.mp
        with w.lock:
            w.drift_m += self._rng.normal(0.0, mp.drift_nm_per_frame * 1e-9, size=2)
            center = (w.stage_actual.x + w.drift_m[0], w.stage_actual.y + w.drift_m[1])
            ab = self.aberration()
            stage = w.stage_actual.as_dict()
        wall0 = time.perf_counter()
        if w.sem.blanked:
            img = optics.dark_frame((height, width), self._dwell, mp.detector_offset, mp.read_noise, self._rng)
        else:
            img = render(w, center, self._pixel, (height, width), self._rotation, ab,
                         w.sem.probe_current_a, self._dwell, self._rng)
        render_s = time.perf_counter() - wall0
        scan_s = optics.scan_time(width, height, self._dwell, mp.flyback_s)
        w.clock.sleep(max(scan_s - render_s * (w.clock.time_factor > 0), 0.0))
        if fault == "frozen_frame" and self._last is not None and self._last.shape == img.shape:
            img = self._last.copy()
        elif fault == "incomplete_frame":
            cut = max(1, height // 8)
            img[:cut] = img[cut]
            img[-cut:] = img[-cut - 1].mean()
        self._last = img
        self.frames_acquired += 1
        md = {
            "timestamp": t_start, "scan_time_s": scan_s, "render_s": render_s,
            "pixel_size_m": self._pixel, "dwell_s": self._dwell, "frame_size": [width, height],
            "scan_rotation_rad": self._rotation, "wd_m": w.sem.wd_m, "stig": list(w.sem.stig),
            "eht_v": w.sem.eht_v, "probe_current_a": w.sem.probe_current_a,
            "stage": stage, "blanked": w.sem.blanked,
            "electrons_per_nm2": electron_dose_per_nm2(w.sem.probe_current_a, self._dwell, self._pixel),
        }
        return Frame(img, md)


def electron_dose_per_nm2(current_a: float, dwell_s: float, pixel_m: float) -> float:
    return current_a * dwell_s / E_CHARGE / (pixel_m * 1e9) ** 2


def render(world: SimWorld, center_m, pixel_m: float, shape, rotation_rad: float,
           ab: optics.Aberration, current_a: float, dwell_s: float,
           rng: np.random.Generator) -> np.ndarray:
    """specimen ⊛ probe + detection, for a frame of ``shape`` = (h, w)."""
    mp = world.mp
    h, w = shape
    alpha = mp.alpha_mrad * 1e-3
    sigma0 = mp.sigma0_nm * 1e-9
    cov = optics.probe_covariance(ab, alpha, 0.0, (mp.stig_scale_x_um * 1e-6, mp.stig_scale_y_um * 1e-6),
                                  math.radians(mp.stig_rotation_deg))
    scan_rot = rotation_rad + math.radians(mp.scan_rotation_offset_deg)
    cov = optics.rotate_covariance(cov, scan_rot)
    m = optics.blur_margin_px(cov, sigma0, pixel_m)
    # symmetric padding keeps pixel positions identical whatever the blur
    fh, fw = optics.fast_shape(h + 2 * m, w + 2 * m)
    ph, pw = h + 2 * math.ceil((fh - h) / 2), w + 2 * math.ceil((fw - w) / 2)
    sig = world.signal(center_m, pixel_m, (ph, pw), scan_rot)
    sig = se_contrast.edge_brighten(sig, mp.se_edge_gain, pixel_m)
    otf = optics.probe_otf((ph, pw), pixel_m, cov, sigma0, mp.probe_shape)
    blurred = optics.convolve(sig, otf)
    oy, ox = (ph - h) // 2, (pw - w) // 2
    blurred = blurred[oy:oy + h, ox:ox + w]
    blurred = optics.line_jitter(blurred, mp.line_jitter_px, rng)
    blurred = se_contrast.charging(blurred, mp.charging_sd, rng)
    grey = optics.detect(blurred, current_a, dwell_s, mp.detector_efficiency, mp.detector_full_scale,
                         mp.detector_offset, mp.read_noise, rng)
    grey = se_contrast.detector_chain(grey, mp.detector_gamma, mp.detector_offset, mp.detector_full_scale,
                                      mp.frame_gain_sd, mp.frame_offset_sd, rng)
    return optics.quantise(grey)
