"""The ZEISS driver against the timing fake of SmartSEM (devices/sim/smartsem_api.py):
waits bounded by the work, frozen between frames, store snapping, typed errors,
the gun's state, and a whole setup built on the fake."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from devices.clock import SimClock
from devices.errors import DeviceTimeout, LimitViolation
from devices.interfaces import BeamOff, Capability, NotSupported, StagePosition
from devices.sim.smartsem_api import SimEMApi
from devices.zeiss_smartsem import SmartSEMApi, SmartSEMError, ZeissSEM, ZeissStage
from devices.zeiss_tables import CODE, MERLIN_STORES, scan_time_s

ROOT = Path(__file__).resolve().parents[2]


def rig(**fake_kw):
    clock = SimClock(0.0, start=0.0)
    fake = SimEMApi(clock=clock, **fake_kw)
    api = SmartSEMApi(fake)
    # the setup's default 2 s timeout: a margin, never the bound of a grab or move
    sem = ZeissSEM(api, clock=clock, timeout_s=2.0, poll_s=0.05)
    stage = ZeissStage(api, clock=clock, timeout_s=2.0, poll_s=0.05, settle_s=0.5)
    sem.connect()
    stage.connect()
    return clock, fake, sem, stage


def gradient(snap):
    """A frame whose every pixel says where it is: a crop is checked exactly."""
    w, h = snap["store"]
    yy, xx = np.mgrid[0:h, 0:w]
    return ((xx * 7 + yy * 13) % 251).astype(np.uint8)


# ------------------------------------------------------------------- grab
def test_grab_waits_for_the_scan_time_and_the_frozen_frame():
    clock, fake, sem, _ = rig()
    sem.set_frame_size(2048, 1536)
    sem.set_dwell_time(0.8e-6)
    t_scan = scan_time_s(2048, 1536, 0.8e-6)                   # ≈ 2.67 s
    t0 = clock.now()
    frame = sem.acquire_frame()
    took = clock.now() - t0
    assert t_scan <= took < t_scan + 0.2
    assert frame.metadata["t_frozen"] - frame.metadata["t_start"] >= t_scan
    assert frame.image.shape == (1536, 2048) and fake.frozen() and fake.grabs_while_live == 0
    assert frame.metadata["timeout_s"] >= 2 * t_scan       # bound from the work, not the 2 s


def test_grab_polls_on_when_the_microscope_is_slower_than_the_driver_thinks():
    clock, fake, sem, _ = rig(line_flyback_s=2e-3)             # 20x the driver's flyback
    sem.set_frame_size(1024, 768)
    t0 = clock.now()
    sem.acquire_frame()
    assert clock.now() - t0 >= scan_time_s(1024, 768, 0.8e-6, 2e-3)
    assert fake.grabs_while_live == 0                         # never a half-new frame


def test_grab_times_out_on_a_frame_that_never_freezes():
    clock, fake, sem, _ = rig()
    fake.frame_time = lambda: 1e6                             # a scan that never ends
    with pytest.raises(DeviceTimeout, match="DP_FROZEN"):
        sem.acquire_frame()
    assert clock.now() < 60                                   # bounded by 2 frames + margin


# ------------------------------------------------------------- store snapping
def test_512_square_autofocus_patch_is_cropped_from_the_centre_of_a_store():
    clock, fake, sem, _ = rig()
    fake._render = gradient
    sem.set_frame_size(4096, 3072)
    sem.set_frame_size(512, 512)                              # not a SmartSEM store
    assert MERLIN_STORES[fake.dp["DP_IMAGE_STORE"]] == (1024, 768)
    px = sem.pixel_size()
    frame = sem.acquire_frame()
    assert frame.image.shape == (512, 512) and sem.frame_size() == (512, 512)
    full = gradient({"store": (1024, 768)})
    np.testing.assert_array_equal(frame.image, full[128:640, 256:768])
    md = frame.metadata
    assert md["store_size"] == (1024, 768) and md["crop_offset"] == (256, 128)
    assert md["cropped_from_store"] and md["pixel_size"] == pytest.approx(px)


def test_1024_square_irradiation_scan_uses_the_2048_store():
    _, fake, sem, _ = rig()
    sem.set_frame_size(1024, 1024)
    assert MERLIN_STORES[fake.dp["DP_IMAGE_STORE"]] == (2048, 1536)
    assert sem.acquire_frame().image.shape == (1024, 1024)


def test_the_largest_merlin_store_is_offered_and_beyond_it_refused():
    _, fake, sem, _ = rig()
    sem.set_frame_size(32768, 24576)
    assert fake.dp["DP_IMAGE_STORE"] == 11 and sem.frame_size() == (32768, 24576)
    with pytest.raises(LimitViolation, match="32769"):
        sem.set_frame_size(32769, 100)


# ------------------------------------------------------------------- stage
def test_a_1_cm_move_gets_a_timeout_that_fits_it():
    clock, fake, _, stage = rig()
    t0 = clock.now()
    stage.move_to(StagePosition(x=0.01))
    took = clock.now() - t0
    assert took >= 0.01 / 100e-6                              # 100 s at 100 µm/s
    assert stage.last_timeout_s > took > 2.0                  # the 2 s default would have failed
    assert fake.GetStagePosition()[1] == pytest.approx(0.01)


def test_a_120_degree_rotation_fits_its_timeout_even_the_long_way_round():
    clock, _, _, stage = rig()
    stage.move_to(StagePosition(r=math.radians(120)))
    assert stage.last_timeout_s > clock.now() >= 120 / 5.0
    stage.move_to(StagePosition(r=math.radians(240)))
    t0 = clock.now()
    stage.move_to(StagePosition(r=0.0))                       # the fake turns back 240°, not on 120°
    assert stage.last_timeout_s > clock.now() - t0 >= 240 / 5.0


def test_a_stage_slower_than_configured_times_out():
    clock, fake, _, stage = rig()
    fake.stage_speed = tuple(v / 3 for v in fake.stage_speed)
    with pytest.raises(DeviceTimeout, match="DP_STAGE_IS"):
        stage.move_to(StagePosition(x=0.01))
    assert clock.now() < 0.01 / (100e-6 / 3)                  # gave up before the stage did
    assert fake.Get("DP_STAGE_IS")[1] == "Idle"               # and stopped it: a retry may go
    fake.stage_speed = tuple(v * 3 for v in fake.stage_speed)
    assert stage.move_to(StagePosition(x=0.01)).x == pytest.approx(0.01)


def test_a_frame_never_begins_before_the_stage_has_settled():
    clock, fake, sem, stage = rig()
    stage.move_to(StagePosition(x=2e-3))
    stage.move_to(StagePosition(x=2e-3, y=1e-3), verify=False)
    sem.acquire_frame()
    assert fake.frames_during_motion() == []
    assert fake.frames[-1][0] >= fake.moves[-1][1] + stage.settle_s
    t_step = clock.now()
    sem.set_working_distance(sem.working_distance() + 5e-6)   # DeepFocus' ±5 µm step
    sem.acquire_frame()
    assert fake.frames[-1][0] >= t_step + sem.focus_settle_s > t_step


# ------------------------------------------------------------------- dose
def test_no_scan_runs_between_frames():
    clock, fake, sem, stage = rig()
    sem.set_frame_size(1024, 768)
    sem.acquire_frame()
    after_first = fake.live_s()
    assert after_first == pytest.approx(fake.frame_time())    # one frame of beam, no more
    clock.sleep(120.0)                                        # the program thinks
    stage.move_to(StagePosition(x=1e-3))
    sem.set_working_distance(5.005e-3)                        # a ±5 µm focus step
    sem.set_frame_size(512, 384)                              # a store change (SmartSEM unfreezes)
    assert fake.live_s() == pytest.approx(after_first)        # still frozen: no dose
    sem.acquire_frame()
    assert fake.live_s() == pytest.approx(after_first + fake.frame_time())


def test_smartsem_autofocus_leaves_the_scan_frozen():
    clock, fake, sem, _ = rig()
    sem.run_autofocus()
    used = fake.live_s()
    assert fake.frozen() and fake.autofocus_s <= used < fake.autofocus_s + 2 * fake.frame_time() + 0.2
    clock.sleep(60.0)
    assert fake.live_s() == pytest.approx(used)
    sem.run_autostig()
    assert fake.frozen()


# ------------------------------------------------------------ return codes
def test_a_return_code_is_a_typed_error_never_a_value():
    _, fake, sem, _ = rig()
    fake.fail["AP_WD"] = CODE["GET_AP_FAIL"]
    with pytest.raises(SmartSEMError) as e:
        sem.working_distance()                                # the fake sends 0.0 with the code
    assert e.value.code == 1001 and "GET_AP_FAIL" in str(e.value)
    del fake.fail["AP_WD"]
    wd = sem.working_distance()
    with pytest.raises(SmartSEMError, match="SET_FLOAT_LIMIT_HIGH"):
        sem.set_working_distance(0.2)                         # beyond SmartSEM's own limit
    assert sem.working_distance() == wd
    with pytest.raises(SmartSEMError, match="GET_BAD_PARAMETER"):
        sem.api.get_float("AP_NO_SUCH_THING")


def test_a_move_while_busy_is_refused_with_a_code():
    _, fake, _, stage = rig()
    stage.move_to(StagePosition(x=1e-3), verify=False)
    fake.MoveStage(0.02, 0, 0, 0, 0, 0)                      # someone else moves it
    with pytest.raises(SmartSEMError, match="EXEC_CMD_FAIL"):
        stage.api.move_stage(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


def test_calls_before_initialise_remoting_fail_with_not_initialised():
    fake = SimEMApi(clock=SimClock(0.0, start=0.0))
    assert fake.Get("AP_WD", 0)[0] == CODE["NOT_INITIALISED"]


# --------------------------------------------------------------------- EHT
def test_eht_off_is_a_state_and_refuses_a_grab():
    clock, fake, sem, _ = rig(eht_on=False)
    assert sem.eht_on() is False and sem.eht_state() == "EHT Off" and sem.eht() == 0.0
    with pytest.raises(BeamOff, match="EHT Off"):
        sem.acquire_frame()
    assert fake.live_s() == 0.0
    sem.set_eht_on(True, wait=False)
    clock.sleep(fake.runup_s / 2)
    assert not sem.eht_on() and 0 < sem.eht() < fake.Get("AP_MANUALKV")[1]   # AP_ACTUALKV ramps
    sem.set_eht_on(True)
    assert sem.eht_on() and clock.now() >= fake.runup_s
    assert sem.acquire_frame().image.shape == (768, 1024)
    sem.set_eht_on(False)
    assert not sem.eht_on()


# ------------------------------------------------------------ capabilities
def test_column_options_follow_what_is_fitted():
    _, fake, sem, _ = rig()
    need = (Capability.HIGH_CURRENT | Capability.VARIABLE_PRESSURE
            | Capability.CHARGE_COMPENSATION | Capability.EHT_CONTROL | Capability.AUTOSTIG)
    assert need in sem.capabilities
    sem.set_aperture(5)
    assert sem.aperture() == pytest.approx(60e-6)
    sem.set_high_current(True)
    assert sem.high_current()
    sem.set_variable_pressure(True, target_pa=40.0)
    assert sem.variable_pressure() and sem.chamber_pressure() == pytest.approx(40.0)
    sem.set_charge_compensation(True, level=30.0)
    assert sem.charge_compensation()
    _, _, bare, _ = rig(vp_fitted=False, fcc_fitted=False, high_current_fitted=False)
    assert not (Capability.VARIABLE_PRESSURE | Capability.CHARGE_COMPENSATION
                | Capability.HIGH_CURRENT) & bare.capabilities
    for call in (lambda: bare.set_variable_pressure(True), lambda: bare.charge_compensation(),
                 lambda: bare.set_high_current(True)):
        with pytest.raises(NotSupported, match="Capability"):
            call()


# ------------------------------------------------------------------ setup
def zeiss_setup(tmp_path, sem_options=None, stage_options=None):
    from devices.setup_config import load_setup
    data = yaml.safe_load((ROOT / "configs" / "sim.yaml").read_text())
    for role in ("ion_gun", "waveform_generator", "multimeter", "current_preamp"):
        data["devices"].pop(role, None)
    data["devices"]["sem"] = {"driver": "zeiss_smartsem",
                              "options": {"api": "sim", **(sem_options or {})}}
    data["devices"]["stage"] = {"driver": "zeiss_smartsem", "options": stage_options or {}}
    p = tmp_path / "setup.yaml"
    p.write_text(yaml.safe_dump(data))
    return load_setup(p)


def test_a_setup_runs_the_zeiss_driver_on_the_fake_and_sees_the_specimen(tmp_path):
    from devices.factory import build_setup
    cfg = zeiss_setup(tmp_path, {"grab_dir": str(tmp_path), "store_table": [[1024, 768], [512, 384]]},
                      {"settle_s": 0.2, "backlash_m": 5e-6, "speed_m_per_s": {"x": 1e-3}})
    with build_setup(cfg) as setup:
        sem, stage = setup.sem._inner, setup.stage._inner
        assert isinstance(sem, ZeissSEM) and isinstance(stage, ZeissStage)
        assert sem.policy.margin_s == 5.0                        # 2 s default not passed through
        assert sem.store_table == {(1024, 768): 0, (512, 384): 1}
        assert (stage.settle_s, stage.backlash_m, stage.speed["x"]) == (0.2, 5e-6, 1e-3)
        x, y = setup.world.random_tissue_location(np.random.default_rng(0))
        setup.stage.move_to(StagePosition(x=x, y=y))
        assert setup.world.stage_actual.x == pytest.approx(x)
        setup.sem.set_blanked(False)
        frame = setup.sem.acquire_frame()
        assert frame.image.shape == (768, 1024) and frame.image.std() > 5   # a specimen, not noise
        assert list(tmp_path.glob("smartsem_grab_*")) == []


@pytest.mark.parametrize("sem, stage, names", [
    ({"grab_folder": "x"}, {}, ["devices.sem.options", "grab_folder", "grab_dir"]),
    ({"api": "dcom"}, {}, ["devices.sem.options.api", "'dcom'", "com or sim"]),
    ({"store_table": [[1024, 768], [0, 5]]}, {}, ["devices.sem.options.store_table", "0x5"]),
    ({"dwell_table": [1e-7, -1]}, {}, ["devices.sem.options.dwell_table", "> 0"]),
    ({"timeout_factor": 0}, {}, ["devices.sem.options.timeout_factor", "> 0"]),
    ({}, {"speed_m_per_s": {"w": 1e-3}}, ["devices.stage.options.speed_m_per_s.w", "x, y, z"]),
    ({}, {"settle_s": "long"}, ["devices.stage.options.settle_s", "'long'"]),
])
def test_a_bad_zeiss_option_fails_at_load_naming_it(tmp_path, sem, stage, names):
    from devices.setup_config import ConfigError
    with pytest.raises(ConfigError) as e:
        zeiss_setup(tmp_path, sem, stage)
    for name in names:
        assert name in str(e.value), str(e.value)


def test_smartsem_autofocus_on_the_fake_finds_the_worlds_focus(tmp_path):
    from devices.factory import build_setup
    with build_setup(zeiss_setup(tmp_path)) as setup:
        w = setup.world
        wd0 = w.focus_baseline(w.stage_actual.x, w.stage_actual.y)[0]
        setup.sem.set_working_distance(wd0 + 20e-6)
        setup.sem.run_autofocus()
        assert setup.sem.working_distance() == pytest.approx(wd0, abs=2e-6)


def test_a_registered_autofocus_runs_through_the_driver_on_cropped_store_frames(tmp_path):
    from acq.autofocus_step import run_autofocus
    from acq.events import Autofocus
    from acq.plan import AutofocusStep
    from devices.factory import build_setup
    step = AutofocusStep(method="sweep", sweep_range_um=30)
    assert tuple(step.frame_size) not in MERLIN_STORES          # e.g. 512x512: cropped from a store
    with build_setup(zeiss_setup(tmp_path)) as setup:
        w, fake = setup.world, setup.sem.api._com
        x, y = w.random_tissue_location(np.random.default_rng(1))
        setup.stage.move_to(StagePosition(x=x, y=y))
        wd_best = w.focus_baseline(x, y)[0]
        setup.sem.set_working_distance(wd_best + 10e-6)
        ev = Autofocus(key="af:zeiss", cycle=0, section=0, grid=None, center_um=(x * 1e6, y * 1e6),
                       step=step, tile_keys=())
        res, wd, _stig = run_autofocus(setup, ev)
        assert res.ok and abs(wd - wd_best) < 4e-6, res
        assert fake.frozen() and fake.frames_during_motion() == []
        # the beam scanned only the frames the method asked for
        assert fake.live_s() == pytest.approx(len(fake.frames) * fake.frame_time(), rel=1e-6)


def test_a_named_setup_timeout_is_the_margin_and_tables_come_from_options(tmp_path):
    from devices.factory import build_setup
    cfg = zeiss_setup(tmp_path, {"dwell_table": [1e-7, 2e-7, 4e-7], "timeout_factor": 2.0})
    cfg.devices.sem.timeout_s = 10.0                              # as if the file named it
    with build_setup(cfg, connect=False) as setup:
        sem = setup.sem._inner
        assert sem.dwell_table == {0: 1e-7, 1: 2e-7, 2: 4e-7}
        assert (sem.policy.margin_s, sem.policy.factor) == (10.0, 2.0)
        assert setup.stage._inner.policy.margin_s == 5.0          # the stage's not named


def test_frame_metadata_carries_the_keys_the_engine_and_writers_read():
    _, fake, sem, stage = rig()
    stage.move_to(StagePosition(x=1e-3, r=math.radians(30)))
    md = sem.acquire_frame().metadata
    assert md["stage"]["x"] == pytest.approx(1e-3) and md["stage"]["r"] == pytest.approx(math.radians(30))
    assert md["wd_m"] == pytest.approx(sem.working_distance()) and md["eht_v"] == pytest.approx(1500.0)
    px_nm = sem.pixel_size() * 1e9
    assert md["electrons_per_nm2"] == pytest.approx(1.5e-9 * 0.8e-6 / 1.602176634e-19 / px_nm ** 2)
    assert md["scan_time_s"] == pytest.approx(fake.frame_time())


def test_simulated_sem_reports_its_gun_and_refuses_what_it_lacks():
    from devices.setup_config import load_setup
    from devices.sim.sem import SimSEM
    from devices.sim.world import SimWorld
    cfg = load_setup(ROOT / "configs" / "sim.yaml")
    sem = SimSEM(SimWorld(cfg.simulation, cfg.safety, cfg.calibration))
    sem.connect()
    assert Capability.EHT_CONTROL in sem.capabilities and sem.eht_on()
    sem.set_eht_on(False)
    assert not sem.eht_on() and sem.eht_state() == "EHT Off"
    with pytest.raises(BeamOff):
        sem.acquire_frame()
    assert Capability.AUTOSTIG not in sem.capabilities
    with pytest.raises(NotSupported, match="AUTOSTIG"):
        sem.run_autostig()


def test_a_live_scan_runs_only_between_unfreeze_and_freeze():
    # what an SEM-scan irradiation asks for: dose for as long as it says, then frozen
    clock, fake, sem, _ = rig()
    sem.unfreeze()
    clock.sleep(10.0)
    sem.freeze()
    dose_s = fake.live_s()
    assert 10.0 <= dose_s <= 10.0 + fake.frame_time() + 1e-9 and fake.frozen()
    clock.sleep(30.0)
    assert fake.live_s() == dose_s
