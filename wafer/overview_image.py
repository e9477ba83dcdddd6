"""Reading an overview image from disk, whatever wrote it (a `wafer mosaic`
OME-TIFF, a 16-bit TIFF from elsewhere, a PNG or JPEG): for detection and
annotation alike."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def read_overview(path: Path) -> np.ndarray:
    """Grey overview from TIFF (tifffile: large/16-bit mosaics) or PNG/JPEG (cv2)."""
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile
        img = tifffile.imread(str(path))
    else:
        import cv2
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if img is not None and img.ndim == 3:
            img = img[..., :3][..., ::-1]         # BGR -> RGB; averaged to grey later
    if img is None:
        raise ValueError(f"cannot read image {path}")
    img = np.squeeze(np.asarray(img))
    if img.ndim == 3 and img.shape[0] in (3, 4) and img.shape[-1] not in (3, 4):
        img = np.moveaxis(img, 0, -1)             # planar TIFF
    if img.ndim not in (2, 3):
        raise ValueError(f"{path}: expected a 2-D image, got shape {img.shape}")
    return img
