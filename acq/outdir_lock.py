"""One run, one process: an OS-level lock on OUTDIR/.lock.

The lock is held on an open file descriptor (flock on POSIX, msvcrt.locking
on Windows), so it dies with the process however it ends, kill -9 included:
a stale lock file never blocks a resume. The file holds the holder's pid,
read only to name it in the refusal. Windows locks are mandatory (a locked
byte cannot be read by another process), so there the locked byte lies far
past the pid, which stays readable.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from common.atomic import O_BINARY
from devices.setup_config import ConfigError

LOCK_NAME = ".lock"
WINDOWS_LOCK_OFFSET = 1 << 30               # beyond the end of the file: Windows allows it, nothing is written


class OutdirBusy(ConfigError):
    """Another live process runs in this output folder."""


class OutdirLock:
    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "OutdirLock":
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ConfigError(f"{self.out_dir}: exists and is not a folder")
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | O_BINARY, 0o644)
        except OSError as e:
            raise ConfigError(f"{self.out_dir}: cannot use as output folder: {e.strerror or e}") from None
        if not _try_lock(fd):
            os.close(fd)
            holder = _read_pid(self.path)
            raise OutdirBusy(f"{self.out_dir} is in use by a running acquisition (pid {holder or 'unknown'}); "
                             "wait for it to stop (or stop it) before resuming")
        self._fd = fd
        try:                                    # the pid only names the holder: best effort (a full disk)
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)        # the Windows lock moved the position
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                _unlock(fd)
            finally:
                os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __del__(self):
        try:
            self.release()
        except Exception:
            pass


def _read_pid(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def lock_functions(platform: str = sys.platform):
    """(try_lock(fd) -> bool, unlock(fd)) for ``platform`` (a sys.platform value)."""
    if platform == "win32":
        import msvcrt

        def try_lock(fd: int) -> bool:
            try:
                os.lseek(fd, WINDOWS_LOCK_OFFSET, os.SEEK_SET)
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)     # locks 1 byte at the position
                return True
            except OSError:
                return False

        def unlock(fd: int) -> None:
            os.lseek(fd, WINDOWS_LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        return try_lock, unlock

    import fcntl

    def try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            return False

    def unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
    return try_lock, unlock


_try_lock, _unlock = lock_functions()
