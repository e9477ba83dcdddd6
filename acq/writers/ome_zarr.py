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
tile is durable in its OME-TIFF, from which the volume derives (a derived
writer, ``primary = False``). Flushed tiles are appended (fsynced) to
zarr/{section:04d}.tiles.jsonl; on a resumed RunStart, on each SectionDone
and by ``catch_up()``, tiles on disk (latest version) missing from that list
and from memory are read back from their OME-TIFF and pasted: only those when
they are newer than everything in the plane, else the whole plane again in
acquisition order (so overlaps come out as without the crash). Only then is
anything re-read.

A store is never half-made under its name: it is built (group, arrays, NGFF
and "acq" attributes) in zarr/.{section:04d}.ome.zarr.new.part, fsynced and
renamed into place; array metadata (shape, as arrays grow) is rewritten by
temp file + rename, never in place. On construction every store is checked:
a store whose zarr.json is unreadable, lacks the "acq" attributes or the
multiscales, or whose array metadata is missing or not this writer's layout,
is discarded (its manifest lines marked deleted, its tiles log removed) and
rebuilt from the OME-TIFFs; arrays left with inconsistent shapes by a crash
mid-resize are grown to agree; a plane with a chunk file that the manifest
lists but that is missing or truncated is re-pasted. Every filesystem
operation calls common.crashpoints.point.

Manifest: every chunk file written is recorded with the sha256 of the chunk
in memory (kind "zarr"), every zarr.json written with its hash (kind
"zarr_meta"); the last line per path wins, as both are rewritten. The
.tiles.jsonl log is bookkeeping, not recorded.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import tifffile
import zarr

from acq.documents import CatchUp, DocumentRouter, RunStart, RunStop, SectionDone, TileEvent
from common.atomic import atomic_write, ensure_dir, fsync_dir, is_temporary, temp_name
from common.crashpoints import point
from acq.writers.layout import (TileRecord, latest_versions, planes_for, planes_on_disk, plane_of,
                                read_tile_header, tile_relpath)
from acq.writers.manifest import Manifest, WrittenFile, append_durably

log = logging.getLogger(__name__)
_STORE = re.compile(r"^(\d+)\.ome\.zarr$")
_LOG = re.compile(r"^(\d+)\.tiles\.jsonl$")
_CHUNK = re.compile(r"^zarr/(\d+)\.ome\.zarr/(\d+)/c/(\d+)/\d+/\d+$")


class _Broken(Exception):
    """A store this writer cannot use as it is (rebuilt from the OME-TIFFs)."""


def _fsync(path: Path, directory: bool = False) -> None:
    point("fsync_dir" if directory else "fsync", path)
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
    tmp = temp_name(path)
    try:
        point("create", tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            point("write", tmp)
            f.write(memoryview(chunk).cast("B"))
            f.flush()
            point("fsync", tmp)
            os.fsync(f.fileno())
        point("rename", path)
        os.replace(tmp, path)       # chunks are derived, mutable data: replacing is their nature
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return hashlib.sha256(chunk).hexdigest()


def _rmtree(path: Path) -> None:
    point("unlink", path)
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class _Section:
    root: Path
    shapes: list                   # per level (z, y, x), as in its zarr.json
    origin: tuple[int, int]        # section-frame pixels (x, y) of array pixel (0, 0)
    pixel_size_m: float
    rotation_deg: float            # array axes = stage axes turned by this
    flushed: dict = field(default_factory=dict)     # cycle -> {(tile_id, version): t_start} durable in the volume


class OmeZarrWriter(DocumentRouter):
    file_kind = "zarr"           # the manifest kind of its files
    meta_kind = "zarr_meta"
    primary = False

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
        self._suspect: set[tuple[int, int]] = set()             # planes to paste again whole (chunks lost)
        self._needs_catch_up = False                            # a store was discarded or planes are suspect
        self._snap = 2 ** (levels - 1)
        self._pool = ThreadPoolExecutor(8, thread_name_prefix="zarr-io")
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

    # ------------------------------------------------------------ sections
    def section_path(self, section: int) -> Path:
        return self.out_dir / f"zarr/{section:04d}.ome.zarr"

    def _check_stores(self) -> None:
        """On construction: repair or discard what a crash (or an older
        version of this writer) left; see the module docstring."""
        zdir = self.out_dir / "zarr"
        if not zdir.is_dir():
            return
        sections = set()
        for p in sorted(zdir.iterdir()):
            if is_temporary(p.name):
                if p.is_dir():
                    _rmtree(p)
                else:
                    point("unlink", p)
                    p.unlink(missing_ok=True)
                continue
            m = _STORE.match(p.name) or _LOG.match(p.name)
            if m:
                sections.add(int(m[1]))
        latest = self.manifest.latest("zarr/")
        listed: dict[int, list[str]] = {}
        for rel, e in latest.items():
            m = re.match(r"^zarr/(\d+)\.ome\.zarr/", rel)
            if m and not e.get("deleted"):
                listed.setdefault(int(m[1]), []).append(rel)
        sections |= set(listed)
        c2 = self.chunk * self.chunk
        for section in sorted(sections):
            root = self.section_path(section)
            if not root.exists():
                log_path = self._journal_path(section)
                if log_path.exists():       # it speaks of a store that is gone: the tiles go in again
                    point("unlink", log_path)
                    log_path.unlink()
                if listed.get(section):
                    log.warning("OME-Zarr %s is gone: rebuilt from the OME-TIFFs", root)
                    self._needs_catch_up = True
                continue
            try:
                sec = self._load(section)
            except _Broken as e:
                self._discard(section, str(e), latest)
                continue
            self._sections[section] = sec
            for rel in listed.get(section, []):
                m = _CHUNK.match(rel)
                if not m:
                    continue
                p = self.out_dir / rel
                try:
                    ok = p.stat().st_size == c2
                except OSError:
                    ok = False
                if not ok:
                    log.warning("OME-Zarr chunk %s missing or truncated: cycle %s is pasted again", rel, m[3])
                    self._suspect.add((section, int(m[3])))
            self.manifest.record_if_changed(self._meta_rels(section), self.meta_kind, latest)
        if self._suspect:
            self._needs_catch_up = True

    def _meta_rels(self, section: int) -> list[str]:
        base = f"zarr/{section:04d}.ome.zarr"
        return [f"{base}/zarr.json"] + [f"{base}/{l}/zarr.json" for l in range(self.levels)]

    def _load(self, section: int) -> _Section:
        """Open a store from disk, checked; _Broken if this writer cannot use it."""
        root = self.section_path(section)
        try:
            g = json.loads((root / "zarr.json").read_bytes())
        except (OSError, ValueError) as e:
            raise _Broken(f"group metadata unreadable ({type(e).__name__})") from None
        if not isinstance(g, dict) or g.get("node_type") != "group" or g.get("zarr_format") != 3:
            raise _Broken("zarr.json is not a zarr v3 group")
        attrs = g.get("attributes") or {}
        a = attrs.get("acq")
        try:
            origin = (int(a["origin_px"][0]), int(a["origin_px"][1]))
            px, rot = float(a["pixel_size_m"]), float(a.get("rotation_deg") or 0.0)
        except (TypeError, KeyError, IndexError, ValueError):
            raise _Broken("no 'acq' attributes (its creation was interrupted)") from None
        ms = (attrs.get("ome") or {}).get("multiscales") or [{}]
        if [d.get("path") for d in ms[0].get("datasets", [])] != [str(l) for l in range(self.levels)]:
            raise _Broken(f"no multiscales metadata for {self.levels} levels")
        shapes = []
        for l in range(self.levels):
            try:
                m = json.loads((root / str(l) / "zarr.json").read_bytes())
                chunks = m["chunk_grid"]["configuration"]["chunk_shape"]
                codecs = [c["name"] for c in m["codecs"]]
                shape = tuple(int(x) for x in m["shape"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise _Broken(f"array {l} metadata unreadable ({type(e).__name__})") from None
            if (m.get("node_type") != "array" or m.get("data_type") != "uint8" or codecs != ["bytes"]
                    or chunks != [1, self.chunk, self.chunk] or len(shape) != 3):
                raise _Broken(f"array {l}: {m.get('data_type')}, codecs {codecs}, chunks {chunks}: this writer "
                              f"needs raw uint8 chunks of {self.chunk} px")
            shapes.append(shape)
        try:
            zg = zarr.open_group(root, mode="r", zarr_format=3)
            for l in range(self.levels):
                zg[str(l)].shape
        except Exception as e:
            raise _Broken(f"zarr cannot open it ({type(e).__name__}: {e})") from None
        sec = _Section(root, shapes, origin, px, rot)
        q = self.chunk << (self.levels - 1)
        Z = max(s[0] for s in shapes)
        H = -(-max(s[1] << l for l, s in enumerate(shapes)) // q) * q
        W = -(-max(s[2] << l for l, s in enumerate(shapes)) // q) * q
        want = [(Z, H >> l, W >> l) for l in range(self.levels)]
        if want != shapes:
            log.warning("OME-Zarr %s: array shapes %s disagree (a resize cut short): grown to %s", root, shapes, want)
            self._write_shapes(sec, want)
        self._load_journal(sec, section)
        return sec

    def _discard(self, section: int, reason: str, latest: Optional[dict] = None) -> None:
        """Remove an unusable store (it is rebuilt from the OME-TIFFs)."""
        root = self.section_path(section)
        log.warning("OME-Zarr %s unusable: %s; rebuilt from the OME-TIFFs", root, reason)
        log_path = self._journal_path(section)
        if log_path.exists():           # first: a log without its store never claims a tile is in
            point("unlink", log_path)
            log_path.unlink()
            fsync_dir(log_path.parent)
        prefix = f"zarr/{section:04d}.ome.zarr/"
        latest = self.manifest.latest(prefix) if latest is None else latest
        self.manifest.append([Manifest.deletion(rel, e.get("kind", self.file_kind)) for rel, e in sorted(latest.items())
                              if rel.startswith(prefix) and not e.get("deleted")])
        aside = root.with_name(f".{root.name}.old.part")
        if aside.exists():
            _rmtree(aside)
        point("rename", root)
        os.rename(root, aside)
        fsync_dir(root.parent)
        _rmtree(aside)
        self._sections.pop(section, None)
        for key in [k for k in self._cache if k[0] == section]:
            del self._cache[key]
        for plane in [p for p in self._pasted if p[0] == section]:
            del self._pasted[plane]
        self._suspect = {p for p in self._suspect if p[0] != section}
        self._needs_catch_up = True

    def _open(self, section: int, rec: TileRecord | None = None) -> _Section | None:
        """The section's volume: cached, opened from disk, or created for ``rec``."""
        sec = self._sections.get(section)
        if sec is not None:
            return sec
        root = self.section_path(section)
        if root.exists():
            try:
                sec = self._load(section)
            except _Broken as e:
                self._discard(section, str(e))
        if sec is None:
            if rec is None:
                return None
            sec = self._create(root, rec)
        self._sections[section] = sec
        return sec

    def _create(self, root: Path, rec: TileRecord) -> _Section:
        """Build the store under a temporary name, fsync it, rename it into place."""
        from ome_zarr.format import FormatV05
        from ome_zarr.writer import write_multiscales_metadata
        x0, y0 = rec.frame_topleft_px()
        slack = self.margin_um * 1e-6 / rec.pixel_size_m      # stage repeatability; empty chunks cost nothing
        ox = math.floor(x0 - rec.col * rec.width - self.margin * rec.width - slack)
        oy = math.floor(y0 - rec.row * rec.height - self.margin * rec.height - slack)
        tmp = root.with_name(f".{root.name}.new.part")
        if tmp.exists():
            _rmtree(tmp)
        ensure_dir(root.parent)
        point("mkdir", tmp)
        point("metadata", tmp / "zarr.json")
        group = zarr.open_group(tmp, mode="w-", zarr_format=3)
        c, big = self.chunk, self.chunk << (self.levels - 1)
        shapes = [(1, big >> l, big >> l) for l in range(self.levels)]
        for l in range(self.levels):
            point("metadata", tmp / str(l) / "zarr.json")
            group.create_array(str(l), shape=shapes[l], chunks=(1, c, c), dtype="uint8", fill_value=0,
                               dimension_names=("z", "y", "x"), compressors=None)
        px_um = rec.pixel_size_m * 1e6
        datasets = []
        for l in range(self.levels):
            s = px_um * 2 ** l
            half = (2 ** l - 1) / 2 * px_um     # box-mean pixel centres move by half a block
            datasets.append({"path": str(l), "coordinateTransformations": [
                {"type": "scale", "scale": [self.slice_um, s, s]},
                {"type": "translation", "translation": [0.0, oy * px_um + half, ox * px_um + half]}]})
        point("metadata", tmp / "zarr.json")
        write_multiscales_metadata(
            group, datasets, fmt=FormatV05(),
            axes=[{"name": "z", "type": "space", "unit": "micrometer"},
                  {"name": "y", "type": "space", "unit": "micrometer"},
                  {"name": "x", "type": "space", "unit": "micrometer"}],
            name=f"section {rec.section_id:04d}")
        point("metadata", tmp / "zarr.json")
        group.attrs["acq"] = {"section_id": rec.section_id, "origin_px": [ox, oy],
                              "rotation_deg": rec.rotation_deg, "pixel_size_m": rec.pixel_size_m,
                              "z": "cycle", "slice_um": self.slice_um}
        for dirpath, _dirs, files in os.walk(tmp):
            for f in sorted(files):
                _fsync(Path(dirpath) / f)
            _fsync(Path(dirpath), directory=True)
        point("rename", root)
        os.rename(tmp, root)
        _fsync(root.parent, directory=True)
        self.manifest.append([self.manifest.entry_from_disk(rel, self.meta_kind)
                              for rel in self._meta_rels(rec.section_id)])
        return _Section(root, shapes, (ox, oy), rec.pixel_size_m, rec.rotation_deg)

    def _write_shapes(self, sec: _Section, shapes: list) -> None:
        """Set the arrays' shapes: each zarr.json rewritten by temp file + rename."""
        batch = []
        for l, shape in enumerate(shapes):
            if tuple(sec.shapes[l]) == tuple(shape):
                continue
            p = sec.root / str(l) / "zarr.json"
            meta = json.loads(p.read_bytes())
            meta["shape"] = list(shape)
            data = json.dumps(meta, indent=2).encode()
            point("metadata", p)
            atomic_write(p, data, overwrite=True)
            sec.shapes[l] = tuple(shape)
            batch.append(self.manifest.entry(self.manifest.rel(p), hashlib.sha256(data).hexdigest(), len(data),
                                             self.meta_kind))
        self.manifest.append(batch)

    def _grow(self, sec: _Section, z: int, y1: int, x1: int) -> None:
        Z, H, W = sec.shapes[0]
        if z < Z and y1 <= H and x1 <= W:
            return
        q = self.chunk << (self.levels - 1)
        if y1 > H:
            H = -(-max(y1, H + H // 4) // q) * q
        if x1 > W:
            W = -(-max(x1, W + W // 4) // q) * q
        Z = max(Z, z + 1)
        self._write_shapes(sec, [(Z, H >> l, W >> l) for l in range(self.levels)])

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
        for d in sorted(dirs):
            ensure_dir(d)
        shas = [j.result() for j in [self._pool.submit(_put_chunk, p, e[0]) for p, e in dirty]]
        for _p, e in dirty:
            e[1] = False                    # (an error above re-raised: the plane stays pending)
        dirs |= {d.parent for d in dirs} | {d.parent.parent for d in dirs} | {d.parent.parent.parent for d in dirs}
        for job in [self._pool.submit(_fsync, d, True) for d in sorted(dirs)]:
            job.result()
        rel = self.manifest.rel
        self.manifest.append([self.manifest.entry(rel(p), sha, e[0].nbytes, self.file_kind)
                              for (p, e), sha in zip(dirty, shas)])
        return [WrittenFile(p, self.file_kind, None) for p, _ in dirty]

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
        plane = (rec.section_id, rec.cycle)
        if abs(rec.pixel_size_m / sec.pixel_size_m - 1) > 1e-3:
            log.warning("%s: pixel size %.3g m differs from section's %.3g m; not placed in the OME-Zarr",
                        rec.tile_id, rec.pixel_size_m, sec.pixel_size_m)
            self._pasted.setdefault(plane, {})[(rec.tile_id, rec.version)] = t_start
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
        # only now: a tile whose paste failed is missing, and recovery pastes it from its OME-TIFF
        self._pasted.setdefault(plane, {})[(rec.tile_id, rec.version)] = t_start
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
            for line in p.read_text(errors="replace").splitlines():
                try:
                    d = json.loads(line)
                    key = (d["tile_id"], d["version"])
                    sec.flushed.setdefault(d["cycle"], {})[key] = d.get("t_start")
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue                            # torn last line: that tile is recovered again

    def _flush_plane(self, sec_id: int, z: int) -> list[WrittenFile]:
        keys = [k for k in self._cache if k[0] == sec_id and k[2] == z]
        written = self._write_chunks(keys)
        for k in keys:
            del self._cache[k]                          # the next planes do not need them
        tiles = self._pasted.pop((sec_id, z), {})
        if tiles:
            lines = "".join(json.dumps({"cycle": z, "tile_id": t, "version": v, "t_start": tiles[(t, v)]}) + "\n"
                            for (t, v) in sorted(tiles, key=lambda k: (tiles[k] or 0.0, k[1])))
            try:
                append_durably(self._journal_path(sec_id), lines.encode())
            except BaseException:
                self._pasted.setdefault((sec_id, z), {}).update(tiles)     # not durable: still pending
                raise
            sec = self._sections.get(sec_id)
            if sec is not None:
                sec.flushed.setdefault(z, {}).update(tiles)
        return written

    def _recover(self, section: int, cycle: int) -> tuple[int, list[str]]:
        """Paste tiles that are on disk but neither flushed nor pasted (after a
        crash or a failure): only those when they all came after everything the
        plane holds, else the whole plane again, in acquisition order.
        (tiles pasted, errors)."""
        on_disk = latest_versions(self.out_dir, section, cycle)
        plane = (section, cycle)
        if not on_disk:
            self._suspect.discard(plane)
            return 0, []
        sec = self._open(section)
        suspect = plane in self._suspect
        flushed = {} if (sec is None or suspect) else sec.flushed.get(cycle, {})
        done = {**flushed, **self._pasted.get(plane, {})}
        missing = [(t, v) for t, v in on_disk.items() if (t, v) not in done]
        if not missing and not suspect:
            return 0, []
        errors: list[str] = []

        def header(tid, ver):
            path = self.out_dir / tile_relpath(section, cycle, tid, ver)
            try:
                return read_tile_header(path), path
            except (OSError, ValueError) as e:
                log.error("cannot read %s for the OME-Zarr: %s", path, e)
                errors.append(f"{path.name}: {e}")
                return None

        todo = [hp for hp in (header(t, v) for t, v in sorted(missing)) if hp is not None]
        known = list(done.values())
        later = (todo and not suspect and all(t is not None for t in known)
                 and min(h.get("t_start", 0.0) for h, _ in todo) > max(known, default=float("-inf")))
        if not later:                                   # overlaps must come out as they did: the whole plane
            again = [hp for hp in (header(t, v) for t, v in sorted(set(on_disk.items()) - set(missing)))
                     if hp is not None]
            todo += again
        n = 0
        for h, path in sorted(todo, key=lambda hp: (hp[0].get("t_start", 0.0), int(hp[0]["version"]))):
            try:
                image = tifffile.imread(path)
                self._paste_tile(TileRecord.from_header(h), image, h.get("t_start", 0.0))
                n += 1
            except Exception as e:
                log.error("OME-Zarr: cannot paste %s: %s", path, e)
                errors.append(f"{path.name}: {type(e).__name__}: {e}")
        if n:
            log.warning("OME-Zarr: section %d cycle %d: %d tiles pasted from their OME-TIFFs (%d were missing)",
                        section, cycle, n, len(missing))
        if not errors:
            self._suspect.discard(plane)
        return n, errors

    def _recover_all(self) -> list[WrittenFile]:
        self._needs_catch_up = False
        out, errors = [], []
        for section, cycle in planes_on_disk(self.out_dir):
            n, errs = self._recover(section, cycle)
            errors += errs
            if n:
                out += self._flush_plane(section, cycle)
        if errors:
            self._needs_catch_up = True
            raise RuntimeError(f"OME-Zarr: {len(errors)} tiles not pasted: {'; '.join(errors[:3])}")
        return out
