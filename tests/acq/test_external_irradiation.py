"""Irradiation with an external electron source (plan irradiation.source:
external): the simulated flood gun's current goes through the SR570
emulator and the simulated 34465A like the SEM probe's does, the step
integrates it to the target dose (seed eq. 2.1) and the source is closed
after the dose, on a failure, on a safety stop and on a signal."""
from __future__ import annotations

import pytest
import yaml

from acq.runner import PauseReason
from tests.support.engine_runs import make_engine, records, write_plan, write_setup

EXTERNAL = {"irradiation": {"source": "external", "target_dose_1e27_ev_cm3": 0.5, "area_um2": 100,
                            "thickness_nm": 250, "max_duration_s": 600, "eht_kv": 3.0},
            "mill": None, "cycles": 1}
SOURCE = {"driver": "sim", "options": {"emission_current_na": 10.0, "energy_kv": 3.0}}   # 8 nA reach the section


def add_source(setup_file, source=SOURCE, safety=None):
    d = yaml.safe_load(setup_file.read_text())
    if source is not None:
        d["devices"]["electron_source"] = source
    if safety is not None:
        d.setdefault("safety", {})["electron_source"] = safety
    setup_file.write_text(yaml.safe_dump(d))
    return setup_file


@pytest.fixture
def external(tmp_path, monkeypatch):
    """run(plan_over, source, safety, before, **engine_kw) -> (engine, setup, docs, result)."""
    import tests.support.engine_runs as er
    made = []
    plain = er.write_setup

    def run(plan_over=None, source=SOURCE, safety=None, before=None, **engine_kw):
        monkeypatch.setattr(er, "write_setup", lambda tmp, **kw: add_source(plain(tmp, sections=1, **kw),
                                                                            source, safety))
        engine_kw.setdefault("on_pause", "stop")
        engine, setup, docs = make_engine(tmp_path, {**EXTERNAL, **(plan_over or {})}, **engine_kw)
        made.append(setup)
        if before is not None:
            before(engine, setup)
        return engine, setup, docs, engine.run()
    yield run
    for s in made:
        s.close()


def one_sample_dose(current_a, interval_s=1.0):
    from acq.steps_irradiation import dose_1e27
    return dose_1e27(current_a * interval_s, 3000.0, 100, 250)


# ------------------------------------------------------------------ the formula
def test_dose_formula_matches_a_hand_computation():
    from acq.steps_irradiation import dose_ev_cm3, target_charge
    from acq.plan import IrradiationStep
    # a seed section: 500 x 250 µm, 200 nm thick, 3 kV, 1 µA for 100 s
    # q = 1e-4 C = 6.2415e14 electrons, each 3000 eV: 1.8724e18 eV in 1.25e-3 cm² x 2e-5 cm = 2.5e-8 cm³
    hand = 3000 * (1e-4 / 1.602176634e-19) / (500e-4 * 250e-4 * 200e-7)
    assert hand == pytest.approx(7.4898e25, rel=1e-4)
    assert dose_ev_cm3(1e-4, 3000.0, 500 * 250, 200) == pytest.approx(hand, rel=1e-12)
    # the seed's 0.5e27 eV/cm³ on that section needs 6.68e-4 C (about 11 min at 1 µA)
    step = IrradiationStep(target_dose_1e27_ev_cm3=0.5, area_um2=500 * 250, thickness_nm=200, max_duration_s=3600)
    assert target_charge(step) == pytest.approx(0.5e27 * 2.5e-8 * 1.602176634e-19 / 3000, rel=1e-12)
    assert target_charge(step) == pytest.approx(6.676e-4, rel=1e-3)


# ------------------------------------------------------------------ runs
def test_external_source_reaches_the_target_dose_and_is_closed(external):
    engine, setup, docs, res = external()
    assert res.status == "success", res.reason
    rec = records(engine.out_dir, "irr_done")[0]
    assert rec["source"] == "external" and rec["reached"]
    # the measured charge is the source's 8 nA over the time it was open (the SEM stayed blanked)
    assert rec["charge_c"] == pytest.approx(8e-9 * rec["seconds"], rel=0.03)
    # at the target, overshoot at most a couple of DMM samples (block end + Simpson's boundary)
    assert 0.5 <= rec["dose_1e27_ev_cm3"] <= 0.5 + 2 * one_sample_dose(8e-9)
    src = setup.electron_source
    assert src.opened == 1 and not src.beam_on()
    assert setup.sem.eht() == pytest.approx(1500.0)            # the SEM's EHT was never touched
    assert setup.sem.blanked()
    # progress for the GUI: rising doses, the last one the delivered dose
    prog = [d.context for d in docs if d.kind == "incident" and d.context.get("progress")]
    assert len(prog) >= 2
    doses = [p["dose_1e27_ev_cm3"] for p in prog]
    assert doses == sorted(doses) and doses[-1] == pytest.approx(rec["dose_1e27_ev_cm3"])
    assert all(p["source"] == "external" for p in prog)


def test_source_closed_when_it_fails_mid_irradiation_and_the_dose_continues(external):
    state_at_pause = []

    def before(engine, setup):
        src = setup.electron_source
        real = src.source_status
        calls = {"n": 0}

        def status():
            calls["n"] += 1
            if calls["n"] == 4:                 # after two blocks of dose
                src.fail_next = "injected: serial line dropped"
            return real()
        src.source_status = status
        engine.on_pause(lambda p: state_at_pause.append((p.reason, src._open)))
    engine, setup, docs, res = external(before=before)
    assert res.status == "success", res.reason
    # the failure suspended the run (policy: reconnect and retry); the source was closed by then
    assert state_at_pause and state_at_pause[0] == (PauseReason.SUSPENDED, False)
    assert any(d.kind == "incident" and d.cause == "device_error" and "injected" in d.message for d in docs)
    rec = records(engine.out_dir, "irr_done")[0]
    assert rec["reached"] and setup.electron_source.opened == 2
    assert 0.5 <= rec["dose_1e27_ev_cm3"] <= 0.5 + 2 * one_sample_dose(8e-9)    # progress kept, not repeated
    assert not setup.electron_source.beam_on()


def test_source_closed_and_run_stops_when_failures_need_the_operator(external):
    def before(engine, setup):
        real_read = setup.multimeter.read_block
        calls = {"n": 0}

        def read_block(n, interval):
            calls["n"] += 1
            if calls["n"] >= 2:
                from devices.errors import DeviceTimeout
                raise DeviceTimeout("injected: no reading", device="multimeter", operation="read")
            return real_read(n, interval)
        setup.multimeter.read_block = read_block
    engine, setup, docs, res = external(plan_over={"suspenders": {"max_consecutive_failures": 1, "poll_s": 1},
                                                   "retries": {"irradiation": 2, "backoff_s": 0.0}},
                                        before=before, on_pause="stop")
    assert res.status != "success"
    # opened, closed while the meter failed (no unmeasured dose), opened again for the retry, closed at the end
    assert not setup.electron_source.beam_on() and setup.electron_source.opened == 2
    assert not records(engine.out_dir, "irr_done")
    assert records(engine.out_dir, "irr_progress")          # resume continues from here


def test_current_above_the_safety_window_closes_the_source(external):
    engine, setup, docs, res = external(safety={"max_current_na": 5.0})      # the source delivers 8 nA
    assert res.status != "success"
    lim = [d for d in docs if d.kind == "incident" and d.cause == "limit_violation"]
    assert lim and "max_current_na" in lim[0].message
    assert not setup.electron_source.beam_on() and setup.electron_source.opened == 1
    # the block that broke the window is counted and journaled first: a resume does not deliver it again
    assert records(engine.out_dir, "irr_progress")[-1]["charge_c"] > 0


def test_signal_mid_irradiation_closes_the_source(external):
    def before(engine, setup):
        def sub(doc):
            if doc.kind == "incident" and doc.context.get("progress"):
                engine.stop_now("SIGTERM")
        engine.subscribe(sub)
    engine, setup, docs, res = external(before=before)
    assert res.status == "aborted"
    assert not setup.electron_source.beam_on()
    assert not records(engine.out_dir, "irr_done") and records(engine.out_dir, "irr_progress")


def test_source_energy_other_than_the_plans_is_refused_before_opening(external):
    engine, setup, docs, res = external(plan_over={"irradiation": {**EXTERNAL["irradiation"], "eht_kv": 5.0}},
                                        source={"driver": "sim", "options": {"emission_current_na": 10.0}})
    # the sim source takes the energy setpoint: it runs at 5 kV and the dose uses U = 5 kV
    assert res.status == "success", res.reason
    rec = records(engine.out_dir, "irr_done")[0]
    assert rec["eht_v"] == 5000.0 and setup.electron_source.energy_v == 5000.0

    def no_energy_setpoint(engine, setup):
        type(setup.electron_source).energy_setpoint = False          # a source set by hand, at 3 kV
    try:
        engine, setup, docs, res = external(plan_over={"irradiation": {**EXTERNAL["irradiation"], "eht_kv": 5.0}},
                                            source={"driver": "sim", "options": {"emission_current_na": 10.0,
                                                                                 "energy_kv": 3.0}},
                                            before=no_energy_setpoint, out="out2")
    finally:
        from devices.sim.electron_source import SimElectronSource
        SimElectronSource.energy_setpoint = True
    assert res.status != "success"
    assert any(d.kind == "incident" and "eht_kv = 5 kV" in d.message for d in docs)
    assert setup.electron_source.opened == 0


# ------------------------------------------------------------------ plan check
def test_plan_with_external_source_refused_without_electron_source(tmp_path):
    from acq.plan import load_plan
    from devices.setup_config import ConfigError
    setup_file = write_setup(tmp_path, sections=1)
    d = yaml.safe_load(setup_file.read_text())
    d["devices"].pop("electron_source", None)           # a microscope without a flood gun
    setup_file.write_text(yaml.safe_dump(d))
    plan = write_plan(tmp_path, setup_file, **EXTERNAL)
    with pytest.raises(ConfigError) as e:
        load_plan(plan)
    assert "irradiation.source = 'external'" in str(e.value) and "devices.electron_source" in str(e.value)
    # the same plan with source: sem (the default) is fine on that setup
    load_plan(write_plan(tmp_path, setup_file, name="sem.yaml",
                         **{**EXTERNAL, "irradiation": {**EXTERNAL["irradiation"], "source": "sem"}}))


def test_plan_longer_than_the_exposure_window_is_refused(tmp_path):
    from acq.plan import load_plan
    from devices.setup_config import ConfigError
    setup_file = add_source(write_setup(tmp_path, sections=1), safety={"max_exposure_s": 300})
    with pytest.raises(ConfigError, match=r"irradiation.max_duration_s = 600.*max_exposure_s; allowed at most 300"):
        load_plan(write_plan(tmp_path, setup_file, **EXTERNAL))


def test_emission_setpoint_only_with_the_external_source(tmp_path):
    from acq.plan import IrradiationStep
    from pydantic import ValidationError
    with pytest.raises(ValidationError, match="emission_current_na"):
        IrradiationStep(target_dose_1e27_ev_cm3=0.5, area_um2=100, thickness_nm=250, max_duration_s=600,
                        emission_current_na=10)
    with pytest.raises(ValidationError, match="source"):
        IrradiationStep(source="flood", target_dose_1e27_ev_cm3=0.5, area_um2=100, thickness_nm=250,
                        max_duration_s=600)


def test_setup_refuses_an_unknown_electron_source_driver(tmp_path):
    from devices.setup_config import ConfigError, load_setup
    setup_file = add_source(write_setup(tmp_path, sections=1), source={"driver": "staib_eh50"})
    with pytest.raises(ConfigError, match=r"devices.electron_source.driver = 'staib_eh50'"):
        load_setup(setup_file)


# ------------------------------------------------------------------ the serial shutter driver
@pytest.fixture
def shutter():
    from devices.electron_source_serial import SerialShutterSource
    from devices.sim.electron_source import ShutterEmulator
    emu = ShutterEmulator().start()
    src = SerialShutterSource(emu.url, timeout_s=0.5)
    yield emu, src
    src.close()
    emu.stop()


def test_serial_shutter_opens_and_closes_with_verification(shutter):
    emu, src = shutter
    emu.is_open = True                          # left open by someone: connect closes it first
    src.connect()
    assert not emu.is_open and emu.lines[:2] == ["CLOSE", "STATE?"]
    src.set_beam(True)
    assert emu.is_open and src.beam_on()
    src.close()                                 # disconnecting closes the shutter
    assert not emu.is_open


def test_serial_shutter_that_does_not_open_is_an_interlock_and_is_closed_again(shutter):
    from devices.errors import InterlockError
    emu, src = shutter
    src.connect()
    emu.stuck = True
    with pytest.raises(InterlockError, match="did not open"):
        src.set_beam(True)
    assert emu.lines[-1] == "CLOSE"             # a doubtful open is followed by a close


def test_serial_shutter_error_reply_and_bad_options(shutter):
    from devices.electron_source_serial import SerialShutterSource
    from devices.errors import DeviceError
    emu, _ = shutter
    src = SerialShutterSource(emu.url, {"query": "STAT"}, timeout_s=0.5)
    with pytest.raises(DeviceError, match="controller says \"ERR unknown command 'STAT'\""):
        src.connect()
    with pytest.raises(ValueError, match=r"devices.electron_source.options.speed: unknown option"):
        SerialShutterSource(emu.url, {"speed": 9600})
    with pytest.raises(ValueError, match=r"options.baudrate = 1234"):
        SerialShutterSource(emu.url, {"baudrate": 1234})


def test_run_with_the_serial_shutter_on_its_emulator(external):
    engine, setup, docs, res = external(source={"driver": "serial_shutter", "url": "sim://", "timeout_s": 0.5},
                                        plan_over={"irradiation": {**EXTERNAL["irradiation"],
                                                                   "target_dose_1e27_ev_cm3": 5.0,
                                                                   "preamp_sensitivity_a_per_v": 1e-7}})
    assert res.status == "success", res.reason
    rec = records(engine.out_dir, "irr_done")[0]
    # the emulator's source: 1 µA, 0.8 of it on the section; the span before the first sample is not
    # counted (integration runs from sample to sample), so at most one interval less than I·t
    assert rec["reached"] and 0.8e-6 * (rec["seconds"] - 1.0) * 0.99 <= rec["charge_c"] <= 0.8e-6 * rec["seconds"]
    assert not setup.electron_source.emulator.is_open


@pytest.mark.parametrize("source, words", [
    ({"driver": "serial_shutter"}, ["devices.electron_source.url", "serial port"]),
    ({"driver": "serial_shutter", "url": "COM5", "options": {"open_reply": "X", "closed_reply": "X"}},
     ["open_reply and closed_reply must differ"]),
    ({"driver": "sim", "options": {"specimen_fraction": 2}}, ["options.specimen_fraction = 2.0", "(0, 1]"]),
])
def test_setup_refuses_bad_electron_source_settings_at_load(tmp_path, source, words):
    from devices.setup_config import ConfigError, load_setup
    setup_file = add_source(write_setup(tmp_path, sections=1), source=source)
    with pytest.raises(ConfigError) as e:
        load_setup(setup_file)
    assert all(w in str(e.value) for w in words), str(e.value)
