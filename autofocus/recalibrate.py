"""DeepFocus recalibration for a new microscope (seed ch. 3.3.2, Fig. 3.11).

On the second simulated microscope (different α, stig scales/rotation and a
90° scan rotation) the shipped model converges poorly. Recalibration without
any manual labelling:

1. at ~10 locations, Nelder–Mead on DeepScore (the classical sharpness when
   no DeepScore is shipped) finds the focus baseline, starting from where the
   last location ended (the operator focuses once, coarsely, at the start);
2. around each baseline, known aberrations U(±20 µm, ±5, ±5) are set and a
   ±5 µm pair acquired at 100 or 200 ns: target = −aberration;
3. the last three fully connected layers of the shipped model are fine-tuned
   (train_on_samples(..., freeze_all_but_fc=True)), saved with a card;
4. convergence before and after on the same test locations and starting
   aberrations, scored against the hidden truth (benchmark only).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from autofocus.collect import pairs_at_pixel
from common.atomic import atomic_write
from autofocus.bench import (BenchSettings, MethodResult, SimBench, format_table, grid_locations,
                             initial_aberrations, run_method)
from autofocus.loop import AutofocusLoop, Windows
from autofocus.methods import MODELS_DIR, DeepFocusMethod, deepfocus_variants, deepscore_model
from autofocus.nelder_mead import NelderMeadAutofocus, make_objective
from devices.interfaces import ScanParams
from devices.setup_config import MicroscopeParams, SetupConfig

TRAIN_CENTER_M = (400e-6, 0.0)              # training region, away from the test grid at (0, 0)


@dataclass
class RecalSettings:
    locations: int = 10
    aberrations_per_location: int = 10
    steps: int = 2000
    out: Path = Path("models/deepfocus_recal.pt")
    base_model: str = "deepfocus"
    test_locations: int = 5
    iterations: int = 5
    dwell_s: float = 100e-9                  # test traces
    train_dwell_s: tuple[float, ...] = (100e-9, 200e-9)
    search_dwell_s: float = 200e-9           # Nelder–Mead baseline search (seed: 200 ns)
    frame: tuple[int, int] = (1024, 768)
    pixel_m: float = 10e-9
    perturbation_m: float = 5e-6
    wd_range_um: float = 20.0
    stig_range: float = 5.0
    # share of the known aberrations drawn near focus (±near_wd_um, ±near_stig): the loop's
    # last iterations happen there, and pairs drawn over the whole range alone left the
    # fine-tuned model with a 0.25 stig / 0.4 µm bias at focus
    near_fraction: float = 0.5
    near_wd_um: float = 3.0
    near_stig: float = 0.75
    nm_iterations: int = 40
    seed: int = 0
    models_dir: Path = MODELS_DIR


def second_microscope(cfg: SetupConfig) -> MicroscopeParams:
    """Setup B (devices/sim/column_presets.py) in place of the setup's column:
    its optics, detector and SE contrast; the setup's focus position and
    stigmator offsets stay."""
    from devices.sim.column_presets import SETUP_B
    base = cfg.simulation.microscope if cfg.simulation else MicroscopeParams()
    return base.model_copy(update={k: v for k, v in SETUP_B.items() if k != "wd_focus_mm"} | {"preset": "setup-b"})


def find_baselines(bench: SimBench, st: RecalSettings, progress=print) -> list[dict]:
    """Nelder–Mead focus at each training location, no truth used (it is only
    recorded, to report how good the found baselines are)."""
    score_model = deepscore_model(st.models_dir)
    use_deepscore = score_model is not None
    objective = make_objective("deepscore-nm", model_path=score_model) if use_deepscore else \
        make_objective("sharpness-nm")
    stop = None
    if use_deepscore:                       # seed: score of one manually focused image × 1.05
        bench.focus_by_hand((TRAIN_CENTER_M[0], TRAIN_CENTER_M[1] - 200e-6))
        bench.sem.set_scan(ScanParams(dwell_s=st.search_dwell_s))
        stop = 1.05 * objective(bench.sem.acquire_frame().image, st.pixel_m)
    rng = np.random.default_rng([st.seed, 17])
    locs = [(TRAIN_CENTER_M[0] + x, TRAIN_CENTER_M[1] + y)
            for x, y in grid_locations(st.locations, 60e-6 * max(1, math.ceil(math.sqrt(st.locations)) - 1))]
    found, state = [], None
    for i, xy in enumerate(locs):
        truth = bench.goto(xy, (500 + i,))
        if state is None:                    # coarse manual focus at the first location
            start = (truth[0] + rng.uniform(-4, 4) * 1e-6, truth[1] + rng.uniform(-0.5, 0.5),
                     truth[2] + rng.uniform(-0.5, 0.5))
        else:                                # the stage move shifts the focus by a few µm
            start = (state[0] + rng.uniform(-3, 3) * 1e-6, state[1], state[2])
        bench.sem.set_working_distance(start[0])
        bench.sem.set_stig(start[1], start[2])
        tr = NelderMeadAutofocus(bench.sem, bench.guard, objective, name=objective.name + "-nm",
                                 max_iterations=st.nm_iterations, stop_score=stop, seed=st.seed + i,
                                 dwell_s=st.search_dwell_s, frame_size=st.frame, pixel_size_m=st.pixel_m).run()
        state = (tr.final_wd_m, *tr.final_stig)
        err = ((state[0] - truth[0]) * 1e6, state[1] - truth[1], state[2] - truth[2])
        found.append({"location_m": xy, "baseline": state, "error_vs_truth": err, "frames": tr.evaluations,
                      "dose_e_per_nm2": tr.dose_e_per_nm2, "status": tr.status})
        progress(f"  location {i + 1}/{len(locs)}: {objective.name}+NM baseline found in {tr.evaluations} frames; "
                 f"error vs truth ({err[0]:+.2f} µm, {err[1]:+.3f}, {err[2]:+.3f})")
    return found


def acquire_training_pairs(bench: SimBench, st: RecalSettings, baselines: list[dict]) -> list[dict]:
    """Known aberrations around each found baseline; target = −aberration
    (the correction, µm and stig units), as in the seed's ground truth."""
    rng = np.random.default_rng([st.seed, 23])
    sem, samples = bench.sem, []
    bench_windows = Windows(bench.guard)
    for i, b in enumerate(baselines):
        bench.goto(b["location_m"], (700 + i,))
        wd0, sx0, sy0 = b["baseline"]
        for _ in range(st.aberrations_per_location):
            for _ in range(100):             # redraw aberrations that would leave the safety windows
                near = rng.random() < st.near_fraction
                wd_r, st_r = (st.near_wd_um, st.near_stig) if near else (st.wd_range_um, st.stig_range)
                ab = (rng.uniform(-wd_r, wd_r), rng.uniform(-st_r, st_r), rng.uniform(-st_r, st_r))
                if all(bench_windows.inside(wd0 + ab[0] * 1e-6 + s * st.perturbation_m, (sx0 + ab[1], sy0 + ab[2]))
                       for s in (-1, 1)):
                    break
            else:
                raise RuntimeError(f"baseline {b['baseline']} leaves no room for aberrations inside the windows")
            sem.set_scan(ScanParams(dwell_s=float(rng.choice(st.train_dwell_s))))
            sem.set_stig(sx0 + ab[1], sy0 + ab[2])
            imgs = []
            for sign in (+1, -1):
                sem.set_working_distance(wd0 + ab[0] * 1e-6 + sign * st.perturbation_m)
                imgs.append(sem.acquire_frame().image)
            samples.append({"img_plus": imgs[0], "img_minus": imgs[1], "target": (-ab[0], -ab[1], -ab[2]),
                            "location": i, "dwell_s": sem.dwell_time()})
        sem.set_working_distance(wd0)
        sem.set_stig(sx0, sy0)
    return samples


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


def _training_triples(samples: list[dict], card: dict, pixel_m: float) -> list[tuple]:
    """(img_plus, img_minus, target) at the model's pixel size, as train_on_samples wants."""
    want = float(card.get("pixel_size_nm", pixel_m * 1e9)) * 1e-9
    return pairs_at_pixel([(s["img_plus"], s["img_minus"], s["target"]) for s in samples], pixel_m, want)


def _annotate_card(out: Path, report: dict) -> None:
    """Add how the recalibration data were made and what it achieved to the card."""
    card_path = out.with_suffix(".json")
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    card["recalibration"] = {k: report[k] for k in ("microscope", "base_model", "baselines", "baseline_mae",
                                                    "before", "after", "settings", "baseline_search")}
    card_path.write_text(json.dumps(card, indent=1, default=str))


def run_recalibration(cfg: SetupConfig, st: RecalSettings, *, progress=print,
                      json_out: Optional[Path] = None) -> dict:
    from autofocus.train import train_on_samples

    variants = deepfocus_variants(st.models_dir)
    if st.base_model not in variants:
        raise FileNotFoundError(f"no shipped DeepFocus model {st.base_model!r} (have {sorted(variants) or 'none'})")
    base_path = variants[st.base_model]
    mp = second_microscope(cfg)
    bench = SimBench(cfg, BenchSettings(dwell_s=st.dwell_s, frame=st.frame, pixel_m=st.pixel_m,
                                        perturbation_m=st.perturbation_m, seed=st.seed), microscope=mp)
    t0 = time.perf_counter()
    progress(f"second microscope: {mp.model_dump()}")
    progress(f"before: shipped {st.base_model} ({base_path.name})")
    before = _convergence(bench, st, DeepFocusMethod(base_path, seed=st.seed, name=st.base_model),
                          f"{st.base_model} (shipped)", progress)
    progress(f"finding the focus baseline at {st.locations} locations")
    baselines = find_baselines(bench, st, progress)
    samples = acquire_training_pairs(bench, st, baselines)
    progress(f"{len(samples)} training pairs; fine-tuning the last three FC layers for {st.steps} steps")
    st.out.parent.mkdir(parents=True, exist_ok=True)
    t_train = time.perf_counter()
    from autofocus.inference import load_card
    base_card = load_card(base_path)
    train_info = train_on_samples(base_card["variant"], _training_triples(samples, base_card, st.pixel_m),
                                  st.steps, st.out, init=base_path, freeze_all_but_fc=True, seed=st.seed,
                                  log=progress, log_every=max(1, st.steps // 10))
    train_s = time.perf_counter() - t_train
    after = _convergence(bench, st, DeepFocusMethod(st.out, seed=st.seed, name="recalibrated"),
                         "recalibrated", progress)
    errs = np.array([b["error_vs_truth"] for b in baselines])
    report = {
        "microscope": mp.model_dump(), "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                    for k, v in st.__dict__.items()},
        "base_model": str(base_path), "out": str(st.out), "train_seconds": train_s,
        "train_validation": train_info.get("validation"), "baseline_search":
            "deepscore+nelder-mead" if deepscore_model(st.models_dir) is not None else "sharpness+nelder-mead",
        "baselines": baselines, "baseline_mae": {"wd_um": float(np.abs(errs[:, 0]).mean()),
                                                 "stig": float(np.abs(errs[:, 1:]).mean())},
        "before": before.summary(), "after": after.summary(), "seconds": time.perf_counter() - t0,
    }
    _annotate_card(st.out, report)
    b, a = report["before"][-1], report["after"][-1]
    report["summary"] = (f"recalibrated {st.base_model} -> {st.out}: after {st.iterations} iterations MAE wd "
                         f"{b['mae_wd_um']:.2f} -> {a['mae_wd_um']:.2f} µm, stig {b['mae_stig']:.3f} -> "
                         f"{a['mae_stig']:.3f}, inside margins {b['in_margin_fraction']:.0%} -> "
                         f"{a['in_margin_fraction']:.0%}")
    if json_out is not None:
        Path(json_out).write_text(json.dumps(report, indent=1, default=str))
    return report


def _single_step_errors(model: Path, triples, pixel_m: float, perturbation_m: float) -> np.ndarray:
    """|predicted − target| of one pair each (µm, stig): on a real microscope,
    where no hidden truth exists, how well the model reads pairs of known aberration."""
    m = DeepFocusMethod(model, seed=0)
    out = []
    for plus, minus, target in triples:
        e = m.estimate(plus, minus, pixel_m, perturbation_m)
        out.append((abs(e.d_wd_m * 1e6 - target[0]), abs(e.d_stig[0] - target[1]), abs(e.d_stig[1] - target[2])))
    return np.asarray(out)


def recalibrate_on_data(data: Path, out: Path, *, base_model: str = "deepfocus", steps: int = 2000,
                        seed: int = 0, models_dir: Path = MODELS_DIR, progress=print,
                        json_out: Optional[Path] = None) -> dict:
    """Fine-tune the last three FC layers of a shipped DeepFocus on pairs from
    `autofocus collect` (any microscope). The last location's pairs are held
    out and scored before and after: single-pair error against the known
    aberration, the only truth a real microscope has."""
    from autofocus.collect import _jsonl, load_pairs
    from autofocus.inference import load_card
    from autofocus.train import train_on_samples

    variants = deepfocus_variants(models_dir)
    if base_model not in variants:
        raise FileNotFoundError(f"no shipped DeepFocus model {base_model!r} (have {sorted(variants) or 'none'})")
    base_path = variants[base_model]
    triples, manifest = load_pairs(data)
    st = manifest["settings"]
    pixel_m, pert_m = st["pixel_nm"] * 1e-9, st["perturbation_um"] * 1e-6
    locs = [r["location"] for r in _jsonl(Path(data) / "pairs.jsonl", repair=False)]
    held = max(locs)
    train_t = [t for t, loc in zip(triples, locs) if loc != held]
    test_t = [t for t, loc in zip(triples, locs) if loc == held]
    if len(train_t) < 2 or not test_t:
        raise ValueError(f"--data {data}: pairs from at least two locations are needed "
                         "(the last one is held out to score the recalibration)")
    card = load_card(base_path)
    want = float(card.get("pixel_size_nm", st["pixel_nm"])) * 1e-9
    before = _single_step_errors(base_path, test_t, pixel_m, pert_m)
    progress(f"{len(train_t)} training pairs, {len(test_t)} held out (location {held}); fine-tuning the last "
             f"three FC layers of {base_model} for {steps} steps")
    info = train_on_samples(card["variant"], pairs_at_pixel(train_t, pixel_m, want), steps, out, init=base_path,
                            freeze_all_but_fc=True, seed=seed, log=progress, log_every=max(1, steps // 10),
                            perturbation_um=st["perturbation_um"])
    after = _single_step_errors(out, test_t, pixel_m, pert_m)
    report = {"data": str(data), "sem": manifest.get("sem"), "base_model": str(base_path), "out": str(out),
              "steps": steps, "train_pairs": len(train_t), "held_out_pairs": len(test_t), "held_out_location": held,
              "train_validation": info.get("validation"),
              "before": {"mae_wd_um": float(before[:, 0].mean()), "mae_stig": float(before[:, 1:].mean())},
              "after": {"mae_wd_um": float(after[:, 0].mean()), "mae_stig": float(after[:, 1:].mean())}}
    card_path = Path(out).with_suffix(".json")
    c = json.loads(card_path.read_text())
    c["recalibration"] = {k: report[k] for k in ("data", "sem", "base_model", "train_pairs", "held_out_pairs",
                                                 "before", "after")}
    atomic_write(card_path, json.dumps(c, indent=1, default=str).encode(), overwrite=True)
    b, a = report["before"], report["after"]
    report["summary"] = (f"recalibrated {base_model} -> {out} on {len(train_t)} pairs from {data}: single-pair "
                         f"error on the held-out location, wd {b['mae_wd_um']:.2f} -> {a['mae_wd_um']:.2f} µm, "
                         f"stig {b['mae_stig']:.3f} -> {a['mae_stig']:.3f}")
    if json_out is not None:
        Path(json_out).write_text(json.dumps(report, indent=1, default=str))
    return report
