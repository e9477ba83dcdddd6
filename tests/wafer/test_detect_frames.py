"""Resin frames the network counted as tissue are taken off; tissue is never cut."""
from __future__ import annotations

import cv2
import numpy as np

from wafer.detect import rect_iou
from wafer.detect_frames import strip_frame
from wafer.sections import rectangle_polygon

PX = 4.0
CENTRE = (150.0, 120.0)          # px
TISSUE = (160, 90)               # px
FRAME = 14                       # px of resin on each side
ANGLE = 12.0


def _box(size):
    return np.round(cv2.boxPoints((CENTRE, size, ANGLE))).astype(np.int32)


def _image(frame_level: float, seed: int = 1, textured_rim: bool = False) -> np.ndarray:
    """Tissue (textured) in a smooth resin frame on a wafer, with detector noise;
    ``textured_rim``: the frame is tissue of another shade, as textured as the middle."""
    rng = np.random.default_rng(seed)
    img = np.full((260, 320), 60.0, np.float32)
    cv2.fillPoly(img, [_box((TISSUE[0] + 2 * FRAME, TISSUE[1] + 2 * FRAME))], frame_level)
    texture = cv2.GaussianBlur(rng.normal(0, 60, img.shape).astype(np.float32), (0, 0), 1.5)   # s.d. ~11
    if textured_rim:
        rim = np.zeros_like(img, np.uint8)
        cv2.fillPoly(rim, [_box((TISSUE[0] + 2 * FRAME, TISSUE[1] + 2 * FRAME))], 1)
        img[rim > 0] += texture[rim > 0]
    tissue = np.zeros_like(img, np.uint8)
    cv2.fillPoly(tissue, [_box(TISSUE)], 1)
    img[tissue > 0] = 150.0 + texture[tissue > 0]
    img += rng.normal(0, 4, img.shape).astype(np.float32)
    return np.clip(img, 0, 255) / 255


def _det(size_px) -> dict:
    c = (CENTRE[0] * PX, CENTRE[1] * PX)
    size = (size_px[0] * PX, size_px[1] * PX)
    return {"id": 0, "center_um": list(c), "size_um": list(size), "angle_deg": ANGLE,
            "polygon_um": [list(p) for p in rectangle_polygon(c, size, ANGLE)], "confidence": 0.9}


TRUTH = ((CENTRE[0] * PX, CENTRE[1] * PX), (TISSUE[0] * PX, TISSUE[1] * PX), ANGLE)


def _iou(d) -> float:
    return rect_iou((d["center_um"], d["size_um"], d["angle_deg"]), TRUTH)


def test_a_frame_counted_as_tissue_is_taken_off():
    framed = _det((TISSUE[0] + 2 * FRAME, TISSUE[1] + 2 * FRAME))
    assert _iou(framed) < 0.7
    for level in (100.0, 210.0):                      # resin darker or brighter than the tissue
        out = strip_frame(_image(level), framed, PX, np.zeros(2))
        assert _iou(out) > 0.9
        assert abs(out["size_um"][0] - TISSUE[0] * PX) < 3 * PX


def test_a_section_without_frame_keeps_its_rectangle():
    tight = _det(TISSUE)
    assert strip_frame(_image(100.0), tight, PX, np.zeros(2)) == tight


def test_tissue_of_two_shades_is_not_cut():
    """The outer band is darker but as textured as the middle (tissue of two contrasts,
    not resin): nothing is taken off."""
    whole = _det((TISSUE[0] + 2 * FRAME, TISSUE[1] + 2 * FRAME))
    assert strip_frame(_image(100.0, textured_rim=True), whole, PX, np.zeros(2)) == whole


def test_a_section_cut_by_the_border_is_left_alone():
    """Sides that reach past the overview's border show only its reflection: they keep
    their edges and take no part in the tests; with one side seen, nothing changes."""
    img = _image(100.0)[:, 70:]                      # the section's left side cut off
    framed = _det((TISSUE[0] + 2 * FRAME, TISSUE[1] + 2 * FRAME))
    cut = {**framed, "center_um": [framed["center_um"][0] - 70 * PX, framed["center_um"][1]],
           "polygon_um": [[x - 70 * PX, y] for x, y in framed["polygon_um"]]}
    assert min(p[0] for p in cut["polygon_um"]) < 0
    assert strip_frame(img, cut, PX, np.zeros(2)) == cut


def test_the_taken_off_frame_leaves_the_tissue_centred():
    framed = _det((TISSUE[0] + 2 * FRAME, TISSUE[1] + 2 * FRAME))
    out = strip_frame(_image(100.0, seed=3), framed, PX, np.zeros(2))
    assert out is not framed
    assert np.hypot(out["center_um"][0] - CENTRE[0] * PX, out["center_um"][1] - CENTRE[1] * PX) < 0.3 * PX
