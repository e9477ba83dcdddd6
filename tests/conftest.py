import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from tests.gui_helpers import SIM_CONFIG, wait_for  # noqa: E402  (needs ROOT on sys.path)
from tests.visa_fakes import SIM_YAML  # noqa: E402

import autofocus  # noqa: E402

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
