"""ZEISS SmartSEM driver against a fake of the COM control (no Windows needed)."""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import tifffile

from devices.errors import (AcquisitionFailed, CommunicationError, DeviceError, DeviceTimeout,
                            LimitViolation, MoveFailed, NotConnected)
from devices.interfaces import Capability, ScanParams, StagePosition
from devices.zeiss_smartsem import SmartSEMApi, SmartSEMError, ZeissSEM, ZeissStage

K_MAG = 0.1142784          # m: pixel size = K / (mag * width), SBEMimage's Merlin factor
STORE = {0: (1024, 768), 1: (512, 384), 2: (2048, 1536), 3: (3072, 2304), 4: (4096, 3072)}


class FakeClock:
    def __init__(self):
        self.t = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, dt: float) -> None:
        self.sleeps.append(dt)
        self.t += dt


class FakeEMApi:
    """Speaks like win32com's view of CZ.EMApiCtrl.1: codes, (code, value) tuples,
    labels for DP_ parameters, metres/degrees for the stage."""

    def __init__(self):
        self.params = {"AP_WD": 0.005, "AP_STIG_X": 1.5, "AP_STIG_Y": -2.0, "AP_MAG": 1000.0,
                       "AP_MANUALKV": 3000.0, "AP_ACTUALKV": 2990.0, "AP_IPROBE": 1e-10,
                       "AP_SCANROTATION": 0.0, "DP_SCAN_ROT": "Off", "DP_SCANRATE": "4",
                       "DP_BEAM_BLANKING": "No", "DP_FREEZE_ON": "End Frame",
                       "SV_VERSION": "V06.00", "DP_RUNUPSTATE": "Beam On"}
        self.store = 1                     # 512 x 384 keeps the TIFFs small
        self.frozen, self.freeze_polls, self.unfreeze_polls = "Frozen", 0, 0
        self._pending: tuple[str, int] | None = None
        self.never_freeze = False
        self.pos = [1e-3, 2e-3, 5e-3, 0.0, 0.0, 0.25]   # x, y, z (m), t, r (deg), m
        self.move_busy_polls, self.busy_left, self.busy_forever = 2, 0, False
        self.short_by = 0.0                  # m left short on x at the end of each move
        self.af_polls, self.af_left = 3, 0
        self.fail: dict[str, int] = {}       # parameter/command/method -> return code
        self.grab_image: np.ndarray | None = None
        self.log: list[tuple] = []

    def _code(self, key: str) -> int:
        return self.fail.get(key, 0)

    def InitialiseRemoting(self):
        self.log.append(("InitialiseRemoting",))
        return self._code("InitialiseRemoting")

    def ClosingControl(self):
        self.log.append(("ClosingControl",))
        return 0

    def Get(self, name, _flag):
        value = self._value(name)
        self.log.append(("Get", name, value))
        return (self._code(name) or (1000 if value is None else 0)), value

    def _value(self, name):
        if name == "DP_FROZEN":
            if self._pending:
                state, left = self._pending
                self._pending = (state, left - 1) if left > 1 else None
                if left <= 1:
                    self.frozen = state
            return self.frozen
        if name == "DP_IMAGE_STORE":
            return "%d * %d" % STORE[self.store]
        if name == "AP_PIXEL_SIZE":
            return K_MAG / (self.params["AP_MAG"] * STORE[self.store][0])
        if name == "DP_STAGE_IS":
            busy = self.busy_forever or self.busy_left > 0
            self.busy_left -= 1
            return "Busy" if busy else "Idle"
        if name == "DP_AUTO_FN_STATUS":
            self.af_left -= 1
            return "Busy" if self.af_left >= 0 else "Idle"
        return self.params.get(name)

    def Set(self, name, value):
        self.log.append(("Set", name, value))
        if self._code(name):
            return self._code(name), value
        if name == "DP_IMAGE_STORE":
            self.store = int(value)
        elif name == "DP_SCAN_ROT":
            self.params[name] = "On" if value else "Off"
        elif name == "DP_BEAM_BLANKING":
            self.params[name] = "Yes" if value else "No"
        elif name in self.params or name == "DP_FREEZE_ON":
            self.params[name] = value
        else:
            return 1004, value
        return 0, value

    def Execute(self, cmd):
        self.log.append(("Execute", cmd))
        if self._code(cmd):
            return self._code(cmd)
        if cmd == "CMD_FREEZE_ALL" and not self.never_freeze:
            self._pending = ("Frozen", self.freeze_polls)
            if not self.freeze_polls:
                self.frozen, self._pending = "Frozen", None
        elif cmd == "CMD_UNFREEZE_ALL":
            self._pending = ("Live", self.unfreeze_polls)
            if not self.unfreeze_polls:
                self.frozen, self._pending = "Live", None
        elif cmd.startswith("CMD_SCANRATE"):
            self.params["DP_SCANRATE"] = cmd[len("CMD_SCANRATE"):]
        elif cmd == "CMD_AUTO_FOCUS_FINE":
            self.af_left = self.af_polls
        elif cmd not in ("CMD_FREEZE_ALL", "CMD_STAGE_ABORT", "CMD_ABORT_AUTO"):
            return 1011
        return 0

    def GetStagePosition(self):
        return (self._code("GetStagePosition"), *self.pos)

    def MoveStage(self, x, y, z, t, r, m):
        self.log.append(("MoveStage", x, y, z, t, r, m))
        self.pos = [x - self.short_by, y, z, t, r, m]
        self.busy_left = self.move_busy_polls
        return self._code("MoveStage")

    def Grab(self, x, y, w, h, reduction, filename):
        self.log.append(("Grab", x, y, w, h, reduction))
        if self._code("Grab"):
            return self._code("Grab")
        wd, ht = STORE[self.store]
        if self.grab_image is None:
            self.grab_image = np.random.default_rng(1).integers(0, 256, (ht, wd), dtype=np.uint8)
        tifffile.imwrite(filename, self.grab_image)
        return 0

    def executed(self) -> list[str]:
        return [e[1] for e in self.log if e[0] == "Execute"]

    def sets(self, name: str) -> list:
        return [e[2] for e in self.log if e[0] == "Set" and e[1] == name]


@pytest.fixture
def fake():
    return FakeEMApi()


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def sem(fake, clock, tmp_path):
    s = ZeissSEM(fake, timeout_s=1.0, poll_s=0.01, image_dir=str(tmp_path), clock=clock,
                 sleep=clock.sleep)
    s.connect()
    return s


@pytest.fixture
def stage(sem, clock):
    st = ZeissStage(sem.api, timeout_s=1.0, poll_s=0.01, settle_s=0.1, clock=clock,
                    sleep=clock.sleep)
    st.connect()
    return st


# ------------------------------------------------------------------ connection
def test_imports_without_pywin32_and_refuses_to_run_without_an_api(monkeypatch):
    for mod in ("pythoncom", "win32com", "win32com.client"):   # as on Linux
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(DeviceError, match="Windows.*pass api="):
        ZeissSEM()
    with pytest.raises(DeviceError, match="pass api="):
        ZeissStage()


def test_sem_and_stage_share_one_remoting_session(fake):
    api = SmartSEMApi(fake)
    sem, stage = ZeissSEM(api), ZeissStage(api)
    sem.connect()
    stage.connect()
    sem.close()
    assert [e[0] for e in fake.log].count("ClosingControl") == 0   # the stage still uses it
    stage.close()
    assert [e[0] for e in fake.log].count("InitialiseRemoting") == 1
    assert [e[0] for e in fake.log].count("ClosingControl") == 1
    assert ZeissSEM.capabilities & Capability.AUTOFOCUS


def test_calls_before_connect_raise_not_connected(fake):
    with pytest.raises(NotConnected):
        ZeissSEM(fake).working_distance()


def test_failed_initialise_remoting_raises(fake):
    fake.fail["InitialiseRemoting"] = 1019
    with pytest.raises(CommunicationError, match="InitialiseRemoting returned 1019"):
        ZeissSEM(fake).connect()


# --------------------------------------------------------------------- units
def test_unit_conversion_both_ways(sem, fake, stage):
    sem.set_working_distance(4.2e-3)                  # m in, m in the API
    assert fake.params["AP_WD"] == pytest.approx(4.2e-3)
    fake.params["AP_WD"] = 0.0061
    assert sem.working_distance() == pytest.approx(6.1e-3)
    sem.set_eht(5000.0)
    assert fake.params["AP_MANUALKV"] == 5000.0       # V
    assert sem.eht() == pytest.approx(2990.0)          # AP_ACTUALKV
    sem.set_probe_current(2e-10)
    assert sem.probe_current() == pytest.approx(2e-10)
    sem.set_stig(0.7, -0.4)
    assert sem.stig() == pytest.approx((0.7, -0.4))   # %
    sem.set_scan_rotation(math.pi / 2)
    assert fake.params["AP_SCANROTATION"] == pytest.approx(90.0)
    assert fake.params["DP_SCAN_ROT"] == "On"
    assert sem.scan_rotation() == pytest.approx(math.pi / 2)
    sem.set_scan_rotation(-math.pi / 2)
    assert fake.params["AP_SCANROTATION"] == pytest.approx(270.0)
    fake.pos = [1e-3, -2e-3, 4e-3, 10.0, 90.0, 0.0]  # t, r in degrees
    p = stage.position()
    assert (p.x, p.y, p.z) == pytest.approx((1e-3, -2e-3, 4e-3))
    assert (p.t, p.r) == pytest.approx((math.radians(10.0), math.pi / 2))


def test_pixel_size_is_set_through_magnification(sem, fake):
    sem.set_pixel_size(10e-9)
    assert fake.params["AP_MAG"] == pytest.approx(K_MAG / (512 * 10e-9))
    assert sem.pixel_size() == pytest.approx(10e-9)
    assert not fake.sets("AP_PIXEL_SIZE")              # read-only in SmartSEM


def test_set_scan_sets_the_frame_before_the_pixel_size(sem, fake):
    """The pixel size follows from mag and frame width: a frame set after it
    would change it again, so set_scan orders them."""
    sem.set_scan(ScanParams(pixel_m=10e-9, frame=(2048, 1536), dwell_s=0.8e-6))
    assert sem.frame_size() == (2048, 1536) and sem.pixel_size() == pytest.approx(10e-9)
    assert sem.dwell_time() == pytest.approx(0.8e-6)
    assert not fake.sets("DP_SCAN_ROT")                 # not given: left alone


def test_scanning_puts_back_what_it_changed(sem, fake):
    sem.set_scan(ScanParams(pixel_m=10e-9, frame=(2048, 1536)))
    sem.set_blanked(True)
    with sem.scanning(ScanParams(pixel_m=4e-9, frame=(512, 384))):
        assert (sem.frame_size(), sem.blanked()) == ((512, 384), False)
        assert sem.pixel_size() == pytest.approx(4e-9)
    assert sem.frame_size() == (2048, 1536) and sem.pixel_size() == pytest.approx(10e-9) and sem.blanked()
    # rotation and dwell never touched; a store change is re-frozen at once (SmartSEM unfreezes on it)
    assert not fake.sets("DP_SCAN_ROT") and set(fake.executed()) == {"CMD_FREEZE_ALL"}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1e-3, 0.0, "5 mm"])
def test_bad_setpoints_are_refused_before_sending(sem, fake, bad):
    with pytest.raises(LimitViolation):
        sem.set_working_distance(bad)
    assert not fake.sets("AP_WD")


# -------------------------------------------------------------- return codes
@pytest.mark.parametrize("key, code, action", [
    ("AP_WD", 1001, lambda s: s.working_distance()),
    ("AP_WD", 1008, lambda s: s.set_working_distance(0.02)),
    ("AP_IPROBE", 1005, lambda s: s.set_probe_current(1e-9)),
    ("CMD_SCANRATE5", 1012, lambda s: s.set_dwell_time(1.6e-6)),
    ("CMD_FREEZE_ALL", 1012, lambda s: s.freeze()),
])
def test_non_zero_return_code_raises_naming_parameter_and_code(sem, fake, key, code, action):
    fake.fail[key] = code
    with pytest.raises(SmartSEMError) as e:
        action(sem)
    assert isinstance(e.value, CommunicationError) and e.value.code == code
    assert key in str(e.value) and str(code) in str(e.value)


def test_unknown_parameter_is_an_error_not_a_value(sem, fake):
    with pytest.raises(CommunicationError, match="1000"):
        sem.api.get("AP_NO_SUCH_THING")


def test_stage_position_return_code_raises(stage, fake):
    fake.fail["GetStagePosition"] = 1001
    with pytest.raises(CommunicationError, match="GetStagePosition returned 1001"):
        stage.position()


# --------------------------------------------------------- scan rate / store
def test_dwell_maps_to_nearest_scan_rate(sem, fake):
    sem.set_dwell_time(0.75e-6)
    assert fake.executed()[-1] == "CMD_SCANRATE4"
    assert sem.dwell_time() == pytest.approx(0.8e-6)
    sem.set_dwell_time(60e-9)
    assert fake.executed()[-1] == "CMD_SCANRATE0"
    n = len(fake.executed())
    with pytest.raises(LimitViolation):
        sem.set_dwell_time(1e-3)                      # far beyond 12.8 µs
    assert len(fake.executed()) == n


def test_frame_size_maps_to_store_index_snaps_and_refuses_oversize(sem, fake):
    sem.set_frame_size(2048, 1536)
    assert fake.sets("DP_IMAGE_STORE") == [2]
    assert sem.frame_size() == (2048, 1536)
    sem.set_frame_size(1000, 1000)                    # no store: 2048x1536 holds it
    assert fake.sets("DP_IMAGE_STORE") == [2] and sem.frame_size() == (1000, 1000)
    for bad in ((40000, 100), (0, 10)):
        with pytest.raises(LimitViolation, match="frame_size"):
            sem.set_frame_size(*bad)
    assert fake.sets("DP_IMAGE_STORE") == [2]


def test_blanking_and_unexpected_labels(sem, fake):
    sem.set_blanked(True)
    assert fake.sets("DP_BEAM_BLANKING") == [1] and sem.blanked()
    assert "CMD_BEAM_OFF" not in fake.executed()        # that would switch the EHT off
    fake.params["DP_BEAM_BLANKING"] = "Maybe"
    with pytest.raises(CommunicationError, match="Maybe"):
        sem.blanked()


# -------------------------------------------------------------------- freeze
def test_freeze_does_not_sleep_when_already_frozen(sem, clock):
    sem.freeze()
    assert clock.sleeps == []


def test_freeze_polls_until_frozen(sem, fake, clock):
    fake.frozen, fake.freeze_polls = "Live", 3
    sem.freeze()
    assert len(clock.sleeps) == 2 and fake.frozen == "Frozen"


def test_freeze_that_never_happens_times_out(sem, fake, clock):
    fake.frozen, fake.never_freeze = "Live", True
    with pytest.raises(DeviceTimeout, match="DP_FROZEN=Frozen"):
        sem.freeze()
    bound = sem.policy.grab(512, 384, 0.8e-6)         # a frame's time, not a fixed timeout
    assert bound <= clock.t < bound + 0.1


# ------------------------------------------------------------------- acquire
def test_acquire_frame_returns_the_tiff_pixels_and_metadata(sem, fake, tmp_path):
    fake.unfreeze_polls = 2                           # the stale frame stays frozen briefly
    frame = sem.acquire_frame()
    assert frame.image.dtype == np.uint8 and frame.image.shape == (384, 512)
    np.testing.assert_array_equal(frame.image, fake.grab_image)
    md = frame.metadata
    assert md["working_distance"] == pytest.approx(0.005)
    assert md["stig"] == pytest.approx((1.5, -2.0))
    assert md["pixel_size"] == pytest.approx(K_MAG / (1000 * 512))
    assert md["dwell_time"] == pytest.approx(0.8e-6)
    assert md["eht"] == pytest.approx(2990.0) and md["probe_current"] == pytest.approx(1e-10)
    assert md["t_start"] <= md["t_frozen"] <= md["t_end"] and md["started_utc"]
    # freeze on end of frame, see the scan live, freeze, grab, and stay frozen
    kinds = [(e[0], e[1] if len(e) > 1 else None) for e in fake.log]
    i_live = max(i for i, e in enumerate(fake.log) if e[:2] == ("Get", "DP_FROZEN")
                 and e[2] == "Live" and i < kinds.index(("Execute", "CMD_FREEZE_ALL")))
    assert kinds.index(("Set", "DP_FREEZE_ON")) < i_live < kinds.index(("Grab", 0))
    assert fake.executed() == ["CMD_UNFREEZE_ALL", "CMD_FREEZE_ALL"]
    assert fake.sets("DP_FREEZE_ON") == [0]
    assert list(tmp_path.iterdir()) == []             # temp TIFF removed


def test_grab_failure_raises_and_leaves_the_scan_frozen(sem, fake, tmp_path):
    fake.fail["Grab"] = 1016
    with pytest.raises(AcquisitionFailed, match="1016"):
        sem.acquire_frame()
    assert fake.executed()[-1] == "CMD_FREEZE_ALL" and fake.frozen == "Frozen"
    assert list(tmp_path.iterdir()) == []


def test_incomplete_grab_is_refused(sem, fake):
    fake.grab_image = np.zeros((100, 512), np.uint8)
    with pytest.raises(AcquisitionFailed, match="expected uint8"):
        sem.acquire_frame()


def test_acquire_times_out_when_the_frame_never_freezes(sem, fake):
    fake.never_freeze = True
    with pytest.raises(DeviceTimeout):
        sem.acquire_frame()
    assert fake.executed()[-1] == "CMD_FREEZE_ALL" and not any(e[0] == "Grab" for e in fake.log)


# ----------------------------------------------------------------- autofocus
def test_autofocus_polls_until_idle(sem, fake, clock):
    sem.run_autofocus()
    assert "CMD_AUTO_FOCUS_FINE" in fake.executed() and fake.af_left < 0
    assert "CMD_ABORT_AUTO" not in fake.executed()


def test_autofocus_that_never_ends_is_aborted(sem, fake):
    fake.af_polls = 10 ** 6
    with pytest.raises(DeviceTimeout, match="DP_AUTO_FN_STATUS"):
        sem.run_autofocus()
    assert fake.executed()[-2:] == ["CMD_ABORT_AUTO", "CMD_FREEZE_ALL"]


# --------------------------------------------------------------------- stage
def test_stage_move_waits_for_idle_and_verifies(stage, fake, clock):
    target = StagePosition(x=3e-3, y=-1e-3, z=6e-3, r=math.radians(30), t=math.radians(5))
    actual = stage.move_to(target)
    (_, x, y, z, t, r, m), = [e for e in fake.log if e[0] == "MoveStage"]
    assert (x, y, z) == pytest.approx((3e-3, -1e-3, 6e-3))
    assert (t, r, m) == pytest.approx((5.0, 30.0, 0.25))   # degrees; m passed back
    assert actual.x == pytest.approx(3e-3) and actual.r == pytest.approx(math.radians(30))
    assert len(clock.sleeps) == 2                     # two Busy polls


def test_stage_rotation_wraps_when_verifying(stage, fake):
    fake.move_busy_polls = 0
    orig = fake.MoveStage
    fake.MoveStage = lambda x, y, z, t, r, m: orig(x, y, z, t, r % 360.0, m)   # 0..360 only
    actual = stage.move_to(StagePosition(x=1e-3, y=2e-3, z=5e-3, r=-math.pi / 2))
    assert actual.r == pytest.approx(3 * math.pi / 2)


def test_stage_stopping_short_raises_move_failed(stage, fake, clock):
    fake.short_by = 5e-6
    with pytest.raises(MoveFailed, match="x off by"):
        stage.move_to(StagePosition(x=3e-3, y=2e-3, z=5e-3))
    assert clock.t >= 0.1                             # it was given settle_s first


def test_stage_short_move_accepted_without_verify(stage, fake):
    fake.short_by = 5e-6
    assert stage.move_to(StagePosition(x=3e-3, y=2e-3, z=5e-3), verify=False).x == \
        pytest.approx(3e-3 - 5e-6)


def test_stage_busy_forever_times_out(stage, fake):
    fake.busy_forever = True
    with pytest.raises(DeviceTimeout, match="DP_STAGE_IS"):
        stage.move_to(StagePosition(x=3e-3, y=2e-3, z=5e-3))
    stage.stop()
    assert fake.executed()[-1] == "CMD_STAGE_ABORT"


def test_backlash_approaches_from_the_negative_side(sem, fake, clock):
    stage = ZeissStage(sem.api, backlash_m=20e-6, clock=clock, sleep=clock.sleep, poll_s=0.01)
    stage.move_to(StagePosition(x=0.5e-3, y=1.5e-3, z=5e-3))    # from +x, +y: detour
    moves = [e[1:3] for e in fake.log if e[0] == "MoveStage"]
    np.testing.assert_allclose(moves, [(0.48e-3, 1.48e-3), (0.5e-3, 1.5e-3)])
    fake.log.clear()
    stage.move_to(StagePosition(x=1.5e-3, y=2.5e-3, z=5e-3))    # from -x, -y: direct
    np.testing.assert_allclose([e[1:3] for e in fake.log if e[0] == "MoveStage"],
                               [(1.5e-3, 2.5e-3)])


def test_stage_refuses_non_finite_targets(stage, fake):
    with pytest.raises(LimitViolation):
        stage.move_to(StagePosition(x=math.nan))
    assert not any(e[0] == "MoveStage" for e in fake.log)
