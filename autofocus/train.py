"""Training of DeepFocus / DeepScore on simulated pairs, and fine-tuning
(recalibration) on caller-provided pairs; exports TorchScript + a JSON card.

Seed recipe (ch. 3): AdamW, L1 loss, StepLR ×0.99 every 2000 steps over
~5·10⁵ steps (patch-score model), i.e. 250 decays in a run. A CPU budget
allows a few thousand steps, so the schedule is scaled to keep the same
total decay: 250 decays of ×0.99 spread over the given number of steps.
Fine-tuning uses the seed's ×0.95 every 1000 of at most 50 000 steps, scaled
the same way (50 decays per run).
"""
from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import io
import json
import os
import subprocess
import time
import zipfile
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
import typer

from common.atomic import atomic_write
from autofocus.data import Augmenter, DataConfig, Prefetcher, ReplayPool, SampleStream, samples_to_tensors
from autofocus.models import (COLUMN_INPUT_CARD, COLUMN_INPUTS, VARIANTS, UnverifiedModel, Variant, batch_loss, build,
                              count_parameters, export_module, read_card, read_verified_model, sha256_bytes,
                              takes_column)

SEED_DECAYS = 250            # 0.99^250 ≈ 0.08 of the initial rate at the end
FINETUNE_DECAYS, FINETUNE_GAMMA = 50, 0.95
DEFAULT_N_PATCHES = {"scalar": 1, "deepscore": 1, "patchscore": 4, "pixelscore": 2}


def other_training_running() -> bool:
    """Another process with 'train' in its command line (the shared 2-core box)."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    me = os.getpid()
    for line in out.splitlines()[1:]:
        pid, _, args = line.strip().partition(" ")
        if pid.isdigit() and int(pid) != me and "train" in args and "ps -eo" not in args and "pytest" not in args:
            return True
    return False


def pick_threads(threads: Optional[int]) -> int:
    if threads:
        return threads
    return 1 if other_training_running() else min(2, os.cpu_count() or 1)


def _is_torchscript(path: str | Path) -> bool:
    """A TorchScript archive (a zip with constants.pkl), which torch.load would hand to torch.jit.load."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def load_weights(model: torch.nn.Module, path: str | Path, features_only: bool = False) -> None:
    """Initialise from a shipped TorchScript model (or a plain state dict).
    features_only: take just the convolution stack, which is the same for
    every DeepFocus patch size (only the FC input differs)."""
    try:
        data, _card = read_verified_model(path)
    except UnverifiedModel as refused:
        # a plain state dict is safe without a card (weights_only loads no code); TorchScript is not
        if _is_torchscript(path):
            raise refused from None
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception:
            raise refused from None
    else:
        try:
            sd = torch.jit.load(io.BytesIO(data), map_location="cpu").state_dict()
        except RuntimeError:
            sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    sd = {(k[4:] if k.startswith("net.") else k): v for k, v in sd.items()}
    if features_only:
        missing = model.load_state_dict({k: v for k, v in sd.items() if k.startswith("features.")}, strict=False)
        if any(k.startswith("features.") for k in missing.missing_keys):
            raise ValueError(f"{path}: convolution stack does not match")
        return
    # a column-conditioned network (ColumnDeepFocusNet) starts from a plain one: its zero-initialised
    # column maps are the only weights that file lacks; from one told fewer column inputs, the
    # maps of the inputs it lacks start at zero (it then reads as that model did)
    own = model.state_dict()
    for k, w in list(sd.items()):
        if k.startswith("column.") and k in own and w.dim() == 2 and w.shape[0] == own[k].shape[0] \
                and w.shape[1] < own[k].shape[1]:
            sd[k] = torch.cat([w, torch.zeros(w.shape[0], own[k].shape[1] - w.shape[1], dtype=w.dtype)], 1)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:           # shapes differ
        raise ValueError(f"{path}: weights do not match this network ({e})") from None
    if unexpected or any(not k.startswith("column.") for k in missing):
        raise ValueError(f"{path}: weights do not match this network (missing {missing}, unexpected {unexpected})")


def freeze_features(model: torch.nn.Module, conv_layers: int = 0) -> list:
    """Recalibration (seed): only the last three fully connected layers learn,
    and the last ``conv_layers`` convolution blocks with them (their batch-norm
    statistics stay frozen: the training loop keeps the stack in eval mode)."""
    for p in model.parameters():
        p.requires_grad_(False)
    if not hasattr(model, "fc"):
        raise ValueError("freeze_all_but_fc needs an image-to-scalar model (with .fc)")
    blocks = list(model.features.layers)
    if not 0 <= conv_layers <= len(blocks):
        raise ValueError(f"trainable_conv_layers must be 0..{len(blocks)}, got {conv_layers}")
    # a column-conditioned network's column maps feed those layers: they learn with them
    head = list(model.fc.parameters()) + (list(model.column.parameters()) if hasattr(model, "column") else [])
    head += [p for b in blocks[len(blocks) - conv_layers:] for p in b.parameters()]
    for p in head:
        p.requires_grad_(True)
    return head


def export(model: torch.nn.Module, variant: str, out: Path, card: dict) -> None:
    """TorchScript + card (with the file's sha256), each written atomically
    (temp + os.replace). The model's train/eval mode is restored (checkpoints
    are written mid-training)."""
    was = model.training
    model.eval()
    try:
        cpu = model if _device_of(model).type == "cpu" else copy.deepcopy(model).cpu()
        scripted = torch.jit.script(export_module(variant, cpu))
    finally:
        model.train(was)
    out = Path(out)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    # the card pins the exact bytes written: inference loads a model only if they still match
    card["sha256"] = sha256_bytes(buf.getvalue())
    atomic_write(out, buf.getvalue(), overwrite=True)
    atomic_write(out.with_suffix(".json"), json.dumps(card, indent=1, default=str).encode(), overwrite=True)


@torch.no_grad()
def evaluate(model: torch.nn.Module, kind: str, x: torch.Tensor, y: torch.Tensor,
             column: Optional[torch.Tensor] = None, chunk: int = 8) -> dict:
    """Mean absolute error of the aggregated predictions (eval mode)."""
    was = model.training
    model.eval()
    dev, preds = _device_of(model), []
    for i in range(0, len(x), chunk):
        col = None if column is None else column[i:i + chunk].to(dev)
        preds.append(batch_loss(kind, model, x[i:i + chunk].to(dev), y[i:i + chunk].to(dev), col)[1].cpu())
    model.train(was)
    err = (torch.cat(preds) - y).abs()
    if kind == "deepscore":
        return {"mae_wd_um": float(err[:, 0].mean()), "mae_stig": float(err[:, 1].mean())}
    return {"mae_wd_um": float(err[:, 0].mean()), "mae_stig": float(err[:, 1:].mean())}


def _fit(model, kind: str, next_batch: Callable, val: tuple, steps: int, lr: float, params: list,
         decays: int, gamma: float, log_every: int, max_seconds: Optional[float], log: Callable,
         on_checkpoint: Optional[Callable] = None, frozen_features: bool = False) -> dict:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, round(steps / decays)), gamma=gamma)
    history, losses, t0, t_last = [], [], time.perf_counter(), time.perf_counter()
    done = 0
    model.train()
    if frozen_features:
        model.features.eval()        # keep batch-norm statistics of the frozen stack
    dev = _device_of(model)
    for step in range(1, steps + 1):
        x, y, col = next_batch()
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        x = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
        loss, _ = batch_loss(kind, model, x, y, None if col is None else col.to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        done = step
        last = step == steps or (max_seconds is not None and time.perf_counter() - t0 > max_seconds)
        if step % log_every == 0 or last or step == 1:
            now = time.perf_counter()
            n = step % log_every or log_every
            row = {"step": step, "loss": float(np.mean(losses[-n:])), **evaluate(model, kind, *val),
                   "s_per_step": (now - t_last) / (1 if step == 1 else n), "lr": sched.get_last_lr()[0],
                   "elapsed_s": now - t0}
            t_last = now
            history.append(row)
            log(f"step {step:6d}  loss {row['loss']:.4f}  val MAE wd {row['mae_wd_um']:.3f} µm  "
                f"stig {row['mae_stig']:.3f}  {row['s_per_step']:.2f} s/step  lr {row['lr']:.2e}")
            if on_checkpoint is not None and step != steps and not last:
                on_checkpoint(history)
            model.train()               # evaluate/export switch to eval mode
            if frozen_features:
                model.features.eval()
        if last:
            break
    return {"history": history, "losses": losses, "steps_done": done, "train_s": time.perf_counter() - t0}


def _card(variant: str, v: Variant, cfg: DataConfig, res: dict, batch: int, lr: float, seed: int,
          n_params: int, extra: dict) -> dict:
    final = res["history"][-1] if res["history"] else {}
    return {
        "variant": variant, "kind": v.kind, "patch_size": v.patch, "n_inputs": v.n_inputs,
        "outputs": (["abs_wd_um", "stig_norm_" + cfg.stig_norm] if v.kind == "deepscore" else
                    ["d_wd_um", "d_stig_x", "d_stig_y"] + (["score"] if v.kind == "patchscore" else [])),
        "input_order": "image" if v.kind == "deepscore" else "[img at wd+perturbation, img at wd-perturbation]",
        "normalisation": "x/127.5 - 1 (8-bit grey to [-1, 1])",
        "pixel_size_nm": cfg.pixel_nm, "perturbation_um": cfg.perturbation_um,
        "n_patches_train": cfg.n_patches, "parameters": n_params, "training_data": cfg.card(),
        **({"column_input": COLUMN_INPUT_CARD, "column_inputs": COLUMN_INPUTS} if takes_column(variant) else {}),
        "steps": res["steps_done"], "batch": batch, "seed": seed,
        "optimizer": {"name": "AdamW", "lr": lr, "weight_decay": 1e-2},
        "scheduler": {"name": "StepLR", "gamma": extra.get("gamma", 0.99),
                      "step_size": max(1, round(res["steps_done"] / extra.get("decays", SEED_DECAYS)))},
        "loss": "L1" if v.kind in ("scalar", "deepscore") else "(1-0.25)*L1(weighted mean) + L1(individual)",
        "validation": {k: final.get(k) for k in ("mae_wd_um", "mae_stig")},
        "training_time_s": round(res["train_s"], 1),
        "s_per_step": round(res["train_s"] / max(1, res["steps_done"]), 3),
        "torch": torch.__version__, "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "log": res["history"], **{k: v_ for k, v_ in extra.items() if k not in ("gamma", "decays")},
    }


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def pick_device(device: Optional[str]) -> torch.device:
    """The given device, else CUDA when present, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _setup(variant: str, seed: int, threads: Optional[int], init, freeze_all_but_fc: bool,
           init_features: Optional[str | Path] = None, dropout: float = 0.1, device: Optional[str] = None,
           trainable_conv_layers: int = 0):
    if variant not in VARIANTS:
        raise KeyError(f"unknown variant {variant!r}; known: {', '.join(sorted(VARIANTS))}")
    torch.set_num_threads(pick_threads(threads))
    torch.manual_seed(seed)
    v = VARIANTS[variant]
    model = build(variant, dropout=dropout)
    if init:
        load_weights(model, init)
    elif init_features:
        load_weights(model, init_features, features_only=True)
    model = model.to(pick_device(device), memory_format=torch.channels_last)
    params = (freeze_features(model, trainable_conv_layers) if freeze_all_but_fc
              else [p for p in model.parameters()])
    return v, model, params


def train(variant: str, steps: int, out: str | Path, seed: int = 0, textures: Sequence[str | Path] = (),
          batch: int = 8, lr: float = 1e-3, log_every: int = 50, init: Optional[str | Path] = None,
          freeze_all_but_fc: bool = False, n_patches: Optional[int] = None, max_minutes: Optional[float] = None,
          threads: Optional[int] = None, val_samples: int = 48, data: Optional[dict] = None,
          init_features: Optional[str | Path] = None, dropout: float = 0.1, pool_size: int = 0,
          pool_refresh: int = 4, device: Optional[str] = None, trainable_conv_layers: int = 0,
          log: Callable = print) -> dict:
    """Train ``variant`` on freshly simulated samples; returns the card.

    init: all weights from a model of the same variant (fine-tuning, seed
    recalibration schedule); init_features: only the convolution stack from
    any DeepFocus model (e.g. a fast 128² pre-training), seed schedule.
    dropout: seed 0.1; on a CPU budget 0 learns the stigmation cue several
    times faster (measured: stig starts to fit after ~150 vs >1500 steps).
    trainable_conv_layers: with freeze_all_but_fc, the last N convolution
    blocks learn too (batch-norm statistics kept)."""
    v, model, params = _setup(variant, seed, threads, init, freeze_all_but_fc, init_features, dropout, device,
                              trainable_conv_layers)
    kw = dict(data or {})
    if v.kind == "deepscore":
        kw.setdefault("single_image", True)
        kw.setdefault("microscopes", "broad")
    cfg = DataConfig(patch=v.patch, n_patches=n_patches or DEFAULT_N_PATCHES[v.kind],
                     textures=[str(t) for t in textures], **kw)
    val_stream = SampleStream(dataclasses.replace(cfg, easy_samples=0), seed + 7919, augment=False)
    val = val_stream.batch(val_samples)
    src = SampleStream(cfg, seed, sim=val_stream.sim)
    stream = Prefetcher(ReplayPool(src, pool_size, pool_refresh) if pool_size else src, batch)
    out = Path(out)
    n_params = count_parameters(model)
    log(f"{variant}: {n_params} trainable parameters, {steps} steps, batch {batch}x{cfg.n_patches}, "
        f"{torch.get_num_threads()} threads, {_device_of(model)}, out {out}")
    gamma, decays = (FINETUNE_GAMMA, FINETUNE_DECAYS) if init else (0.99, SEED_DECAYS)
    extra = {"gamma": gamma, "decays": decays, "init": str(init) if init else None,
             "init_features": Path(init_features).name if init_features else None,
             "freeze_all_but_fc": freeze_all_but_fc, "dropout_train": dropout, "device": str(_device_of(model)),
             "trainable_conv_layers": trainable_conv_layers if freeze_all_but_fc else None,
             "replay_pool": {"size": pool_size, "refresh_per_batch": pool_refresh} if pool_size else None}

    def checkpoint(history):
        export(model, variant, out, _card(variant, v, cfg, {"history": history, "steps_done": history[-1]["step"],
                                                            "train_s": history[-1]["elapsed_s"]},
                                          batch, lr, seed, n_params, {**extra, "partial": True}))
    try:
        res = _fit(model, v.kind, stream.next, val, steps, lr, params, decays, gamma, log_every,
                   None if max_minutes is None else max_minutes * 60, log, checkpoint, freeze_all_but_fc)
    finally:
        stream.close()
    card = _card(variant, v, cfg, res, batch, lr, seed, n_params, extra)
    export(model, variant, out, card)
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) and {out.with_suffix('.json').name}")
    return card


def train_on_samples(variant: str, samples: Sequence, steps: int, out: str | Path,
                     init: Optional[str | Path] = None, freeze_all_but_fc: bool = True, seed: int = 0,
                     batch: int = 8, lr: float = 1e-3, log_every: int = 50, n_patches: Optional[int] = None,
                     val_fraction: float = 0.2, pixel_nm: Optional[float] = None,
                     perturbation_um: Optional[float] = None, augment: bool = True,
                     max_minutes: Optional[float] = None, threads: Optional[int] = None,
                     device: Optional[str] = None, log: Callable = print) -> dict:
    """Fine-tune (recalibrate) on given (img_plus, img_minus, target) triples.

    target is the correction (Δwd µm, Δstig x, Δstig y) = −aberration; images
    must already be at the model's pixel size (see the init model's card).
    Without init this trains from scratch on the samples only."""
    v, model, params = _setup(variant, seed, threads, init, freeze_all_but_fc, device=device)
    if v.kind == "deepscore":
        raise ValueError("train_on_samples takes image pairs; DeepScore trains with train()")
    base = read_card(init) if init and Path(init).with_suffix(".json").is_file() else {}
    samples = list(samples)
    if len(samples) < 2:
        raise ValueError("need at least two samples")
    rng = np.random.default_rng([seed, 0xCA1])
    order = rng.permutation(len(samples))
    n_val = max(1, int(round(len(samples) * val_fraction)))
    val_s, train_s = [samples[i] for i in order[:n_val]], [samples[i] for i in order[n_val:]]
    N = n_patches or DEFAULT_N_PATCHES[v.kind]
    cfg = DataConfig(patch=v.patch, n_patches=N, pixel_nm=pixel_nm or base.get("pixel_size_nm", 10.0),
                     perturbation_um=perturbation_um or base.get("perturbation_um", 5.0),
                     procedural_seeds=(), augment=augment)
    aug = Augmenter(cfg) if augment else None
    # no column input: a model fine-tuned on one column's pairs reads that column's µm (no alpha_ref)
    val = (*samples_to_tensors(val_s, v.patch, N, np.random.default_rng([seed, 0xCA2])), None)

    def next_batch():
        pick = rng.integers(0, len(train_s), batch)
        return (*samples_to_tensors([train_s[i] for i in pick], v.patch, N, rng, aug), None)
    gamma, decays = (FINETUNE_GAMMA, FINETUNE_DECAYS) if init else (0.99, SEED_DECAYS)
    res = _fit(model, v.kind, next_batch, val, steps, lr, params, decays, gamma, log_every,
               None if max_minutes is None else max_minutes * 60, log, None, freeze_all_but_fc)
    card = _card(variant, v, cfg, res, batch, lr, seed, count_parameters(model),
                 {"gamma": gamma, "decays": decays, "init": str(init) if init else None,
                  "freeze_all_but_fc": freeze_all_but_fc, "recalibration_samples": len(samples),
                  "recalibration_val_samples": n_val})
    card["training_data"] = {"source": "caller-provided pairs", "n_train": len(train_s), "n_val": n_val,
                             "base_model_training_data": base.get("training_data")}
    export(model, variant, Path(out), card)
    log(f"wrote {out}")
    return card


def train_deepfocus_cmd(
    variant: str = typer.Option("deepfocus-patchscore-256", "--variant", help="one of autofocus.models.VARIANTS"),
    steps: int = typer.Option(2000, "--steps", min=1),
    out: Path = typer.Option(..., "--out", help="TorchScript output (.pt); the card goes next to it (.json)"),
    seed: int = typer.Option(0, "--seed"),
    textures: Optional[List[Path]] = typer.Option(None, "--textures", help="EM texture image(s); repeat. "
                                                  "Default: procedural specimen only"),
    batch: int = typer.Option(8, "--batch", min=1),
    lr: float = typer.Option(1e-3, "--lr"),
    log_every: int = typer.Option(50, "--log-every", min=1),
    n_patches: Optional[int] = typer.Option(None, "--n-patches", help="patch pairs per sample (score models)"),
    init: Optional[Path] = typer.Option(None, "--init", help="start from this TorchScript model"),
    freeze_all_but_fc: bool = typer.Option(False, "--freeze-all-but-fc", help="fine-tune the 3 FC layers only"),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="stop and export after this long"),
    threads: Optional[int] = typer.Option(None, "--threads", help="default: 1 if another training runs, else 2"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: CUDA when present)"),
    data: Optional[Path] = typer.Option(None, "--data", help="pairs from `autofocus collect` (a real or simulated "
                                        "microscope): train on them instead of simulated pairs; with --init the "
                                        "variant and pixel size are the init model's"),
) -> None:
    """Train a DeepFocus / DeepScore variant on the simulator, or on pairs
    collected at a microscope (--data), and export it."""
    if data is not None:
        _train_on_collected(data, variant, steps, out, seed, batch, lr, log_every, init, freeze_all_but_fc,
                            max_minutes, threads, device)
        return
    for t in textures or []:
        if not t.is_file():
            typer.echo(f"error: --textures {t}: no such file", err=True)
            raise typer.Exit(2)
    if variant not in VARIANTS:
        typer.echo(f"error: unknown variant {variant!r}; known: {', '.join(sorted(VARIANTS))}", err=True)
        raise typer.Exit(2)
    card = train(variant, steps, out, seed=seed, textures=list(textures or []), batch=batch, lr=lr,
                 log_every=log_every, init=init, freeze_all_but_fc=freeze_all_but_fc, n_patches=n_patches,
                 max_minutes=max_minutes, threads=threads, device=device, log=lambda s: typer.echo(s))
    val = card["validation"]
    typer.echo(f"done: val MAE wd {val['mae_wd_um']:.3f} µm, stig {val['mae_stig']:.3f}, "
               f"{card['training_time_s']:.0f} s")


def _train_on_collected(data: Path, variant: str, steps: int, out: Path, seed: int, batch: int, lr: float,
                        log_every: int, init: Optional[Path], freeze_all_but_fc: bool,
                        max_minutes: Optional[float], threads: Optional[int], device: Optional[str]) -> None:
    from autofocus.collect import DatasetError, load_pairs, pairs_at_pixel

    if out.exists():
        typer.echo(f"error: --out {out} exists; refusing to overwrite", err=True)
        raise typer.Exit(2)
    if init is not None and not init.is_file():
        typer.echo(f"error: --init {init}: no such file", err=True)
        raise typer.Exit(2)
    try:
        triples, manifest, _ = load_pairs(data)
    except DatasetError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    st = manifest["settings"]
    data_px = st["pixel_nm"] * 1e-9
    if init is not None:
        if not init.with_suffix(".json").is_file():
            typer.echo(f"error: --init {init}: no model card {init.with_suffix('.json').name} beside it", err=True)
            raise typer.Exit(2)
        card = read_card(init)
        variant = card["variant"]
        model_px = float(card.get("pixel_size_nm", st["pixel_nm"])) * 1e-9
    else:
        if VARIANTS.get(variant) is None or VARIANTS[variant].kind == "deepscore":
            typer.echo(f"error: --variant {variant!r}: a DeepFocus variant is needed for image pairs", err=True)
            raise typer.Exit(2)
        model_px = data_px
    typer.echo(f"{len(triples)} pairs from {data} ({manifest.get('sem', 'unknown SEM')}), "
               f"{st['pixel_nm']:g} nm -> model {model_px * 1e9:g} nm")
    card = train_on_samples(variant, pairs_at_pixel(triples, data_px, model_px), steps, out, init=init,
                            freeze_all_but_fc=freeze_all_but_fc, seed=seed, batch=batch, lr=lr,
                            log_every=log_every, pixel_nm=model_px * 1e9, perturbation_um=st["perturbation_um"],
                            max_minutes=max_minutes, threads=threads, device=device, log=lambda s: typer.echo(s))
    val = card["validation"]
    typer.echo(f"done: val MAE wd {val['mae_wd_um']:.3f} µm, stig {val['mae_stig']:.3f}")
