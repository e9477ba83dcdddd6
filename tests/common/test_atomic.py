"""Atomic writes: never overwrite, never leave a partial file, readable output."""
import os
import stat

import pytest

from common.atomic import FileExists, atomic_write


def test_refuses_to_overwrite_and_leaves_no_temporary(tmp_path):
    p = atomic_write(tmp_path / "a.bin", b"first")
    with pytest.raises(FileExistsError):
        atomic_write(p, b"second")
    assert p.read_bytes() == b"first"
    assert [f.name for f in tmp_path.iterdir()] == ["a.bin"]


def test_failed_writer_leaves_nothing(tmp_path):
    def boom(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "b.bin", boom)
    assert list(tmp_path.iterdir()) == []


def test_files_get_the_normal_permissions_not_mkstemps_0600(tmp_path):
    p = atomic_write(tmp_path / "c.bin", b"x")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask
    assert issubclass(FileExists, FileExistsError)
