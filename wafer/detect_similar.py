"""Find more sections like the ones the U-Net is sure of, on the same overview.

Serial sections on one wafer share size, shape and look, so the confident
detections of an overview are a template for the rest: where the network is
unsure (faint or flat tissue, a look it was never trained on) the likeness
to its sure neighbours still shows. This is how operators pick sections by
hand (one section, then "find similar"); here the template is learnt from
the overview itself, so it follows whatever look the lab's wafer has.

Steps: the template is the mean of the confident, whole (not border-cut),
typical-sized detections, rotated upright and normalised (mirrored four ways:
the section's outline matters, not its texture). It is matched (normalised
cross-correlation) at the angles the confident ones have, +-2 deg, at the
network's pixel size. A peak becomes a section when its correlation is
>= MIN_NCC, the network gives it some tissue probability (>= MIN_SUPPORT,
so the template cannot invent sections on bare resin), and it overlaps no
detection except fragments (< FRAGMENT of the template's area), which it
replaces. Its rectangle is re-segmented from the probability map around it
at half its own peak level when that gives a plausible size, else the
template's.
"""
from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

from common.geometry import rectangle_polygon

# Chosen on the validation family (wafer/detect_families.py), never on the test family:
# F1 there is the same from 0.5 to 0.6; below 0.5 a resin block was taken for a section.
MIN_NCC = 0.5
MIN_SUPPORT = 0.35        # mean tissue probability inside: the network must partly agree
MIN_REFERENCES = 3        # confident whole sections needed to build a template
FRAGMENT = 0.7            # detections smaller than this x the template's area may be replaced
MARGIN = 0.15             # template border around the section, x its short side
ANGLE_STEPS = (-2.0, 0.0, 2.0)
FLAT_VARIANCE = 1e-5      # grey values 0..1: windows flatter than 0.3 % s.d. are not compared


def _upright(img: np.ndarray, center_px, angle_deg: float, size_px) -> np.ndarray:
    """The (w, h) px box at `center_px`, rotated so that its long side is horizontal."""
    w, h = int(round(size_px[0])), int(round(size_px[1]))
    m = cv2.getRotationMatrix2D((float(center_px[0]), float(center_px[1])), float(angle_deg), 1.0)
    m[:, 2] += (w / 2 - center_px[0], h / 2 - center_px[1])
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def _references(sections: list[dict], shape, pixel_um: float, origin_um) -> list[dict]:
    """Confident detections inside the image whose area is typical (fragments and merges left out)."""
    from wafer.detect import MIN_CONFIDENCE
    h, w = shape
    whole = []
    for d in sections:
        q = (np.asarray(d["polygon_um"], float) - origin_um) / pixel_um
        if d["confidence"] >= MIN_CONFIDENCE and q.min() >= 2 and q[:, 0].max() <= w - 3 and q[:, 1].max() <= h - 3:
            whole.append(d)
    if not whole:
        return []
    area = lambda d: d["size_um"][0] * d["size_um"][1]  # noqa: E731
    med = float(np.median([area(d) for d in whole]))
    return [d for d in whole if 0.75 * med <= area(d) <= 1.33 * med]


def _correlation(small: np.ndarray, template: np.ndarray, angles) -> tuple[np.ndarray, np.ndarray]:
    """Best normalised cross-correlation per pixel over `angles`, and the angle that gave it."""
    h, w = small.shape
    th, tw = template.shape
    best = np.full((h, w), -1.0, np.float32)
    best_angle = np.zeros((h, w), np.float32)
    centre = (w / 2, h / 2)
    ones = np.ones_like(template)
    for a in angles:
        # rotating the overview by a makes sections at angle a upright, like the template
        rot = cv2.warpAffine(small, cv2.getRotationMatrix2D(centre, a, 1.0), (w, h), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REFLECT)
        score = cv2.matchTemplate(rot, template, cv2.TM_CCOEFF_NORMED)
        # a flat window (clipped or blank) has no likeness; OpenCV scores it arbitrarily
        n = template.size
        s1 = cv2.matchTemplate(rot, ones, cv2.TM_CCORR)
        s2 = cv2.matchTemplate(rot * rot, ones, cv2.TM_CCORR)
        score[s2 / n - (s1 / n) ** 2 < FLAT_VARIANCE] = -1.0
        full = np.full((h, w), -1.0, np.float32)
        full[th // 2:th // 2 + score.shape[0], tw // 2:tw // 2 + score.shape[1]] = score
        back = cv2.warpAffine(full, cv2.getRotationMatrix2D(centre, -a, 1.0), (w, h), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=-1.0)
        better = back > best
        best[better] = back[better]
        best_angle[better] = a
    return best, best_angle


def _resegment(prob: np.ndarray, poly_px: np.ndarray, size_px) -> tuple | None:
    """Minimum-area rectangle (centre px, size px, angle) of the probability map around the
    candidate, thresholded at half its own peak; None unless within 20 % of `size_px`."""
    c = poly_px.mean(0)
    grown = c + (poly_px - c) * 1.25
    x0, y0 = np.maximum(np.floor(grown.min(0)).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(grown.max(0)).astype(int) + 1, prob.shape[::-1])
    if x1 - x0 < 4 or y1 - y0 < 4:
        return None
    window = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.fillPoly(window, [np.round(grown - (x0, y0)).astype(np.int32)], 1)
    inner = np.zeros_like(window)
    cv2.fillPoly(inner, [np.round(poly_px - (x0, y0)).astype(np.int32)], 1)
    p = prob[y0:y1, x0:x1] * window
    if not inner.any():
        return None
    n, lab, stats, _ = cv2.connectedComponentsWithStats((p > 0.5 * np.percentile(p[inner > 0], 90)).astype(np.uint8))
    if n < 2:
        return None
    ys, xs = np.nonzero(lab == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA])))
    (cx, cy), (w, h), a = cv2.minAreaRect(np.stack([xs, ys], 1).astype(np.float32))
    w, h = w + 1.0, h + 1.0                    # pixel centres -> pixel edges
    if h > w:
        w, h, a = h, w, a + 90.0
    if not (0.8 * size_px[0] < w < 1.2 * size_px[0] and 0.8 * size_px[1] < h < 1.2 * size_px[1]):
        return None
    return (cx + x0, cy + y0), (w, h), (a + 90.0) % 180.0 - 90.0


def find_similar(image01: np.ndarray, prob: np.ndarray, sections: list[dict], pixel_um: float, origin_um,
                 work_pixel_um: float = 8.0) -> list[dict]:
    """`sections` (postprocess's dicts) plus the sections found by their likeness to the
    confident ones; ids renumbered in reading order. Unchanged with fewer than
    MIN_REFERENCES confident whole sections."""
    from wafer.detect import _mean_inside, rect_iou, resample
    origin = np.asarray(origin_um, float)
    refs = _references(sections, prob.shape, pixel_um, origin)
    if len(refs) < MIN_REFERENCES:
        return sections
    factor = min(1.0, pixel_um / work_pixel_um)
    wpx = pixel_um / factor
    small = resample(np.asarray(image01, np.float32), factor).astype(np.float32)
    W = float(np.median([d["size_um"][0] for d in refs]))
    H = float(np.median([d["size_um"][1] for d in refs]))
    box = ((W + 2 * MARGIN * H) / wpx, (H + 2 * MARGIN * H) / wpx)
    if min(box) < 6 or box[0] >= small.shape[1] or box[1] >= small.shape[0]:
        return sections
    views = []
    for d in refs:
        p = _upright(small, (np.asarray(d["center_um"]) - origin) / wpx, d["angle_deg"], box)
        p = (p - p.mean()) / (p.std() + 1e-6)
        views += [p, p[::-1], p[:, ::-1], p[::-1, ::-1]]
    template = np.mean(views, 0).astype(np.float32)
    angles = sorted({round(d["angle_deg"] / 2) * 2 + s for d in refs for s in ANGLE_STEPS})
    score, score_angle = _correlation(small, template, angles)
    peaks = np.argwhere((score >= ndimage.maximum_filter(score, size=max(3, int(0.6 * H / wpx))))
                        & (score >= MIN_NCC))
    peaks = peaks[np.argsort(-score[peaks[:, 0], peaks[:, 1]])]
    out = list(sections)
    found = set()                               # indices in `out` added here: never replaced
    for r, c in peaks:
        center = origin + (c * wpx, r * wpx)
        angle = float(score_angle[r, c])
        size = (W, H)
        poly = np.asarray(rectangle_polygon(tuple(center), size, angle))
        support = _mean_inside(prob, (poly - origin) / pixel_um)
        if support < MIN_SUPPORT:
            continue
        refined = _resegment(prob, (poly - origin) / pixel_um, (W / pixel_um, H / pixel_um))
        if refined is not None:
            (cx, cy), (w, h), angle = refined
            center, size = origin + (cx * pixel_um, cy * pixel_um), (w * pixel_um, h * pixel_um)
            poly = np.asarray(rectangle_polygon(tuple(center), size, angle))
            support = _mean_inside(prob, (poly - origin) / pixel_um)
        rect = (tuple(center), size, angle)
        hits = [k for k, d in enumerate(out) if rect_iou(rect, (d["center_um"], d["size_um"], d["angle_deg"])) > 0.1]
        if any(k in found or out[k]["size_um"][0] * out[k]["size_um"][1] >= FRAGMENT * W * H for k in hits):
            continue
        out = [d for k, d in enumerate(out) if k not in hits]
        found = {k - sum(1 for h_ in hits if h_ < k) for k in found}
        found.add(len(out))
        out.append({"id": -1, "center_um": [float(center[0]), float(center[1])],
                    "size_um": [float(size[0]), float(size[1])], "angle_deg": angle,
                    "polygon_um": [[float(x), float(y)] for x, y in poly], "confidence": support})
    out.sort(key=lambda d: (d["center_um"][1], d["center_um"][0]))
    return [{**d, "id": i} for i, d in enumerate(out)]
