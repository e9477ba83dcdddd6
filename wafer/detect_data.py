"""Synthetic training data for the section detector (seed ch. 2).

Overviews are rendered from devices.sim.wafer.VirtualWafer at 4 um/px, with
imaging and preparation artefacts added here (mosaic tile shading, detector
gain/offset/noise, blur, debris, blank resin pieces, folds) on top of the
simulator's own dust, scratches and illumination gradient.  Labels follow the
seed's sparse rule: 1 = tissue, 0 = background made by dilating the tissue
10 times, 2 = ignore (excluded from the loss); a few background blobs far from
the sections and on artefacts stand in for the polygons an annotator adds.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy import ndimage

from common.geometry import normalise_rect
from devices.setup_config import WaferParams
from devices.sim.wafer import VirtualWafer

PIXEL_UM = 4.0                     # overview pixel size of the seed
BG_DILATION = 10                   # iterations of the automatic background ring
IGNORE = 2
_CROSS = ndimage.generate_binary_structure(2, 1)


# ---------------------------------------------------------------- labels
def labels_from_mask(tissue: np.ndarray, background: np.ndarray | None = None,
                     dilation: int = BG_DILATION) -> np.ndarray:
    """Sparse labels: tissue -> 1, the `dilation`-times dilated ring around it -> 0,
    explicitly drawn background -> 0, everything else -> 2 (ignore)."""
    tissue = np.asarray(tissue, bool)
    lab = np.full(tissue.shape, IGNORE, np.uint8)
    if background is not None:
        lab[np.asarray(background, bool)] = 0
    if dilation > 0 and tissue.any():
        ring = ndimage.binary_dilation(tissue, _CROSS, iterations=dilation) & ~tissue
        lab[ring] = 0
    lab[tissue] = 1                 # tissue wins where a drawn background overlaps it
    return lab


def _fill(shape, polys) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    pts = [np.round(np.asarray(p, float) * 16).astype(np.int32) for p in polys if len(p) >= 3]
    if pts:
        cv2.fillPoly(m, pts, 1, cv2.LINE_8, 4)
    return m.astype(bool)


def labels_from_polygons(shape, tissue_polys_px, background_polys_px=(),
                         dilation: int = BG_DILATION) -> np.ndarray:
    """Sparse label image from drawn polygons ((N, 2) arrays of (x=col, y=row) pixels),
    as the annotation tool produces them: same dilation rule as the seed."""
    shape = tuple(int(s) for s in shape[:2])
    return labels_from_mask(_fill(shape, tissue_polys_px), _fill(shape, background_polys_px), dilation)


def downsample_labels(lab: np.ndarray, factor: int) -> np.ndarray:
    """Labels at 1/factor resolution: ignore where most of a block is ignore, else the
    majority of tissue vs background (so boundary blocks keep their true side)."""
    if factor == 1:
        return lab
    h, w = lab.shape[0] // factor * factor, lab.shape[1] // factor * factor
    blk = lab[:h, :w].reshape(h // factor, factor, w // factor, factor)
    ft = (blk == 1).mean((1, 3))
    fb = (blk == 0).mean((1, 3))
    out = np.where(ft >= fb, 1, 0).astype(np.uint8)
    out[(ft + fb) <= 0.5] = IGNORE
    return out


# ---------------------------------------------------------------- wafers
def random_wafer_params(rng: np.random.Generator, seed: int) -> WaferParams:
    """Wide ranges of section size, aspect, rotation, packing and resin margin."""
    w = rng.uniform(250, 900)
    h = max(120.0, w * rng.uniform(0.35, 1.0))
    return WaferParams(sections=400, section_size_um=(w, h), size_jitter=rng.uniform(0, 0.2),
                       rotation_deg=rng.uniform(-180, 180),
                       rotation_jitter_deg=float(rng.choice([rng.uniform(0, 20), 90.0], p=[0.8, 0.2])),
                       spacing_um=rng.uniform(20, 700), resin_margin_um=rng.uniform(10, 120), seed=seed)


def wide_wafer_params(rng: np.random.Generator, seed: int) -> WaferParams:
    """The ranges labs' wafers span (issue 16): sections 150 µm to 2 mm long
    (log-uniform), up to 4:1, a third of the wafers packed edge to edge
    (0-20 µm apart), resin rims of 3-150 µm (log-uniform)."""
    w = float(np.exp(rng.uniform(math.log(150), math.log(2000))))
    h = max(100.0, w * rng.uniform(0.25, 1.0))
    spacing = rng.uniform(0, 20) if rng.random() < 1 / 3 else rng.uniform(20, 700)
    return WaferParams(sections=500, section_size_um=(w, h), size_jitter=rng.uniform(0, 0.15),
                       rotation_deg=rng.uniform(-180, 180),
                       rotation_jitter_deg=float(rng.choice([rng.uniform(0, 20), 90.0], p=[0.8, 0.2])),
                       spacing_um=spacing, resin_margin_um=float(np.exp(rng.uniform(math.log(3), math.log(150)))),
                       seed=seed)


def make_wafer(params: WaferParams, fraction: float = 1.0) -> VirtualWafer:
    """VirtualWafer with as many sections as asked, or (fraction of) as many as fit."""
    n = params.sections
    while True:
        try:
            return VirtualWafer(params.model_copy(update={"sections": max(1, n)}))
        except ValueError as exc:
            m = re.search(r"at most (\d+) fit", str(exc))
            fit = int(m.group(1)) if m else n // 2
            if fit < 1:
                raise
            n = max(1, int(round(fit * fraction)))
            fraction = 1.0


def truth_rect_um(sec) -> tuple[tuple[float, float], tuple[float, float], float]:
    """Ground-truth rectangle of a section: minimum-area rectangle of its tissue outline
    (the detector returns rectangles; the rounded/wobbly outline itself is not one)."""
    (cx, cy), (w, h), a = cv2.minAreaRect((np.asarray(sec.tissue_polygon_m) * 1e6).astype(np.float32))
    return normalise_rect((cx, cy), (w, h), a)


# ---------------------------------------------------------------- rendering
@dataclass
class Overview:
    image: np.ndarray                     # uint8 overview
    instances: np.ndarray                 # int32, k + 1 = tissue of section k
    labels: np.ndarray                    # sparse 0/1/2
    origin_um: tuple[float, float]        # stage position of pixel (0, 0)
    pixel_um: float
    truth: list = field(default_factory=list)   # (id, center, size, angle, fully_inside)


def _poly_px(poly_m, origin_um, pixel_um):
    return (np.asarray(poly_m) * 1e6 - origin_um) / pixel_um


def _tile_shading(rng, shape, tile_px=(192, 256)) -> np.ndarray:
    """Mosaic look: each 1024x768 um tile has its own gain and a vignette."""
    h, w = shape
    th, tw = tile_px
    oy, ox = rng.integers(0, th), rng.integers(0, tw)
    yy = (np.arange(h) + oy) % th / th - 0.5
    xx = (np.arange(w) + ox) % tw / tw - 0.5
    vig = 1 - rng.uniform(0, 0.12) * (xx[None, :] ** 2 + yy[:, None] ** 2) * 2
    ny, nx = (h + oy) // th + 1, (w + ox) // tw + 1
    gains = 1 + rng.normal(0, rng.uniform(0, 0.04), (ny, nx))
    g = gains[((np.arange(h) + oy) // th)[:, None], ((np.arange(w) + ox) // tw)[None, :]]
    return (vig * g).astype(np.float32)


def render_overview(wafer: VirtualWafer, center_um, shape, rng: np.random.Generator,
                    pixel_um: float = PIXEL_UM, artefacts: bool = True, far_background: bool = True,
                    looks: bool = False, milled_rng: np.random.Generator | None = None) -> Overview:
    """Overview crop (uint8) with instance mask, sparse labels and truth rectangles.
    ``looks``: also faint tissue, inverted contrast (another detector) and a
    strong illumination gradient (the wide training generator). ``milled_rng``:
    partly milled sections (_mill_partly), drawn from their own stream so that
    every other draw stays as it was."""
    h, w = int(shape[0]), int(shape[1])
    p = pixel_um * 1e-6
    sig = wafer.signal((center_um[0] * 1e-6, center_um[1] * 1e-6), p, (h, w))
    inst = wafer.section_mask((center_um[0] * 1e-6, center_um[1] * 1e-6), p, (h, w))
    origin = np.array([center_um[0] - (w - 1) / 2 * pixel_um, center_um[1] - (h - 1) / 2 * pixel_um])
    tissue = inst > 0
    bg_extra = np.zeros((h, w), bool)
    if artefacts:
        sig = sig.copy()
        resin = _fill((h, w), [_poly_px(s.resin_polygon_m, origin, pixel_um) for s in wafer.sections]) & ~tissue
        wafer_px = sig > 0.02
        # material contrast varies with staining, detector and dwell time
        sig[resin] += rng.uniform(-0.1, 0.2)
        if tissue.any():
            mu = float(sig[tissue].mean())
            if looks:                                   # draw order as each generator's models were trained
                gain, shift = rng.uniform(0.25, 2.0), rng.uniform(-0.15, 0.15)
            else:
                shift, gain = rng.uniform(-0.15, 0.15), rng.uniform(0.6, 2.0)
            sig[tissue] = mu + shift + (sig[tissue] - mu) * gain
        sig[wafer_px & ~resin & ~tissue] += rng.uniform(-0.15, 0.1)
        if milled_rng is not None:
            _mill_partly(sig, milled_rng, inst, wafer_px & ~resin & ~tissue)
        if rng.random() < 0.5:          # annotator outlined the embedding resin as well
            bg_extra |= resin
        bg_extra |= _add_debris(sig, rng, tissue, pixel_um)
        _add_folds(sig, rng, inst, len(wafer.sections))
        sig *= _tile_shading(rng, (h, w))
        if looks and rng.random() < 0.4:
            sig *= illumination_ramp(rng, (h, w), rng.uniform(0.05, 0.3))
        sig = cv2.GaussianBlur(sig, (0, 0), rng.uniform(0.3, 1.2))
        sig += rng.normal(0, rng.uniform(0.0, 0.05), sig.shape).astype(np.float32)
        gain, off = rng.uniform(0.7, 1.25), rng.uniform(-0.1, 0.1)
        sig = sig * gain + off
        if looks and rng.random() < 0.25:
            sig = 1.0 - sig
    img = np.clip(np.round(sig * 255), 0, 255).astype(np.uint8)
    if far_background:
        bg_extra |= _far_background(rng, tissue, (h, w))
    labels = labels_from_mask(tissue, bg_extra)
    truth = []
    for s in wafer.sections:
        tp = _poly_px(s.tissue_polygon_m, origin, pixel_um)
        if tp[:, 0].max() < 0 or tp[:, 1].max() < 0 or tp[:, 0].min() > w - 1 or tp[:, 1].min() > h - 1:
            continue
        inside = bool(tp.min() >= 1 and tp[:, 0].max() <= w - 2 and tp[:, 1].max() <= h - 2)
        truth.append((s.id, *truth_rect_um(s), inside))
    return Overview(img, inst, labels, (float(origin[0]), float(origin[1])), pixel_um, truth)


def illumination_ramp(rng, shape, amplitude: float) -> np.ndarray:
    """A linear illumination ramp of +-amplitude across the crop, any direction."""
    h, w = shape
    a = rng.uniform(0, 2 * math.pi)
    ramp = math.cos(a) * np.linspace(-1, 1, w)[None, :] + math.sin(a) * np.linspace(-1, 1, h)[:, None]
    return (1 + amplitude * ramp).astype(np.float32)


def _blob(rng, c, r, n=9):
    a = np.sort(rng.uniform(0, 2 * math.pi, n))
    rad = r * rng.uniform(0.5, 1.2, n)
    return np.stack([c[0] + rad * np.cos(a), c[1] + rad * np.sin(a)], 1)


def _add_debris(sig, rng, tissue, pixel_um) -> np.ndarray:
    """Flakes, dirt and blank resin pieces (no tissue) beside the sections; returns the
    pixels an annotator would mark as background."""
    h, w = sig.shape
    bg = np.zeros((h, w), bool)
    n = rng.poisson(h * w / 250_000 * rng.uniform(0, 3))
    for _ in range(n):
        c = (rng.uniform(0, w), rng.uniform(0, h))
        kind = rng.random()
        if kind < 0.25:         # blank resin chip, rectangular-ish, as large as a section
            L = rng.uniform(40, 250) / pixel_um
            poly = cv2.boxPoints((c, (L, L * rng.uniform(0.3, 1)), rng.uniform(0, 180)))
            val = rng.uniform(0.1, 0.35)
        elif kind < 0.45:       # tissue-grey crumb: small, so the area threshold must reject it
            poly = _blob(rng, c, rng.uniform(2, 7) * 4 / pixel_um)
            val = rng.uniform(0.3, 0.6)
        else:                   # dirt: dark or bright specks
            poly = _blob(rng, c, rng.uniform(1, 12) * 4 / pixel_um)
            val = rng.choice([rng.uniform(0.0, 0.15), rng.uniform(0.85, 1.0)])
        m = _fill((h, w), [poly])
        if (m & tissue).any() and kind < 0.45:
            continue            # do not hide tissue under a foreign object
        if kind >= 0.45:
            m &= ~tissue if rng.random() < 0.7 else np.ones_like(m)
        sig[m] = val
        bg |= m & ~tissue
    return ndimage.binary_dilation(bg, _CROSS, iterations=2) & ~tissue


def _add_folds(sig, rng, inst, n_sections) -> None:
    """Folds and knife marks: thin dark or bright lines across some sections."""
    if n_sections == 0 or inst.max() == 0:
        return
    objs = ndimage.find_objects(inst)
    for k, sl in enumerate(objs):
        if sl is None or rng.random() > 0.25:
            continue
        ys, xs = sl
        sub = inst[sl] == k + 1
        line = np.zeros(sub.shape, np.uint8)
        p0 = (int(rng.integers(0, sub.shape[1])), 0)
        p1 = (int(rng.integers(0, sub.shape[1])), sub.shape[0] - 1)
        if rng.random() < 0.5:
            p0, p1 = (0, int(rng.integers(0, sub.shape[0]))), (sub.shape[1] - 1, int(rng.integers(0, sub.shape[0])))
        cv2.line(line, p0, p1, 1, int(rng.integers(1, 4)))
        m = (line > 0) & sub
        sig[sl][m] = np.clip(sig[sl][m] + rng.choice([-0.25, 0.25]), 0, 1)


def _mill_partly(sig, rng, inst, bare_wafer, p_wafer: float = 0.3) -> None:
    """On a fraction p_wafer of crops, GCIB-milled sections: on a share U(0.2, 1) of
    them, 20-70 % of the tissue (behind a wavy milling front at any angle) is milled
    through to within U(0, 30) % of the wafer's signal. The label stays tissue: the
    grid must still cover the whole section, and a section with two contrasts is one."""
    if rng.random() > p_wafer or inst.max() == 0:
        return
    level = float(np.median(sig[bare_wafer])) if bare_wafer.sum() > 100 else rng.uniform(0.05, 0.9)
    share = rng.uniform(0.2, 1.0)
    for k, sl in enumerate(ndimage.find_objects(inst)):
        if sl is None or rng.random() > share:
            continue
        sub = inst[sl] == k + 1
        yy, xx = np.mgrid[0:sub.shape[0], 0:sub.shape[1]].astype(np.float32)
        a = rng.uniform(0, 2 * math.pi)
        d = math.cos(a) * xx + math.sin(a) * yy
        d += cv2.GaussianBlur(rng.normal(0, 1, sub.shape).astype(np.float32), (0, 0), 6) * 0.1 * np.ptp(d) * 6
        inside = d[sub]
        front = np.quantile(inside, 1 - rng.uniform(0.2, 0.7))
        m = sub & (d > front)
        rest = rng.uniform(0, 0.3)
        view = sig[sl]
        view[m] = level + (view[m] - level) * rest


def _far_background(rng, tissue, shape, n_max: int = 16) -> np.ndarray:
    """Drawn-style background well away from any tissue: without it the net never sees
    bare wafer, vacuum, the wafer edge, tile seams or resin chips as negatives.  Half
    the crops get large outlined regions (all of the far area), half a few blobs."""
    h, w = shape
    if tissue.any():
        far = ~ndimage.binary_dilation(tissue, _CROSS, iterations=BG_DILATION + 15)
    else:
        far = np.ones(shape, bool)
    if rng.random() < 0.5:
        return far
    out = np.zeros(shape, bool)
    ys, xs = np.nonzero(far[::8, ::8])
    if len(ys) == 0:
        return out
    for i in rng.choice(len(ys), min(len(ys), int(rng.integers(4, n_max + 1))), replace=False):
        out |= _fill(shape, [_blob(rng, (xs[i] * 8, ys[i] * 8), rng.uniform(15, 90))])
    return out & far


def sample_overviews(seed: int, n_crops: int = 2, shape=(768, 768), params_fn=None,
                     near_section: bool = False, wide: bool = False, milled: bool = False) -> list[Overview]:
    """Random wafer from `seed` and `n_crops` overview crops (mostly around sections,
    sometimes anywhere on the wafer, including its edge; always near a section with
    `near_section`); fully determined by `seed`. `params_fn(rng, seed)`: the layout
    ranges (default: random_wafer_params, or wide_wafer_params with the extra looks
    when `wide`); `milled`: partly milled sections as well."""
    rng = np.random.default_rng([seed, 77])
    milled_rng = np.random.default_rng([seed, 78]) if milled else None
    params = (params_fn or (wide_wafer_params if wide else random_wafer_params))(rng, seed)
    wafer = make_wafer(params, fraction=rng.uniform(0.3, 1.0))
    r_um = wafer.radius_m * 1e6
    out = []
    for _ in range(n_crops):
        u = 0.0 if near_section else rng.random()
        if u < 0.6 and wafer.sections:
            c = np.array(wafer.sections[int(rng.integers(len(wafer.sections)))].center_m) * 1e6
            c += rng.uniform(-1, 1, 2) * np.array(shape[::-1]) * PIXEL_UM / 3
        else:                   # anywhere, or across the wafer edge (vacuum beyond)
            r = r_um * math.sqrt(rng.random()) if u < 0.8 else r_um + rng.uniform(-1000, 500)
            a = rng.uniform(0, 2 * math.pi)
            c = np.array([r * math.cos(a), r * math.sin(a)])
        out.append(render_overview(wafer, c, shape, rng, looks=wide, milled_rng=milled_rng))
    return out


# ---------------------------------------------------------------- augmentation
def augment(img: np.ndarray, lab: np.ndarray, rng: np.random.Generator, patch: int,
            center=None) -> tuple[np.ndarray, np.ndarray]:
    """Seed augmentations on one patch cut from (img in [0, 1] float32, labels):
    shift-scale-rotate (p=0.95, cubic, reflect), flips, elastic (sigma 2, alpha 5),
    gamma, brightness/contrast, Gaussian noise.  Cut from a context window so the
    rotation sees real neighbours rather than reflections."""
    h, w = img.shape
    if center is None:
        center = (rng.uniform(0, w), rng.uniform(0, h))
    M = np.array([[1.0, 0, center[0] - patch / 2], [0, 1.0, center[1] - patch / 2]])
    if rng.random() < 0.95:
        ang = rng.uniform(-180, 180)
        sc = 1 + rng.uniform(-0.2, 0.2)
        sh = rng.uniform(-0.0625, 0.0625, 2) * patch
        R = cv2.getRotationMatrix2D((patch / 2, patch / 2), ang, sc)     # output -> source around centre
        R = np.vstack([R, [0, 0, 1]])
        T = np.vstack([M, [0, 0, 1]]) @ np.linalg.inv(R) @ np.array([[1, 0, sh[0]], [0, 1, sh[1]], [0, 0, 1]])
        M = T[:2]
    flags = cv2.WARP_INVERSE_MAP
    x = cv2.warpAffine(img, M, (patch, patch), flags=cv2.INTER_CUBIC | flags, borderMode=cv2.BORDER_REFLECT_101)
    y = cv2.warpAffine(lab, M, (patch, patch), flags=cv2.INTER_NEAREST | flags, borderMode=cv2.BORDER_REFLECT_101)
    if rng.random() < 0.5:
        x, y = x[:, ::-1], y[:, ::-1]
    if rng.random() < 0.5:
        x, y = x[::-1], y[::-1]
    if rng.random() < 0.5:         # Simard elastic: smoothed uniform displacement field
        dx = cv2.GaussianBlur(rng.uniform(-1, 1, (patch, patch)).astype(np.float32), (0, 0), 2) * 5
        dy = cv2.GaussianBlur(rng.uniform(-1, 1, (patch, patch)).astype(np.float32), (0, 0), 2) * 5
        gx, gy = np.meshgrid(np.arange(patch, dtype=np.float32), np.arange(patch, dtype=np.float32))
        x = cv2.remap(np.ascontiguousarray(x), gx + dx, gy + dy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        y = cv2.remap(np.ascontiguousarray(y), gx + dx, gy + dy, cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT_101)
    x = np.clip(x, 0, 1)
    if rng.random() < 0.75:
        x = x ** max(0.2, rng.normal(1.0, 0.25))
    if rng.random() < 0.75:
        m = float(x.mean())
        x = rng.normal(1.0, 0.25) * (x - m) + m + rng.normal(0.0, 0.25)
    if rng.random() < 0.75:
        x = x + rng.normal(0.0, 0.1, x.shape)
    return np.clip(x, 0, 1).astype(np.float32), np.ascontiguousarray(y)
