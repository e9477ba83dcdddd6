"""Per-section OME-Zarr volume: zarr/{section:04d}.ome.zarr (zarr v3, NGFF 0.5).

Layout: arrays "0".."L-1", axes (z, y, x), uint8, chunks (1, C, C), z = cycle,
raw "bytes" codec; y/x are the section frame: the stage axes turned by the
scan rotation ("rotation_deg" in the attributes), where the grid is
axis-aligned and tiles need no resampling. A tile goes where the stage put
it, rounded to a multiple of 2**(L-1) px (<= 2 px at 3 levels, far below stage
repeatability) so it covers whole 2x2 blocks at every level; the tile pasted
last wins in overlaps. The origin ("acq" attributes): the first tile's
top-left minus (col * width, row * height) minus a margin of 1/4 tile + 2 µm
of stage error (unwritten chunks cost nothing). Parts of a tile beyond it
are clipped and logged: the OME-TIFF stays the master copy.

Sizing: arrays GROW as tiles arrive (resize rewrites zarr.json only), by
>= 1/4 each time; unwritten chunks are not stored (read as 0). Level-0 shapes
are multiples of C * 2**(L-1): each level is exactly half the one below.
Level n is the exact 2x2 box mean (cv2.INTER_AREA) of level n-1, updated per
tile from the tile in memory (plus a one-pixel border from level n-1 for
tiles whose size is not a multiple of 2**(L-1)).

Writing: tiles are pasted into an in-memory chunk cache (LRU, ``cache_mb``);
a plane's chunks are written at its SectionDone (or on eviction, RunStop,
close): temp name, fsync, rename, folders fsynced. Writing every touched
chunk for every tile instead cost 3-5x the tile's bytes in rewrites. zarr
makes the group, arrays, NGFF metadata (ome_zarr's write_multiscales_metadata)
and resizes; chunk files are written here (raw codec: a chunk file is the
C-order chunk) as zarr's partial writes cost ~10 ms per call.

Crash safety: handle(TileEvent) returns before the tile is in the volume; the
tile is durable in its OME-TIFF, from which the volume derives. Flushed tiles
are appended (fsynced) to zarr/{section:04d}.tiles.jsonl; on a resumed
RunStart and on each SectionDone, tiles on disk (latest version) missing from
that list and from memory are read back from their OME-TIFF and pasted. Only
then is anything re-read.

Manifest: every chunk file written is recorded with the sha256 of the chunk
in memory (kind "zarr": the last line per path wins, as a chunk is rewritten
when a late re-acquisition or a cache eviction touches it again). zarr.json
(changes as arrays grow) and the .tiles.jsonl log are not recorded.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import tifffile
import zarr

from acq.writers.layout import TileRecord, latest_versions, read_tile_header, tile_relpath
from acq.writers.manifest import Manifest, WrittenFile, append_durably

log = logging.getLogger(__name__)


def _fsync(path: Path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _put_chunk(path: Path, chunk: np.ndarray) -> str:
    """Write one chunk file atomically; its sha256, hashed from memory."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(memoryview(chunk).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)       # chunks are derived, mutable data: replacing is their nature
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return hashlib.sha256(chunk).hexdigest()


@dataclass
class _Section:
    root: Path
    group: zarr.Group
    arrays: list
    origin: tuple[int, int]        # section-frame pixels (x, y) of array pixel (0, 0)
    pixel_size_m: float
    rotation_deg: float            # array axes = stage axes turned by this
    flushed: dict = field(default_factory=dict)     # cycle -> {(tile_id, version)} durable in the volume


class OmeZarrWriter:
    kind = "zarr"

    def __init__(self, out_dir: Path, manifest: Manifest, levels: int = 3, chunk: int = 1024,
                 slice_um: float = 0.05, margin: float = 0.25, margin_um: float = 2.0, cache_mb: int = 512):
        if levels < 1 or chunk % (2 ** (levels - 1)):
            raise ValueError("zarr chunk must be a multiple of 2**(levels-1)")
        self.out_dir = Path(out_dir)
        self.manifest = manifest
        self.levels, self.chunk, self.slice_um = levels, chunk, slice_um
        self.margin, self.margin_um = margin, margin_um
        self._budget = max(cache_mb << 20, 2 * chunk * chunk)    # evicted after each tile at worst
        self._sections: dict[int, _Section] = {}
        self._cache: OrderedDict[tuple, list] = OrderedDict()   # (sec, l, z, cy, cx) -> [chunk, dirty]
        self._pasted: dict[tuple[int, int], dict] = {}          # (sec, z) -> {(tile, ver): t_start} not flushed
        self._closed: set[tuple[int, int]] = set()
        self._snap = 2 ** (levels - 1)
        self._pool = ThreadPoolExecutor(8, thread_name_prefix="zarr-io")
        import ome_zarr.writer  # noqa: F401  (seconds to import: pay it now, not at the first tile)

    # ------------------------------------------------------------ documents
    def handle(self, doc) -> list[WrittenFile]:
        kind = getattr(doc, "kind", None)
        if kind == "tile":
            rec = TileRecord.from_doc(doc)
            out = self._paste_tile(rec, doc.image, doc.t_start)
            if (rec.section_id, rec.cycle) in self._closed:     # late re-acquisition: write through
                out += self._flush_plane(rec.section_id, rec.cycle)
            return out
        if kind == "section_done":
            self._closed.add((doc.section_id, doc.cycle))
            self._recover(doc.section_id, doc.cycle)
            return self._flush_plane(doc.section_id, doc.cycle)
        if kind == "start" and getattr(doc, "resumed", False):
            return self._recover_all()      # a fresh run has nothing to catch up (and must not re-read)
        if kind == "stop":
            self.flush()
        return []

    def flush(self) -> None:
        for sec_id, z in sorted(self._pasted):
            self._flush_plane(sec_id, z)

    def close(self) -> None:
        self.flush()
        self._sections.clear()
        self._pool.shutdown(wait=True)

    # ------------------------------------------------------------ sections
    def section_path(self, section: int) -> Path:
        return self.out_dir / f"zarr/{section:04d}.ome.zarr"

    def _open(self, section: int, rec: TileRecord | None = None) -> _Section | None:
        """The section's volume: cached, opened from disk, or created for ``rec``."""
        sec = self._sections.get(section)
        if sec is not None:
            return sec
        root = self.section_path(section)
        if (root / "zarr.json").exists():
            group = zarr.open_group(root, mode="r+", zarr_format=3)
            a = group.attrs["acq"]
            arrays = [group[str(l)] for l in range(self.levels)]
            for arr in arrays:
                codecs = [c.to_dict()["name"] for c in arr.metadata.codecs]
                if codecs != ["bytes"] or arr.chunks[1:] != (self.chunk, self.chunk):
                    raise ValueError(f"{root}: codecs {codecs}, chunks {arr.chunks}: this writer needs raw "
                                     f"chunks of {self.chunk} px")
            sec = _Section(root, group, arrays, (int(a["origin_px"][0]), int(a["origin_px"][1])),
                           float(a["pixel_size_m"]), float(a.get("rotation_deg", 0.0)))
            self._load_journal(sec, section)
        elif rec is not None:
            sec = self._create(root, rec)
        else:
            return None
        self._sections[section] = sec
        return sec

    def _create(self, root: Path, rec: TileRecord) -> _Section:
        from ome_zarr.format import FormatV05
        from ome_zarr.writer import write_multiscales_metadata
        x0, y0 = rec.frame_topleft_px()
        slack = self.margin_um * 1e-6 / rec.pixel_size_m      # stage repeatability; empty chunks cost nothing
        ox = math.floor(x0 - rec.col * rec.width - self.margin * rec.width - slack)
        oy = math.floor(y0 - rec.row * rec.height - self.margin * rec.height - slack)
        group = zarr.open_group(root, mode="w-", zarr_format=3)
        c, big = self.chunk, self.chunk << (self.levels - 1)
        arrays = [group.create_array(str(l), shape=(1, big >> l, big >> l), chunks=(1, c, c), dtype="uint8",
                                     fill_value=0, dimension_names=("z", "y", "x"), compressors=None)
                  for l in range(self.levels)]
        px_um = rec.pixel_size_m * 1e6
        datasets = []
        for l in range(self.levels):
            s = px_um * 2 ** l
            half = (2 ** l - 1) / 2 * px_um     # box-mean pixel centres move by half a block
            datasets.append({"path": str(l), "coordinateTransformations": [
                {"type": "scale", "scale": [self.slice_um, s, s]},
                {"type": "translation", "translation": [0.0, oy * px_um + half, ox * px_um + half]}]})
        write_multiscales_metadata(
            group, datasets, fmt=FormatV05(),
            axes=[{"name": "z", "type": "space", "unit": "micrometer"},
                  {"name": "y", "type": "space", "unit": "micrometer"},
                  {"name": "x", "type": "space", "unit": "micrometer"}],
            name=f"section {rec.section_id:04d}")
        group.attrs["acq"] = {"section_id": rec.section_id, "origin_px": [ox, oy],
                              "rotation_deg": rec.rotation_deg, "pixel_size_m": rec.pixel_size_m,
                              "z": "cycle", "slice_um": self.slice_um}
        for dirpath, _dirs, files in os.walk(root):
            for f in files:
                _fsync(Path(dirpath) / f)
            _fsync(Path(dirpath), directory=True)
        _fsync(root.parent, directory=True)
        return _Section(root, group, arrays, (ox, oy), rec.pixel_size_m, rec.rotation_deg)

    def _grow(self, sec: _Section, z: int, y1: int, x1: int) -> None:
        Z, H, W = sec.arrays[0].shape
        if z < Z and y1 <= H and x1 <= W:
            return
        q = self.chunk << (self.levels - 1)
        if y1 > H:
            H = -(-max(y1, H + H // 4) // q) * q
        if x1 > W:
            W = -(-max(x1, W + W // 4) // q) * q
        Z = max(Z, z + 1)
        for l, a in enumerate(sec.arrays):
            a.resize((Z, H >> l, W >> l))
            _fsync(sec.root / str(l) / "zarr.json")

    # ------------------------------------------------------------ chunk cache
    def _chunk_path(self, key: tuple) -> Path:
        sec_id, l, z, cy, cx = key
        return self.section_path(sec_id) / str(l) / "c" / str(z) / str(cy) / str(cx)

    def _chunk(self, key: tuple) -> np.ndarray:
        entry = self._cache.get(key)
        if entry is not None:
            self._cache.move_to_end(key)
            return entry[0]
        c = self.chunk
        try:
            ch = np.fromfile(self._chunk_path(key), np.uint8, c * c).reshape(c, c)
        except (FileNotFoundError, ValueError):    # never written: the fill value
            ch = np.zeros((c, c), np.uint8)
        self._cache[key] = [ch, False]
        return ch

    def _read(self, sec_id, l, z, y0, y1, x0, x1) -> np.ndarray:
        c = self.chunk
        out = np.empty((y1 - y0, x1 - x0), np.uint8)
        for cy in range(y0 // c, (y1 - 1) // c + 1):
            for cx in range(x0 // c, (x1 - 1) // c + 1):
                ch = self._chunk((sec_id, l, z, cy, cx))
                ya, yb, xa, xb = max(y0, cy * c), min(y1, (cy + 1) * c), max(x0, cx * c), min(x1, (cx + 1) * c)
                out[ya - y0:yb - y0, xa - x0:xb - x0] = ch[ya - cy * c:yb - cy * c, xa - cx * c:xb - cx * c]
        return out

    def _update(self, sec_id, l, z, y0, x0, data) -> None:
        c = self.chunk
        y1, x1 = y0 + data.shape[0], x0 + data.shape[1]
        for cy in range(y0 // c, (y1 - 1) // c + 1):
            for cx in range(x0 // c, (x1 - 1) // c + 1):
                key = (sec_id, l, z, cy, cx)
                ya, yb, xa, xb = max(y0, cy * c), min(y1, (cy + 1) * c), max(x0, cx * c), min(x1, (cx + 1) * c)
                part = data[ya - y0:yb - y0, xa - x0:xb - x0]
                if yb - ya == c and xb - xa == c:
                    self._cache[key] = [np.ascontiguousarray(part), True]
                    self._cache.move_to_end(key)
                else:
                    self._chunk(key)[ya - cy * c:yb - cy * c, xa - cx * c:xb - cx * c] = part
                    self._cache[key][1] = True

    def _write_chunks(self, keys) -> list[WrittenFile]:
        """Write dirty chunks (parallel temp+fsync+rename), fsync their folders,
        list them in the manifest (hashed from memory)."""
        dirty = [(self._chunk_path(k), self._cache[k]) for k in keys if self._cache[k][1]]
        dirs = {p.parent for p, _ in dirty}
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
        shas = [j.result() for j in [self._pool.submit(_put_chunk, p, e[0]) for p, e in dirty]]
        for _p, e in dirty:
            e[1] = False                    # (an error above re-raised: the plane stays pending)
        dirs |= {d.parent for d in dirs} | {d.parent.parent for d in dirs}
        for job in [self._pool.submit(_fsync, d, True) for d in dirs]:
            job.result()
        rel = self.manifest.rel
        self.manifest.append([self.manifest.entry(rel(p), sha, e[0].nbytes, self.kind)
                              for (p, e), sha in zip(dirty, shas)])
        return [WrittenFile(p, self.kind, None) for p, _ in dirty]

    def _evict(self) -> list[WrittenFile]:
        c2 = self.chunk * self.chunk
        if len(self._cache) * c2 <= self._budget:
            return []
        victims = []
        for key in self._cache:                         # oldest first
            victims.append(key)
            if (len(self._cache) - len(victims)) * c2 <= 0.75 * self._budget:
                break
        out = self._write_chunks(victims)
        for key in victims:
            del self._cache[key]
        return out

    # ------------------------------------------------------------ tiles
    def _paste_tile(self, rec: TileRecord, image: np.ndarray, t_start: float) -> list[WrittenFile]:
        sec = self._open(rec.section_id, rec)
        self._pasted.setdefault((rec.section_id, rec.cycle), {})[(rec.tile_id, rec.version)] = t_start
        if abs(rec.pixel_size_m / sec.pixel_size_m - 1) > 1e-3:
            log.warning("%s: pixel size %.3g m differs from section's %.3g m; not placed in the OME-Zarr",
                        rec.tile_id, rec.pixel_size_m, sec.pixel_size_m)
            return []
        if abs(rec.rotation_deg - sec.rotation_deg) > 0.05:
            log.warning("%s: scan rotation %.2f deg, section's is %.2f deg: pasted unrotated",
                        rec.tile_id, rec.rotation_deg, sec.rotation_deg)
        x0, y0 = rec.frame_topleft_px(sec.rotation_deg)
        q = self._snap
        ox, oy = round((x0 - sec.origin[0]) / q) * q, round((y0 - sec.origin[1]) / q) * q
        tile = image
        if ox < 0 or oy < 0:
            log.warning("%s lies %d px left / %d px above the section origin; clipped in the OME-Zarr",
                        rec.tile_id, max(0, -ox), max(0, -oy))
            tile = tile[max(0, -oy):, max(0, -ox):]
            ox, oy = max(0, ox), max(0, oy)
        if tile.size:
            self._grow(sec, rec.cycle, oy + tile.shape[0], ox + tile.shape[1])
            self._paste(rec.section_id, rec.cycle, oy, ox, tile)
        return self._evict()

    def _paste(self, sec_id, z, y0, x0, tile) -> None:
        y1, x1 = y0 + tile.shape[0], x0 + tile.shape[1]
        self._update(sec_id, 0, z, y0, x0, tile)
        cur = tile
        for l in range(1, self.levels):
            ay0, ax0, ay1, ax1 = y0 & ~1, x0 & ~1, y1 + (y1 & 1), x1 + (x1 & 1)
            if (ay0, ax0, ay1, ax1) != (y0, x0, y1, x1):
                # complete the 2x2 blocks on the border with what level l-1 holds
                buf = self._read(sec_id, l - 1, z, ay0, ay1, ax0, ax1)
                buf[y0 - ay0:y1 - ay0, x0 - ax0:x1 - ax0] = cur
                cur = buf
            cur = cv2.resize(cur, ((ax1 - ax0) // 2, (ay1 - ay0) // 2), interpolation=cv2.INTER_AREA)
            y0, y1, x0, x1 = ay0 // 2, ay1 // 2, ax0 // 2, ax1 // 2
            self._update(sec_id, l, z, y0, x0, cur)

    # ------------------------------------------------------------ flushing, journal, recovery
    def _journal_path(self, section: int) -> Path:
        return self.out_dir / f"zarr/{section:04d}.tiles.jsonl"

    def _load_journal(self, sec: _Section, section: int) -> None:
        p = self._journal_path(section)
        if p.exists():
            for line in p.read_text().splitlines():
                try:
                    d = json.loads(line)
                except json.JSONDecodeError:
                    continue                            # torn last line: that tile is recovered again
                sec.flushed.setdefault(d["cycle"], set()).add((d["tile_id"], d["version"]))

    def _flush_plane(self, sec_id: int, z: int) -> list[WrittenFile]:
        keys = [k for k in self._cache if k[0] == sec_id and k[2] == z]
        written = self._write_chunks(keys)
        for k in keys:
            del self._cache[k]                          # the next planes do not need them
        tiles = self._pasted.pop((sec_id, z), {})
        if tiles:
            lines = "".join(json.dumps({"cycle": z, "tile_id": t, "version": v}) + "\n"
                            for (t, v) in sorted(tiles, key=tiles.get))
            append_durably(self._journal_path(sec_id), lines.encode())
            self._sections[sec_id].flushed.setdefault(z, set()).update(tiles)
        return written

    def _recover(self, section: int, cycle: int) -> int:
        """Paste tiles that are on disk but neither flushed nor pasted (after a crash)."""
        on_disk = latest_versions(self.out_dir, section, cycle)
        sec = self._open(section)
        done = set(self._pasted.get((section, cycle), {})) | (sec.flushed.get(cycle, set()) if sec else set())
        todo = []
        for tid, ver in on_disk.items():
            if (tid, ver) not in done:
                path = self.out_dir / tile_relpath(section, cycle, tid, ver)
                try:
                    todo.append((read_tile_header(path), path))
                except (OSError, ValueError) as e:
                    log.error("cannot read %s for the OME-Zarr: %s", path, e)
        for h, path in sorted(todo, key=lambda hp: hp[0].get("t_start", 0.0)):
            log.warning("OME-Zarr: %s v%s was not in the volume; pasted from %s", h["tile_id"], h["version"], path)
            self._paste_tile(TileRecord.from_header(h), tifffile.imread(path), h.get("t_start", 0.0))
        return len(todo)

    def _recover_all(self) -> list[WrittenFile]:
        out = []
        for sec_dir in sorted((self.out_dir / "tiles").glob("[0-9][0-9][0-9][0-9]")):
            for cyc_dir in sorted(sec_dir.glob("[0-9][0-9][0-9][0-9]")):
                section, cycle = int(sec_dir.name), int(cyc_dir.name)
                if self._recover(section, cycle):
                    out += self._flush_plane(section, cycle)
        return out
