"""The acquisition engine on the simulated GCIB-SEM: runs, interlocks, the
dose step, fault handling, suspenders and the pause/resume/abort lifecycle.

Helpers here (tiny setup and plan files) are shared with test_plan.py and
test_resume.py. Plans are small (1x2 tiles of 256x192 px, a real-EM-like
texture from a tiny TIFF) so every run takes about a second.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from acq.runner import PauseReason
from tests.support.engine_runs import (done_counts, planned_tiles, records, write_plan,
                                       write_setup)

ROOT = Path(__file__).resolve().parents[2]


def auto_resume(engine, fix=None):
    """Play the operator: when the run pauses for the operator, fix and resume."""
    reasons: list[str] = []

    def cb(state, reason):
        if state == "paused" and not reason.startswith("suspended"):
            reasons.append(reason)
            if fix is not None:
                fix()
            threading.Thread(target=engine.resume, daemon=True).start()
    engine.on_state_change(cb)
    return reasons


# ------------------------------------------------------------------ runs
def test_tiny_plan_runs_to_completion_through_the_cli(tmp_path, capsys):
    from acq.cli import run_plan
    from acq.journal import read_records
    setup = write_setup(tmp_path)
    plan = write_plan(tmp_path, setup)
    out = tmp_path / "run"
    assert run_plan(plan, out=out) == 0
    printed = capsys.readouterr().out
    assert "success: 8 tiles acquired" in printed and "MB" in printed
    counts = done_counts(out)
    assert len(counts) == 8 and set(counts.values()) == {1}          # 2 sections x 2 tiles x 2 cycles
    for r in read_records(out):
        if r["rec"] == "tile_done":
            assert r["files"] and all(Path(f).is_file() for f in r["files"])
    assert len(list((out / "tiles").rglob("*.ome.tif"))) == 8
    assert [r["cycle"] for r in records(out, "mill_done")] == [0, 1]
    doses = [r["dose_1e27_ev_cm3"] for r in records(out, "irr_done")]
    assert len(doses) == 2 and all(0.5 <= d < 0.55 for d in doses)


def test_document_stream_is_ordered_and_complete(run_tiny):
    engine, setup, docs, res = run_tiny()
    assert res.status == "success", res.reason
    kinds = [d.kind for d in docs]
    assert kinds[0] == "start" and kinds[-1] == "stop" and docs[-1].exit_status == "success"
    assert kinds.count("tile") == 8 and kinds.count("cycle_done") == 2 and kinds.count("section_done") == 4
    for d in docs:
        if d.kind == "section_done":          # a section's tiles come before its SectionDone
            seen = {x.tile_id for x in docs[:docs.index(d)] if x.kind == "tile"}
            assert set(d.tile_ids) <= seen
    tiles = [d for d in docs if d.kind == "tile"]
    assert all(t.image.shape == (192, 256) and t.version == 0 for t in tiles)
    # the second cycle images a milled surface: another slice of the specimen
    a = next(t for t in tiles if t.cycle == 0).image.astype(float)
    b = next(t for t in tiles if t.cycle == 1).image.astype(float)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] < 0.5
    assert setup.world.mill_log.seconds == pytest.approx(120.0)


def test_step_callbacks_see_each_event_before_it_runs_and_cannot_break_the_run(run_tiny):
    steps = []

    def observe(engine, setup):
        engine.on_step(lambda ev: steps.append((type(ev).__name__, setup.world.mill_log.seconds)))
        engine.on_step(lambda ev: 1 / 0)                      # a broken observer is logged, not raised
    engine, setup, docs, res = run_tiny(before=observe)
    assert res.status == "success", res.reason
    names = [n for n, _ in steps]
    assert names.count("AcquireTile") == 8 and names.count("Mill") == 2
    # reported before it runs: each Mill step is announced before its 60 s of milling
    assert [sec for n, sec in steps if n == "Mill"] == [0.0, pytest.approx(60.0)]


def test_interlocks_hold_throughout_a_run(run_tiny):
    """Stage never moves with the ion beam on the specimen; while ions mill,
    the SEM beam is blanked and the stage is at the mill position."""
    moves, violations = [], []

    def before(engine, setup):
        world, stage = setup.world, setup.stage
        real_move = stage.move_to

        def recording_move(target, **kw):
            moves.append((world.ion_beam_hits_specimen(), world.ion.raster_on, target))
            return real_move(target, **kw)
        stage.move_to = recording_move

        def invariant(t0, dt):
            if world.ion_beam_hits_specimen():
                if not world.sem.blanked:
                    violations.append(("SEM beam on while milling", t0))
                if not setup.guard.near_mill_position(world.stage_actual):
                    violations.append(("ion beam on away from the mill position", t0))
        world.clock.on_advance(invariant)

    engine, setup, docs, res = run_tiny(before=before)
    assert res.status == "success", res.reason
    assert violations == []
    assert moves and not any(hits for hits, _, _ in moves)
    mill_moves = [t for _, _, t in moves if setup.guard.near_mill_position(t)]
    rotations = sorted({round(np.degrees(t.r)) for t in mill_moves})
    assert rotations == [0, 120, 240]                         # three azimuths, 120° apart
    assert {round(np.degrees(t.t)) for t in mill_moves} == {0, 30}   # glancing angle, then flat again
    assert setup.world.mill_log.seconds == pytest.approx(2 * 60.0)
    st = setup.ion_gun.gun_status()
    assert st.blanked and not st.beam_on and not setup.waveform_generator.outputs_on()


def test_wd_outside_the_window_pauses_with_an_incident(run_tiny):
    """A sweep reaching below the setup's 3 mm working distance is refused
    by the guard: LimitViolation -> error Incident -> paused, nothing moved."""
    states = []

    def before(engine, setup):
        def cb(state, reason):
            states.append((state, reason))
            if state == "paused":
                threading.Thread(target=engine.abort, daemon=True).start()
        engine.on_state_change(cb)

    engine, setup, docs, res = run_tiny(plan_over={"autofocus": {"method": "sweep", "sweep_range_um": 1000},
                                                   "imaging": {"wd_mm": 3.5}, "irradiation": None},
                                        before=before, on_pause="wait")
    assert res.status == "aborted"
    inc = [d for d in docs if d.kind == "incident" and d.cause == "limit_violation"]
    assert inc and "working_distance" in inc[0].message and "[3, 8] mm" in inc[0].message
    assert any(s == "paused" and "safety window" in r for s, r in states)
    assert 3e-3 <= setup.sem.working_distance() <= 8e-3
    assert setup.sem.blanked()
    assert not [d for d in docs if d.kind == "tile"]


def test_sweep_autofocus_finds_focus(run_tiny):
    def before(engine, setup):
        setup.sem.set_working_distance(setup.sem.working_distance() + 20e-6)   # 20 µm off
    engine, setup, docs, res = run_tiny(plan_over={"autofocus": {"method": "sweep", "sweep_range_um": 30},
                                                   "cycles": 1, "irradiation": None, "mill": None},
                                        setup_kw={"sections": 1}, before=before)
    assert res.status == "success", res.reason
    assert abs(setup.sem.aberration().dz_m) < 2e-6
    assert len(records(engine.out_dir, "autofocus_done")) == 1


def test_pause_resume_and_abort_happen_between_events(run_tiny):
    def before(engine, setup):
        seen = []

        def sub(doc):
            if doc.kind == "tile":
                seen.append(doc)
                if len(seen) == 1:
                    engine.pause()
        engine.subscribe(sub)

        def cb(state, reason):
            if state == "paused" and reason == "paused by the operator":
                assert setup.sem.blanked()          # paused: beam off the specimen
                threading.Thread(target=engine.resume, daemon=True).start()
        engine.on_state_change(cb)
    engine, setup, docs, res = run_tiny(before=before, on_pause="wait")
    assert res.status == "success"
    assert set(done_counts(engine.out_dir).values()) == {1}

    def abort_early(engine, setup):
        engine.subscribe(lambda d: d.kind == "tile" and engine.abort())
    engine, setup, docs, res = run_tiny(before=abort_early, out="out2")
    assert res.status == "aborted" and docs[-1].exit_status == "aborted"
    assert 1 <= len(done_counts(engine.out_dir)) < 8
    assert setup.sem.blanked() and setup.ion_gun.gun_status().blanked


# ------------------------------------------------------------------ faults
def _rule(device, operation, kind, *calls):
    return {"device": device, "operation": operation, "kind": kind, "at_calls": list(calls)}


# Every FaultRule kind. Rules on the same operation share its call counter, so
# one run exercises several kinds. Per kind: the incident an operator sees
# (None: the driver absorbs it below the engine).
FAULT_GROUPS = {
    "sem": ([_rule("sem", "acquire_frame", "timeout", 2),
             _rule("sem", "acquire_frame", "grab_failure", 4, 5, 6),          # every try: suspend, reconnect, retry
             _rule("sem", "acquire_frame", "incomplete_frame", 9),
             _rule("sem", "acquire_frame", "frozen_frame", 12)],
            {"timeout": "retry", "grab_failure": "suspended_failures", "incomplete_frame": "retry",
             "frozen_frame": "retry"}),
    "stage": ([_rule("stage", "move_to", "move_failure", 3, 4)], {"move_failure": "suspended_failures"}),
    "instruments": ([_rule("multimeter", "query", "disconnect", 10),        # sticky until reconnected
                     _rule("waveform_generator", "write", "visa_error", 3),
                     _rule("ion_gun", "status", "communication", 3, 4),     # garbled replies
                     _rule("ion_gun", "beam_on", "timeout", 1)],
                    {"disconnect": "retry", "visa_error": "retry", "communication": None, "timeout": None}),
}


@pytest.mark.parametrize("group", sorted(FAULT_GROUPS))
def test_every_fault_kind_is_survived(run_tiny, group):
    rules, causes = FAULT_GROUPS[group]
    # failed grabs scan the tile too: more than the default exposure budget of 3 (tests/test_run_safety.py)
    engine, setup, docs, res = run_tiny(setup_kw={"faults": rules}, max_exposures=10)
    assert res.status == "success", res.reason
    injected = {k for _, _, k, _ in setup.world.faults.injected}
    assert set(causes) <= injected, f"never injected: {set(causes) - injected}"
    counts = done_counts(engine.out_dir)
    assert set(counts) == planned_tiles(engine) and set(counts.values()) == {1}
    assert len(records(engine.out_dir, "mill_done")) == 2 and len(records(engine.out_dir, "mill_started")) == 2
    seen = {d.cause for d in docs if d.kind == "incident"}
    for kind, cause in causes.items():
        if cause is not None:
            assert cause in seen, f"{kind}: no {cause} incident"
    tiles = [d for d in docs if d.kind == "tile"]
    assert len(tiles) == len(counts)                  # no glitched frame was published
    assert setup.world.mill_log.seconds == pytest.approx(120.0)


def test_consecutive_failures_pause_for_the_operator_then_resume(run_tiny):
    rule = {"device": "sem", "operation": "acquire_frame", "kind": "grab_failure", "at_calls": list(range(2, 40))}
    found, pauses = {}, []

    def before(engine, setup):
        engine.on_pause(pauses.append)
        found["reasons"] = auto_resume(engine, fix=lambda: setup.world.faults.rules.clear())
    engine, setup, docs, res = run_tiny(setup_kw={"faults": [rule]},
                                        plan_over={"suspenders": {"max_consecutive_failures": 2}}, before=before,
                                        on_pause="wait", max_exposures=10)
    assert res.status == "success", res.reason
    reasons = found["reasons"]
    assert reasons and "2 consecutive failures" in reasons[0]
    assert "grab_failure" in reasons[0] or "injected fault" in reasons[0]
    assert PauseReason.DEVICE_FAILURES in [p.reason for p in pauses]      # the GUI's advice comes from this
    counts = done_counts(engine.out_dir)
    assert set(counts) == planned_tiles(engine) and set(counts.values()) == {1}


# ------------------------------------------------------------------ suspenders
def _emulator(setup):
    return next(f.__self__ for f in setup._closers if type(getattr(f, "__self__", None)).__name__ == "IonGunEmulator")


def test_probe_current_suspender_waits_until_the_current_is_back(run_tiny):
    def before(engine, setup):
        world, real = setup.world, setup.sem.acquire_frame
        state = {"n": 0}

        def acquire():
            state["n"] += 1
            if state["n"] == 2:                       # the probe current drops after the first tile
                world.sem.probe_current_a = 0.5e-9
                t_back = world.clock.now() + 30.0
                world.clock.on_advance(lambda t0, dt: t0 + dt >= t_back and
                                       setattr(world.sem, "probe_current_a", 1.8e-9))
            return real()
        setup.sem.acquire_frame = acquire
    engine, setup, docs, res = run_tiny(plan_over={"irradiation": None}, before=before)
    assert res.status == "success", res.reason
    causes = [d.cause for d in docs if d.kind == "incident"]
    assert "suspended_probe_current" in causes and "resumed_probe_current" in causes
    assert set(done_counts(engine.out_dir).values()) == {1} and len(done_counts(engine.out_dir)) == 8


def test_interlock_open_suspends_the_mill_and_resumes_it(run_tiny):
    """The door opens mid-mill: the gun trips, the mill stops with the time
    milled known, the run suspends until the interlock closes, then mills
    the remaining time only."""
    def before(engine, setup):
        emu, world = _emulator(setup), setup.world
        opened = {"done": False}

        def trip(t0, dt):
            if not opened["done"] and world.mill_log.seconds >= 25:
                opened["done"] = True
                emu.set_interlock("door", False)
        world.clock.on_advance(trip)
        sus = next(s for s in engine.suspenders if s.name == "ion_interlock")
        real_check, polls = sus.check, []

        def check():
            msg = real_check()
            if msg:
                polls.append(msg)
                if len(polls) >= 3:
                    emu.set_interlock("door", True)
            return msg
        sus.check = check
    engine, setup, docs, res = run_tiny(plan_over={"irradiation": None}, before=before)
    assert res.status == "success", res.reason
    causes = [d.cause for d in docs if d.kind == "incident"]
    assert "mill_interrupted" in causes and "suspended_ion_interlock" in causes and "resumed_ion_interlock" in causes
    assert 110.0 <= setup.world.mill_log.seconds <= 120.0 + 1e-6     # never more than planned
    assert len(records(engine.out_dir, "mill_started")) == 2 and len(records(engine.out_dir, "mill_done")) == 2


def test_disk_nearly_full_suspends(run_tiny, monkeypatch):
    import acq.suspenders as sus
    calls = {"n": 0}

    def free(path):
        calls["n"] += 1
        return 10 ** 6 if 3 <= calls["n"] <= 5 else 10 ** 12
    monkeypatch.setattr(sus, "free_bytes", free)
    engine, setup, docs, res = run_tiny(plan_over={"irradiation": None, "cycles": 1})
    assert res.status == "success", res.reason
    inc = [d for d in docs if d.kind == "incident" and d.cause == "suspended_disk_space"]
    assert inc and "disk nearly full" in inc[0].message


def test_irradiation_integrates_the_measured_current(run_tiny):
    from acq.steps_irradiation import dose_1e27
    engine, setup, docs, res = run_tiny(plan_over={"mill": None, "cycles": 1}, setup_kw={"sections": 1})
    assert res.status == "success", res.reason
    rec = records(engine.out_dir, "irr_done")[0]
    # the simulated specimen absorbs 0.8 of the 10 nA probe: q = I t
    assert rec["charge_c"] == pytest.approx(0.8 * 10e-9 * rec["seconds"], rel=0.03)
    assert rec["dose_1e27_ev_cm3"] == pytest.approx(dose_1e27(rec["charge_c"], 3000.0, 100, 250))
    assert 0.5 <= rec["dose_1e27_ev_cm3"] <= 0.55 and rec["reached"]
    info = [d for d in docs if d.kind == "incident" and d.cause == "irradiation_dose"]
    assert info and "e27 eV/cm³" in info[0].message
    assert setup.sem.eht() == pytest.approx(1500.0)            # imaging EHT restored

