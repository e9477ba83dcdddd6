"""The mill approach and return (acq/mill_approach.py): single-axis moves in
the safe order, each verified, refused as a whole when a window cuts the
path, stopped at the first step that does not verify."""
from __future__ import annotations

import math

import pytest
import yaml

from acq.mill_approach import MillApproach, MillApproachFailed, check_plan_windows
from acq.plan import load_plan
from acq.step_context import StepContext
from acq.steps_mill import azimuth_rad, mill_position
from devices.errors import LimitViolation
from devices.factory import build_setup
from devices.interfaces import StagePosition
from devices.safety import SafetyGuard
from devices.setup_config import ConfigError
from tests.support.engine_runs import write_plan, write_setup

MILL_Z_MM = -0.3            # below the imaging height: the approach lowers the specimen first
IMAGING = StagePosition(x=2e-3, y=-1e-3, z=0.2e-3, r=0.0, t=0.0)


def _setup_file(tmp, **stage_windows):
    path = write_setup(tmp, sections=1, name="mill_setup.yaml")
    d = yaml.safe_load(path.read_text())
    d["safety"]["mill_position"]["z_mm"] = MILL_Z_MM
    d["safety"]["stage"].update(stage_windows)
    path.write_text(yaml.safe_dump(d))
    return path


class Recorder:
    """Wraps the (guarded, simulated) stage of a setup: records the axes each
    move_to changes and injects one failure after a chosen move."""

    def __init__(self, setup):
        self.setup, self.stage = setup, setup.stage
        self.moves: list[tuple[str, ...]] = []
        self.fail_at, self.kind = None, None
        self.busy = False
        self.read_offset: dict[str, float] = {}
        real_move, real_pos = self.stage.move_to, self.stage.position

        def move_to(target, **kw):
            before = real_pos()
            self.moves.append(tuple(a for a in StagePosition.AXES
                                    if abs(getattr(target, a) - getattr(before, a)) > 1e-12))
            out = real_move(target, **kw)
            if len(self.moves) == self.fail_at:
                self._inject(self.moves[-1])
            return out

        def position():
            p = real_pos()
            return p.with_(**{a: getattr(p, a) + d for a, d in self.read_offset.items()})

        self.stage.move_to, self.stage.position = move_to, position
        self.stage.is_moving = lambda: self.busy

    def _inject(self, axes):
        world = self.setup.world
        if self.kind == "x_50um_off":             # the driver said done, the stage is elsewhere
            world.stage_actual = world.stage_actual.with_(x=world.stage_actual.x + 50e-6)
        elif self.kind == "reads_back_wrong":     # the axis this step moved reads back off
            self.read_offset = {axes[0]: math.radians(1.0) if axes[0] in "rt" else 50e-6}
        elif self.kind == "stays_busy":
            self.busy = True

    def reset(self, fail_at=None, kind=None):
        self.moves.clear()
        self.fail_at, self.kind = fail_at, kind


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mill_approach")
    plan = load_plan(write_plan(tmp, _setup_file(tmp)))
    setup = build_setup(plan.setup_config)
    blanks: list[bool] = []
    real_blank = setup.ion_gun.set_blanked
    setup.ion_gun.set_blanked = lambda b: (blanks.append(b), real_blank(b))[1]
    rec = Recorder(setup)
    yield setup, plan, rec, blanks
    setup.close()


@pytest.fixture
def ctx(rig):
    setup, plan, rec, blanks = rig
    rec.busy, rec.read_offset = False, {}
    setup.stage.move_to(IMAGING)           # a combined move is fine here: flat, far from the mill position
    rec.reset()
    blanks.clear()
    c = StepContext(setup, plan, journal=None, exposures=None, run_uid="test", incident=lambda *a, **k: None,
                    stop_requested=lambda: None, imaging_z=IMAGING.z, ion_beam_safe=True)
    return c


def _target(setup, azimuth_deg):
    return mill_position(setup, 30.0, math.radians(azimuth_deg))


def test_approach_is_z_then_xy_then_rotation_then_tilt_and_the_return_its_mirror(ctx, rig):
    setup, _, rec, _ = rig
    way = MillApproach(ctx, _target(setup, 120), [math.radians(120), math.radians(240)])
    path = []
    real_move = setup.stage.move_to

    def watch(target, **kw):
        path.append(setup.stage.position())
        return real_move(target, **kw)
    setup.stage.move_to = watch
    try:
        at_mill = way.approach()
        assert rec.moves == [("z",), ("x", "y"), ("r",), ("t",)]
        assert path[1].z == pytest.approx(MILL_Z_MM * 1e-3)        # lowered before anything moves sideways
        assert path[1].x == pytest.approx(IMAGING.x, abs=1e-6)
        assert math.degrees(at_mill.t) == pytest.approx(30.0) and math.degrees(at_mill.r) == pytest.approx(120.0)
        assert setup.guard.near_mill_position(at_mill)
        rec.reset()
        way.rotate(math.radians(240))
        assert rec.moves == [("r",)]                                # an azimuth change moves nothing else
        rec.reset()
        back = way.back_to_imaging()
    finally:
        setup.stage.move_to = real_move
    assert rec.moves == [("t",), ("r",), ("x", "y"), ("z",)]
    assert (back.x, back.y, back.z) == pytest.approx((IMAGING.x, IMAGING.y, IMAGING.z), abs=5e-6)
    assert back.t == 0.0 and back.r == 0.0


def test_a_mill_z_above_the_imaging_height_is_reached_only_away_from_the_column(ctx, rig):
    """z never rises under the column: x/y first, then z up, then r and t; back: t, r, z down, x/y."""
    setup, _, rec, _ = rig
    low = IMAGING.with_(z=-0.4e-3)                     # below the mill z of -0.3 mm
    setup.stage.move_to(low)
    ctx.imaging_z = low.z
    rec.reset()
    way = MillApproach(ctx, _target(setup, 120), [math.radians(120)])
    way.approach()
    assert rec.moves == [("x", "y"), ("z",), ("r",), ("t",)]
    rec.reset()
    back = way.back_to_imaging()
    assert rec.moves == [("t",), ("r",), ("z",), ("x", "y")]
    assert back.z == pytest.approx(low.z) and back.x == pytest.approx(low.x, abs=5e-6)


def test_an_axis_already_in_place_is_not_moved_again(ctx, rig):
    setup, _, rec, _ = rig
    MillApproach(ctx, _target(setup, 0), [0.0]).approach()        # azimuth 0: the rotation is already there
    assert rec.moves == [("z",), ("x", "y"), ("t",)]


APPROACH = [("z",), ("x", "y"), ("r",), ("t",)]
RETURN = [("t",), ("r",), ("x", "y"), ("z",)]


@pytest.mark.parametrize("kind", ["x_50um_off", "reads_back_wrong", "stays_busy"])
@pytest.mark.parametrize("phase,step", [(p, s) for p in ("approach", "return") for s in range(4)])
def test_a_step_that_does_not_verify_stops_the_sequence_and_blanks(ctx, rig, phase, step, kind):
    setup, _, rec, blanks = rig
    way = MillApproach(ctx, _target(setup, 120), [math.radians(120)])
    if phase == "return":
        way.approach()
    rec.reset(fail_at=step + 1, kind=kind)
    blanks.clear()
    with pytest.raises(MillApproachFailed) as err:
        way.approach() if phase == "approach" else way.back_to_imaging()
    expected = (APPROACH if phase == "approach" else RETURN)[:step + 1]
    assert rec.moves == expected                               # the failed step was the last one commanded
    assert err.value.axes == expected[-1]
    assert ("busy" if kind == "stays_busy" else "off by") in str(err.value)
    assert blanks == [True] and setup.ion_gun.gun_status().blanked
    # nothing more moves automatically: the way back (or on) is refused too
    with pytest.raises(MillApproachFailed, match="earlier step"):
        way.back_to_imaging()
    assert rec.moves == expected and way.failed


def test_a_point_outside_the_windows_refuses_before_any_move(ctx, rig, monkeypatch):
    setup, _, rec, _ = rig
    safety = setup.config.safety
    # rotation window ±200°: the approach to 0° and the 120° azimuth fit, the 240° one does not
    narrow = safety.model_copy(update={"stage": safety.stage.model_copy(update={"r_deg": (-200.0, 200.0)})})
    monkeypatch.setattr(setup, "guard", SafetyGuard(narrow))
    with pytest.raises(LimitViolation, match=r"stage\.r"):
        MillApproach(ctx, _target(setup, 0), [0.0, math.radians(120), math.radians(240)])
    assert rec.moves == []
    steep = mill_position(setup, safety.mill_position.max_tilt_deg + 1, 0.0)
    with pytest.raises(LimitViolation, match="max_tilt_deg"):
        MillApproach(ctx, steep, [0.0])
    assert rec.moves == [] and setup.stage.position().t == 0.0


def test_windows_that_make_the_sequence_impossible_are_refused_at_plan_time(tmp_path):
    from devices.setup_config import load_setup
    ok = load_setup(_setup_file(tmp_path, r_deg=[-180.0, 180.0]))
    check_plan_windows(ok.safety, 3, "plan.yaml")           # 240° is reached as -120°
    class _S:                                               # the setup's azimuth choice agrees
        config = ok
    assert [round(math.degrees(azimuth_rad(_S, k, 3))) for k in range(3)] == [0, 120, -120]
    narrow = load_setup(_setup_file(tmp_path, r_deg=[-90.0, 90.0]))
    with pytest.raises(ConfigError, match=r"mill\.azimuths = 3 .*120 deg.*safety\.stage\.r_deg"):
        check_plan_windows(narrow.safety, 3, "plan.yaml")
    check_plan_windows(narrow.safety, 1, "plan.yaml")       # one azimuth: no rotation needed
    tilted = load_setup(_setup_file(tmp_path, t_deg=[5.0, 60.0]))
    with pytest.raises(ConfigError, match=r"safety\.stage\.t_deg"):
        check_plan_windows(tilted.safety, 3, "plan.yaml")


def test_the_engine_mill_goes_through_the_approach(run_tiny, tmp_path):
    """A whole run: every stage move near the mill position or tilted is a
    single-axis move, in the approach order, the three azimuths, the mirror
    order back; the run's mills are unchanged."""
    moves = []

    def before(engine, setup):
        stage, real_move = setup.stage, setup.stage.move_to

        def record(target, **kw):
            p = stage.position()
            moves.append((tuple(a for a in StagePosition.AXES if abs(getattr(target, a) - getattr(p, a)) > 1e-12),
                          target))
            return real_move(target, **kw)
        stage.move_to = record

    sp = _setup_file(tmp_path)
    engine, setup, docs, res = run_tiny(plan_over={"cycles": 1, "setup": str(sp)}, before=before)
    assert res.status == "success", res.reason
    first = next(i for i, (axes, t) in enumerate(moves) if t.z == pytest.approx(MILL_Z_MM * 1e-3))
    mill = [axes for axes, _ in moves[first:first + 9]]
    assert mill == [("z",), ("x", "y"), ("t",), ("r",), ("r",), ("t",), ("r",), ("x", "y"), ("z",)]
    rotations = [round(math.degrees(t.r)) for axes, t in moves[first:first + 9] if axes == ("r",)]
    assert rotations == [120, 240, 0]
    assert setup.world.mill_log.seconds == pytest.approx(60.0)
    assert not setup.guard.near_mill_position(setup.stage.position())     # back at imaging after the mill


def test_a_stage_that_keeps_missing_the_mill_position_pauses_the_run_with_the_beam_never_on(run_tiny, tmp_path):
    """Every x/y move to the mill position ends 50 µm off: the Mill stops at
    that step (nothing tilted, the ion beam never unblanked) and the runner
    pauses for the operator at once: no automatic retry from where the stage
    stopped. A resume before the stage is back is refused again; once the
    operator has brought it back and fixed it, resume mills the whole 60 s."""
    import threading
    from acq.runner import PauseReason
    pauses, moves, broken, start = [], [], [True], []

    def before(engine, setup):
        engine.on_pause(pauses.append)
        stage, real_move, world = setup.stage, setup.stage.move_to, setup.world

        def off_at_mill(target, **kw):           # goes 50 µm beside the target, says done
            if not start:
                start.append(stage.position())   # the imaging pose the approach left
            moves.append((broken[0], target, world.mill_log.seconds))
            if broken[0] and setup.guard.near_mill_position(target):
                return real_move(target.with_(x=target.x + 50e-6), **kw)
            return real_move(target, **kw)
        stage.move_to = off_at_mill

        def operator(state, reason):
            if state == "paused" and not reason.startswith("suspended"):
                if len(pauses) == 1:                 # first: resume without looking: refused again
                    threading.Thread(target=engine.resume, daemon=True).start()
                elif broken[0]:                      # then: fix the stage, bring it back by hand, resume
                    broken[0] = False
                    real_move(start[0])
                    threading.Thread(target=engine.resume, daemon=True).start()
                else:                                # never hang
                    threading.Thread(target=engine.abort, daemon=True).start()
        engine.on_state_change(operator)

    engine, setup, docs, res = run_tiny(plan_over={"cycles": 1, "suspenders": {"max_consecutive_failures": 2}},
                                        before=before, on_pause="wait")
    assert res.status == "success", res.reason
    # no suspend-and-retry: a stage check for the operator, and again while the stage is still at the mill
    assert [p.reason for p in pauses] == [PauseReason.STAGE_CHECK, PauseReason.STAGE_CHECK]
    assert "mill approach: x/y" in pauses[0].message and "x off by 49" in pauses[0].message
    assert "not at an imaging pose" in pauses[1].message
    checks = [d for d in docs if d.kind == "incident" and d.cause == "stage_check"]
    assert len(checks) == 2
    while_broken = [(t, milled) for b, t, milled in moves if b]
    assert while_broken and all(t.t == 0.0 and milled == 0.0 for t, milled in while_broken)
    assert setup.world.mill_log.seconds == pytest.approx(60.0)


def test_a_failed_return_pauses_for_the_operator_and_no_tile_moves_the_tilted_stage(run_tiny, tmp_path):
    """The mill is done but tilting back flat fails: the run pauses for the
    operator (stage check) instead of imaging on with a combined move from the
    tilted mill pose; the mill is not repeated after the resume."""
    import threading
    from acq.runner import PauseReason
    pauses, moves, start, broken = [], [], [], [True]

    def before(engine, setup):
        engine.on_pause(pauses.append)
        stage, real_move = setup.stage, setup.stage.move_to

        def move_to(target, **kw):
            here = stage.position()
            if not start:
                start.append(here)
            moves.append((here, target))
            if broken[0] and here.t > 1e-3 and abs(target.t) < 1e-9:     # tilting back flat fails
                from devices.errors import MoveFailed
                raise MoveFailed("tilt drive stalled", device="stage", operation="move")
            return real_move(target, **kw)
        stage.move_to = move_to

        def operator(state, reason):
            if state == "paused" and not reason.startswith("suspended"):
                broken[0] = False
                real_move(start[0])                  # the operator brings the stage back by hand
                threading.Thread(target=engine.resume, daemon=True).start()
        engine.on_state_change(operator)

    engine, setup, docs, res = run_tiny(plan_over={"cycles": 1}, before=before, on_pause="wait")
    assert res.status == "success", res.reason
    assert [p.reason for p in pauses] == [PauseReason.STAGE_CHECK]
    assert "return to imaging failed" in pauses[0].message
    tilted = [(here, t) for here, t in moves if here.t > 1e-3]
    assert tilted and all(abs(t.x - here.x) < 1e-9 and abs(t.y - here.y) < 1e-9 for here, t in tilted)
    assert setup.world.mill_log.seconds == pytest.approx(60.0)             # milled once, not again
