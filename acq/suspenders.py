"""Suspenders: conditions checked at checkpoints (between events).

When one fails, the runner (acq/runner.py) suspends the run (state "paused", reason
"suspended: ..."), polls the condition on the setup clock and resumes by
itself once it clears; after ``max_suspend_s`` it pauses for the operator.
Consecutive device failures are the fourth suspender; that one lives in the
runner's failure handling (acq/runner.py) because it is fed by failures,
not polled. The EHT suspender pauses with its own reason (``eht_off``): the
operator has to switch the gun on, which no program should do unasked.
"""
from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from acq.documents import IncidentCause
from common.atomic import O_BINARY, root_problem
from acq.events import AcquireTile, Autofocus, Irradiate, Mill
from devices.interfaces import Capability


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
    pause_reason: str = "suspended"              # the runner's PauseReason value for this pause

    @property
    def suspended(self) -> IncidentCause:
        return IncidentCause(f"suspended_{self.name}")

    @property
    def resumed(self) -> IncidentCause:
        return IncidentCause(f"resumed_{self.name}")


@dataclass
class SuspenderSet:
    """The run's suspenders, each in its own slot: the runner needs the
    output and interlock ones by role, not by name."""
    output: Optional[Suspender] = None           # disk space / writable output
    probe_current: Optional[Suspender] = None
    interlock: Optional[Suspender] = None        # the ion gun's interlocks (milling only)
    eht: Optional[Suspender] = None              # the SEM's gun is on (SEMs with Capability.EHT_CONTROL)

    def __iter__(self) -> Iterator[Suspender]:
        # the EHT first: with the gun off a probe-current reading means nothing
        return iter([s for s in (self.output, self.eht, self.probe_current, self.interlock) if s is not None])


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


EHT_ADVICE = "switch it on (run-up ~1 min) and resume"


def _needs_sem_beam(ev) -> bool:
    """Events that scan with the SEM's beam: tiles, autofocus, an SEM-scan irradiation."""
    if isinstance(ev, (AcquireTile, Autofocus)):
        return True
    return isinstance(ev, Irradiate) and getattr(ev.step, "source", "sem") == "sem"


def eht_on(setup) -> Suspender:
    """Checked before every SEM exposure: a frame with the gun off is noise."""
    def check():
        sem = setup.sem
        if sem.eht_on():
            return None
        return f"EHT is off (SEM reports {sem.eht_state()!r}): {EHT_ADVICE}"
    return Suspender("eht", check, _needs_sem_beam, pause_reason="eht_off")


def ion_interlock(setup) -> Suspender:
    def check():
        st = setup.ion_gun.gun_status()
        if not st.interlocks_ok:
            open_ = [k for k, ok in st.interlocks.items() if not ok]
            return f"ion gun interlock open: {', '.join(open_) or 'unspecified'}"
        return None
    return Suspender("ion_interlock", check, lambda ev: isinstance(ev, Mill))


# Free space always kept beyond the plan's min_free_gb: what the writers need
# for one tile (OME-TIFF, mipmaps, zarr: about three times the frame), so
# min_free_gb: 0 still pauses before a tile that cannot be written.
_TILE_COPIES = 4
_HEADROOM = 16 << 20
_DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.ENOENT, errno.EIO, errno.EACCES, errno.EPERM,
                errno.ESTALE, errno.ENOTDIR}


def is_disk_error(err: BaseException) -> bool:
    """An OSError from the output's file system (full, read-only, gone):
    a condition to wait out, not a bug."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in _DISK_ERRNOS:
            return True
        err = err.__cause__ or err.__context__
    return False


def _probe(folder: Path) -> Optional[OSError]:
    """Create, write, fsync and remove a file in ``folder``: the error, or None."""
    probe = folder / ".write_probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | O_BINARY, 0o644)
        try:
            os.write(fd, b"x")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        return e
    return None


def output_problem(out_dir: Path, need_bytes: int, journal_path: Optional[Path] = None,
                   journal_inode: Optional[int] = None, failed_dirs=()) -> Optional[str]:
    """Why the output folder cannot take the next tile now, or None: it
    vanished (a dropped network mount), is read-only, or has too little space."""
    try:
        return _output_problem(Path(out_dir), need_bytes, journal_path, journal_inode, failed_dirs)
    except OSError as e:                        # e.g. a stale network mount (ESTALE) or an I/O error
        return f"output folder {out_dir} cannot be checked: {e.strerror or e}"


def _output_problem(out_dir: Path, need_bytes: int, journal_path, journal_inode, failed_dirs) -> Optional[str]:
    if not out_dir.is_dir():
        return f"output folder {out_dir} has vanished (network mount dropped?); restore it to continue"
    problem = root_problem(out_dir)
    if problem:
        return problem
    if journal_path is not None and journal_inode is not None:
        try:
            if os.stat(journal_path).st_ino != journal_inode:
                return f"{journal_path} was replaced while the run had it open; restore the output folder"
        except OSError:
            return f"{journal_path} has vanished; restore the output folder to continue"
    failed = [d for d in list(failed_dirs) if d.is_dir()]
    for folder in [out_dir, *failed]:
        e = _probe(folder)
        if e is not None:
            what = "is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "is not writable"
            return f"output folder {folder} {what}: {e.strerror or e}"
    failed_dirs.difference_update(failed)       # writable again
    free = free_bytes(out_dir)
    if free < need_bytes:
        return (f"disk nearly full: {free / 1e9:.3f} GB free in {out_dir}, need {need_bytes / 1e9:.3f} GB "
                "(suspenders.min_free_gb, at least one tile)")
    return None


def output_space(out_dir: Path, min_free_gb: float, tile_bytes: int,
                 journal_state: Callable[[], tuple[Optional[Path], Optional[int]]] = lambda: (None, None),
                 failed_dirs: Callable[[], set] = set) -> Suspender:
    """Checked before every exposure: a tile is never imaged into a disk that cannot take it."""
    need = max(int(min_free_gb * 1e9), _TILE_COPIES * tile_bytes + _HEADROOM)

    def check():
        return output_problem(out_dir, need, *journal_state(), failed_dirs=failed_dirs())
    return Suspender("disk_space", check, lambda ev: isinstance(ev, (AcquireTile, Autofocus, Irradiate)))


def default_suspenders(setup, plan, out_dir: Path, tile_bytes: int = 0,
                       journal_state=lambda: (None, None), failed_dirs: Callable[[], set] = set) -> SuspenderSet:
    return SuspenderSet(
        output=output_space(out_dir, plan.suspenders.min_free_gb, tile_bytes, journal_state, failed_dirs),
        probe_current=probe_current(setup, plan),
        eht=eht_on(setup) if Capability.EHT_CONTROL & getattr(setup.sem, "capabilities", Capability.NONE) else None,
        interlock=ion_interlock(setup) if setup.ion_gun is not None and plan.mill is not None else None)
