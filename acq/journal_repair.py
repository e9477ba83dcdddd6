"""`journal repair OUTDIR`: drop unreadable journal lines, keeping a backup.

The damaged journal is kept as ``journal.jsonl.corrupt-<time>``; the new one
is written through a temporary file, fsync and rename, and ends with a
``journal_repaired`` record naming the dropped lines. The report says where
each dropped line sat and what it probably was, so the operator knows what
resume will redo. Refused while a run holds the folder (acq/outdir_lock.py).
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, TextIO

from common import crashpoints
from common.atomic import O_BINARY, fsync_dir
from acq.journal import (_CHUNK, HEAD_BYTES, JOURNAL_NAME, LISTED, REPAIR_COMMAND, SNAPSHOT_NAME, _embedded,
                         _lines, _parse, _write_all, encode_record)
from acq.journal_state import _cycle_of
from devices.setup_config import ConfigError

_CONSEQUENCE = {
    "tile_started": "harmless if the tile's tile_done is there; otherwise the tile is acquired again and the "
                    "writers refuse to overwrite a file of the same version (check for FileExists incidents)",
    "tile_done": "the tile is acquired again (as a new version) on resume",
    "autofocus_done": "the autofocus is run again",
    "section_done": "the end of the section (exhaustion check, section files) is run again",
    "exhausted": "the section is imaged again until it is found exhausted again",
    "mill_started": "the mill record is incomplete: check the ion-beam time reported on resume",
    "mill_beam_on": "the mill record is incomplete: the beam time of this stretch may be missing; check the sections",
    "mill_beam_off": "the time milled may be undercounted (the mill looks interrupted, or is continued)",
    "mill_done": "the mill is continued from the last recorded time (or reported as interrupted)",
    "cycle_done": "the cycle's events are checked again (finished ones are skipped)",
    "irr_progress": "the irradiation continues from the previous recorded charge (slight overdose)",
    "irr_done": "the irradiation of the section is continued from its last recorded progress",
    "exposure": "the tile's exposure count is lower than the truth (the budget may allow one scan more)",
    "exposure_granted": "the extra exposure the operator granted must be granted again",
    "run_start": "none on resume", "run_stop": "none on resume", "incident": "none on resume",
    "journal_repaired": "none on resume",
}


def _summary(rec: dict) -> dict:
    return {"rec": rec.get("rec"), "key": rec.get("key"), "cycle": _cycle_of(rec, rec.get("key"))}


def _desc(s: dict) -> str:
    return f"{s['rec']}" + (f" ({s['key']})" if s.get("key") else "")


@dataclass
class DroppedLine:
    line: int                          # 1-based, in the backup
    offset: int
    length: int
    head: bytes                        # first HEAD_BYTES bytes
    torn: bool = False                 # the unfinished last line of a kill mid-write
    salvaged: Optional[str] = None     # a valid record found glued behind garbage: kept
    prev: Optional[dict] = None        # the intact records around it: {rec, key, cycle}
    next: Optional[dict] = None

    def guess(self) -> tuple[Optional[str], Optional[str]]:
        """(record kind, key) the line could have been, from its bytes or its neighbours."""
        m = re.search(rb'"rec":\s*"([a-z_]+)"', self.head)
        k = re.search(rb'"key":\s*"([^"]+)"', self.head)
        if m:
            return m.group(1).decode(), k.group(1).decode() if k else None
        p, n = self.prev or {}, self.next or {}
        pk, nk = p.get("rec"), n.get("rec")
        if pk == "tile_started" and not (nk == "tile_done" and n.get("key") == p.get("key")):
            return "tile_done", p.get("key")
        if nk == "tile_done" and not (pk == "tile_started" and p.get("key") == n.get("key")):
            return "tile_started", n.get("key")
        if pk == "mill_beam_on" and not (nk == "mill_beam_off" and n.get("key") == p.get("key")):
            return "mill_beam_off", p.get("key")
        if pk in ("mill_started", "mill_beam_off") and nk == "mill_beam_off" and n.get("key") == p.get("key"):
            return "mill_beam_on", p.get("key")
        if pk == "mill_beam_off" and nk == "cycle_done":
            return "mill_done", p.get("key")
        return None, None

    def context(self) -> str:
        p, n = self.prev, self.next
        if p is None and n is None:
            return "the only line"
        if p is None:
            return f"at the start, before {_desc(n)}"
        if n is None:
            return f"at the end, after {_desc(p)}" + (f" of cycle {p['cycle']}" if p.get("cycle") is not None else "")
        if p.get("cycle") is not None and p.get("cycle") == n.get("cycle"):
            return f"between {_desc(p)} and {_desc(n)} of cycle {p['cycle']}"
        cyc = lambda s: f" (cycle {s['cycle']})" if s.get("cycle") is not None else ""      # noqa: E731
        return f"between {_desc(p)}{cyc(p)} and {_desc(n)}{cyc(n)}"

    def describe(self) -> str:
        kind, key = self.guess()
        what = f"line {self.line}" + (", the unfinished last line (killed mid-write)" if self.torn else "")
        s = f"{what}, {self.context()}"
        if self.salvaged:
            s += f"; a valid {self.salvaged} record glued behind the damage was kept"
        if kind is not None:
            s += f"; it looks like {'a' if kind[0] not in 'aeiou' else 'an'} {kind}" + (f" of {key}" if key else "")
            n = self.next or {}
            closed = key is not None and n.get("key") == key and (
                (kind.startswith("mill_") and n.get("rec") == "mill_done")
                or (kind == "tile_started" and n.get("rec") == "tile_done"))
            effect = (f"none, the {n.get('rec')} after it closes {key}" if closed
                      else _CONSEQUENCE.get(kind, "unknown record kind"))
            s += f": effect on resume: {effect}"
        else:
            s += "; it could have been any record: whatever it recorded as done is done again on resume"
        mill = [x for x in (self.prev, self.next) if x and str(x.get("rec", "")).startswith("mill_")]
        if mill and (kind is None or not kind.startswith("mill_")):
            s += f"; it lies inside the mill of cycle {mill[0]['cycle']}: check the ion-beam time reported on resume"
        return s + f"\n      first bytes: {self.head!r}"


@dataclass
class RepairReport:
    path: Path
    dropped: list[DroppedLine] = field(default_factory=list)
    kept: int = 0                       # records kept
    backup: Optional[Path] = None
    repaired: bool = False              # the journal was rewritten
    snapshot_removed: bool = False
    dry_run: bool = False

    def text(self) -> str:
        if not self.dropped:
            return f"{self.path}: intact ({self.kept} records); nothing to repair"
        verb = "would drop" if self.dry_run else "dropped"
        out = [f"{self.path}: {verb} {len(self.dropped)} unreadable line(s), kept {self.kept} records"]
        for d in self.dropped[:LISTED]:
            out.append("  - " + d.describe())
        if len(self.dropped) > LISTED:
            out.append(f"  ... and {len(self.dropped) - LISTED} more (all in the backup)")
        if self.backup is not None:
            out.append(f"the damaged journal is kept as {self.backup}")
        if self.snapshot_removed:
            out.append(f"the snapshot {SNAPSHOT_NAME} covered a dropped line and was removed "
                       "(the next resume reads the whole journal once)")
        if self.repaired:
            out.append(f"resume with --resume {self.path.parent}")
        elif self.dry_run:
            out.append(f"repair with `{REPAIR_COMMAND.format(out=self.path.parent)}`")
        return "\n".join(out)


def _backup_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")


def _make_backup(path: Path) -> Path:
    """A hard link to the damaged journal (never overwriting; copied where links fail)."""
    base = _backup_name(path)
    for i in range(1000):
        b = base if i == 0 else base.with_name(f"{base.name}-{i}")
        try:
            crashpoints.point("create", b)
            os.link(path, b)
            return b
        except FileExistsError:
            continue
        except OSError:
            try:
                fd = os.open(b, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_BINARY, 0o666)
            except FileExistsError:
                continue
            try:
                with open(path, "rb") as src:
                    while chunk := src.read(_CHUNK):
                        crashpoints.point("write", b)
                        _write_all(fd, chunk)
                crashpoints.point("fsync", b)
                os.fsync(fd)
            finally:
                os.close(fd)
            return b
    raise FileExistsError(f"{base}: too many backups")


def repair_journal(out_dir: str | Path, *, dry_run: bool = False) -> RepairReport:
    """Rewrite OUTDIR's journal without its unreadable lines. The damaged file
    is kept as journal.jsonl.corrupt-<time>; the new one is written to a
    temporary file, fsync'd and renamed into place, and ends with a
    ``journal_repaired`` record naming the dropped lines. Only while no run
    uses the folder. ``dry_run``: only report."""
    out_dir = Path(out_dir)
    path = out_dir / JOURNAL_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path}: no journal there")
    rep = RepairReport(path, dry_run=dry_run)
    if dry_run:
        return _repair(out_dir, path, rep)
    from acq.outdir_lock import OutdirLock       # refuses while a run uses the folder
    lock = OutdirLock(out_dir).acquire()
    try:
        return _repair(out_dir, path, rep)
    finally:
        lock.release()


def _repair(out_dir: Path, path: Path, rep: RepairReport) -> RepairReport:
    dry_run = rep.dry_run
    tmp = out_dir / f".{JOURNAL_NAME}.repair.part"
    w = None
    if not dry_run:
        crashpoints.point("create", path)
        w = open(tmp, "wb")
        crashpoints.point("write", path)
    waiting: list[DroppedLine] = []
    prev: Optional[dict] = None
    crc_mode = False
    lineno = 0
    last_line = 0                       # number of the last non-blank line
    try:
        with open(path, "rb") as f:
            for start, raw, eol in _lines(f, 0):
                lineno += 1
                if eol and not raw.strip():
                    continue
                last_line = lineno
                rec, has_crc = _parse(raw, crc_mode) if eol else (None, False)
                keep = raw
                if rec is None:
                    d = DroppedLine(lineno, start, len(raw) + eol, raw[:HEAD_BYTES], torn=not eol, prev=prev)
                    waiting.append(d)
                    rep.dropped.append(d)
                    i = _embedded(raw) if eol else None
                    if i is None:
                        continue
                    keep, d.head = raw[i:], raw[:i][:HEAD_BYTES]
                    rec, has_crc = _parse(keep, True)
                    d.salvaged = rec.get("rec")
                crc_mode = crc_mode or has_crc
                s = _summary(rec)
                for d in waiting:
                    d.next = s
                waiting = []
                prev = s
                rep.kept += 1
                if w is not None:
                    w.write(keep + b"\n")
        if rep.dropped and rep.dropped[-1].line == last_line and rep.dropped[-1].salvaged is None:
            rep.dropped[-1].torn = True             # the last line: a write torn by a kill
        if not rep.dropped or dry_run:
            return rep
        snap = out_dir / SNAPSHOT_NAME
        if snap.exists():
            try:
                covers = int(json.loads(snap.read_bytes())["offset"]) > rep.dropped[0].offset
            except (ValueError, KeyError, TypeError, OSError):
                covers = True
            if covers:
                os.unlink(snap)
                rep.snapshot_removed = True
        rep.backup = _make_backup(path)
        fsync_dir(out_dir)
        w.write(encode_record({"rec": "journal_repaired", "t": round(time.time(), 3), "lines": len(rep.dropped),
                               "dropped": [{"line": d.line, "head": d.head.decode("utf-8", "replace")}
                                           for d in rep.dropped[:LISTED]], "backup": rep.backup.name}))
        w.flush()
        crashpoints.point("fsync", path)
        os.fsync(w.fileno())
        w.close()
        w = None
        crashpoints.point("rename", path)
        os.replace(tmp, path)
        fsync_dir(out_dir)
        rep.repaired = True
        return rep
    finally:
        if w is not None:
            w.close()
        if tmp.exists():
            tmp.unlink()


def repair_main(out_dir: str | Path, stream: Optional[TextIO] = None, *, dry_run: bool = False) -> int:
    """``journal repair OUTDIR``: repair and print the report; the exit code
    (0 repaired or intact, 2 no journal, 1 the repair failed)."""
    stream = stream or sys.stdout
    try:
        rep = repair_journal(out_dir, dry_run=dry_run)
    except (FileNotFoundError, ConfigError) as e:          # no journal; a run uses the folder
        stream.write(f"error: {e}\n")
        return 2
    except OSError as e:
        stream.write(f"error: repairing {Path(out_dir) / JOURNAL_NAME} failed: {e}\n")
        return 1
    stream.write(rep.text() + "\n")
    return 0
