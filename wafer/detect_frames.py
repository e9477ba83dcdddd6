"""Take off a resin frame that the network counted as tissue.

Sections are cut from a block trimmed wider than its tissue, so each carries a
frame of embedding resin. Where the frame differs from the wafer more than
from the tissue, the network may outline section and frame together, and the
grid built from it images resin. On the overview the frame shows as a band
inside the detection that is smoother than tissue (resin is amorphous; tissue
has cells, vessels and fibres) with a step of one sign to the tissue on all
four sides. When a detection shows such a band, its rectangle becomes the
band's inner edge. The find-similar step runs afterwards and replaces a
rectangle cut too small by the template of its neighbours.

Chosen on the validation families and on overviews from a generator written
outside this code (not shipped; README), never on the test family: validation
F1 0.989 -> 0.995, validation looks 0.852 -> 0.861, the independent overviews
0.663 -> 0.723; the training family, the test family and the mosaic unchanged.
The coarse scale alone missed frames narrower than about 15 px (its blur
mixes in their edges); the fine scale alone found none of the independent
overviews' grainy resin frames.
"""
from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

from common.geometry import normalise_rect, rectangle_polygon
from wafer.detect_similar import _upright

# the band's texture at most this x the tissue's, at one of two scales: the fine one sees
# narrow frames (the coarse one mixes in their edges), the coarse one resin with grainy noise
SCALES = (((1.0, 2.5), 0.5), ((1.5, 6.0), 0.8))
MAX_INSET = 0.35      # the inner step is searched this far in from each side, x the side's length
MIN_SIDE_PX = 20      # detections narrower than this are left alone


def _texture(img: np.ndarray, fine: float, coarse: float) -> np.ndarray:
    """Band-pass (fine-coarse px): cells and fibres, without the shading."""
    return np.abs(cv2.GaussianBlur(img, (0, 0), fine) - cv2.GaussianBlur(img, (0, 0), coarse))


def _inner_steps(profile: np.ndarray) -> tuple[int, int]:
    """Positions of the strongest step within MAX_INSET of each end of a profile."""
    g = np.gradient(ndimage.gaussian_filter1d(profile, 1.0))
    n = len(g)
    hi = max(3, int(MAX_INSET * n))
    return 2 + int(np.argmax(np.abs(g[2:hi]))), n - 3 - int(np.argmax(np.abs(g[::-1][2:hi])))


def _to_image(c, angle_deg: float, w: int, h: int, pts) -> np.ndarray:
    """Image px of points (x, y) of the upright w x h window at `c` (as _upright cuts it:
    the centre at w/2, h/2, turned by angle_deg)."""
    a = np.radians(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return np.asarray(c, float) + (np.asarray(pts, float).reshape(-1, 2) - (w / 2, h / 2)) @ rot.T


def _sides_seen(c, angle_deg: float, w: int, h: int, shape) -> list[bool]:
    """Whether each side (left, right, top, bottom) of the upright w x h window at `c`
    lies inside the image (2 px in): a side beyond the border shows only its reflection."""
    seen = []
    for ends in ([(0, 0), (0, h)], [(w, 0), (w, h)], [(0, 0), (w, 0)], [(0, h), (w, h)]):
        p = _to_image(c, angle_deg, w, h, ends)
        seen.append(bool(p.min() >= 2 and p[:, 0].max() <= shape[1] - 3 and p[:, 1].max() <= shape[0] - 3))
    return seen


def strip_frame(image01: np.ndarray, d: dict, pixel_um: float, origin) -> dict:
    """`d` (a section dict) without the resin frame it includes, or `d` unchanged. A side
    cut by the image border keeps its edge and does not take part in the tests."""
    c = (np.asarray(d["center_um"], float) - origin) / pixel_um
    W, H = np.asarray(d["size_um"], float) / pixel_um
    if min(W, H) < MIN_SIDE_PX:
        return d
    win = _upright(np.asarray(image01, np.float32), c, d["angle_deg"], (W, H))
    h, w = win.shape
    seen = _sides_seen(c, d["angle_deg"], w, h, image01.shape)
    if sum(seen) < 2:
        return d
    left, right = _inner_steps(win[int(h * 0.3):int(h * 0.7)].mean(0))
    top, bottom = _inner_steps(win[:, int(w * 0.3):int(w * 0.7)].mean(1))
    left, right, top, bottom = (left if seen[0] else 0, right if seen[1] else w, top if seen[2] else 0,
                                bottom if seen[3] else h)
    if right - left < 8 or bottom - top < 8:
        return d
    inner = np.s_[top + 2:bottom - 1, left + 2:right - 1]
    sides = [s for s, ok in zip([np.s_[top + 2:bottom - 1, 1:left - 1], np.s_[top + 2:bottom - 1, right + 2:w - 1],
                                 np.s_[1:top - 1, left + 2:right - 1], np.s_[bottom + 2:h - 1, left + 2:right - 1]],
                                seen) if ok]
    if any(win[s].size < 4 for s in sides):
        return d
    level = float(np.median(win[inner]))
    diffs = np.array([float(np.median(win[s])) - level for s in sides])
    if not (np.all(diffs > 0) or np.all(diffs < 0)):
        return d                                         # no band of one sign all round: no frame
    for (fine, coarse), most in SCALES:
        tex = _texture(win, fine, coarse)
        if np.median(np.concatenate([tex[s].ravel() for s in sides])) <= most * (np.median(tex[inner]) + 1e-6):
            break
    else:
        return d                                         # as textured as the inside: tissue, not resin
    centre = origin + _to_image(c, d["angle_deg"], w, h, ((left + right) / 2, (top + bottom) / 2))[0] * pixel_um
    # the edges lie at the steps themselves: the tissue spans right - left pixels
    centre, size, angle = normalise_rect(centre, ((right - left) * pixel_um, (bottom - top) * pixel_um),
                                         d["angle_deg"])
    poly = rectangle_polygon(tuple(centre), size, angle)
    return {**d, "center_um": [float(centre[0]), float(centre[1])], "size_um": [float(size[0]), float(size[1])],
            "angle_deg": float(angle), "polygon_um": [[float(x), float(y)] for x, y in poly]}


def strip_frames(image01: np.ndarray, sections: list[dict], pixel_um: float, origin_um) -> list[dict]:
    """strip_frame on every section."""
    origin = np.asarray(origin_um, float)
    return [strip_frame(image01, d, pixel_um, origin) for d in sections]
