"""Single-image autofocus by Nelder–Mead over (wd, stig x, stig y).

Every objective evaluation sets the SEM and acquires one frame, so the
search is slow and dose-hungry compared with a pair method, but it needs no
microscope-specific model: with DeepScore (a network that regresses the
aberration magnitude |ΔF|₁ from one image) it finds the focus baseline on a
new microscope, which is what the DeepFocus recalibration builds on; with a
classical sharpness metric it is the textbook baseline.

The seed's details: a random kick (±2 µm, ±0.5, ±0.5) when the best score
has not improved for 5 iterations, and a stopping threshold on the score
(the score of a focused image × 1.05). scipy's Nelder–Mead cannot be kicked
from inside, so a stall ends the run (callback → StopIteration) and a new
simplex starts at the kicked point. Points outside the safety windows or
farther from the start than one maximum autofocus step are never commanded:
they score a penalty worse than anything seen, so the simplex turns back.
"""
from __future__ import annotations

import math
import time
from typing import Optional

import numpy as np
from scipy.optimize import minimize

from autofocus.loop import AutofocusTrace, IterationRecord, Windows, frame_dose
from autofocus.methods import deepscore_model, tenengrad
from devices.interfaces import ScanParams


class SharpnessObjective:
    """Classical: negated smoothed Tenengrad (lower = sharper)."""

    name = "sharpness"

    def __init__(self, sigma_px: float = 1.0):
        self.sigma_px = sigma_px

    def __call__(self, image: np.ndarray, pixel_size_m: float) -> float:
        return -tenengrad(image, self.sigma_px)


class DeepScoreObjective:
    """DeepScore's predicted aberration magnitude (lower = sharper)."""

    name = "deepscore"

    def __init__(self, model_path=None, **kw):
        from autofocus.inference import DeepScorePredictor
        path = model_path or deepscore_model()
        if path is None:
            raise FileNotFoundError("no DeepScore model shipped in models/ (deepscore*.pt)")
        self.model_path = path
        self.predictor = DeepScorePredictor(path, **kw)

    def __call__(self, image: np.ndarray, pixel_size_m: float) -> float:
        return float(self.predictor.score(image, pixel_size_m))


def make_objective(name: str, **kw):
    if name in ("sharpness", "sharpness-nm"):
        return SharpnessObjective(**kw)
    if name in ("deepscore", "deepscore-nm"):
        return DeepScoreObjective(**kw)
    raise ValueError(f"unknown image objective {name!r}")


class _Stop(Exception):
    pass


class NelderMeadAutofocus:
    """Nelder–Mead on an image score with kicks; reports an AutofocusTrace.

    One trace iteration = one Nelder–Mead iteration; its state is the best
    point found so far (what the SEM is left at if stopped there) and its
    dose the frames acquired during it."""

    needs_pair = False

    def __init__(self, sem, guard, objective, *, name: Optional[str] = None, max_iterations: int = 30,
                 max_evaluations: Optional[int] = None, initial_step: tuple[float, float, float] = (4e-6, 1.0, 1.0),
                 stop_score: Optional[float] = None, stall_iterations: int = 5,
                 kick: tuple[float, float, float] = (2e-6, 0.5, 0.5),
                 tolerance: tuple[float, float, float] = (0.2e-6, 0.05, 0.05),
                 dwell_s: Optional[float] = None, frame_size: Optional[tuple[int, int]] = None,
                 pixel_size_m: Optional[float] = None, seed: int = 0):
        self.sem, self.guard, self.objective = sem, guard, objective
        self.name = name or f"{getattr(objective, 'name', 'score')}-nm"
        self.windows = Windows(guard)
        self.max_iterations = max_iterations
        self.max_evaluations = max_evaluations
        self.step = np.asarray(initial_step, float)
        self.stop_score = stop_score
        self.stall_iterations = stall_iterations
        self.kick = np.asarray(kick, float)
        self.tolerance = np.asarray(tolerance, float)
        self.scan = ScanParams(pixel_m=pixel_size_m, frame=frame_size, dwell_s=dwell_s)
        self.rng = np.random.default_rng(seed)
        s = guard.s
        self.box = np.array([s.max_autofocus_step_wd_um * 1e-6, s.max_autofocus_step_stig,
                             s.max_autofocus_step_stig])

    # ----------------------------------------------------------- evaluation
    def _allowed(self, x: np.ndarray) -> float:
        """0 when x may be commanded, else how far outside (in box units)."""
        over = np.maximum(np.abs(x - self.x0) / self.box - 1.0, 0.0).sum()
        lo, hi = self.windows.wd
        slo, shi = self.windows.stig
        over += max(lo - x[0], x[0] - hi, 0.0) / self.box[0]
        over += sum(max(slo - v, v - shi, 0.0) for v in x[1:]) / self.box[1]
        return float(over)

    def _inside(self, x: np.ndarray) -> np.ndarray:
        """Nearest point that may be commanded (a kick must not start outside)."""
        x = np.clip(x, self.x0 - self.box, self.x0 + self.box)
        x[0] = min(max(x[0], self.windows.wd[0]), self.windows.wd[1])
        x[1:] = np.clip(x[1:], *self.windows.stig)
        return x

    def _evaluate(self, x: np.ndarray) -> float:
        if not np.all(np.isfinite(x)):
            return 1e9
        over = self._allowed(x)
        if over > 0:
            worst = max(self.scores) if self.scores else 0.0
            return worst + abs(worst) + 1.0 + over
        if self.max_evaluations is not None and self.frames >= self.max_evaluations:
            raise _Stop("evaluation budget spent")
        sem = self.sem
        sem.set_working_distance(float(x[0]))
        sem.set_stig(float(x[1]), float(x[2]))
        f = sem.acquire_frame()
        self.frames += 1
        self.pending_dose += frame_dose(f, sem)
        self.pending_scan += float((f.metadata or {}).get("scan_time_s", 0.0))
        self.pending_images += 1
        t0 = time.perf_counter()
        score = float(self.objective(f.image, sem.pixel_size()))
        self.pending_est += time.perf_counter() - t0
        self.scores.append(score)
        if score < self.best_score:
            self.best_score, self.best_x = score, x.copy()
        return score

    # ----------------------------------------------------------- iterations
    def _record(self, trace: AutofocusTrace, t0: float) -> None:
        before = (trace.iterations[-1].wd_after_m, trace.iterations[-1].stig_after) if trace.iterations else \
            (trace.start_wd_m, trace.start_stig)
        bx = self.best_x
        rec = IterationRecord(len(trace.iterations) + 1, before[0], tuple(before[1]))
        rec.wd_after_m, rec.stig_after = float(bx[0]), (float(bx[1]), float(bx[2]))
        rec.predicted_d_wd_m = rec.applied_d_wd_m = rec.wd_after_m - before[0]
        rec.predicted_d_stig = rec.applied_d_stig = (rec.stig_after[0] - before[1][0],
                                                     rec.stig_after[1] - before[1][1])
        rec.pair_center_wd_m = before[0]
        rec.score = float(self.best_score)
        rec.dose_e_per_nm2, rec.images, rec.scan_seconds = self.pending_dose, self.pending_images, self.pending_scan
        rec.estimate_seconds = self.pending_est
        rec.sharpness = -self.best_score if isinstance(self.objective, SharpnessObjective) else 0.0
        rec.seconds = time.perf_counter() - t0
        self.pending_dose = self.pending_scan = self.pending_est = 0.0
        self.pending_images = 0
        trace.iterations.append(rec)
        trace.evaluations = self.frames

    def run(self) -> AutofocusTrace:
        sem = self.sem
        wd0, stig0 = sem.working_distance(), tuple(sem.stig())
        trace = AutofocusTrace(self.name, wd0, stig0)
        self.x0 = np.array([wd0, *stig0], float)
        self.best_x, self.best_score = self.x0.copy(), math.inf
        self.scores: list[float] = []
        self.frames, self.pending_images = 0, 0
        self.pending_dose = self.pending_scan = self.pending_est = 0.0
        try:
            with sem.scanning(self.scan):
                self._search(trace)
                # leave the SEM at the best point seen (inside the windows by construction)
                sem.set_working_distance(float(self.best_x[0]))
                sem.set_stig(float(self.best_x[1]), float(self.best_x[2]))
        except BaseException as e:
            trace.status, trace.message = "failed", f"{type(e).__name__}: {e}"
            sem.set_working_distance(wd0)
            sem.set_stig(*stig0)
            trace.restored = True
            raise
        finally:
            trace.final_wd_m, trace.final_stig = sem.working_distance(), tuple(sem.stig())
        return trace

    def _search(self, trace: AutofocusTrace) -> None:
        start = self.x0.copy()
        step = self.step.copy()
        kicks = 0
        t_iter = [time.perf_counter()]
        while len(trace.iterations) < self.max_iterations:
            origin = start.copy()
            to_x = lambda u, o=origin, s=step: o + u * s          # noqa: E731  normalised coordinates
            since = {"best": self.best_score, "n": 0}

            def callback(intermediate_result):
                self._record(trace, t_iter[0])
                t_iter[0] = time.perf_counter()
                if self.stop_score is not None and self.best_score <= self.stop_score:
                    raise StopIteration
                if len(trace.iterations) >= self.max_iterations:
                    raise StopIteration
                if self.best_score < since["best"]:
                    since["best"], since["n"] = self.best_score, 0
                else:
                    since["n"] += 1
                    if since["n"] >= self.stall_iterations:
                        raise StopIteration

            simplex = np.vstack([np.zeros(3), np.eye(3)])
            xatol = float(np.min(self.tolerance / step))
            try:
                minimize(lambda u: self._evaluate(to_x(u)), np.zeros(3), method="Nelder-Mead", callback=callback,
                         options={"initial_simplex": simplex, "xatol": xatol, "fatol": np.inf,
                                  "maxiter": self.max_iterations - len(trace.iterations) + 1})
            except _Stop:
                if self.pending_images:
                    self._record(trace, t_iter[0])
                trace.status, trace.message = "max_iterations", "evaluation budget spent"
                return
            if self.stop_score is not None and self.best_score <= self.stop_score:
                trace.status = "converged"
                trace.message = f"score {self.best_score:.4g} ≤ threshold {self.stop_score:.4g}"
                return
            if self.stop_score is None and since["n"] < self.stall_iterations and \
                    len(trace.iterations) < self.max_iterations:
                # the simplex shrank below the tolerance: converged as far as the score can tell
                trace.status, trace.message = "converged", "simplex below tolerance"
                return
            # stalled (or converged short of the threshold): kick the best point, smaller simplex
            kicks += 1
            start = self._inside(self.best_x + self.rng.uniform(-1, 1, 3) * self.kick)
            step = np.maximum(step * 0.5, self.kick)
        trace.status = "max_iterations"
        trace.message = f"{self.max_iterations} Nelder–Mead iterations ({kicks} kicks, {self.frames} frames)"
