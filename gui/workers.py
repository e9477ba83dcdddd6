"""Work off the GUI thread.

Device calls go to *lanes*: one single-thread pool per device role, so calls to
one device run in the order the operator made them and a slow stage move never
delays an SEM read-back. Computations (overview rendering, section detection,
tour optimisation) go to the shared compute pool. Results, errors and progress
come back as Qt signals, which Qt queues onto the GUI thread.
"""
from __future__ import annotations

import logging
import threading
import traceback
from typing import Any, Callable, Optional

from PyQt5.QtCore import QObject, QRunnable, QThreadPool, pyqtSignal

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """Raised inside a task when the operator cancelled it."""


class CancelToken:
    def __init__(self):
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled()


class TaskSignals(QObject):
    progress = pyqtSignal(int, int, str)       # done, total, what
    result = pyqtSignal(object)
    error = pyqtSignal(object)                 # the exception
    cancelled = pyqtSignal()
    finished = pyqtSignal()


class Task(QRunnable):
    """fn(*args, **kwargs); with ``wants_progress`` also ``progress=`` and
    ``token=`` keyword arguments."""

    def __init__(self, name: str, fn: Callable, args: tuple, kwargs: dict, wants_progress: bool):
        super().__init__()
        self.setAutoDelete(False)               # the runner keeps it until 'finished' arrived
        self.name = name
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.wants_progress = wants_progress
        self.token = CancelToken()
        self.signals = TaskSignals()

    def cancel(self) -> None:
        self.token.cancel()

    def run(self) -> None:
        sig = self.signals
        try:
            if self.token.cancelled:
                raise Cancelled()
            kw = dict(self.kwargs)
            if self.wants_progress:
                kw["progress"] = lambda done, total, text="": sig.progress.emit(int(done), int(total), str(text))
                kw["token"] = self.token
            out = self.fn(*self.args, **kw)
        except Cancelled:
            sig.cancelled.emit()
        except Exception as e:                  # shown to the operator, never swallowed
            e.gui_traceback = traceback.format_exc()
            log.debug("task %s failed: %s", self.name, e)
            sig.error.emit(e)
        else:
            sig.result.emit(out)
        finally:
            sig.finished.emit()


class TaskRunner(QObject):
    """Owns the pools and the list of tasks in flight (shown in the status bar)."""

    busy_changed = pyqtSignal(list)            # names of the tasks in flight
    failed = pyqtSignal(str, object)           # task name, exception (for tasks without on_error)

    def __init__(self, parent: Optional[QObject] = None, compute_threads: int = 2):
        super().__init__(parent)
        self._lanes: dict[str, QThreadPool] = {}
        self._compute = QThreadPool(self)
        self._compute.setMaxThreadCount(compute_threads)
        self._tasks: list[Task] = []

    def lane(self, name: str) -> QThreadPool:
        pool = self._lanes.get(name)
        if pool is None:
            pool = QThreadPool(self)
            pool.setMaxThreadCount(1)          # one call at a time, in order, per device
            pool.setExpiryTimeout(-1)
            self._lanes[name] = pool
        return pool

    def submit(self, name: str, fn: Callable, *args, lane: Optional[str] = None,
               on_result: Optional[Callable[[Any], None]] = None,
               on_error: Optional[Callable[[Exception], None]] = None,
               on_progress: Optional[Callable[[int, int, str], None]] = None,
               on_finished: Optional[Callable[[], None]] = None,
               on_cancelled: Optional[Callable[[], None]] = None,
               wants_progress: bool = False, **kwargs) -> Task:
        task = Task(name, fn, args, kwargs, wants_progress or on_progress is not None)
        s = task.signals
        if on_result:
            s.result.connect(on_result)
        if on_error:
            s.error.connect(on_error)
        else:
            s.error.connect(lambda e, n=name: self.failed.emit(n, e))
        if on_progress:
            s.progress.connect(on_progress)
        if on_cancelled:
            s.cancelled.connect(on_cancelled)
        if on_finished:
            s.finished.connect(on_finished)
        s.finished.connect(lambda t=task: self._done(t))
        self._tasks.append(task)
        self.busy_changed.emit(self.busy())
        (self.lane(lane) if lane else self._compute).start(task)
        return task

    def _done(self, task: Task) -> None:
        if task in self._tasks:
            self._tasks.remove(task)
        self.busy_changed.emit(self.busy())

    def busy(self) -> list[str]:
        return [t.name for t in self._tasks]

    def pending(self, name_prefix: str) -> bool:
        return any(t.name.startswith(name_prefix) for t in self._tasks)

    def cancel_all(self) -> None:
        for t in list(self._tasks):
            t.cancel()

    def wait_for_lanes(self, timeout_ms: int) -> None:
        """Let the device calls already queued finish (each lane up to ``timeout_ms``)."""
        for pool in list(self._lanes.values()):
            pool.waitForDone(timeout_ms)

    def shutdown(self, timeout_ms: int = 5000) -> None:
        """Cancel what can be cancelled and wait for the rest (closing the window)."""
        self.cancel_all()
        for pool in [self._compute, *self._lanes.values()]:
            pool.waitForDone(timeout_ms)
