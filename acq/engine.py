"""The acquisition engine: executes a plan's events against the devices and
publishes the document stream (acq/documents.py).

Lifecycle (Bluesky-like): the run happens in a worker thread; ``pause()``,
``resume()`` and ``abort()`` take effect only at checkpoints, i.e. between
events — never mid-frame and never mid-mill. Suspenders (acq/suspenders.py)
pause the run and resume it by themselves when their condition clears.
Failures after the per-operation retries count as consecutive failures: the
engine suspends, reconnects the failing device and tries the event again; the
N-th consecutive failure, a limit violation or an unknown interlock pauses the
run for the operator. With ``on_pause="stop"`` (command line) such a pause
ends the run instead, to be continued with ``--resume``.

Durability: acq/journal.py. A tile is journaled done only when every writer
acknowledged it; before a mill every tile of the cycle must be done.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from acq.atomic import atomic_write
from acq.autofocus_step import run_autofocus
from acq.device_ops import StepFailed, with_retries
from acq.documents import CycleDone, Incident, RunStart, RunStop, SectionDone
from acq.expand import (AcquireTile, Autofocus, Configure, CycleEnd, ExpansionState, Irradiate, Mill, MoveStage,
                        SectionEnd, check_plan, expand)
from acq.journal import Journal
from acq.lifecycle import Abort, OperatorStop, RunLifecycle, _label
from acq.plan import Plan, Retries, dump_plan
from acq.qc import ImageInspector
from acq.steps_irradiation import irradiate
from acq.steps_mill import run_mill
from acq.steps_tile import acquire_tile, move_stage
from acq.stream import Dispatcher
from acq.suspenders import SuspendCondition, Suspender, default_suspenders
from devices.errors import DeviceError, InterlockError, LimitViolation
from devices.setup_config import ConfigError

log = logging.getLogger(__name__)
SOFTWARE_VERSION = "0.1.0"
PLAN_COPY = "plan.json"
# what a resume must not change: which tiles, mills and doses the run is made of
_DEFINING = ("sections", "sections_from", "grid_template", "overview", "order", "cycles", "mill", "irradiation")


@dataclass
class RunResult:
    status: str                 # "success" | "aborted" | "failed"
    reason: str
    run_uid: str
    tiles: int                  # acquired in this run
    tiles_done: int             # done in the journal (all runs)
    incidents: int
    files: int
    bytes: int


class Engine(RunLifecycle):
    """Run ``plan`` on ``setup``, writing into ``out_dir``.

    subscribers: callables fed every document, each from its own thread
    writers:     acq.stream.Writer objects; a tile is done once all of them returned
    resume:      continue the run journaled in ``out_dir``
    accept_interrupted_mill: count a mill cut short by a crash (beam on) as done
    on_pause:    "wait" (GUI: wait for resume()/abort()) or "stop" (command line:
                 end the run, to be continued with resume=True)
    retries:     a Retries policy replacing the plan's
    API: start(), pause(), resume(), abort(), wait(), run(), state, on_state_change(fn),
    on_step(fn), subscribe(fn), add_writer(w), incidents, result (RunResult).
    """

    def __init__(self, setup, plan: Plan, out_dir: str | Path, subscribers: Iterable[Callable] = (),
                 writers: Iterable = (), *, resume: bool = False, accept_interrupted_mill: bool = False,
                 on_pause: str = "wait", queue_maxsize: Optional[int] = None,
                 suspenders: Optional[list[Suspender]] = None, retries: Optional[Retries] = None):
        if on_pause not in ("wait", "stop"):
            raise ValueError(f"on_pause = {on_pause!r}: allowed 'wait', 'stop'")
        if retries is not None:                          # the caller's retry policy replaces the plan's
            plan = plan.model_copy(update={"retries": retries})
        self.setup, self.plan, self.clock = setup, plan, setup.clock
        self.out_dir = Path(out_dir)
        self.sections = check_plan(plan, setup)          # ConfigError before anything is written
        self.journal = Journal(self.out_dir)
        if not resume and self.journal.path.exists():
            raise ConfigError(f"{self.out_dir} already holds a run (journal.jsonl); continue it with --resume")
        if resume and not self.journal.path.exists():
            raise ConfigError(f"--resume {self.out_dir}: no journal.jsonl there, nothing to resume")
        self.resume_run, self.accept_interrupted_mill, self.on_pause = resume, accept_interrupted_mill, on_pause
        if resume:
            _same_plan(self.out_dir, plan)
        self.dispatcher = Dispatcher(queue_maxsize or plan.output.queue_maxsize)
        for fn in subscribers:
            self.dispatcher.add_subscriber(fn)
        for w in writers:
            self.dispatcher.add_writer(w)
        self.suspenders = suspenders if suspenders is not None else default_suspenders(setup, plan, self.out_dir)
        self.run_uid = uuid.uuid4().hex
        self.incidents: list[Incident] = []
        self.result: Optional[RunResult] = None
        # step context (read and written by acq/steps_*.py)
        self.imaging_z = 0.0
        self.scan_cache = None
        self.last_frame_sample = None
        self.ion_beam_safe = False
        rule = plan.cycles
        self.flat_cv = rule.exhausted_flat_cv if not isinstance(rule, int) and rule.section_exhausted else None
        self.qc_inspector = ImageInspector(plan.qc.checks) if plan.qc.enabled else None
        self._init_lifecycle()
        self._tiles = 0
        self._pending: list[Incident] = []            # raised in writer threads, published by the engine
        self._pending_lock = threading.Lock()
        self._cycle_tiles: dict[int, list[AcquireTile]] = {}
        self._xstate = ExpansionState()

    # ------------------------------------------------------------ step context
    def incident(self, severity: str, cause: str, message: str, context: Optional[dict] = None) -> None:
        inc = Incident(self.run_uid, severity, cause, message, dict(context or {}))
        log.log({"info": logging.INFO, "warning": logging.WARNING}.get(severity, logging.ERROR), "%s: %s",
                cause, message)
        if threading.current_thread() is self._thread:
            self._publish_incident(inc)
        else:
            with self._pending_lock:
                self._pending.append(inc)

    def devices_reconnected(self, role: Optional[str]) -> None:
        self.invalidate_scan()
        if role == "ion_gun":
            self.ion_beam_safe = False

    def invalidate_scan(self) -> None:
        self.scan_cache = None

    def refocus(self, ev: AcquireTile) -> None:
        """QC asked for focus: the plan's autofocus method here, not journaled."""
        if self.plan.autofocus.method == "none":
            return
        af = Autofocus(key=f"refocus:{ev.key}", cycle=ev.cycle, section=ev.section, grid=ev.grid,
                       center_um=ev.center_um, step=self.plan.autofocus, tile_keys=(ev.key,))
        run_autofocus(self.setup, af)
        self.invalidate_scan()

    def ensure_ion_beam_safe(self) -> None:
        """Before any stage move or frame: the ion beam must be blanked."""
        gun = self.setup.ion_gun
        if gun is None or self.ion_beam_safe:
            return
        st = gun.gun_status()
        if st.beam_on and not st.blanked:
            gun.set_blanked(True)
            st = gun.gun_status()
            if st.beam_on and not st.blanked:
                raise InterlockError("the ion beam does not blank", device="ion_gun", operation="blank")
        self.ion_beam_safe = True

    # ------------------------------------------------------------ lifecycle
    def _publish_incident(self, inc: Incident) -> None:
        self.incidents.append(inc)
        self.journal.append("incident", severity=inc.severity, cause=inc.cause, message=inc.message)
        self.dispatcher.publish(inc)

    def _flush_pending(self) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, []
        for inc in pending:
            self._publish_incident(inc)

    def _run(self) -> None:
        status, reason = "failed", ""
        try:
            self._open()
            for ev in expand(self.plan, self.setup, self._start_cycle, self._xstate):
                self._do(ev)
            self.dispatcher.wait_idle()
            status = "success"
        except Abort:
            status, reason = "aborted", "aborted by the operator"
        except OperatorStop as e:
            reason = f"{e} - continue with: run PLAN --resume {self.out_dir}"
        except Exception as e:                   # a bug or an unhandled device state: stop safely, say why
            log.exception("engine failed")
            reason = f"{type(e).__name__}: {e}"
            try:
                self._publish_incident(Incident(self.run_uid, "error", "engine_error", reason))
            except Exception:
                pass
        self._set_state("stopping", reason or status)
        self._finish(status, reason)

    def _open(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if not self.resume_run:
            atomic_write(self.out_dir / PLAN_COPY, json.dumps(dump_plan(self.plan), indent=1).encode())
        st = self.journal.open()
        self._xstate.exhausted = set(st.exhausted)
        self._start_cycle = st.first_open_cycle() if self.resume_run else 0
        self.journal.append("run_start", run_uid=self.run_uid, resumed=self.resume_run,
                            plan_source=str(self.plan.source))
        self.dispatcher.start()
        self.dispatcher.publish(RunStart(self.run_uid, dump_plan(self.plan),
                                         self.setup.config.model_dump(mode="json"), SOFTWARE_VERSION,
                                         str(self.out_dir), resumed=self.resume_run))
        if self.plan.mill is not None:
            self._interrupted_mills(st)

    def _interrupted_mills(self, st) -> None:
        for key in list(st.mill_started):
            status, done = st.mill_status(key)
            if status != "unknown":
                continue
            cycle = int(key.split(":c")[1])
            self.incident("error", "mill_interrupted",
                          f"mill of cycle {cycle} interrupted after unknown time (at least {done:.1f} s of "
                          f"{self.plan.mill.duration_s:g} s): the program stopped with the ion beam on",
                          {"cycle": cycle, "known_s": done})
            if not (self.accept_interrupted_mill or self.plan.mill.on_interrupted == "skip"):
                self._operator_pause(f"mill of cycle {cycle} was interrupted after unknown time; check the "
                                     "sections, then accept it (--accept-interrupted-mill) to go on without "
                                     "milling it again")
            self.journal.append("mill_done", key=key, cycle=cycle, seconds=done, interrupted=True, accepted=True)
            self.incident("warning", "mill_accepted", f"interrupted mill of cycle {cycle} counted as done; "
                          "it is not repeated", {"cycle": cycle})

    def _finish(self, status: str, reason: str) -> None:
        try:
            self._make_safe()
        except Exception as e:
            log.error("making the setup safe at the end failed: %s", e)
        try:
            self.dispatcher.wait_idle()
            self._flush_pending()
            self.journal.append("run_stop", status=status, reason=reason)
            self.dispatcher.publish(RunStop(self.run_uid, status, reason, tiles=self._tiles,
                                            incidents=len(self.incidents)))
        except Exception as e:                   # e.g. the journal's disk is gone: still report the result
            log.error("closing the run failed: %s", e)
            status, reason = "failed", reason or f"closing the run failed: {e}"
        finally:
            self.dispatcher.close()
            self.journal.close()
        tiles_done = len(self.journal.state.tiles_done)
        files, size = _du(self.out_dir)
        self.result = RunResult(status, reason, self.run_uid, self._tiles, tiles_done, len(self.incidents),
                                files, size)
        self._set_state("idle" if status != "failed" else "error", reason or status)

    def _make_safe(self) -> None:
        """Paused or stopped: no beam on the specimen."""
        self.setup.sem.set_blanked(True)
        if self.setup.ion_gun is not None:
            self.ion_beam_safe = False
            self.ensure_ion_beam_safe()

    # ------------------------------------------------------------ events
    def _skip(self, ev) -> bool:
        st = self.journal.state
        if isinstance(ev, AcquireTile):
            self._cycle_tiles.setdefault(ev.cycle, []).append(ev)
            return ev.key in st.tiles_done
        if isinstance(ev, MoveStage):
            if ev.for_key in st.tiles_done:
                return True
            return ev.for_key in st.done      # autofocus done (re-applied without moving), irradiation done
        if isinstance(ev, Autofocus) and ev.key in st.done:
            if any(k not in st.tiles_done for k in ev.tile_keys):
                rec = st.autofocus[ev.key]      # focus found before the restart, for the tiles still to do
                self.setup.sem.set_working_distance(rec["wd_m"])
                self.setup.sem.set_stig(*rec["stig"])
            return True
        return ev.key in st.done and not isinstance(ev, Configure)

    def _do(self, ev) -> None:
        if self._skip(ev):
            return
        while True:
            self._checkpoint()
            try:
                for sus in self.suspenders:
                    if sus.applies(ev):
                        msg = sus.check()
                        if msg:
                            self._suspend(sus, msg)
                self._report_step(ev)
                self._execute(ev)
                self._consecutive = 0
                return
            except SuspendCondition as e:
                self._suspend(next(s for s in self.suspenders if s.name == e.suspender), str(e))
            except LimitViolation as e:
                self.incident("error", "limit_violation", f"{_label(ev)}: {e}", {"event": ev.key})
                self._operator_pause(f"safety window: {e}")
            except InterlockError as e:
                sus = next((s for s in self.suspenders if s.name == "ion_interlock"), None)
                msg = _try_check(sus)
                if msg:
                    self.incident("warning", "interlock", f"{_label(ev)}: {e}", {"event": ev.key})
                    self._suspend(sus, msg)
                else:
                    self._failed(ev, e)
            except DeviceError as e:
                self._failed(ev, e)

    def _execute(self, ev) -> None:
        setup = self.setup
        if isinstance(ev, Configure):
            setup.sem.set_eht(ev.eht_kv * 1e3)
            setup.sem.set_probe_current(ev.probe_current_na * 1e-9)
            if ev.wd_mm is not None:
                setup.sem.set_working_distance(ev.wd_mm * 1e-3)
            self.ensure_ion_beam_safe()
            awg = setup.waveform_generator
            if awg is not None and awg.outputs_on():      # a raster left running by a crash
                awg.set_outputs(False)
            self.imaging_z = setup.stage.position().z if not setup.guard.near_mill_position(
                setup.stage.position()) else 0.0
        elif isinstance(ev, MoveStage):
            move_stage(self, ev)
        elif isinstance(ev, AcquireTile):
            self._acquire(ev)
        elif isinstance(ev, Autofocus):
            res, wd, stig = with_retries(self, f"autofocus {ev.key}", self.plan.retries.autofocus,
                                         lambda: run_autofocus(setup, ev), role="sem")
            self.invalidate_scan()
            if not res.ok:
                self.incident("warning", "autofocus_failed", f"{_label(ev)}: {res.message}; focus unchanged",
                              {"event": ev.key})
            self.journal.append("autofocus_done", key=ev.key, wd_m=wd, stig=list(stig), ok=res.ok,
                                method=ev.step.method, frames=res.frames, message=res.message)
        elif isinstance(ev, Irradiate):
            irradiate(self, ev)
        elif isinstance(ev, Mill):
            self._cycle_barrier(ev.cycle)
            run_mill(self, ev)
            self.invalidate_scan()
        elif isinstance(ev, SectionEnd):
            self._section_end(ev)
        elif isinstance(ev, CycleEnd):
            self._cycle_barrier(ev.cycle)
            self.journal.append("cycle_done", key=ev.key, cycle=ev.cycle)
            self.dispatcher.publish(CycleDone(self.run_uid, ev.cycle))

    def _acquire(self, ev: AcquireTile) -> None:
        version = self.journal.state.next_version(ev.key)
        self.journal.append("tile_started", key=ev.key, version=version, cycle=ev.cycle)
        doc = acquire_tile(self, ev, version)
        self._tiles += 1
        qc = dict(doc.qc)

        def acked(files: dict, errors: dict) -> None:
            if errors:
                self.incident("error", "writer_failed", f"tile {ev.tile_id} v{version} not written: {errors}",
                              {"tile_id": ev.tile_id, "version": version})
                return
            paths = [p for ps in files.values() for p in ps]
            self.journal.append("tile_done", key=ev.key, version=version, cycle=ev.cycle, files=paths, qc=qc)
        self.dispatcher.publish(doc, ack=acked)

    def _cycle_barrier(self, cycle: int) -> None:
        """Every tile of the cycle durably written before the surface changes;
        tiles whose writing failed are acquired again first."""
        self.dispatcher.wait_idle(writers_only=True)
        self._flush_pending()
        st = self.journal.state
        missing = [t for t in self._cycle_tiles.get(cycle, []) if t.key not in st.tiles_done
                   and t.section not in self._xstate.exhausted]
        for t in missing:
            move_stage(self, MoveStage(f"move:{t.key}", cycle, t.center_um[0], t.center_um[1], t.key))
            self._acquire(t)
        if missing:
            self.dispatcher.wait_idle(writers_only=True)
            self._flush_pending()
            still = [t.tile_id for t in missing if t.key not in st.tiles_done]
            if still:
                raise StepFailed(f"writing the tiles of cycle {cycle}", DeviceError(f"not written: {still}"), 2)

    def _section_end(self, ev: SectionEnd) -> None:
        self.dispatcher.publish(SectionDone(self.run_uid, ev.cycle, ev.section, list(ev.tile_ids)))
        rule = self.plan.cycles
        if not isinstance(rule, int) and rule.section_exhausted and ev.tile_ids:
            self.dispatcher.wait_idle(writers_only=True)
            qc = self.journal.state.tile_qc
            flat = [qc[t]["flat_fraction"] for t in ev.tile_ids if "flat_fraction" in qc.get(t, {})]
            if flat and sum(flat) / len(flat) >= rule.exhausted_fraction:
                self._xstate.exhausted.add(ev.section)
                self.journal.append("exhausted", section=ev.section, cycle=ev.cycle)
                self.incident("info", "section_exhausted", f"section {ev.section} milled through in cycle "
                              f"{ev.cycle} ({100 * sum(flat) / len(flat):.0f} % without tissue): no longer imaged",
                              {"section": ev.section, "cycle": ev.cycle})
        self.journal.append("section_done", key=ev.key, cycle=ev.cycle, section=ev.section)


def _same_plan(out_dir: Path, plan: Plan) -> None:
    """A resumed run must acquire what the journal's run planned."""
    path = out_dir / PLAN_COPY
    if not path.exists():
        return
    old, new = json.loads(path.read_text()), dump_plan(plan)
    changed = [k for k in _DEFINING if old.get(k) != new.get(k)]
    if changed:
        raise ConfigError(f"--resume {out_dir}: the plan's {', '.join(changed)} differ from the run being resumed "
                          f"({path}); resume with the same plan")


def _try_check(sus: Optional[Suspender]) -> Optional[str]:
    if sus is None:
        return None
    try:
        return sus.check()
    except DeviceError:
        return None


def _du(folder: Path) -> tuple[int, int]:
    n = size = 0
    for root, _dirs, files in os.walk(folder):
        for f in files:
            try:
                size += os.path.getsize(os.path.join(root, f))
                n += 1
            except OSError:
                pass
    return n, size
