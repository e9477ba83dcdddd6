"""`autofocus bench` on a connected microscope (issue 15), where no hidden
truth exists.

The operator focuses at the stage position where the command starts (MAPFoSt
calibrates there). At each location of a grid beside it (150 µm away in y,
so no test location has taken that dose), every method starts from the operator's focus
plus the same known aberration (the seed's starting states) and runs its
loop; the benchmark reports
  - convergence: the size of each iteration's correction (it shrinks towards
    zero when the method agrees with itself), and how many locations end with
    a last correction inside the margins (1 µm, 0.25);
  - final sharpness against the operator's: one frame at the method's final
    state and one at the operator's focus, Tenengrad ratio (> 1: sharper);
  - the electron dose of the loop, and of the two scoring frames separately.
On the simulator the same runs are also scored against the hidden truth by
autofocus/bench.py; this module never reads it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from autofocus.bench import (MARGIN_STIG, MARGIN_WD_UM, BenchSettings, grid_locations, initial_aberrations,
                             score_objective)
from autofocus.collect import move_xy, set_focus
from autofocus.loop import AutofocusLoop, frame_dose
from autofocus.methods import available_methods, make_pair_method, tenengrad
from autofocus.nelder_mead import NelderMeadAutofocus
from common.atomic import atomic_write
from devices.interfaces import ScanParams

GRID_OFFSET_M = 150e-6


def _corrections(trace) -> list[tuple[float, float]]:
    """|Δwd| µm and max |Δstig| each iteration applied (or proposed, at the last)."""
    out, prev = [], (trace.start_wd_m, *trace.start_stig)
    for r in trace.iterations:
        cur = (r.wd_after_m, *r.stig_after)
        out.append((abs(cur[0] - prev[0]) * 1e6, max(abs(cur[1] - prev[1]), abs(cur[2] - prev[2]))))
        prev = cur
    return out


class ConnectedBench:
    def __init__(self, setup, st: BenchSettings, progress=print):
        self.sem, self.stage, self.guard, self.st, self.progress = setup.sem, setup.stage, setup.guard, st, progress
        self.scan = ScanParams(pixel_m=st.pixel_m, frame=tuple(st.frame), dwell_s=st.dwell_s)
        p = self.stage.position()
        self.origin = (p.x, p.y)
        self.operator = (self.sem.working_distance(), *self.sem.stig())

    def _goto(self, xy) -> None:
        """A test location: the grid lies beside the operator's spot (which
        calibration and focusing have dosed), GRID_OFFSET_M away in y."""
        move_xy(self.stage, self.origin[0] + xy[0], self.origin[1] + GRID_OFFSET_M + xy[1])

    def _goto_origin(self) -> None:
        move_xy(self.stage, *self.origin)

    def _runner(self, name: str):
        st, scan = self.st, dict(dwell_s=self.st.dwell_s, frame_size=self.st.frame, pixel_size_m=self.st.pixel_m)
        if name.endswith("-nm"):
            objective = score_objective(name, st)
            return lambda: NelderMeadAutofocus(self.sem, self.guard, objective, name=name,
                                               max_iterations=st.nm_iterations, seed=st.seed, **scan).run()
        self._goto_origin()                         # MAPFoSt calibrates where the operator focused
        set_focus(self.sem, self.operator)
        with self.sem.scanning(self.scan):
            method = make_pair_method(name, sem=self.sem, mapfost_calibration="induced",
                                      perturbation_m=st.perturbation_m, seed=st.seed, models_dir=st.models_dir,
                                      column_alpha_mrad=st.column_alpha_mrad)
        thr = (0.2e-6, 0.05) if st.stop_at_threshold else (0.0, 0.0)

        def run():
            return AutofocusLoop(self.sem, self.guard, method, perturbation_m=st.perturbation_m,
                                 max_iterations=st.iterations, threshold_wd_m=thr[0], threshold_stig=thr[1],
                                 **scan).run()
        run.method = method
        return run

    def _sharpness(self, state) -> tuple[float, float]:
        set_focus(self.sem, state)
        with self.sem.scanning(self.scan):
            f = self.sem.acquire_frame()
            dose = frame_dose(f, self.sem)          # with this scan's dwell and pixel
        return tenengrad(np.asarray(f.image, np.float32)), dose

    def run_method(self, name: str, locs, aberrations) -> dict:
        runner = self._runner(name)
        rows = []
        for i, (xy, ab) in enumerate(zip(locs, aberrations)):
            self._goto(xy)
            set_focus(self.sem, (self.operator[0] + ab[0] * 1e-6, self.operator[1] + ab[1],
                                 self.operator[2] + ab[2]))
            tr = runner()
            final = (tr.final_wd_m, *tr.final_stig)
            # alternate which of the two scoring frames comes first: charging or contamination
            # from the first must not favour either side
            if i % 2:
                s_op, d2 = self._sharpness(self.operator)
                s_final, d1 = self._sharpness(final)
            else:
                s_final, d1 = self._sharpness(final)
                s_op, d2 = self._sharpness(self.operator)
            corr = _corrections(tr)
            rows.append({"location": i, "start": list(ab), "status": tr.status, "frames": tr.evaluations,
                         "corrections": corr, "final_state": list(final),
                         "final_vs_operator_um": (final[0] - self.operator[0]) * 1e6,
                         "sharpness_ratio": s_final / s_op if s_op > 0 else float("nan"),
                         "dose_e_per_nm2": tr.dose_e_per_nm2, "scoring_dose_e_per_nm2": d1 + d2})
            last = corr[-1] if corr else (float("nan"), float("nan"))
            self.progress(f"  {name} location {i + 1}/{len(locs)}: {tr.status}, {tr.evaluations} frames, last "
                          f"correction {last[0]:.2f} µm / {last[1]:.3f}, sharpness x{rows[-1]['sharpness_ratio']:.2f} "
                          f"of the operator's")
        out = {"locations": rows, "summary": summarise(rows)}
        method = getattr(runner, "method", None)
        if hasattr(method, "column_report"):        # DeepFocus: the α to write into the setup file
            out["column"] = method.column_report(self.progress, name)
        return out


def summarise(rows: list[dict]) -> dict:
    n_it = max((len(r["corrections"]) for r in rows), default=0)
    per_it = []
    for k in range(n_it):
        c = np.array([r["corrections"][k] for r in rows if len(r["corrections"]) > k])
        per_it.append({"iteration": k + 1, "median_correction_wd_um": float(np.median(c[:, 0])),
                       "median_correction_stig": float(np.median(c[:, 1])), "locations": len(c)})
    settled = [r for r in rows if r["corrections"] and r["corrections"][-1][0] < MARGIN_WD_UM
               and r["corrections"][-1][1] < MARGIN_STIG]
    ratio = np.array([r["sharpness_ratio"] for r in rows], float)
    return {"iterations": per_it, "settled_fraction": len(settled) / max(len(rows), 1),
            "median_sharpness_ratio": float(np.nanmedian(ratio)) if len(ratio) else float("nan"),
            "mean_dose_e_per_nm2": float(np.mean([r["dose_e_per_nm2"] for r in rows])) if rows else 0.0,
            "scoring_dose_e_per_nm2": float(np.mean([r["scoring_dose_e_per_nm2"] for r in rows])) if rows else 0.0}


def format_connected(name: str, summary: dict) -> str:
    lines = [f"{name}: {summary['settled_fraction']:.0%} settled (last correction < {MARGIN_WD_UM:g} µm and "
             f"< {MARGIN_STIG:g}), final sharpness x{summary['median_sharpness_ratio']:.2f} of the operator's "
             f"(median), dose {summary['mean_dose_e_per_nm2']:.0f} e/nm² per location "
             f"(+{summary['scoring_dose_e_per_nm2']:.0f} for the two scoring frames)",
             "  iter   median correction wd µm   stig"]
    lines += [f"  {r['iteration']:4d}   {r['median_correction_wd_um']:23.3f}   {r['median_correction_stig']:.3f}"
              for r in summary["iterations"]]
    return "\n".join(lines)


def run_connected_bench(setup, st: BenchSettings, *, json_out: Optional[Path] = None, progress=print) -> dict:
    bench = ConnectedBench(setup, st, progress)
    locs = grid_locations(st.locations, st.grid_side_m)
    starts = initial_aberrations(st.locations, st.initial, st.seed)
    progress(f"operator's focus: wd {bench.operator[0] * 1e3:.4f} mm, stig ({bench.operator[1]:+.3f}, "
             f"{bench.operator[2]:+.3f}); {len(locs)} locations around the stage position")
    out, skipped = {}, {}
    try:
        for name in st.methods:
            try:
                out[name] = bench.run_method(name, locs, starts)
            except (RuntimeError, ValueError, FileNotFoundError, ImportError) as e:
                skipped[name] = str(e)
                progress(f"{name}: skipped ({e})")
                continue
            progress(format_connected(name, out[name]["summary"]))
    finally:                                    # the operator's spot and focus back, whatever happened
        set_focus(bench.sem, bench.operator)
        bench._goto_origin()
    result = {"methods": out, "settings": {**st.as_dict(), "origin_m": list(bench.origin),
                                           "operator_focus": list(bench.operator), "skipped": skipped,
                                           "available_methods": available_methods(st.models_dir),
                                           "truth": "none: a connected microscope"}}
    if json_out is not None:
        atomic_write(Path(json_out), json.dumps(result, indent=1, default=float).encode())
    return result
