"""Serial ion gun driver against the table-driven emulator (socket://), plus a
pure formatting / parsing test against a fake serial port."""
from __future__ import annotations

import concurrent.futures
import math
import time
import types
from pathlib import Path

import pytest
import yaml

from devices import iongun_serial
from devices.command_table import REQUIRED_OPERATIONS, load_command_table, parse_command_table, reply_template
from devices.errors import CommunicationError, DeviceTimeout, InterlockError, LimitViolation, NotConnected
from devices.interfaces import Capability
from devices.iongun_serial import SerialIonGun, setup_limits
from devices.setup_config import ConfigError, FaultRule, Safety
from devices.sim.faults import FaultInjector
from devices.sim.iongun_emulator import IonGunEmulator

TABLE = Path(__file__).resolve().parents[2] / "configs" / "iongun" / "ionoptika_sim.yaml"
T = 0.2   # per-operation timeout for every test: keeps injected timeouts fast


@pytest.fixture(autouse=True)
def _no_reconnect_pause(monkeypatch):
    """pyserial's socket:// close() sleeps 0.3 s so that a real terminal
    server can accept a quick reconnect; the emulator needs no such pause and
    ~20 closes would dominate the test time. Only that module's sleep goes."""
    from serial.urlhandler import protocol_socket
    monkeypatch.setattr(protocol_socket, "time", types.SimpleNamespace(**{**vars(time), "sleep": lambda _s: None}))


def rule(op, kind, **kw):
    return FaultRule(device="ion_gun", operation=op, kind=kind, **kw)


@pytest.fixture
def emu():
    with IonGunEmulator(TABLE) as e:
        yield e


@pytest.fixture
def make_gun():
    guns = []

    def make(emulator, **kw):
        g = SerialIonGun(emulator.url, TABLE, timeout_s=T, **kw)
        g.connect()
        guns.append(g)
        return g
    yield make
    for g in guns:
        try:
            g.close()
        except Exception:                               # the test already judged the gun
            pass


def milling(gun):
    gun.set_beam(True)
    gun.set_raster(True)
    gun.set_blanked(False)


# ------------------------------------------------------------ connect / identity
def test_identify_then_blank_on_connect(emu, make_gun):
    emu.beam_on, emu.blanked = True, False          # gun left milling by a crashed session
    gun = make_gun(emu)
    assert gun.identity() == "IONOPTIKA,GCIB-10S-SIM,SIM0001,1.0"
    assert emu.received_ops() == ["identify", "blank"]
    assert emu.state().blanked
    caps = SerialIonGun.capabilities
    assert Capability.BEAM_BLANKING in caps and Capability.RASTER in caps and Capability.CLUSTER_SIZE in caps


def test_energy_and_cluster_size_round_trip_in_si(emu, make_gun):
    gun = make_gun(emu)
    gun.set_energy(7500.0)
    gun.set_cluster_size(3000)
    assert ("set_energy", "EN 7.500") in emu.received
    assert ("set_cluster_size", "CS 3000") in emu.received
    assert emu.energy == pytest.approx(7.5)         # table units (kV) inside the gun
    assert gun.energy() == pytest.approx(7500.0)
    st = gun.gun_status()
    assert st.energy == pytest.approx(7500.0) and st.cluster_size == 3000
    assert st.blanked and not st.beam_on and st.interlocks_ok
    assert st.interlocks == {"vacuum": True, "gas": True, "door": True}
    milling(gun)
    st = gun.gun_status()
    assert st.beam_on and not st.blanked and st.raster_on
    assert st.target_current == pytest.approx(5e-9) and gun.target_current() == pytest.approx(5e-9)
    assert st.emission_current == pytest.approx(200e-6)
    assert gun.status().healthy


def test_out_of_range_refused_before_sending(emu, make_gun):
    gun = make_gun(emu, limits={"energy_v": (0.0, 6000.0), "cluster_size": (100, 5000)})
    before = emu.state()
    emu.clear_log()
    for call, value, allowed in [
        ("set_energy", 12000.0, "setup safety"),        # setup is checked first
        ("set_energy", 100.0, "command table"),         # table: 0.5..10 kV
        ("set_energy", 8000.0, "setup safety"),         # setup: 0..6 kV
        ("set_energy", math.nan, "finite"),
        ("set_energy", None, "a number"),
        ("set_cluster_size", 6000, "setup safety"),     # setup: 100..5000
        ("set_cluster_size", 20, "setup safety"),
        ("set_cluster_size", 1000.5, "integer"),
        ("set_cluster_size", "many", "number"),
    ]:
        with pytest.raises(LimitViolation, match=allowed):
            getattr(gun, call)(value)
    assert emu.received == []                           # nothing reached the gun
    after = emu.state()
    assert (after.energy_v, after.cluster_size) == (before.energy_v, before.cluster_size)
    gun.set_energy(6000.0)                              # the window's edge is allowed
    assert emu.state().energy_v == pytest.approx(6000.0)


def test_table_window_checked_when_setup_allows_more(emu, make_gun):
    gun = make_gun(emu, limits=setup_limits(Safety(ion_cluster_size=(1, 50000))))
    emu.clear_log()
    with pytest.raises(LimitViolation, match=r"\[50, 10000\]"):
        gun.set_cluster_size(20000)
    assert emu.received == []


# ------------------------------------------------------------ error handling
def test_error_reply_surfaces_and_beam_ends_blanked(make_gun):
    with IonGunEmulator(TABLE, energy_limits_v=(500.0, 4000.0)) as emu:   # hardware narrower than table
        gun = make_gun(emu)
        milling(gun)
        with pytest.raises(CommunicationError, match=r"error 2: energy 6 outside 0\.5\.\.4"):
            gun.set_energy(6000.0)
        assert emu.received_ops().count("set_energy") == 1   # a refusal is not retried
        assert emu.state().blanked and not emu.state().milling
        assert "energy 6 outside" in gun.gun_status().error
        assert "energy 6 outside" in gun.last_error()
        assert gun.last_error() == ""                   # reading cleared it


def test_timeout_after_retries_blanks_beam(make_gun):
    faults = FaultInjector([rule("get_energy", "timeout", probability=1.0)])
    with IonGunEmulator(TABLE, faults=faults) as emu:
        gun = make_gun(emu)
        milling(gun)
        t0 = time.monotonic()
        with pytest.raises(DeviceTimeout, match="no reply within 0.2 s"):
            gun.energy()
        assert time.monotonic() - t0 < 2.0
        assert emu.received_ops().count("get_energy") == 2      # 1 + retries: 1
        assert emu.state().blanked and emu.received_ops()[-1] == "blank"


def test_single_timeout_or_disconnect_is_retried_transparently(make_gun):
    faults = FaultInjector([rule("get_energy", "timeout", at_calls=[1]), rule("get_current", "disconnect", at_calls=[1])])
    with IonGunEmulator(TABLE, faults=faults) as emu:
        gun = make_gun(emu)
        assert gun.energy() == pytest.approx(2500.0)
        assert gun.target_current() == 0.0              # over a reopened connection
        assert emu.received_ops().count("get_energy") == 2 and emu.received_ops().count("get_current") == 2
        assert [f[2] for f in faults.injected] == ["timeout", "disconnect"]


def test_disconnect_beyond_retries_raises_and_blanks(make_gun):
    faults = FaultInjector([rule("raster_on", "disconnect", probability=1.0)])
    with IonGunEmulator(TABLE, faults=faults) as emu:
        gun = make_gun(emu)
        gun.set_beam(True)
        gun.set_blanked(False)
        with pytest.raises(CommunicationError, match="transport error"):
            gun.set_raster(True)
        assert emu.state().blanked                      # blanked over a fresh connection
        assert gun.energy() == pytest.approx(2500.0)    # and the driver keeps working


def test_garbled_reply_is_a_communication_error(make_gun):
    faults = FaultInjector([rule("status", "communication", probability=1.0)])
    with IonGunEmulator(TABLE, faults=faults) as emu:
        gun = make_gun(emu)
        with pytest.raises(CommunicationError, match="unexpected reply"):
            gun.gun_status()
        assert emu.received_ops().count("status") == 2
        assert gun.status().healthy is False


# ------------------------------------------------------------ interlocks / safety
def test_open_interlock_refuses_beam_on(emu, make_gun):
    gun = make_gun(emu)
    emu.set_interlock("door", False)
    with pytest.raises(InterlockError, match="door"):
        gun.set_beam(True)
    assert "beam_on" not in emu.received_ops() and not emu.state().beam_on
    assert gun.gun_status().interlocks == {"vacuum": True, "gas": True, "door": False}
    assert not gun.status().healthy
    emu.set_interlock("door", True)
    gun.set_beam(True)
    assert emu.state().beam_on


def test_over_current_blanks(emu, make_gun):
    gun = make_gun(emu, limits={"current_a_max": 1e-9})
    milling(gun)
    with pytest.raises(InterlockError, match="above setup maximum"):
        gun.target_current()
    assert emu.state().blanked
    gun.set_blanked(False)
    with pytest.raises(InterlockError, match="above setup maximum"):
        gun.gun_status()
    assert emu.state().blanked


def test_close_blanks_then_beam_off(emu, make_gun):
    gun = make_gun(emu)
    milling(gun)
    emu.clear_log()
    gun.close()
    assert emu.received_ops() == ["blank", "beam_off"]
    st = emu.state()
    assert st.blanked and not st.beam_on
    with pytest.raises(NotConnected):
        gun.energy()
    gun.close()                                         # idempotent


def test_state_callback_for_dose_integration():
    seen = []
    with IonGunEmulator(TABLE, on_state_change=seen.append, target_current_a=2e-9) as emu, \
            SerialIonGun(emu.url, TABLE, timeout_s=T) as gun:
        milling(gun)
        assert seen[-1].milling and seen[-1].target_current_a == pytest.approx(2e-9)
        emu.set_interlock("vacuum", False)               # trips the beam
        assert not seen[-1].milling and not seen[-1].beam_on
    assert [s.time for s in seen] == sorted(s.time for s in seen)


def test_concurrent_callers_share_the_port(emu, make_gun):
    gun = make_gun(emu)
    gun.set_energy(4000.0)
    # interleaved transactions would pair a command with another's reply
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: gun.energy() if i % 2 else gun.gun_status().energy, range(60)))
    assert results == [pytest.approx(4000.0)] * 60


# ------------------------------------------------------------ command tables
def _table_data():
    return yaml.safe_load(TABLE.read_text())


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["operations"]["set_energy"].update(timout_s=1), r"operations\.set_energy\.timout_s.*allowed \["),
    (lambda d: d.update(baud=9600), r"baud.*unknown key; allowed \['name', 'terminator'"),
    (lambda d: d["operations"].pop("blank"), r"missing required operation\(s\) \['blank'\]"),
    (lambda d: d["operations"].update(blnk=d["operations"]["blank"]), r"unknown operation\(s\) \['blnk'\]"),
    (lambda d: d["operations"]["get_energy"].update(reply="^EN ([0-9.]+)$"), r"get_energy\.reply.*'value'"),
    (lambda d: d["operations"]["set_energy"].update(command="EN {val:.3f}"), r"set_energy\.command.*\['val'\]"),
    (lambda d: d["operations"]["status"].update(reply="^STAT (?P<beam>[01]$"), r"status\.reply.*regular expr"),
    (lambda d: d["operations"]["set_energy"].update(limits=[10, 1]), r"set_energy\.limits.*above upper"),
    (lambda d: d["operations"]["beam_on"].update(scale=1000), r"beam_on\.scale = 1000.*allowed only on"),
    (lambda d: d.update(encoding="klingon"), r"encoding = 'klingon'.*unknown text encoding"),
    (lambda d: d.update(retries=-1), r"retries = -1"),
])
def test_bad_command_table_names_the_key(tmp_path, mutate, expected):
    data = _table_data()
    mutate(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=expected):
        load_command_table(path)


def test_emulator_follows_a_changed_table(make_gun):
    """The emulator derives parsing and replies from the table, so another
    dialect (terminator, keywords, number format) works without code changes."""
    data = _table_data()
    data["terminator"] = "\n"
    ops = data["operations"]
    ops["set_energy"].update(command="HV:SET {value:08.2f}", reply=r"^ACK HV (?P<value>[0-9]+\.[0-9]{2})$")
    ops["get_energy"].update(command="HV?", reply=r"^HV=(?P<value>[0-9]+\.[0-9]{2}) kV$")
    ops["blank"].update(command="BLK 1", reply=r"^ACK\s+BLK$")
    ops["get_current"].update(command="I?", reply=r"^I=(?P<value>[0-9.]+)nA$", terminator="\r")
    table = parse_command_table(data, "dialect")
    with IonGunEmulator(table) as emu, SerialIonGun(emu.url, table, timeout_s=T) as gun:
        gun.set_energy(4250.0)
        assert ("set_energy", "HV:SET 00004.25") in emu.received
        assert gun.energy() == pytest.approx(4250.0)
        assert gun.target_current() == 0.0
        assert emu.state().blanked


def test_emulator_rejects_a_table_it_cannot_invert():
    data = _table_data()
    data["operations"]["beam_on"]["reply"] = "^OK (BEAM|HV) ON$"
    with pytest.raises(ValueError, match="operations.beam_on"):
        IonGunEmulator(parse_command_table(data))
    assert reply_template(r"^A\.B\s+(?P<x>(?:a|b)+) \(c\)$") == ("A.B {x} (c)", {"x": "(?:a|b)+"})


# ------------------------------------------------------------ pure unit test, no sockets
class FakePort:
    """Scripted serial port: per command line, a reply, None (silence) or
    ("late", reply) for an answer that arrives only after the reader gave up."""

    def __init__(self, replies):
        self.replies, self.written, self.timeout = replies, [], None
        self.inbuf, self.late, self.timeouts = b"", b"", []

    def write(self, data: bytes):
        self.written.append(data)
        self.timeouts.append(self.timeout)
        reply = self.replies.get(data.decode("ascii").rstrip("\r\n"))
        if isinstance(reply, tuple):
            self.late += reply[1].encode("ascii")
        elif reply:
            self.inbuf += reply.encode("ascii")

    def read_until(self, expected: bytes) -> bytes:
        i = self.inbuf.find(expected)
        cut = len(self.inbuf) if i < 0 else i + len(expected)
        out, self.inbuf = self.inbuf[:cut], self.inbuf[cut:] + self.late
        self.late = b""
        return out

    def reset_input_buffer(self):
        self.inbuf = b""

    def close(self):
        pass


def test_formatting_and_parsing_with_a_fake_port(monkeypatch):
    port = FakePort({
        "*IDN?": "IONOPTIKA,GCIB-10S,A123,2.1\r\n",
        "BLANK ON": "OK BLANK ON\r\n",
        "EN 1.235": "OK EN 1.235\r\n",
        "EN?": "EN 1.235\r\n",
        "CS 2500": "ERR 2 cluster size out of range\r\n",
        "TGT?": "TGT 12.5",                                   # no terminator: incomplete
        "RAS ON": "OK RAS MAYBE\r\n",
        "ERR?": ("late", "LASTERR 0 \r\n"),
        "STAT?": "STAT BEAM=1 BLANK=0 ILK=0 ILKS=vacuum:1,door:0 EN=2.5 CS=1500 EMI=150000 TGT=3.5 RAS=1\r\n",
    })
    monkeypatch.setattr(iongun_serial, "serial_for_url", lambda url, **kw: port)
    gun = SerialIonGun("fake://", TABLE, timeout_s=T)
    gun.connect()
    assert port.written == [b"*IDN?\r\n", b"BLANK ON\r\n"]
    gun.set_energy(1234.6)                                    # V -> kV, '{value:.3f}'
    assert port.written[-1] == b"EN 1.235\r\n"
    assert gun.energy() == pytest.approx(1235.0)
    st = gun.gun_status()
    assert (st.beam_on, st.blanked, st.interlocks_ok, st.raster_on) == (True, False, False, True)
    assert st.interlocks == {"vacuum": True, "door": False}
    assert st.energy == pytest.approx(2500.0) and st.cluster_size == 1500
    assert st.emission_current == pytest.approx(150e-6) and st.target_current == pytest.approx(3.5e-9)
    port.written.clear()
    with pytest.raises(CommunicationError, match="error 2: cluster size out of range"):
        gun.set_cluster_size(2500)
    assert port.written == [b"CS 2500\r\n", b"BLANK ON\r\n"]  # error reply: not retried, then blanked
    port.written.clear()
    with pytest.raises(DeviceTimeout, match="incomplete reply"):
        gun.target_current()
    assert port.written == [b"TGT?\r\n"] * 2 + [b"BLANK ON\r\n"]
    with pytest.raises(CommunicationError, match="unexpected reply 'OK RAS MAYBE'"):
        gun.set_raster(True)
    port.written.clear()
    with pytest.raises(DeviceTimeout, match="no reply"):
        gun.last_error()
    # the late answers are discarded, not taken for the replies to later commands
    assert gun.energy() == pytest.approx(1235.0)
    assert port.written == [b"ERR?\r\n"] * 2 + [b"BLANK ON\r\n", b"EN?\r\n"]
    port.replies["ERR?"] = "LASTERR 0 no error\r\n"
    assert gun.last_error() == ""                             # code 0: nothing to report
    port.replies["ERR?"] = "LASTERR 7 HV arc detected\r\n"
    assert gun.last_error() == "HV arc detected"


def test_interlock_check_and_per_operation_timeout_with_a_fake_port(monkeypatch):
    status = "STAT BEAM=0 BLANK=1 ILK={} ILKS=vacuum:{} EN=2.5 CS=1500 EMI=0 TGT=0 RAS=0\r\n"
    port = FakePort({"*IDN?": "IONOPTIKA,GCIB-10S,A123,2.1\r\n", "BLANK ON": "OK BLANK ON\r\n",
                     "BEAM ON": "OK BEAM ON\r\n", "STAT?": status.format(0, 0)})
    monkeypatch.setattr(iongun_serial, "serial_for_url", lambda url, **kw: port)
    gun = SerialIonGun("fake://", TABLE, timeout_s=T)
    gun.connect()
    with pytest.raises(InterlockError, match="vacuum"):
        gun.set_beam(True)
    assert b"BEAM ON\r\n" not in port.written
    port.replies["STAT?"] = status.format(1, 1)
    gun.set_beam(True)
    # the driver's timeout replaces the table default; beam_on keeps its own 2 s
    assert dict(zip(port.written, port.timeouts)) == {b"*IDN?\r\n": T, b"BLANK ON\r\n": T,
                                                        b"STAT?\r\n": T, b"BEAM ON\r\n": 2.0}
    assert set(gun.table.operations) == set(REQUIRED_OPERATIONS)
    assert gun.table.retries_for("blank") == 3 and gun.table.retries_for("unblank") == 0
