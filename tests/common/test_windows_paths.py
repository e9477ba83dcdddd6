"""Finding the shipped configs/models in a checkout and in an install, and the
Windows branches that Linux can exercise: the folder fsync skipped, O_BINARY
on every data file, pread without os.pread, the msvcrt lock (against a fake
msvcrt that refuses a byte another descriptor holds, as Windows does), and
Ctrl-Break among the stop signals."""
from __future__ import annotations

import os
import sys
import sysconfig
import types
from pathlib import Path

import pytest

import common.atomic as atomic
import common.paths as paths
from acq import outdir_lock
from acq.cli import stop_signal_names
from tests.support import ROOT


# --- common/paths.py ------------------------------------------------------------------------------

def test_a_checkout_uses_its_own_configs_and_models():
    assert paths.is_source_checkout()
    assert paths.default_config() == ROOT / "configs" / "sim.yaml" and paths.default_config().is_file()
    assert (paths.models_dir() / "sections_unet.pt").is_file()
    assert paths.default_out_root() == ROOT / "out"


def _fake_install(tmp_path, monkeypatch, *, data_has: bool = True, user_has: bool = False):
    """site-packages without pyproject.toml (but with some other project's
    configs/), a venv data folder and a user base, as pip lays them out."""
    site = tmp_path / "site-packages"
    (site / "configs").mkdir(parents=True)                  # a decoy: not ours
    data, user = tmp_path / "venv", tmp_path / "userbase"
    for base, has in ((data, data_has), (user, user_has)):
        if has:
            (base / "share" / "gcib-acq" / "configs").mkdir(parents=True)
            (base / "share" / "gcib-acq" / "configs" / "sim.yaml").write_text("name: x\n")
    real = sysconfig.get_path
    monkeypatch.setattr(paths, "SOURCE_ROOT", site)
    monkeypatch.setattr(paths.sys, "prefix", str(data))
    monkeypatch.setattr(paths.sysconfig, "get_path",
                        lambda name, scheme=None: (str(user) if scheme else str(data)) if name == "data"
                        else real(name, scheme) if scheme else real(name))
    return site, data, user


def test_an_install_finds_the_data_files_in_its_prefix(tmp_path, monkeypatch):
    site, data, _ = _fake_install(tmp_path, monkeypatch)
    assert not paths.is_source_checkout()
    share = data / "share" / "gcib-acq"
    assert paths.data_root() == share
    assert paths.default_config() == share / "configs" / "sim.yaml" and paths.default_config().is_file()
    assert paths.configs_dir() == share / "configs" and paths.models_dir() == share / "models"


def test_a_user_install_finds_them_in_the_user_base(tmp_path, monkeypatch):
    _, _, user = _fake_install(tmp_path, monkeypatch, data_has=False, user_has=True)
    assert paths.default_config() == user / "share" / "gcib-acq" / "configs" / "sim.yaml"


def test_without_any_data_the_path_named_is_the_package_folder(tmp_path, monkeypatch):
    site, _, _ = _fake_install(tmp_path, monkeypatch, data_has=False)
    assert paths.default_config() == site / "configs" / "sim.yaml"      # an error then names this path


def test_an_install_proposes_runs_under_the_home_folder_not_site_packages(tmp_path, monkeypatch):
    _fake_install(tmp_path, monkeypatch)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("USERPROFILE", str(tmp_path / "home"))
    assert paths.default_out_root() == tmp_path / "home" / "gcib-acq" / "out"


# --- common/atomic.py -----------------------------------------------------------------------------

def test_on_windows_a_folder_is_not_opened_to_fsync(tmp_path, monkeypatch):
    opened = []
    real_open = os.open
    monkeypatch.setattr(atomic.os, "open", lambda p, *a, **k: (opened.append(Path(p)), real_open(p, *a, **k))[1])
    atomic.fsync_dir(tmp_path)
    assert opened == [tmp_path]                                         # POSIX: opened and fsynced
    opened.clear()
    monkeypatch.setattr(atomic, "WINDOWS", True)
    atomic.fsync_dir(tmp_path)
    assert opened == []


def test_atomic_write_opens_its_file_binary(tmp_path, monkeypatch):
    """The O_BINARY of Windows reaches the open (Linux has none: stand in a
    flag that is harmless on a regular file); the bytes come back unchanged."""
    flags = []
    real_open = os.open
    monkeypatch.setattr(atomic.os, "open", lambda p, f, *a: (flags.append((Path(p), f)), real_open(p, f, *a))[1])
    monkeypatch.setattr(atomic, "O_BINARY", os.O_NOCTTY)
    data = b"line\r\nbinary \n\x1a end\n"
    atomic.atomic_write(tmp_path / "f.bin", data)
    files = [f for p, f in flags if p != tmp_path]           # the folder is opened only to fsync it
    assert len(files) == 1 and files[0] & os.O_NOCTTY
    assert (tmp_path / "f.bin").read_bytes() == data


def test_pread_without_os_pread_reads_the_same_bytes(tmp_path, monkeypatch):
    p = tmp_path / "log"
    p.write_bytes(b"0123456789\n")
    fd = os.open(p, os.O_RDWR | os.O_APPEND)
    try:
        want = [os.pread(fd, 3, 4), os.pread(fd, 1, 10)]
        monkeypatch.delattr(os, "pread")
        assert [atomic.pread(fd, 3, 4), atomic.pread(fd, 1, 10)] == want == [b"456", b"\n"]
        os.write(fd, b"x\n")                    # O_APPEND: still appended at the end after the seek
    finally:
        os.close(fd)
    assert p.read_bytes() == b"0123456789\nx\n"


# --- acq/outdir_lock.py ---------------------------------------------------------------------------

class _FakeMsvcrt(types.ModuleType):
    """msvcrt.locking as Windows does it: locks n bytes at the descriptor's
    position; a byte another descriptor holds cannot be locked (OSError)."""
    LK_UNLCK, LK_NBLCK = 0, 2

    def __init__(self):
        super().__init__("msvcrt")
        self.held: dict[tuple[int, int], int] = {}          # (inode, offset) -> fd
        self.calls: list[tuple[int, int]] = []               # (mode, offset)

    def locking(self, fd, mode, nbytes):
        assert nbytes == 1
        key = (os.fstat(fd).st_ino, os.lseek(fd, 0, os.SEEK_CUR))
        self.calls.append((mode, key[1]))
        if mode == self.LK_NBLCK:
            if key in self.held:
                raise PermissionError(13, "Permission denied")
            self.held[key] = fd
        elif self.held.get(key) == fd:
            del self.held[key]
        else:
            raise PermissionError(13, "Permission denied")


def test_the_windows_lock_refuses_a_second_run_and_keeps_the_pid_readable(tmp_path, monkeypatch):
    fake = _FakeMsvcrt()
    monkeypatch.setitem(sys.modules, "msvcrt", fake)
    try_lock, unlock = outdir_lock.lock_functions("win32")
    monkeypatch.setattr(outdir_lock, "_try_lock", try_lock)
    monkeypatch.setattr(outdir_lock, "_unlock", unlock)
    first = outdir_lock.OutdirLock(tmp_path / "run").acquire()
    with pytest.raises(outdir_lock.OutdirBusy, match=f"pid {os.getpid()}"):
        outdir_lock.OutdirLock(tmp_path / "run").acquire()
    lock_file = tmp_path / "run" / outdir_lock.LOCK_NAME
    assert lock_file.stat().st_size < 32                 # the pid at byte 0, nothing written at the locked byte
    assert all(off == outdir_lock.WINDOWS_LOCK_OFFSET for _, off in fake.calls)
    first.release()
    assert not fake.held
    outdir_lock.OutdirLock(tmp_path / "run").acquire().release()     # free again


def test_the_posix_lock_refuses_a_second_descriptor_until_released(tmp_path):
    try_lock, unlock = outdir_lock.lock_functions("linux")
    p = tmp_path / "lock"
    a, b = os.open(p, os.O_RDWR | os.O_CREAT), os.open(p, os.O_RDWR)
    try:
        assert try_lock(a) and not try_lock(b)
        unlock(a)
        assert try_lock(b)
    finally:
        os.close(a)
        os.close(b)


# --- acq/cli.py -----------------------------------------------------------------------------------

def test_ctrl_break_stops_a_run_on_windows_and_sighup_on_posix():
    windows = types.SimpleNamespace(SIGINT=2, SIGTERM=15, SIGBREAK=21)
    assert stop_signal_names(windows) == ["SIGINT", "SIGTERM", "SIGBREAK"]
    import signal
    assert "SIGHUP" in stop_signal_names(signal) and "SIGBREAK" not in stop_signal_names(signal)


# --- scripts/check_windows_wheels.py --------------------------------------------------------------

def _wheel_check():
    import importlib.util
    spec = importlib.util.spec_from_file_location("check_windows_wheels", ROOT / "scripts" / "check_windows_wheels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_wheel_check_reads_the_pins_windows_installs(tmp_path):
    check = _wheel_check()
    lock = tmp_path / "requirements.lock"
    lock.write_text("# comment\nnumpy==2.4.6\n"
                    'PyQt5-Qt5==5.15.19; sys_platform != "win32"\n'
                    'PyQt5-Qt5==5.15.2; sys_platform == "win32"\n'
                    'pywin32==312; sys_platform == "win32"  # SmartSEM COM\n')
    pins, left_out = check.read_pins(lock, check.windows_environment("3.11.9"))
    assert pins == [("numpy", "2.4.6"), ("PyQt5-Qt5", "5.15.2"), ("pywin32", "312")]
    assert left_out == ['PyQt5-Qt5==5.15.19; sys_platform != "win32"']
    lock.write_text("numpy>=2\n")
    with pytest.raises(SystemExit, match="requirements.lock:1: not a 'name==version' pin"):
        check.read_pins(lock, check.windows_environment("3.11.9"))


def test_the_wheel_check_lists_what_only_windows_requires(tmp_path):
    import zipfile
    check = _wheel_check()
    wheel = tmp_path / "x-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("x-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: x\nVersion: 1.0\n"
                   "Requires-Dist: numpy\nRequires-Dist: tzdata; sys_platform == \"win32\"\n"
                   "Requires-Dist: uvloop; sys_platform != \"win32\"\n"
                   "Requires-Dist: pywin32; platform_system == \"Windows\" and extra == \"gui\"\n")
    reqs = check.windows_only_requirements(wheel, check.windows_environment("3.11.9"))
    assert [r.name for r in reqs] == ["tzdata"]


# --- every data file opened binary, no os.pread ---------------------------------------------------

def _os_calls(name: str):
    """(module, function, call) of every os.<name>(...) in the application."""
    import ast
    files = [ROOT / "main.py"] + [p for pkg in ("common", "devices", "acq", "autofocus", "wafer", "gui")
                                  for p in sorted((ROOT / pkg).rglob("*.py"))]
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for call in ast.walk(fn):
                if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == name
                        and isinstance(call.func.value, ast.Name) and call.func.value.id == "os"):
                    yield path.relative_to(ROOT).as_posix(), fn.name, call


def test_every_os_open_of_a_file_is_binary_on_windows():
    """Windows opens an os.open() descriptor in text mode unless told O_BINARY:
    a tile's \\n bytes would become \\r\\n. Only fsync_dir opens a folder."""
    import ast
    text = [f"{mod}:{call.lineno} ({fn})" for mod, fn, call in _os_calls("open")
            if (mod, fn) != ("common/atomic.py", "fsync_dir")
            and "O_BINARY" not in ast.unparse(call.args[1] if len(call.args) > 1 else call)]
    assert not text, f"os.open without O_BINARY (common.atomic.O_BINARY): {text}"


def test_nothing_calls_os_pread_which_windows_lacks():
    used = [f"{mod}:{call.lineno}" for mod, fn, call in _os_calls("pread") if (mod, fn) != ("common/atomic.py", "pread")]
    assert not used, f"os.pread is POSIX only; use common.atomic.pread: {used}"
