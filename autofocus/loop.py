"""The iterative pair autofocus and the focus map.

Each iteration takes two frames at wd ± Δ, asks the method for a correction
and applies it. Because the acquisition is destructive and the stage has
just moved centimetres, the loop is defensive:

* every step is clamped by ``SafetyGuard.clamp_autofocus_step`` and every
  value is clipped into the absolute wd/stig windows (and recorded as such);
  the ±Δ frames are centred inside the window so they never leave it;
* it stops as soon as a correction is below the threshold;
* it gives up and restores the starting state when the corrections grow for
  ``patience`` iterations in a row, when the sharpness of the pair (its
  blurrier frame) collapses against the best pair seen, or when the method
  returns nonsense;
* dwell, frame size, pixel size and blanking are restored afterwards.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

from autofocus.methods import CorrectionMethod, Estimate, tenengrad
from common.constants import E_CHARGE
from devices.errors import DeviceError
from devices.interfaces import ScanParams


@dataclass
class IterationRecord:
    iteration: int                       # 1-based
    wd_m: float                          # state the pair was taken around
    stig: tuple[float, float]
    predicted_d_wd_m: float = 0.0
    predicted_d_stig: tuple[float, float] = (0.0, 0.0)
    sd: Optional[tuple[float, float, float]] = None
    applied_d_wd_m: float = 0.0
    applied_d_stig: tuple[float, float] = (0.0, 0.0)
    wd_after_m: float = 0.0
    stig_after: tuple[float, float] = (0.0, 0.0)
    pair_center_wd_m: float = 0.0        # differs from wd_m only next to a window edge
    clamped: bool = False                # step limited to the maximum autofocus step
    clipped_to_window: bool = False      # value limited to the absolute window
    dose_e_per_nm2: float = 0.0          # dose of this iteration's frames (same area)
    images: int = 0
    sharpness: float = 0.0               # sharpness of the pair's blurrier frame
    estimate_seconds: float = 0.0
    scan_seconds: float = 0.0            # beam time of the frames
    seconds: float = 0.0                 # wall time of the whole iteration
    score: Optional[float] = None        # Nelder–Mead: best objective value


@dataclass
class AutofocusTrace:
    method: str
    start_wd_m: float
    start_stig: tuple[float, float]
    iterations: list[IterationRecord] = field(default_factory=list)
    status: str = "running"              # converged | max_iterations | diverged | failed
    restored: bool = False
    message: str = ""
    final_wd_m: float = 0.0
    final_stig: tuple[float, float] = (0.0, 0.0)
    evaluations: int = 0                 # frames acquired in all

    @property
    def dose_e_per_nm2(self) -> float:
        return float(sum(r.dose_e_per_nm2 for r in self.iterations))

    @property
    def seconds(self) -> float:
        return float(sum(r.seconds for r in self.iterations))

    @property
    def ok(self) -> bool:
        return self.status in ("converged", "max_iterations")

    def states(self) -> list[tuple[float, float, float]]:
        """(wd, stig x, stig y) at the start and after every iteration; after a
        divergence the last state is the restored start."""
        out = [(self.start_wd_m, *self.start_stig)]
        out += [(r.wd_after_m, *r.stig_after) for r in self.iterations]
        if self.restored:
            out[-1] = (self.start_wd_m, *self.start_stig)
        return out

    def cumulative_dose(self) -> list[float]:
        return list(np.cumsum([0.0] + [r.dose_e_per_nm2 for r in self.iterations]))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dose_e_per_nm2"] = self.dose_e_per_nm2
        return d


def frame_dose(frame, sem) -> float:
    """Electrons per nm² of one frame (metadata, else current × dwell / pixel²)."""
    md = getattr(frame, "metadata", {}) or {}
    if "electrons_per_nm2" in md:
        return float(md["electrons_per_nm2"])
    px_nm = sem.pixel_size() * 1e9
    return float(sem.probe_current() * sem.dwell_time() / E_CHARGE / (px_nm * px_nm))


class Windows:
    """The absolute wd/stig windows and the step clamp of a SafetyGuard."""

    def __init__(self, guard):
        self.guard = guard
        lo, hi = guard.s.wd_mm
        self.wd = (lo * 1e-3, hi * 1e-3)
        self.stig = tuple(guard.s.stig)

    def step(self, wd, stig, target_wd, target_stig):
        """Clamp the step towards the target, then clip into the windows.
        Returns (wd, stig, clamped, clipped)."""
        want = (target_wd - wd, (target_stig[0] - stig[0], target_stig[1] - stig[1]))
        d_wd, d_st = self.guard.clamp_autofocus_step(*want)
        clamped = d_wd != want[0] or tuple(d_st) != want[1]
        new_wd = wd + d_wd
        new_st = (stig[0] + d_st[0], stig[1] + d_st[1])
        wd_c = min(max(new_wd, self.wd[0]), self.wd[1])
        st_c = tuple(min(max(v, self.stig[0]), self.stig[1]) for v in new_st)
        return wd_c, st_c, clamped, (wd_c != new_wd or st_c != new_st)

    def inside(self, wd, stig) -> bool:
        return (self.wd[0] <= wd <= self.wd[1]
                and all(self.stig[0] <= v <= self.stig[1] for v in stig))


class AutofocusLoop:
    def __init__(self, sem, guard, method: CorrectionMethod, *, perturbation_m: float = 5e-6,
                 max_iterations: int = 5, threshold_wd_m: float = 0.2e-6, threshold_stig: float = 0.05,
                 dwell_s: Optional[float] = None, frame_size: Optional[tuple[int, int]] = None,
                 pixel_size_m: Optional[float] = None, patience: int = 2, growth_factor: float = 1.2,
                 growth_floor: float = 2.0, collapse_fraction: float = 0.7,
                 margins: tuple[float, float] = (1e-6, 0.25)):
        self.sem, self.guard, self.method = sem, guard, method
        self.windows = Windows(guard)
        self.perturbation_m = perturbation_m
        self.max_iterations = max_iterations
        self.threshold = (threshold_wd_m, threshold_stig)
        self.scan = ScanParams(pixel_m=pixel_size_m, frame=frame_size, dwell_s=dwell_s)
        self.patience, self.growth_factor, self.growth_floor = patience, growth_factor, growth_floor
        self.collapse_fraction = collapse_fraction
        self.margins = margins

    # ------------------------------------------------------------ helpers
    def magnitude(self, est: Estimate) -> float:
        """Correction size in units of the focus margins (1 µm, 0.25 stig)."""
        return max(abs(est.d_wd_m) / self.margins[0], max(abs(v) for v in est.d_stig) / self.margins[1])

    def below_threshold(self, est: Estimate) -> bool:
        return (abs(est.d_wd_m) < self.threshold[0]
                and max(abs(v) for v in est.d_stig) < self.threshold[1])

    def pair_center(self, wd: float) -> float:
        lo, hi = self.windows.wd
        p = self.perturbation_m
        if hi - lo < 2 * p:
            raise ValueError(f"wd window {lo * 1e3:g}..{hi * 1e3:g} mm is narrower than the ±{p * 1e6:g} µm pair")
        return min(max(wd, lo + p), hi - p)

    def acquire_pair(self, center: float, rec: IterationRecord):
        imgs = []
        for sign in (+1, -1):
            self.sem.set_working_distance(center + sign * self.perturbation_m)
            f = self.sem.acquire_frame()
            rec.dose_e_per_nm2 += frame_dose(f, self.sem)
            rec.scan_seconds += float((f.metadata or {}).get("scan_time_s", 0.0))
            rec.images += 1
            imgs.append(f.image)
        return imgs

    # --------------------------------------------------------------- run
    def run(self) -> AutofocusTrace:
        sem = self.sem
        wd0, stig0 = sem.working_distance(), tuple(sem.stig())
        trace = AutofocusTrace(getattr(self.method, "name", type(self.method).__name__), wd0, stig0)
        try:
            with sem.scanning(self.scan):        # the operator's scan and blanking come back afterwards
                self._iterate(trace, wd0, stig0)
        except BaseException as e:
            trace.status, trace.message = "failed", f"{type(e).__name__}: {e}"
            self._restore(trace, wd0, stig0)
            raise
        finally:
            trace.final_wd_m, trace.final_stig = sem.working_distance(), tuple(sem.stig())
        return trace

    def _restore(self, trace: AutofocusTrace, wd0: float, stig0) -> None:
        self.sem.set_working_distance(wd0)
        self.sem.set_stig(*stig0)
        trace.restored = True

    @staticmethod
    def _estimate(fn):
        """The method's answer, or its exception when it cannot answer (featureless
        frames, a model that refuses the input); device errors still propagate."""
        try:
            return fn()
        except DeviceError:
            raise
        except (ValueError, RuntimeError, ArithmeticError) as e:
            return e

    def _iterate(self, trace: AutofocusTrace, wd0: float, stig0) -> None:
        sem, wd, stig = self.sem, wd0, stig0
        check = getattr(self.method, "check_frame", None)
        if check is not None:                       # no dose spent on pairs the method cannot use
            try:
                check(tuple(sem.frame_size()), sem.pixel_size(), self.perturbation_m)
            except ValueError as e:
                trace.status, trace.message = "failed", f"refused before acquiring: {e}"
                return
        begin = getattr(self.method, "begin_location", None)
        if begin is not None:                       # a method that learns from its own moves starts afresh here
            begin()
        best_sharp, last_mag, grew = 0.0, math.inf, 0
        for k in range(1, self.max_iterations + 1):
            t0 = time.perf_counter()
            rec = IterationRecord(k, wd, stig)
            if self.method.needs_pair:
                rec.pair_center_wd_m = center = self.pair_center(wd)
                img_p, img_m = self.acquire_pair(center, rec)
                # the blurrier frame: a pair centred c from focus has it at |c| + Δ, so it falls
                # with every step away from focus; the mean does not (on a wide-aperture column a
                # pair with one frame in focus is far sharper than the pair centred on focus)
                rec.sharpness = min(tenengrad(img_p), tenengrad(img_m))
                where = {"center_wd_m": center, "center_stig": stig} if begin is not None else {}
                est = self._estimate(lambda: self.method.estimate(img_p, img_m, sem.pixel_size(),
                                                                  self.perturbation_m, **where))
            else:
                rec.pair_center_wd_m = center = wd
                est = self._estimate(lambda: self.method.run_on(sem))
            trace.iterations.append(rec)
            trace.evaluations += rec.images
            if isinstance(est, Exception):          # the method failed, not the microscope
                self._restore(trace, wd0, stig0)
                rec.wd_after_m, rec.stig_after = wd0, stig0
                trace.status, trace.message = "failed", f"iteration {k}: {est}; starting state restored"
                rec.seconds = time.perf_counter() - t0
                return
            rec.predicted_d_wd_m, rec.predicted_d_stig, rec.sd = est.d_wd_m, tuple(est.d_stig), est.sd
            rec.estimate_seconds = est.seconds
            # --- divergence checks, before anything is applied
            why = None
            if not all(math.isfinite(v) for v in (est.d_wd_m, *est.d_stig)):
                why = "non-finite correction"
            elif self.method.needs_pair and k > 1 and rec.sharpness < self.collapse_fraction * best_sharp:
                why = f"sharpness collapsed to {rec.sharpness / best_sharp:.0%} of the best pair"
            else:
                mag = self.magnitude(est)
                grew = grew + 1 if (mag > self.growth_factor * last_mag and mag > self.growth_floor) else 0
                last_mag = mag
                if grew >= self.patience:
                    why = f"correction grew for {grew} iterations in a row"
            best_sharp = max(best_sharp, rec.sharpness)
            if why:
                self._restore(trace, wd0, stig0)
                rec.wd_after_m, rec.stig_after = wd0, stig0
                trace.status, trace.message = "diverged", f"iteration {k}: {why}; starting state restored"
                rec.seconds = time.perf_counter() - t0
                return
            # --- apply: target relative to the pair centre, clamped and clipped
            target_wd = center + est.d_wd_m
            target_st = (stig[0] + est.d_stig[0], stig[1] + est.d_stig[1])
            new_wd, new_st, rec.clamped, rec.clipped_to_window = self.windows.step(wd, stig, target_wd, target_st)
            sem.set_working_distance(new_wd)
            if new_st != tuple(stig):
                sem.set_stig(*new_st)
            rec.applied_d_wd_m, rec.applied_d_stig = new_wd - wd, (new_st[0] - stig[0], new_st[1] - stig[1])
            rec.wd_after_m, rec.stig_after = new_wd, new_st
            wd, stig = new_wd, new_st
            rec.seconds = time.perf_counter() - t0
            if self.below_threshold(est):
                trace.status, trace.message = "converged", f"correction below threshold after {k} iterations"
                return
        trace.status = "max_iterations"
        trace.message = f"{self.max_iterations} iterations without reaching the threshold"
