"""One OME-TIFF per tile: tiles/{section:04d}/{cycle:04d}/{tile_id}_v{version}.ome.tif.

Written once, through atomic_write (temp name, fsync, link - never replacing
an existing file): tifffile writes straight into the temp file, and the
sha256 for the manifest is taken from the ~1 KB of header/trailer plus the
pixels still in memory, in a helper thread while the file is fsynced. A
re-acquired tile has a new version and so a new name. Uncompressed, one
strip: EM noise barely compresses and the writer has to keep up with the disk.

The OME-XML carries the physical pixel size in µm, the stage position as the
plane position (µm), and the whole TileEvent header (stage, wd, stig, dwell,
timestamps, QC, SEM metadata, tile_id, version) as JSON in a MapAnnotation
(namespace ``acq/tile-metadata/v1``, key ``acq.tile``); layout.read_tile_header
reads it back without touching the pixels.

The PRIMARY writer (``primary = True``): its file is the frame itself. A tile
is safe once this writer returned; every other writer derives from these
files and can re-derive its output from them (catch_up / rebuild), so a
derived writer's failure never calls for imaging the tile again.
"""
from __future__ import annotations

import hashlib
import io
import logging
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tifffile

from acq.documents import DocumentRouter, TileEvent
from acq.writers.layout import META_KEY, OME_NS, dumps, tile_relpath
from acq.writers.manifest import Manifest, WrittenFile

log = logging.getLogger(__name__)


class TiffEncoder:
    """Single-plane uint8 OME-TIFFs, uncompressed, one strip (EM noise barely
    compresses, and the writer must keep up with the disk).

    ``write(path, image)`` lets tifffile write straight to the (temporary)
    file - numpy hands the pixel buffer to the kernel, no copy in Python - and
    hashes the result as header + the image IN MEMORY + trailer: only the
    ~1 KB around the pixels is read back. ``encode`` gives the same bytes in a
    reused in-memory buffer (for replays and small files).
    """

    def __init__(self):
        self._buf = io.BytesIO()
        self._view: memoryview | None = None

    @staticmethod
    def _metadata(image: np.ndarray, pixel_size_um: float, name: str = "", annotation: dict | None = None,
                  position_um: tuple | None = None, description: str = "", file_key: str = "") -> dict:
        """``file_key`` seeds the OME UUID (uuid5), so the same document always
        gives the same bytes and a replay after a crash is recognised as such."""
        if image.dtype != np.uint8 or image.ndim != 2:
            raise ValueError(f"expected a 2-D uint8 image, got {image.dtype} {image.shape}")
        md: dict = {
            "axes": "YX",
            "UUID": str(uuid.uuid5(uuid.NAMESPACE_URL, "acq:" + (file_key or name))),
            "Name": name,
            "PhysicalSizeX": pixel_size_um, "PhysicalSizeXUnit": "µm",
            "PhysicalSizeY": pixel_size_um, "PhysicalSizeYUnit": "µm",
        }
        if description:
            md["Description"] = description
        if position_um is not None:
            x, y, z = position_um
            md["Plane"] = {"PositionX": [x], "PositionXUnit": ["µm"], "PositionY": [y],
                           "PositionYUnit": ["µm"], "PositionZ": [z], "PositionZUnit": ["µm"]}
        if annotation:
            md["MapAnnotation"] = {"Namespace": OME_NS, **annotation}
        return md

    @staticmethod
    def _imwrite(target, image: np.ndarray, pixel_size_um: float, md: dict) -> None:
        # resolution in pixels per cm too, so that ImageJ/TrakEM2 see the calibration
        px_per_cm = 1e4 / pixel_size_um
        tifffile.imwrite(target, image, ome=True, photometric="minisblack", metadata=md,
                         rowsperstrip=image.shape[0], resolution=(px_per_cm, px_per_cm),
                         resolutionunit="CENTIMETER")

    def encode(self, image: np.ndarray, pixel_size_um: float, **kw) -> memoryview:
        """The file's bytes; the view is valid until the next call."""
        md = self._metadata(image, pixel_size_um, **kw)
        if self._view is not None:
            self._view.release()            # the buffer cannot be resized while exported
        self._buf.seek(0)
        self._buf.truncate()
        self._imwrite(self._buf, image, pixel_size_um, md)
        self._view = self._buf.getbuffer()
        return self._view

    def write(self, path: Path, image: np.ndarray, pixel_size_um: float, **kw) -> tuple[Future, int]:
        """Write the file at ``path``; return (future sha256 hex, size). The
        hash runs in a helper thread (hashlib releases the GIL) while the
        caller fsyncs and links the file: SHA-256 is as slow as the disk."""
        md = self._metadata(image, pixel_size_um, **kw)
        image = np.ascontiguousarray(image)
        self._imwrite(path, image, pixel_size_um, md)
        with open(path, "rb") as f:
            with tifffile.TiffFile(f) as tf:
                page = tf.pages.first
                offsets, counts = page.dataoffsets, page.databytecounts
            if len(offsets) != 1 or counts[0] != image.nbytes:
                raise RuntimeError(f"{path}: unexpected TIFF layout {offsets} {counts}")
            off = offsets[0]
            flat = image.reshape(-1)
            f.seek(off)
            if f.read(64) != flat[:64].tobytes():          # the pixels are where tifffile said
                raise RuntimeError(f"{path}: pixel data not at offset {off}")
            f.seek(0)
            head = f.read(off)
            f.seek(off + image.nbytes)
            tail = f.read()
        return _HASHER.submit(_sha256_parts, head, flat, tail), len(head) + image.nbytes + len(tail)


def _sha256_parts(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()


_HASHER = ThreadPoolExecutor(4, thread_name_prefix="sha256")


def encode_ome_tiff(image: np.ndarray, pixel_size_um: float, **kw) -> bytes:
    """One-off variant returning bytes."""
    return bytes(TiffEncoder().encode(image, pixel_size_um, **kw))


def write_tiff_once(manifest: Manifest, encoder: TiffEncoder, rel: str, image: np.ndarray,
                    pixel_size_um: float, kind: str, tile_id, version, batch: list, **kw) -> WrittenFile:
    """Create ``rel`` atomically (never replacing a file) and queue its manifest line."""
    return manifest.create(
        rel, lambda tmp: encoder.write(tmp, image, pixel_size_um, **kw), kind, tile_id, version, batch,
        expected_sha=lambda: hashlib.sha256(encoder.encode(image, pixel_size_um, **kw)).hexdigest())


def tile_annotation(doc: TileEvent) -> dict:
    return {META_KEY: dumps(doc.header(), separators=(",", ":"))}


class OmeTiffWriter(DocumentRouter):
    file_kind = "tile"           # the manifest kind of its files
    primary = True          # the source of truth: the engine journals a tile once this writer has it

    def __init__(self, out_dir: Path, manifest: Manifest):
        self.out_dir = Path(out_dir)
        self.manifest = manifest
        self.encoder = TiffEncoder()        # handle() runs in one thread: one buffer is enough

    def on_tile(self, doc: TileEvent) -> list[WrittenFile]:
        rel = tile_relpath(doc.section_id, doc.cycle, doc.tile_id, doc.version)
        st = doc.stage
        batch: list[dict] = []
        wf = write_tiff_once(
            self.manifest, self.encoder, rel, doc.image, doc.pixel_size_m * 1e6, self.file_kind, doc.tile_id,
            doc.version, batch, name=f"{doc.tile_id}_v{doc.version}", annotation=tile_annotation(doc),
            file_key=f"{doc.run_uid}/{rel}",
            position_um=(st.get("x", 0.0) * 1e6, st.get("y", 0.0) * 1e6, st.get("z", 0.0) * 1e6))
        self.manifest.append(batch)
        return [wf]

    def close(self) -> None:
        pass

    def flush(self) -> None:
        pass
