"""Run lifecycle shared by the engine: state machine, operator pause/resume/
abort at checkpoints, suspenders and the consecutive-failure policy.

States: idle -> running <-> paused -> stopping -> idle (or error). A pause
(operator, suspender or failure) always leaves the beams blanked first.
"""
from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Callable, Optional

from acq.device_ops import reconnect, role_of
from acq.suspenders import Suspender
from devices.errors import DeviceError

if TYPE_CHECKING:
    from acq.engine import RunResult

log = logging.getLogger(__name__)
STATES = ("idle", "running", "paused", "stopping", "error")


class Abort(Exception):
    """The operator aborted; raised at a checkpoint."""


def stop_point(ctx) -> None:
    """Inside a long step (mill, irradiation): end it now if a signal asked
    to stop (Engine.stop_now); the step's ``finally`` blanks its beam."""
    if getattr(ctx, "urgent_stop", None):
        raise Abort()


class OperatorStop(Exception):
    """A pause needing the operator, in a run that cannot wait (command line)."""


class RunLifecycle:
    """Mixin: needs ``plan``, ``clock``, ``setup``, ``incident()``,
    ``_make_safe()``, ``_flush_pending()``, ``devices_reconnected()``."""

    on_pause = "wait"

    def _init_lifecycle(self) -> None:
        self._state, self._state_cbs = "idle", []
        self._cv = threading.Condition()
        self._pause_req = self._abort_req = False
        self._thread: Optional[threading.Thread] = None
        self._consecutive = 0
        self._step_cbs: list[Callable] = []

    # ------------------------------------------------------------ public API
    @property
    def state(self) -> str:
        return self._state

    def add_writer(self, writer) -> None:
        """A Writer (acq/stream.py) whose acknowledgement a tile needs to count as done."""
        self.dispatcher.add_writer(writer)

    def subscribe(self, fn: Callable) -> None:
        self.dispatcher.add_subscriber(fn)

    def on_state_change(self, fn: Callable[[str, str], None]) -> None:
        """fn(state, reason), called in the engine thread."""
        self._state_cbs.append(fn)

    def on_step(self, fn: Callable[[object], None]) -> None:
        """fn(event) just before each event runs (a GUI shows the move, the
        autofocus or the mill under way: documents only report results).
        Called in the engine thread; an exception in it is logged, never raised."""
        self._step_cbs.append(fn)

    def _report_step(self, ev) -> None:
        for fn in self._step_cbs:
            try:
                fn(ev)
            except Exception:                  # reporting must never disturb the run
                log.exception("step callback failed")

    @property
    def alive(self) -> bool:
        """The engine thread is running (a step may be using the devices)."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("an engine runs once; make a new one (resume=True) to continue")
        self._thread = threading.Thread(target=self._run, name="acq-engine", daemon=True)
        self._set_state("running", "started")
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

    def wait(self, timeout: Optional[float] = None) -> Optional["RunResult"]:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.result

    def run(self) -> "RunResult":
        """Start and wait (blocking convenience)."""
        self.start()
        self.wait()
        return self.result

    def _set_state(self, state: str, reason: str = "") -> None:
        if state == self._state and not reason:
            return
        self._state = state
        for fn in self._state_cbs:
            try:
                fn(state, reason)
            except Exception:
                log.exception("state-change callback failed")

    # ------------------------------------------------------------ checkpoints
    def _operator_pause(self, reason: str) -> None:
        if self.on_pause == "stop":
            raise OperatorStop(reason)
        self._wait_operator(reason)

    def _safe_for_pause(self) -> None:
        """Blank the beams before waiting; a device that cannot answer now
        (often the one that failed) must not turn a pause into a crash."""
        try:
            self._make_safe()
        except DeviceError as e:
            self.incident("warning", "safing_unconfirmed", f"could not confirm the beams are blanked: {e}")

    def _wait_operator(self, reason: str) -> None:
        self._safe_for_pause()
        with self._cv:
            self._pause_req = True          # before the callbacks: one of them may resume at once
        self._set_state("paused", reason)
        with self._cv:
            while self._pause_req and not self._abort_req:
                self._cv.wait()
        if self._abort_req:
            raise Abort()
        self._set_state("running", "resumed")

    def _checkpoint(self) -> None:
        self._flush_pending()
        if self._abort_req:
            raise Abort()
        if self._pause_req:
            self._wait_operator("paused by the operator")

    def _suspend(self, sus: Suspender, message: str) -> None:
        p = self.plan.suspenders
        self.incident("warning", f"suspended_{sus.name}", f"suspended: {message}", {"suspender": sus.name})
        self._safe_for_pause()
        self._set_state("paused", f"suspended: {message}")
        waited = 0.0
        while True:
            if self._abort_req:
                raise Abort()
            self.clock.sleep(p.poll_s)
            waited += p.poll_s
            try:
                still = sus.check()
            except DeviceError as e:
                still = f"{message} (check failed: {e})"
            if still is None:
                self.incident("info", f"resumed_{sus.name}", f"{sus.name} clear after {waited:.0f} s; resuming")
                self._set_state("running", "suspender cleared")
                return
            if waited >= p.max_suspend_s:
                self.incident("error", f"suspended_{sus.name}", f"{still} for {waited:.0f} s; operator needed")
                self._operator_pause(f"{still} (suspended {waited:.0f} s)")
                return

    def _failed(self, ev, err: Exception) -> None:
        """An event failed after its retries: suspend and retry, or pause."""
        self._consecutive += 1
        n = self.plan.suspenders.max_consecutive_failures
        self.incident("error", "device_error", f"{_label(ev)}: {err}",
                      {"event": ev.key, "consecutive": self._consecutive, "error": type(err).__name__})
        if self._consecutive >= n:
            self._operator_pause(f"{self._consecutive} consecutive failures, last: {_label(ev)}: {err}")
            self._consecutive = 0
            return
        role = role_of(getattr(err, "cause", err))
        self.incident("warning", "suspended_failures", f"suspended after failure {self._consecutive}/{n}; "
                      f"reconnecting {role or 'nothing'} and retrying {_label(ev)}", {"event": ev.key})
        self._set_state("paused", f"suspended: {err}")
        self._safe_for_pause()
        self.clock.sleep(self.plan.suspenders.poll_s)
        if role and reconnect(self.setup, role):
            self.devices_reconnected(role)
        self._set_state("running", "retrying")


def _label(ev) -> str:
    return f"{type(ev).__name__} {ev.key}"
