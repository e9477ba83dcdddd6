"""Section detection on a wafer overview: tiled U-Net prediction + the seed's
post-processing (binary closing, Canny, contours, minimum-area rectangles,
connected components, area > 200 px at 4 um, assignment by rectangle centre).

Coordinates: stage um = origin_um + (column, row) * pixel_size_um; angles are
counter-clockwise from stage x of the rectangle's longer side, in [-90, 90).
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import cv2
import numpy as np
import torch
from scipy import ndimage

from common.geometry import normalise_rect
from common.paths import models_dir
from wafer.unet import UNet, build_from_config, fold_batchnorm

DEFAULT_MODEL = models_dir() / "sections_unet.pt"
MIN_AREA_UM2 = 200 * 4.0 ** 2        # the seed's 200 px at 4 um, kept physical for other pixel sizes
# After the seed's post-processing, drop what is not a section (chosen on
# validation wafers, seeds 20001-20040, never on the benchmark's): mean tissue
# probability inside the rectangle, elongation (scratches; sections are at most
# 4:1), and area against the median confident section of the same overview
# (flakes and debris; serial sections share one size).
MIN_CONFIDENCE = 0.65
MAX_ASPECT = 5.0                     # sections come up to 4:1, +-10 % size jitter each way
MIN_RELATIVE_AREA = 0.3
CONFIDENT = 0.8                      # sections that set the median area
CANNY_PAD_PX = 2.0                   # Canny on a binary mask marks one extra pixel row per side;
                                     # calibrated on synthetic rotated rectangles (+2.0 +- 0.4 px)


# ---------------------------------------------------------------- model
def load_model(path: str | Path | None = None) -> UNet:
    """The shipped (or given) weights as an inference model with folded batch norm.
    The model carries `net_pixel_um`: the pixel size it was trained at."""
    path = Path(path) if path is not None else DEFAULT_MODEL
    if not path.is_file():
        raise FileNotFoundError(f"section model not found: {path} (train one: main.py train sections)")
    return _load(str(path.resolve()), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load(path: str, _mtime: int) -> UNet:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = build_from_config(ckpt["config"])
    model.load_state_dict({k: v.float() for k, v in ckpt["state_dict"].items()})
    fused = fold_batchnorm(model)
    fused.net_pixel_um = float(ckpt.get("net_pixel_um", 4.0))
    return fused


def as_unit_float(image: np.ndarray) -> np.ndarray:
    """Grey values in [0, 1]: uint8 / 255 (the seed's 0..255 input), uint16 / 65535 (/ 4095 if 12-bit),
    float taken as 0..1 unless it exceeds 1.5 (then 0..255). Colour is averaged."""
    img = np.asarray(image)
    if img.ndim == 3:
        img = img[..., :3].mean(-1) if img.dtype.kind == "f" else img[..., :3].mean(-1).astype(img.dtype)
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D grey image, got shape {np.shape(image)}")
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255
    if img.dtype == np.uint16:           # 12-bit detectors often write into 16-bit files
        return img.astype(np.float32) / (4095 if int(img.max()) <= 4095 else 65535)
    if img.dtype == bool:
        return img.astype(np.float32)
    f = img.astype(np.float32)
    return f / 255 if np.nanmax(f) > 1.5 else f


def resample(img: np.ndarray, factor: float, shape=None) -> np.ndarray:
    """Resize by `factor` (area averaging when shrinking) or to `shape` (h, w)."""
    h, w = img.shape[:2]
    if shape is None:
        if abs(factor - 1) < 1e-9:
            return img
        shape = (max(1, int(round(h * factor))), max(1, int(round(w * factor))))
    if tuple(shape) == (h, w):
        return img
    interp = cv2.INTER_AREA if shape[0] < h else cv2.INTER_LINEAR
    return cv2.resize(img, (int(shape[1]), int(shape[0])), interpolation=interp)


# ---------------------------------------------------------------- tiled prediction
@torch.inference_mode()
def predict_proba(img01: np.ndarray, model: torch.nn.Module, patch: int = 512, overlap: int = 64,
                  batch: int = 4) -> np.ndarray:
    """Tissue probability for every pixel of `img01` (float in [0, 1]).

    Seamless tiling: the image is reflect-padded by overlap/2, cut into patches
    (at most ~`patch` square) that overlap by `overlap`, and only each patch's
    centre is kept, so every kept pixel has at least overlap/2 of real context;
    tile offsets stay on the pooling grid, so a receptive field smaller than
    overlap/2 gives exactly the full-image result."""
    mult = getattr(model, "multiple", 16)
    h, w = img01.shape
    half = max(1, mult // 2)
    m = -(-(overlap // 2) // half) * half          # margins keep tiles on the pooling grid
    if patch - 2 * m < mult:
        raise ValueError(f"overlap {overlap} too large for patch {patch}")

    def axis(n_px: int) -> tuple[int, int]:
        # fewest tiles of at most `patch`, then the smallest step that covers the axis:
        # less padding than fixed-size tiles (e.g. 3 x 464 instead of 3 x 512 for 1195 px)
        n = -(-n_px // (patch - 2 * m))
        step = -(-(-(-n_px // n)) // mult) * mult
        return n, step

    (ny, sy), (nx, sx) = axis(h), axis(w)
    ph, pw = sy + 2 * m, sx + 2 * m
    x = np.pad(img01.astype(np.float32) - 0.5, ((m, ny * sy - h + m), (m, nx * sx - w + m)), mode="reflect")
    out = np.empty((ny * sy, nx * sx), np.float32)
    boxes = [(i * sy, j * sx) for i in range(ny) for j in range(nx)]
    for k in range(0, len(boxes), batch):
        chunk = boxes[k:k + batch]
        t = torch.from_numpy(np.stack([x[y0:y0 + ph, x0:x0 + pw] for y0, x0 in chunk])[:, None])
        t = t.contiguous(memory_format=torch.channels_last)
        prob = torch.softmax(model(t), 1)[:, 1].numpy()
        for (y0, x0), p in zip(chunk, prob):
            out[y0:y0 + sy, x0:x0 + sx] = p[m:m + sy, m:m + sx]
    return out[:h, :w]


def predict_mirrored(img01: np.ndarray, model: torch.nn.Module, **tile_kw) -> np.ndarray:
    """predict_proba averaged with its answer on the mirror image: chosen on the
    validation and training families of benchmarks/sections.py (F1 0.981 -> 0.984
    and 0.9992 -> 1.0; four flips instead of two lowered validation to 0.967), at
    twice the time."""
    mirror = predict_proba(np.ascontiguousarray(img01[:, ::-1]), model, **tile_kw)[:, ::-1]
    return (predict_proba(img01, model, **tile_kw) + mirror) / 2


def probability_map(image: np.ndarray, pixel_size_um: float, model: torch.nn.Module | None = None,
                    mirrored: bool = True, **tile_kw) -> np.ndarray:
    """Tissue probability on the input's pixel grid; the network itself runs at its
    training pixel size (model.net_pixel_um). ``mirrored``: predict_mirrored."""
    model = load_model() if model is None else model
    img = as_unit_float(image)
    net_px = float(getattr(model, "net_pixel_um", pixel_size_um))
    small = resample(img, pixel_size_um / net_px)
    prob = (predict_mirrored if mirrored else predict_proba)(small, model, **tile_kw)
    return np.clip(resample(prob, 1.0, shape=img.shape), 0, 1)


# ---------------------------------------------------------------- post-processing
def plausible_sections(rects: list[tuple], min_confidence: float = MIN_CONFIDENCE) -> list[tuple]:
    """(center, size, angle, confidence) rectangles that look like sections."""
    areas = [s[0] * s[1] for _, s, _, c in rects if c >= CONFIDENT]
    median = float(np.median(areas)) if areas else 0.0
    return [r for r in rects if r[3] >= min_confidence and max(r[1]) <= MAX_ASPECT * min(r[1])
            and r[1][0] * r[1][1] >= MIN_RELATIVE_AREA * median]


def postprocess(prob: np.ndarray, pixel_size_um: float, origin_um=(0.0, 0.0), threshold: float = 0.5,
                min_area_um2: float = MIN_AREA_UM2, min_confidence: float = MIN_CONFIDENCE) -> list[dict]:
    """Seed post-processing of a tissue probability map -> sections in stage um."""
    from wafer.sections import rectangle_polygon
    px = float(pixel_size_um)
    ox, oy = float(origin_um[0]), float(origin_um[1])
    binary = np.pad(prob > threshold, 1)                 # pad: closing must not eat border sections
    closed = ndimage.binary_closing(binary, iterations=1)[1:-1, 1:-1]
    comps, _ = ndimage.label(closed)
    edges = cv2.Canny(closed.astype(np.uint8) * 255, 100, 200)
    contours, _ = cv2.findContours(edges, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    best: dict[int, tuple] = {}
    for c in contours:
        (cx, cy), (w, h), a = cv2.minAreaRect(c)
        w, h = max(w - CANNY_PAD_PX, 1.0), max(h - CANNY_PAD_PX, 1.0)
        area = w * h
        if area * px * px <= min_area_um2:
            continue
        r, q = int(round(cy)), int(round(cx))
        if not (0 <= r < comps.shape[0] and 0 <= q < comps.shape[1]) or comps[r, q] == 0:
            continue                                     # centre off the foreground: no instance
        lab = int(comps[r, q])
        if lab not in best or area > best[lab][0]:
            best[lab] = (area, (cx, cy), (w, h), a)
    rects = []
    for _, (cx, cy), (w, h), a in best.values():
        _, (w, h), a = normalise_rect((cx, cy), (w, h), a)
        conf = _mean_inside(prob, cv2.boxPoints(((cx, cy), (w, h), a)))
        center = (ox + cx * px, oy + cy * px)
        size = (w * px, h * px)
        rects.append((center, size, a, conf))
    rects = plausible_sections(rects, min_confidence)
    rects.sort(key=lambda r: (r[0][1], r[0][0]))
    return [{"id": i, "center_um": [c[0], c[1]], "size_um": [s[0], s[1]], "angle_deg": a,
             "polygon_um": [list(p) for p in rectangle_polygon(c, s, a)], "confidence": conf}
            for i, (c, s, a, conf) in enumerate(rects)]


def _mean_inside(prob: np.ndarray, poly: np.ndarray) -> float:
    """Mean of `prob` over the pixels inside polygon `poly` (rasterised in its bounding box)."""
    x0, y0 = np.maximum(np.floor(poly.min(0)).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(poly.max(0)).astype(int) + 1, prob.shape[::-1])
    if x1 <= x0 or y1 <= y0:
        return 0.0
    m = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.fillPoly(m, [np.round((poly - (x0, y0)) * 16).astype(np.int32)], 1, cv2.LINE_8, 4)
    return float(prob[y0:y1, x0:x1][m > 0].mean()) if m.any() else 0.0


def detect_sections(image: np.ndarray, pixel_size_um: float, origin_um=(0.0, 0.0),
                    model: torch.nn.Module | None = None, threshold: float = 0.5,
                    similar: bool = True) -> list[dict]:
    """Sections on an overview (2-D uint8 or float image) as dicts in the JSON format.
    ``similar``: also the sections found by their likeness to the confident ones
    (wafer/detect_similar.py)."""
    if pixel_size_um <= 0:
        raise ValueError("pixel_size_um must be > 0")
    model = load_model() if model is None else model
    prob = probability_map(image, pixel_size_um, model)
    return sections_from_probability(image, prob, pixel_size_um, origin_um, model, threshold, similar)


def numbered(sections: list[dict]) -> list[dict]:
    """`sections` in reading order (rows, then columns), ids 0, 1, ... in that order."""
    ordered = sorted(sections, key=lambda d: (d["center_um"][1], d["center_um"][0]))
    return [{**d, "id": i} for i, d in enumerate(ordered)]


def sections_from_probability(image: np.ndarray, prob: np.ndarray, pixel_size_um: float, origin_um,
                              model: torch.nn.Module, threshold: float = 0.5, similar: bool = True) -> list[dict]:
    """postprocess, then (``similar``) resin frames taken off (wafer/detect_frames.py),
    ribbons drawn as one strip cut into sections where the network's own give no template
    (wafer/detect_ribbons.py) and the find-similar step at the network's pixel size (it
    also mends a frame cut wrong)."""
    from wafer.detect_frames import strip_frames
    from wafer.detect_ribbons import replace_strips, split_ribbons
    from wafer.detect_similar import find_similar, has_template
    dets = postprocess(prob, pixel_size_um, origin_um, threshold)
    if not similar:
        return dets
    image01 = as_unit_float(image)
    dets = strip_frames(image01, dets, pixel_size_um, origin_um)
    if not has_template(dets, prob.shape, pixel_size_um, origin_um):
        cuts = strip_frames(image01, split_ribbons(image01, prob, pixel_size_um, origin_um, threshold, dets),
                            pixel_size_um, origin_um)
        dets = numbered(replace_strips(dets, cuts, pixel_size_um, origin_um))
    return find_similar(image01, prob, dets, pixel_size_um, origin_um,
                        work_pixel_um=float(getattr(model, "net_pixel_um", pixel_size_um)))


# ---------------------------------------------------------------- evaluation
def rect_iou(a, b) -> float:
    """IoU of two rotated rectangles given as (center, size, angle_deg)."""
    pa = cv2.boxPoints(((float(a[0][0]), float(a[0][1])), (float(a[1][0]), float(a[1][1])), float(a[2])))
    pb = cv2.boxPoints(((float(b[0][0]), float(b[0][1])), (float(b[1][0]), float(b[1][1])), float(b[2])))
    # shift near the origin: float32 intersection loses precision at stage coordinates
    o = pa.mean(0)
    inter, _ = cv2.intersectConvexConvex((pa - o).astype(np.float32), (pb - o).astype(np.float32))
    union = a[1][0] * a[1][1] + b[1][0] * b[1][1] - inter
    return float(inter / union) if union > 0 else 0.0


def edge_errors_um(det: dict, truth_rect) -> list[float]:
    """Signed distances (µm, + outside) of a detection's extent from the four
    edges of the true rectangle (center, size, angle), along their normals."""
    (cx, cy), (w, h), a = truth_rect
    u = np.array([math.cos(math.radians(a)), math.sin(math.radians(a))])
    v = np.array([-u[1], u[0]])
    p = np.asarray(det["polygon_um"], float) - (cx, cy)
    return [float((p @ u).max() - w / 2), float(-(p @ u).min() - w / 2),
            float((p @ v).max() - h / 2), float(-(p @ v).min() - h / 2)]


def match_sections(dets: list[dict], truth: list, iou_min: float = 0.5) -> dict:
    """Greedy one-to-one matching by IoU. `truth`: (id, center, size, angle, fully_inside);
    truth cut by the image border is neither required nor counted as a false positive."""
    pairs = []
    for i, d in enumerate(dets):
        rd = (d["center_um"], d["size_um"], d["angle_deg"])
        for j, t in enumerate(truth):
            if math.dist(rd[0], t[1]) < max(t[2]) + max(rd[1]):
                iou = rect_iou(rd, (t[1], t[2], t[3]))
                if iou > 0:
                    pairs.append((iou, i, j))
    pairs.sort(reverse=True)
    used_d, used_t, matched = set(), set(), []
    for iou, i, j in pairs:
        if i in used_d or j in used_t or iou < iou_min:
            continue
        used_d.add(i)
        used_t.add(j)
        matched.append((iou, i, j))
    partial_t = {j for j, t in enumerate(truth) if not t[4]}
    # a detection overlapping a border-cut section is neutral
    neutral = {i for iou, i, j in pairs if j in partial_t and i not in used_d}
    tp = sum(1 for _, _, j in matched if j not in partial_t)
    fp = len(dets) - len(used_d) - len(neutral)
    fn = sum(1 for j, t in enumerate(truth) if t[4] and j not in used_t)
    good = [(iou, i, j) for iou, i, j in matched if j not in partial_t]
    ious = [m[0] for m in good]
    cerr = [math.dist(dets[i]["center_um"], truth[j][1]) for _, i, j in good]
    eerr = [e for _, i, j in good for e in edge_errors_um(dets[i], truth[j][1:4])]
    aerr = []
    for _, i, j in good:
        e = abs((dets[i]["angle_deg"] - truth[j][3] + 90) % 180 - 90)
        if min(truth[j][2]) > 0.9 * max(truth[j][2]):     # near-square: the long side is ambiguous
            e = min(e, 90 - e)
        aerr.append(e)
    prec = tp / (tp + fp) if tp + fp else 1.0
    rec = tp / (tp + fn) if tp + fn else 1.0
    return {"tp": tp, "fp": fp, "fn": fn, "precision": prec, "recall": rec,
            "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
            "mean_iou": float(np.mean(ious)) if ious else 0.0, "ious": ious,
            "center_err_um": cerr, "angle_err_deg": aerr, "edge_err_um": eerr}
