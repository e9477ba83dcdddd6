"""The simulated stage: limits, backlash, verification, focus lost on long moves."""
import math

import pytest

from devices import errors
from devices.interfaces import StagePosition
from devices.safety import GuardedStage, SafetyGuard
from devices.setup_config import Simulation
from devices.sim.stage import SimStage
from devices.sim.world import SimWorld


@pytest.fixture
def world():
    sim = Simulation(seed=4)
    sim.stage.repeatability_um = 0.05
    return SimWorld(sim, plane="specimen")


def _stage(world, **kw):
    s = SimStage(world, **kw)
    s.connect()
    return s


def test_move_reaches_target_and_takes_time(world):
    st = _stage(world)
    t0 = world.clock.now()
    pos = st.move_to(StagePosition(x=5e-3, y=2e-3))
    assert pos.x == pytest.approx(5e-3, abs=1e-6) and pos.y == pytest.approx(2e-3, abs=1e-6)
    # 5 mm at 5 mm/s plus settle, on the virtual clock
    assert world.clock.now() - t0 == pytest.approx(1.0 + world.params.stage.settle_s, rel=0.01)
    # moving down: overshoot below, then approach upwards (one more settle)
    t0 = world.clock.now()
    st.move_to(StagePosition(x=0.0, y=2e-3))
    assert world.clock.now() - t0 == pytest.approx(1.0 + 2 * world.params.stage.settle_s, rel=0.01)


def test_backlash_is_removed_by_approaching_from_one_side(world):
    plain = _stage(world, approach_from_below=False)
    plain.move_to(StagePosition(x=1e-3))
    with pytest.raises(errors.MoveFailed):
        plain.move_to(StagePosition(x=0.0))       # arriving downwards lags by the backlash
    one_side = _stage(world, approach_from_below=True)
    one_side.move_to(StagePosition(x=1e-3))
    pos = one_side.move_to(StagePosition(x=0.0))
    assert abs(pos.x) < 1e-6


def test_centimetre_moves_displace_focus_by_micrometres(world):
    st = _stage(world)
    shifts = []
    for i in range(20):
        wd0 = world.focus_baseline(0, 0)[0]
        st.move_to(StagePosition(x=(10e-3 if i % 2 == 0 else -10e-3)))
        shifts.append(abs(world.focus_baseline(0, 0)[0] - wd0))
    assert 0.5e-6 < sorted(shifts)[10] < 20e-6


def test_injected_move_failure_is_detected(world):
    from devices.setup_config import FaultRule
    world.faults.add(FaultRule(device="stage", operation="move_to", kind="move_failure", at_calls=[2]))
    st = _stage(world)
    st.move_to(StagePosition(x=1e-3))
    with pytest.raises(errors.MoveFailed, match="tolerance"):
        st.move_to(StagePosition(x=3e-3))


def test_guard_refuses_travel_outside_window_and_moves_with_ion_beam_on(world):
    from devices.setup_config import Safety
    raw = _stage(world)
    beam = {"on": False}
    guarded = GuardedStage(raw, SafetyGuard(Safety()), ion_beam_on=lambda: beam["on"])
    with pytest.raises(errors.LimitViolation, match="stage.x"):
        guarded.move_to(StagePosition(x=0.2))
    assert raw.moves == 0
    beam["on"] = True
    with pytest.raises(errors.InterlockError):
        guarded.move_to(StagePosition(x=1e-3))
    assert raw.moves == 0
    assert math.isclose(world.stage_actual.x, 0.0)
