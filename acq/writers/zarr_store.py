"""Where the OME-Zarr volumes live and how their bytes get there.

Every byte goes through zarr's store API, so a volume can live on local disk
(OUTDIR/zarr, the default) or on any fsspec file system (``zarr_url``, e.g.
``s3://bucket/run`` or ``memory://`` in tests). ``Volumes`` names one store per
section and hides the one difference that matters for crash safety:

* local: zarr's LocalStore wrapped in ``DurableStore``: each object written
  as temp file, fsync, rename, folder fsync (zarr's own rename is not
  fsynced), with a crash point at every step (common.crashpoints) and every
  write and delete reported to the writer for the manifest. A new store is
  built under a temporary name and renamed into place, so no half-made store
  ever carries the real name.
* any other URL: zarr's FsspecStore as it is. Object stores make each put
  atomic; a new store writes its group attributes last, and a store without
  them is rebuilt. The manifest lists only local files.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

from zarr.abc.store import Store
from zarr.core.buffer import Buffer
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from common.atomic import atomic_write, fsync_dir
from common.crashpoints import point

# (store key, sha256 or None when deleted, size) after each durable write
OnWrite = Callable[[str, Optional[str], int], None]
STORE_NAME = re.compile(r"^(\d+)\.ome\.zarr$")


def _mkdirs(folder: Path, root: Path) -> None:
    """Create the missing folders between ``root`` and ``folder``, each made
    durable in its parent (a crash must not lose a folder holding data)."""
    missing = []
    while folder != root and not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for d in reversed(missing):
        point("mkdir", d)
        try:
            os.mkdir(d)
        except FileExistsError:
            continue
        fsync_dir(d.parent)


def _put_durably(root: Path, key: str, data: bytes) -> None:
    path = root / key
    _mkdirs(path.parent, root)
    if key.endswith("zarr.json"):
        point("metadata", path)
    # zarr objects are mutable by nature (metadata grows, shards fill): replaced, atomically
    atomic_write(path, data, overwrite=True)


def _delete_durably(root: Path, key: str) -> None:
    path = root / key
    if path.exists():
        point("unlink", path)
        path.unlink(missing_ok=True)
        fsync_dir(path.parent)


class DurableStore(WrapperStore[LocalStore]):
    """A LocalStore whose writes are fsynced, crash-pointed and reported."""

    def __init__(self, store: LocalStore, on_write: Optional[OnWrite] = None):
        super().__init__(store)
        self._on_write = on_write

    def _with_store(self, store):
        return type(self)(store, self._on_write)

    async def set(self, key: str, value: Buffer) -> None:
        self._check_writable()
        data = value.to_bytes()
        await asyncio.to_thread(_put_durably, Path(self._store.root), key, data)
        if self._on_write is not None:
            self._on_write(key, hashlib.sha256(data).hexdigest(), len(data))

    async def delete(self, key: str) -> None:
        self._check_writable()
        await asyncio.to_thread(_delete_durably, Path(self._store.root), key)
        if self._on_write is not None:
            self._on_write(key, None, 0)


class Volumes:
    """The section stores of one run: ``{base}/{section:04d}.ome.zarr``."""

    def __init__(self, out_dir: Path, url: Optional[str] = None):
        self.out_dir = Path(out_dir)
        self.url = url.rstrip("/") if url else None
        self.local = self.url is None
        self.base = self.out_dir / "zarr"

    def name(self, section: int) -> str:
        return f"{section:04d}.ome.zarr"

    def path(self, section: int) -> Path:
        """The local store folder (local volumes only)."""
        return self.base / self.name(section)

    def location(self, section: int) -> str:
        return str(self.path(section)) if self.local else f"{self.url}/{self.name(section)}"

    def store(self, section: int, on_write: Optional[OnWrite] = None) -> Store:
        if self.local:
            return DurableStore(LocalStore(self.path(section)), on_write)
        return FsspecStore.from_url(self.location(section))

    def exists(self, section: int) -> bool:
        if self.local:
            return self.path(section).exists()
        return sync(self.store(section).exists("zarr.json"))

    def sections(self) -> set[int]:
        """Sections with a store (listed; an unreachable URL lists none)."""
        if self.local:
            names = [p.name for p in self.base.iterdir()] if self.base.is_dir() else []
        else:
            import fsspec
            fs, path = fsspec.core.url_to_fs(self.url)
            try:
                names = [Path(p.rstrip("/")).name for p in fs.ls(path, detail=False)]
            except FileNotFoundError:
                names = []
        return {int(m[1]) for m in map(STORE_NAME.match, names) if m}

    def build(self, section: int, make: Callable[[Store], None]) -> None:
        """Create the section's store with ``make(store)``: local ones under a
        temporary name, fsynced and renamed into place."""
        if not self.local:
            make(self.store(section))
            return
        root = self.path(section)
        tmp = root.with_name(f".{root.name}.new.part")
        if tmp.exists():
            remove_tree(tmp)
        point("mkdir", tmp)
        tmp.mkdir(parents=True)
        make(DurableStore(LocalStore(tmp)))
        point("rename", root)
        os.rename(tmp, root)
        fsync_dir(root.parent)

    def remove(self, section: int) -> None:
        """Delete a store (local: moved aside first, so the name is never half-gone)."""
        if not self.local:
            sync(self.store(section).delete_dir(""))
            return
        root = self.path(section)
        aside = root.with_name(f".{root.name}.old.part")
        if aside.exists():
            remove_tree(aside)
        point("rename", root)
        os.rename(root, aside)
        fsync_dir(root.parent)
        remove_tree(aside)

    def move(self, section: int, moves: list[tuple[str, str]], on_write: Optional[OnWrite] = None) -> None:
        """Move objects (key -> new key) in the given order, through the store API."""
        store = self.store(section, on_write)
        for src, dst in moves:
            data = sync(store.get(src, buffer_prototype()))
            if data is None:
                continue
            sync(store.set(dst, data))
            sync(store.delete(src))

    def keys(self, section: int, prefix: str) -> list[str]:
        store = self.store(section)

        async def collect():
            return [k async for k in store.list_prefix(prefix)]
        return sync(collect())


def buffer_prototype():
    """zarr's default buffers (what Store.get/set take)."""
    from zarr.core.buffer import default_buffer_prototype
    return default_buffer_prototype()


def remove_tree(path: Path) -> None:
    point("unlink", path)
    shutil.rmtree(path, ignore_errors=True)
