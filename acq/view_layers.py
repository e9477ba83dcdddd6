"""What a viewer shows of a run's OUTDIR, and where, without any viewer:
layer specs (path, per-axis scale and translation or a full affine, in stage
micrometres; contrast limits; a name) for the napari window (gui/view.py) and
a neuroglancer viewer state (``neuroglancer_state``).

World frame: stage micrometres, axes (z, y, x); y and x as the stage reports
them (images draw +y downwards), z = the NGFF z of the section volumes.

* Section volumes (zarr/NNNN.ome.zarr): placed ONLY from their NGFF
  multiscales metadata (per-dataset ``scale`` then ``translation``, then the
  multiscale's own, converted from the axes' units to µm). The writer's
  private "acq" attributes are never read, so a store in the section frame and
  one in the stage frame are both shown where their metadata says.
* Tiles (tiles/SSSS/CCCC/*.ome.tif, latest version): an affine from their
  header (stage position, pixel size, scan rotation); pixel (col j, row i)
  centre lies at stage + R(rotation) @ ((j + 1/2 - w/2), (i + 1/2 - h/2)) · pixel,
  the convention of acq/writers/layout.TileRecord. z: the cycle's plane of
  the section's volume.
* Overview (a ``wafer mosaic`` OME-TIFF): pixel (0, 0) centre at its
  origin_um, +col = +x, +row = +y (common/geometry.py).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import numpy as np

from acq.run_folder import plan_copy
from acq.writers.layout import TileRecord, latest_versions, map_annotation_json, planes_on_disk, tile_relpath

log = logging.getLogger(__name__)

# MapAnnotation key of a `wafer mosaic` overview's stage transform (wafer/mosaic.py TRANSFORM_KEY;
# acq may not import wafer, a test keeps the two equal)
OVERVIEW_KEY = "acq.overview"
DEFAULT_SLICE_UM = 0.05          # the OME-Zarr writer's default z step (WriterOptions.zarr_slice_um)

# NGFF axis units (UDUNITS names) -> µm; those a stage or an EM image can be in
_UNIT_UM = {"angstrom": 1e-4, "nanometer": 1e-3, "micrometer": 1.0, "millimeter": 1e3, "centimeter": 1e4,
            "meter": 1e6}


class ViewError(ValueError):
    """OUTDIR (or a file in it) cannot be shown; the message names the file and the field."""


@dataclass
class LayerSpec:
    """One layer, viewer-neutral. ``axes`` name the data's axes; for
    ``affine is None`` the world position of data index ``i`` (pixel centre) is
    ``translate + scale * i`` per axis; otherwise ``affine`` ((n+1) x (n+1),
    homogeneous, data index -> world µm over ``axes``) says it all and
    scale/translate are ones/zeros."""
    name: str
    kind: str                          # "overview" | "section" | "tile"
    path: Path
    axes: tuple[str, ...]
    shape: tuple[int, ...]             # level 0
    scale: tuple[float, ...]
    translate: tuple[float, ...]
    contrast_limits: tuple[float, float]
    affine: Optional[np.ndarray] = None
    levels: tuple[str, ...] = ()       # zarr array paths, finest first (sections)
    level_shapes: tuple[tuple[int, ...], ...] = ()
    meta: dict = field(default_factory=dict)

    def to_world(self, index) -> np.ndarray:
        """World µm (over ``axes``) of a data index (pixel centre)."""
        i = np.asarray(index, float)
        if self.affine is not None:
            return (self.affine @ np.append(i, 1.0))[:-1]
        return np.asarray(self.translate) + np.asarray(self.scale) * i


# ------------------------------------------------------------ NGFF
def _ngff_multiscale(attrs: dict, where: Path) -> dict:
    ms = (attrs.get("ome") or attrs).get("multiscales")          # NGFF 0.5 under "ome", 0.4 at top level
    if not isinstance(ms, list) or not ms or not isinstance(ms[0], dict):
        raise ViewError(f"{where}: no NGFF 'multiscales' in the group attributes")
    return ms[0]


def _apply(transforms: Any, n: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(scale, translation) of a list of NGFF coordinateTransformations (scale/translation/identity)."""
    s, t = np.ones(n), np.zeros(n)
    for k, tr in enumerate(transforms or []):
        kind = tr.get("type") if isinstance(tr, dict) else None
        if kind == "identity":
            continue
        if kind not in ("scale", "translation"):
            raise ViewError(f"{where}.coordinateTransformations[{k}].type: {kind!r} not supported "
                            f"(allowed: scale, translation, identity)")
        if "path" in tr:
            raise ViewError(f"{where}.coordinateTransformations[{k}].path: transforms stored in a file "
                            f"are not supported; give the values inline")
        v = np.asarray(tr.get(kind), float)
        if v.shape != (n,) or not np.isfinite(v).all():
            raise ViewError(f"{where}.coordinateTransformations[{k}].{kind}: expected {n} finite numbers, "
                            f"got {tr.get(kind)!r}")
        if kind == "scale":
            s, t = s * v, t * v
        else:
            t = t + v
    return s, t


def ngff_placement(store: Path) -> dict:
    """Axes, and per dataset (path, scale µm, translation µm, shape) from a
    store's NGFF metadata; every axis converted to micrometres."""
    import zarr
    try:
        g = zarr.open_group(str(store), mode="r")
    except Exception as e:                  # zarr raises several kinds for "not a group"
        raise ViewError(f"{store}: not a readable zarr group ({type(e).__name__}: {e})") from None
    ms = _ngff_multiscale(g.attrs.asdict(), store)
    axes = ms.get("axes") or []
    names = tuple(a.get("name") if isinstance(a, dict) else a for a in axes)
    n = len(names)
    if not (2 <= n <= 3) or not set(names) >= {"y", "x"} or not set(names) <= {"z", "y", "x"}:
        raise ViewError(f"{store}: multiscales.axes {list(names)}: expected (z,) y, x space axes")
    to_um = np.ones(n)
    for k, a in enumerate(axes):
        unit = a.get("unit") if isinstance(a, dict) else None
        if unit is None:
            log.warning("%s: axis %s has no unit; taken as micrometer", store, names[k])
        elif unit not in _UNIT_UM:
            raise ViewError(f"{store}: multiscales.axes[{k}].unit {unit!r} not supported "
                            f"(allowed: {', '.join(_UNIT_UM)})")
        else:
            to_um[k] = _UNIT_UM[unit]
    ms_s, ms_t = _apply(ms.get("coordinateTransformations"), n, f"{store}: multiscales")
    datasets = []
    for k, d in enumerate(ms.get("datasets") or []):
        s, t = _apply(d.get("coordinateTransformations"), n, f"{store}: multiscales.datasets[{k}]")
        s, t = s * ms_s, t * ms_s + ms_t
        try:
            shape = tuple(int(x) for x in g[d["path"]].shape)
        except (KeyError, TypeError) as e:
            raise ViewError(f"{store}: multiscales.datasets[{k}].path {d.get('path')!r}: no such array") from e
        datasets.append({"path": str(d["path"]), "scale": s * to_um, "translation": t * to_um, "shape": shape})
    if not datasets:
        raise ViewError(f"{store}: multiscales.datasets is empty")
    return {"axes": names, "datasets": datasets, "name": ms.get("name")}


def _robust_limits(sample: np.ndarray, fill: float | None = 0) -> tuple[float, float]:
    """0.5 / 99.5 percentiles of a sample, ignoring the fill value (unwritten parts)."""
    v = np.asarray(sample).ravel()
    if fill is not None:
        v = v[v != fill]
    if v.size == 0:
        return (0.0, 255.0) if sample.dtype == np.uint8 else (0.0, 1.0)
    lo, hi = (float(x) for x in np.percentile(v, [0.5, 99.5]))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _content_box(sample: np.ndarray, fill, level: dict, axes) -> Optional[tuple]:
    """((y0, x0), (y1, x1)) world µm of the pixel centres holding data (not the
    fill value) in a coarse-level sample: a store grows in big steps, its
    written part is what a view should frame. None when nothing is written."""
    mask = sample != (0 if fill is None else fill)
    while mask.ndim > 2:
        mask = mask.any(0)
    idx = np.argwhere(mask)
    if idx.size == 0:
        return None
    s, t = level["scale"][-2:], level["translation"][-2:]
    return tuple((t + s * idx.min(0)).tolist()), tuple((t + s * idx.max(0)).tolist())


def section_specs(outdir: Path) -> list[LayerSpec]:
    """One multiscale layer per zarr/NNNN.ome.zarr, placed by its NGFF metadata."""
    zdir = Path(outdir) / "zarr"
    out = []
    for store in sorted(zdir.glob("*.ome.zarr")) if zdir.is_dir() else []:
        if store.name.startswith(".") or not store.name.split(".")[0].isdigit():
            continue                        # a writer's temporary store
        p = ngff_placement(store)
        d0 = p["datasets"][0]
        import zarr
        coarse = zarr.open_array(str(store / p["datasets"][-1]["path"]), mode="r")
        # a few planes of the coarsest level: cheap, and fill (0) is left out
        zs = sorted({0, coarse.shape[0] // 2, coarse.shape[0] - 1}) if len(coarse.shape) == 3 else None
        # plane by plane: zarr's list indexing is ~100x slower than slicing
        sample = np.stack([coarse[z] for z in zs]) if zs is not None else coarse[...]
        fill = coarse.fill_value
        sid = int(store.name.split(".")[0])
        content = _content_box(np.asarray(sample), fill, p["datasets"][-1], p["axes"])
        out.append(LayerSpec(
            name=f"section {sid:04d}", kind="section", path=store, axes=p["axes"], shape=d0["shape"],
            scale=tuple(d0["scale"]), translate=tuple(d0["translation"]),
            contrast_limits=_robust_limits(np.asarray(sample), None if fill is None else float(fill)),
            levels=tuple(d["path"] for d in p["datasets"]), level_shapes=tuple(d["shape"] for d in p["datasets"]),
            meta={"section_id": sid, "datasets": p["datasets"], "content_um": content}))
    return out


# ------------------------------------------------------------ tiles
def tile_affine(rec: TileRecord, z_um: float, dz_um: float) -> np.ndarray:
    """4x4: data index (plane, row i, col j) -> world (z, y, x) µm (see the module docstring)."""
    p = rec.pixel_size_m * 1e6
    th = math.radians(rec.rotation_deg)
    c, s = math.cos(th), math.sin(th)
    cx, cy = rec.stage_x_m * 1e6, rec.stage_y_m * 1e6
    u0, v0 = (0.5 - rec.width / 2) * p, (0.5 - rec.height / 2) * p     # pixel (0, 0) centre, tile frame
    return np.array([[dz_um, 0, 0, z_um],
                     [0, c * p, s * p, cy + s * u0 + c * v0],
                     [0, -s * p, c * p, cx + c * u0 - s * v0],
                     [0, 0, 0, 1.0]])


def _slice_um(outdir: Path) -> float:
    """z step of the run's OME-Zarr (plan.json's writer options), for tiles of a section without a volume."""
    try:
        opts = plan_copy(outdir)["output"].get("options") or {}
        for o in opts.values():
            if isinstance(o, dict) and "zarr_slice_um" in o:
                return float(o["zarr_slice_um"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return DEFAULT_SLICE_UM


def tile_specs(outdir: Path, sections: list[LayerSpec], max_tiles: int = 400) -> list[LayerSpec]:
    """One layer per tile (latest version), at most ``max_tiles`` (the last
    cycles first: what a user most likely wants to check); each a 1-plane
    volume at its cycle's z."""
    from acq.writers.layout import read_tile_header
    zplace = {}
    for s in sections:
        d0 = s.meta["datasets"][0]
        if s.axes[0] == "z":
            zplace[s.meta["section_id"]] = (d0["translation"][0], d0["scale"][0])
    dz_default = _slice_um(outdir)
    planes = sorted(planes_on_disk(outdir), key=lambda p: (-p[1], p[0]))
    out: list[LayerSpec] = []
    skipped = 0
    for sec, cyc in planes:
        for tid, ver in sorted(latest_versions(outdir, sec, cyc).items()):
            if len(out) >= max_tiles:
                skipped += 1
                continue
            path = Path(outdir) / tile_relpath(sec, cyc, tid, ver)
            try:
                rec = TileRecord.from_header(read_tile_header(path))
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.error("%s: not shown: %s", path, e)
                continue
            z0, dz = zplace.get(sec, (0.0, dz_default))
            out.append(LayerSpec(
                name=f"tile s{sec:04d} c{cyc:04d} {tid}" + (f" v{ver}" if ver else ""), kind="tile", path=path,
                axes=("z", "y", "x"), shape=(1, rec.height, rec.width), scale=(1.0, 1.0, 1.0),
                translate=(0.0, 0.0, 0.0), contrast_limits=(0.0, 255.0),
                affine=tile_affine(rec, z0 + cyc * dz, dz),
                meta={"section_id": sec, "cycle": cyc, "tile_id": tid, "version": ver,
                      "stage_um": (rec.stage_x_m * 1e6, rec.stage_y_m * 1e6)}))
    if skipped:
        log.warning("%d more tiles not shown (max_tiles = %d)", skipped, max_tiles)
    return out


# ------------------------------------------------------------ overview
def read_overview_placement(path: Path) -> tuple[tuple[float, float], float, tuple[int, int]]:
    """(origin_um (x, y) of pixel (0, 0)'s centre, pixel µm, (h, w)) of a
    `wafer mosaic` OME-TIFF; ViewError for any other file."""
    import tifffile
    try:
        with tifffile.TiffFile(path) as tf:
            info = map_annotation_json(tf.ome_metadata or "", OVERVIEW_KEY, path)
            shape = tf.pages[0].shape
    except (OSError, tifffile.TiffFileError) as e:
        raise ViewError(f"{path}: not a readable TIFF ({e})") from None
    except ValueError:
        raise ViewError(f"{path}: not an overview mosaic (no {OVERVIEW_KEY} annotation; "
                        f"make one with `wafer mosaic`)") from None
    try:
        ox, oy = (float(v) for v in info["origin_um"])
        px = float(info["pixel_um"])
    except (KeyError, TypeError, ValueError):
        raise ViewError(f"{path}: {OVERVIEW_KEY}.origin_um / pixel_um missing or not numbers") from None
    if not (px > 0 and math.isfinite(ox) and math.isfinite(oy)):
        raise ViewError(f"{path}: {OVERVIEW_KEY}.pixel_um must be > 0 and origin_um finite")
    return (ox, oy), px, (int(shape[0]), int(shape[1]))


def find_overview(outdir: Path) -> Optional[Path]:
    """The first top-level *.ome.tif of OUTDIR that is an overview mosaic."""
    for p in sorted(Path(outdir).glob("*.ome.tif")):
        try:
            read_overview_placement(p)
            return p
        except ViewError:
            continue
    return None


def overview_spec(path: Path) -> LayerSpec:
    import tifffile
    (ox, oy), px, (h, w) = read_overview_placement(path)
    img = tifffile.imread(path)             # an overview is small (4 µm pixels); strided sample for contrast
    step = max(1, int(math.sqrt(h * w / 250_000)))
    return LayerSpec(name="overview", kind="overview", path=Path(path), axes=("y", "x"), shape=(h, w),
                     scale=(px, px), translate=(oy, ox),
                     contrast_limits=_robust_limits(img[::step, ::step], None))


# ------------------------------------------------------------ all
def run_layers(outdir: Path, *, tiles: bool = False, overview: Optional[Path] = None,
               max_tiles: int = 400) -> list[LayerSpec]:
    """Bottom to top: the overview (``overview``, else one found in OUTDIR),
    the section volumes, the tiles (with ``tiles``)."""
    outdir = Path(outdir)
    if not outdir.is_dir():
        raise ViewError(f"OUTDIR {outdir}: not a folder")
    specs: list[LayerSpec] = []
    ov = overview if overview is not None else find_overview(outdir)
    if ov is not None:
        specs.append(overview_spec(Path(ov)))
    sections = section_specs(outdir)
    specs += sections
    if tiles:
        specs += tile_specs(outdir, sections, max_tiles)
    if not specs:
        raise ViewError(f"{outdir}: nothing to show (no zarr/*.ome.zarr, no overview"
                        f"{', no tiles' if tiles else '; --tiles shows the OME-TIFF tiles'})")
    return specs


# ------------------------------------------------------------ neuroglancer
def check_url_root(url_root: str) -> str:
    """The URL prefix OUTDIR is served at, ending in '/'; ViewError names what is allowed."""
    u = urlparse(url_root or "")
    if u.scheme not in ("http", "https", "gs", "s3") or not u.netloc:
        raise ViewError(f"--url-root {url_root!r}: expected the URL OUTDIR is served at, "
                        f"http(s)://host:port/path/ (or gs://bucket/path/, s3://bucket/path/)")
    return url_root if url_root.endswith("/") else url_root + "/"


def neuroglancer_state(outdir: Path, specs: list[LayerSpec], url_root: str) -> dict:
    """A neuroglancer viewer state (JSON) with the section volumes as zarr3://
    (zarr2:// for an NGFF 0.4 store) image layers. Each source's ``transform`` is explicit: input = the store's
    own coordinate space as neuroglancer derives it from the NGFF axes (names,
    unit m, level-0 scale), output = the same dimensions, translated by the
    NGFF translation in those units, so the store lands where napari puts it.
    (TIFF overviews and tiles have no neuroglancer source: not included.)"""
    root = check_url_root(url_root)
    secs = [s for s in specs if s.kind == "section"]
    if not secs:
        raise ViewError(f"{outdir}: no section volumes (zarr/*.ome.zarr) for a neuroglancer state")
    layers = []
    for s in secs:
        dims = {a: [sc * 1e-6, "m"] for a, sc in zip(s.axes, s.scale)}
        n = len(s.axes)
        matrix = [[1.0 if c == r else 0.0 for c in range(n)] + [s.translate[r] / s.scale[r]] for r in range(n)]
        rel = Path(s.path).relative_to(Path(outdir)).as_posix()
        scheme = "zarr3" if (Path(s.path) / "zarr.json").is_file() else "zarr2"     # NGFF 0.5 / 0.4 stores
        lo, hi = s.contrast_limits
        layers.append({
            "type": "image", "name": s.name,
            "source": {"url": f"{scheme}://{root}{rel}/",
                       "transform": {"outputDimensions": dims, "inputDimensions": dims, "matrix": matrix}},
            "shader": "#uicontrol invlerp normalized\nvoid main() {\n  emitGrayscale(normalized());\n}\n",
            "shaderControls": {"normalized": {"range": [lo, hi]}},
        })
    # the global frame: x, y at the finest section pixel, z at the finest step; all in metres
    finest = {a: min(s.scale[s.axes.index(a)] for s in secs if a in s.axes) for a in ("x", "y", "z")
              if any(a in s.axes for s in secs)}
    dims = {a: [finest[a] * 1e-6, "m"] for a in ("x", "y", "z") if a in finest}
    # start on the written part of the first section (its store is larger), at its first plane
    first = secs[0]
    box = first.meta.get("content_um")
    lo = first.to_world([0] * len(first.shape))
    if box is not None:
        (y0, x0), (y1, x1) = box
    else:
        (y0, x0), (y1, x1) = lo[-2:], first.to_world([k - 1 for k in first.shape])[-2:]
    centre = {"x": (x0 + x1) / 2, "y": (y0 + y1) / 2, "z": lo[0] if first.axes[0] == "z" else 0.0}
    pos = [float(centre[a] / finest[a]) for a in dims]
    width_vox = (x1 - x0) / finest["x"]
    return {
        "dimensions": dims,
        "position": pos,
        "crossSectionScale": max(1.0, width_vox / 1000.0),      # the section's width on ~1000 screen pixels
        "layers": layers,
        "selectedLayer": {"layer": layers[0]["name"], "visible": True},
        "layout": "xy",
    }


def write_neuroglancer_state(path: Path, state: dict) -> Path:
    """JSON, written atomically; never overwrites (FileExists)."""
    from common.atomic import atomic_write
    return atomic_write(Path(path), (json.dumps(state, indent=2) + "\n").encode())
