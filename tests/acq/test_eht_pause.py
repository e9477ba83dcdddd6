"""EHT off -> the run pauses with that reason (PauseReason.EHT_OFF), loses no
tile and goes on once the gun is on again: on the ZEISS driver against its fake
SmartSEM, where switching the gun on takes its run-up time."""
from __future__ import annotations

from collections import Counter

import pytest

from tests.acq.test_zeiss_demo import demo_plan, zeiss_setup_file
from tests.support.engine_runs import planned_tiles, records


def make(tmp, **over):
    from acq.engine import Engine
    from acq.plan import load_plan
    from devices.factory import build_setup
    over.setdefault("overview", None)
    over.setdefault("cycles", 1)
    over.setdefault("suspenders", {"poll_s": 5, "max_suspend_s": 600})
    plan = load_plan(demo_plan(tmp, zeiss_setup_file(tmp), "none", **over))
    setup = build_setup(plan.setup_config)
    docs: list = []
    return Engine(setup, plan, tmp / "out", subscribers=[docs.append], on_pause="stop"), setup, docs


def operator_switches_on(engine, setup, pauses: list):
    """At the pause the operator presses Beam On (run-up on the fake: 30 s simulated)."""
    def on_pause(p):
        pauses.append((p, setup.clock.now()))
        setup.sem.set_eht_on(True, wait=False)
    engine.on_pause(on_pause)


def gun_off_at(engine, setup, key: str):
    """The gun goes off once, just before event ``key`` (after its suspender checks)."""
    done = []

    def on_step(ev):
        if ev.key == key and not done:
            done.append(ev.key)
            setup.sem.set_eht_on(False)
    engine.on_step(on_step)


def assert_every_tile_once(engine):
    out = engine.out_dir
    done = Counter(r["key"] for r in records(out, "tile_done"))
    assert set(done) == planned_tiles(engine) and set(done.values()) == {1}


def test_eht_off_between_tiles_pauses_with_that_reason_and_resumes_after_run_up(tmp_path):
    from acq.runner import PauseReason
    from gui.run_progress import pause_advice
    engine, setup, docs = make(tmp_path)
    tiles = sorted(planned_tiles(engine))
    pauses: list = []
    try:
        # off during the move to the second tile: the EHT check before the tile sees it
        gun_off_at(engine, setup, f"move:{tiles[1]}")
        operator_switches_on(engine, setup, pauses)
        res = engine.run()
    finally:
        setup.close()
    assert res.status == "success", res.reason
    assert len(pauses) == 1
    pause, t_pause = pauses[0]
    assert pause.reason is PauseReason.EHT_OFF and pause.data == {"suspender": "eht"}
    assert "EHT is off" in pause.message and "switch it on (run-up ~1 min) and resume" in pause.message
    assert "switch it on" in pause_advice(pause).lower()
    causes = [i.cause for i in engine.incidents]
    assert "suspended_eht" in causes and "resumed_eht" in causes
    resumed = next(i for i in engine.incidents if i.cause == "resumed_eht")
    waited = float(resumed.message.split("after ")[1].split(" s")[0])
    assert waited >= setup.sem.inner.api._com.runup_s          # not before the run-up finished
    assert_every_tile_once(engine)
    imaged = [d for d in docs if d.kind == "tile"]
    assert all(d.image.std() > 5 for d in imaged)               # no tile imaged with the gun off (noise only)


def test_a_grab_with_the_gun_off_pauses_the_same_way_and_images_the_tile_again(tmp_path):
    """The gun goes off after the check, so the grab itself meets it (BeamOff):
    an eht_off incident, the same pause, and the tile imaged after the run-up."""
    from acq.runner import PauseReason
    engine, setup, docs = make(tmp_path, retries={"backoff_s": 0.0})
    tiles = sorted(planned_tiles(engine))
    pauses: list = []
    try:
        gun_off_at(engine, setup, tiles[0])
        operator_switches_on(engine, setup, pauses)
        res = engine.run()
    finally:
        setup.close()
    assert res.status == "success", res.reason
    assert [p.reason for p, _ in pauses] == [PauseReason.EHT_OFF]
    off = [i for i in engine.incidents if i.cause == "eht_off"]
    assert len(off) == 1 and off[0].context["event"] == tiles[0] and off[0].context["error"] == "BeamOff"
    assert not [i for i in engine.incidents if i.cause == "device_error"]   # not counted as a device failure
    assert_every_tile_once(engine)


def test_without_eht_control_no_eht_check(tmp_path):
    """A SEM without Capability.EHT_CONTROL gets no EHT suspender."""
    from acq.suspenders import default_suspenders
    from devices.interfaces import Capability
    engine, setup, _ = make(tmp_path)
    try:
        assert engine.suspenders.eht is not None
        assert [s.name for s in engine.suspenders][:2] == ["disk_space", "eht"]
        setup.sem.inner.capabilities &= ~Capability.EHT_CONTROL
        assert default_suspenders(setup, engine.plan, tmp_path / "x").eht is None
    finally:
        engine.close_unstarted()
        setup.close()


@pytest.mark.parametrize("table", ["gui", "notify"])
def test_every_pause_reason_of_the_eht_has_advice(table):
    from acq.runner import PauseReason
    if table == "gui":
        from gui.run_progress import _ADVICE as advice
    else:
        from acq.notify import PAUSE_ADVICE as advice
    assert "switch it on" in advice[PauseReason.EHT_OFF].lower()
