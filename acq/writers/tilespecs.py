"""Render tile specs per section and cycle: render/{section:04d}/{cycle:04d}/tilespecs.json.

Convention: each wafer section is its own volume (GCIB mills it cycle after
cycle), so it gets its own Render stack and **z = cycle** (float; the stack's
stackResolutionZ carries the slice thickness). As ASAP does, the layout's
sectionId is str(z) ("0.0", "1.0" ...) and it carries scopeId (the
microscope: WriterOptions.scope_id) when given one, and cameraId = the
detector the SEM reported with the frame (ASAP's camera). MIPmap URLs follow
ASAP's layout (see mipmaps.py).

Render world coordinates are stage pixels: one AffineModel2D per tile, the
rotation of the scan (rotation_deg) and the translation B = stage position /
pixel size - R @ (w/2, h/2), so a tile lands where the stage put it and every
cycle of a section shares one frame of reference.

The list is written on SectionDone, from the latest version of each tile. If
a later SectionDone for the same section and cycle brings different content
(a tile re-acquired afterwards), it goes to tilespecs.1.json, .2.json ...
(highest number wins); a file is never replaced.

Derived from the OME-TIFFs (``primary = False``): a plane whose file failed
is written later from the tile headers on disk (PlaneWriter: next
SectionDone or RunStop, also for what a resumed RunStart finds missing;
``catch_up()`` at once).
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Optional
from urllib.parse import quote

import renderapi

from acq.writers.layout import (PlaneWriter, SectionTiles, TileRecord, mipmap_relpath, mipmap_source_root,
                               render_tile_id)
from acq.writers.manifest import Manifest, WrittenFile, sha256_file


def file_url(out_dir: Path, rel: str, url_root: Optional[str] = None) -> str:
    """file:// URL of ``rel``; ``url_root`` replaces the output folder when the
    Render server mounts it elsewhere (e.g. 'file:///nrs/em/run42')."""
    if url_root:
        return url_root.rstrip("/") + "/" + quote(rel)
    return (Path(out_dir).resolve() / rel).as_uri()


def section_stack(stack: str, section: int) -> str:
    return f"{stack}_s{section:04d}"


def section_id(z: float) -> str:
    """ASAP's sectionId: the z value as a string (str(float(z)))."""
    return str(float(z))


def make_tilespec(rec: TileRecord, out_dir: Path, mipmap_levels: int,
                  url_root: Optional[str] = None, mipmap_prefix: str = "mipmaps",
                  scope_id: Optional[str] = None) -> renderapi.tilespec.TileSpec:
    px_nm = rec.pixel_size_m * 1e9
    z = float(rec.cycle)
    layout = renderapi.tilespec.Layout(
        sectionId=section_id(z), scopeId=scope_id, cameraId=rec.detector, imageRow=rec.row, imageCol=rec.col,
        stageX=rec.stage_x_m * 1e6, stageY=rec.stage_y_m * 1e6, rotation=rec.rotation_deg,
        pixelsize=px_nm)
    levels = {0: renderapi.image_pyramid.MipMap(imageUrl=file_url(out_dir, rec.rel_path, url_root))}
    src = mipmap_source_root(url_root)
    for lv in range(1, mipmap_levels + 1):
        levels[lv] = renderapi.image_pyramid.MipMap(
            imageUrl=file_url(out_dir, mipmap_relpath(lv, rec.rel_path, mipmap_prefix, src), url_root))
    # pixel (x, y) -> stage pixels: centre + R(rotation) @ (x - w/2, y - h/2)
    th = math.radians(rec.rotation_deg)
    c, s = math.cos(th), math.sin(th)
    cx, cy = rec.center_px
    w2, h2 = rec.width / 2.0, rec.height / 2.0
    tform = renderapi.transform.AffineModel(M00=c, M01=-s, M10=s, M11=c,
                                            B0=cx - c * w2 + s * h2, B1=cy - s * w2 - c * h2)
    return renderapi.tilespec.TileSpec(
        tileId=render_tile_id(rec.tile_id, rec.version), z=z,
        width=rec.width, height=rec.height, minint=0, maxint=255, layout=layout,
        tforms=[tform], imagePyramid=renderapi.image_pyramid.ImagePyramid(levels),
        groupId=f"s{rec.section_id:04d}_g{rec.grid_id:02d}")


def tilespec_dicts(records, out_dir: Path, mipmap_levels: int, url_root: Optional[str] = None,
                   scope_id: Optional[str] = None) -> list[dict]:
    specs = [make_tilespec(r, out_dir, mipmap_levels, url_root, scope_id=scope_id).to_dict() for r in records]
    return sorted(specs, key=lambda d: d["tileId"])


def encode_specs(specs: list[dict]) -> bytes:
    return json.dumps(specs, indent=1, sort_keys=True).encode()


def specs_relpath(section: int, cycle: int, revision: int = 0) -> str:
    name = "tilespecs.json" if revision == 0 else f"tilespecs.{revision}.json"
    return f"render/{section:04d}/{cycle:04d}/{name}"


def write_revision(manifest: Manifest, section: int, cycle: int, data: bytes, kind: str,
                   batch: list) -> WrittenFile:
    """Write ``data`` as the first free revision, unless a revision already holds these bytes."""
    sha = hashlib.sha256(data).hexdigest()
    rev = 0
    while True:
        rel = specs_relpath(section, cycle, rev)
        p = manifest.out_dir / rel
        if not p.exists() or sha256_file(p)[0] == sha:
            return manifest.write_once(rel, data, kind, None, None, batch=batch)
        rev += 1


class TileSpecWriter(PlaneWriter):
    file_kind = "tilespec"           # the manifest kind of its files

    def __init__(self, out_dir: Path, manifest: Manifest, mipmap_levels: int = 3,
                 url_root: Optional[str] = None, scope_id: Optional[str] = None):
        self.out_dir = Path(out_dir)
        self.manifest = manifest
        self.mipmap_levels = mipmap_levels
        self.url_root = url_root
        self.scope_id = scope_id
        self.tiles = SectionTiles(out_dir)

    def _outputs(self, section: int, cycle: int) -> list[Path]:
        folder = self.out_dir / f"render/{section:04d}/{cycle:04d}"
        return sorted(folder.glob("tilespecs*.json")) if folder.is_dir() else []

    def _write_plane(self, section: int, cycle: int, records: list[TileRecord]) -> list[WrittenFile]:
        data = encode_specs(tilespec_dicts(records, self.out_dir, self.mipmap_levels, self.url_root, self.scope_id))
        batch: list[dict] = []
        wf = write_revision(self.manifest, section, cycle, data, self.file_kind, batch)
        self.manifest.append(batch)
        return [wf]
