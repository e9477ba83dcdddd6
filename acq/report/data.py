"""What a run report shows, gathered from an output folder (no rendering).

Where each number lives:
  journal.jsonl     tiles started/done (QC values, scans, files), autofocus
                    results (wd, stig, ok, frames), irradiation dose per
                    section, mill time per cycle, incidents, run starts/stops
  tile headers      the OME-TIFF's JSON header: electron dose of the frame
                    (``metadata.electrons_per_nm2``), wd and stig imaged with
  manifest.jsonl    bytes written and when (throughput in MB/h)
  plan.json         planned cycles, mill duration, irradiation target
  fingerprint.json  the tiles of one cycle (the planned total, for the ETA)

Not recorded anywhere, so shown as such: the depth a mill removed (only the
plan's estimate exists), the ion dose of a mill (its time is recorded, not
its current), the wd before a QC refocus (refocus is not journaled).

Reading never writes and takes no lock, so it works on a folder a run is
writing: the journal's torn last line is left out, a missing run_stop means
the run is going (or was killed), and damage inside the journal ends the
records read with a note instead of failing.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from acq.journal import JOURNAL_NAME, JournalCorrupt, read_records
from acq.run_folder import plan_copy
from acq.writers.manifest import classify, read_lines

_TILE_KEY = re.compile(r"^c(\d+)_s(\d+)_g(\d+)_r(\d+)_c(\d+)$")
OVERVIEW_SECTION = 9999            # acq.plan.OVERVIEW_SECTION (not imported: loading acq.plan validates plans)
MAX_HEADERS = 5000                 # tile headers read per report (the latest tiles): keeps a big run's report quick


class NotARun(ValueError):
    """The folder holds no run journal."""


@dataclass
class Tile:
    key: str
    cycle: int
    section: int
    grid: int
    row: int
    col: int
    started: int = 0                 # tile_started records: grabs begun (one per version)
    extra_scans: int = 0             # exposure records: retries and refocus scans
    granted: int = 0                 # exposures the operator allowed beyond the budget
    done_version: Optional[int] = None
    t_done: Optional[float] = None
    qc: dict = field(default_factory=dict)
    files: list = field(default_factory=list)
    on_disk: int = 0                 # versions of it under tiles/
    header: Optional[dict] = None    # the OME-TIFF header of the done version (when read)

    @property
    def scans(self) -> int:
        """Times the frame was grabbed (re-acquisitions and retries count)."""
        return self.started + self.extra_scans

    @property
    def overview(self) -> bool:
        return self.section == OVERVIEW_SECTION

    @property
    def electrons_per_nm2(self) -> Optional[float]:
        md = (self.header or {}).get("metadata") or {}
        v = md.get("electrons_per_nm2")
        if v is None and self.header is not None and md.get("probe_current_a") is not None:
            px = float(self.header["pixel_size_m"]) * 1e9
            v = float(md["probe_current_a"]) * float(self.header["dwell_s"]) / 1.602176634e-19 / px ** 2
        return float(v) if v is not None else None


@dataclass
class Autofocus:
    key: str
    cycle: int
    section: Optional[int]
    t: float
    wd_m: float
    stig: tuple[float, float]
    ok: bool
    method: str
    frames: int
    message: str
    d_wd_m: Optional[float] = None               # change from the wd set before it (previous autofocus)
    d_stig: Optional[tuple[float, float]] = None


@dataclass
class Session:
    """One start of the engine on this folder (a resume is a new session)."""
    run_uid: str
    resumed: bool
    t_start: float
    t_last: float
    status: Optional[str] = None                 # run_stop status; None: going or killed
    reason: str = ""
    tiles_done: int = 0


@dataclass
class Throughput:
    tiles_done: int
    active_s: float
    tiles_per_h: Optional[float]
    bytes_written: Optional[int]
    mb_per_h: Optional[float]
    planned: Optional[int]
    planned_is_bound: bool
    eta_s: Optional[float]
    rate_from: str


@dataclass
class RunData:
    out_dir: Path
    generated: float
    sessions: list[Session] = field(default_factory=list)
    tiles: dict[str, Tile] = field(default_factory=dict)
    autofocus: list[Autofocus] = field(default_factory=list)
    irradiation: list[dict] = field(default_factory=list)
    mills: dict[int, dict] = field(default_factory=dict)           # cycle -> last mill record + planned
    cycles_done: dict[int, float] = field(default_factory=dict)    # cycle -> time
    exhausted: dict[int, int] = field(default_factory=dict)        # section -> cycle
    incidents: list[dict] = field(default_factory=list)
    plan: dict = field(default_factory=dict)
    n_cycles: Optional[int] = None
    n_cycles_note: str = ""
    depth_per_cycle_nm: Optional[float] = None
    depth_note: str = ""                                           # where depth_per_cycle_nm comes from
    tiles_per_cycle: Optional[int] = None
    overview_tiles: int = 0
    tile_times: list[float] = field(default_factory=list)          # tile_done times, in order
    bytes_log: list[tuple[float, int]] = field(default_factory=list)
    records: int = 0
    last_record_t: Optional[float] = None
    torn_tail: bool = False
    damage: str = ""
    headers_read: int = 0
    headers_note: str = ""
    throughput: Optional[Throughput] = None

    @property
    def status(self) -> str:
        if not self.sessions:
            return "not started"
        s = self.sessions[-1]
        return s.status if s.status is not None else "in progress"      # or killed: the page says so

    @property
    def running(self) -> bool:
        return bool(self.sessions) and self.sessions[-1].status is None

    def done_tiles(self) -> list[Tile]:
        return sorted((t for t in self.tiles.values() if t.done_version is not None), key=lambda t: t.t_done)


def _tile(run: RunData, key: str) -> Optional[Tile]:
    t = run.tiles.get(key)
    if t is None:
        m = _TILE_KEY.match(key)
        if m is None:
            return None
        t = run.tiles[key] = Tile(key, *(int(g) for g in m.groups()))
    return t


def _fold(run: RunData, rec: dict, state: dict) -> None:
    kind, t = rec.get("rec"), float(rec.get("t") or 0.0)
    run.records += 1
    run.last_record_t = t
    ses = run.sessions[-1] if run.sessions else None
    if ses is not None:
        ses.t_last = t
    if kind == "run_start":
        run.sessions.append(Session(str(rec.get("run_uid", "")), bool(rec.get("resumed")), t, t))
        state["wd"], state["stig"] = None, None           # the SEM may have been touched between sessions
    elif kind in ("tile_started", "exposure", "exposure_granted", "tile_done"):
        tile = _tile(run, str(rec.get("key")))
        if tile is None:
            return
        if kind == "tile_started":
            tile.started += 1
        elif kind == "exposure":
            tile.extra_scans += int(rec.get("n", 1))
        elif kind == "exposure_granted":
            tile.granted += 1
        else:
            if tile.done_version is None:
                run.tile_times.append(t)
                if ses is not None:
                    ses.tiles_done += 1
            tile.done_version, tile.t_done = int(rec.get("version", 0)), t
            tile.qc = dict(rec.get("qc") or {})
            tile.files = list(rec.get("files") or [])
    elif kind == "autofocus_done":
        wd, stig = float(rec.get("wd_m", math.nan)), tuple(float(s) for s in (rec.get("stig") or (0.0, 0.0)))
        af = Autofocus(str(rec.get("key")), int(rec.get("cycle", 0)), rec.get("section"), t, wd, stig,
                       bool(rec.get("ok", True)), str(rec.get("method", "")), int(rec.get("frames", 0)),
                       str(rec.get("message", "")))
        if state.get("wd") is not None:
            af.d_wd_m = wd - state["wd"]
            af.d_stig = (stig[0] - state["stig"][0], stig[1] - state["stig"][1])
        state["wd"], state["stig"] = wd, stig
        run.autofocus.append(af)
    elif kind == "irr_done":
        run.irradiation.append({**rec})
    elif kind in ("mill_started", "mill_beam_on", "mill_beam_off", "mill_done"):
        m = re.match(r"mill:c(\d+)$", str(rec.get("key", "")))
        if m is None:
            return
        entry = run.mills.setdefault(int(m.group(1)), {"planned_s": None, "t_start": t})
        if kind == "mill_started":
            entry["planned_s"] = rec.get("duration_s")
        entry.update(last=kind, t=t, done_s=float(rec.get("seconds", rec.get("done_s", 0.0)) or 0.0))
        if kind == "mill_done":
            entry.update(interrupted=bool(rec.get("interrupted")), accepted=bool(rec.get("accepted")))
    elif kind == "cycle_done":
        run.cycles_done[int(rec.get("cycle", 0))] = t
    elif kind == "exhausted":
        run.exhausted[int(rec.get("section", -1))] = int(rec.get("cycle", -1))
    elif kind == "incident":
        run.incidents.append({"t": t, "severity": rec.get("severity", ""), "cause": rec.get("cause", ""),
                              "message": rec.get("message", "")})
    elif kind == "run_stop" and ses is not None:
        ses.status, ses.reason = str(rec.get("status", "")), str(rec.get("reason", ""))


def _read_journal(run: RunData) -> None:
    path = run.out_dir / JOURNAL_NAME
    data_end = None
    state: dict = {}
    try:
        for rec in read_records(run.out_dir, absolute_files=False):
            _fold(run, rec, state)
    except JournalCorrupt as e:
        run.damage = str(e)
    try:
        with open(path, "rb") as f:                 # a line still being written (or torn by a kill)
            f.seek(max(0, os.fstat(f.fileno()).st_size - 1))
            data_end = f.read(1)
    except OSError:
        pass
    run.torn_tail = data_end not in (None, b"", b"\n")


def _read_plan(run: RunData) -> None:
    run.plan = plan_copy(run.out_dir)
    cycles = run.plan.get("cycles")
    rule = cycles if isinstance(cycles, dict) else None
    if isinstance(cycles, int):
        run.n_cycles = cycles
    per = rule.get("depth_per_cycle_nm") if rule else None
    if per is not None:
        run.depth_per_cycle_nm, run.depth_note = float(per), "plan's depth_per_cycle_nm (not measured)"
    elif run.plan.get("mill"):
        est = _estimated_depth(run.plan)
        if est is not None:
            run.depth_per_cycle_nm, run.depth_note = est, "plan's estimate from Table 2.1 (not measured)"
    if rule is not None:
        cap = int(rule.get("max_cycles", 1000))
        if rule.get("target_depth_nm") and run.depth_per_cycle_nm:
            run.n_cycles = max(1, min(cap, math.ceil(float(rule["target_depth_nm"]) / run.depth_per_cycle_nm - 1e-9)))
        else:
            run.n_cycles = cap
        if rule.get("section_exhausted"):
            run.n_cycles_note = "at most (sections may be milled through earlier)"
    try:
        fp = json.loads((run.out_dir / "fingerprint.json").read_text())
        ids = [t[0] for t in fp.get("tiles", [])]
    except (OSError, ValueError, TypeError, IndexError):
        return
    ov = sum(1 for i in ids if (m := _TILE_KEY.match(str(i))) and int(m.group(2)) == OVERVIEW_SECTION)
    run.tiles_per_cycle, run.overview_tiles = len(ids) - ov, ov


def _estimated_depth(plan: dict) -> Optional[float]:
    """The plan's depth per mill (Table 2.1 at its dose); needs the setup file
    for the raster calibration, so None when that is gone or invalid."""
    try:
        from acq.plan import plan_from_data
        from acq.steps_mill import estimated_depth_per_cycle_nm
        return float(estimated_depth_per_cycle_nm(plan_from_data(plan, "plan.json")))
    except Exception:                   # any reason the plan no longer loads: the estimate is simply absent
        return None


def _scan_disk(run: RunData, max_headers: int) -> None:
    """Versions of each tile on disk, and the headers of the latest done tiles."""
    from acq.writers.layout import read_tile_header
    tiles_dir = run.out_dir / "tiles"
    if tiles_dir.is_dir():
        for sec in os.scandir(tiles_dir):
            if not sec.is_dir():
                continue
            for cyc in os.scandir(sec.path):
                if not cyc.is_dir():
                    continue
                for f in os.scandir(cyc.path):
                    c = classify(f"tiles/{sec.name}/{cyc.name}/{f.name}")
                    if c and c[0] == "tile":
                        tile = _tile(run, c[1])
                        if tile is not None:
                            tile.on_disk += 1
    done = [t for t in run.done_tiles() if t.files]
    for t in done[-max_headers:] if max_headers > 0 else []:
        tif = next((f for f in t.files if str(f).endswith(".ome.tif")), None)
        if tif is None:
            continue
        try:
            t.header = read_tile_header(run.out_dir / tif)
            run.headers_read += 1
        except (OSError, ValueError) as e:
            run.headers_note = f"a tile header could not be read ({tif}: {e})"
    if len(done) > max_headers:
        run.headers_note = f"headers of the latest {max_headers} of {len(done)} tiles read"


def _read_bytes(run: RunData) -> None:
    lines = read_lines(run.out_dir).entries
    for e in lines:
        if e.get("bytes") is not None and e.get("time") is not None and not e.get("deleted"):
            run.bytes_log.append((float(e["time"]), int(e["bytes"])))


def _throughput(run: RunData) -> Throughput:
    done = len(run.tile_times)
    active = sum(max(0.0, s.t_last - s.t_start) for s in run.sessions)
    rate = done / active * 3600 if active > 0 and done else None
    written = sum(b for _, b in run.bytes_log) if run.bytes_log else None
    mb_h = written / 1e6 / active * 3600 if written is not None and active > 0 else None
    planned = None
    if run.n_cycles is not None and run.tiles_per_cycle is not None:
        planned = run.n_cycles * run.tiles_per_cycle
        ov = run.plan.get("overview") or {}
        if run.overview_tiles:
            every = int(ov.get("every_n_cycles") or 0)
            planned += run.overview_tiles * (1 + sum(1 for c in range(1, run.n_cycles) if every and c % every == 0))
    bound = bool(run.n_cycles_note) or bool(run.exhausted)
    eta, rate_from = None, "all sessions"
    last = run.sessions[-1] if run.sessions else None
    per_tile = None
    if last is not None and last.tiles_done >= 2 and last.t_last > last.t_start:
        per_tile, rate_from = (last.t_last - last.t_start) / last.tiles_done, "this session"
    elif rate:
        per_tile = 3600 / rate
    if planned is not None and per_tile is not None and run.running:
        eta = max(planned - done, 0) * per_tile
    return Throughput(done, active, rate, written, mb_h, planned, bound, eta, rate_from)


def gather(out_dir: str | Path, *, max_headers: int = MAX_HEADERS, now: Optional[float] = None) -> RunData:
    """Everything the report shows about the run in ``out_dir``. Raises
    NotARun when there is no journal."""
    out = Path(out_dir)
    if not (out / JOURNAL_NAME).is_file():
        raise NotARun(f"{out}: no {JOURNAL_NAME} here, so no run to report on (give the output folder of a run)")
    run = RunData(out, time.time() if now is None else now)
    _read_journal(run)
    _read_plan(run)
    _scan_disk(run, max_headers)
    _read_bytes(run)
    run.throughput = _throughput(run)
    return run
