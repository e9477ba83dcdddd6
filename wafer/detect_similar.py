"""Find more sections like the ones the U-Net is sure of, on the same overview.

Serial sections on one wafer share size, shape and look, so the confident
detections of an overview are a template for the rest: where the network is
unsure (faint or flat tissue, a look it was never trained on) the likeness
to its sure neighbours still shows. This is how operators pick sections by
hand (one section, then "find similar"); here the template is learnt from
the overview itself, so it follows whatever look the lab's wafer has.

Steps: the template is the mean of the confident, whole (not border-cut),
typical-sized detections, rotated upright and normalised (mirrored four ways:
the section's outline matters, not its texture). It is matched at the
network's pixel size on two maps, the lightly smoothed overview and the
network's tissue probability, and the likeness is the mean of the two
normalised cross-correlations: the image alone fails where noise or tissue
texture outweighs the section's contrast, the probability alone cannot tell
touching neighbours apart. Matching runs at the angles of the template's
sources and of the confident detections as wide as them, +-2 deg. A peak
becomes a section when its likeness is >= MIN_NCC (or >= WEAK_NCC where the
image shows its four edges at the template's size and about as strong as the
sources' edges: a fold or scratch across a section lowers its likeness, not
its outline), the network gives it some tissue probability (>= MIN_SUPPORT,
so the template cannot invent sections on bare resin), and it overlaps no
detection except fragments (< FRAGMENT of the template's area), which it
replaces if the part it adds to them is tissue
(_extension_is_tissue: where the confident sections took their resin frames
for tissue, a tight detection is not a fragment); two or more matches that
lie apart inside one detection larger than MERGED x the template (neighbours
the network joined) replace it where the image shows the boundary between
them (_seam_contrast >= SEAM) or where every part shows the sections' four
edges (_shows_edges: a gap of the tissue's own grey hides the seam, not the
edges); a wafer may carry larger sections than most.
Each match's rectangle is re-segmented from the probability map around it
(at half its own peak level, when that gives a plausible size), then its
angle and four edges are fitted on the overview itself at native resolution
(_fit_edges), less the edge fit's own offset from the network on this
overview's confident sections (_edge_bias: where a bright rim or blur puts
the image's step outside the tissue edge the network learnt, the found
sections would be wider than the network's). When the network's confident
sections were fragments, the matches the image confirmed have another size:
the template is then learnt again from them and the matching repeated once;
its matches take precedence over the first pass's.
"""
from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

from common.geometry import normalise_rect, rectangle_polygon
from wafer.detect import MIN_CONFIDENCE, _mean_inside, numbered, rect_iou, resample

# Chosen on the validation families (wafer/detect_families.py), never on the test family:
# on "validation" F1 is the same from 0.5 to 0.6 (at 0.4 one more false positive);
# on "validation looks" 0.55 and 0.6 leave 28 false positives, 0.5 32, 0.45 56, 0.4 82
# (sections put on bare wafer that the network, confused by the look, calls tissue).
MIN_NCC = 0.55
# A weaker likeness is enough where the image itself shows the section: four edges found
# (_fit_edges), the template's size within WEAK_SIZE, the weakest edge WEAK_EDGE..1/WEAK_EDGE x as
# strong as on the template's sources (_shows_edges). Chosen on the validation families, where the
# edge test decides: without it a floor of 0.3 put 5 more false positives on "validation looks"
# (0.4: 3 more; tile seams on bare wafer); with it both families are unchanged for floors 0.2-0.55
# and edge ratios 0.1-0.5. They cannot choose the floor: 0.4 lies above the likeness of windows
# half a section off a true one (mean of the two maps' p90, 0.20 and 0.57, measured when the
# likeness took two maps). Asking every match for such edges (ratio >= 0.25) cost validation 3
# sections: a network-backed likeness needs no edges.
WEAK_NCC = 0.4
WEAK_SIZE = 0.1
WEAK_EDGE = 0.5
MIN_EDGE = 2 / 255        # sources' edges weaker than two grey levels: nothing to compare with
MIN_SUPPORT = 0.35        # mean tissue probability inside: the network must partly agree
MIN_REFERENCES = 2        # confident whole sections needed to build a template (3 -> 2: 9 more sections
                          # on overviews from an independently written generator, 1 more false positive;
                          # the four families unchanged; 1 was no better)
FRAGMENT = 0.7            # detections smaller than this x the template's area may be replaced
MERGED = 1.7              # detections larger than this x the template's area may be neighbours merged
SEAM = 8.0                # robust s.d.: the image must show the boundary between neighbours to split them
                          # (or every part its four edges; on the validation families that alternative
                          # changes nothing; on the session-9 outside overviews, 4 more sections and
                          # 2 fewer false positives)
MARGIN = 0.15             # template border around the section, x its short side
ANGLE_STEPS = (-2.0, 0.0, 2.0)
RELEARN = 0.05            # confirmed matches this much off the references' size: learn the template again
SMOOTH_PX = 1.0           # at the work pixel: noise and tissue texture out, the outline kept
SEGMENTS = 6              # stretches of each long edge fitted for its slope
MAX_TILT = 3.0            # deg: a larger total correction means the edges were not found
FLAT_VARIANCE = 1e-5      # both maps 0..1: windows flatter than 0.3 % s.d. are not compared


def _upright(img: np.ndarray, center_px, angle_deg: float, size_px) -> np.ndarray:
    """The (w, h) px box at `center_px`, rotated so that its long side is horizontal."""
    w, h = int(round(size_px[0])), int(round(size_px[1]))
    m = cv2.getRotationMatrix2D((float(center_px[0]), float(center_px[1])), float(angle_deg), 1.0)
    m[:, 2] += (w / 2 - center_px[0], h / 2 - center_px[1])
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def _references(sections: list[dict], shape, pixel_um: float, origin_um) -> list[dict]:
    """Confident detections inside the image whose area is typical (fragments and merges left out)."""
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


def _ncc(rot: np.ndarray, template: np.ndarray) -> np.ndarray:
    """Normalised cross-correlation of every window of `rot` with `template`, on the
    window centres (the border windows are -1); -1 where a window is flat."""
    h, w = rot.shape
    th, tw = template.shape
    score = cv2.matchTemplate(rot, template, cv2.TM_CCOEFF_NORMED)
    # a flat window (clipped or blank) has no likeness; OpenCV scores it arbitrarily
    sh, sw = score.shape
    box = dict(ddepth=cv2.CV_32F, ksize=(tw, th), anchor=(0, 0), borderType=cv2.BORDER_REFLECT)
    mean = cv2.boxFilter(rot, **box)[:sh, :sw]            # window means, indexed like `score`
    score[cv2.boxFilter(rot * rot, **box)[:sh, :sw] - mean * mean < FLAT_VARIANCE] = -1.0
    full = np.full((h, w), -1.0, np.float32)
    full[th // 2:th // 2 + sh, tw // 2:tw // 2 + sw] = score
    return full


def _correlation(features: list[np.ndarray], templates: list[np.ndarray], angles) -> tuple[np.ndarray, np.ndarray]:
    """Best likeness per pixel over `angles` and the angle that gave it; the likeness is the
    mean of the normalised cross-correlations of each feature map with its template."""
    h, w = features[0].shape
    best = np.full((h, w), -1.0, np.float32)
    best_angle = np.zeros((h, w), np.float32)
    centre = (w / 2, h / 2)
    for a in angles:
        # rotating the overview by a makes sections at angle a upright, like the template
        m = cv2.getRotationMatrix2D(centre, a, 1.0)
        scores = [_ncc(cv2.warpAffine(f, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT), t)
                  for f, t in zip(features, templates)]
        full = np.mean(scores, 0, dtype=np.float32)
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
    _, (w, h), a = normalise_rect((cx, cy), (w + 1.0, h + 1.0), a)     # pixel centres -> pixel edges
    if not (0.8 * size_px[0] < w < 1.2 * size_px[0] and 0.8 * size_px[1] < h < 1.2 * size_px[1]):
        return None
    return (cx + x0, cy + y0), (w, h), a


def _polarity(img: np.ndarray, center_px, angle: float, size_px) -> float:
    """+1 where the section is brighter than its surroundings, else -1."""
    q = _upright(img, center_px, angle, (size_px[0] * 1.4, size_px[1] * 1.4))
    h, w = q.shape
    inner = q[int(h * 0.2):int(h * 0.8), int(w * 0.2):int(w * 0.8)].mean()
    ring = np.concatenate([q[:3].ravel(), q[-3:].ravel(), q[:, :3].ravel(), q[:, -3:].ravel()]).mean()
    return 1.0 if inner > ring else -1.0


def _edge_window(img: np.ndarray, center_px, size_px, angle: float, reach: float) -> np.ndarray:
    """The upright window the edge fit searches: the section +-reach of its size, plus 4 px."""
    return _upright(img, center_px, angle, (size_px[0] * (1 + 2 * reach) + 8, size_px[1] * (1 + 2 * reach) + 8))


def _tilt(img: np.ndarray, center_px, size_px, angle: float, pol: float, reach: float) -> float:
    """Degrees to add to `angle` so that the long edges lie straight: each long edge,
    found on its whole length, is located again on SEGMENTS stretches (strongest step
    near it) and a robust line (median of pairwise slopes) fitted through them."""
    W, H = size_px
    p = _edge_window(img, center_px, size_px, angle, reach)
    cx, cy = p.shape[1] / 2, p.shape[0] / 2
    bounds = np.linspace(cx - 0.4 * W, cx + 0.4 * W, SEGMENTS + 1)
    mid = (bounds[:-1] + bounds[1:]) / 2
    near = 2 + 0.4 * W * np.tan(np.radians(MAX_TILT))
    slopes = []
    for outward, expected in ((-1, cy - H / 2), (+1, cy + H / 2)):
        whole = _step(p[:, int(bounds[0]):int(bounds[-1])].mean(1), expected - reach * H, expected + reach * H,
                      outward, pol)
        if whole is None:
            continue
        ys = [_step(p[:, int(x0):max(int(x0) + 1, int(x1))].mean(1), whole - near, whole + near, outward, pol,
                    strongest=True) for x0, x1 in zip(bounds[:-1], bounds[1:])]
        pts = [(mid[k], y) for k, y in enumerate(ys) if y is not None]
        slopes += [(y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(pts) for x2, y2 in pts[i + 1:]]
    if len(slopes) < 3:
        return 0.0
    # the window is the image turned by -angle (rows grow downwards): an edge whose row grows
    # to the right by tan(d) per column belongs to a section lying at angle + d
    return float(np.degrees(np.arctan(np.median(slopes))))


def _step(profile: np.ndarray, lo: float, hi: float, outward: int, pol: float, strongest: bool = False):
    """Sub-pixel position of the innermost (or the strongest) strong step of polarity
    `pol` between lo and hi of `profile`, or None."""
    g = np.gradient(ndimage.gaussian_filter1d(profile.astype(float), 1.0)) * pol * -outward
    lo, hi = max(1, int(lo)), min(len(g) - 2, int(hi))
    if hi <= lo or g[lo:hi + 1].max() <= 0:
        return None
    strong = 0.5 * g[lo:hi + 1].max()
    peaks = [k for k in range(lo, hi + 1) if g[k] >= strong and g[k] >= g[k - 1] and g[k] >= g[k + 1]]
    if not peaks:                        # the strongest step is at the window's end: no edge inside
        return None
    k = max(peaks, key=lambda j: g[j]) if strongest else min(peaks) if outward > 0 else max(peaks)
    a, b, c = g[k - 1], g[k], g[k + 1]
    return k + (0.5 * (a - c) / (a - 2 * b + c) if a - 2 * b + c < 0 else 0.0)


def _fit_edges(img: np.ndarray, center_px, size_px, angle: float, reach: float = 0.25):
    """The section's four edges from the image itself: along each axis, the innermost
    strong step of the section's polarity within +-reach of the expected edge
    (sub-pixel), after the angle is corrected so that the long edges lie straight
    (_tilt; a section drawn askew smears its edges and widens its extent).
    Returns (centre px, size px, angle) or None. Innermost, because the resin's
    own step to the wafer lies further out and may be stronger."""
    W, H = size_px
    pol = _polarity(img, center_px, angle, size_px)
    start = angle
    for _ in range(2):
        d = _tilt(img, center_px, size_px, angle, pol, reach)
        if abs(angle + d - start) > MAX_TILT:
            break
        angle += d
    p = _edge_window(img, center_px, size_px, angle, reach)
    cx, cy = p.shape[1] / 2, p.shape[0] / 2
    cols = p[int(cy - H / 4):int(cy + H / 4) + 1].mean(0)
    rows = p[:, int(cx - W / 4):int(cx + W / 4) + 1].mean(1)
    found = [_step(cols, cx - W / 2 - reach * W, cx - W / 2 + reach * W, -1, pol),
             _step(cols, cx + W / 2 - reach * W, cx + W / 2 + reach * W, +1, pol),
             _step(rows, cy - H / 2 - reach * H, cy - H / 2 + reach * H, -1, pol),
             _step(rows, cy + H / 2 - reach * H, cy + H / 2 + reach * H, +1, pol)]
    if None in found:
        return None
    left, right, top, bottom = found
    w, h = right - left, bottom - top
    if not (0.75 < w / W < 1.33 and 0.75 < h / H < 1.33):
        return None
    dx, dy = (left + right) / 2 - cx, (top + bottom) / 2 - cy
    a = np.radians(angle)
    return ((center_px[0] + dx * np.cos(a) - dy * np.sin(a), center_px[1] + dx * np.sin(a) + dy * np.cos(a)),
            (w, h), angle)


def _edge_bias(image01: np.ndarray, refs: list[dict], pixel_um: float, origin) -> float:
    """How far (px, + outward) the image edge fit puts a section's edges beyond the
    network's, as the median over the confident sections of this overview."""
    out = []
    for d in refs:
        size = np.asarray(d["size_um"]) / pixel_um
        fitted = _fit_edges(image01, (np.asarray(d["center_um"]) - origin) / pixel_um, size, d["angle_deg"])
        if fitted is not None:
            out += [(fitted[1][0] - size[0]) / 2, (fitted[1][1] - size[1]) / 2]
    return float(np.median(out)) if len(out) >= 2 * MIN_REFERENCES else 0.0


def _candidate(image01, prob, center, size, angle, pixel_um, origin, bias_px: float = 0.0) -> tuple[dict, bool] | None:
    """A section at a template match: re-segmented from the probability map when that
    is plausible, then its edges fitted on the image and moved in by `bias_px`
    (_edge_bias); None without enough tissue probability inside. The flag says
    whether the image confirmed all four edges."""
    poly = np.asarray(rectangle_polygon(tuple(center), size, angle))
    if _mean_inside(prob, (poly - origin) / pixel_um) < MIN_SUPPORT:
        return None
    refined = _resegment(prob, (poly - origin) / pixel_um, (size[0] / pixel_um, size[1] / pixel_um))
    if refined is not None:
        (cx, cy), (w, h), angle = refined
        center, size = origin + (cx * pixel_um, cy * pixel_um), (w * pixel_um, h * pixel_um)
    fitted = _fit_edges(image01, (np.asarray(center) - origin) / pixel_um, np.asarray(size) / pixel_um, angle)
    if fitted is not None:
        center, size, angle = (origin + np.asarray(fitted[0]) * pixel_um,
                               ((fitted[1][0] - 2 * bias_px) * pixel_um, (fitted[1][1] - 2 * bias_px) * pixel_um),
                               fitted[2])
    center, size, angle = normalise_rect(center, size, angle)      # angle in [-90, 90) as postprocess's
    poly = np.asarray(rectangle_polygon(tuple(center), size, angle))
    return {"id": -1, "center_um": [float(center[0]), float(center[1])], "size_um": [float(size[0]), float(size[1])],
            "angle_deg": float(angle), "polygon_um": [[float(x), float(y)] for x, y in poly],
            "confidence": _mean_inside(prob, (poly - origin) / pixel_um)}, fitted is not None


def _angles(sources: list[dict], sections: list[dict], size) -> list[float]:
    """Angles to match at: those of the template's sources and of every confident
    detection as wide as they are (fragments and merges of neighbours along the
    sections' length keep the sections' angle), each +-2 deg, on a 2 deg grid."""
    W, H = size
    more = [d for d in sections if d["confidence"] >= MIN_CONFIDENCE and W >= 1.2 * H
            and 0.8 * H <= d["size_um"][1] <= 1.25 * H and d["size_um"][0] >= 1.2 * d["size_um"][1]]
    return sorted({round(d["angle_deg"] / 2) * 2 + s for d in list(sources) + more for s in ANGLE_STEPS})


def _template(small: np.ndarray, sources: list[dict], box, wpx: float, origin) -> np.ndarray:
    """Mean of the sources' upright, normalised views, mirrored four ways."""
    views = []
    for d in sources:
        p = _upright(small, (np.asarray(d["center_um"]) - origin) / wpx, d["angle_deg"], box)
        p = (p - p.mean()) / (p.std() + 1e-6)
        views += [p, p[::-1], p[:, ::-1], p[::-1, ::-1]]
    return np.mean(views, 0).astype(np.float32)


def _rect(d: dict) -> tuple:
    return d["center_um"], d["size_um"], d["angle_deg"]


def _area(d: dict) -> float:
    return d["size_um"][0] * d["size_um"][1]


def _median_size(sections: list[dict]) -> tuple[float, float]:
    return (float(np.median([d["size_um"][0] for d in sections])),
            float(np.median([d["size_um"][1] for d in sections])))


def _extension_is_tissue(image01, prob, cand: dict, parts: list[dict], pixel_um: float, origin) -> bool:
    """Whether the part of `cand` that the fragments `parts` do not cover is tissue:
    the network gives it some tissue probability (>= MIN_SUPPORT), or on the image
    it is nearer the fragments' brightness than that of the band around `cand`
    (the network may miss part of a section, but a resin frame looks like resin)."""
    poly = (np.asarray(cand["polygon_um"]) - origin) / pixel_um
    w, h = cand["size_um"]
    band_um = MARGIN * min(w, h)                   # as wide as the template's border
    grown = (np.asarray(rectangle_polygon(tuple(cand["center_um"]), (w + 2 * band_um, h + 2 * band_um),
                                          cand["angle_deg"])) - origin) / pixel_um
    x0, y0 = np.maximum(np.floor(grown.min(0)).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(grown.max(0)).astype(int) + 1, prob.shape[::-1])
    if x1 - x0 < 3 or y1 - y0 < 3:
        return True

    def mask(polys):
        m = np.zeros((y1 - y0, x1 - x0), np.uint8)
        for q in polys:
            cv2.fillPoly(m, [np.round((q - (x0, y0)) * 16).astype(np.int32)], 1, cv2.LINE_8, 4)
        return m > 0

    inside, band = mask([poly]), mask([grown])
    frag = mask([(np.asarray(d["polygon_um"]) - origin) / pixel_um for d in parts]) & inside
    ext, band = inside & ~frag, band & ~inside
    if not ext.any() or not frag.any() or not band.any():
        return True
    if float(prob[y0:y1, x0:x1][ext].mean()) >= MIN_SUPPORT:
        return True
    img = image01[y0:y1, x0:x1]
    e, t, b = (float(np.median(img[m])) for m in (ext, frag, band))
    return abs(e - t) < abs(e - b)


def _edge_strength(image01, d: dict, pixel_um: float, origin, pol: float, grow_px: float = 0.0) -> float:
    """The weakest of the four edges of `d` grown by `grow_px` a side (where the image
    put them: a match's edges are moved in by _edge_bias): mean brightness 1-3 px inside
    less 1-3 px outside, times `pol` (+1: sections brighter than their surroundings), on
    the median profile across the middle half of each side (a fold across a side leaves
    it as strong). Only 3 px out: where neighbours touch, the gap between them is narrow."""
    c = (np.asarray(d["center_um"]) - origin) / pixel_um
    W, H = np.asarray(d["size_um"]) / pixel_um + 2 * grow_px
    p = _upright(image01, c, d["angle_deg"], (W + 8, H + 8))
    h, w = p.shape
    cx, cy = w / 2, h / 2
    rows = np.median(p[int(cy - H / 4):int(cy + H / 4) + 1], 0)
    cols = np.median(p[:, int(cx - W / 4):int(cx + W / 4) + 1], 1)
    out = []
    for prof, lo, hi in ((rows, cx - W / 2, cx + W / 2), (cols, cy - H / 2, cy + H / 2)):
        lo, hi = int(round(lo)), int(round(hi))
        out.append(prof[lo + 1:lo + 4].mean() - prof[max(0, lo - 3):lo].mean())
        out.append(prof[hi - 3:hi].mean() - prof[hi + 1:hi + 4].mean())
    return float(min(pol * x for x in out))


def _source_edges(image01, prob, sources: list[dict], pixel_um: float, origin,
                  bias_px: float) -> tuple[float, float, float] | None:
    """The sources' polarity (their majority's), median weakest-edge strength and
    `bias_px`, each fitted as a match is (_candidate); None when the image confirmed
    none of them or their edges are under MIN_EDGE (no edge to compare with)."""
    found = [_candidate(image01, prob, d["center_um"], d["size_um"], d["angle_deg"], pixel_um, origin, bias_px)
             for d in sources]
    fitted = [f[0] for f in found if f is not None and f[1]]
    if not fitted:
        return None
    pol = 1.0 if np.mean([_polarity(image01, (np.asarray(d["center_um"]) - origin) / pixel_um, d["angle_deg"],
                                    np.asarray(d["size_um"]) / pixel_um) for d in fitted]) >= 0 else -1.0
    edge = float(np.median([_edge_strength(image01, d, pixel_um, origin, pol, bias_px) for d in fitted]))
    return (pol, edge, bias_px) if edge >= MIN_EDGE else None


def _shows_edges(image01, cand: dict, size, edges: tuple[float, float, float] | None, pixel_um: float,
                 origin) -> bool:
    """Whether a weak match is confirmed by the image: the template's size within WEAK_SIZE
    and its weakest edge WEAK_EDGE..1/WEAK_EDGE x the sources' (`edges`: _source_edges)."""
    if edges is None or any(abs(x / y - 1) > WEAK_SIZE for x, y in zip(cand["size_um"], size)):
        return False
    pol, edge, grow = edges
    return WEAK_EDGE <= _edge_strength(image01, cand, pixel_um, origin, pol, grow) / edge <= 1 / WEAK_EDGE


def _seam_contrast(img: np.ndarray, cands: list[dict], pixel_um: float, origin) -> float:
    """How clearly the image shows a boundary between neighbouring parts: on the profile
    from one part's centre to the other's (averaged over half their short side), the
    largest departure of its middle third from the outer thirds' median, in robust
    s.d. (1.4826 MAD) of those thirds; the largest over all neighbouring pairs."""
    best = 0.0
    for i, a in enumerate(cands):
        for b in cands[i + 1:]:
            ca, cb = np.asarray(a["center_um"]), np.asarray(b["center_um"])
            if np.hypot(*(ca - cb)) > 0.6 * (max(a["size_um"]) + max(b["size_um"])):
                continue
            n = max(8, int(np.hypot(*(ca - cb)) / pixel_um) * 2)
            t = np.linspace(0, 1, n)
            u = (cb - ca) / np.hypot(*(cb - ca))
            v = np.array([-u[1], u[0]])
            half = 0.25 * min(min(a["size_um"]), min(b["size_um"]))
            prof = []
            for off in np.linspace(-half, half, 9):
                pts = (ca[None] + t[:, None] * (cb - ca)[None] + off * v[None] - origin) / pixel_um
                xs = np.clip(np.round(pts[:, 0]).astype(int), 0, img.shape[1] - 1)
                ys = np.clip(np.round(pts[:, 1]).astype(int), 0, img.shape[0] - 1)
                prof.append(img[ys, xs])
            prof = np.mean(prof, 0)
            inner = np.concatenate([prof[: n // 3], prof[-(n // 3):]])
            med = np.median(inner)
            sd = max(1.4826 * np.median(np.abs(inner - med)), 1 / 255)      # at least one grey level
            mid = prof[n // 3: -(n // 3)]
            best = max(best, float(np.abs(mid - med).max() / sd))
    return best


def _match(image01, prob, sections, features, sources, pixel_um, wpx, origin,
           bias_px: float = 0.0) -> tuple[list, list] | None:
    """One matching pass with the template learnt from `sources`: the matches, each as
    (section dict, indices of the `sections` it replaces), and the matches whose four
    edges the image confirmed; None when the template does not fit the image."""
    W, H = _median_size(sources)
    box = ((W + 2 * MARGIN * H) / wpx, (H + 2 * MARGIN * H) / wpx)
    if min(box) < 6 or box[0] >= features[0].shape[1] or box[1] >= features[0].shape[0]:
        return None
    templates = [_template(f, sources, box, wpx, origin) for f in features]
    score, score_angle = _correlation(features, templates, _angles(sources, sections, (W, H)))
    peaks = np.argwhere((score >= ndimage.maximum_filter(score, size=max(3, int(0.6 * H / wpx))))
                        & (score >= WEAK_NCC))
    peaks = peaks[np.argsort(-score[peaks[:, 0], peaks[:, 1]])]
    removed, added, confirmed, parts = set(), [], [], {}
    edge = _source_edges(image01, prob, sources, pixel_um, origin, bias_px)
    centres = np.asarray([d["center_um"] for d in sections], float).reshape(-1, 2)
    longest = np.asarray([max(d["size_um"]) for d in sections], float)
    for r, c in peaks:
        found = _candidate(image01, prob, origin + (c * wpx, r * wpx), (W, H), float(score_angle[r, c]),
                           pixel_um, origin, bias_px)
        if found is None or any(rect_iou(_rect(found[0]), _rect(a)) > 0.1 for a, _ in added):
            continue
        cand, fitted = found
        if score[r, c] < MIN_NCC and not (fitted and _shows_edges(image01, cand, (W, H), edge, pixel_um, origin)):
            continue
        near = np.flatnonzero(np.hypot(*(centres - cand["center_um"]).T) < max(cand["size_um"]) + longest)
        ious = {k: rect_iou(_rect(cand), _rect(sections[k])) for k in near if k not in removed}
        hits = [k for k, v in ious.items() if v > 0.1]
        if all(_area(sections[k]) < FRAGMENT * W * H for k in hits):
            if hits and not _extension_is_tissue(image01, prob, cand, [sections[k] for k in hits], pixel_um, origin):
                continue                 # the match would add a resin frame to a tight section
            removed.update(hits)
            added.append((cand, set(hits)))
            confirmed += [cand] if fitted else []
        elif len(hits) == 1 and _area(sections[hits[0]]) > MERGED * W * H:
            k, v = hits[0], ious[hits[0]]
            if v * (_area(cand) + _area(sections[k])) / (1 + v) > 0.8 * _area(cand):   # inside the merged blob
                parts.setdefault(k, []).append((cand, fitted))
    for k, inside in parts.items():
        cands = [c for c, _ in inside]
        apart = all(rect_iou(_rect(a), _rect(b)) < 0.1 for i, a in enumerate(cands) for b in cands[i + 1:])
        if (len(cands) >= 2 and apart and sum(map(_area, cands)) > 0.6 * _area(sections[k])
                and (_seam_contrast(image01, cands, pixel_um, origin) >= SEAM
                     or all(fitted and _shows_edges(image01, c, (W, H), edge, pixel_um, origin)
                            for c, fitted in inside))):
            added += [(c, {k}) for c in cands]
            confirmed += [c for c, fitted in inside if fitted]
    return added, confirmed


def has_template(sections: list[dict], shape, pixel_um: float, origin_um) -> bool:
    """Whether `sections` hold enough confident whole ones for find_similar's template."""
    return len(_references(sections, shape, pixel_um, np.asarray(origin_um, float))) >= MIN_REFERENCES


def find_similar(image01: np.ndarray, prob: np.ndarray, sections: list[dict], pixel_um: float, origin_um,
                 work_pixel_um: float = 8.0) -> list[dict]:
    """`sections` (postprocess's dicts) plus the sections found by their likeness to the
    confident ones; ids renumbered in reading order. Unchanged with fewer than
    MIN_REFERENCES confident whole sections.

    When the matches whose edges the image confirmed are enough and differ in size
    from the references (these may be fragments of sections the network split), the
    template is learnt again from those matches and the matching repeated on the
    network's sections; its matches take precedence, and a first-pass match stays
    (with what it replaced) only where the second pass put no match."""
    origin = np.asarray(origin_um, float)
    refs = _references(sections, prob.shape, pixel_um, origin)
    if len(refs) < MIN_REFERENCES:
        return sections
    factor = min(1.0, pixel_um / work_pixel_um)
    wpx = pixel_um / factor
    small = resample(np.asarray(image01, np.float32), factor).astype(np.float32)
    small = cv2.GaussianBlur(small, (0, 0), SMOOTH_PX)
    features = [small, resample(np.asarray(prob, np.float32), factor, shape=small.shape).astype(np.float32)]
    bias = _edge_bias(image01, refs, pixel_um, origin)
    first = _match(image01, prob, sections, features, refs, pixel_um, wpx, origin, bias)
    if first is None:
        return sections
    added, confirmed = first
    if len(confirmed) >= MIN_REFERENCES:
        if any(abs(c / r - 1) > RELEARN for c, r in zip(_median_size(confirmed), _median_size(refs))):
            second = _match(image01, prob, sections, features, confirmed, pixel_um, wpx, origin, bias)
            if second is not None:
                again = second[0]
                added = again + [(c, hit) for c, hit in added
                                 if all(rect_iou(_rect(c), _rect(a)) <= 0.1 for a, _ in again)]
    removed = set().union(*(hit for _, hit in added))
    out = [d for k, d in enumerate(sections) if k not in removed] + [c for c, _ in added]
    return numbered(out)
