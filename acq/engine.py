"""The acquisition engine: executes a plan's events against the devices and
publishes the document stream (acq/documents.py).

Lifecycle: acq/runner.py (the Runner beside the engine) owns the worker
thread, the states, pause/resume/abort at checkpoints (between events, never
mid-frame or mid-mill), the suspenders and the failure policy. The engine
executes each event with the handler its table holds for the event's class
(``Engine._handlers``; ``add_step`` adds one); a handler gets the run's
StepContext (acq/step_context.py) and the event.

Durability: acq/journal.py. A tile is journaled done once its frame is on
disk (the primary writer, OME-TIFF) and every derived writer has returned;
a derived writer's failure is reported, never a reason to image again, and a
failed primary write is retried from the frame in memory. Before a mill
every tile of the cycle must be done. Dose: acq/dose_budget.py caps the
scans per tile and cycle. One process per OUTDIR (acq/outdir_lock.py); a
resume must match the run's fingerprint (acq/fingerprint.py).
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

from acq import fingerprint
from acq.autofocus_step import run_autofocus
from acq.device_ops import StepFailed, with_retries
from acq.documents import (CatchUp, CycleDone, FinishReason, Incident, IncidentCause, RunStart, RunStop,
                           SectionDone, Severity)
from acq.dose_budget import ExposureBook, autofocus_area, budget_for
from acq.section_focus import SectionFocus
from acq.events import AcquireTile, Autofocus, Configure, CycleEnd, Irradiate, Mill, MoveStage, PlanEvent, SectionEnd
from acq.expand import EXHAUSTED_CYCLES, ExpansionState, check_plan, expand
from acq.journal import Journal, JournalBroken
from acq.outdir_lock import OutdirLock
from acq.plan import OVERVIEW_SECTION, Plan, Retries, dump_plan
from acq.qc import ImageInspector
from acq.run_folder import PLAN_COPY, disk_usage, holds_nothing, run_started, same_plan
from acq.runner import Pause, PauseReason, Runner, RunState, _label, check_pause_policy
from acq.step_context import StepContext
from acq.steps_irradiation import irradiate
from acq.steps_mill import run_mill
from acq.steps_tile import acquire_tile, move_stage
from acq.stream import Dispatcher, TileAck
from acq.suspenders import SuspenderSet, default_suspenders, is_disk_error
from common.atomic import atomic_write, register_root, unregister_root
from devices.errors import DeviceError
from devices.setup_config import ConfigError

log = logging.getLogger(__name__)
SOFTWARE_VERSION = "0.1.0"


StepHandler = Callable[[StepContext, PlanEvent], None]


@dataclass
class RunResult:
    status: FinishReason
    reason: str
    run_uid: str
    tiles: int                  # acquired in this run
    tiles_done: int             # done in the journal (all runs)
    incidents: int
    files: int
    bytes: int


class Engine:
    """Run ``plan`` on ``setup``, writing into ``out_dir``.

    subscribers: callables fed every document, each from its own thread
    writers:     acq.stream.Writer objects; a tile is done once all of them returned
    resume:      continue the run journaled in ``out_dir``
    accept_interrupted_mill: count a mill cut short by a crash (beam on) as done
    accept_change: fingerprint parts a resume may change (acq/fingerprint.py OVERRIDABLE)
    max_exposures: exposure budget per tile and cycle for this run (default: plan/setup)
    on_pause:    "wait" (GUI: wait for resume()/abort()) or "stop" (command line:
                 end the run, to be continued with resume=True)
    retries:     a Retries policy replacing the plan's
    expansion:   (plan, setup, start_cycle, ExpansionState) -> events; acq.expand.expand,
                 or a wrapper adding the events of a new step
    API: start(), pause(), resume(), abort(), stop_now(why), wait(), run(), state,
    on_state_change(fn), on_pause(fn), on_step(fn), after_step(fn), subscribe(fn),
    add_writer(w), add_step(event_type, handler), incidents, result (RunResult).
    The lifecycle calls go to ``self.runner`` (acq/runner.py).
    """

    def __init__(self, setup, plan: Plan, out_dir: str | Path, subscribers: Iterable[Callable] = (),
                 writers: Iterable = (), *, resume: bool = False, accept_interrupted_mill: bool = False,
                 on_pause: str = "wait", queue_maxsize: Optional[int] = None,
                 suspenders: Optional[SuspenderSet] = None, retries: Optional[Retries] = None,
                 accept_change: Iterable[str] = (), max_exposures: Optional[int] = None,
                 expansion: Callable = expand):
        check_pause_policy(on_pause)                     # before the OUTDIR lock is taken
        if retries is not None:                          # the caller's retry policy replaces the plan's
            plan = plan.model_copy(update={"retries": retries})
        self.setup, self.plan, self.clock = setup, plan, setup.clock
        self.out_dir = Path(out_dir)
        self.sections = check_plan(plan, setup)          # ConfigError before anything is written
        self.journal = Journal(self.out_dir)
        if resume and not self.out_dir.is_dir():
            raise ConfigError(f"--resume {self.out_dir}: no such folder, nothing to resume")
        self.fingerprint = fingerprint.compute(plan, setup, self.sections)
        self._outdir_lock = OutdirLock(self.out_dir).acquire()       # refuses a folder another process runs in
        register_root(self.out_dir)                                   # never recreated if it vanishes
        try:                                     # checked under the lock: no other process changes them now
            started = run_started(self.out_dir)
            if not resume and started:
                raise ConfigError(f"{self.out_dir} already holds a run (journal.jsonl); continue it with --resume")
            if resume and not started:
                if not holds_nothing(self.out_dir):
                    raise ConfigError(f"--resume {self.out_dir}: no journal.jsonl there, nothing to resume")
                resume = False                   # cut before its first file: nothing to continue, start it
            self._accepted: dict = {}
            if resume:
                accepted = fingerprint.check_resume(self.out_dir, self.fingerprint, set(accept_change))
                if accepted is None:             # a run from before fingerprint.json: its plan.json decides
                    same_plan(self.out_dir, plan)
                self._accepted = accepted or {}
            self.budget = max_exposures if max_exposures is not None else budget_for(plan, setup.config)
            self.exposures = ExposureBook(self.journal, self.budget)
        except BaseException:
            self._release()
            raise
        self.resume_run, self.accept_interrupted_mill = resume, accept_interrupted_mill
        self._expansion = expansion
        self.dispatcher = Dispatcher(queue_maxsize or plan.output.queue_maxsize)
        for fn in subscribers:
            self.dispatcher.add_subscriber(fn)
        for w in writers:
            self.dispatcher.add_writer(w)
        self._journal_inode: Optional[int] = None
        self._failed_dirs: set[Path] = set()         # folders a write failed in: probed until they take data
        max_tile_bytes = max((int(t[3][0]) * int(t[3][1]) for t in self.fingerprint["tiles"]), default=0)
        self.suspenders = suspenders if suspenders is not None else default_suspenders(
            setup, plan, self.out_dir, max_tile_bytes,
            lambda: (self.journal.path, self._journal_inode), lambda: self._failed_dirs)
        self.run_uid = uuid.uuid4().hex
        self.incidents: list[Incident] = []
        self.result: Optional[RunResult] = None
        self.runner = Runner(self, self.suspenders, on_pause)
        rule = plan.cycles
        self.ctx = StepContext(
            setup, plan, self.journal, self.exposures, self.run_uid, self.incident, lambda: self.runner.urgent,
            qc_inspector=ImageInspector(plan.qc.checks) if plan.qc.enabled else None,
            flat_cv=rule.exhausted_flat_cv if not isinstance(rule, int) and rule.section_exhausted else None,
            texture=plan.autofocus.method != "none" and plan.autofocus.locations == "auto")
        self._handlers: dict[type, StepHandler] = {     # the handler table: event class -> step
            Configure: self._configure, MoveStage: move_stage, AcquireTile: self._acquire,
            Autofocus: self._autofocus, Irradiate: irradiate, Mill: self._mill,
            SectionEnd: self._section_end, CycleEnd: self._cycle_end}
        self._tiles = 0
        self._pending: list[Incident] = []            # raised in writer threads, published by the engine
        self._pending_lock = threading.Lock()
        self._cycle_tiles: dict[int, list[AcquireTile]] = {}
        self._xstate = ExpansionState()
        self.focus = SectionFocus(setup.sem, plan.autofocus, lambda: self.journal.state)
        self._texture: dict[str, float] = {}         # tile key -> texture score, this run
        self._unwritten: list[tuple[AcquireTile, TileAck]] = []     # frames in memory a primary writer failed on
        self._unjournaled: list[tuple[str, dict]] = []              # records the disk refused, to append again
        self._write_tries: dict[str, int] = {}

    def _release(self) -> None:
        unregister_root(self.out_dir)
        self._outdir_lock.release()

    def close_unstarted(self) -> None:
        """Give up an engine that will not run (releases OUTDIR's lock)."""
        if self.runner.thread is None:
            self._release()

    # ------------------------------------------------------------ lifecycle (acq/runner.py)
    @property
    def state(self) -> RunState:
        return self.runner.state

    @property
    def alive(self) -> bool:
        return self.runner.alive

    @property
    def urgent_stop(self) -> Optional[str]:
        return self.runner.urgent

    def start(self) -> None:
        self.runner.start()

    def pause(self) -> None:
        self.runner.pause()

    def resume(self) -> None:
        self.runner.resume()

    def abort(self) -> None:
        self.runner.abort()

    def stop_now(self, why: str) -> None:
        """Stop as soon as it is safe (a signal): a mill or an irradiation under
        way blanks its beam within a second and the run stops there, resumable."""
        self.runner.stop_now(why)

    def wait(self, timeout: Optional[float] = None) -> Optional[RunResult]:
        self.runner.join(timeout)
        return self.result

    def run(self) -> RunResult:
        """Start and wait (blocking convenience)."""
        self.start()
        self.wait()
        return self.result

    def on_state_change(self, fn: Callable[[RunState, str], None]) -> None:
        self.runner.on_state_change(fn)

    def on_pause(self, fn: Callable[[Pause], None]) -> None:
        self.runner.on_pause(fn)

    def on_step(self, fn: Callable[[PlanEvent], None]) -> None:
        self.runner.on_step(fn)

    def after_step(self, fn: Callable[[PlanEvent, float], None]) -> None:
        self.runner.after_step(fn)

    def add_writer(self, writer) -> None:
        """A Writer (acq/stream.py) whose acknowledgement a tile needs to count as done."""
        self.dispatcher.add_writer(writer)

    def subscribe(self, fn: Callable) -> None:
        self.dispatcher.add_subscriber(fn)

    def add_step(self, event_type: type, handler: StepHandler) -> None:
        """Run ``handler(ctx, event)`` for events of ``event_type`` (a new plan
        step: its events come from the expansion; see docs/architecture.md)."""
        self._handlers[event_type] = handler

    # ------------------------------------------------------------ RunBody (acq/runner.py)
    def incident(self, severity: str, cause: str, message: str, context: Optional[dict] = None) -> None:
        inc = Incident(self.run_uid, severity, cause, message, dict(context or {}))
        log.log({Severity.INFO: logging.INFO, Severity.WARNING: logging.WARNING}.get(inc.severity, logging.ERROR),
                "%s: %s", inc.cause, message)
        if threading.current_thread() is self.runner.thread:
            self._publish_incident(inc)
        else:
            with self._pending_lock:
                self._pending.append(inc)

    def devices_reconnected(self, role: Optional[str]) -> None:
        self.ctx.devices_reconnected(role)

    def grant_exposure(self, key: str) -> None:
        self.exposures.grant(key)

    def make_safe(self) -> None:
        """Paused or stopped: no beam on the specimen."""
        # each beam on its own: the device that fails (often the one that caused the pause)
        # must not keep the others on; the first error is raised once all were tried
        errors = []

        def attempt(fn) -> None:
            try:
                fn()
            except Exception as e:
                errors.append(e)
        attempt(lambda: self.setup.sem.set_blanked(True))
        if getattr(self.setup, "electron_source", None) is not None:
            attempt(self.setup.electron_source.beam_off)
        if self.setup.ion_gun is not None:
            self.ctx.ion_beam_safe = False
            attempt(self.ctx.ensure_ion_beam_safe)
        if errors:
            raise errors[0]

    # ------------------------------------------------------------ incidents and held writes
    def _publish_incident(self, inc: Incident) -> None:
        self.incidents.append(inc)
        rec = dict(severity=inc.severity, cause=inc.cause, message=inc.message)
        try:
            self.journal.append("incident", **rec)
        except OSError as e:        # the disk is the incident, often: report it anyway, journal it later
            log.error("incident not journaled (%s): %s", e, inc.message)
            with self._pending_lock:
                self._unjournaled.append(("incident", rec))
        self.dispatcher.publish(inc)

    def flush_pending(self, wait: bool = True) -> None:
        """Publish what writer threads raised; write again what they could not."""
        with self._pending_lock:
            pending, self._pending = self._pending, []
        for inc in pending:
            self._publish_incident(inc)
        self._rewrite_unwritten(wait)

    def _rewrite_unwritten(self, wait: bool = True) -> None:
        """Frames a primary writer failed on are written again from memory;
        records the disk refused are journaled again. No new scan. With
        ``wait=False`` (the end of a run) one try each, no suspension."""
        rounds = 0
        while True:
            with self._pending_lock:
                items, self._unwritten = self._unwritten, []
                records, self._unjournaled = self._unjournaled, []
            if not items and not records:
                return
            rounds += 1
            try:
                self._journal_again(records, wait, rounds)
                self._write_again(items, wait)
            finally:                             # an Abort or a stop mid-way: nothing held is dropped
                with self._pending_lock:
                    self._unjournaled[:0] = [r for r in records if r is not None]
                    self._unwritten[:0] = [it for it in items if it is not None]
            if not wait:
                return
            self.dispatcher.wait_idle(writers_only=True)

    def _journal_again(self, records: list, wait: bool, rounds: int) -> None:
        for i, item in enumerate(records):
            try:
                self.journal.append(item[0], **item[1])
            except OSError as e:
                if not wait or not is_disk_error(e):
                    raise
                if rounds > self.plan.retries.acquire:
                    self.runner.operator_pause(Pause(PauseReason.WRITE_FAILED, f"the journal cannot be written "
                                                     f"({e}); records are kept in memory while paused: resume "
                                                     "to try again"))
                else:
                    self.runner.wait_for_output(f"journal not written: {e}")
                if isinstance(e, JournalBroken):         # a write and its undo failed: reopen (cuts the torn tail)
                    self.journal.open()
                return
            records[i] = None

    def _write_again(self, items: list, wait: bool) -> None:
        for i, (ev, ack) in enumerate(items):
            if wait:
                err = ack.primary_error
                tries = self._write_tries[ev.key] = self._write_tries.get(ev.key, 0) + 1
                if tries > self.plan.retries.acquire:        # also a disk error the suspender cannot see
                    self._write_tries[ev.key] = 0
                    self.runner.operator_pause(Pause(
                        PauseReason.WRITE_FAILED, f"tile {ev.tile_id} v{ack.doc.version} could not be written "
                        f"({type(err).__name__}: {err}); the frame is kept in memory while paused: resume to try "
                        "writing it again", {"tile_id": ev.tile_id}))
                elif is_disk_error(err):
                    where = getattr(err, "filename", None)
                    folder = Path(where).parent if where else None
                    if folder is not None and self.out_dir.absolute() in folder.absolute().parents:
                        self._failed_dirs.add(folder)
                    self.runner.wait_for_output(f"tile {ev.tile_id} v{ack.doc.version} not written: {err}")
                else:
                    self.clock.sleep(self.plan.retries.backoff_s)
            items[i] = None
            self._publish_tile(ev, ack.doc, again=True)

    def open(self) -> Iterable[PlanEvent]:
        """Prepare the output and the journal; the events still to run."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # a crash may have cut the first run before any of these: each is written once
        if not (self.out_dir / fingerprint.FINGERPRINT).exists():
            fingerprint.write_new(self.out_dir, self.fingerprint)
        if not (self.out_dir / PLAN_COPY).exists():
            atomic_write(self.out_dir / PLAN_COPY, json.dumps(dump_plan(self.plan), indent=1).encode())
        st = self.journal.open()
        self._journal_inode = os.stat(self.journal.path).st_ino
        self._xstate.exhausted = set(st.exhausted)
        self._xstate.focus = st.section_focus
        self._start_cycle = st.first_open_cycle() if self.resume_run else 0
        self.journal.append("run_start", run_uid=self.run_uid, resumed=self.resume_run,
                            plan_source=str(self.plan.source), accepted_changes=sorted(self._accepted),
                            max_exposures=self.budget)
        fingerprint.record_changes(self.out_dir, self._accepted)
        self.dispatcher.start()
        self.dispatcher.publish(RunStart(self.run_uid, dump_plan(self.plan),
                                         self.setup.config.model_dump(mode="json"), SOFTWARE_VERSION,
                                         str(self.out_dir), resumed=self.resume_run))
        if self.plan.mill is not None:
            self._interrupted_mills(st)
        return self._expansion(self.plan, self.setup, self._start_cycle, self._xstate)

    def _interrupted_mills(self, st) -> None:
        for key in list(st.mill_started):
            status, done = st.mill_status(key)
            if status != "unknown":
                continue
            cycle = int(key.split(":c")[1])
            self.incident(Severity.ERROR, IncidentCause.MILL_INTERRUPTED,
                          f"mill of cycle {cycle} interrupted after unknown time (at least {done:.1f} s of "
                          f"{self.plan.mill.duration_s:g} s): the program stopped with the ion beam on",
                          {"cycle": cycle, "known_s": done})
            if not (self.accept_interrupted_mill or self.plan.mill.on_interrupted == "skip"):
                self.runner.operator_pause(Pause(
                    PauseReason.MILL_INTERRUPTED, f"mill of cycle {cycle} was interrupted after unknown time; "
                    "check the sections, then accept it (--accept-interrupted-mill) to go on without milling it "
                    "again", {"cycle": cycle, "known_s": done}))
            self.journal.append("mill_done", key=key, cycle=cycle, seconds=done, interrupted=True, accepted=True)
            self.incident(Severity.WARNING, IncidentCause.MILL_ACCEPTED, f"interrupted mill of cycle {cycle} counted as done; "
                          "it is not repeated", {"cycle": cycle})

    def finish(self, status: FinishReason, reason: str) -> RunResult:
        """Blank the beams, let the writers finish, journal the stop; the final state."""
        try:
            self.make_safe()
        except Exception as e:
            log.error("making the setup safe at the end failed: %s", e)
        try:
            self.dispatcher.wait_idle()
            self.flush_pending(wait=False)      # one last try, no waiting: the run is ending
            held = len(self._unwritten)
            if held:
                reason = (f"{reason}; " if reason else "") + (f"{held} frame(s) could not be written and are "
                                                              "lost; those tiles are imaged again on resume")
                status = FinishReason.FAILED if status is FinishReason.SUCCESS else status
            self.journal.append("run_stop", status=status, reason=reason)
            self.dispatcher.publish(RunStop(self.run_uid, status, reason, tiles=self._tiles,
                                            incidents=len(self.incidents)))
        except Exception as e:                   # e.g. the journal's disk is gone: still report the result
            log.error("closing the run failed: %s", e)
            status, reason = FinishReason.FAILED, reason or f"closing the run failed: {e}"
        finally:
            try:
                self.dispatcher.close()
                self.journal.close()
            except Exception as e:
                log.error("closing the writers or the journal failed: %s", e)
            finally:
                self._release()
                tiles_done = self.journal.state.tiles_done_total
                files, size = disk_usage(self.out_dir)
                self.result = RunResult(status, reason, self.run_uid, self._tiles, tiles_done,
                                        len(self.incidents), files, size)
        return self.result

    # ------------------------------------------------------------ events
    def skip(self, ev: PlanEvent) -> bool:
        st = self.journal.state
        if isinstance(ev, AcquireTile):
            self._cycle_tiles.setdefault(ev.cycle, []).append(ev)
            return ev.key in st.tiles_done or self._adopt(ev)
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

    def _adopt(self, ev: AcquireTile) -> bool:
        """A tile started before a crash whose OME-TIFF made it to disk (under
        its final name, so whole) is done: journal it instead of scanning again."""
        st = self.journal.state
        version = st.tiles_started.get(ev.key)
        if version is None or "ome_tiff" not in self.plan.output.writers:
            return False
        from acq.writers import tile_on_disk
        path = tile_on_disk(self.out_dir, ev.section, ev.cycle, ev.tile_id, version)
        if path is None:
            return False
        self.journal.append("tile_done", key=ev.key, version=version, cycle=ev.cycle,
                            files=[path.relative_to(self.out_dir).as_posix()], qc={}, adopted=True)
        self.incident(Severity.INFO, IncidentCause.TILE_ADOPTED, f"tile {ev.tile_id} v{version} was on disk before the restart: "
                      "counted as done, not imaged again", {"tile_id": ev.tile_id, "version": version})
        self.dispatcher.publish(CatchUp(section_id=ev.section, cycle=ev.cycle))
        return True

    def execute(self, ev: PlanEvent) -> None:
        handler = self._handlers.get(type(ev))
        if handler is None:
            raise TypeError(f"no step handler for {type(ev).__qualname__} events (Engine.add_step)")
        handler(self.ctx, ev)

    # ------------------------------------------------------------ the built-in steps
    def _configure(self, ctx: StepContext, ev: Configure) -> None:
        setup = self.setup
        setup.sem.set_eht(ev.eht_kv * 1e3)
        setup.sem.set_probe_current(ev.probe_current_na * 1e-9)
        if ev.wd_mm is not None:
            setup.sem.set_working_distance(ev.wd_mm * 1e-3)
        ctx.ensure_ion_beam_safe()
        awg = setup.waveform_generator
        if awg is not None and awg.outputs_on():      # a raster left running by a crash
            awg.set_outputs(False)
        ctx.imaging_z = setup.stage.position().z if not setup.guard.near_mill_position(
            setup.stage.position()) else 0.0

    def _autofocus(self, ctx: StepContext, ev: Autofocus) -> None:
        self.focus.before_autofocus(ev)
        res, wd, stig = with_retries(ctx, f"autofocus {ev.key}", self.plan.retries.autofocus,
                                     lambda: run_autofocus(self.setup, ev), role="sem")
        ctx.invalidate_scan()
        if not res.ok:
            self.incident(Severity.WARNING, IncidentCause.AUTOFOCUS_FAILED,
                          f"{_label(ev)}: {res.message}; focus unchanged", {"event": ev.key})
        self.journal.append("autofocus_done", key=ev.key, cycle=ev.cycle, wd_m=wd, stig=list(stig), ok=res.ok,
                            method=ev.step.method, frames=res.frames, message=res.message, **autofocus_area(ev))

    def _mill(self, ctx: StepContext, ev: Mill) -> None:
        self._cycle_barrier(ev.cycle)
        run_mill(ctx, ev)
        ctx.invalidate_scan()

    def _cycle_end(self, ctx: StepContext, ev: CycleEnd) -> None:
        self._cycle_barrier(ev.cycle)
        self.journal.append("cycle_done", key=ev.key, cycle=ev.cycle)
        self.dispatcher.publish(CycleDone(self.run_uid, ev.cycle))

    def _acquire(self, ctx: StepContext, ev: AcquireTile) -> None:
        self.exposures.check(ev)                 # before tile_started: a refused scan is no exposure
        self.focus.before_tile(ev)               # likewise a focus the guard refuses
        version = self.journal.state.next_version(ev.key)
        self.journal.append("tile_started", key=ev.key, version=version, cycle=ev.cycle)
        doc = acquire_tile(ctx, ev, version)
        if "texture" in doc.qc:
            self._texture[ev.key] = doc.qc["texture"]
        self._tiles += 1
        self._publish_tile(ev, doc)

    def _publish_tile(self, ev: AcquireTile, doc, again: bool = False) -> None:
        version, qc = doc.version, dict(doc.qc)

        def acked(ack: TileAck) -> None:        # in a writer thread
            if not ack.written:
                self.incident(Severity.ERROR, IncidentCause.WRITER_FAILED, f"tile {ev.tile_id} v{version} not written: "
                              f"{ack.errors}; writing it again from memory (no new exposure)",
                              {"tile_id": ev.tile_id, "version": version})
                with self._pending_lock:
                    self._unwritten.append((ev, ack))
                return
            if ack.errors:
                self.incident(Severity.ERROR, IncidentCause.WRITER_FAILED, f"tile {ev.tile_id} v{version} is on disk, but "
                              f"{', '.join(sorted(ack.errors))} failed: {ack.errors}; rebuilt from disk later, "
                              "never imaged again for it", {"tile_id": ev.tile_id, "version": version,
                                                            "writers": sorted(ack.errors)})
            rec = dict(key=ev.key, version=version, cycle=ev.cycle,
                       files=[p for ps in ack.files.values() for p in ps], qc=qc)
            try:
                self.journal.append("tile_done", **rec)
            except OSError as e:                 # e.g. disk full: journaled again after the suspension
                self.incident(Severity.ERROR, IncidentCause.JOURNAL_FAILED, f"tile {ev.tile_id} v{version} written but not "
                              f"journaled: {e}", {"tile_id": ev.tile_id})
                with self._pending_lock:
                    self._unjournaled.append(("tile_done", rec))
        self.dispatcher.publish(doc, ack=acked, writers_only=again)

    def _cycle_barrier(self, cycle: int) -> None:
        """Every tile of the cycle durably written before the surface changes;
        tiles whose writing failed are acquired again first."""
        self.dispatcher.wait_idle(writers_only=True)
        self.flush_pending()                    # frames in memory are written again first: no new scan
        st = self.journal.state
        missing = [t for t in self._cycle_tiles.get(cycle, []) if t.key not in st.tiles_done
                   and t.section not in self._xstate.exhausted]
        for t in missing:
            move_stage(self.ctx, MoveStage(f"move:{t.key}", cycle, t.center_um[0], t.center_um[1], t.key))
            self._acquire(self.ctx, t)
        if missing:
            self.dispatcher.wait_idle(writers_only=True)
            self.flush_pending()
            still = [t.tile_id for t in missing if t.key not in st.tiles_done]
            if still:
                raise StepFailed(f"writing the tiles of cycle {cycle}", DeviceError(f"not written: {still}"), 2)

    def _section_end(self, ctx: StepContext, ev: SectionEnd) -> None:
        self.dispatcher.publish(SectionDone(self.run_uid, ev.cycle, ev.section, list(ev.tile_ids)))
        rule = self.plan.cycles
        if not isinstance(rule, int) and rule.section_exhausted and ev.tile_ids:
            self.dispatcher.wait_idle(writers_only=True)
            qc = self.journal.state.tile_qc
            flat = [qc[t]["flat_fraction"] for t in ev.tile_ids if "flat_fraction" in qc.get(t, {})]
            seen = self._xstate.seen_flat(ev.section, ev.cycle,
                                          bool(flat) and sum(flat) / len(flat) >= rule.exhausted_fraction)
            if len(seen) >= EXHAUSTED_CYCLES:
                self._xstate.exhausted.add(ev.section)
                self.journal.append("exhausted", section=ev.section, cycle=ev.cycle)
                self.incident(Severity.INFO, IncidentCause.SECTION_EXHAUSTED, f"section {ev.section} milled through "
                              f"(cycles {', '.join(map(str, seen))}; {100 * sum(flat) / len(flat):.0f} % without "
                              f"tissue now): no longer imaged", {"section": ev.section, "cycle": ev.cycle})
        self.journal.append("section_done", key=ev.key, cycle=ev.cycle, section=ev.section,
                            **self._section_focus(ev))

    def _section_focus(self, ev: SectionEnd) -> dict:
        """What the section's focus memory keeps (acq/section_focus.py)."""
        if ev.section == OVERVIEW_SECTION or self.plan.autofocus.method == "none":
            return {}
        tiles = [t for t in self._cycle_tiles.get(ev.cycle, []) if t.section == ev.section]
        out = self.focus.fields(ev.cycle, ev.section, tiles, self._texture)
        for t in tiles:                      # kept only until the section's next spots are chosen
            self._texture.pop(t.key, None)
        return out


