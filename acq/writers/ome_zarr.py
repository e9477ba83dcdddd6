"""Per-section OME-Zarr volume in stage coordinates: {zarr}/{section:04d}.ome.zarr.

Frame: zarr v3, NGFF 0.5. Arrays "0".."L-1", axes (z, y, x), uint8; y/x are
the STAGE axes (+x = +column, +y = +row, as common/geometry.py), z = cycle.
Each level's coordinateTransformations are scale (slice thickness, pixel
size * 2**l) and translation (the stage position, in µm, of the centre of its
pixel (0, 0)), so every section of a run, and the overview, sit in one frame
and any NGFF reader places them without our private attributes. Tiles
acquired with a scan rotation are resampled into the stage frame (bilinear,
by the same mapping the engine uses: layout.TileRecord.frame_topleft_px);
only the pixels the tile covers are pasted, so rotated tiles' empty corners
never cover a neighbour. Unrotated tiles (under half a pixel of turn at the
corners) are pasted unresampled at the nearest pixel: a tile's centre is
always within half a pixel of its stage position. The tile pasted last wins
in overlaps; the OME-TIFFs stay the master copy.

Storage: through zarr's store API (acq/writers/zarr_store.py: local disk or
any fsspec URL). Arrays are sharded: shards (1, S, S) hold inner chunks
(1, c, c), each zstd-compressed; chunks never written (or all zero) are not
stored. The shard is also the unit of the in-memory cache (LRU,
``cache_mb``): tiles are pasted into cached shards, and a plane's shards are
written whole at its SectionDone (or on eviction, RunStop, close), so zarr
never reads a shard back to update it.

Sizing: arrays GROW as tiles arrive, by >= 1/4 each time, in steps of
Q = S * 2**(L-1) px so each level is exactly half the one below. A tile
beyond the top or left edge moves the origin by whole steps: the shards
already written are moved to their new keys (a rename of whole objects, no
re-encoding) and the translation changes; the "acq" attribute "moving" marks
the store meanwhile, and a store found with it is rebuilt. The initial origin
leaves the grid's rows/columns before the first tile plus a quarter tile
and 2 µm of stage error, so in most runs it never moves. Level n is the exact
2x2 box mean (cv2.INTER_AREA) of level n-1, recomputed per tile over the
tile's footprint from level n-1.

Crash safety: handle(TileEvent) returns before the tile is in the volume; the
tile is durable in its OME-TIFF, from which the volume derives (a derived
writer, ``primary = False``). Flushed tiles are appended (fsynced) to
zarr/{section:04d}.tiles.jsonl (always local, also for a remote store); on a
resumed RunStart, on each SectionDone and by ``catch_up()``, tiles on disk
(latest version) missing from that list and from memory are read back from
their OME-TIFF and pasted: only those when they are newer than everything in
the plane, else the whole plane again in acquisition order (so overlaps come
out as without the crash). On construction every store is checked: one whose
group is unreadable, lacks the "acq" attributes or the multiscales, is not
this layout, or was moving, is discarded (its manifest lines marked deleted,
its tiles log removed) and rebuilt from the OME-TIFFs; arrays left with
inconsistent shapes by a crash mid-resize are grown to agree; a plane with a
shard file that the manifest lists but that is missing or of another size is
pasted again. Every filesystem operation calls common.crashpoints.point.

Manifest (local stores): every object written is recorded with its sha256
(kind "zarr" for shards, "zarr_meta" for zarr.json; the last line per path
wins, as both are rewritten; removed shards get a deletion line). The
.tiles.jsonl log is bookkeeping, not recorded.
"""
from __future__ import annotations

import json
import logging
import math
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import zarr
from zarr.core.sync import sync

from acq.documents import CatchUp, DocumentRouter, RunStart, RunStop, SectionDone, TileEvent
from acq.writers.layout import TileRecord, planes_for, plane_of
from acq.writers.manifest import Manifest, WrittenFile, append_durably
from acq.writers.stage_frame import AXES, footprint, ngff_datasets, resample
from acq.writers.ome_zarr_repair import LAYOUT, SHARD_KEY, StoreRepair, _Broken, _Section
from acq.writers.zarr_shard import encode_shard
from acq.writers.zarr_store import Volumes, buffer_prototype
from common.atomic import ensure_dir

log = logging.getLogger(__name__)
ZSTD_LEVEL = 1                          # zstd's fast end: ~1.8x on SEM-like images at ~250 MB/s per core


class OmeZarrWriter(StoreRepair, DocumentRouter):
    file_kind = "zarr"           # the manifest kind of its files
    meta_kind = "zarr_meta"
    primary = False

    def __init__(self, out_dir: Path, manifest: Manifest, levels: int = 3, chunk: int = 512,
                 slice_um: float = 0.05, margin: float = 0.25, margin_um: float = 2.0, cache_mb: int = 512,
                 shard: Optional[int] = None, url: Optional[str] = None):
        shard = shard or 8 * chunk
        if levels < 1 or shard % chunk or shard % (2 ** (levels - 1)):
            raise ValueError("zarr shard must be a multiple of the chunk and of 2**(levels-1)")
        self.out_dir = Path(out_dir)
        self.manifest = manifest
        self.volumes = Volumes(self.out_dir, url)
        self.levels, self.chunk, self.shard, self.slice_um = levels, chunk, shard, slice_um
        self.margin, self.margin_um = margin, margin_um
        self._budget = max(cache_mb << 20, 4 * shard * shard)    # a tile's shards at least
        self._sections: dict[int, _Section] = {}
        self._cache: OrderedDict[tuple, list] = OrderedDict()   # (sec, l, z, sy, sx) -> [shard, dirty]
        self._pasted: dict[tuple[int, int], dict] = {}          # (sec, z) -> {(tile, ver): t_start} not flushed
        self._closed: set[tuple[int, int]] = set()
        self._suspect: set[tuple[int, int]] = set()             # planes to paste again whole (shards lost)
        self._needs_catch_up = False                            # a store was discarded or planes are suspect
        self._written: list[dict] = []                          # manifest lines not yet appended
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="zarr-zstd")     # compression (releases the GIL)
        self._io = ThreadPoolExecutor(1, thread_name_prefix="zarr-io")         # shard writes, in order
        import ome_zarr.writer  # noqa: F401  (seconds to import: pay it now, not at the first tile)
        self._check_stores()

    # ------------------------------------------------------------ documents
    def on_tile(self, doc: TileEvent) -> list[WrittenFile]:
        rec = TileRecord.from_doc(doc)
        out = self._paste_tile(rec, doc.image, doc.t_start)
        if (rec.section_id, rec.cycle) in self._closed:     # late re-acquisition: write through
            out += self._flush_plane(rec.section_id, rec.cycle)
        return out

    def on_section_done(self, doc: SectionDone) -> list[WrittenFile]:
        self._closed.add((doc.section_id, doc.cycle))
        _n, errors = self._recover(doc.section_id, doc.cycle)
        out = self._flush_plane(doc.section_id, doc.cycle)
        if self._needs_catch_up:
            out += self._recover_all()
        if errors:
            raise RuntimeError(f"OME-Zarr: {len(errors)} tiles not pasted: {'; '.join(errors[:3])}")
        return out

    def on_start(self, doc: RunStart) -> list[WrittenFile]:
        if doc.resumed or self._needs_catch_up:
            return self._recover_all()      # a fresh run has nothing to catch up (and must not re-read)
        return []

    def on_catch_up(self, doc: CatchUp) -> list[WrittenFile]:
        return self.catch_up(planes_for(self.out_dir, doc))

    def on_stop(self, doc: RunStop) -> list[WrittenFile]:
        self.flush()
        return []

    def flush(self) -> None:
        for sec_id, z in sorted(self._pasted):
            self._flush_plane(sec_id, z)
        if self._needs_catch_up:
            self._recover_all()

    def close(self) -> None:
        self.flush()
        self._sections.clear()
        self._pool.shutdown(wait=True)
        self._io.shutdown(wait=True)

    def catch_up(self, planes=None) -> list[WrittenFile]:
        """Paste what the OME-TIFFs on disk hold and the volume lacks, for
        ``planes`` (default: every plane on disk), and write it. Run it in the
        writer's thread (a ``catch_up`` document) or while no document is handled."""
        if planes is None:
            return self._recover_all()
        out, errors = [], []
        for sec, cyc in planes:
            n, errs = self._recover(sec, cyc)
            errors += errs
            if n or (sec, cyc) in self._pasted:
                out += self._flush_plane(sec, cyc)
        if errors:
            raise RuntimeError(f"OME-Zarr: {len(errors)} tiles not pasted: {'; '.join(errors[:3])}")
        return out

    def rebuild(self, tile) -> list[WrittenFile]:
        """Make sure the plane of ``tile`` (a TileEvent or a tile's path) holds
        every tile on disk, pasting from the OME-TIFFs what it lacks."""
        return self.catch_up([plane_of(tile)])

    def section_path(self, section: int) -> Path:
        return self.volumes.path(section)

    # ------------------------------------------------------------ manifest
    def _on_write(self, section: int):
        if not self.volumes.local:
            return None
        base = f"zarr/{self.volumes.name(section)}/"

        def record(key: str, sha: Optional[str], size: int) -> None:
            kind = self.meta_kind if key.endswith("zarr.json") else self.file_kind
            line = Manifest.deletion(base + key, kind) if sha is None else Manifest.entry(base + key, sha, size, kind)
            with self._lock:
                self._written.append(line)
        return record

    def _record(self) -> list[WrittenFile]:
        with self._lock:
            lines, self._written = self._written, []
        self.manifest.append(lines)
        return [WrittenFile(self.out_dir / e["path"], self.file_kind, None) for e in lines
                if e["kind"] == self.file_kind and not e.get("deleted")]

    # ------------------------------------------------------------ stores
    def _open(self, section: int, rec: TileRecord | None = None) -> _Section | None:
        """The section's volume: cached, opened, or created for ``rec``."""
        sec = self._sections.get(section)
        if sec is not None:
            return sec
        if self.volumes.exists(section):
            try:
                sec = self._load(section)
            except _Broken as e:
                self._discard(section, str(e))
        if sec is None:
            if rec is None:
                return None
            sec = self._create(section, rec)
        self._sections[section] = sec
        return sec

    def _write_ngff(self, group: zarr.Group, section: int, origin: tuple[int, int], px_m: float) -> None:
        from ome_zarr.format import FormatV05
        from ome_zarr.writer import write_multiscales_metadata
        write_multiscales_metadata(group, ngff_datasets(self.levels, self.slice_um, origin, px_m), fmt=FormatV05(),
                                   axes=AXES, name=f"section {section:04d}")

    def _acq_attrs(self, section: int, origin, px_m: float, moving: bool = False) -> dict:
        return {"layout": LAYOUT, "section_id": section, "frame": "stage", "origin_px": [origin[0], origin[1]],
                "pixel_size_m": px_m, "z": "cycle", "slice_um": self.slice_um, "moving": moving}

    def _create(self, section: int, rec: TileRecord) -> _Section:
        """Build the store (locally: under a temporary name, then renamed)."""
        # the first tile's footprint, less the grid's rows/columns before it (in the stage frame) and a margin
        (x0, y0), (x1, y1) = footprint(rec)
        th = math.radians(rec.rotation_deg)
        before = (rec.col + self.margin) * rec.width, (rec.row + self.margin) * rec.height
        slack = self.margin_um * 1e-6 / rec.pixel_size_m
        ox = math.floor(x0 - abs(math.cos(th)) * before[0] - abs(math.sin(th)) * before[1] - slack)
        oy = math.floor(y0 - abs(math.sin(th)) * before[0] - abs(math.cos(th)) * before[1] - slack)
        big = self.shard << (self.levels - 1)
        shapes = [(1, big >> l, big >> l) for l in range(self.levels)]

        def make(store) -> None:
            from zarr.codecs import ZstdCodec
            group = zarr.open_group(store=store, mode="w-", zarr_format=3)
            for l in range(self.levels):
                group.create_array(str(l), shape=shapes[l], chunks=(1, self.chunk, self.chunk),
                                   shards=(1, self.shard, self.shard), dtype="uint8", fill_value=0,
                                   compressors=ZstdCodec(level=ZSTD_LEVEL), dimension_names=("z", "y", "x"),
                                   config={"write_empty_chunks": False})
            self._write_ngff(group, section, (ox, oy), rec.pixel_size_m)
            group.attrs["acq"] = self._acq_attrs(section, (ox, oy), rec.pixel_size_m)   # last: the store is whole

        self.volumes.build(section, make)
        if self.volumes.local:
            base = f"zarr/{self.volumes.name(section)}/"
            self.manifest.append([self.manifest.entry_from_disk(base + k, self.meta_kind) for k in self._meta_keys()])
        group = zarr.open_group(store=self.volumes.store(section, self._on_write(section)), mode="r+", zarr_format=3)
        return _Section(group, [group[str(l)] for l in range(self.levels)], shapes, (ox, oy), rec.pixel_size_m)

    def _set_shapes(self, sec: _Section, shapes: list) -> None:
        for l, shape in enumerate(shapes):
            if tuple(sec.shapes[l]) != tuple(shape):
                sec.arrays[l].resize(shape)
                sec.shapes[l] = tuple(shape)
        self._record()

    def _grow(self, sec_id: int, sec: _Section, z: int, x0: int, y0: int, x1: int, y1: int) -> tuple[int, int]:
        """Make room for [y0, y1) x [x0, x1) (level-0 array pixels); the shift
        (dx, dy) when the origin had to move."""
        q = self.shard << (self.levels - 1)
        dx = -(-max(0, -x0, (sec.shapes[0][2] // 4) if x0 < 0 else 0) // q) * q
        dy = -(-max(0, -y0, (sec.shapes[0][1] // 4) if y0 < 0 else 0) // q) * q
        if dx or dy:
            self._move_origin(sec_id, sec, dx, dy)
        Z, H, W = sec.shapes[0]
        x1, y1 = x1 + dx, y1 + dy
        if z < Z and y1 <= H and x1 <= W:
            return dx, dy
        if y1 > H:
            H = -(-max(y1, H + H // 4) // q) * q
        if x1 > W:
            W = -(-max(x1, W + W // 4) // q) * q
        self._set_shapes(sec, [(max(Z, z + 1), H >> l, W >> l) for l in range(self.levels)])
        return dx, dy

    def _move_origin(self, sec_id: int, sec: _Section, dx: int, dy: int) -> None:
        """Grow to the top/left by (dx, dy) px (multiples of Q): shards move to
        their new keys, the origin and translation change."""
        log.info("OME-Zarr section %d: origin moved by (%d, %d) px", sec_id, -dx, -dy)
        sec.group.attrs["acq"] = self._acq_attrs(sec_id, sec.origin, sec.pixel_size_m, moving=True)
        Z, H, W = sec.shapes[0]
        self._set_shapes(sec, [(Z, (H + dy) >> l, (W + dx) >> l) for l in range(self.levels)])
        moves = []
        for l in range(self.levels):
            sy, sx = (dy >> l) // self.shard, (dx >> l) // self.shard
            keys = []
            for key in self.volumes.keys(sec_id, f"{l}/c/"):
                m = SHARD_KEY.match(key)
                if m:
                    keys.append((int(m[3]), int(m[4]), int(m[2])))
            for ky, kx, kz in sorted(keys, reverse=True):       # far end first: no shard lands on an unmoved one
                moves.append((f"{l}/c/{kz}/{ky}/{kx}", f"{l}/c/{kz}/{ky + sy}/{kx + sx}"))
        self.volumes.move(sec_id, moves, self._on_write(sec_id))
        shifted = OrderedDict()
        for (s, l, z, ky, kx), entry in self._cache.items():
            if s == sec_id:
                ky, kx = ky + (dy >> l) // self.shard, kx + (dx >> l) // self.shard
            shifted[(s, l, z, ky, kx)] = entry
        self._cache = shifted
        sec.origin = (sec.origin[0] - dx, sec.origin[1] - dy)
        self._write_ngff(sec.group, sec_id, sec.origin, sec.pixel_size_m)
        sec.group.attrs["acq"] = self._acq_attrs(sec_id, sec.origin, sec.pixel_size_m)
        self._record()

    # ------------------------------------------------------------ shard cache
    def _shard(self, sec_id: int, key: tuple) -> np.ndarray:
        entry = self._cache.get(key)
        if entry is not None:
            self._cache.move_to_end(key)
            return entry[0]
        _s, l, z, ky, kx = key
        s = self.shard
        sec = self._sections[sec_id]
        data = np.zeros((s, s), np.uint8)
        # (a shard never written is all fill value: a stat instead of a zarr read)
        if z < sec.shapes[l][0] and sync(sec.group.store.exists(f"{l}/c/{z}/{ky}/{kx}")):
            try:
                data = np.ascontiguousarray(sec.arrays[l][z, ky * s:(ky + 1) * s, kx * s:(kx + 1) * s])
            except Exception as e:      # damaged after the start-up check: the whole plane goes in again
                log.warning("OME-Zarr section %d: shard %s unreadable (%s): cycle %d is pasted again",
                            sec_id, key[1:], e, z)
                self._suspect.add((sec_id, z))
                self._needs_catch_up = True
        self._cache[key] = [data, False]
        return data

    def _read(self, sec_id, l, z, y0, y1, x0, x1) -> np.ndarray:
        s = self.shard
        out = np.empty((y1 - y0, x1 - x0), np.uint8)
        for ky in range(y0 // s, (y1 - 1) // s + 1):
            for kx in range(x0 // s, (x1 - 1) // s + 1):
                ch = self._shard(sec_id, (sec_id, l, z, ky, kx))
                ya, yb, xa, xb = max(y0, ky * s), min(y1, (ky + 1) * s), max(x0, kx * s), min(x1, (kx + 1) * s)
                out[ya - y0:yb - y0, xa - x0:xb - x0] = ch[ya - ky * s:yb - ky * s, xa - kx * s:xb - kx * s]
        return out

    def _update(self, sec_id, l, z, y0, x0, data, mask=None) -> None:
        s = self.shard
        y1, x1 = y0 + data.shape[0], x0 + data.shape[1]
        for ky in range(y0 // s, (y1 - 1) // s + 1):
            for kx in range(x0 // s, (x1 - 1) // s + 1):
                key = (sec_id, l, z, ky, kx)
                ya, yb, xa, xb = max(y0, ky * s), min(y1, (ky + 1) * s), max(x0, kx * s), min(x1, (kx + 1) * s)
                part = data[ya - y0:yb - y0, xa - x0:xb - x0]
                if mask is None and yb - ya == s and xb - xa == s:
                    self._cache[key] = [np.ascontiguousarray(part), True]
                    self._cache.move_to_end(key)
                    continue
                dst = self._shard(sec_id, key)[ya - ky * s:yb - ky * s, xa - kx * s:xb - kx * s]
                if mask is None:
                    dst[...] = part
                else:
                    m = mask[ya - y0:yb - y0, xa - x0:xb - x0]
                    dst[m] = part[m]
                self._cache[key][1] = True

    def _write_shards(self, keys) -> list[WrittenFile]:
        """Write dirty shards through the store: each encoded here, its chunks
        compressed in parallel (zarr_shard.py), while the shard before is being
        written (and fsynced); list them in the manifest."""
        buffer = buffer_prototype().buffer

        def put(store, name: str, data) -> None:
            if data is not None:
                sync(store.set(name, buffer.from_bytes(data)))
            elif sync(store.exists(name)):         # all zero now: stored as nothing, as zarr would
                sync(store.delete(name))
        dirty = [(k, self._cache[k]) for k in keys if self._cache[k][1]]
        jobs = []
        for (sec_id, l, z, ky, kx), entry in dirty:
            data = encode_shard(entry[0], self.chunk, ZSTD_LEVEL, self._pool)
            jobs.append(self._io.submit(put, self._sections[sec_id].group.store, f"{l}/c/{z}/{ky}/{kx}", data))
        for job in jobs:
            job.result()
        for _k, e in dirty:
            e[1] = False                    # (an error above re-raised: the plane stays pending)
        return self._record()

    def _evict(self) -> list[WrittenFile]:
        s2 = self.shard * self.shard
        if len(self._cache) * s2 <= self._budget:
            return []
        victims = []
        for key in self._cache:                         # oldest first
            victims.append(key)
            if (len(self._cache) - len(victims)) * s2 <= 0.75 * self._budget:
                break
        out = self._write_shards(victims)
        for key in victims:
            del self._cache[key]
        return out

    # ------------------------------------------------------------ tiles
    def _paste_tile(self, rec: TileRecord, image: np.ndarray, t_start: float) -> list[WrittenFile]:
        sec = self._open(rec.section_id, rec)
        plane = (rec.section_id, rec.cycle)
        if abs(rec.pixel_size_m / sec.pixel_size_m - 1) > 1e-3:
            log.warning("%s: pixel size %.3g m differs from section's %.3g m; not placed in the OME-Zarr",
                        rec.tile_id, rec.pixel_size_m, sec.pixel_size_m)
            self._pasted.setdefault(plane, {})[(rec.tile_id, rec.version)] = t_start
            return []
        x0, y0, pixels, mask = resample(rec, image, sec.origin)
        dx, dy = self._grow(rec.section_id, sec, rec.cycle, x0, y0, x0 + pixels.shape[1], y0 + pixels.shape[0])
        self._paste(rec.section_id, rec.cycle, y0 + dy, x0 + dx, pixels, mask)
        # only now: a tile whose paste failed is missing, and recovery pastes it from its OME-TIFF
        self._pasted.setdefault(plane, {})[(rec.tile_id, rec.version)] = t_start
        return self._evict()

    def _paste(self, sec_id, z, y0, x0, tile, mask) -> None:
        y1, x1 = y0 + tile.shape[0], x0 + tile.shape[1]
        self._update(sec_id, 0, z, y0, x0, tile, mask)
        for l in range(1, self.levels):
            # the footprint's 2x2 blocks, whole, from the level below
            y0, x0, y1, x1 = y0 & ~1, x0 & ~1, y1 + (y1 & 1), x1 + (x1 & 1)
            below = self._read(sec_id, l - 1, z, y0, y1, x0, x1)
            cur = cv2.resize(below, ((x1 - x0) // 2, (y1 - y0) // 2), interpolation=cv2.INTER_AREA)
            y0, y1, x0, x1 = y0 // 2, y1 // 2, x0 // 2, x1 // 2
            self._update(sec_id, l, z, y0, x0, cur)

    # ------------------------------------------------------------ flushing
    def _flush_plane(self, sec_id: int, z: int) -> list[WrittenFile]:
        keys = [k for k in self._cache if k[0] == sec_id and k[2] == z]
        written = self._write_shards(keys)
        for k in keys:
            del self._cache[k]                          # the next planes do not need them
        tiles = self._pasted.pop((sec_id, z), {})
        if tiles:
            lines = "".join(json.dumps({"cycle": z, "tile_id": t, "version": v, "t_start": tiles[(t, v)]}) + "\n"
                            for (t, v) in sorted(tiles, key=lambda k: (tiles[k] or 0.0, k[1])))
            try:
                ensure_dir(self.out_dir / "zarr")        # (only the log is local when the volumes are not)
                append_durably(self._journal_path(sec_id), lines.encode())
            except BaseException:
                self._pasted.setdefault((sec_id, z), {}).update(tiles)     # not durable: still pending
                raise
            sec = self._sections.get(sec_id)
            if sec is not None:
                sec.flushed.setdefault(z, {}).update(tiles)
        return written
