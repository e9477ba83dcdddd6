"""Crash points: every filesystem operation of the writers, the journal and
the manifest calls ``point(op, path)`` just before it happens, so the crash
test (tests/test_crash_points.py) can kill the process there.

Off (a no-op) unless the environment asks for it:
  GCIB_CRASH_LOG=FILE       append "op<TAB>site" per operation (to enumerate them)
  GCIB_CRASH_AT=op|site|K   os._exit(CRASH_EXIT) at the K-th (1-based) operation
                            ``op`` on a path whose site is ``site``
A site is the path relative to GCIB_CRASH_ROOT with every run of digits
replaced by '#': "rename|s#/c#/tile_s#_g#_r#c#_v#.tif|2" is the second
tile rename, whichever tile it is.
"""
from __future__ import annotations

import os
import re
import threading
from pathlib import Path

CRASH_EXIT = 77
_DIGITS = re.compile(r"\d+")
_lock = threading.Lock()
_LOG = _ROOT = _target = None
_counts: dict[tuple[str, str], int] = {}


def configure(at: str | None = None, log: str | None = None, root: str | None = None) -> None:
    """Set (or clear) the crash point; the environment's values at import.
    A forked test runner calls it in each child."""
    global _LOG, _ROOT, _target
    _LOG, _ROOT, _target = log, root, None
    _counts.clear()
    if at:
        op, where, k = at.rsplit("|", 2)
        _target = (op, where, int(k))


configure(os.environ.get("GCIB_CRASH_AT"), os.environ.get("GCIB_CRASH_LOG"), os.environ.get("GCIB_CRASH_ROOT"))


def site(path) -> str:
    p = Path(path)
    if _ROOT:
        try:
            p = p.resolve().relative_to(Path(_ROOT).resolve())
        except ValueError:
            pass
    name = p.as_posix()
    if p.name.startswith(".") and p.name.endswith(".part"):     # atomic_write's temporary name
        name = (p.parent / (p.name[1:-len(".part")].rsplit(".", 1)[0] + ".part")).as_posix()
    return _DIGITS.sub("#", name)


def point(op: str, path) -> None:
    if _LOG is None and _target is None:
        return
    s = site(path)
    with _lock:
        n = _counts[(op, s)] = _counts.get((op, s), 0) + 1
        if _LOG is not None:
            with open(_LOG, "a") as f:
                f.write(f"{op}\t{s}\n")
        if _target is not None and _target == (op, s, n):
            os._exit(CRASH_EXIT)
