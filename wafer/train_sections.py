"""Train the section-detection U-Net on simulated overviews (seed ch. 2 recipe).

AdamW (lr 1e-3, weight decay 0.5e-4), StepLR(1000, 0.9), cross-entropy with
class weights (1, 2) and ignore label 2, seed augmentations, 4 um overviews.
Everything derives from `seed` and the fixed wafer seeds, so a run is
reproducible up to CPU floating-point non-determinism.

    python main.py train sections --steps 1500 --out models/sections_unet.pt --seed 0 --filters 8
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import typer

from wafer import detect_data as dd
from wafer.detect import _mean_inside, as_unit_float, match_sections, postprocess, predict_proba, resample
from wafer.unet import UNet, build_from_config, count_parameters, fold_batchnorm

# the layout ranges of detect_data's two generators, for the card
NARROW_RANGES = {"section_w_um": [250, 900], "aspect": [0.35, 1.0], "min_h_um": 120, "size_jitter": [0, 0.2],
                 "rotation_deg": [-180, 180], "rotation_jitter_deg": "U(0,20) or 90 (p 0.2)", "spacing_um": [20, 700],
                 "resin_margin_um": [10, 120]}
WIDE_RANGES = {"generator": "wide (detect_data.wide_wafer_params, render looks)",
               "section_w_um": "log-uniform [150, 2000]", "aspect": [0.25, 1.0], "min_h_um": 100,
               "size_jitter": [0, 0.15], "rotation_deg": [-180, 180], "rotation_jitter_deg": "U(0,20) or 90 (p 0.2)",
               "spacing_um": "U(0, 20) (p 1/3) or U(20, 700)", "resin_margin_um": "log-uniform [3, 150]"}
TRAIN_SEEDS_MAX = 5000          # training wafers use seeds [0, n_wafers); validation 5000+; benchmark 10000+
VAL_SEEDS = tuple(range(5000, 5006))


def _atomic_bytes(path: Path, write: Callable[[str], None]) -> None:
    """write(tmp_path) then os.replace: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def build_pool(seeds, n_crops: int, shape, factor: int, log=print, wide: bool = False, milled: bool = False):
    """Rendered training crops at the network pixel size: (images in [0,1], labels);
    ``wide``: the wide generator (detect_data.wide_wafer_params and extra looks);
    ``milled``: partly milled sections as well."""
    imgs, labs = [], []
    t0 = time.time()
    for k, s in enumerate(seeds):
        for ov in dd.sample_overviews(int(s), n_crops, shape, wide=wide, milled=milled):
            img = ov.image.astype(np.float32) / 255
            imgs.append(resample(img, 1 / factor))
            labs.append(dd.downsample_labels(ov.labels, factor))
        if (k + 1) % 8 == 0:
            log(f"  data: {k + 1}/{len(seeds)} wafers rendered ({time.time() - t0:.0f} s)")
    return imgs, labs


def _batch(imgs, labs, rng, patch: int, batch: int, labelled_only: bool = False):
    """`batch` augmented patches, half centred on tissue. With `labelled_only` (sparse
    lab annotations, mostly ignore) the other half is centred on labelled pixels rather
    than anywhere, and all-ignore patches are redrawn: they carry no loss."""
    xs, ys = [], []
    while len(xs) < batch:
        i = int(rng.integers(len(imgs)))
        img, lab = imgs[i], labs[i]
        centre = None
        if rng.random() < 0.5:                      # half the patches centred on tissue
            centre = _centre_on(lab == 1, rng)
        if centre is None and labelled_only:
            centre = _centre_on(lab != dd.IGNORE, rng)
        x, y = dd.augment(img, lab, rng, patch, centre)
        if labelled_only and not (y != dd.IGNORE).any():
            continue
        xs.append(x - 0.5)                          # seed: grey values centred to [-0.5, 0.5]
        ys.append(y)
    return torch.from_numpy(np.stack(xs)[:, None]), torch.from_numpy(np.stack(ys).astype(np.int64))


def _centre_on(mask: np.ndarray, rng):
    """A random (x, y) on `mask` (searched on a 4-px lattice, jittered within the cell), or None."""
    yy, xx = np.nonzero(mask[::4, ::4])
    if not len(yy):
        return None
    j = int(rng.integers(len(yy)))
    return (xx[j] * 4 + rng.uniform(0, 4), yy[j] * 4 + rng.uniform(0, 4))


def validation_set(seeds=VAL_SEEDS, shape=(1024, 1024), wide: bool = False):
    """Held-out overviews (4 um, full resolution) with truth rectangles."""
    return [ov for s in seeds for ov in dd.sample_overviews(int(s), 1, shape, wide=wide)]


def evaluate(model: UNet, overviews, net_pixel_um: float, unlabelled_neutral: bool = False) -> dict:
    """Pixel precision/recall/IoU on annotated pixels and detection P/R/F1/mean IoU.
    An overview whose `truth` is None (no outlines) counts for the pixel scores only; the
    section scores are None when no overview has truth.  `unlabelled_neutral`: sparse
    annotation leaves sections unlabelled, so a detection lying mostly on ignore pixels
    is not scored (neither right nor wrong)."""
    fused = fold_batchnorm(model).eval()
    tp = fp = fn = 0
    agg = {"tp": 0, "fp": 0, "fn": 0, "ious": []}
    scored = False
    for ov in overviews:
        img = as_unit_float(ov.image)
        small = resample(img, ov.pixel_um / net_pixel_um)
        prob = np.clip(resample(predict_proba(small, fused), 1.0, shape=img.shape), 0, 1)
        pred, lab = prob > 0.5, ov.labels
        tp += int((pred & (lab == 1)).sum())
        fp += int((pred & (lab == 0)).sum())
        fn += int((~pred & (lab == 1)).sum())
        if ov.truth is None:
            continue
        scored = True
        dets = postprocess(prob, ov.pixel_um, ov.origin_um)
        if unlabelled_neutral:
            known = (lab != dd.IGNORE).astype(np.float32)
            org = np.asarray(ov.origin_um, float)
            dets = [d for d in dets
                    if _mean_inside(known, (np.asarray(d["polygon_um"]) - org) / ov.pixel_um) >= 0.5]
        m = match_sections(dets, ov.truth)
        for k in ("tp", "fp", "fn"):
            agg[k] += m[k]
        agg["ious"] += m["ious"]
    p = agg["tp"] / max(1, agg["tp"] + agg["fp"])
    r = agg["tp"] / max(1, agg["tp"] + agg["fn"])
    out = {"pixel_precision": tp / max(1, tp + fp), "pixel_recall": tp / max(1, tp + fn),
           "pixel_iou": tp / max(1, tp + fp + fn), "sections": agg["tp"] + agg["fn"],
           "precision": p, "recall": r, "f1": 2 * p * r / max(1e-12, p + r),
           "mean_iou": float(np.mean(agg["ious"])) if agg["ious"] else 0.0}
    if not scored:
        out.update({k: None for k in ("sections", "precision", "recall", "f1", "mean_iou")})
    return out


def load_trainable(path: str | Path) -> tuple[UNet, float]:
    """A weights file as a trainable U-Net (batch norm not folded) and its net pixel size."""
    ck = torch.load(str(path), map_location="cpu", weights_only=True)
    model = build_from_config(ck["config"])
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ck["state_dict"].items()})
    return model, float(ck.get("net_pixel_um", 4.0))


def train(steps: int = 1500, out: str | Path = "models/sections_unet.pt", seed: int = 0, start_filters: int = 8,
          depth: int = 5, patch: int = 96, batch: int = 8, log_every: int = 25, net_pixel_um: float = 12.0,
          n_wafers: int = 48, crops_per_wafer: int = 2, max_minutes: Optional[float] = None,
          fp16: bool = False, threads: int = 2, val_every: int = 0, crop_px: int = 768,
          val_seeds=VAL_SEEDS, val_px: int = 1024, init: Optional[str | Path] = None, wide: bool = False,
          milled: bool = False, restart_lr: bool = False, log: Callable[[str], None] = print) -> dict:
    """Train, validate on held-out simulated wafers, write weights + JSON card (atomically).
    `init`: continue from earlier weights (its card's steps are added; the step-LR schedule resumes,
    or starts again with `restart_lr`, as it does when the net pixel size changes)."""
    if not 0 < n_wafers <= TRAIN_SEEDS_MAX:
        raise ValueError(f"n_wafers must be in 1..{TRAIN_SEEDS_MAX}")
    factor = net_pixel_um / dd.PIXEL_UM
    if abs(factor - round(factor)) > 1e-9 or factor < 1:
        raise ValueError("net_pixel_um must be an integer multiple of 4 um")
    factor = int(round(factor))
    out = Path(out)
    t_start = time.time()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 2024])
    crop = (crop_px, crop_px)
    log(f"rendering {n_wafers} training wafers x {crops_per_wafer} crops of {crop} px at {dd.PIXEL_UM} um")
    imgs, labs = build_pool(range(n_wafers), crops_per_wafer, crop, factor, log, wide=wide, milled=milled)
    val = validation_set(val_seeds, (val_px, val_px), wide=wide)
    t_data = time.time() - t_start
    model = UNet(depth=depth, start_filters=start_filters)
    model = model.to(memory_format=torch.channels_last)     # oneDNN is much faster on thin layers
    n_params = count_parameters(model)
    log(f"U-Net depth {depth}, {start_filters} filters: {n_params:,} parameters; data {t_data:.0f} s")
    prior_steps, prior_time, sessions, schedule_from = 0, 0.0, [], 0
    if init is not None:
        loaded, init_px = load_trainable(init)
        if loaded.config != model.config:
            raise ValueError(f"{init}: its architecture differs from the requested one")
        model.load_state_dict(loaded.state_dict())
        prev = Path(init).with_suffix(".json")
        if prev.is_file():
            pc = json.loads(prev.read_text())
            prior_steps, prior_time = int(pc.get("steps", 0)), float(pc.get("training_time_s", 0.0))
            sessions = pc.get("sessions") or [{k: pc.get(k) for k in ("steps", "batch", "patch", "training_time_s",
                                                                     "data_time_s", "s_per_step", "date")}]
        rng = np.random.default_rng([seed, 2024, prior_steps])     # fresh patches, still reproducible
        log(f"continuing from {init} ({prior_steps} steps)")
        if init_px != float(net_pixel_um):     # features seen at another scale: the schedule starts again
            log(f"  its net pixel was {init_px:g} um, now {net_pixel_um:g} um: learning rate schedule restarted")
            schedule_from = 0
        elif restart_lr:
            log("  learning rate schedule restarted (--restart-lr)")
        else:
            schedule_from = prior_steps
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.5e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1000, gamma=0.9)
    with warnings.catch_warnings():          # fast-forward the schedule (warns: no optimizer step yet)
        warnings.simplefilter("ignore")
        for _ in range(schedule_from):
            sched.step()
    crit = torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0]), ignore_index=dd.IGNORE)
    history, run_loss, t0, done = [], [], time.time(), 0
    for step in range(1, steps + 1):
        model.train()
        x, y = _batch(imgs, labs, rng, patch, batch)
        x = x.contiguous(memory_format=torch.channels_last)
        loss = crit(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        run_loss.append(loss.item())
        done = step
        if step % log_every == 0 or step == steps:
            sps = (time.time() - t0) / step
            log(f"step {step:5d}  loss {np.mean(run_loss):.4f}  lr {sched.get_last_lr()[0]:.2e}  {sps:.2f} s/step")
            history.append({"step": step, "loss": round(float(np.mean(run_loss)), 5)})
            run_loss = []
        if val_every and step % val_every == 0 and step < steps:
            v = evaluate(model, val, net_pixel_um)
            log(f"  val @ {step}: F1 {v['f1']:.3f}  mean IoU {v['mean_iou']:.3f}  pixel IoU {v['pixel_iou']:.3f}")
        if max_minutes is not None and (time.time() - t_start) / 60 > max_minutes:
            log(f"time budget of {max_minutes} min reached at step {step}")
            break
    t_train = time.time() - t0 + prior_time
    metrics = evaluate(model, val, net_pixel_um)
    log("validation: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    dtype = torch.float16 if fp16 else torch.float32
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    ckpt = {"config": model.config, "state_dict": state, "net_pixel_um": float(net_pixel_um)}
    _atomic_bytes(out, lambda p: torch.save(ckpt, p))
    card = {
        "model": "2-D U-Net, tissue vs background (seed ch. 2)",
        "architecture": {**model.config, "blocks": depth, "activation": "ReLU", "normalisation": "batch norm",
                         "padding": "same", "upsampling": "2x2 transposed conv", "input": "grey, x/255 - 0.5"},
        "start_filters": start_filters, "parameters": n_params,
        "precision": "float16 weights (computed in float32)" if fp16 else "float32",
        "file_bytes": out.stat().st_size,
        "net_pixel_um": net_pixel_um, "overview_pixel_um": dd.PIXEL_UM,
        "training_data": {
            "source": "devices.sim.wafer.VirtualWafer + wafer.detect_data artefacts",
            "wafer_seeds": f"0..{n_wafers - 1}", "crops_per_wafer": crops_per_wafer, "crop_px": list(crop),
            **(WIDE_RANGES if wide else NARROW_RANGES), "sections": "fraction U(0.3,1) of what fits",
            "artefacts": ["mosaic tile gain + vignette", "detector gain/offset/noise", "blur", "material contrast",
                          "debris, blank resin chips, tissue-grey crumbs", "folds/knife marks", "sim dust, scratches"]
            + (["tissue contrast x U(0.25, 2)", "illumination ramp +-U(0.05, 0.3) (p 0.4)",
                "inverted contrast (p 0.25)"] if wide else ["tissue contrast x U(0.6, 2)"])
            + (["partly milled sections: on 30 % of crops, U(0.2, 1) of the sections milled 20-70 % "
                "through behind a wavy front to within U(0, 30) % of the wafer signal (labelled tissue)"]
               if milled else []),
            "labels": f"1 tissue, 0 = tissue dilated {dd.BG_DILATION}x minus tissue (+ sparse far blobs and "
                      "debris), 2 ignore",
            "augmentation": "shift-scale-rotate p0.95, flips, elastic s2 a5, gamma, brightness/contrast, noise 0.1",
        },
        "validation_seeds": list(val_seeds), "validation_crop_px": val_px, "benchmark_seeds": ">= 10000 (never trained on)",
        "patch": patch, "batch": batch, "steps": prior_steps + done, "seed": seed,
        "continued_from": None if init is None else {"weights": str(init), "steps": prior_steps},
        "sessions": sessions + [{"steps": done, "batch": batch, "patch": patch, "training_time_s": round(
            t_train - prior_time, 1), "data_time_s": round(t_data, 1), "date": _dt.datetime.now().isoformat(
            timespec="seconds")}],
        "optimizer": "AdamW lr 1e-3 weight decay 0.5e-4", "scheduler": "StepLR step 1000 gamma 0.9",
        "loss": "cross-entropy, class weights (1, 2), ignore label 2",
        "validation": {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()},
        "loss_history": history[-40:],
        "training_time_s": round(t_train, 1), "data_time_s": round(t_data, 1),
        "s_per_step": round((time.time() - t0) / max(1, done), 3),
        "date": _dt.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
        "python": platform.python_version(), "threads": threads,
        "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),      # loaders refuse weights that differ
        "why_this_size": (f"{start_filters} filters x {depth} blocks ({n_params / 1e6:.2f} M parameters) instead of the "
                          "seed's 64 (31 M, 120 MB): trains in < 35 min and infers a 14x19-tile overview in "
                          "< 10 s on a 2-core CPU, and the file stays far below 20 MB; the task (high-contrast "
                          f"sections) does not need more capacity. The net runs at {net_pixel_um:g} um pixels "
                          f"(overview downsampled {factor}x) for the same reason; start_filters=64, "
                          "net_pixel_um=4 gives the seed configuration."),
    }
    _atomic_bytes(out.with_suffix(".json"),
                  lambda p: Path(p).write_text(json.dumps(card, indent=1) + "\n", encoding="utf-8"))
    log(f"wrote {out} ({card['file_bytes'] / 1e6:.2f} MB) and {out.with_suffix('.json')}")
    return card


def train_sections_cmd(
    steps: int = typer.Option(1500, "--steps", help="training iterations"),
    out: Path = typer.Option(Path("models/sections_unet.pt"), "--out", help="weights file (+ .json card)"),
    seed: int = typer.Option(0, "--seed"),
    filters: int = typer.Option(8, "--filters", help="start filters (seed: 64)"),
    depth: int = typer.Option(5, "--depth", help="U-Net blocks (seed: 5)"),
    patch: int = typer.Option(96, "--patch", help="training patch side at the network pixel size"),
    batch: int = typer.Option(8, "--batch"),
    log_every: int = typer.Option(25, "--log-every"),
    net_pixel_um: float = typer.Option(12.0, "--net-pixel-um", help="network pixel size (seed: 4)"),
    wafers: int = typer.Option(48, "--wafers", help="simulated training wafers"),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="stop training after this wall time"),
    fp16: bool = typer.Option(False, "--fp16", help="store float16 weights"),
    threads: int = typer.Option(2, "--threads"),
    init: Optional[Path] = typer.Option(None, "--init", help="continue training from these weights"),
    val_every: int = typer.Option(0, "--val-every", help="validate every N steps (0: only at the end)"),
    wide: bool = typer.Option(False, "--wide", help="the wide generator: 150 µm-2 mm sections up to 4:1, "
                              "packed edge to edge, thin resin rims, faint/inverted contrast, gradients"),
    milled: bool = typer.Option(False, "--milled", help="also partly milled sections (two contrasts in one "
                                "section; labelled whole)"),
    restart_lr: bool = typer.Option(False, "--restart-lr", help="with --init: start the learning-rate "
                                    "schedule again (new data) instead of resuming it"),
) -> None:
    """Train the section-detection U-Net on simulated wafers; writes weights and a JSON card."""
    train(steps=steps, out=out, seed=seed, start_filters=filters, depth=depth, patch=patch, batch=batch,
          log_every=log_every, net_pixel_um=net_pixel_um, n_wafers=wafers, max_minutes=max_minutes,
          fp16=fp16, threads=threads, val_every=val_every, init=init, wide=wide, milled=milled,
          restart_lr=restart_lr,
          log=lambda s: print(s, flush=True))
