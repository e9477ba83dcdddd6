"""Split a ribbon that the network outlined as one strip into its sections.

Serial sections picked up as a ribbon lie side by side, a few µm of resin
apart or touching, and the network may take the whole ribbon, gaps and
all, for one piece of tissue. The seed's post-processing then drops the
strip (too elongated for a section) and the find-similar step has no
section to learn from. On the overview the gaps still show: thin lines
across the strip, of the resin's grey, repeating at the sections' pitch.
So along each strip too elongated for a section, the image's profile (the
median across the strip, less its running median) is searched for a
periodic train of narrow dips or peaks; where one is found at a clear
contrast, the strip is cut there into sections, and each section's edges are
fitted on the image (the gaps' and the frame's steps). The find-similar step
then learns its template from them.

It runs only where the network's own sections give no template (fewer than
MIN_REFERENCES confident whole ones): where they do, find similar already
finds the sections inside a strip, and better than these cuts (on the test
family running it always cost one false positive and 0.006 of mean IoU:
rows of sections each turned its own way are cut square). None of the four
benchmark families has an overview without a template, so they are
unchanged. The limits below were set before it was first run, from the
issue's section ranges (150 µm to 2 mm at up to 4:1); on overviews from a
generator written outside this code (a third of them ribbons, the network
drawing most as one strip) detection went from F1 0.685 to 0.839: the
sections of ribbons with visible gaps are found, touching ones (no gap to
see) are not.
"""
from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

from common.geometry import normalise_rect, rectangle_polygon
from wafer.detect import MAX_ASPECT, _mean_inside
from wafer.detect_frames import _to_image
from wafer.detect_similar import _fit_edges, _upright

MIN_SECTION_UM = 100.0    # strips narrower than this are not ribbons of sections
MIN_PITCH_UM = 35.0       # the shortest section side (150 µm at 4:1, less jitter); shorter is texture
MAX_GAP_UM = 50.0         # resin gaps wider than this the network does not bridge
MIN_CORRELATION = 0.3     # the profile's autocorrelation at the pitch: a periodic train
MIN_CONTRAST = 4.0        # each gap this many robust s.d. of the profile off its running median
PITCH_TOLERANCE = 0.25    # consecutive gaps this close to the pitch


def _strips(prob: np.ndarray, pixel_um: float, threshold: float) -> list[tuple]:
    """(centre px, (long, short) px, angle) of the components of `prob` > threshold
    too elongated to be one section."""
    mask = ndimage.binary_closing(np.pad(prob > threshold, 1), iterations=1)[1:-1, 1:-1]
    lab, _ = ndimage.label(mask)
    out = []
    for k, box in enumerate(ndimage.find_objects(lab), 1):       # each component in its own box
        ys, xs = np.nonzero(lab[box] == k)
        if len(xs) * pixel_um ** 2 < MIN_SECTION_UM ** 2:
            continue
        ys, xs = ys + box[0].start, xs + box[1].start
        c, size, a = cv2.minAreaRect(np.stack([xs, ys], 1).astype(np.float32))
        c, size, a = normalise_rect(c, (size[0] + 1.0, size[1] + 1.0), a)
        if size[1] * pixel_um >= MIN_SECTION_UM and size[0] > MAX_ASPECT * size[1]:
            out.append((c, size, a))
    return out


def _gaps(profile: np.ndarray, pixel_um: float, short_px: float) -> tuple[list[float], float] | None:
    """Positions (px along the strip) of a periodic train of narrow dips or peaks in
    `profile`, and its pitch; None without a clear one."""
    n = len(profile)
    window = max(5, int(2 * MAX_GAP_UM / pixel_um) | 1)
    dev = profile - ndimage.median_filter(profile, size=window, mode="nearest")
    sd = 1.4826 * np.median(np.abs(dev - np.median(dev))) + 1e-6
    lo = max(int(MIN_PITCH_UM / pixel_um), 3)
    hi = min(n // 2, int(5 * short_px))
    if hi <= lo:
        return None
    best = None
    for sign in (1.0, -1.0):
        g = np.maximum(sign * dev, 0.0)
        g0 = g - g.mean()
        ac = np.correlate(g0, g0, "full")[n - 1:] / (np.dot(g0, g0) + 1e-12)
        lag = lo + int(np.argmax(ac[lo:hi + 1]))
        if ac[lag] < MIN_CORRELATION:
            continue
        peaks = [k for k in range(1, n - 1) if g[k] >= MIN_CONTRAST * sd and g[k] >= g[k - 1] and g[k] >= g[k + 1]]
        kept: list[int] = []
        for k in sorted(peaks, key=lambda j: -g[j]):         # strongest first, one per pitch
            if all(abs(k - j) > 0.6 * lag for j in kept):
                kept.append(k)
        kept.sort()
        steps = np.diff(kept)
        if len(kept) < 2 or np.any(np.abs(steps / lag - np.round(steps / lag)) > PITCH_TOLERANCE):
            continue
        if best is None or ac[lag] > best[2]:
            best = ([float(k) for k in kept], float(lag), float(ac[lag]))
    return None if best is None else best[:2]


def split_ribbons(image01: np.ndarray, prob: np.ndarray, pixel_um: float, origin_um,
                  threshold: float = 0.5, sections: list[dict] = ()) -> list[dict]:
    """Sections (postprocess's dicts, ids -1) cut from the strips the network drew over
    whole ribbons (its probability > `threshold`, as postprocess's) and from `sections`
    (a short ribbon passes for one section); empty where none shows a periodic train of
    gaps."""
    origin = np.asarray(origin_um, float)
    out = []
    kept = [((np.asarray(d["center_um"]) - origin) / pixel_um, np.asarray(d["size_um"]) / pixel_um, d["angle_deg"])
            for d in sections]
    for c, (L, W), angle in _strips(prob, pixel_um, threshold) + kept:
        win = _upright(np.asarray(image01, np.float32), c, angle, (L, W))
        h, w = win.shape
        profile = np.median(win[int(0.2 * h):max(int(0.8 * h), int(0.2 * h) + 1)], 0).astype(float)
        found = _gaps(profile, pixel_um, W)
        if found is None:
            continue
        gaps, pitch = found
        cuts = ([gaps[0] - pitch] if gaps[0] - pitch >= -0.25 * pitch else [0.0]) + gaps
        cuts += [gaps[-1] + pitch] if gaps[-1] + pitch <= w + 0.25 * pitch else [float(w)]
        for a, b in zip(cuts[:-1], cuts[1:]):
            if abs((b - a) / pitch - 1) > PITCH_TOLERANCE:
                continue                                     # a piece cut off at the strip's end
            a, b = max(a, 0.0), min(b, float(w))
            centre_px = _to_image(c, angle, w, h, ((a + b) / 2, h / 2))[0]
            size_px, ang = (b - a, float(h)), angle
            fitted = _fit_edges(image01, centre_px, size_px, ang, reach=0.15)
            if fitted is not None:                           # the gaps' and the frame's steps
                centre_px, size_px, ang = fitted
            cen, size, ang = normalise_rect(origin + np.asarray(centre_px) * pixel_um,
                                            (size_px[0] * pixel_um, size_px[1] * pixel_um), ang)
            poly = np.asarray(rectangle_polygon(tuple(cen), size, ang))
            out.append({"id": -1, "center_um": [float(cen[0]), float(cen[1])],
                        "size_um": [float(size[0]), float(size[1])], "angle_deg": float(ang),
                        "polygon_um": [[float(x), float(y)] for x, y in poly],
                        "confidence": _mean_inside(prob, (poly - origin) / pixel_um)})
    return out


def replace_strips(sections: list[dict], cuts: list[dict], pixel_um: float, origin_um) -> list[dict]:
    """`sections` without those that two or more of the ribbon's `cuts` lie inside (a strip
    postprocess kept as one section), plus the cuts."""
    origin = np.asarray(origin_um, float)
    centres = [tuple(map(float, (np.asarray(c["center_um"]) - origin) / pixel_um)) for c in cuts]

    def tiled(d):
        poly = ((np.asarray(d["polygon_um"]) - origin) / pixel_um).astype(np.float32)
        return sum(cv2.pointPolygonTest(poly, p, False) >= 0 for p in centres) >= 2
    return [d for d in sections if not tiled(d)] + cuts
