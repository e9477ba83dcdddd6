"""Atomic, never-overwriting file writes (temporary name, fsync, rename).

The temporary file is ``.{name}.{random}.part`` next to the target: a crash
leaves at most such a file behind, never a partial file under the real name.
``is_temporary`` recognises them (and zarr's ``*.partial``) and
``remove_temporaries`` deletes them on a restart (acq.writers.manifest's
Manifest.recover does; acq.verify reports them as leftover temporary files).

Every filesystem operation calls common.crashpoints.point(op, path) just before
it happens (the crash test kills the process there).
"""
from __future__ import annotations

import errno
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterator

from common.crashpoints import point

TEMP_SUFFIX = ".part"

# Windows: the C runtime opens an os.open() descriptor in text mode unless
# O_BINARY is given (\n written as \r\n, Ctrl-Z read as the end); a folder
# cannot be opened to fsync it (NTFS journals its entries itself).
WINDOWS = os.name == "nt"
O_BINARY = getattr(os, "O_BINARY", 0)    # OR it into every os.open of a data file


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


_FILE_MODE = 0o666 & ~_umask()      # what open() would give, read once at import


class FileExists(FileExistsError):
    pass


# Output folders of live runs: never created again by a write below them. A
# dropped network mount leaves an empty mount point; recreating the tree
# there would scatter the run over two disks. The write fails (ENOENT) and
# the engine suspends until the folder is back.
_ROOTS: dict[Path, int] = {}        # root -> st_dev when registered (a mount point keeps its path, not its device)


def register_root(folder: Path) -> None:
    folder = Path(folder).absolute()
    _ROOTS[folder] = os.stat(folder).st_dev


def unregister_root(folder: Path) -> None:
    _ROOTS.pop(Path(folder).absolute(), None)


def root_problem(folder: Path) -> str | None:
    """Why a registered output root is not the folder the run started in
    (gone, or another file system: a dropped mount), else None."""
    folder = Path(folder).absolute()
    dev = _ROOTS.get(folder)
    try:
        st = os.stat(folder)
    except OSError as e:
        return f"output folder {folder} has vanished ({e.strerror or e}); restore it to continue"
    if dev is not None and st.st_dev != dev:
        return (f"output folder {folder} is on another file system than when the run started "
                "(a network mount dropped?); restore it to continue")
    return None


def ensure_dir(folder: Path) -> None:
    """mkdir -p ``folder``, except under a registered output root that has
    vanished or changed file system: that raises FileNotFoundError. Below a
    root only the levels under it are created, one by one, so a root that
    vanishes between the check and the mkdir is not created again either."""
    folder = Path(folder)
    absf = folder.absolute()
    root = next((r for r in list(_ROOTS) if absf == r or r in absf.parents), None)
    if root is not None:
        problem = root_problem(root)
        if problem:
            raise FileNotFoundError(2, problem, str(root))
    if folder.is_dir():
        return
    point("mkdir", folder)
    if root is None:
        folder.mkdir(parents=True, exist_ok=True)
        return
    level = root
    for name in absf.relative_to(root).parts:
        level = level / name
        try:
            os.mkdir(level)
        except FileExistsError:
            pass
        except FileNotFoundError:            # the root went away just now
            raise FileNotFoundError(2, root_problem(root) or f"output folder {root} has vanished",
                                    str(root)) from None


def temp_name(path: Path) -> Path:
    """A fresh temporary name for ``path`` (same folder, hidden, ``.part``)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def is_temporary(name: str) -> bool:
    """A temporary file or folder name of atomic_write, the writers or zarr:
    ``.{name}.{random}.part`` (also a ``.{name}.part`` folder) or ``*.partial``."""
    return (name.startswith(".") and name.endswith(TEMP_SUFFIX)) or name.endswith(".partial")


def iter_temporaries(root: Path) -> Iterator[Path]:
    """Temporary files and folders under ``root`` (a temporary folder is not entered)."""
    root = Path(root)
    if not root.is_dir():
        return
    for dirpath, dirs, files in os.walk(root):
        for d in sorted(dirs):
            if is_temporary(d):
                yield Path(dirpath) / d
        dirs[:] = sorted(d for d in dirs if not is_temporary(d))
        for f in sorted(files):
            if is_temporary(f):
                yield Path(dirpath) / f


def remove_temporaries(root: Path) -> list[Path]:
    """Delete what a crash left of temporary files under ``root`` (call only
    when no writer works there: on start, under the output folder's lock)."""
    gone = []
    for p in list(iter_temporaries(root)):
        point("unlink", p)
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except FileNotFoundError:
            pass
        gone.append(p)
    return gone


def atomic_write(path: str | Path, data: bytes | Callable[[Path], None], *, overwrite: bool = False,
                 link_fallback: bool = False) -> Path:
    """Write ``data`` (bytes, or a callable that writes to the temp path) to
    ``path`` atomically. Refuses to replace an existing file unless asked.
    ``link_fallback``: where the no-clobber hard link fails (a filesystem without
    hard links), check for the target and rename instead (best effort: racy)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExists(f"{path} exists; refusing to overwrite")
    if not path.parent.is_dir():
        ensure_dir(path.parent)
    tmp = temp_name(path)
    point("create", tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_BINARY, 0o666)   # 0666 & ~umask, as open() gives
    try:
        if callable(data):
            os.close(fd)
            point("write", tmp)
            data(tmp)
            with open(tmp, "rb+") as f:
                point("fsync", tmp)
                os.fsync(f.fileno())
        else:
            with os.fdopen(fd, "wb") as f:
                point("write", tmp)
                f.write(data)
                f.flush()
                point("fsync", tmp)
                os.fsync(f.fileno())
        if overwrite:
            point("rename", path)
            os.replace(tmp, path)
        else:
            try:
                point("rename", path)
                os.link(tmp, path)      # fails if path appeared meanwhile: never clobbers
            except OSError as e:
                if not link_fallback or isinstance(e, FileExistsError):
                    raise
                if path.exists():
                    raise FileExists(f"{path} exists; refusing to overwrite") from None
                os.replace(tmp, path)
            point("unlink", tmp)
            tmp.unlink(missing_ok=True)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def fsync_dir(folder: Path) -> None:
    """fsync a folder (its entries durable); skipped where a file system or
    platform cannot (Windows, some network file systems), but an I/O error
    is raised: the entry may not be durable."""
    point("fsync_dir", folder)
    if WINDOWS:
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES, errno.EPERM):
            raise
    finally:
        os.close(fd)


def pread(fd: int, n: int, pos: int) -> bytes:
    """os.pread where the platform has it; else (Windows) seek and read, which
    moves the file position: use it on descriptors opened with O_APPEND or
    read from one thread only."""
    if hasattr(os, "pread"):
        return os.pread(fd, n, pos)
    os.lseek(fd, pos, os.SEEK_SET)
    return os.read(fd, n)
