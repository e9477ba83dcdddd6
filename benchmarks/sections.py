"""Section detection benchmark on simulated wafers never used in training.

Four families (wafer/detect_families.py): ``training`` (the generator the
model learnt, unseen seeds), ``validation`` (other layout ranges),
``validation looks`` (those layouts under looks beyond the training's:
stronger tile seams, detector gamma, dust) and ``test`` (layouts and looks
outside the training ranges: 2-2.6 mm and narrow 4:1 sections, touching
neighbours, thin resin rims, fainter tissue, a stronger ramp, more noise or
blur, a third inverted). Thresholds are chosen on the two validation
families. A section counts as found when the detected rectangle and the true
tissue rectangle (minimum-area rectangle of the simulator's tissue outline)
have IoU >= 0.5; sections cut by the image border are not counted either
way. Edge error: the signed distance of each of a found section's four edges
from the true one (+ outside). Time: detection on the seed's 14 x 19-tile
mosaic (14.3 x 14.6 mm at 4 µm). Every row runs the frame step and the
find-similar step (wafer/detect_frames.py, wafer/detect_similar.py) except
"test (no similar)", the network and the seed's post-processing alone.

    .venv/bin/python benchmarks/sections.py [--model models/sections_unet.pt] [--per-family 24]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


from devices.setup_config import WaferParams
from wafer import detect_data as dd
from wafer.detect import (detect_sections, load_model, match_sections, probability_map,
                          sections_from_probability)
from wafer.detect_families import FAMILIES, family_overviews

# 14 x 19 tiles of 1024 x 768 px at 1 um (as in the seed's Fig. 2.2), seen at 4 um
MOSAIC_UM = (14 * 1024.0, 19 * 768.0)
TARGETS = {"f1": 0.99, "mean_iou": 0.92, "edge_um": 4.0, "time_s": 10.0}     # on the test family


def _summary(ms: list[dict]) -> dict:
    tp, fp, fn = (sum(m[k] for m in ms) for k in ("tp", "fp", "fn"))
    p, r = tp / max(1, tp + fp), tp / max(1, tp + fn)
    cat = lambda k: [x for m in ms for x in m[k]]  # noqa: E731
    return {"tp": tp, "fp": fp, "fn": fn, "precision": p, "recall": r, "f1": 2 * p * r / max(1e-12, p + r),
            "mean_iou": float(np.mean(cat("ious"))) if cat("ious") else 0.0,
            "center_err_um": float(np.mean(cat("center_err_um"))) if cat("ious") else float("nan"),
            "center_err_p95_um": float(np.percentile(cat("center_err_um"), 95)) if cat("ious") else float("nan"),
            "angle_err_deg": float(np.mean(cat("angle_err_deg"))) if cat("ious") else float("nan"),
            "edge_med_um": float(np.median(np.abs(cat("edge_err_um")))) if cat("ious") else float("nan"),
            "edge_p90_um": float(np.percentile(np.abs(cat("edge_err_um")), 90)) if cat("ious") else float("nan"),
            "edge_bias_um": float(np.mean(cat("edge_err_um"))) if cat("ious") else float("nan")}


def big_overview(seed: int = 10000, sections: int = 150):
    """The seed's 14x19-tile mosaic at 4 um (3584 x 3648 px) over a 150-section wafer."""
    rng = np.random.default_rng([seed, 5])
    params = WaferParams(sections=sections, seed=seed, rotation_deg=float(rng.uniform(-10, 10)),
                         rotation_jitter_deg=8.0)
    wafer = dd.make_wafer(params)
    shape = (int(MOSAIC_UM[1] / dd.PIXEL_UM), int(MOSAIC_UM[0] / dd.PIXEL_UM))
    return dd.render_overview(wafer, (0.0, 0.0), shape, rng)


def main(argv=None) -> int:
    import os
    import torch
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--per-family", type=int, default=24, help="1024² px overviews per family (one wafer each)")
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats on the mosaic (best is reported)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to time")
    args = ap.parse_args(argv)
    t0 = time.time()
    model = load_model(args.model)
    print(f"model: {args.model or 'models/sections_unet.pt'}  (net pixel {model.net_pixel_um:g} um; "
          f"loaded in {time.time() - t0:.2f} s)")
    ov = big_overview()
    h, w = ov.image.shape
    best = None
    for nt in args.threads:
        torch.set_num_threads(nt)
        for _ in range(max(1, args.repeats)):
            tw, tc = time.perf_counter(), time.process_time()
            dets = detect_sections(ov.image, dd.PIXEL_UM, ov.origin_um, model=model)
            wall, cpu = time.perf_counter() - tw, time.process_time() - tc
            if best is None or wall < best[0]:
                best = (wall, cpu, nt)
    torch.set_num_threads(min(args.threads))
    rows = [("mosaic (seed 10000)", 1, _summary([match_sections(dets, ov.truth)]))]
    for fam in FAMILIES:
        variants = (False, True) if fam == "test" else (True,)   # the test family also without find similar
        ms = {v: [] for v in variants}
        for o in family_overviews(fam, args.per_family):
            prob = probability_map(o.image, o.pixel_um, model)
            for v in variants:
                dets = sections_from_probability(o.image, prob, o.pixel_um, o.origin_um, model, similar=v)
                ms[v].append(match_sections(dets, o.truth))
        if fam == "test":
            rows.append(("test (no similar)", args.per_family, _summary(ms[False])))
        rows.append((fam, args.per_family, _summary(ms[True])))
    print(f"\n{'family':<20} {'overviews':>9} {'sections':>8} {'tp':>4} {'fp':>4} {'fn':>4} {'F1':>7} "
          f"{'mean IoU':>8} {'edge |err| median':>17} {'p90':>6} {'bias':>6}")
    for name, n, r in rows:
        print(f"{name:<20} {n:>9} {r['tp'] + r['fn']:>8} {r['tp']:>4} {r['fp']:>4} {r['fn']:>4} {r['f1']:>7.4f} "
              f"{r['mean_iou']:>8.4f} {r['edge_med_um']:>14.1f} um {r['edge_p90_um']:>6.1f} {r['edge_bias_um']:>+6.1f}")
    t = rows[-1][2]
    checks = [("F1", t["f1"], ">=", TARGETS["f1"]), ("mean IoU", t["mean_iou"], ">=", TARGETS["mean_iou"]),
              ("median edge error um", t["edge_med_um"], "<=", TARGETS["edge_um"]),
              (f"time per {w}x{h} px overview s", best[0], "<", TARGETS["time_s"])]
    print(f"\ntest family targets (time: best of {args.repeats} x {args.threads} threads on the mosaic, "
          f"CPU {best[1]:.2f} s at {best[2]} thread(s), load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    ok_all = True
    for name, v, op, tgt in checks:
        ok = v >= tgt if op == ">=" else (v <= tgt if op == "<=" else v < tgt)
        ok_all &= ok
        print(f"  {name:<34} {v:8.3f}   target {op} {tgt:<6g} {'ok' if ok else 'MISSED'}")
    print(f"\n{'all targets met' if ok_all else 'some targets missed'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
