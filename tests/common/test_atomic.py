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


def test_a_root_that_vanishes_during_ensure_dir_is_not_created_again(tmp_path, monkeypatch):
    """The output folder goes away (a dropped mount) between ensure_dir's
    check and its mkdir: the write fails, the folder is not recreated (the
    run would otherwise scatter over two places)."""
    import common.atomic as atomic
    root, away = tmp_path / "out", tmp_path / "away"
    root.mkdir()
    atomic.register_root(root)
    try:
        def vanish(op, path):
            if op == "mkdir" and root.exists():
                root.rename(away)
        monkeypatch.setattr(atomic, "point", vanish)
        with pytest.raises(FileNotFoundError, match="vanished"):
            atomic.ensure_dir(root / "tiles" / "0000")
        assert not root.exists() and not (away / "tiles").exists()
    finally:
        atomic.unregister_root(root)
