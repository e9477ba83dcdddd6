"""Output-gain calibration of a DeepFocus model.

A regressor trained with an L1 loss on noisy pairs shrinks its predictions
towards zero where the cue is weak: the shipped model corrects only ~85 % of
the stigmation per step, so the loop needs an extra iteration. The fix is the
usual post-hoc calibration: per output (Δwd, Δstig x, Δstig y) the gain g
that minimises the mean absolute error of g x prediction against the true
correction (a weighted median of truth/prediction: robust to the few pairs
beyond the trained range, which a least-squares fit would chase), over
fresh 512² pairs drawn from the model's own training distribution (its card's
aberration mixture, training textures and procedural seeds, dwell over the
training range; the benchmark's specimen and locations are never used). The
card stores it as ``output_gain``; DeepFocusPredictor multiplies by it.

A model referenced to one column (alpha_ref) has its wd gain fitted only on
columns within FED_ALPHA of that column: DeepFocusMethod feeds every column
whose α it knows at the pixel where it looks like the reference, within the
clamps of autofocus.column_scale.model_pixel, so that is where the µm scale
must hold (fewer than MIN_FED_PAIRS such pairs: all pairs, and the card says
so). Over all columns (2-25 mrad) the wide ones, which the network reads low,
pulled the wd gain to 1.13 and the reference column then read 13 µm of
defocus as 15-16 µm. The stigmator gains stay fitted over all columns: their
units are per microscope anyway (recalibration), and they make up for the
shrinkage at strong astigmatism that the loop's large starts depend on.

    .venv/bin/python -m autofocus.gain models/deepfocus_128.pt --shared ../shared [--samples 400]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from common.atomic import atomic_write
from autofocus.data import DataConfig, PairSimulator, training_textures
from autofocus.inference import DeepFocusPredictor, load_card

PAIR_SIDE = 512
FED_ALPHA = (0.75, 1.25)        # x alpha_ref: the columns a referenced model's wd gain is fitted on
SEED_RANGE_UM = 20.0            # ... and the defocus: the seed's range (ch. 3, Fig. 3.4)
MIN_FED_PAIRS = 20


def fit_output_gain(model_path: Path, textures: Sequence[Path], samples: int = 400, seed: int = 2026) -> dict:
    """The gains and how they were measured (for the card)."""
    t0 = time.perf_counter()
    pred = DeepFocusPredictor(model_path)
    pred.gain = np.ones(3)                          # fit on the raw outputs
    trained = pred.card.get("training_data") or {}
    mixture = tuple(tuple(m) for m in trained.get("mixture") or DataConfig.mixture)
    # pairs as acquired (the predictor resamples them to the model's pixels)
    acquire_nm = float(trained.get("acquire_pixel_nm") or pred.pixel_size_m * 1e9)
    # a column-randomised model is calibrated over the columns it trained on, others on the base column
    microscopes = "columns" if trained.get("microscopes") == "columns" else "base"
    cfg = DataConfig(patch=PAIR_SIDE, n_patches=1, textures=[str(t) for t in textures], microscopes=microscopes,
                     mixture=mixture, augment=False, pixel_nm=acquire_nm,
                     alpha_ref_mrad=trained.get("alpha_ref_mrad"),
                     target_clip=tuple(trained.get("target_clip") or DataConfig.target_clip))
    sim = PairSimulator(cfg)
    rng = np.random.default_rng([seed, 0x6A1])
    n = pred.patches_to_tile((PAIR_SIDE, PAIR_SIDE), cfg.pixel_nm * 1e-9)
    truth, out, alpha, defocus = [], [], [], []
    for _ in range(int(samples)):
        x, y, meta = sim.sample(rng)                # dwell log-uniform over the training range
        # a column-conditioned model is told the column, as DeepFocusMethod tells it a stated one
        est = pred.predict(x[0, 0], x[0, 1], cfg.pixel_nm * 1e-9, n_patches=n, column_alpha_mrad=meta["alpha_mrad"])
        truth.append(y)
        out.append((est.d_wd_m * 1e6, *est.d_stig))
        alpha.append(meta["alpha_mrad"])
        defocus.append(abs(meta["ab"][0]))
    t, p = np.asarray(truth, float), np.asarray(out, float)
    ref, a = cfg.alpha_ref_mrad, np.asarray(alpha)
    fed_rows = ((a >= FED_ALPHA[0] * ref) & (a <= FED_ALPHA[1] * ref) & (np.asarray(defocus) <= SEED_RANGE_UM)
                if ref else None)
    fed = fed_rows is not None and int(fed_rows.sum()) >= MIN_FED_PAIRS
    wd_rows = fed_rows if fed else np.ones(len(t), bool)
    gain = np.array([l1_gain(t[wd_rows, 0], p[wd_rows, 0])] + [l1_gain(t[:, k], p[:, k]) for k in (1, 2)])
    mae_raw = np.abs(t - p).mean(0)
    mae_gain = np.abs(t - gain * p).mean(0)
    return {"values": [round(float(g), 4) for g in gain],
            "outputs": ["d_wd_um", "d_stig_x", "d_stig_y"],
            "method": "min mean |truth - g x prediction| (weighted median of truth/prediction)",
            "wd_fitted_on": (f"columns of alpha {FED_ALPHA[0] * ref:g}-{FED_ALPHA[1] * ref:g} mrad, |defocus| <= "
                             f"{SEED_RANGE_UM:g} µm ({int(wd_rows.sum())} pairs)" if fed else
                             f"all pairs ({len(t)})"),
            "samples": int(samples), "seed": seed, "pair_px": PAIR_SIDE, "patches_per_pair": n,
            "data": {"mixture": [list(m) for m in cfg.mixture], "dwell_ns": list(cfg.dwell_ns),
                     "microscope": microscopes, "textures": [Path(x).name for x in textures],
                     "procedural_seeds": list(cfg.procedural_seeds)},
            "mae_before": [round(float(v), 4) for v in mae_raw],
            "mae_after": [round(float(v), 4) for v in mae_gain],
            "time_s": round(time.perf_counter() - t0, 1)}


def l1_gain(truth: np.ndarray, pred: np.ndarray) -> float:
    """argmin_g sum |truth - g pred|: the median of truth/pred weighted by |pred|."""
    keep = np.abs(pred) > 1e-9
    if not keep.any():
        return 1.0
    r, w = truth[keep] / pred[keep], np.abs(pred[keep])
    order = np.argsort(r)
    cum = np.cumsum(w[order])
    return float(r[order][np.searchsorted(cum, 0.5 * cum[-1])])


def write_gain(model_path: Path, fit: dict) -> None:
    card_path = Path(model_path).with_suffix(".json")
    card = load_card(model_path)
    card["output_gain"] = fit
    atomic_write(card_path, json.dumps(card, indent=1).encode(), overwrite=True)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--shared", type=Path, required=True, help="folder holding data/em/isbi2012")
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--seed", type=int, default=2026)
    args = ap.parse_args(argv)
    fit = fit_output_gain(args.model, training_textures(args.shared), args.samples, args.seed)
    write_gain(args.model, fit)
    print(f"{args.model}: output gain {fit['values']} (MAE {fit['mae_before']} -> {fit['mae_after']}, "
          f"{fit['samples']} pairs, {fit['time_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
