import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

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
    return load_setup(ROOT / "configs" / "sim.yaml")
