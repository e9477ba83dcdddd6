"""A ribbon the network outlined as one strip is cut at the resin gaps between its
sections; a strip without such gaps is left alone."""
from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from wafer.detect import rect_iou, sections_from_probability
from wafer.detect_ribbons import split_ribbons

PX = 4.0
N = 14                           # a ribbon over five times longer than wide: no section's shape
SECTION = (36, 90)               # px along the ribbon, across it: 144 x 360 µm sections
GAP = 3                          # px of resin between neighbours (12 µm)
ANGLE = 7.0
START = (50.0, 90.0)             # px: centre of the first section


def _centres():
    a = np.radians(ANGLE)
    step = (SECTION[0] + GAP) * np.array([np.cos(a), np.sin(a)])
    return [np.asarray(START) + k * step for k in range(N)]


def _box(c, size):
    return np.round(cv2.boxPoints((tuple(map(float, c)), tuple(map(float, size)), ANGLE))).astype(np.int32)


def _strip_box(rim: int = 8):
    c = _centres()
    mid = (c[0] + c[-1]) / 2
    length = N * SECTION[0] + (N - 1) * GAP + 2 * rim
    return _box(mid, (length, SECTION[1] + 2 * rim))


def _overview(gaps: bool, seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(image in [0, 1], the network's probability: the whole strip, gaps and all)."""
    rng = np.random.default_rng(seed)
    img = np.full((240, 640), 70.0, np.float32)
    cv2.fillPoly(img, [_strip_box()], 95.0)                       # the ribbon's resin
    texture = cv2.GaussianBlur(rng.normal(0, 50, img.shape).astype(np.float32), (0, 0), 1.5)
    tissue = np.zeros(img.shape, np.uint8)
    for c in _centres():
        w = SECTION[0] + (GAP if not gaps else 0)
        cv2.fillPoly(tissue, [_box(c, (w, SECTION[1]))], 1)
    img[tissue > 0] = 150.0 + texture[tissue > 0]
    img += rng.normal(0, 4, img.shape).astype(np.float32)
    prob = np.full(img.shape, 0.02, np.float32)
    cv2.fillPoly(prob, [_strip_box(rim=4)], 0.95)
    return np.clip(img, 0, 255) / 255, prob


def _ious(dets):
    truth = [((c[0] * PX, c[1] * PX), (SECTION[1] * PX, SECTION[0] * PX), ANGLE + 90) for c in _centres()]
    return [max((rect_iou((d["center_um"], d["size_um"], d["angle_deg"]), t) for d in dets), default=0.0)
            for t in truth]


def test_a_ribbon_drawn_as_one_strip_is_cut_at_its_gaps():
    img, prob = _overview(gaps=True)
    dets = split_ribbons(img, prob, PX, (0.0, 0.0))
    assert len(dets) == N
    assert min(_ious(dets)) > 0.8


def test_a_strip_without_gaps_is_not_cut():
    img, prob = _overview(gaps=False)
    assert split_ribbons(img, prob, PX, (0.0, 0.0)) == []


@pytest.mark.parametrize("gaps, found", [(True, N), (False, 0)])
def test_detection_finds_the_sections_of_a_ribbon_the_network_saw_as_one(gaps, found):
    """No confident section to learn a template from: the ribbon step gives them."""
    img, prob = _overview(gaps=gaps)
    dets = sections_from_probability(img, prob, PX, (0.0, 0.0), SimpleNamespace(net_pixel_um=8.0))
    assert len(dets) == found
    if found:
        assert min(_ious(dets)) > 0.8 and [d["id"] for d in dets] == list(range(found))


def test_a_strip_kept_whole_at_a_low_threshold_gives_way_to_its_sections():
    """A faint halo around the ribbon, detection at threshold 0.3: the strip is short
    enough to pass as one section, so it is replaced by the sections cut from it
    (never both), and the cut follows the same threshold."""
    img, prob = _overview(gaps=True)
    halo = np.zeros_like(prob)
    cv2.fillPoly(halo, [_strip_box(rim=12)], 0.4)
    prob = np.maximum(prob, halo)
    dets = sections_from_probability(img, prob, PX, (0.0, 0.0), SimpleNamespace(net_pixel_um=8.0), threshold=0.3)
    assert len(dets) == N and min(_ious(dets)) > 0.8
