"""Convergence benchmark on the simulator (seed ch. 3, Fig. 3.9 protocol).

9 locations on a grid of 80 µm side; initial aberrations drawn once with a
fixed seed (wd U(8, 12) µm with random sign, stig x U(−4, −2), stig y
U(2, 4); or the large (30 µm, −6, 6)); every method starts from the same
states, with the same frame noise stream per location (so the first pair is
the same pair for every pair method) and the same dwell/frame (same dose per
pair). The hidden truth (SimSEM.aberration) is read only here, to score
traces and to play the operator who focuses once at a calibration location
(MAPFoSt's induced-aberration calibration, the DeepScore stop threshold).
"""
from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from autofocus.loop import AutofocusLoop, AutofocusTrace
from autofocus.methods import MODELS_DIR, available_methods, deepscore_model, make_pair_method, sem_has_builtin
from autofocus.nelder_mead import NelderMeadAutofocus, make_objective
from devices.interfaces import ScanParams, StagePosition
from devices.safety import GuardedSEM, SafetyGuard
from devices.setup_config import SetupConfig, Simulation
from devices.sim.frames import specimen_world
from devices.sim.sem import SimSEM

MARGIN_WD_UM, MARGIN_STIG = 1.0, 0.25
CALIBRATION_SPOT_M = (0.0, 150e-6)          # away from the test grid: no test location is pre-dosed


@dataclass
class BenchSettings:
    methods: Sequence[str] = ("mapfost",)
    locations: int = 9
    grid_side_m: float = 80e-6
    iterations: int = 5
    nm_iterations: int = 30
    dwell_s: float = 50e-9
    frame: tuple[int, int] = (1024, 768)
    pixel_m: float = 10e-9
    perturbation_m: float = 5e-6
    initial: str = "seed"
    seed: int = 0
    stop_at_threshold: bool = True
    mapfost_calibration: str = "induced"
    specimen: Sequence[Path] = ()
    timing_calls: int = 20
    models_dir: Path = MODELS_DIR
    column_alpha_mrad: Optional[float] = None      # the nominal α DeepFocus starts from (setup calibration)

    def as_dict(self) -> dict:
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}
        d["specimen"] = [str(p) for p in self.specimen] or "procedural"
        d["methods"] = list(self.methods)
        d["models_dir"] = str(self.models_dir)
        return d


def grid_locations(n: int, side_m: float) -> list[tuple[float, float]]:
    k = max(1, math.ceil(math.sqrt(n)))
    ticks = np.linspace(-side_m / 2, side_m / 2, k) if k > 1 else np.zeros(1)
    return [(float(x), float(y)) for y in ticks for x in ticks][:n]


def initial_aberrations(n: int, kind: str, seed: int) -> list[tuple[float, float, float]]:
    """(Δwd µm, Δstig x, Δstig y) relative to the baseline, one per location."""
    if kind == "large":
        return [(30.0, -6.0, 6.0)] * n
    if kind != "seed":
        raise ValueError("initial is 'seed' or 'large'")
    rng = np.random.default_rng([seed, 3])
    wd = rng.uniform(8, 12, n) * rng.choice([-1.0, 1.0], n)
    return [(float(a), float(b), float(c)) for a, b, c in zip(wd, rng.uniform(-4, -2, n), rng.uniform(2, 4, n))]


class SimBench:
    """A simulated SEM on a specimen plane, guarded by the setup's windows."""

    def __init__(self, cfg: SetupConfig, st: BenchSettings, microscope=None):
        sim: Simulation = (cfg.simulation or Simulation()).model_copy(deep=True)
        if microscope is not None:
            sim.microscope = microscope
        self.world = specimen_world(sim, list(st.specimen), None)
        self.raw = SimSEM(self.world)
        self.raw.connect()
        self.raw.set_blanked(False)
        self.guard = SafetyGuard(cfg.safety)
        self.sem = GuardedSEM(self.raw, self.guard)
        self.sem.set_scan(ScanParams(pixel_m=st.pixel_m, frame=tuple(st.frame), dwell_s=st.dwell_s))
        self.st = st

    def goto(self, xy: tuple[float, float], noise_key: Sequence[int] = ()) -> tuple[float, float, float]:
        """Move to a location; reset drift and frame noise; return the hidden baseline."""
        self.world.stage_actual = StagePosition(x=xy[0], y=xy[1])
        self.world.drift_m = np.zeros(2)
        self.raw.reseed([self.st.seed, 101, *noise_key])
        return self.world.focus_baseline(*xy)

    def set_relative(self, base, ab) -> None:
        self.sem.set_working_distance(base[0] + ab[0] * 1e-6)
        self.sem.set_stig(base[1] + ab[1], base[2] + ab[2])

    def focus_by_hand(self, xy) -> tuple[float, float, float]:
        """The operator's manual focus (the only place outside scoring that uses the truth)."""
        base = self.goto(xy, (999,))
        self.set_relative(base, (0.0, 0.0, 0.0))
        return base


def score_objective(name: str, st: BenchSettings):
    """The image score of a Nelder–Mead method; DeepScore from st.models_dir."""
    if name == "deepscore-nm":
        path = deepscore_model(st.models_dir)
        if path is None:
            raise FileNotFoundError(f"no finished DeepScore model in {st.models_dir}")
        return make_objective(name, model_path=path)
    return make_objective(name)


def build_runner(name: str, bench: SimBench, *, n_patches: Optional[int] = None,
                 patch_size: int = 512) -> Callable[[], AutofocusTrace]:
    """A zero-argument callable running one autofocus from the SEM's current state."""
    st, sem, guard = bench.st, bench.sem, bench.guard
    scan = dict(dwell_s=st.dwell_s, frame_size=st.frame, pixel_size_m=st.pixel_m)
    if name in ("sharpness-nm", "deepscore-nm"):
        objective = score_objective(name, st)
        stop = None
        if name == "deepscore-nm":
            bench.focus_by_hand(CALIBRATION_SPOT_M)
            stop = 1.05 * objective(sem.acquire_frame().image, st.pixel_m)
        return lambda: NelderMeadAutofocus(sem, guard, objective, name=name, max_iterations=st.nm_iterations,
                                           stop_score=stop if st.stop_at_threshold else None,
                                           seed=st.seed, **scan).run()
    if name == "sem-builtin" and not sem_has_builtin(sem):
        raise RuntimeError("the simulated SEM has no built-in autofocus (Capability.AUTOFOCUS)")
    if name == "mapfost" and st.mapfost_calibration == "induced":
        bench.focus_by_hand(CALIBRATION_SPOT_M)
    method = make_pair_method(name, sem=sem, mapfost_calibration=st.mapfost_calibration,
                              microscope=bench.world.mp, perturbation_m=st.perturbation_m,
                              n_patches=n_patches, patch_size=patch_size, seed=st.seed, models_dir=st.models_dir,
                              column_alpha_mrad=st.column_alpha_mrad)
    thr = (0.2e-6, 0.05) if st.stop_at_threshold else (0.0, 0.0)
    runner = lambda: AutofocusLoop(sem, guard, method, perturbation_m=st.perturbation_m,  # noqa: E731
                                   max_iterations=st.iterations, threshold_wd_m=thr[0], threshold_stig=thr[1],
                                   **scan).run()
    runner.method = method
    return runner


def time_per_pair(name: str, bench: SimBench, calls: int) -> tuple[float, dict]:
    """Median ms to process one 512² pair after warm-up: one 512² MAPFoSt
    patch; for DeepFocus as many model patches as cover the 512² pair once it
    is resampled to the pixel the method feeds this column at (sixteen 128² at
    the frame's pixel size, four at twice it: a narrow column read at its
    frame pixel costs more per pair); for the image scores one 512² frame."""
    st, sem = bench.st, bench.sem
    base = bench.goto(CALIBRATION_SPOT_M, (998,))
    bench.set_relative(base, (3.0, 0.5, -0.5))
    imgs = []
    for sign in (+1, -1):
        sem.set_working_distance(base[0] + 3e-6 + sign * st.perturbation_m)
        imgs.append(sem.acquire_frame().image[:512, :512].copy())
    side = min(imgs[0].shape)
    info = {"area_px": side}
    if name.endswith("-nm"):
        objective = score_objective(name, st)
        fn = lambda: objective(imgs[0], st.pixel_m)                              # noqa: E731
    else:
        # the calibration does not change the work per pair: skip the induced one here
        m = make_pair_method(name, sem=sem, mapfost_calibration="microscope", microscope=bench.world.mp,
                             n_patches=1, patch_size=side, seed=st.seed, models_dir=st.models_dir,
                             column_alpha_mrad=st.column_alpha_mrad)
        pred = getattr(m, "predictor", None)
        if pred is not None:            # the patches that tile the pair at the pixel the method feeds
            px = m.model_pixel_m(imgs[0].shape, st.pixel_m)
            m.n_patches = pred.patches_to_tile(imgs[0].shape, st.pixel_m, px)
            info.update(patch_px=pred.patch, patches=m.n_patches, model_pixel_nm=px * 1e9)
        fn = lambda: m.estimate(imgs[0], imgs[1], st.pixel_m, st.perturbation_m)  # noqa: E731
    for _ in range(2):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    info["calls"] = calls
    return float(statistics.median(times)), info


@dataclass
class MethodResult:
    name: str
    traces: list = field(default_factory=list)       # AutofocusTrace per location
    errors: Optional[np.ndarray] = None              # (locations, iterations + 1, 3): Δwd µm, Δsx, Δsy
    dose: Optional[np.ndarray] = None                # (locations, iterations + 1) cumulative e/nm²
    ms_per_pair: float = float("nan")
    timing: dict = field(default_factory=dict)
    seconds: float = 0.0
    calibration: Optional[dict] = None
    model: Optional[dict] = None
    column: Optional[dict] = None                    # DeepFocus: the column's α, stated and learned from the moves

    def details(self) -> dict:
        return {"seconds": self.seconds, "timing": self.timing, "calibration": self.calibration, "model": self.model,
                "column": self.column,
                "status": [t.status for t in self.traces],
                "frames": [t.evaluations for t in self.traces],
                "final_error": [list(map(float, e[-1])) for e in self.errors]}

    def summary(self) -> list[dict]:
        rows = []
        for k in range(self.errors.shape[1]):
            e = np.abs(self.errors[:, k])
            stig = e[:, 1:].ravel()
            inside = (e[:, 0] < MARGIN_WD_UM) & (e[:, 1:].max(axis=1) < MARGIN_STIG)
            rows.append({"iteration": k, "mae_wd_um": float(e[:, 0].mean()), "sd_wd_um": float(e[:, 0].std()),
                         "mae_stig": float(stig.mean()), "sd_stig": float(stig.std()),
                         "in_margin_fraction": float(inside.mean()),
                         "dose_e_per_nm2": float(self.dose[:, k].mean())})
        return rows


def _errors(trace: AutofocusTrace, base, length: int):
    states = trace.states()
    dose = trace.cumulative_dose()
    states += [states[-1]] * (length - len(states))                # stopped early: the state is held
    dose += [dose[-1]] * (length - len(dose))
    err = [((w - base[0]) * 1e6, sx - base[1], sy - base[2]) for w, sx, sy in states[:length]]
    return np.array(err), np.array(dose[:length])


def run_method(name: str, bench: SimBench, locs, aberrations, progress=print, *,
               runner: Optional[Callable[[], AutofocusTrace]] = None, time_it: bool = True) -> MethodResult:
    st = bench.st
    t0 = time.perf_counter()
    runner = runner or build_runner(name, bench)
    res = MethodResult(name)
    card = getattr(getattr(getattr(runner, "method", None), "predictor", None), "card", None)
    if card:
        res.model = {k: card.get(k) for k in ("variant", "patch_size", "steps", "partial", "validation")}
        res.model["file"] = str(runner.method.model_path)
        progress(f"  {name}: {res.model}")
    cal = getattr(getattr(runner, "method", None), "calibration", None)
    if cal is not None:
        res.calibration = {**cal.__dict__, "alpha_mrad": cal.alpha_rad * 1e3}
        progress(f"  {name} calibration ({st.mapfost_calibration}): α {cal.alpha_rad * 1e3:.3f} mrad, stig scale "
                 f"{cal.stig_scale[0]:.3f}/{cal.stig_scale[1]:.3f} µm, rotation {cal.stig_rot_deg:.2f}°")
    length = 1 + (st.nm_iterations if name.endswith("-nm") else st.iterations)
    errs, doses = [], []
    for i, (xy, ab) in enumerate(zip(locs, aberrations)):
        base = bench.goto(xy, (i,))
        bench.set_relative(base, ab)
        tr = runner()
        res.traces.append(tr)
        e, d = _errors(tr, base, length)
        errs.append(e)
        doses.append(d)
        progress(f"  {name} location {i + 1}/{len(locs)}: start ({ab[0]:+.2f} µm, {ab[1]:+.2f}, {ab[2]:+.2f}) -> "
                 f"({e[-1, 0]:+.2f} µm, {e[-1, 1]:+.3f}, {e[-1, 2]:+.3f})  {tr.status}, "
                 f"{tr.evaluations} frames")
    res.errors, res.dose = np.array(errs), np.array(doses)
    method = getattr(runner, "method", None)
    if hasattr(method, "column_report"):
        res.column = method.column_report(progress, name)
    if time_it:
        res.ms_per_pair, res.timing = time_per_pair(name, bench, st.timing_calls)
    res.seconds = time.perf_counter() - t0
    return res


def format_table(res: MethodResult, every: int = 1) -> str:
    rows = res.summary()
    diverged = sum(t.status == "diverged" for t in res.traces)
    timing = f"{res.ms_per_pair:.1f} ms per 512² pair (median)" if math.isfinite(res.ms_per_pair) else "not timed"
    lines = [f"{res.name}: {timing}, {res.seconds:.0f} s total, "
             f"{diverged} restored after divergence",
             "  iter   MAE wd µm (s.d.)   MAE stig (s.d.)   in margin   dose e/nm²"]
    for r in rows:
        if r["iteration"] % every and r["iteration"] != rows[-1]["iteration"]:
            continue
        lines.append(f"  {r['iteration']:4d}   {r['mae_wd_um']:7.3f} ({r['sd_wd_um']:6.3f})   "
                     f"{r['mae_stig']:6.3f} ({r['sd_stig']:6.3f})   {r['in_margin_fraction']:9.2f}   "
                     f"{r['dose_e_per_nm2']:9.1f}")
    return "\n".join(lines)


def run_bench(cfg: SetupConfig, st: BenchSettings, *, json_out: Optional[Path] = None,
              plot_out: Optional[Path] = None, progress=print, microscope=None) -> dict:
    bench = SimBench(cfg, st, microscope)
    locs = grid_locations(st.locations, st.grid_side_m)
    abs_ = initial_aberrations(st.locations, st.initial, st.seed)
    results, skipped = {}, {}
    for name in st.methods:
        try:
            res = run_method(name, bench, locs, abs_, progress)
        except (RuntimeError, ValueError, FileNotFoundError, ImportError) as e:
            skipped[name] = str(e)
            progress(f"{name}: skipped ({e})")
            continue
        results[name] = res
        progress(format_table(res, every=1 if not name.endswith("-nm") else 5))
    settings = st.as_dict()
    settings.update(locations_m=locs, initial_aberrations=abs_, skipped=skipped,
                    details={n: r.details() for n, r in results.items()},
                    available_methods=available_methods(st.models_dir),
                    margins={"wd_um": MARGIN_WD_UM, "stig": MARGIN_STIG})
    out = {"methods": {n: {"ms_per_pair": r.ms_per_pair, "iterations": r.summary(), "column": r.column}
                       for n, r in results.items()},
           "settings": settings}
    for line in speed_vs_mapfost(results):
        progress(line)
    if json_out is not None:
        Path(json_out).write_text(json.dumps(out, indent=1))
    if plot_out is not None and results:
        plot_traces({n: r.errors for n, r in results.items()}, plot_out)
    return out


# the seed's CPU timings per 512² pair (Schubert 2022, ch. 3): MAPFoSt 0.897 s, DeepFocus 0.240 s
SEED_SPEEDUP = 0.897 / 0.240
TARGET_SPEEDUP = 3.0


def speed_vs_mapfost(results: dict[str, MethodResult]) -> list[str]:
    """Each timed method's speed-up over MAPFoSt measured in the same run."""
    ref = results.get("mapfost")
    if ref is None or not math.isfinite(ref.ms_per_pair):
        return []
    return [f"{n}: {ref.ms_per_pair / r.ms_per_pair:.1f}x faster than mapfost per 512² pair "
            f"({r.ms_per_pair:.1f} vs {ref.ms_per_pair:.1f} ms; target >= {TARGET_SPEEDUP:.0f}x, "
            f"seed {SEED_SPEEDUP:.1f}x)"
            for n, r in results.items()
            if n != "mapfost" and not n.endswith("-nm") and math.isfinite(r.ms_per_pair) and r.ms_per_pair > 0]


def plot_traces(errors: dict[str, np.ndarray], out: Path) -> None:
    """Convergence traces (rows: methods; columns: wd, stig x, stig y) with the
    1 µm / 0.25 margins, drawn offscreen with pyqtgraph and exported as PNG."""
    import os
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    import pyqtgraph as pg
    from pyqtgraph.exporters import ImageExporter
    from pyqtgraph.Qt import QtCore, QtWidgets

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    pg.setConfigOptions(antialias=True, background="w", foreground="k")
    win = pg.GraphicsLayoutWidget()
    win.resize(1200, 260 * len(errors) + 40)
    titles = ("Δwd (µm)", "Δstig x", "Δstig y")
    dash = pg.mkPen((120, 120, 120), width=1, style=QtCore.Qt.DashLine)
    for row, (name, err) in enumerate(errors.items()):
        for col in range(3):
            p = win.addPlot(row=row, col=col, title=f"{name}: {titles[col]}")
            p.setLabel("bottom", "iteration")
            margin = MARGIN_WD_UM if col == 0 else MARGIN_STIG
            for level in (-margin, 0.0, margin):
                p.addLine(y=level, pen=dash if level else pg.mkPen((180, 180, 180)))
            for i, trace in enumerate(err[:, :, col]):
                p.plot(np.arange(len(trace)), trace, pen=pg.mkPen(pg.intColor(i, hues=max(len(err), 2)), width=2),
                       symbol="o", symbolSize=4)
    win.show()                      # offscreen platform: lays the plots out without a display
    app.processEvents()
    exporter = ImageExporter(win.ci)
    exporter.parameters()["width"] = 1200
    exporter.export(str(out))
    win.close()
