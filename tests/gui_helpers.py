"""Helpers shared by the GUI tests (the `win` fixture itself is in conftest.py)."""
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIM_CONFIG = ROOT / "configs" / "sim.yaml"


def wait_for(app, pred, timeout=15.0):
    """Spin the Qt event loop until pred() holds; for module-scoped fixtures, where qtbot is unavailable."""
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        app.processEvents()
        time.sleep(0.005)
