"""Fine-tune the section U-Net on a lab's own annotated overviews (`wafer annotate`).

Seed ch. 2 trained on sparse napari annotations of the real wafer overview: 1 tissue,
0 background (drawn, plus the automatic dilated ring around tissue), 2 ignore.  The
shipped weights were trained on simulated overviews instead; a lab whose overviews look
different (another detector, inverted contrast, other staining) adapts them here with the
same loss conventions as wafer/train_sections.py (cross-entropy, class weights (1, 2),
ignore label 2, the seed's augmentations), starting from the given weights.

Validation: the last `holdout` fraction of the columns of every overview is cut off
before training (neither its pixels nor its labels are ever trained on) and scored
before and after: pixel IoU of tissue on labelled pixels, and, where the annotation's
polygons JSON has tissue outlines there, section F1 / mean IoU (detect_sections'
post-processing + match_sections).  New weights never overwrite anything.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import cv2
import numpy as np
import torch

from common.atomic import atomic_write
from common.geometry import normalise_rect
from wafer import detect_data as dd
from wafer.annotate import load_polygons, polygons_path
from wafer.detect import DEFAULT_MODEL, as_unit_float, resample
from wafer.overview_image import read_overview
from wafer.train_sections import _batch, evaluate, load_trainable
from wafer.unet import count_parameters

# in the working folder: an installed package's own models/ may not be writable
DEFAULT_OUT = Path("sections_unet_lab.pt")
# Fine-tuning, not training from scratch: a third of the seed's initial rate keeps the
# simulator-learnt features while the first layers adapt to the new look.
DEFAULT_LR = 3e-4
HOLDOUT_RULE = ("last {pct:g} % of the columns of each overview (x >= the column given per file) are held "
                "back: neither their pixels nor their labels are trained on; validation predicts on that block "
                "alone. Sections are scored against the polygons JSON's tissue outlines; a section cut by the "
                "block's edge and a detection lying mostly on unlabelled (ignore) pixels are not scored.")


@dataclass
class Annotated:
    """One overview with its sparse label image, at the overview's pixel size."""
    name: str
    image: np.ndarray                       # float32 in [0, 1]
    labels: np.ndarray                      # uint8: 0 background, 1 tissue, 2 ignore
    pixel_um: float
    tissue_polys: Optional[list] = None     # (N, 2) arrays of (x, y) px from the polygons JSON
    files: dict = field(default_factory=dict)


@dataclass
class Block:
    """What evaluate() scores: a held-back block (duck-types detect_data.Overview)."""
    image: np.ndarray
    labels: np.ndarray
    pixel_um: float
    origin_um: tuple = (0.0, 0.0)
    truth: Optional[list] = None            # (id, center um, size um, angle, fully inside) or None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_labels(path: Path) -> np.ndarray:
    """A label image as `wafer annotate` writes it: 2-D, values in {0, 1, 2}."""
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile
        lab = tifffile.imread(str(path))
    else:
        lab = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if lab is None:
        raise ValueError(f"cannot read label image {path}")
    lab = np.squeeze(np.asarray(lab))
    if lab.ndim != 2:
        raise ValueError(f"{path}: a label image must be 2-D (grey), got shape {lab.shape}")
    bad = np.setdiff1d(np.unique(lab), [0, 1, dd.IGNORE])
    if bad.size:
        raise ValueError(f"{path}: label values must be 0 background, 1 tissue, 2 ignore (as `wafer annotate` "
                         f"writes them); found {bad[:5].tolist()}")
    return lab.astype(np.uint8)


def load_annotated(overview: Path, labels: Path, pixel_um: float) -> Annotated:
    """Overview + label image (+ `<labels stem>.polygons.json` beside it, if there)."""
    overview, labels = Path(overview), Path(labels)
    if not pixel_um > 0:
        raise ValueError(f"pixel size {pixel_um} um: must be > 0")
    img = as_unit_float(read_overview(overview))
    lab = read_labels(labels)
    if lab.shape != img.shape:
        raise ValueError(f"{labels}: label image is {lab.shape[1]} x {lab.shape[0]} px but overview {overview} is "
                         f"{img.shape[1]} x {img.shape[0]} px (labels must be drawn on that overview)")
    files = {"overview": str(overview), "overview_sha256": file_sha256(overview),
             "labels": str(labels), "labels_sha256": file_sha256(labels), "pixel_um": float(pixel_um),
             "shape_px": [int(s) for s in img.shape]}
    polys = None
    pj = polygons_path(labels)
    if pj.is_file():
        polys = load_polygons(pj)[0]
        files.update({"polygons": str(pj), "polygons_sha256": file_sha256(pj)})
    files["labelled_px"] = {"tissue": int((lab == 1).sum()), "background": int((lab == 0).sum())}
    return Annotated(overview.name, img, lab, float(pixel_um), polys, files)


# ---------------------------------------------------------------- resampling and split
def net_factor(pixel_um: float, net_pixel_um: float) -> tuple[float, bool]:
    """(net / overview pixel size, whether that is a whole number)."""
    f = net_pixel_um / pixel_um
    return f, f >= 1 and abs(f - round(f)) < 1e-6


def to_net(img: np.ndarray, lab: np.ndarray, pixel_um: float, net_pixel_um: float):
    """Image (area averaging) and labels at the network's pixel size.  Whole-number
    factors use detect_data.downsample_labels, the shipped model's own rule (ignore where
    most of a block is ignore, else the tissue/background majority, so boundaries keep
    their side); other factors take labels by nearest neighbour, which keeps 0/1/2."""
    f, whole = net_factor(pixel_um, net_pixel_um)
    if whole:
        k = int(round(f))
        h, w = lab.shape[0] // k * k, lab.shape[1] // k * k
        return resample(img[:h, :w], 1 / k), dd.downsample_labels(lab[:h, :w], k)
    small = resample(img, 1 / f)
    return small, cv2.resize(lab, (small.shape[1], small.shape[0]), interpolation=cv2.INTER_NEAREST)


def holdout_column(width: int, holdout: float, pixel_um: float, net_pixel_um: float, min_net_px: int = 16) -> int:
    """First held-back column: the last `holdout` of the width, on the resampling grid."""
    f, whole = net_factor(pixel_um, net_pixel_um)
    col = int(round(width * (1 - holdout)))
    if whole:
        col = col // int(round(f)) * int(round(f))
    need = int(math.ceil(min_net_px * max(f, 1.0)))
    if col < need or width - col < need:
        raise ValueError(f"overview {width} px wide: holdout {holdout:g} leaves {col} px to train on and "
                         f"{width - col} to validate on; each needs >= {need} px ({min_net_px} network pixels)")
    return col


def truth_in_block(polys, col: int, shape, pixel_um: float) -> list:
    """Tissue outlines (overview px) -> match_sections truth in the block starting at
    column `col` (its pixel (0, 0) at 0 um); outlines cut by the block's edge are partial."""
    h, w = shape
    out = []
    for k, p in enumerate(polys):
        q = np.asarray(p, float) - (col, 0)
        if q[:, 0].max() < 0 or q[:, 0].min() > w - 1 or q[:, 1].max() < 0 or q[:, 1].min() > h - 1:
            continue
        inside = bool(q.min() >= 1 and q[:, 0].max() <= w - 2 and q[:, 1].max() <= h - 2)
        rect = cv2.minAreaRect((q * pixel_um).astype(np.float32))
        out.append((k, *normalise_rect(*rect), inside))
    return out


def split(a: Annotated, holdout: float, net_pixel_um: float):
    """(training image, training labels) at the net pixel size, the held-back Block at
    the overview's pixel size, and the first held-back column."""
    col = holdout_column(a.image.shape[1], holdout, a.pixel_um, net_pixel_um)
    img_t, lab_t = to_net(a.image[:, :col], a.labels[:, :col], a.pixel_um, net_pixel_um)
    vimg, vlab = a.image[:, col:], a.labels[:, col:]
    truth = None
    if a.tissue_polys:
        truth = truth_in_block(a.tissue_polys, col, vlab.shape, a.pixel_um)
        truth = truth or None                 # no outline reaches the block: pixel scores only
    return img_t, lab_t, Block(np.ascontiguousarray(vimg), np.ascontiguousarray(vlab), a.pixel_um, truth=truth), col


# ---------------------------------------------------------------- fine-tuning
def _rounded(d: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}


def _fmt(v: dict) -> str:
    s = f"pixel IoU {v['pixel_iou']:.3f}"
    if v.get("f1") is not None:
        s += f", sections {v['sections']}: F1 {v['f1']:.3f}, mean IoU {v['mean_iou']:.3f}"
    return s


def finetune(overviews: Sequence[Path], labels: Sequence[Path], pixel_um, model: str | Path | None = None,
             out: str | Path | None = None, steps: int = 1000, holdout: float = 0.25, seed: int = 0,
             lr: float = DEFAULT_LR, batch: int = 8, patch: int = 96, threads: Optional[int] = None,
             log_every: int = 50, log: Callable[[str], None] = print) -> dict:
    """Fine-tune `model` (default: the shipped weights) on the annotated overviews, paired
    in order; write the weights to `out` (never overwritten: FileExistsError, nothing
    trained) and a JSON card beside it.  `pixel_um`: one size for all overviews or one per
    overview.  Returns the card."""
    overviews, labels = [Path(p) for p in overviews], [Path(p) for p in labels]
    if not overviews or len(overviews) != len(labels):
        raise ValueError(f"{len(overviews)} overviews but {len(labels)} label images: give one label image per "
                         "overview, in the same order")
    pxs = [float(pixel_um)] * len(overviews) if np.isscalar(pixel_um) else [float(p) for p in pixel_um]
    if len(pxs) != len(overviews):
        raise ValueError(f"{len(pxs)} pixel sizes for {len(overviews)} overviews: give one, or one per overview")
    if not 0 < holdout < 1:
        raise ValueError(f"holdout {holdout}: must be between 0 and 1 (the held-back fraction of columns)")
    if steps < 1 or batch < 1:
        raise ValueError("steps and batch must be >= 1")
    model_path = Path(model) if model is not None else DEFAULT_MODEL
    out = Path(out) if out is not None else DEFAULT_OUT
    card_path = out.with_suffix(".json")
    if out.suffix != ".pt":
        raise ValueError(f"{out}: the weights file must end in .pt (its card is the .json beside it)")
    for p in (out, card_path):
        if p.exists():
            raise FileExistsError(f"{p} exists; refusing to overwrite it (choose another output name)")
    if not model_path.is_file():
        raise FileNotFoundError(f"weights to start from not found: {model_path}")
    t_start = time.time()
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 4242])
    net, net_px = load_trainable(model_path)
    net = net.to(memory_format=torch.channels_last)      # oneDNN is much faster on thin layers
    if patch % net.multiple:
        raise ValueError(f"patch {patch}: must be a multiple of {net.multiple}")
    parent_card = {}
    if model_path.with_suffix(".json").is_file():
        parent_card = json.loads(model_path.with_suffix(".json").read_text())

    imgs, labs, blocks, data = [], [], [], []
    for ov, lb, px in zip(overviews, labels, pxs):
        a = load_annotated(ov, lb, px)
        img_t, lab_t, blk, col = split(a, holdout, net_px)
        if not (lab_t != dd.IGNORE).any():
            log(f"  {a.name}: no labelled pixels left of column {col}: nothing to train on there")
        else:
            imgs.append(img_t)
            labs.append(lab_t)
        blocks.append(blk)
        data.append({**a.files, "holdout_from_column": col,
                     "validation_sections": None if blk.truth is None else sum(t[4] for t in blk.truth)})
        log(f"{a.name}: {a.image.shape[1]} x {a.image.shape[0]} px @ {px:g} um; trains on columns < {col} "
            f"({img_t.shape[1]} x {img_t.shape[0]} px @ {net_px:g} um), validates on the rest")
    if not imgs:
        raise ValueError("no labelled pixels outside the held-back part of any overview: nothing to train on")
    if not any((b.labels == 1).any() for b in blocks):
        log("  warning: the held-back part has no labelled tissue: the pixel IoU there says nothing")
    t_data = time.time() - t_start

    before = evaluate(net, blocks, net_px, unlabelled_neutral=True)
    log(f"before: {_fmt(before)}")
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.5e-4)
    crit = torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0]), ignore_index=dd.IGNORE)
    history, run_loss, t0 = [], [], time.time()
    for step in range(1, steps + 1):
        net.train()
        x, y = _batch(imgs, labs, rng, patch, batch, labelled_only=True)
        loss = crit(net(x.contiguous(memory_format=torch.channels_last)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run_loss.append(loss.item())
        if step % log_every == 0 or step == steps:
            log(f"step {step:5d}  loss {np.mean(run_loss):.4f}  {(time.time() - t0) / step:.2f} s/step")
            history.append({"step": step, "loss": round(float(np.mean(run_loss)), 5)})
            run_loss = []
    t_train = time.time() - t0
    after = evaluate(net, blocks, net_px, unlabelled_neutral=True)
    log(f"after:  {_fmt(after)}")

    state = {k: v.float() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    buf = io.BytesIO()
    torch.save({"config": net.config, "state_dict": state, "net_pixel_um": net_px}, buf)
    blob = buf.getvalue()
    atomic_write(out, blob)                 # no-clobber: fails if `out` appeared meanwhile
    prior_steps = int(parent_card.get("steps", 0) or 0)
    now = _dt.datetime.now().isoformat(timespec="seconds")
    session = {"steps": steps, "batch": batch, "patch": patch, "training_time_s": round(t_train, 1),
               "data_time_s": round(t_data, 1), "date": now, "data": "lab annotations (fine-tuning)"}
    card = {
        "model": parent_card.get("model", "2-D U-Net, tissue vs background (seed ch. 2)"),
        "architecture": parent_card.get("architecture", dict(net.config)),
        "start_filters": net.config["start_filters"], "parameters": count_parameters(net),
        "precision": "float32", "file_bytes": len(blob),
        "net_pixel_um": net_px, "overview_pixel_um": sorted(set(pxs)),
        "training_data": {
            "source": "lab annotations (wafer annotate: napari polygons -> sparse label images)",
            "files": data,
            "labels": f"1 tissue, 0 = drawn background + tissue dilated {dd.BG_DILATION}x minus tissue, 2 ignore",
            "resampling": "image: area averaging to net_pixel_um; labels: detect_data.downsample_labels for a "
                          "whole-number factor, else nearest neighbour (0/1/2 kept)",
            "patches": "centred on tissue (half) or on labelled pixels; all-ignore patches redrawn",
            "augmentation": "shift-scale-rotate p0.95, flips, elastic s2 a5, gamma, brightness/contrast, noise 0.1",
        },
        "holdout": {"fraction": holdout, "rule": HOLDOUT_RULE.format(pct=round(100 * holdout, 2))},
        "patch": patch, "batch": batch, "steps": prior_steps + steps, "seed": seed,
        "continued_from": {"weights": str(model_path), "sha256": file_sha256(model_path), "steps": prior_steps,
                           "validation": parent_card.get("validation")},
        "sessions": list(parent_card.get("sessions") or []) + [session],
        "optimizer": f"AdamW lr {lr:g} weight decay 0.5e-4 (fresh state)", "scheduler": "constant learning rate",
        "loss": "cross-entropy, class weights (1, 2), ignore label 2",
        "validation": {"data": "held-back blocks of the lab overviews (see holdout)", **_rounded(after)},
        "validation_before": {"weights": str(model_path), **_rounded(before)},
        "loss_history": history[-40:],
        "training_time_s": round(t_train, 1), "data_time_s": round(t_data, 1),
        "s_per_step": round(t_train / steps, 3), "date": now, "torch": torch.__version__,
        "python": platform.python_version(), "threads": torch.get_num_threads(),
        "sha256": hashlib.sha256(blob).hexdigest(),
    }
    atomic_write(card_path, (json.dumps(card, indent=1) + "\n").encode("utf-8"))
    log(f"wrote {out} ({len(blob) / 1e6:.2f} MB) and {card_path}")
    return card
