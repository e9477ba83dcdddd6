"""Suspenders: conditions checked at checkpoints (between events).

When one fails, the engine suspends the run (state "paused", reason
"suspended: ..."), polls the condition on the setup clock and resumes by
itself once it clears; after ``max_suspend_s`` it pauses for the operator.
Consecutive device failures are the fourth suspender; that one lives in the
engine's failure handling (acq/engine.py) because it is fed by failures,
not polled.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from acq.expand import AcquireTile, Autofocus, Irradiate, Mill


class SuspendCondition(Exception):
    """Raised inside a step when a suspender condition is found mid-event."""

    def __init__(self, suspender: str, message: str):
        super().__init__(message)
        self.suspender = suspender


def free_bytes(path: Path) -> int:
    """Free space of the file system holding ``path`` (patched in tests)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


@dataclass
class Suspender:
    name: str
    check: Callable[[], Optional[str]]          # None = fine, else what is wrong
    applies: Callable[[object], bool]            # before which events it is checked


def probe_current(setup, plan) -> Suspender:
    want = plan.imaging.probe_current_na
    tol = plan.suspenders.probe_current_tolerance
    lo, hi = want * (1 - tol), want * (1 + tol)

    def check():
        na = setup.sem.probe_current() * 1e9
        if not lo <= na <= hi:
            return f"SEM probe current {na:.3g} nA outside [{lo:.3g}, {hi:.3g}] nA"
        return None
    return Suspender("probe_current", check, lambda ev: isinstance(ev, AcquireTile))


def ion_interlock(setup) -> Suspender:
    def check():
        st = setup.ion_gun.gun_status()
        if not st.interlocks_ok:
            open_ = [k for k, ok in st.interlocks.items() if not ok]
            return f"ion gun interlock open: {', '.join(open_) or 'unspecified'}"
        return None
    return Suspender("ion_interlock", check, lambda ev: isinstance(ev, Mill))


def disk_space(out_dir: Path, min_free_gb: float) -> Suspender:
    def check():
        free = free_bytes(out_dir)
        if free < min_free_gb * 1e9:
            return f"disk nearly full: {free / 1e9:.2f} GB free in {out_dir}, need {min_free_gb:g} GB"
        return None
    return Suspender("disk_space", check, lambda ev: isinstance(ev, (AcquireTile, Autofocus, Irradiate)))


def default_suspenders(setup, plan, out_dir: Path) -> list[Suspender]:
    out = [disk_space(out_dir, plan.suspenders.min_free_gb), probe_current(setup, plan)]
    if setup.ion_gun is not None and plan.mill is not None:
        out.append(ion_interlock(setup))
    return out
