"""ASAP/Render MIPmaps: OUTDIR/{prefix}/{level}/[{source root}/]{level-0 relative path}.tif.

ASAP's create_mipmaps writes, and ASAP's apply_mipmaps_to_render and Render's
MipmapPathBuilder derive, level n of a tile as {root}/{n}/{tile's absolute
path without the leading '/'}.{ext}: for the tile served at
file:///nrs/em/run42/tiles/0000/0000/x_v0.ome.tif and root
file:///nrs/em/run42/mipmaps, {root}/1/nrs/em/run42/tiles/0000/0000/x_v0.ome.tif.tif.
With ``url_root`` (WriterOptions.image_url_root) the source root is its path
(nrs/em/run42) and the files are exactly there. Without one (tile specs with
this machine's file URLs) the source root is left out on purpose: the
layout then does not name the local folder, so OUTDIR can be moved or
copied, and a crash point or a manifest path is the same in every run. The
tile specs list every level's URL either way, so Render needs no derivation.

Level n is level n-1 halved with cv2.INTER_AREA (a 2x2 box mean), computed
from the in-memory tile, never from a re-read. Each level is a small OME-TIFF
whose physical pixel size is 2**level times the tile's, written atomically.
The levels are written concurrently: each write waits mostly on its fsyncs.

Derived from the OME-TIFF (``primary = False``): levels missing after a
failure or a crash are made from the tile on disk (pixels + header: the same
bytes as from the document) - for the plane at its SectionDone, for every
tile on a resumed RunStart, by ``catch_up()`` and ``rebuild(tile)``.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import tifffile

from acq.documents import CatchUp, DocumentRouter, RunStart, SectionDone, TileEvent
from acq.writers.layout import (mipmap_relpath, mipmap_source_root, planes_for, planes_on_disk, read_tile_header,
                               tile_files, tile_relpath)
from acq.writers.manifest import Manifest, WrittenFile
from acq.writers.ome_tiff import TiffEncoder, write_tiff_once

log = logging.getLogger(__name__)


def halve(img: np.ndarray) -> np.ndarray:
    h, w = img.shape
    return cv2.resize(img, (max(1, w // 2), max(1, h // 2)), interpolation=cv2.INTER_AREA)


def pyramid(img: np.ndarray, levels: int):
    """Yield (level, image) for levels 1..levels."""
    cur = img
    for level in range(1, levels + 1):
        cur = halve(cur)
        yield level, cur


class MipmapWriter(DocumentRouter):
    file_kind = "mipmap"           # the manifest kind of its files
    primary = False

    def __init__(self, out_dir: Path, manifest: Manifest, levels: int = 3, prefix: str = "mipmaps",
                 url_root: Optional[str] = None):
        self.out_dir = Path(out_dir)
        self.manifest = manifest
        self.levels = levels
        self.prefix = prefix
        self.source_root = mipmap_source_root(url_root)
        self.encoders = [TiffEncoder() for _ in range(levels)]     # one buffer per level in flight
        self._pool = ThreadPoolExecutor(levels, thread_name_prefix="mipmap-write")

    def on_tile(self, doc: TileEvent) -> list[WrittenFile]:
        return self._write_levels(doc.section_id, doc.cycle, doc.tile_id, doc.version, doc.image,
                                  doc.pixel_size_m, doc.run_uid)

    def on_section_done(self, doc: SectionDone) -> list[WrittenFile]:
        return self.catch_up([(doc.section_id, doc.cycle)])

    def on_start(self, doc: RunStart) -> list[WrittenFile]:
        return self.catch_up() if doc.resumed else []

    def on_catch_up(self, doc: CatchUp) -> list[WrittenFile]:
        return self.catch_up(planes_for(self.out_dir, doc))

    def _write_levels(self, section, cycle, tile_id, version, image, pixel_size_m, run_uid) -> list[WrittenFile]:
        rel0 = tile_relpath(section, cycle, tile_id, version)
        px_um = pixel_size_m * 1e6
        batch: list[dict] = []
        jobs = []
        for level, img in pyramid(image, self.levels):
            rel = mipmap_relpath(level, rel0, self.prefix, self.source_root)
            jobs.append(self._pool.submit(
                write_tiff_once, self.manifest, self.encoders[level - 1], rel, img, px_um * 2 ** level,
                self.file_kind, tile_id, version, batch, file_key=f"{run_uid}/{rel}",
                name=f"{tile_id}_v{version} L{level}"))
        wait(jobs)                      # all done before the buffers are reused or we raise
        self.manifest.append(batch)     # what did get written is listed even if a level failed
        return [j.result() for j in jobs]

    def missing_levels(self, tile_path: Path) -> list[int]:
        rel0 = Path(tile_path).relative_to(self.out_dir).as_posix()
        return [lv for lv in range(1, self.levels + 1)
                if not (self.out_dir / mipmap_relpath(lv, rel0, self.prefix, self.source_root)).is_file()]

    def rebuild(self, tile) -> list[WrittenFile]:
        """Write the levels of ``tile`` (a TileEvent, or the path of its
        OME-TIFF: pixels and header are read from there). Levels already on
        disk are accepted as they are (same bytes) and listed again."""
        if isinstance(tile, TileEvent):
            return self._write_levels(tile.section_id, tile.cycle, tile.tile_id, tile.version, tile.image,
                                      tile.pixel_size_m, tile.run_uid)
        path = Path(tile)
        h = read_tile_header(path)
        return self._write_levels(int(h["section_id"]), int(h["cycle"]), h["tile_id"], int(h["version"]),
                                  tifffile.imread(path), float(h["pixel_size_m"]), h["run_uid"])

    def catch_up(self, planes=None) -> list[WrittenFile]:
        """Make the levels missing for any tile (every version) of ``planes``
        (default: all planes on disk) from the OME-TIFFs. Costs a stat per level
        and tile when nothing is missing."""
        planes = planes_on_disk(self.out_dir) if planes is None else planes
        out, errors = [], []
        for sec, cyc in planes:
            for p in tile_files(self.out_dir, sec, cyc):
                if not self.missing_levels(p):
                    continue
                log.warning("MIPmaps of %s missing: made from the tile on disk", p.name)
                try:
                    out += self.rebuild(p)
                except Exception as e:
                    log.error("MIPmaps of %s: %s", p, e)
                    errors.append(f"{p.name}: {type(e).__name__}: {e}")
        if errors:
            raise RuntimeError(f"MIPmaps of {len(errors)} tiles not made (retried later): {'; '.join(errors[:3])}")
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def flush(self) -> None:
        pass

