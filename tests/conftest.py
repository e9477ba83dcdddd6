"""Fixtures every test folder may use; helpers are in tests/support/."""
import os
import shutil

import pytest

import autofocus
from tests.support import ROOT
from tests.support.engine_runs import make_engine
from tests.support.gui import SIM_CONFIG, wait_for
from tests.support.visa_fakes import SIM_YAML

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

autofocus.register_methods()          # as the application does at start-up: plans may name these methods

SHARED_EM = ROOT.parent / "shared" / "data" / "em" / "isbi2012"


@pytest.fixture
def isbi_images():
    """Real EM textures beside the repository (development and CI only)."""
    if not SHARED_EM.is_dir():
        pytest.skip("../shared/data/em not present")
    return sorted(SHARED_EM.glob("*.png"))


@pytest.fixture
def sim_config():
    from devices.setup_config import load_setup
    return load_setup(SIM_CONFIG)


@pytest.fixture
def sim_lib(tmp_path):
    """pyvisa-sim library for the VISA drivers. pyvisa keeps one simulated library
    (and instrument state) per file path for the whole process: a private copy
    gives every test fresh instruments."""
    path = tmp_path / "sim_instruments.yaml"
    shutil.copy(SIM_YAML, path)
    return f"{path}@sim"


@pytest.fixture(scope="module")
def win(qapp):
    """Operator main window on the simulated setup, one per test module, shown
    and connected; a run a test left going is stopped before shutdown."""
    from gui.app import build_window, make_app
    make_app()
    w = build_window(SIM_CONFIG)
    w.resize(1400, 900)
    w.show()
    wait_for(qapp, lambda: w.session.setup is not None)
    yield w
    if w.controller.running:
        w.controller.stop()
        w.controller.engine.wait(30)
    w.shutdown()
    w.close()


class _NoSleep:
    @staticmethod
    def sleep(_s):
        pass


@pytest.fixture(autouse=True)
def fast_socket_close(monkeypatch):
    """pyserial's socket:// close() sleeps 0.3 s to let a remote server
    recover; the in-process emulators need no such pause (saves ~0.6 s per
    setup closed)."""
    import serial.urlhandler.protocol_socket as ps
    monkeypatch.setattr(ps, "time", _NoSleep)


@pytest.fixture
def run_tiny(tmp_path):
    setups = []

    def run(plan_over=None, setup_kw=None, before=None, **engine_kw):
        engine_kw.setdefault("on_pause", "stop")      # a test that does not expect a pause must not hang in one
        engine, setup, docs = make_engine(tmp_path, plan_over, setup_kw, **engine_kw)
        setups.append(setup)
        if before is not None:
            before(engine, setup)
        res = engine.run()
        return engine, setup, docs, res
    yield run
    for s in setups:
        s.close()


def pytest_collection_modifyitems(items):
    """Tests under tests/gui/ open Qt windows: marked ``gui`` (``-m "not gui"`` skips them)."""
    for item in items:
        if "gui" in item.path.relative_to(ROOT / "tests").parts[:1]:
            item.add_marker(pytest.mark.gui)
