"""Append-only JSONL journal of finished events (OUTDIR/journal.jsonl).

One JSON object per line, fsync'd before ``append`` returns, so what the
journal says is done survives a crash or a kill -9. Records (``rec``):

  run_start       {run_uid, resumed, plan_source}
  tile_started    {key, version, cycle}            before the frame is grabbed (one exposure)
  exposure        {key, n, why}                    more scans of the tile (retries, refocus)
  exposure_granted {key}                           the operator allowed one more exposure
  tile_done       {key, version, cycle, files, qc} after every writer acknowledged it
  autofocus_done  {key, cycle, wd_m, stig, ...}
  irr_progress    {key, charge_c, seconds}         during irradiation (resume continues from here)
  irr_done        {key, section, dose_1e27_ev_cm3, charge_c, seconds, reached}
  mill_started    {key, cycle}                     before anything of the mill happens
  mill_beam_on    {key, done_s}                    before the ion beam is unblanked
  mill_beam_off   {key, done_s}                    after it is blanked again (time milled known)
  mill_done       {key, cycle, seconds, interrupted, accepted}
  section_done    {key, cycle, section}
  exhausted       {section, cycle}
  cycle_done      {key, cycle}
  incident        {severity, cause, message}   (not used by resume)
  run_stop        {status, reason}
  journal_repaired {dropped: [{line, head}], backup}   written by ``repair_journal``

Every record also has ``t`` (wall time, ms) and, last, ``crc``: the CRC-32
(8 hex digits) of the line's own bytes with the crc field left out, so a
line ends with ``,"crc":"xxxxxxxx"}`` and is checked without parsing it.
Lines are compact JSON (``jq``/``grep`` work). ``files`` under OUTDIR are
stored relative to it (``read_records`` gives them back joined to OUTDIR).

Damage. The last line of the file, if damaged or without its newline, is a
write torn by a kill: it was never acknowledged, so it is dropped and cut off
before the next append. A damaged line anywhere else (or garbage followed by
valid records) is never replayed: reading raises ``JournalCorrupt`` naming the
lines and the repair command (acq/journal_repair.py: backup, rewrite without
them, report what they could have been). A journal written before checksums
(no line has a crc) still reads; once a line has one, a line without is damage.

Scale. The state keeps per-tile entries only for cycles not yet done (a
``cycle_done`` drops its cycle's tiles, autofocus, section and mill entries;
``tiles_done_total`` keeps counting). Every ``snapshot_every`` records and at
close the state is written atomically to OUTDIR/journal.snapshot.json with the
journal offset it covers and the length and CRC-32 of the first line and of
the line ending at that offset; opening loads a matching snapshot and reads
only the journal after it (a snapshot that does not match is ignored, with a
warning, and the whole journal is read). So damage inside the part a snapshot
covers is not seen by a resume (its state comes from the snapshot); every full
read sees it (``read_records``, ``read(use_snapshot=False)``, the repair).

Appends loop over short writes; a write or fsync that fails cuts the file back
to its length before the append (ftruncate) and raises, the state unchanged;
if even that fails the journal refuses further records (``JournalBroken``).
Every filesystem operation calls ``common.crashpoints.point`` first.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from acq.journal_state import JournalState, apply
from common import crashpoints
from common.atomic import O_BINARY, fsync_dir
from devices.setup_config import ConfigError

log = logging.getLogger(__name__)

JOURNAL_NAME = "journal.jsonl"
SNAPSHOT_NAME = "journal.snapshot.json"
SNAPSHOT_FORMAT = 1
SNAPSHOT_EVERY = 20000                  # records between snapshots (and one at close)
REPAIR_COMMAND = "python main.py journal repair {out}"
HEAD_BYTES = 200                        # of a dropped line, kept in the repair record and report
LISTED = 100                            # dropped lines listed in the repair record and report

_CRC_TAG = b',"crc":"'                  # a checksummed line ends with _CRC_TAG + 8 hex + '"}'
_SUFFIX = len(_CRC_TAG) + 8 + 2
_CHUNK = 1 << 22
_REQUIRED = {"tile_started": ("key", "version"), "tile_done": ("key", "version"), "cycle_done": ("key", "cycle"),
             "exhausted": ("section",), "mill_beam_on": ("key",), "mill_beam_off": ("key",),
             "mill_started": ("key",), "autofocus_done": ("key",), "exposure": ("key",)}


class JournalCorrupt(ConfigError):
    """Damaged lines inside the journal (not a torn last line): never replayed."""

    def __init__(self, path: str | Path, lines: list[int], detail: str = ""):
        self.path = Path(path)
        self.lines = list(lines)
        shown = ", ".join(str(n) for n in self.lines[:20])
        if len(self.lines) > 20:
            shown += f" and {len(self.lines) - 20} more"
        what = "line" if len(self.lines) == 1 else "lines"
        super().__init__(
            f"{self.path}: corrupt journal: {what} {shown} unreadable (checksum mismatch, not a record, or a record of the wrong shape) "
            f"with records after {'it' if len(self.lines) == 1 else 'them'}{detail}; the journal is not replayed. "
            f"Repair it with `{REPAIR_COMMAND.format(out=self.path.parent)}` (keeps a backup, drops the "
            f"unreadable lines and reports what they could have been), then resume.")


class JournalBroken(OSError):
    """A failed append could not be undone: the journal takes no more records."""


# ------------------------------------------------------------------ lines
def encode_record(entry: dict) -> bytes:
    """The journal line of ``entry``: compact JSON ending ``,"crc":"xxxxxxxx"}`` + newline."""
    body = json.dumps(entry, separators=(",", ":"), default=_jsonable).encode()
    return body[:-1] + b',"crc":"%08x"}\n' % zlib.crc32(body)


_INT_FIELDS = ("version", "cycle", "section")


def _shape_ok(rec: dict) -> bool:
    """A record resume can fold: its kind's fields present, keys text, counters whole numbers."""
    kind = rec.get("rec")
    if not isinstance(kind, str):
        return False
    for f in _REQUIRED.get(kind, ()):
        if rec.get(f) is None:
            return False
    if "key" in rec and not isinstance(rec["key"], str):
        return False
    return all(type(rec[f]) is int for f in _INT_FIELDS if f in rec and f in _REQUIRED.get(kind, ()))


def _parse(raw: bytes, crc_mode: bool, check_shape: bool = True) -> tuple[Optional[dict], bool]:
    """(record or None if damaged, whether the line carries a crc). ``raw``
    without its newline. Without a crc a line is accepted only before the
    first checksummed line (a journal written before checksums)."""
    if raw[-_SUFFIX:-10] == _CRC_TAG and raw[-2:] == b'"}':
        if b"%08x" % zlib.crc32(b"}", zlib.crc32(memoryview(raw)[:-_SUFFIX])) != raw[-10:-2]:
            return None, True
        try:
            rec = json.loads(raw)
        except ValueError:
            return None, True
        if type(rec) is not dict or rec.pop("crc", None) is None or (check_shape and not _shape_ok(rec)):
            return None, True
        return rec, True
    if crc_mode:
        return None, False
    try:
        rec = json.loads(raw)
    except ValueError:
        return None, False
    if type(rec) is not dict or "rec" not in rec or "crc" in rec or not _shape_ok(rec):
        return None, False
    return rec, False


def _embedded(raw: bytes) -> Optional[int]:
    """Where a complete checksummed record starts inside a damaged line (garbage
    glued in front of a valid record), or None."""
    i = raw.rfind(b'{"rec":')
    if i > 0 and _parse(raw[i:], True)[0] is not None:
        return i
    return None


def _lines(f, offset: int, counter: Optional[list] = None) -> Iterator[tuple[int, bytes, bool]]:
    """(start offset, line without its newline, whether it had one) from ``offset`` on."""
    f.seek(offset)
    pos, rest = offset, b""
    while True:
        chunk = f.read(_CHUNK)
        if not chunk:
            break
        if counter is not None:
            counter[0] += len(chunk)
        parts = (rest + chunk if rest else chunk).split(b"\n")
        rest = parts.pop()
        for p in parts:
            yield pos, p, True
            pos += len(p) + 1
    if rest:
        yield pos, rest, False


@dataclass
class _Bad:
    line: int                  # 1-based
    offset: int
    raw: bytes
    eol: bool

    @property
    def head(self) -> bytes:
        return self.raw[:HEAD_BYTES]


@dataclass
class _Pos:
    """Where a read stands: the journal up to ``end`` is intact and applied."""
    end: int = 0
    lines: int = 0                                  # newline-terminated lines before end
    crc_mode: bool = False
    last: Optional[tuple[int, int]] = None          # (length, crc32) of the line ending at end, newline included
    head: Optional[tuple[int, int]] = None          # same for line 1
    torn: Optional[_Bad] = None
    records: int = 0                                # records read by this read
    bytes_read: list = field(default_factory=lambda: [0])


def _line_id(raw: bytes) -> tuple[int, int]:
    return len(raw) + 1, zlib.crc32(b"\n", zlib.crc32(raw))


def _strict(f, path: Path, pos: _Pos) -> Iterator[dict]:
    """The intact records after ``pos.end``, updating ``pos``. A damaged last
    line is the torn tail (``pos.torn``; not yielded, ``pos.end`` before it);
    a damaged line with anything after it raises JournalCorrupt (after the
    scan to the end, so every damaged line is named). Nothing after the first
    damaged line is yielded."""
    bad: list[_Bad] = []
    corrupt = False
    crc_mode = pos.crc_mode
    lineno = pos.lines
    last_raw = head_raw = None
    for start, raw, eol in _lines(f, pos.end, pos.bytes_read):
        lineno += 1
        blank = raw[:1] != b"{" and not raw.strip()
        if bad:
            if not blank:
                corrupt = True
                if not eol or _parse(raw, crc_mode)[0] is None:
                    bad.append(_Bad(lineno, start, raw, eol))
            continue
        if not eol:                                   # never finished, so never acknowledged
            bad.append(_Bad(lineno, start, raw, eol))
            continue
        if blank:
            pos.end, pos.lines, last_raw = start + len(raw) + 1, lineno, raw
            continue
        rec, has_crc = _parse(raw, crc_mode)
        if rec is None:
            bad.append(_Bad(lineno, start, raw, eol))
            if _embedded(raw) is not None:           # garbage followed by a valid record: not a torn write
                corrupt = True
            continue
        if has_crc:
            crc_mode = True
        if lineno == 1:
            head_raw = raw
        last_raw = raw
        pos.end, pos.lines = start + len(raw) + 1, lineno
        pos.records += 1
        yield rec
    pos.crc_mode = crc_mode
    if last_raw is not None:
        pos.last = _line_id(last_raw)
    if head_raw is not None:
        pos.head = _line_id(head_raw)
    if corrupt:
        raise JournalCorrupt(path, [b.line for b in bad])
    if bad:
        pos.torn = bad[0]


# ------------------------------------------------------------------ journal
@dataclass
class ReadInfo:
    """How the last ``open``/``read`` got its state (for tests, benchmarks, logs)."""
    snapshot: bool = False                  # a snapshot was used
    snapshot_ignored: Optional[str] = None  # why a snapshot there was not used
    start_offset: int = 0                   # journal bytes skipped thanks to the snapshot
    tail_bytes: int = 0                     # journal bytes read
    tail_records: int = 0
    torn_line: Optional[int] = None         # a torn last line dropped (its number)
    seconds: float = 0.0


class Journal:
    """OUTDIR's journal. ``snapshot_every``: records between snapshots;
    ``durable=False`` skips the fsyncs (benchmarks and tests only)."""

    def __init__(self, out_dir: str | Path, *, snapshot_every: int = SNAPSHOT_EVERY, durable: bool = True):
        self.dir = Path(out_dir)
        self.path = self.dir / JOURNAL_NAME
        self.snapshot_path = self.dir / SNAPSHOT_NAME
        self.snapshot_every = max(1, int(snapshot_every))
        self.durable = durable
        self._lock = threading.Lock()
        self._fd: Optional[int] = None
        self._broken: Optional[str] = None
        self._pos = _Pos()
        self._since_snapshot = 0
        self.state = JournalState()        # kept up to date by append()
        self.last_read = ReadInfo()
        prefixes = {str(self.dir), os.path.abspath(self.dir), str(self.dir.resolve())}
        self._prefixes = sorted((p.rstrip(os.sep) + os.sep for p in prefixes if p not in ("", ".")),
                                key=len, reverse=True)

    # ------------------------------------------------------------ reading
    def read(self, *, use_snapshot: bool = True) -> JournalState:
        """The state the journal holds (a torn last line left out; nothing is
        written). Raises JournalCorrupt on damage inside it."""
        if not self.path.exists():
            return JournalState()
        st, _ = self._load(use_snapshot)
        return st

    def _load(self, use_snapshot: bool) -> tuple[JournalState, _Pos]:
        t0 = time.perf_counter()
        info = ReadInfo()
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            snap = self._load_snapshot(f, size, info) if use_snapshot else None
            st, pos = snap if snap is not None else (JournalState(), _Pos())
            info.snapshot, info.start_offset = snap is not None, pos.end
            for rec in _strict(f, self.path, pos):
                apply(st, rec)
        info.tail_bytes, info.tail_records = pos.bytes_read[0], pos.records
        info.torn_line = pos.torn.line if pos.torn is not None else None
        info.seconds = time.perf_counter() - t0
        self.last_read = info
        return st, pos

    def _load_snapshot(self, f, size: int, info: ReadInfo) -> Optional[tuple[JournalState, _Pos]]:
        try:
            data = self.snapshot_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            return self._ignore(info, f"unreadable ({e})")
        rec, has_crc = _parse(data.rstrip(b"\n"), True, check_shape=False)
        if rec is None or rec.get("format") != SNAPSHOT_FORMAT or rec.get("journal") != JOURNAL_NAME:
            return self._ignore(info, "damaged or of another format")
        try:
            offset, lines = int(rec["offset"]), int(rec["lines"])
            last = int(rec["last_len"]), int(rec["last_crc"], 16)
            head = int(rec["head_len"]), int(rec["head_crc"], 16)
            if not (0 < last[0] <= offset <= size and 0 < head[0] <= offset):
                return self._ignore(info, f"covers {offset} bytes, the journal has {size}")
            for length, crc, at in ((last[0], last[1], offset - last[0]), (head[0], head[1], 0)):
                f.seek(at)
                b = f.read(length)
                if not b.endswith(b"\n") or zlib.crc32(b) != crc:
                    return self._ignore(info, "does not match the journal (replaced or rewritten?)")
            st = JournalState.from_json(rec["state"])
            crc_mode = bool(rec["crc_mode"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            return self._ignore(info, f"unusable ({e!r})")
        return st, _Pos(end=offset, lines=lines, crc_mode=crc_mode, last=last, head=head)

    def _ignore(self, info: ReadInfo, why: str) -> None:
        info.snapshot_ignored = why
        log.warning("%s: %s; reading the whole journal", self.snapshot_path, why)
        return None

    # ------------------------------------------------------------ writing
    def open(self) -> JournalState:
        """Open for appending (a torn last line is cut off first); returns
        (and keeps) the state read so far. Raises JournalCorrupt on damage."""
        with self._lock:
            self._close_fd()
            self.dir.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
            if created:
                st, pos = JournalState(), _Pos()
                self.last_read = ReadInfo()
            else:
                st, pos = self._load(use_snapshot=True)
                if pos.torn is not None:
                    log.warning("%s: line %d torn by a kill mid-write; dropped", self.path, pos.torn.line)
                    self._cut(pos.end)
            if created:
                crashpoints.point("create", self.path)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | O_BINARY | getattr(os, "O_CLOEXEC", 0),
                               0o666)
            if created and self.durable:
                fsync_dir(self.dir)
            pos.end = os.fstat(self._fd).st_size
            pos.torn, self._pos, self._broken = None, pos, None
            self.state = st
            self._since_snapshot = self.last_read.tail_records
            if self._since_snapshot >= self.snapshot_every:
                self._try_snapshot()
            return st

    def _cut(self, end: int) -> None:
        with open(self.path, "rb+") as f:
            crashpoints.point("truncate", self.path)
            f.truncate(end)
            crashpoints.point("fsync", self.path)
            os.fsync(f.fileno())

    def append(self, rec: str, **fields) -> dict:
        """Write one record durably, then fold it into ``state``; returns the
        record as journaled. An OSError (disk full, I/O error) leaves the file
        and the state as they were and is raised."""
        if "crc" in fields:
            raise ValueError("'crc' is the journal's own field")
        missing = [f for f in _REQUIRED.get(rec, ()) if fields.get(f) is None]
        if missing:                     # a record resume cannot fold would block every later resume
            raise ValueError(f"journal record {rec} needs {', '.join(missing)}")
        if isinstance(fields.get("files"), (list, tuple)):
            fields["files"] = [self._rel(p) for p in fields["files"]]
        line = encode_record({"rec": rec, "t": round(time.time(), 3), **fields})
        entry = json.loads(line)
        del entry["crc"]
        with self._lock:
            if self._fd is None:
                raise RuntimeError("journal is not open")
            if self._broken is not None:
                raise JournalBroken(errno.EIO, self._broken)
            before = self._pos.end
            try:
                crashpoints.point("write", self.path)
                _write_all(self._fd, line)
                if self.durable:
                    crashpoints.point("fsync", self.path)
                    os.fsync(self._fd)
            except BaseException as e:
                self._undo(before, e)
                raise
            p = self._pos
            p.end, p.lines, p.crc_mode = before + len(line), p.lines + 1, True
            p.last = (len(line), zlib.crc32(line))
            if before == 0:
                p.head = p.last
            apply(self.state, entry)
            self._since_snapshot += 1
            if self._since_snapshot >= self.snapshot_every:
                self._try_snapshot()
        return entry

    def _undo(self, before: int, err: BaseException) -> None:
        """A write or fsync failed part-way: cut the file back to ``before``."""
        try:
            crashpoints.point("truncate", self.path)
            os.ftruncate(self._fd, before)
            if self.durable:
                crashpoints.point("fsync", self.path)
                os.fsync(self._fd)
        except OSError as e:
            self._broken = (f"{self.path}: appending failed ({err}) and cutting the partial record off failed "
                            f"({e}); the journal takes no more records (resume cuts the torn line)")
            log.error(self._broken)

    def _rel(self, p) -> str:
        """A file under OUTDIR relative to it; other absolute paths as they are;
        a relative path is taken as already relative to OUTDIR."""
        s = os.fspath(p) if isinstance(p, (str, os.PathLike)) else str(p)
        for pre in self._prefixes:
            if s.startswith(pre):
                return s[len(pre):].replace(os.sep, "/")    # as the manifest names files, on Windows too
        return s

    def write_snapshot(self) -> bool:
        """Write the snapshot now (it is also written every ``snapshot_every`` records and at close)."""
        with self._lock:
            return self._try_snapshot()

    def _try_snapshot(self) -> bool:
        try:
            self._write_snapshot()
            return True
        except OSError as e:            # the records are safe in the journal: only the next resume is slower
            log.warning("%s: writing the snapshot failed (%s); the next resume reads more of the journal",
                        self.snapshot_path, e)
            return False

    def _write_snapshot(self) -> None:
        p = self._pos
        if self._fd is None or self._broken is not None or p.end == 0 or p.last is None or p.head is None:
            return
        data = encode_record({"format": SNAPSHOT_FORMAT, "journal": JOURNAL_NAME, "offset": p.end,
                              "lines": p.lines, "last_len": p.last[0], "last_crc": f"{p.last[1]:08x}",
                              "head_len": p.head[0], "head_crc": f"{p.head[1]:08x}", "crc_mode": p.crc_mode,
                              "t": round(time.time(), 3), "state": self.state.to_json()})
        snap, tmp = self.snapshot_path, self.dir / f".{SNAPSHOT_NAME}.part"
        crashpoints.point("create", snap)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | O_BINARY | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            try:
                crashpoints.point("write", snap)
                _write_all(fd, data)
                if self.durable:
                    crashpoints.point("fsync", snap)
                    os.fsync(fd)
            finally:
                os.close(fd)
            crashpoints.point("rename", snap)
            os.replace(tmp, snap)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        if self.durable:
            fsync_dir(self.dir)
        self._since_snapshot = 0

    def _close_fd(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            finally:
                self._fd = None

    def close(self) -> None:
        with self._lock:
            if self._fd is None:
                return
            try:
                if self._since_snapshot:
                    self._try_snapshot()
            finally:
                self._close_fd()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.EIO, "write wrote nothing")
        view = view[n:]


def read_records(out_dir: str | Path, *, absolute_files: bool = True) -> Iterator[dict]:
    """Every intact record of OUTDIR's journal, in order, streamed, checksums
    verified (a torn last line left out; damage inside raises JournalCorrupt
    when reached). ``files`` relative to OUTDIR come back joined to it."""
    path = Path(out_dir) / JOURNAL_NAME
    if not path.exists():
        return
    base = os.fspath(out_dir)
    with open(path, "rb") as f:
        for rec in _strict(f, path, _Pos()):
            files = rec.get("files")
            if absolute_files and type(files) is list:
                rec["files"] = [os.path.join(base, x) if isinstance(x, str) and not os.path.isabs(x) else x
                                for x in files]
            yield rec


def load_state(out_dir: str | Path) -> Optional[JournalState]:
    j = Journal(out_dir)
    return j.read() if j.path.exists() else None


def _jsonable(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    return str(o)
