"""DeepFocus recalibration for a new microscope (seed ch. 3.3.2, Fig. 3.11).

A model's stigmator outputs are in one microscope's units; another column
needs recalibration, without any manual labelling, through the SEM
interface alone (any driver: the simulator, the ZEISS fake, a real column):

1. `autofocus collect` (autofocus/collect.py): at ~10 locations, Nelder–Mead
   on DeepScore (the classical sharpness when no DeepScore is shipped) finds
   the focus baseline, starting from where the last location ended (the
   operator focuses once, coarsely, at the start); around each baseline known
   aberrations U(±20 µm, ±5, ±5) (half of them near focus) are set and a
   ±5 µm pair is acquired at 100 or 200 ns: target = −aberration;
2. recalibrate_on_data, the last location held out and scored before and
   after (single-pair error against the known aberration): a referenced
   model (the shipped one) reads the column's α from the pairs and gets this
   column's stigmator axes as a linear map on its readings
   (autofocus/stig_map.py; the network stays as shipped, so it keeps its
   range); a column-specific model, or fewer than stig_map.MIN_PAIRS pairs,
   has its last three fully connected layers fine-tuned instead (the seed's
   way: on setup B it read the large start at 40 % and never reached the
   margins from it);
3. on the simulator, whose column is replaced by setup B, convergence
   before and after is also scored against the hidden truth.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from autofocus.bench import BenchSettings, MethodResult, SimBench, format_table, grid_locations, \
    initial_aberrations, run_method
from autofocus.collect import CollectSettings, Collector, load_pairs, pairs_at_pixel, read_journal, set_focus
from autofocus import stig_map
from autofocus.column_scale import BOUNDS
from autofocus.gain import l1_gain
from autofocus.loop import AutofocusLoop
from autofocus.methods import MODELS_DIR, DeepFocusMethod, deepfocus_variants, deepscore_model
from common.atomic import atomic_write
from devices.setup_config import MicroscopeParams, SetupConfig


@dataclass
class RecalSettings:
    locations: int = 10
    aberrations_per_location: int = 10
    steps: int = 2000
    out: Path = Path("models/deepfocus_recal.pt")
    data: Optional[Path] = None              # the collected pairs (default: next to out); resumes
    base_model: str = "deepfocus"
    test_locations: int = 5
    iterations: int = 5
    dwell_s: float = 100e-9                  # test traces
    train_dwell_s: tuple[float, ...] = (100e-9, 200e-9)
    search_dwell_s: float = 200e-9           # Nelder–Mead baseline search (seed: 200 ns)
    frame: tuple[int, int] = (1024, 768)
    pixel_m: float = 10e-9
    perturbation_m: float = 5e-6
    nm_iterations: int = 40
    seed: int = 0
    models_dir: Path = MODELS_DIR

    def data_dir(self) -> Path:
        return self.data or self.out.with_name(self.out.stem + "_pairs")

    def collect_settings(self) -> CollectSettings:
        return CollectSettings(
            locations=self.locations, aberrations=self.aberrations_per_location,
            baseline="deepscore-nm" if deepscore_model(self.models_dir) is not None else "sharpness-nm",
            dwell_ns=tuple(round(d * 1e9, 6) for d in self.train_dwell_s),
            search_dwell_ns=round(self.search_dwell_s * 1e9, 6), frame=tuple(self.frame),
            pixel_nm=round(self.pixel_m * 1e9, 6), perturbation_um=round(self.perturbation_m * 1e6, 6),
            nm_iterations=self.nm_iterations, seed=self.seed)


def second_microscope(cfg: SetupConfig) -> MicroscopeParams:
    """Setup B (devices/sim/column_presets.py) in place of the setup's column:
    its optics, detector and SE contrast; the setup's focus position and
    stigmator offsets stay."""
    from devices.sim.column_presets import SETUP_B
    base = cfg.simulation.microscope if cfg.simulation else MicroscopeParams()
    return base.model_copy(update={k: v for k, v in SETUP_B.items() if k != "wd_focus_mm"} | {"preset": "setup-b"})


def collect_pairs(cfg: SetupConfig, st: RecalSettings, progress=print,
                  at_m: Optional[tuple[float, float]] = None) -> dict:
    """The recalibration pairs on the setup's microscope, through the SEM
    interface (autofocus.collect). On the simulator the column is setup B's,
    the pairs are taken on the first section and the simulator plays the
    operator's one coarse focus there; the baselines the search found are
    scored against the hidden truth (report only)."""
    from devices.factory import build_setup
    simulated = cfg.devices.sem.driver == "sim"
    if simulated:
        cfg = cfg.model_copy(deep=True)
        cfg.simulation.microscope = second_microscope(cfg)
    data, cst = st.data_dir(), st.collect_settings()
    with build_setup(cfg) as setup:
        if simulated and not (data / "manifest.json").is_file():
            at_m = setup.world.wafer.sections[0].center_m
            wd0, sx0, sy0 = setup.world.focus_baseline(*at_m)
            rng = np.random.default_rng([st.seed, 17])
            set_focus(setup.sem, (wd0 + rng.uniform(-4, 4) * 1e-6, sx0 + rng.uniform(-0.5, 0.5),
                                  sy0 + rng.uniform(-0.5, 0.5)))
        summary = Collector(setup.sem, setup.stage, setup.guard, data, cst, progress=progress,
                            models_dir=st.models_dir, at=at_m).run()
        if simulated:
            errs = []
            for b in read_journal(data / "baselines.jsonl"):
                t = setup.world.focus_baseline(*b["stage_m"])
                errs.append(((b["baseline"][0] - t[0]) * 1e6, b["baseline"][1] - t[1], b["baseline"][2] - t[2]))
            e = np.abs(np.array(errs))
            summary["baseline_mae_vs_truth"] = {"wd_um": float(e[:, 0].mean()), "stig": float(e[:, 1:].mean())}
            progress(f"baselines found by {cst.baseline}: MAE against the hidden focus "
                     f"{e[:, 0].mean():.2f} µm, stig {e[:, 1:].mean():.3f}")
    return summary


def _convergence(bench: SimBench, st: RecalSettings, method, label: str, progress) -> MethodResult:
    locs = grid_locations(st.test_locations, 80e-6)
    abs_ = initial_aberrations(st.test_locations, "seed", st.seed)
    bench.st.iterations = st.iterations

    def runner():
        return AutofocusLoop(bench.sem, bench.guard, method, perturbation_m=st.perturbation_m,
                             max_iterations=st.iterations, threshold_wd_m=0.0, threshold_stig=0.0,
                             dwell_s=st.dwell_s, frame_size=st.frame, pixel_size_m=st.pixel_m).run()
    res = run_method(label, bench, locs, abs_, progress, runner=runner, time_it=False)
    progress(format_table(res))
    return res


def run_recalibration(cfg: SetupConfig, st: RecalSettings, *, progress=print,
                      json_out: Optional[Path] = None, at_m: Optional[tuple[float, float]] = None) -> dict:
    """Collect on the setup's microscope, fine-tune, and on the simulator score
    the convergence before and after against the hidden truth."""
    variants = deepfocus_variants(st.models_dir)
    if st.base_model not in variants:
        raise FileNotFoundError(f"no shipped DeepFocus model {st.base_model!r} (have {sorted(variants) or 'none'})")
    base_path = variants[st.base_model]
    t0 = time.perf_counter()
    simulated = cfg.devices.sem.driver == "sim"
    bench = before = None
    if simulated:
        mp = second_microscope(cfg)
        bench = SimBench(cfg, BenchSettings(dwell_s=st.dwell_s, frame=st.frame, pixel_m=st.pixel_m,
                                            perturbation_m=st.perturbation_m, seed=st.seed), microscope=mp)
        progress(f"simulated setup B: {mp.model_dump()}")
        before = _convergence(bench, st, DeepFocusMethod(base_path, seed=st.seed, name=st.base_model),
                              f"{st.base_model} (shipped)", progress)
    progress(f"collecting pairs at {st.locations} locations into {st.data_dir()}")
    collected = collect_pairs(cfg, st, progress, at_m)
    report = recalibrate_on_data(st.data_dir(), st.out, base_model=st.base_model, steps=st.steps, seed=st.seed,
                                 models_dir=st.models_dir, progress=progress)
    report["collection"] = collected
    report["seconds"] = time.perf_counter() - t0
    if simulated:
        after = _convergence(bench, st, DeepFocusMethod(st.out, seed=st.seed, name="recalibrated"),
                             "recalibrated", progress)
        report["before_convergence"], report["after_convergence"] = before.summary(), after.summary()
        b, a = before.summary()[-1], after.summary()[-1]
        report["summary"] += (f"; on setup B after {st.iterations} iterations MAE wd {b['mae_wd_um']:.2f} -> "
                              f"{a['mae_wd_um']:.2f} µm, stig {b['mae_stig']:.3f} -> {a['mae_stig']:.3f}, inside "
                              f"margins {b['in_margin_fraction']:.0%} -> {a['in_margin_fraction']:.0%}")
    if json_out is not None:
        atomic_write(Path(json_out), json.dumps(report, indent=1, default=str).encode())
    return report


def _single_step_errors(m: DeepFocusMethod, triples, pixel_m: float, perturbation_m: float) -> np.ndarray:
    """|predicted − target| of one pair each (µm, stig): on a real microscope,
    where no hidden truth exists, how well the model reads pairs of known aberration."""
    out = []
    for plus, minus, target in triples:
        e = m.estimate(plus, minus, pixel_m, perturbation_m)
        out.append((abs(e.d_wd_m * 1e6 - target[0]), abs(e.d_stig[0] - target[1]), abs(e.d_stig[1] - target[2])))
    return np.asarray(out)


def column_alpha_mrad(m: DeepFocusMethod, triples, pixel_m: float, perturbation_m: float) -> Optional[float]:
    """The probe half-angle a referenced model reads this column's pairs at
    (autofocus/column_scale.py): α_ref·√k with k the L1 slope of its wd
    readings on the known corrections; None for a column-specific model."""
    if not m.predictor.alpha_ref_mrad:
        return None
    truth, read = [], []
    for plus, minus, target in triples:
        # the model's own (referenced) reading, not the method's: that divides by an assumed column
        r = m.predictor.predict(plus, minus, pixel_m, n_patches=m.n_patches, seed_sequence=m.seed,
                                perturbation_m=perturbation_m).d_wd_m * 1e6
        if abs(target[0]) >= 1.0 and abs(r) < m.column.saturation:
            truth.append(target[0])
            read.append(r)
    if len(truth) < 2:
        return None
    k = l1_gain(np.asarray(read), np.asarray(truth))          # read ≈ k·truth
    return m.predictor.alpha_ref_mrad * math.sqrt(min(max(k, BOUNDS[0]), BOUNDS[1]))


def _map_recalibration(base_path: Path, card: dict, train_t, alpha_mrad: float, pixel_m: float,
                       perturbation_m: float, out: Path) -> dict:
    """The base network (its bytes, so its card's hash still holds) with a copy of its
    card that knows this column: its α and its stigmator axes (autofocus/stig_map.py)."""
    m = DeepFocusMethod(base_path, seed=0, column_alpha_mrad=alpha_mrad)
    read, truth = [], []
    for plus, minus, target in train_t:
        e = m.estimate(plus, minus, pixel_m, perturbation_m)
        read.append((e.d_wd_m * 1e6, *e.d_stig))
        truth.append(target)
    s = stig_map.fit(np.asarray(read), np.asarray(truth))
    card = {**card, "recalibration": {"method": "stigmator map on the base network (autofocus/stig_map.py)",
                                      "column_alpha_mrad": round(alpha_mrad, 3), "stig_map": stig_map.to_card(s)}}
    # the card first: a model file is only ever listed with its card beside it
    atomic_write(Path(out).with_suffix(".json"), json.dumps(card, indent=1, default=str).encode())
    atomic_write(Path(out), Path(base_path).read_bytes())
    return {"validation": None}


def recalibrate_on_data(data: Path, out: Path, *, base_model: str = "deepfocus", steps: int = 2000,
                        seed: int = 0, models_dir: Path = MODELS_DIR, progress=print,
                        json_out: Optional[Path] = None) -> dict:
    """Fine-tune the last three FC layers of a shipped DeepFocus on pairs from
    `autofocus collect` (any microscope). The last location's pairs are held
    out and scored before and after: single-pair error against the known
    aberration, the only truth a real microscope has."""
    from autofocus.inference import load_card
    from autofocus.train import train_on_samples

    variants = deepfocus_variants(models_dir)
    if base_model not in variants:
        raise FileNotFoundError(f"no shipped DeepFocus model {base_model!r} (have {sorted(variants) or 'none'})")
    base_path = variants[base_model]
    triples, manifest, records = load_pairs(data)
    st = manifest["settings"]
    pixel_m, pert_m = st["pixel_nm"] * 1e-9, st["perturbation_um"] * 1e-6
    locs = [r["location"] for r in records]
    held = max(locs)
    train_t = [t for t, loc in zip(triples, locs) if loc != held]
    test_t = [t for t, loc in zip(triples, locs) if loc == held]
    if len(train_t) < 2 or not test_t:
        raise ValueError(f"--data {data}: pairs from at least two locations are needed "
                         "(the last one is held out to score the recalibration)")
    card = load_card(base_path)
    want = float(card.get("pixel_size_nm", st["pixel_nm"])) * 1e-9
    base = DeepFocusMethod(base_path, seed=0)
    if base.stig_map is not None:
        raise ValueError(f"{base_model} is already recalibrated for a column "
                         f"(from {card['recalibration'].get('base_model', 'a shipped model')}): recalibrate "
                         "the shipped model again instead (--model)")
    before = _single_step_errors(base, test_t, pixel_m, pert_m)
    alpha = column_alpha_mrad(base, train_t, pixel_m, pert_m)
    if alpha is not None:
        progress(f"{base_model} reads this column's pairs as a probe half-angle of {alpha:.1f} mrad "
                 "(calibration.probe_half_angle_mrad)")
    if alpha is not None and len(train_t) >= stig_map.MIN_PAIRS:
        progress(f"{len(train_t)} training pairs, {len(test_t)} held out (location {held}); fitting this "
                 f"column's stigmator axes to {base_model}'s readings (the network stays as shipped)")
        info = _map_recalibration(base_path, card, train_t, alpha, pixel_m, pert_m, out)
        steps = 0
    else:
        if alpha is not None:
            progress(f"only {len(train_t)} training pairs (a stigmator map needs {stig_map.MIN_PAIRS}): "
                     "fine-tuning instead, and the recalibrated model reads this column directly")
        progress(f"{len(train_t)} training pairs, {len(test_t)} held out (location {held}); fine-tuning the last "
                 f"three FC layers of {base_model} for {steps} steps")
        info = train_on_samples(card["variant"], pairs_at_pixel(train_t, pixel_m, want), steps, out, init=base_path,
                                freeze_all_but_fc=True, seed=seed, log=progress, log_every=max(1, steps // 10),
                                perturbation_um=st["perturbation_um"])
    after = _single_step_errors(DeepFocusMethod(out, seed=0), test_t, pixel_m, pert_m)
    report = {"data": str(data), "sem": manifest.get("sem"), "base_model": str(base_path), "out": str(out),
              "steps": steps, "column_alpha_mrad": alpha, "train_pairs": len(train_t),
              "held_out_pairs": len(test_t), "held_out_location": held,
              "train_validation": info.get("validation"),
              "before": {"mae_wd_um": float(before[:, 0].mean()), "mae_stig": float(before[:, 1:].mean())},
              "after": {"mae_wd_um": float(after[:, 0].mean()), "mae_stig": float(after[:, 1:].mean())}}
    card_path = Path(out).with_suffix(".json")
    c = json.loads(card_path.read_text())
    c["recalibration"] = {**(c.get("recalibration") or {}),
                          **{k: report[k] for k in ("data", "sem", "base_model", "column_alpha_mrad", "train_pairs",
                                                    "held_out_pairs", "before", "after")}}
    atomic_write(card_path, json.dumps(c, indent=1, default=str).encode(), overwrite=True)
    b, a = report["before"], report["after"]
    report["summary"] = (f"recalibrated {base_model} -> {out} on {len(train_t)} pairs from {data}: single-pair "
                         f"error on the held-out location, wd {b['mae_wd_um']:.2f} -> {a['mae_wd_um']:.2f} µm, "
                         f"stig {b['mae_stig']:.3f} -> {a['mae_stig']:.3f}")
    if json_out is not None:
        atomic_write(Path(json_out), json.dumps(report, indent=1, default=str).encode())
    return report
