"""Worked example (docs/architecture.md): adding an autofocus method.

A method is ``fn(setup, AutofocusRequest) -> AutofocusResult``; the
application registers it at start-up (``register_autofocus(name, fn)``, as
``autofocus.register_methods()`` does for DeepFocus, MAPFoSt and
Nelder-Mead). It may grab frames and move wd/stig while it works; the
engine applies its proposal through the safety guard, so even a wild
proposal moves the focus by at most ``safety.max_autofocus_step_*``."""
from __future__ import annotations

import numpy as np
import pytest

from acq.autofocus_step import AUTOFOCUS_METHODS, AutofocusResult, register_autofocus, run_autofocus
from acq.events import Autofocus
from acq.plan import AutofocusStep
from devices.factory import build_setup
from devices.interfaces import ScanParams


def brightest_of_three(setup, req) -> AutofocusResult:
    """Three frames at wd - 30 µm, wd, wd + 30 µm; proposes the one with the
    most contrast (a toy: the point is the contract, not the method)."""
    sem = setup.sem
    wd0 = sem.working_distance()
    sem.set_scan(ScanParams(pixel_m=req.pixel_size_m, frame=tuple(req.frame_size), dwell_s=req.dwell_s))
    scores = {}
    for dz in (-30e-6, 0.0, 30e-6):
        sem.set_working_distance(wd0 + dz)
        scores[dz] = float(np.std(sem.acquire_frame().image))
    best = max(scores, key=scores.get)
    return AutofocusResult(wd0 + best, tuple(sem.stig()), frames=3, message=f"best offset {best * 1e6:+.0f} µm")


def wild(setup, req) -> AutofocusResult:
    return AutofocusResult(setup.sem.working_distance() + 1e-3, tuple(setup.sem.stig()), message="1 mm off")


@pytest.fixture
def registered():
    names = []

    def add(name, fn):
        register_autofocus(name, fn)
        names.append(name)
    yield add
    for n in names:
        AUTOFOCUS_METHODS.pop(n, None)


def test_a_registered_method_runs_and_a_wild_proposal_is_clamped(registered, sim_config):
    registered("brightest-of-three", brightest_of_three)
    registered("wild", wild)
    with build_setup(sim_config) as setup:
        wd0 = setup.sem.working_distance()
        ev = Autofocus(key="af:example", cycle=0, section=0, grid=None, center_um=(0.0, 0.0),
                       step=AutofocusStep(method="brightest-of-three"), tile_keys=())
        res, wd, _stig = run_autofocus(setup, ev)
        assert res.ok and res.frames == 3 and abs(wd - wd0) <= 30e-6 + 1e-12
        wd0 = setup.sem.working_distance()
        res, wd, _stig = run_autofocus(setup, Autofocus(**{**ev.__dict__, "step": AutofocusStep(method="wild")}))
    max_step = sim_config.safety.max_autofocus_step_wd_um * 1e-6
    assert abs(wd - wd0) == pytest.approx(max_step)              # 1 mm proposed, one step taken


def test_a_plan_naming_an_unregistered_method_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="allowed"):
        AutofocusStep(method="brightest-of-three")
