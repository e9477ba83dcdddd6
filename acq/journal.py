"""Append-only JSONL journal of finished events (OUTDIR/journal.jsonl).

One JSON object per line, fsync'd before ``append`` returns, so what the
journal says is done survives a crash or a kill -9. Records (``rec``):

  run_start       {run_uid, resumed, plan_source}
  tile_started    {key, version, cycle}            before the frame is grabbed
  tile_done       {key, version, cycle, files}     after every writer acknowledged it
  autofocus_done  {key, wd_m, stig}
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

Every record also has ``t`` (wall time). A torn last line (killed mid-write)
is dropped and cut off before the next append.
"""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

JOURNAL_NAME = "journal.jsonl"


@dataclass
class JournalState:
    """What a journal says has happened, for resume."""
    tiles_done: dict[str, int] = field(default_factory=dict)       # key -> version
    tiles_started: dict[str, int] = field(default_factory=dict)    # key -> highest version started
    tile_files: dict[str, list] = field(default_factory=dict)
    tile_qc: dict[str, dict] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)                    # keys of finished non-tile events
    autofocus: dict[str, dict] = field(default_factory=dict)
    irradiation_progress: dict[str, dict] = field(default_factory=dict)
    mill_started: dict[str, dict] = field(default_factory=dict)    # key -> last mill record
    exhausted: set[int] = field(default_factory=set)
    cycles_done: set[int] = field(default_factory=set)
    runs: int = 0
    records: int = 0

    def mill_status(self, key: str) -> tuple[str, float]:
        """("done"|"none"|"known"|"unknown", seconds known milled) of a mill.
        "known": stopped with the beam blanked, time milled recorded;
        "unknown": the process died while the beam may have been on."""
        if key in self.done:
            return "done", 0.0
        last = self.mill_started.get(key)
        if last is None:
            return "none", 0.0
        if last["rec"] == "mill_beam_on":
            return "unknown", float(last.get("done_s", 0.0))
        return "known", float(last.get("done_s", 0.0))

    def next_version(self, key: str) -> int:
        return self.tiles_started.get(key, -1) + 1

    def first_open_cycle(self) -> int:
        c = 0
        while c in self.cycles_done:
            c += 1
        return c


class Journal:
    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / JOURNAL_NAME
        self._lock = threading.Lock()
        self._f = None
        self.state = JournalState()        # kept up to date by append()

    # ------------------------------------------------------------ reading
    def read(self) -> JournalState:
        st = JournalState()
        if not self.path.exists():
            return st
        for rec in self._records():
            apply(st, rec)
        return st

    def _records(self):
        with open(self.path, "rb") as f:
            data = f.read()
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                return            # torn tail from a kill mid-write: everything before it counts

    # ------------------------------------------------------------ writing
    def open(self) -> JournalState:
        """Open for appending; returns (and keeps) the state read so far."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._cut_torn_tail()
        self.state = self.read()
        self._f = open(self.path, "ab", buffering=0)
        return self.state

    def _cut_torn_tail(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            with open(self.path, "rb+") as f:
                f.truncate(end)
                os.fsync(f.fileno())

    def append(self, rec: str, **fields) -> dict:
        entry = {"rec": rec, "t": time.time(), **fields}
        line = (json.dumps(entry, default=_jsonable) + "\n").encode()
        with self._lock:
            if self._f is None:
                raise RuntimeError("journal is not open")
            self._f.write(line)
            os.fsync(self._f.fileno())
            apply(self.state, entry)
        return entry

    def close(self) -> None:
        with self._lock:
            if self._f is not None:
                self._f.close()
                self._f = None


def apply(st: JournalState, rec: dict) -> None:
    """Fold one record into the state (also used live by the engine)."""
    st.records += 1
    kind, key = rec.get("rec"), rec.get("key")
    if kind == "run_start":
        st.runs += 1
    elif kind == "tile_started":
        st.tiles_started[key] = max(st.tiles_started.get(key, -1), int(rec["version"]))
    elif kind == "tile_done":
        st.tiles_done[key] = int(rec["version"])
        st.tile_files[key] = rec.get("files", [])
        st.tile_qc[key] = rec.get("qc", {})
    elif kind == "autofocus_done":
        st.done.add(key)
        st.autofocus[key] = rec
    elif kind == "irr_progress":
        st.irradiation_progress[key] = rec
    elif kind in ("mill_started", "mill_beam_on", "mill_beam_off"):
        st.mill_started[key] = rec
    elif kind == "exhausted":
        st.exhausted.add(int(rec["section"]))
    elif kind == "cycle_done":
        st.done.add(key)
        st.cycles_done.add(int(rec["cycle"]))
    elif kind in ("irr_done", "mill_done", "section_done"):
        st.done.add(key)


def read_records(out_dir: str | Path) -> list[dict]:
    """All intact records of OUTDIR's journal (tests, tools)."""
    j = Journal(out_dir)
    return list(j._records()) if j.path.exists() else []


def _jsonable(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    return str(o)


def load_state(out_dir: str | Path) -> Optional[JournalState]:
    j = Journal(out_dir)
    return j.read() if j.path.exists() else None
