"""Helpers shared by the GUI tests (the `win` fixture itself is in conftest.py)."""
import time

from gui import wafer_commands as cmd
from gui.plan_builder import PlanOptions, build_plan, plan_dict
from gui.wafer_model import GridSpec
from tests.support import ROOT

SIM_CONFIG = ROOT / "configs" / "sim.yaml"


def wait_for(app, pred, timeout=15.0):
    """Spin the Qt event loop until pred() holds; for module-scoped fixtures, where qtbot is unavailable."""
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        app.processEvents()
        time.sleep(0.005)


def small_plan(win, rows=1, cols=2, frame=(256, 256), cycles=1, writers=("ome_tiff",), sections=3):
    """Three sections: the simulator renders each section's specimen slice once
    and keeps four, so later runs of this module reuse them."""
    lay = win.layout_model
    win.workflow.sections_from_truth()
    cmd.set_sections(lay, lay.ordered_sections()[:sections])
    specs = [GridSpec(s.id, 0, s.center_um, s.angle_deg, rows, cols, 20.0, frame, 0, 200.0)
             for s in lay.ordered_sections()]
    cmd.set_grids(lay, specs)
    plan = build_plan(plan_dict(lay, SIM_CONFIG, PlanOptions(cycles=cycles, writers=list(writers))))
    win.controller.set_plan(plan)
    return plan
