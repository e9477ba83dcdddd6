"""ASAP/Render MIPmaps: {prefix}/{level}/{level-0 relative path}.

Level n is level n-1 halved with cv2.INTER_AREA (a 2x2 box mean), computed
from the in-memory tile, never from a re-read. Each level is a small OME-TIFF
whose physical pixel size is 2**level times the tile's, written atomically
under the same name as the tile (Render finds level n by swapping the prefix).
The levels are written concurrently: each write waits mostly on its fsyncs.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import cv2
import numpy as np

from acq.writers.layout import mipmap_relpath, tile_relpath
from acq.writers.manifest import Manifest, WrittenFile
from acq.writers.ome_tiff import TiffEncoder, write_tiff_once


def halve(img: np.ndarray) -> np.ndarray:
    h, w = img.shape
    return cv2.resize(img, (max(1, w // 2), max(1, h // 2)), interpolation=cv2.INTER_AREA)


def pyramid(img: np.ndarray, levels: int):
    """Yield (level, image) for levels 1..levels."""
    cur = img
    for level in range(1, levels + 1):
        cur = halve(cur)
        yield level, cur


class MipmapWriter:
    kind = "mipmap"

    def __init__(self, out_dir: Path, manifest: Manifest, levels: int = 3, prefix: str = "mipmaps"):
        self.out_dir = Path(out_dir)
        self.manifest = manifest
        self.levels = levels
        self.prefix = prefix
        self.encoders = [TiffEncoder() for _ in range(levels)]     # one buffer per level in flight
        self._pool = ThreadPoolExecutor(levels, thread_name_prefix="mipmap-write")

    def handle(self, doc) -> list[WrittenFile]:
        if getattr(doc, "kind", None) != "tile":
            return []
        rel0 = tile_relpath(doc.section_id, doc.cycle, doc.tile_id, doc.version)
        px_um = doc.pixel_size_m * 1e6
        batch: list[dict] = []
        jobs = []
        for level, img in pyramid(doc.image, self.levels):
            rel = mipmap_relpath(level, rel0, self.prefix)
            jobs.append(self._pool.submit(
                write_tiff_once, self.manifest, self.encoders[level - 1], rel, img, px_um * 2 ** level,
                self.kind, doc.tile_id, doc.version, batch, file_key=f"{doc.run_uid}/{rel}",
                name=f"{doc.tile_id}_v{doc.version} L{level}"))
        wait(jobs)                      # all done before the buffers are reused or we raise
        self.manifest.append(batch)     # what did get written is listed even if a level failed
        return [j.result() for j in jobs]

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def flush(self) -> None:
        pass
