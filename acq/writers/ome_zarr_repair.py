"""Checking, repairing and recovering the OME-Zarr writer's stores after a crash
(the writer, its layout and its crash-safety rules: acq/writers/ome_zarr.py).

On construction every store is checked and a store this writer cannot use is
discarded and rebuilt; tiles on disk that a store lacks (its tiles log is the
record of what is durable in it) are pasted again from their OME-TIFFs.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import tifffile
import zarr
from zarr.core.sync import sync

from acq.writers.layout import TileRecord, latest_versions, planes_on_disk, read_tile_header, tile_relpath
from acq.writers.manifest import Manifest, WrittenFile
from acq.writers.zarr_store import remove_tree
from common.atomic import fsync_dir, is_temporary
from common.crashpoints import point

log = logging.getLogger("acq.writers.ome_zarr")

LAYOUT = "stage-frame-sharded-1"        # the "acq" attribute naming this writer's layout
_LOG = re.compile(r"^(\d+)\.tiles\.jsonl$")
SHARD_KEY = re.compile(r"^(\d+)/c/(\d+)/(\d+)/(\d+)$")


class _Broken(Exception):
    """A store this writer cannot use as it is (rebuilt from the OME-TIFFs)."""


@dataclass
class _Section:
    group: zarr.Group
    arrays: list                   # zarr.Array per level
    shapes: list                   # per level (z, y, x)
    origin: tuple[int, int]        # stage pixels (x, y) of array pixel (0, 0) at level 0
    pixel_size_m: float
    flushed: dict = field(default_factory=dict)     # cycle -> {(tile_id, version): t_start} durable in the volume


class StoreRepair:
    """OmeZarrWriter's store checks and crash recovery (a mixin: it works on the writer's state)."""

    def _check_stores(self) -> None:
        """On construction: repair or discard what a crash (or an older
        version of this writer) left; see acq/writers/ome_zarr.py's docstring."""
        zdir = self.out_dir / "zarr"
        sections = set()
        if zdir.is_dir():
            for p in sorted(zdir.iterdir()):
                if is_temporary(p.name):
                    if p.is_dir():
                        remove_tree(p)
                    else:
                        point("unlink", p)
                        p.unlink(missing_ok=True)
                    continue
                m = _LOG.match(p.name)
                if m:
                    sections.add(int(m[1]))
            if self.volumes.local:
                for d in zdir.glob("*.ome.zarr"):           # zarr's own leftovers in a store
                    for p in d.rglob("*.partial"):
                        point("unlink", p)
                        p.unlink(missing_ok=True)
        try:
            sections |= self.volumes.sections()
        except OSError as e:
            log.error("OME-Zarr: cannot list %s: %s", self.volumes.url, e)
        latest = self.manifest.latest("zarr/")
        listed: dict[int, dict[str, dict]] = {}
        for rel, e in latest.items():
            m = re.match(r"^zarr/(\d+)\.ome\.zarr/(.*)$", rel)
            if m and not e.get("deleted"):
                listed.setdefault(int(m[1]), {})[m[2]] = e
        sections |= set(listed)
        for section in sorted(sections):
            if not self.volumes.exists(section):
                log_path = self._journal_path(section)
                if log_path.exists():       # it speaks of a store that is gone: the tiles go in again
                    point("unlink", log_path)
                    log_path.unlink()
                if listed.get(section):
                    log.warning("OME-Zarr %s is gone: rebuilt from the OME-TIFFs", self.volumes.location(section))
                    self._needs_catch_up = True
                continue
            try:
                sec = self._load(section)
            except _Broken as e:
                self._discard(section, str(e), latest)
                continue
            self._sections[section] = sec
            if not self.volumes.local:
                continue
            root = self.volumes.path(section)
            for key, e in listed.get(section, {}).items():
                m = SHARD_KEY.match(key)
                if not m:
                    continue
                try:
                    ok = (root / key).stat().st_size == e.get("bytes")
                except OSError:
                    ok = False
                if not ok:
                    log.warning("OME-Zarr shard %s missing or truncated: cycle %s is pasted again", key, m[2])
                    self._suspect.add((section, int(m[2])))
            self.manifest.record_if_changed([f"zarr/{self.volumes.name(section)}/{k}" for k in self._meta_keys()],
                                            self.meta_kind, latest)
        if self._suspect:
            self._needs_catch_up = True

    def _meta_keys(self) -> list[str]:
        return ["zarr.json"] + [f"{l}/zarr.json" for l in range(self.levels)]

    def _load(self, section: int) -> _Section:
        """Open a store, checked; _Broken if this writer cannot use it."""
        try:
            group = zarr.open_group(store=self.volumes.store(section, self._on_write(section)), mode="r+",
                                    zarr_format=3)
        except Exception as e:
            raise _Broken(f"group unreadable ({type(e).__name__}: {e})") from None
        a = group.attrs.get("acq")
        try:
            if a["layout"] != LAYOUT:
                raise _Broken(f"layout {a['layout']!r}, this writer writes {LAYOUT!r}")
            if a.get("moving"):
                raise _Broken("its origin was being moved")
            origin = (int(a["origin_px"][0]), int(a["origin_px"][1]))
            px = float(a["pixel_size_m"])
        except (TypeError, KeyError, IndexError, ValueError):
            raise _Broken("no 'acq' attributes of this layout (its creation was interrupted, or an older "
                          "writer made it)") from None
        ms = (group.attrs.get("ome") or {}).get("multiscales") or [{}]
        if [d.get("path") for d in ms[0].get("datasets", [])] != [str(l) for l in range(self.levels)]:
            raise _Broken(f"no multiscales metadata for {self.levels} levels")
        arrays = []
        for l in range(self.levels):
            try:
                arr = group[str(l)]
                ok = (arr.dtype == np.uint8 and arr.ndim == 3 and arr.shards == (1, self.shard, self.shard)
                      and arr.chunks == (1, self.chunk, self.chunk))
            except Exception as e:
                raise _Broken(f"array {l} unreadable ({type(e).__name__})") from None
            if not ok:
                raise _Broken(f"array {l}: {arr.dtype}, shards {arr.shards}, chunks {arr.chunks}: this writer "
                              f"needs uint8 shards of {self.shard} px in chunks of {self.chunk} px")
            arrays.append(arr)
        sec = _Section(group, arrays, [tuple(a.shape) for a in arrays], origin, px)
        q = self.shard << (self.levels - 1)
        Z = max(s[0] for s in sec.shapes)
        H = -(-max(s[1] << l for l, s in enumerate(sec.shapes)) // q) * q
        W = -(-max(s[2] << l for l, s in enumerate(sec.shapes)) // q) * q
        want = [(Z, H >> l, W >> l) for l in range(self.levels)]
        if want != sec.shapes:
            log.warning("OME-Zarr %s: array shapes %s disagree (a resize cut short): grown to %s",
                        self.volumes.location(section), sec.shapes, want)
            self._set_shapes(sec, want)
        self._load_journal(sec, section)
        return sec

    def _discard(self, section: int, reason: str, latest: Optional[dict] = None) -> None:
        """Remove an unusable store (it is rebuilt from the OME-TIFFs)."""
        log.warning("OME-Zarr %s unusable: %s; rebuilt from the OME-TIFFs", self.volumes.location(section), reason)
        log_path = self._journal_path(section)
        if log_path.exists():           # first: a log without its store never claims a tile is in
            point("unlink", log_path)
            log_path.unlink()
            fsync_dir(log_path.parent)
        prefix = f"zarr/{self.volumes.name(section)}/"
        latest = self.manifest.latest(prefix) if latest is None else latest
        self.manifest.append([Manifest.deletion(rel, e.get("kind", self.file_kind)) for rel, e in sorted(latest.items())
                              if rel.startswith(prefix) and not e.get("deleted")])
        self.volumes.remove(section)
        self._sections.pop(section, None)
        for key in [k for k in self._cache if k[0] == section]:
            del self._cache[key]
        for plane in [p for p in self._pasted if p[0] == section]:
            del self._pasted[plane]
        self._suspect = {p for p in self._suspect if p[0] != section}
        self._needs_catch_up = True

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
        if suspect and sec is not None:
            self._clear_plane(section, cycle)
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

    def _clear_plane(self, section: int, cycle: int) -> None:
        """Drop a suspect plane (shards on disk and in memory) before it is pasted again whole."""
        for key in [k for k in self._cache if k[0] == section and k[2] == cycle]:
            del self._cache[key]
        self._pasted.pop((section, cycle), None)
        store = self.volumes.store(section, self._on_write(section))
        for l in range(self.levels):
            for key in self.volumes.keys(section, f"{l}/c/{cycle}/"):
                sync(store.delete(key))
        self._record()

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
