"""OUTDIR/manifest.jsonl: one line per file any writer made durable.

Append-only. Each line: {"path": relative path, "sha256", "bytes", "kind",
"tile_id", "version", "time"}; a file that a writer deliberately removed
gets a line {"path", "kind", "deleted": true, "time"}. **The LAST line of a
path is current**: verification checks every file against its last line.
Most kinds are write-once (every line for such a path carries the same hash;
a different one means the file was replaced, which must never happen);
``MUTABLE_KINDS`` are derived files that are legitimately rewritten (OME-Zarr
chunk files and metadata, the per-section TrakEM2 index).

A line is appended (O_APPEND, fsynced) only after its file is durable, so a
listed file exists unless lost later; writer threads share one group commit
(one write + one fsync for all lines queued meanwhile). Hashes come from the
bytes in memory; nothing written is read back for them.

After a crash (``Manifest.recover()``, called by make_writers on every start):
  * a torn last line (killed or powered off mid-append) is cut - or completed
    with its newline if it is a whole record - so the next append starts a
    line of its own; complete lines are never lost (append_durably does the
    same for every append-only log before it appends);
  * leftover temporary files (``.*.part``, ``*.partial``) are deleted;
  * files a writer made durable whose line the crash lost are re-recorded,
    hashed from disk (a file under a final name is whole: every writer
    creates it under a temporary name and renames it there). Mutable files
    whose latest line is stale are re-recorded by their writer (OME-Zarr:
    the plane is re-pasted and re-flushed; TrakEM2: the index is checked).
A corrupt line in the middle is left alone and reported by acq.verify.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from common.atomic import O_BINARY, FileExists, atomic_write, ensure_dir, is_temporary, pread, remove_temporaries
from common.crashpoints import point

log = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
MUTABLE_KINDS = frozenset({"zarr", "zarr_meta", "trakem2_index"})
_HASH_BLOCK = 1 << 22

# files of an output folder that are not data (never in the manifest, never 'extra')
BOOKKEEPING_NAMES = {MANIFEST, "plan.json", "fingerprint.json", "fingerprint_changes.jsonl"}
BOOKKEEPING_PREFIXES = ("journal",)                 # journal.jsonl, its snapshot
BOOKKEEPING_PATTERNS = [re.compile(p) for p in (
    r"^zarr/\d+\.tiles\.jsonl$",                    # OmeZarrWriter's log of flushed tiles
    r"^render/push_state\.jsonl$",                  # RenderPushWriter's log
    r"^report/report\.html$",                      # `report`: a derived view, replaced on each call
    r"^volume/",                                   # `volume ...`: derived from the tiles, never overwritten
)]

_KINDS = [(re.compile(p), kind) for p, kind in (
    (r"^tiles/\d+/\d+/(?P<tid>[^/]+)_v(?P<ver>\d+)\.ome\.tif$", "tile"),
    (r"^mipmaps/\d+/(?:.+/)?tiles/\d+/\d+/(?P<tid>[^/]+)_v(?P<ver>\d+)\.ome\.tif\.tif$", "mipmap"),   # ASAP's names
    (r"^render/\d+/\d+/tilespecs(?:\.\d+)?\.json$", "tilespec"),
    (r"^trakem2/\d+_import\.txt$", "trakem2_index"),
    (r"^trakem2/\d+/\d+_import(?:\.\d+)?\.txt$", "trakem2"),
    (r"^trakem2/\d+_origin\.json$", "trakem2"),
    (r"^zarr/\d+\.ome\.zarr/(?:\d+/)?zarr\.json$", "zarr_meta"),
    (r"^zarr/\d+\.ome\.zarr/\d+/c/\d+/\d+/\d+$", "zarr"),
)]


@dataclass(frozen=True)
class WrittenFile:
    path: Path                  # absolute
    kind: str
    tile_id: Optional[str] = None

    # usable wherever a path is (the dispatcher journals str(file))
    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)


# ---------------------------------------------------------------- append-only logs
def _tail_fragment(fd: int, size: int) -> tuple[int, bytes]:
    """(offset, bytes) of what follows the last newline of the open file."""
    pos, tail = size, b""
    while pos > 0:
        n = min(1 << 16, pos)
        pos -= n
        block = pread(fd, n, pos)
        i = block.rfind(b"\n")
        if i >= 0:
            return pos + i + 1, block[i + 1:] + tail
        tail = block + tail
    return 0, tail


def _repair_fd(fd: int, path: Path) -> Optional[str]:
    size = os.fstat(fd).st_size
    if size == 0 or pread(fd, 1, size - 1) == b"\n":
        return None
    start, frag = _tail_fragment(fd, size)
    try:
        whole = isinstance(json.loads(frag), dict)
    except (json.JSONDecodeError, UnicodeDecodeError):
        whole = False
    if whole:                                   # a whole record without its newline: keep it
        point("append", path)
        os.write(fd, b"\n")
        what = f"{path.name}: last line completed with its newline"
    else:
        point("truncate", path)
        os.ftruncate(fd, start)
        what = f"{path.name}: torn last line cut ({size - start} bytes: {frag[:80]!r})"
    point("fsync", path)
    os.fsync(fd)
    log.warning(what)
    return what


def repair_tail(path: Path) -> Optional[str]:
    """Cut a torn last line of an append-only log (or complete it if it is a
    whole record); what was done, or None when the file ends with a newline."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | O_BINARY)
    except FileNotFoundError:
        return None
    try:
        return _repair_fd(fd, path)
    finally:
        os.close(fd)


def append_durably(path: Path, data: bytes) -> None:
    """Append whole lines to a log file and fsync it. A torn last line left by
    a crash is repaired first, so it never swallows the new line."""
    path = Path(path)
    if not path.exists():
        point("create", path)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | O_BINARY, 0o644)
    try:
        _repair_fd(fd, path)
        view = memoryview(data)
        point("append", path)
        while view:
            view = view[os.write(fd, view):]
        point("fsync", path)
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
            n += len(block)
    return h.hexdigest(), n


# ---------------------------------------------------------------- what a file of OUTDIR is
def classify(rel: str) -> Optional[tuple[str, Optional[str], Optional[int]]]:
    """(kind, tile_id, version) of a file the writers make, from its relative
    path; None for anything else."""
    for rx, kind in _KINDS:
        m = rx.match(rel)
        if m:
            d = m.groupdict()
            return kind, d.get("tid"), int(d["ver"]) if d.get("ver") is not None else None
    return None


def is_bookkeeping(rel: str) -> bool:
    """Not data: the journal (and its snapshot), the manifest, plan.json, the
    lock and other hidden files, the writers' own logs."""
    parts = rel.split("/")
    name = parts[-1]
    if any(p.startswith(".") for p in parts):
        return True
    if len(parts) == 1 and (name in BOOKKEEPING_NAMES or name.startswith(BOOKKEEPING_PREFIXES)
                            or name.endswith(".lock") or name == "lock"):
        return True
    return any(rx.match(rel) for rx in BOOKKEEPING_PATTERNS)


def walk_outdir(out_dir: Path) -> Iterator[tuple[str, str]]:
    """(relative path, "data" | "temporary" | "bookkeeping") of everything under
    OUTDIR; a temporary folder is listed itself, not entered."""
    out_dir = Path(out_dir)
    for dirpath, dirs, files in os.walk(out_dir):
        base = Path(dirpath).relative_to(out_dir).as_posix()
        prefix = "" if base == "." else base + "/"
        for d in sorted(dirs):
            if is_temporary(d):
                yield prefix + d + "/", "temporary"
        dirs[:] = sorted(d for d in dirs if not is_temporary(d))
        for f in sorted(files):
            rel = prefix + f
            if is_temporary(f):
                yield rel, "temporary"
            elif is_bookkeeping(rel):
                yield rel, "bookkeeping"
            else:
                yield rel, "data"


# ---------------------------------------------------------------- reading
@dataclass
class ManifestLines:
    entries: list[dict] = field(default_factory=list)
    corrupt: list[tuple[int, str]] = field(default_factory=list)   # (line number, excerpt)
    torn_tail: bool = False                     # the last line has no newline (a crash mid-append)
    lines: int = 0
    last_line: int = 0                          # number of the last non-empty line


def read_lines(out_dir: Path, prefix: Optional[str] = None) -> ManifestLines:
    """Every line of the manifest; ``prefix`` keeps only paths starting so
    (a cheap filter before parsing; corrupt lines are kept)."""
    out = ManifestLines()
    p = Path(out_dir) / MANIFEST
    if not p.exists():
        return out
    data = p.read_bytes()
    out.torn_tail = bool(data) and not data.endswith(b"\n")
    needle = None if prefix is None else ('"path":"%s' % prefix).encode()
    for n, line in enumerate(data.split(b"\n"), 1):
        line = line.strip()
        if not line:
            continue
        out.lines += 1
        out.last_line = n
        if needle is not None and needle not in line and b'"path":' in line and line.startswith(b"{"):
            continue
        try:
            e = json.loads(line)
            if not isinstance(e, dict) or not isinstance(e.get("path"), str):
                raise ValueError("not a manifest entry")
        except (ValueError, UnicodeDecodeError):
            out.corrupt.append((n, line[:200].decode(errors="replace")))
            continue
        if prefix is None or e["path"].startswith(prefix):
            out.entries.append(e)
    return out


def latest_entries(out_dir: Path, prefix: Optional[str] = None) -> dict[str, dict]:
    """path -> its last manifest line (the current one), deletions included."""
    latest: dict[str, dict] = {}
    for e in read_lines(out_dir, prefix).entries:
        latest[e["path"]] = e
    return latest


def read_manifest(out_dir: Path) -> list[dict]:
    p = Path(out_dir) / MANIFEST
    if not p.exists():
        return []
    out = []
    with open(p, "rb") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                # a torn last line after a power cut: Manifest.recover cuts it and re-records the file
                out.append({"path": None, "corrupt_line": line[:200].decode(errors="replace")})
    return out


# ---------------------------------------------------------------- writing
@dataclass
class Recovery:
    """What Manifest.recover() did."""
    tail: Optional[str] = None
    temporaries: list[str] = field(default_factory=list)
    recorded: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.tail or self.temporaries or self.recorded)


class Manifest:
    """Shared by all writers of one output folder (thread-safe)."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / MANIFEST
        self._cv = threading.Condition()
        self._queued: list[bytes] = []
        self._enq = self._done = 0          # lines queued / durable, counted in append() calls
        self._busy = False

    def rel(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.out_dir.resolve()).as_posix()

    @staticmethod
    def entry(rel: str, sha: str, size: int, kind: str, tile_id=None, version=None) -> dict:
        return {"path": rel, "sha256": sha, "bytes": size, "kind": kind,
                "tile_id": tile_id, "version": version, "time": time.time()}

    @staticmethod
    def deletion(rel: str, kind: str) -> dict:
        """The line recording that a writer removed ``rel`` on purpose."""
        return {"path": rel, "kind": kind, "deleted": True, "time": time.time()}

    def entry_from_disk(self, rel: str, kind: Optional[str] = None, tile_id=None, version=None) -> dict:
        """A line for a file already on disk, hashed from there."""
        sha, size = sha256_file(self.out_dir / rel)
        if kind is None:
            kind, tile_id, version = classify(rel) or ("other", None, None)
        return self.entry(rel, sha, size, kind, tile_id, version)

    def latest(self, prefix: Optional[str] = None) -> dict[str, dict]:
        return latest_entries(self.out_dir, prefix)

    def record_if_changed(self, rels: Iterable[str], kind: Optional[str] = None,
                          latest: Optional[dict] = None) -> list[str]:
        """Re-record files whose current hash is not their latest line's (a
        crash between their write and their line); the paths re-recorded."""
        latest = self.latest() if latest is None else latest
        new = []
        for rel in rels:
            if not (self.out_dir / rel).is_file():
                continue
            e = self.entry_from_disk(rel, kind)
            old = latest.get(rel)
            if old is None or old.get("deleted") or old.get("sha256") != e["sha256"] or old.get("bytes") != e["bytes"]:
                new.append(e)
        self.append(new)
        return [e["path"] for e in new]

    def recover(self) -> Recovery:
        """After a crash, before any writer runs: repair the torn tail, delete
        leftover temporaries, re-record durable files whose line was lost."""
        rep = Recovery()
        if not self.out_dir.is_dir():
            return rep
        had_manifest = self.path.exists()
        rep.tail = repair_tail(self.path)
        rep.temporaries = [Path(p).relative_to(self.out_dir).as_posix() for p in remove_temporaries(self.out_dir)]
        latest = self.latest()
        new = []
        for rel, what in walk_outdir(self.out_dir):
            if what != "data":
                continue
            old = latest.get(rel)
            if old is not None and not old.get("deleted"):
                continue
            c = classify(rel)
            if c is None:
                continue                    # not one of ours: acq.verify reports it
            new.append(self.entry_from_disk(rel, *c))
        if new and not had_manifest:
            log.error("%s is missing: %d data files recorded again from disk; their hashes vouch only for "
                      "what is on disk now", self.path, len(new))
        self.append(new)
        rep.recorded = [e["path"] for e in new]
        if rep:
            log.warning("manifest recovery in %s: %s%d temporary files removed, %d files re-recorded",
                        self.out_dir, f"{rep.tail}; " if rep.tail else "", len(rep.temporaries), len(rep.recorded))
        return rep

    def append(self, entries: Iterable[dict]) -> None:
        """Append lines and return once they are fsynced. Group commit: while
        one thread writes and fsyncs, others queue their lines and the next
        leader writes them all with a single fsync (writers run concurrently
        and each fsync costs milliseconds)."""
        lines = "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in entries)
        if not lines:
            return
        with self._cv:
            self._queued.append(lines.encode())
            self._enq += 1
            mine = self._enq
            while self._done < mine:
                if self._busy:
                    self._cv.wait()
                    continue
                self._busy = True
                batch, upto, self._queued = b"".join(self._queued), self._enq, []
                self._cv.release()
                err = None
                try:
                    self._write(batch)
                except BaseException as e:
                    err = e
                self._cv.acquire()
                self._busy = False
                if err is None:
                    self._done = upto
                else:
                    self._queued.insert(0, batch)   # not durable: the next leader retries it
                self._cv.notify_all()
                if err is not None:
                    raise err

    def _write(self, data: bytes) -> None:
        ensure_dir(self.out_dir)
        append_durably(self.path, data)

    def create(self, rel: str, write: Callable[[Path], tuple], kind: str, tile_id=None,
               version=None, batch: Optional[list] = None,
               expected_sha: Optional[Callable[[], str]] = None) -> WrittenFile:
        """Atomically create ``rel`` (temp name, fsync, link: never replacing a
        file); ``write(tmp_path)`` writes the content and returns (sha256 hex
        or a Future of it, size). The manifest line goes to ``batch`` (or is
        appended now). An existing file is accepted when ``expected_sha()``
        equals its hash - the replay of a document after a crash - else
        FileExists."""
        path = self.out_dir / rel
        got: list = []
        try:
            atomic_write(path, lambda tmp: got.extend(write(tmp)))
            sha, size = got
            if hasattr(sha, "result"):      # hashed in the background while atomic_write fsynced
                sha = sha.result()
        except FileExists:
            sha, size = sha256_file(path)
            if expected_sha is None or expected_sha() != sha:
                raise FileExists(f"{rel} exists with other content; a re-acquired tile needs a new version")
        e = self.entry(rel, sha, size, kind, tile_id, version)
        if batch is None:
            self.append([e])
        else:
            batch.append(e)
        return WrittenFile(path, kind, tile_id)

    def write_once(self, rel: str, data: bytes | memoryview, kind: str, tile_id=None, version=None,
                   batch: Optional[list] = None) -> WrittenFile:
        """create() for bytes already in memory: hashed there, nothing read back."""
        sha = hashlib.sha256(data).hexdigest()

        def write(tmp: Path) -> tuple[str, int]:
            with open(tmp, "wb") as f:
                f.write(data)
            return sha, len(data)
        return self.create(rel, write, kind, tile_id, version, batch, expected_sha=lambda: sha)


def verify_manifest(out_dir: Path, *, check_hash: bool = True) -> list[str]:
    """Problems found (empty list = all good): see acq.verify.verify_outdir -
    missing files, size or sha256 mismatches, write-once files recorded with
    two different hashes, data files not in the manifest (all of them when
    manifest.jsonl is gone), unreadable manifest lines."""
    from acq.verify import verify_outdir
    return verify_outdir(out_dir, check_hash=check_hash).problems()
