"""Tiles in the stage frame, and the NGFF transforms that say where a volume lies.

Stage pixels: stage position / pixel size; +x = +column, +y = +row
(common/geometry.py). A tile's stage position is its frame's geometric
centre (the simulator renders pixel centre ((w-1)/2, (h-1)/2) there), so the
CENTRE of its pixel (col j, row i) lies at centre + R(rotation) @
(j + 1/2 - w/2, i + 1/2 - h/2) stage pixels (layout.pixel_stage_m; the
pixel's top-left corner is TileRecord.frame_topleft_px's convention). NGFF
translations, like this module's array pixels, name pixel centres.
"""
from __future__ import annotations

import math
from typing import Optional

import cv2
import numpy as np

from acq.writers.layout import TileRecord

AXES = [{"name": "z", "type": "space", "unit": "micrometer"},
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"}]


def tile_to_stage(rec: TileRecord) -> np.ndarray:
    """2x3 affine: tile pixel centre (col, row) -> stage pixel centre."""
    th = math.radians(rec.rotation_deg)
    c, s = math.cos(th), math.sin(th)
    cx, cy = rec.center_px
    hw, hh = (rec.width - 1) / 2.0, (rec.height - 1) / 2.0
    return np.array([[c, -s, cx - (c * hw - s * hh)], [s, c, cy - (s * hw + c * hh)]])


def footprint(rec: TileRecord) -> tuple[tuple[float, float], tuple[float, float]]:
    """The stage-pixel bounding box of the tile's pixel centres: (min x, min y), (max x, max y)."""
    corners = tile_to_stage(rec) @ np.array([[0, rec.width - 1, 0, rec.width - 1],
                                             [0, 0, rec.height - 1, rec.height - 1], [1, 1, 1, 1]], float)
    return (corners[0].min(), corners[1].min()), (corners[0].max(), corners[1].max())


def resample(rec: TileRecord, image: np.ndarray, origin) -> tuple[int, int, np.ndarray, Optional[np.ndarray]]:
    """The tile in a stage-frame array whose pixel (0, 0) is stage pixel
    ``origin``: (x0, y0) of its box, its pixels, and the mask of the pixels it
    covers (None: all). Unrotated tiles (under half a pixel of turn at the
    corners) are not resampled, only placed at the nearest pixel."""
    m = tile_to_stage(rec)
    m[:, 2] -= origin
    turn = abs(math.radians(rec.rotation_deg)) * max(rec.width, rec.height) / 2
    if turn < 0.5:
        return round(m[0, 2]), round(m[1, 2]), image, None
    (fx0, fy0), (fx1, fy1) = footprint(rec)
    x0, y0 = math.floor(fx0 - origin[0]), math.floor(fy0 - origin[1])
    size = (math.ceil(fx1 - origin[0]) - x0 + 1, math.ceil(fy1 - origin[1]) - y0 + 1)
    m[:, 2] -= (x0, y0)
    # replicate at the border: no dark seam where the mask reaches half a pixel past the edge
    pixels = cv2.warpAffine(image, m, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    mask = cv2.warpAffine(np.ones_like(image), m, size, flags=cv2.INTER_NEAREST,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)
    return x0, y0, pixels, mask


def ngff_datasets(levels: int, slice_um: float, origin: tuple[int, int], px_m: float) -> list[dict]:
    """Per level: scale (slice, pixel * 2**l) and translation (stage µm of the
    centre of its pixel (0, 0); a box-mean pixel's centre lies half a block in)."""
    px_um = px_m * 1e6
    out = []
    for l in range(levels):
        half = (2 ** l - 1) / 2
        out.append({"path": str(l), "coordinateTransformations": [
            {"type": "scale", "scale": [slice_um, px_um * 2 ** l, px_um * 2 ** l]},
            {"type": "translation", "translation": [0.0, (origin[1] + half) * px_um, (origin[0] + half) * px_um]}]})
    return out
