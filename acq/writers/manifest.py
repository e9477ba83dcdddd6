"""OUTDIR/manifest.jsonl: one line per file any writer made durable.

Each line: {"path": relative path, "sha256", "bytes", "kind", "tile_id",
"version", "time"}. A line is appended (O_APPEND, fsynced) only after its
file is durable, so a listed file exists unless lost later; writer threads
share one group commit (one write + one fsync for all lines queued meanwhile).
Hashes come from the bytes in memory; nothing written is read back for them.

Most kinds are write-once: every line for a path must carry the same hash
(a different one means the file was replaced, which must never happen).
``MUTABLE_KINDS`` are derived files that are legitimately rewritten (OME-Zarr
chunk files, the per-section TrakEM2 index): for them the LAST line wins.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from acq.atomic import FileExists, atomic_write

MANIFEST = "manifest.jsonl"
MUTABLE_KINDS = frozenset({"zarr", "trakem2_index"})
_HASH_BLOCK = 1 << 22


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


def append_durably(path: Path, data: bytes) -> None:
    """Append to a log file and fsync it (O_APPEND: whole lines, never torn by another writer)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
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
        self.out_dir.mkdir(parents=True, exist_ok=True)
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
                # a torn last line after a power cut: the file it named is re-recorded on replay
                out.append({"path": None, "corrupt_line": line[:200].decode(errors="replace")})
    return out


def verify_manifest(out_dir: Path, *, check_hash: bool = True) -> list[str]:
    """Problems found (empty list = all good): missing files, size or sha256
    mismatches, write-once files recorded with two different hashes."""
    out_dir = Path(out_dir)
    problems: list[str] = []
    latest: dict[str, dict] = {}
    for e in read_manifest(out_dir):
        rel = e.get("path")
        if rel is None:
            problems.append(f"unreadable manifest line: {e.get('corrupt_line')!r}")
            continue
        prev = latest.get(rel)
        if prev is not None and e["kind"] not in MUTABLE_KINDS and prev["sha256"] != e["sha256"]:
            problems.append(f"{rel}: recorded twice with different content (overwritten?)")
        latest[rel] = e
    for rel, e in latest.items():
        p = out_dir / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
            continue
        size = p.stat().st_size
        if size != e["bytes"]:
            problems.append(f"{rel}: {size} bytes, manifest says {e['bytes']}")
            continue
        if check_hash:
            sha, _ = sha256_file(p)
            if sha != e["sha256"]:
                problems.append(f"{rel}: sha256 mismatch")
    return problems
