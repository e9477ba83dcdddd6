"""Checks of an OME-Zarr volume against what its readers and the stage say."""
import cv2
import numpy as np
import zarr


def ngff_levels(root):
    """Each level's (scale, translation) over (z, y, x), as the store's NGFF
    metadata says, checked by ome-zarr-models (the spec's own pydantic models)."""
    from ome_zarr_models.v05.image import Image
    image = Image.from_zarr(root if isinstance(root, zarr.Group) else zarr.open_group(root, mode="r"))
    ms = image.ome_attributes.multiscales[0]
    assert [a.name for a in ms.axes] == ["z", "y", "x"] and {a.unit for a in ms.axes} == {"micrometer"}
    out = []
    for ds in ms.datasets:
        scale, shift = ds.coordinateTransformations
        out.append((np.array(scale.scale), np.array(shift.translation)))
    return out


def centre_offset_px(plane, scale, shift, d):
    """Where tile ``d`` sits in ``plane`` relative to its stage position: the
    sub-pixel shift (px) between the tile's centre, turned by its scan rotation
    (cv2, not the writer's code), and the volume around the stage position."""
    cx, cy = (d.stage["x"] * 1e6 - shift[2]) / scale[2], (d.stage["y"] * 1e6 - shift[1]) / scale[1]
    r = 24
    ix, iy = round(cx), round(cy)
    patch = plane[iy - r:iy + r, ix - r:ix + r].astype(np.float32)
    h, w = d.image.shape
    # the stage position is the frame's geometric centre: pixel-centre coordinates ((w-1)/2, (h-1)/2)
    m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), -d.rotation_deg, 1.0)
    m[:, 2] += (r - (w - 1) / 2 + (cx - ix), r - (h - 1) / 2 + (cy - iy))   # ... moved to it in the patch
    expect = cv2.warpAffine(d.image, m, (2 * r, 2 * r), flags=cv2.INTER_LINEAR).astype(np.float32)
    win = cv2.createHanningWindow((2 * r, 2 * r), cv2.CV_32F)
    (dx, dy), _ = cv2.phaseCorrelate(expect, patch, win)
    return float(np.hypot(dx, dy))
