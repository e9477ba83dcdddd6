"""Atomic, never-overwriting file writes (temporary name, fsync, rename)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


_FILE_MODE = 0o666 & ~_umask()      # what open() would give, read once at import


class FileExists(FileExistsError):
    pass


def atomic_write(path: str | Path, data: bytes | Callable[[Path], None], *, overwrite: bool = False,
                 link_fallback: bool = False) -> Path:
    """Write ``data`` (bytes, or a callable that writes to the temp path) to
    ``path`` atomically. Refuses to replace an existing file unless asked.
    ``link_fallback``: where the no-clobber hard link fails (a filesystem without
    hard links), check for the target and rename instead (best effort: racy)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExists(f"{path} exists; refusing to overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    tmp = Path(tmp)
    os.chmod(tmp, _FILE_MODE)        # mkstemp makes 0600; data must stay readable by the pipeline
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)      # fails if path appeared meanwhile: never clobbers
            except OSError as e:
                if not link_fallback or isinstance(e, FileExistsError):
                    raise
                if path.exists():
                    raise FileExists(f"{path} exists; refusing to overwrite") from None
                os.replace(tmp, path)
            tmp.unlink(missing_ok=True)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
