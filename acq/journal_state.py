"""The journal's state: what its records say is done, folded record by
record (``apply``, also live while the engine appends). acq/journal.py reads
and writes the records; this module only interprets them."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

_CYCLE_IN_KEY = re.compile(r"(?:[a-z_]+:)?c(\d+)(?:_|$)")
_KEEP_DONE = ("mill:", "cycle:")        # done keys kept after their cycle is done (one per cycle)


@dataclass
class JournalState:
    """What a journal says has happened, for resume. Per-tile entries (and
    autofocus, section and mill entries) are kept only for cycles not yet
    done; ``tiles_done_total`` counts every tile done (all runs)."""
    tiles_done: dict[str, int] = field(default_factory=dict)       # key -> version (open cycles)
    tiles_started: dict[str, int] = field(default_factory=dict)    # key -> highest version started
    tile_files: dict[str, list] = field(default_factory=dict)      # key -> files as journaled (relative to OUTDIR)
    tile_qc: dict[str, dict] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)                    # keys of finished non-tile events
    autofocus: dict[str, dict] = field(default_factory=dict)
    irradiation_progress: dict[str, dict] = field(default_factory=dict)   # until irr_done
    mill_started: dict[str, dict] = field(default_factory=dict)    # key -> last mill record (open cycles)
    exhausted: set[int] = field(default_factory=set)
    section_focus: dict[int, dict] = field(default_factory=dict)   # section -> its last focus (all cycles)
    cycles_done: set[int] = field(default_factory=set)
    runs: int = 0
    records: int = 0
    tiles_done_total: int = 0                                      # tiles done, all runs, all cycles
    exposures: dict[str, int] = field(default_factory=dict)        # key -> scans (tile_started + exposure n)
    exposures_granted: dict[str, int] = field(default_factory=dict)   # key -> exposure_granted records
    open_keys: dict[int, set[str]] = field(default_factory=dict, repr=False, compare=False)

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

    def to_json(self) -> dict:
        return {"tiles_done": self.tiles_done, "tiles_started": self.tiles_started, "tile_files": self.tile_files,
                "tile_qc": self.tile_qc, "done": sorted(self.done), "autofocus": self.autofocus,
                "irradiation_progress": self.irradiation_progress, "mill_started": self.mill_started,
                "exhausted": sorted(self.exhausted), "cycles_done": sorted(self.cycles_done), "runs": self.runs,
                "records": self.records, "tiles_done_total": self.tiles_done_total, "exposures": self.exposures,
                "exposures_granted": self.exposures_granted,
                "section_focus": {str(k): v for k, v in self.section_focus.items()},
                "open_keys": {str(c): sorted(keys) for c, keys in self.open_keys.items()}}

    @classmethod
    def from_json(cls, d: dict) -> "JournalState":
        return cls(tiles_done=dict(d["tiles_done"]), tiles_started=dict(d["tiles_started"]),
                   tile_files=dict(d["tile_files"]), tile_qc=dict(d["tile_qc"]), done=set(d["done"]),
                   autofocus=dict(d["autofocus"]), irradiation_progress=dict(d["irradiation_progress"]),
                   mill_started=dict(d["mill_started"]), exhausted={int(s) for s in d["exhausted"]},
                   cycles_done={int(c) for c in d["cycles_done"]}, runs=int(d["runs"]), records=int(d["records"]),
                   tiles_done_total=int(d["tiles_done_total"]), exposures=dict(d["exposures"]),
                   exposures_granted=dict(d["exposures_granted"]),
                   section_focus={int(k): v for k, v in d.get("section_focus", {}).items()},
                   open_keys={int(c): set(keys) for c, keys in d["open_keys"].items()})


def _cycle_of(rec: dict, key) -> Optional[int]:
    c = rec.get("cycle")
    if c is not None:
        return int(c)
    m = _CYCLE_IN_KEY.match(key) if isinstance(key, str) else None
    return int(m.group(1)) if m else None


def _track(st: JournalState, rec: dict, key) -> None:
    c = _cycle_of(rec, key)
    if c is not None:
        keys = st.open_keys.get(c)
        if keys is None:
            keys = st.open_keys[c] = set()
        keys.add(key)


def _close_cycle(st: JournalState, cycle: int) -> None:
    """A cycle is done: resume never looks at its tiles, autofocus, sections or mill again."""
    for k in st.open_keys.pop(cycle, ()):
        st.tiles_done.pop(k, None)
        st.tiles_started.pop(k, None)
        st.tile_files.pop(k, None)
        st.tile_qc.pop(k, None)
        st.autofocus.pop(k, None)
        st.mill_started.pop(k, None)
        st.exposures.pop(k, None)
        st.exposures_granted.pop(k, None)
        if not k.startswith(_KEEP_DONE):
            st.done.discard(k)


def _tile_started(st: JournalState, rec: dict, key) -> None:
    v = int(rec["version"])
    if v > st.tiles_started.get(key, -1):
        st.tiles_started[key] = v
    st.exposures[key] = st.exposures.get(key, 0) + 1
    _track(st, rec, key)


def _tile_done(st: JournalState, rec: dict, key) -> None:
    if key not in st.tiles_done:
        st.tiles_done_total += 1
    st.tiles_done[key] = int(rec["version"])
    st.tile_files[key] = rec.get("files", [])
    st.tile_qc[key] = rec.get("qc", {})
    _track(st, rec, key)


def _run_start(st: JournalState, rec: dict, key) -> None:
    st.runs += 1


def _autofocus_done(st: JournalState, rec: dict, key) -> None:
    st.done.add(key)
    st.autofocus[key] = rec
    _track(st, rec, key)


def _exposure(st: JournalState, rec: dict, key) -> None:
    st.exposures[key] = st.exposures.get(key, 0) + int(rec.get("n", 1))
    _track(st, rec, key)


def _exposure_granted(st: JournalState, rec: dict, key) -> None:
    st.exposures_granted[key] = st.exposures_granted.get(key, 0) + 1
    _track(st, rec, key)


def _irr_progress(st: JournalState, rec: dict, key) -> None:
    st.irradiation_progress[key] = rec


def _mill_progress(st: JournalState, rec: dict, key) -> None:
    st.mill_started[key] = rec
    _track(st, rec, key)


def _exhausted(st: JournalState, rec: dict, key) -> None:
    st.exhausted.add(int(rec["section"]))


def _section_done(st: JournalState, rec: dict, key) -> None:
    if "focus" in rec:                  # kept past the cycle: the section's next cycle starts from it
        st.section_focus[int(rec["section"])] = {k: rec[k] for k in ("focus", "af_used", "af_next") if k in rec}
    _step_done(st, rec, key)


def _cycle_done(st: JournalState, rec: dict, key) -> None:
    st.done.add(key)
    c = int(rec["cycle"])
    st.cycles_done.add(c)
    _close_cycle(st, c)


def _irr_done(st: JournalState, rec: dict, key) -> None:
    st.done.add(key)
    st.irradiation_progress.pop(key, None)


def _step_done(st: JournalState, rec: dict, key) -> None:
    st.done.add(key)
    _track(st, rec, key)


# What each record does to the state; records not listed (incident, run_stop, ...) only count.
_APPLY = {
    "tile_started": _tile_started, "tile_done": _tile_done, "run_start": _run_start,
    "autofocus_done": _autofocus_done, "exposure": _exposure, "exposure_granted": _exposure_granted,
    "irr_progress": _irr_progress, "mill_started": _mill_progress, "mill_beam_on": _mill_progress,
    "mill_beam_off": _mill_progress, "exhausted": _exhausted, "cycle_done": _cycle_done, "irr_done": _irr_done,
    "mill_done": _step_done, "section_done": _section_done,
    "step_done": _step_done,                # a step added with Engine.add_step: done, skipped on resume
}


def apply(st: JournalState, rec: dict) -> None:
    """Fold one record into the state (also used live by the engine)."""
    st.records += 1
    fold = _APPLY.get(rec.get("rec"))
    if fold is not None:
        fold(st, rec, rec.get("key"))
