"""The run's lifecycle, beside the engine that executes the events.

The runner owns the worker thread, the state machine, operator pause/resume/
abort at checkpoints, the suspenders and the failure policy; the engine
(acq/engine.py) owns the devices, the journal and the documents, and tells
the runner what to run through the ``RunBody`` protocol below.

States and their legal transitions (``TRANSITIONS``)::

    idle --start--> running <--> paused          (operator, suspender, failure)
    running|paused --end of the events, abort, failure--> stopping
    stopping --> idle (success, aborted) | error (failed)

A pause always blanks the beams first and says why with a ``Pause``: a
``PauseReason`` plus structured data (the GUI chooses its advice from the
reason, never from the text).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Callable, Iterable, Optional, Protocol

from acq.device_ops import reconnect, role_of
from acq.documents import FinishReason, IncidentCause, Severity
from acq.dose_budget import DoseBudgetReached
from acq.mill_approach import MillApproachFailed
from acq.suspenders import EHT_ADVICE, Suspender, SuspenderSet, is_disk_error
from devices.errors import DeviceError, InterlockError, LimitViolation
from devices.interfaces import BeamOff

if TYPE_CHECKING:
    from acq.engine import RunResult
    from acq.events import PlanEvent

log = logging.getLogger(__name__)


class RunState(StrEnum):
    IDLE = "idle"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    ERROR = "error"


TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    RunState.IDLE: frozenset({RunState.RUNNING}),
    RunState.RUNNING: frozenset({RunState.RUNNING, RunState.PAUSED, RunState.STOPPING}),
    RunState.PAUSED: frozenset({RunState.PAUSED, RunState.RUNNING, RunState.STOPPING}),
    RunState.STOPPING: frozenset({RunState.IDLE, RunState.ERROR}),
    RunState.ERROR: frozenset(),
}


class PauseReason(StrEnum):
    OPERATOR = "operator"                    # Pause pressed
    SUSPENDED = "suspended"                  # a suspender's condition (data: suspender); resumes by itself
    SAFETY_WINDOW = "safety_window"          # a setpoint outside the setup's windows
    DEVICE_FAILURES = "device_failures"      # N consecutive failures (data: consecutive, event)
    DOSE_BUDGET = "dose_budget"              # a tile's exposure budget spent (data: tile_id, exposures, budget)
    MILL_INTERRUPTED = "mill_interrupted"    # a mill cut short with the beam on, time unknown (data: cycle)
    WRITE_FAILED = "write_failed"            # a frame or journal record the disk keeps refusing
    OUTPUT = "output"                        # the output cannot take data and nothing watches it
    EHT_OFF = "eht_off"                      # the SEM's gun is off (data: suspender or event); resumes by itself
                                             # once the operator has switched it on
    STAGE_CHECK = "stage_check"              # a mill approach/return step failed: the stage may be tilted at the
                                             # mill position; nothing moves it until the operator has looked


@dataclass(frozen=True)
class Pause:
    reason: PauseReason
    message: str                             # for the operator, as shown
    data: dict = field(default_factory=dict)


def check_pause_policy(policy: str) -> None:
    if policy not in ("wait", "stop"):
        raise ValueError(f"on_pause = {policy!r}: allowed 'wait', 'stop'")


class Abort(Exception):
    """The operator aborted; raised at a checkpoint."""


class OperatorStop(Exception):
    """A pause needing the operator, in a run that cannot wait (command line)."""

    def __init__(self, pause: Pause):
        super().__init__(pause.message)
        self.pause = pause


class RunBody(Protocol):
    """What the runner drives: acq/engine.py's Engine."""
    plan: object
    clock: object
    setup: object
    out_dir: object                          # named in the resume hint of a stopped run

    def open(self) -> Iterable["PlanEvent"]:
        """Prepare the run (journal, files, writers); the events to run."""

    def skip(self, ev: "PlanEvent") -> bool:
        """True when ``ev`` is done already (resume)."""

    def execute(self, ev: "PlanEvent") -> None:
        """Run one event (the engine's handler table)."""

    def make_safe(self) -> None:
        """Blank every beam."""

    def flush_pending(self, wait: bool = True) -> None:
        """Publish what writer threads raised; write again what they could not."""

    def incident(self, severity: str, cause: str, message: str, context: Optional[dict] = None) -> None: ...

    def devices_reconnected(self, role: Optional[str]) -> None: ...

    def grant_exposure(self, key: str) -> None:
        """The operator allowed one more exposure of a tile."""

    def finish(self, status: FinishReason, reason: str) -> "RunResult":
        """Close the run; its result (acq/engine.py RunResult)."""


class Runner:
    """Runs a RunBody's events in a worker thread under the lifecycle rules.

    pause_policy: "wait" (GUI: wait for resume()/abort()) or "stop" (command
    line: a pause needing the operator ends the run, resumable)."""

    def __init__(self, body: RunBody, suspenders: SuspenderSet, pause_policy: str = "wait"):
        check_pause_policy(pause_policy)
        self.body, self.suspenders, self.pause_policy = body, suspenders, pause_policy
        self.plan = body.plan
        self._state = RunState.IDLE
        self._state_cbs: list[Callable[[RunState, str], None]] = []
        self._pause_cbs: list[Callable[[Pause], None]] = []
        self._step_cbs: list[Callable] = []
        self._after_cbs: list[Callable] = []
        self._cv = threading.Condition()
        self._pause_req = self._abort_req = False
        self._thread: Optional[threading.Thread] = None
        self._consecutive = 0
        self.urgent: Optional[str] = None
        self.last_pause: Optional[Pause] = None

    # ------------------------------------------------------------ public API
    @property
    def state(self) -> RunState:
        return self._state

    @property
    def alive(self) -> bool:
        """The worker thread is running (a step may be using the devices)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def thread(self) -> Optional[threading.Thread]:
        return self._thread

    def on_state_change(self, fn: Callable[[RunState, str], None]) -> None:
        """fn(state, reason text), called in the worker thread."""
        self._state_cbs.append(fn)

    def on_pause(self, fn: Callable[[Pause], None]) -> None:
        """fn(pause), called in the worker thread just before the paused state."""
        self._pause_cbs.append(fn)

    def on_step(self, fn: Callable) -> None:
        """fn(event) just before each event runs (a GUI shows the move, the
        autofocus or the mill under way: documents only report results)."""
        self._step_cbs.append(fn)

    def after_step(self, fn: Callable) -> None:
        """fn(event, seconds) after each event ran to its end (timing, tracing)."""
        self._after_cbs.append(fn)

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("an engine runs once; make a new one (resume=True) to continue")
        self._thread = threading.Thread(target=self._run, name="acq-engine", daemon=True)
        self._set_state(RunState.RUNNING, "started")
        self._thread.start()

    def pause(self) -> None:
        with self._cv:
            self._pause_req = True

    def resume(self) -> None:
        with self._cv:
            self._pause_req = False
            self._cv.notify_all()

    def abort(self) -> None:
        with self._cv:
            self._abort_req = True
            self._cv.notify_all()

    def stop_now(self, why: str) -> None:
        """Stop as soon as it is safe (a signal): a mill or an irradiation
        under way ends within a second (``stop_point``)."""
        self.urgent = why
        self.abort()

    def join(self, timeout: Optional[float] = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------ states
    def _set_state(self, state: RunState, reason: str = "") -> None:
        if state == self._state and not reason:
            return
        if state not in TRANSITIONS[self._state]:
            raise RuntimeError(f"run state {self._state} -> {state} is not a legal transition")
        self._state = state
        self._report(self._state_cbs, state, reason)

    def _report(self, cbs: list, *args) -> None:
        for fn in cbs:
            _call(fn, *args)

    # ------------------------------------------------------------ the run
    def _run(self) -> None:
        body = self.body
        status, reason = FinishReason.FAILED, ""
        try:
            for ev in body.open():
                self._do(ev)
            status = FinishReason.SUCCESS
        except Abort:
            status, reason = FinishReason.ABORTED, "aborted by the operator"
            if self.urgent:
                reason = (f"{self.urgent}: stopped at a safe point, beams blanked - continue with: "
                          f"run PLAN --resume {body.out_dir}")
        except OperatorStop as e:
            reason = f"{e} - continue with: run PLAN --resume {body.out_dir}"
        except Exception as e:                   # a bug or an unhandled device state: stop safely, say why
            log.exception("engine failed")
            reason = f"{type(e).__name__}: {e}"
            try:
                body.incident(Severity.ERROR, IncidentCause.ENGINE_ERROR, reason)
            except Exception:                    # the journal may be what failed: the log has it
                log.exception("could not record the engine failure as an incident")
        self._set_state(RunState.STOPPING, reason or status.value)
        res = body.finish(status, reason)
        self._set_state(RunState.ERROR if res.status is FinishReason.FAILED else RunState.IDLE,
                        res.reason or res.status.value)

    def _do(self, ev) -> None:
        body = self.body
        if body.skip(ev):
            return
        while True:
            self.checkpoint()
            try:
                for sus in self.suspenders:
                    if sus.applies(ev):
                        msg = sus.check()
                        if msg:
                            self.suspend(sus, msg)
                self._report(self._step_cbs, ev)
                t = time.perf_counter()
                body.execute(ev)
                self._report(self._after_cbs, ev, time.perf_counter() - t)
                self._consecutive = 0
                return
            except LimitViolation as e:
                body.incident(Severity.ERROR, IncidentCause.LIMIT_VIOLATION, f"{_label(ev)}: {e}", {"event": ev.key})
                self.operator_pause(Pause(PauseReason.SAFETY_WINDOW, f"safety window: {e}", {"event": ev.key}))
            except InterlockError as e:
                sus = self.suspenders.interlock
                msg = _try_check(sus)
                if msg:
                    body.incident(Severity.WARNING, IncidentCause.INTERLOCK, f"{_label(ev)}: {e}", {"event": ev.key})
                    self.suspend(sus, msg)
                else:
                    self.failed(ev, e)
            except MillApproachFailed as e:       # never retried from where the stage stopped
                body.incident(Severity.ERROR, IncidentCause.STAGE_CHECK, f"{_label(ev)}: {e}", {"event": ev.key})
                self.operator_pause(Pause(PauseReason.STAGE_CHECK, f"stage check: {e}", {"event": ev.key}))
            except DeviceError as e:
                off = _beam_off(e)
                if off is not None:
                    self.beam_off(ev, off)
                else:
                    self.failed(ev, e)
            except DoseBudgetReached as e:
                data = {"event": ev.key, "tile_id": e.tile_id, "exposures": e.count, "budget": e.budget}
                body.incident(Severity.ERROR, IncidentCause.DOSE_BUDGET, f"{_label(ev)}: {e}", data)
                self.operator_pause(Pause(PauseReason.DOSE_BUDGET, f"exposure budget: {e}; resume to allow one "
                                          f"more exposure of {e.tile_id} (command line: --resume with "
                                          "--max-exposures N)", data))
                body.grant_exposure(e.key)       # the operator resumed: one more for that tile, journaled
            except OSError as e:
                if not is_disk_error(e):
                    raise
                self.wait_for_output(f"{_label(ev)}: output not writable: {e}")

    # ------------------------------------------------------------ checkpoints
    def checkpoint(self) -> None:
        self.body.flush_pending()
        if self._abort_req:
            raise Abort()
        if self._pause_req:
            self._wait_operator(Pause(PauseReason.OPERATOR, "paused by the operator"))

    def operator_pause(self, pause: Pause) -> None:
        """Pause for the operator (or, on the command line, end the run)."""
        if self.pause_policy == "stop":
            raise OperatorStop(pause)
        self._wait_operator(pause)

    def _safe_for_pause(self) -> None:
        """Blank the beams before waiting; a device that cannot answer now
        (often the one that failed) must not turn a pause into a crash."""
        try:
            self.body.make_safe()
        except DeviceError as e:
            self.body.incident(Severity.WARNING, IncidentCause.SAFING_UNCONFIRMED,
                               f"could not confirm the beams are blanked: {e}")

    def _enter_pause(self, pause: Pause, state_text: str) -> None:
        self.last_pause = pause
        self._report(self._pause_cbs, pause)
        self._set_state(RunState.PAUSED, state_text)

    def _wait_operator(self, pause: Pause) -> None:
        self._safe_for_pause()
        with self._cv:
            self._pause_req = True          # before the callbacks: one of them may resume at once
        self._enter_pause(pause, pause.message)
        with self._cv:
            while self._pause_req and not self._abort_req:
                self._cv.wait()
        if self._abort_req:
            raise Abort()
        self._set_state(RunState.RUNNING, "resumed")

    def wait_for_output(self, message: str) -> None:
        """The output cannot take data: suspend (beams blanked) until it can."""
        sus = self.suspenders.output
        if sus is None:
            raise OperatorStop(Pause(PauseReason.OUTPUT, message))
        self.suspend(sus, message)

    def beam_off(self, ev, err: BeamOff) -> None:
        """A grab found the SEM's gun off: the same pause as the EHT suspender's
        (not counted among consecutive device failures, no reconnect), then the
        event again."""
        body = self.body
        body.incident(Severity.ERROR, IncidentCause.EHT_OFF, f"{_label(ev)}: {err}",
                      {"event": ev.key, "error": type(err).__name__})
        msg = f"EHT is off ({err}): {EHT_ADVICE}"
        sus = self.suspenders.eht
        if sus is not None:
            self.suspend(sus, msg)
        else:                                    # no state to poll: the operator says when it is on
            self.operator_pause(Pause(PauseReason.EHT_OFF, msg, {"event": ev.key}))

    def suspend(self, sus: Suspender, message: str) -> None:
        p, body = self.plan.suspenders, self.body
        reason = PauseReason(sus.pause_reason)
        shown = f"suspended: {message}" if reason is PauseReason.SUSPENDED else message
        body.incident(Severity.WARNING, sus.suspended, f"suspended: {message}", {"suspender": sus.name})
        self._safe_for_pause()
        self._enter_pause(Pause(reason, shown, {"suspender": sus.name}), shown)
        waited = 0.0
        while True:
            if self._abort_req:
                raise Abort()
            body.clock.sleep(p.poll_s)
            waited += p.poll_s
            try:
                still = sus.check()
            except DeviceError as e:
                still = f"{message} (check failed: {e})"
            if still is None:
                body.incident(Severity.INFO, sus.resumed, f"{sus.name} clear after {waited:.0f} s; resuming")
                self._set_state(RunState.RUNNING, "suspender cleared")
                return
            if waited >= p.max_suspend_s:
                body.incident(Severity.ERROR, sus.suspended, f"{still} for {waited:.0f} s; operator needed")
                self.operator_pause(Pause(reason, f"{still} (suspended {waited:.0f} s)",
                                          {"suspender": sus.name, "waited_s": waited}))
                return

    def failed(self, ev, err: Exception) -> None:
        """An event failed after its retries: suspend and retry, or pause."""
        body = self.body
        self._consecutive += 1
        n = self.plan.suspenders.max_consecutive_failures
        body.incident(Severity.ERROR, IncidentCause.DEVICE_ERROR, f"{_label(ev)}: {err}",
                      {"event": ev.key, "consecutive": self._consecutive, "error": type(err).__name__})
        if self._consecutive >= n:
            self.operator_pause(Pause(PauseReason.DEVICE_FAILURES, f"{self._consecutive} consecutive failures, "
                                      f"last: {_label(ev)}: {err}", {"event": ev.key, "consecutive": n}))
            self._consecutive = 0
            return
        role = role_of(getattr(err, "cause", err))
        body.incident(Severity.WARNING, IncidentCause.SUSPENDED_FAILURES,
                      f"suspended after failure {self._consecutive}/{n}; reconnecting {role or 'nothing'} and "
                      f"retrying {_label(ev)}", {"event": ev.key})
        self._enter_pause(Pause(PauseReason.SUSPENDED, f"suspended: {err}", {"event": ev.key, "role": role}),
                          f"suspended: {err}")
        self._safe_for_pause()
        body.clock.sleep(self.plan.suspenders.poll_s)
        if role and reconnect(body.setup, role):
            body.devices_reconnected(role)
        self._set_state(RunState.RUNNING, "retrying")


def stop_point(ctx) -> None:
    """Inside a long step (mill, irradiation): end it now if a signal asked
    to stop (Runner.stop_now); the step's ``finally`` blanks its beam."""
    if ctx.urgent_stop:
        raise Abort()


def _beam_off(err: BaseException) -> Optional[BeamOff]:
    """The BeamOff behind ``err`` (a step's retries wrap it in StepFailed), or None."""
    while err is not None:
        if isinstance(err, BeamOff):
            return err
        err = getattr(err, "cause", None) or err.__cause__
    return None


def _label(ev) -> str:
    return f"{type(ev).__name__} {ev.key}"


def _call(fn: Callable, *args) -> None:
    try:
        fn(*args)
    except Exception:                  # an observer must never disturb the run
        log.exception("run callback failed")


def _try_check(sus: Optional[Suspender]) -> Optional[str]:
    if sus is None:
        return None
    try:
        return sus.check()
    except DeviceError:
        return None
