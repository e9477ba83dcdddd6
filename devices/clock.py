"""Time source shared by drivers and the engine.

The simulator runs on a virtual clock: waiting advances simulated time (and
with it milling, drift and dose) and sleeps only ``time_factor`` × the wait,
so tests run at full speed while the physics still sees real durations.
"""
from __future__ import annotations

import threading
import time
from typing import Callable


class Clock:
    def now(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class SimClock(Clock):
    def __init__(self, time_factor: float = 0.0, start: float | None = None):
        self.time_factor = time_factor
        self._t = time.time() if start is None else start
        self._lock = threading.Lock()
        self._listeners: list[Callable[[float, float], None]] = []

    def on_advance(self, fn: Callable[[float, float], None]) -> None:
        """fn(t_start, dt) is called for every advance (milling, dose ...)."""
        self._listeners.append(fn)

    def now(self) -> float:
        with self._lock:
            return self._t

    def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            return
        with self._lock:
            t0 = self._t
            self._t += seconds
        for fn in self._listeners:
            fn(t0, seconds)
        if self.time_factor > 0:
            time.sleep(seconds * self.time_factor)
