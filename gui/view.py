"""napari window on a run's OUTDIR: the overview at the bottom, the section
volumes above it, tiles (optional) on top, all in stage micrometres. The
layers come from acq/view_layers.py; here they become napari layers with
scale / translate / affine set explicitly (no reader plugin is involved).
napari is imported only when a window or a layer is made."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from acq.view_layers import LayerSpec, run_layers

_SEE_THROUGH = "gray, see-through at the bottom"


def _see_through_gray():
    """Grey whose lowest value is transparent: the unwritten (fill 0) parts of
    a section volume then do not hide the overview below it. Pixels at or
    below the lower contrast limit are see-through as well."""
    from napari.utils import Colormap
    return Colormap(colors=[[0, 0, 0, 0], [0, 0, 0, 1], [1, 1, 1, 1]], controls=[0.0, 1e-3, 1.0],
                    name=_SEE_THROUGH)


def _tile_data(path: Path) -> np.ndarray:
    """(1, h, w) view of a tile's pixels: memory-mapped where the file allows (uncompressed)."""
    import tifffile
    try:
        img = tifffile.memmap(path, mode="r")
    except ValueError:                      # compressed or not contiguous
        img = tifffile.imread(path)
    return img[np.newaxis]


def napari_layer(spec: LayerSpec):
    """One napari Image layer for a spec (no viewer needed)."""
    from napari.layers import Image
    kw = dict(name=spec.name, contrast_limits=list(spec.contrast_limits), units="µm",
              axis_labels=spec.axes, metadata={"path": str(spec.path), "kind": spec.kind, **spec.meta})
    if spec.kind == "section":
        import zarr
        levels = [zarr.open_array(str(spec.path / lv), mode="r") for lv in spec.levels]
        return Image(levels, multiscale=True, scale=spec.scale, translate=spec.translate,
                     colormap=_see_through_gray(), blending="translucent", **kw)
    if spec.kind == "tile":
        ndim = len(spec.axes)
        return Image(_tile_data(spec.path), scale=(1.0,) * ndim, translate=(0.0,) * ndim,
                     affine=spec.affine, blending="translucent", visible=True, **kw)
    import tifffile
    return Image(tifffile.imread(spec.path), scale=spec.scale, translate=spec.translate, colormap="gray",
                 blending="translucent", **kw)


def napari_layers(specs: list[LayerSpec]) -> list:
    return [napari_layer(s) for s in specs]


def open_viewer(outdir: Path, *, tiles: bool = False, overview: Optional[Path] = None, max_tiles: int = 400,
                specs: Optional[list[LayerSpec]] = None, show: bool = True):
    """A napari Viewer with the run's layers (bottom to top as listed),
    the view fitted to the written part of the sections, at the first one's first plane."""
    import napari
    specs = run_layers(outdir, tiles=tiles, overview=overview, max_tiles=max_tiles) if specs is None else specs
    viewer = napari.Viewer(title=f"run {Path(outdir).name}", show=show)
    for layer in napari_layers(specs):
        viewer.add_layer(layer)
    viewer.scale_bar.visible = True
    frame_view(viewer)
    return viewer


def frame_view(viewer) -> None:
    """Fit the camera to the section volumes (else to everything) and step z
    to the first section's first plane; call again once the canvas has its size."""
    secs = [l for l in viewer.layers if l.metadata.get("kind") == "section"] or list(viewer.layers)
    viewer.reset_view()
    if not secs:
        return
    # the written part of the volumes (a store is much larger), else the layers' extent
    boxes = [np.array(l.metadata["content_um"]) for l in secs if l.metadata.get("content_um") is not None]
    ext = np.array(boxes or [l.extent.world[:, -2:] for l in secs])     # (n, 2 (min, max), 2 (y, x))
    lo, hi = ext[:, 0].min(0), ext[:, 1].max(0)
    viewer.camera.center = tuple((lo + hi) / 2)
    h, w = getattr(viewer, "_canvas_size", (800, 800))
    viewer.camera.zoom = 0.9 * min(h / max(hi[0] - lo[0], 1e-9), w / max(hi[1] - lo[1], 1e-9))
    if viewer.dims.ndim == 3 and secs[0].ndim == 3:
        viewer.dims.set_point(0, float(secs[0].data_to_world([0] * secs[0].ndim)[0]))


def run_viewer(outdir: Path, **kw) -> None:
    """Open the window and block until it is closed."""
    import napari
    open_viewer(outdir, **kw)
    napari.run()
