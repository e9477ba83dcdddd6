"""Keysight 33522A driver: unit tests on a fake transport, then the real pyvisa
message path against pyvisa-sim (configs/visa/sim_instruments.yaml)."""
from __future__ import annotations

import math

import pytest
from pyvisa import constants
from pyvisa.errors import VisaIOError, VisaIOWarning

from devices.awg_33522a import Keysight33522A
from devices.errors import CommunicationError, DeviceError, DeviceTimeout, LimitViolation, NotConnected
from devices.interfaces import RasterSettings
from devices.setup_config import FaultRule
from devices.sim.faults import FaultInjector
from devices.sim.visa_link import FaultyResource, fault_wrapper, sim_device
from tests.support.visa_fakes import FakeScpi, NO_ERROR, SIM_YAML, connect_quietly, install_fake

AWG = "TCPIP0::192.168.0.20::INSTR"
IDN = "Agilent Technologies,33522A,MY52400123,2.03-1.19-2.00-52-00"
RASTER = RasterSettings(x_amplitude_vpp=5.0, y_amplitude_vpp=3.0, x_offset_v=0.5, y_offset_v=-1.0)


# ------------------------------------------------------------ fake transport
@pytest.fixture
def fake(monkeypatch):
    return install_fake(monkeypatch, FakeScpi(IDN))


@pytest.fixture
def awg(fake):
    return connect_quietly(Keysight33522A(AWG, visa_library="@fake"), fake)


def test_connect_opens_with_lf_termination_and_parses_idn(fake):
    drv = Keysight33522A(AWG, visa_library="@fake", timeout_s=1.5)
    drv.connect()
    assert fake.opened == {"library": "@fake", "name": AWG, "read_termination": "\n",
                           "write_termination": "\n", "timeout": 1500}
    assert drv.idn == ("Agilent Technologies", "33522A", "MY52400123", "2.03-1.19-2.00-52-00")
    assert "33522A" in drv.identity() and "MY52400123" in drv.identity()
    assert drv.status().healthy


@pytest.mark.parametrize("idn", ["Agilent Technologies,33220A,MY1,1.0", "garbage", ""])
def test_connect_refuses_other_instruments(fake, idn):
    fake.state["*IDN?"] = idn
    drv = Keysight33522A(AWG, visa_library="@fake")
    with pytest.raises(CommunicationError):
        drv.connect()
    assert fake.closed and drv.resource is None and not drv.status().healthy


def test_stale_errors_are_drained_at_connect(fake):
    fake.errors = ['-113,"Undefined header"', '-222,"Data out of range"']
    drv = Keysight33522A(AWG, visa_library="@fake")
    drv.connect()
    assert drv.configure_raster(RASTER) == RASTER      # not blamed on our commands


def test_configure_sends_channel_setup_in_order(awg, fake):
    awg.configure_raster(RASTER)
    for ch, freq, amp, offs in ((1, "100", "5", "0.5"), (2, "1", "3", "-1")):
        writes = [c for c in fake.log if c.startswith((f"SOUR{ch}:", f"OUTP{ch}:"))
                  and not c.endswith("?") and "PHAS" not in c]
        assert writes == [f"SOUR{ch}:FUNC RAMP", f"SOUR{ch}:FUNC:RAMP:SYMM 100",
                          f"SOUR{ch}:FREQ {freq}", f"OUTP{ch}:LOAD INF", f"SOUR{ch}:VOLT:UNIT VPP",
                          f"SOUR{ch}:VOLT:OFFS 0", f"SOUR{ch}:VOLT {amp}",
                          f"SOUR{ch}:VOLT:OFFS {offs}"]
        assert fake.log.index(f"OUTP{ch}:LOAD INF") < fake.log.index(f"SOUR{ch}:VOLT {amp}")
    sync, err = fake.log.index("SOUR1:PHAS:SYNC"), fake.log.index("SYST:ERR?")
    assert fake.log.index("SOUR2:VOLT:OFFS -1") < sync < err < fake.log.index("SOUR1:FREQ?")


@pytest.mark.parametrize("field, value", [
    ("x_amplitude_vpp", 20.5), ("y_amplitude_vpp", 0.0), ("y_amplitude_vpp", -2.0),
    ("x_amplitude_vpp", math.nan), ("x_offset_v", 8.0), ("y_offset_v", -9.0),
    ("x_frequency_hz", 0.0), ("y_frequency_hz", math.inf)])
def test_limits_refused_before_anything_is_sent(awg, fake, field, value):
    raster = RasterSettings(**{**vars(RASTER), field: value})
    with pytest.raises(LimitViolation) as e:
        awg.configure_raster(raster)
    assert e.value.quantity == field and field in str(e.value)
    assert fake.log == []


def test_max_vpp_is_the_safety_window(fake):
    drv = Keysight33522A(AWG, visa_library="@fake", max_vpp=4.0)
    drv.connect()
    fake.log.clear()
    with pytest.raises(LimitViolation, match="x_amplitude_vpp"):
        drv.configure_raster(RASTER)                    # 5 Vpp > 4
    assert fake.log == []
    with pytest.raises(ValueError):
        Keysight33522A(AWG, max_vpp=0)


def test_instrument_errors_fail_with_their_text(awg, fake):
    fake.errors = ['-222,"Data out of range;value clipped to upper limit"', '-221,"Settings conflict"']
    with pytest.raises(CommunicationError) as e:
        awg.configure_raster(RASTER)
    assert "Data out of range;value clipped" in str(e.value) and "Settings conflict" in str(e.value)
    assert "SOUR1:FREQ?" not in fake.log                # no read-back after a failure
    assert awg.last_raster is None                      # the instrument state is unknown


def test_endless_error_queue_is_bounded(awg, fake):
    fake.errors = ['-350,"Queue overflow"'] * 100
    with pytest.raises(CommunicationError, match="not empty"):
        awg.configure_raster(RASTER)


@pytest.mark.parametrize("query, reply, message", [
    ("SOUR2:VOLT?", "+2.500000000000000E+00", "y_amplitude_vpp"),
    ("SOUR1:VOLT:OFFS?", "+0.000000000000000E+00", "x_offset_v"),
    ("SOUR2:FREQ?", "+1.000100000000000E+00", "y_frequency_hz"),
    ("OUTP1:LOAD?", "+5.000000000000000E+01", "load"),
    ("SOUR2:FUNC?", "SIN", "function"),
    ("SOUR1:VOLT:UNIT?", "VRMS", "unit"),
    ("SOUR1:FREQ?", "banana", "unparseable")])
def test_readback_mismatch_is_an_error(awg, fake, query, reply, message):
    fake.fixed[query] = reply
    with pytest.raises(CommunicationError, match=message):
        awg.configure_raster(RASTER)


def test_returns_what_the_instrument_reads_back(awg, fake):
    fake.fixed.update({"SOUR1:FREQ?": "+1.000000000100000E+02", "OUTP2:LOAD?": "+9.9E+37"})
    got = awg.configure_raster(RASTER)
    assert got.x_frequency_hz == 100.00000001 and got.y_amplitude_vpp == 3.0


def test_outputs(awg, fake):
    awg.set_outputs(True)
    assert fake.log[:2] == ["OUTP1 1", "OUTP2 1"] and awg.outputs_on() is True
    awg.set_outputs(False)
    assert awg.outputs_on() is False
    fake.fixed["OUTP2?"] = "1"
    with pytest.raises(DeviceError, match="disagree"):
        awg.outputs_on()


def test_close_switches_outputs_off_even_if_that_fails(awg, fake):
    awg.set_outputs(True)
    awg.close()
    assert fake.log[-2:] == ["OUTP1?", "OUTP2?"] and fake.state["OUTP1?"] == "0" and fake.closed
    fake.closed = False
    awg.connect()
    fake.fail["OUTP1 0"] = VisaIOError(constants.StatusCode.error_connection_lost)
    awg.close()
    assert fake.closed and awg.resource is None


@pytest.mark.parametrize("exc, expected", [
    (VisaIOError(constants.StatusCode.error_timeout), DeviceTimeout),
    (VisaIOError(constants.StatusCode.error_io), CommunicationError),
    (VisaIOWarning(constants.StatusCode.success_max_count_read), CommunicationError)])
def test_visa_errors_are_translated(awg, fake, exc, expected):
    fake.fail["SOUR1:VOLT?"] = exc
    with pytest.raises(expected) as e:
        awg.configure_raster(RASTER)
    assert type(e.value) is expected and e.value.device == "waveform_generator"


def test_not_connected():
    drv = Keysight33522A(AWG)
    with pytest.raises(NotConnected):
        drv.outputs_on()
    with pytest.raises(NotConnected):
        drv.identity()
    drv.close()                                         # harmless


# ------------------------------------------------------------ pyvisa-sim (sim_lib: conftest.py)
def test_sim_file_in_repo_loads():
    drv = Keysight33522A(AWG, visa_library=f"{SIM_YAML}@sim")
    with drv:
        assert drv.idn[1] == "33522A"


def test_sim_configure_readback_and_outputs(sim_lib):
    drv = Keysight33522A(AWG, visa_library=sim_lib)
    drv.connect()
    dev = sim_device(drv.resource)
    assert dev._properties["load_1"].get_value() != "INF"          # power-on: 50 ohm
    raster = RasterSettings(4.0, 2.0, 150.0, 1.5, 0.25, -0.75)
    assert drv.last_raster is None
    assert drv.configure_raster(raster) == raster == drv.last_raster
    for ch in (1, 2):
        assert dev._properties[f"load_{ch}"].get_value() == "INF"
        assert dev._properties[f"function_{ch}"].get_value() == "RAMP"
    drv.set_outputs(True)
    assert drv.outputs_on() and dev._properties["output_2"].get_value() == 1
    drv.close()
    assert dev._properties["output_1"].get_value() == 0 and dev._properties["output_2"].get_value() == 0


def test_sim_instrument_refusal_reaches_caller(sim_lib):
    drv = Keysight33522A(AWG, visa_library=sim_lib)
    drv.connect()
    drv.configure_raster(RASTER)
    with pytest.raises(CommunicationError, match=r'-100,"Command error'):
        drv.configure_raster(RasterSettings(5.0, 3.0, x_frequency_hz=1e6))   # ramp max 200 kHz
    assert drv.query("SYST:ERR?") == NO_ERROR                       # queue was emptied
    assert drv.read_raster().x_frequency_hz == 100.0                # refused value not applied
    # amplitude above the instrument's range (the driver's own window stops this
    # earlier, so the command goes in raw): the simulated error queue reports it
    drv.write("SOUR1:VOLT 25")
    with pytest.raises(CommunicationError, match=r'-100,"Command error'):
        drv.check_errors("test")
    assert drv.read_raster().x_amplitude_vpp == 5.0


def test_sim_limit_violation_sends_nothing(sim_lib):
    injector = FaultInjector()                          # no rules: only counts calls
    drv = Keysight33522A(AWG, visa_library=sim_lib, resource_wrapper=fault_wrapper(injector, "awg"))
    drv.connect()
    assert isinstance(drv.resource, FaultyResource)
    before = dict(injector._calls)
    with pytest.raises(LimitViolation):
        drv.configure_raster(RasterSettings(21.0, 1.0))
    assert dict(injector._calls) == before


def test_sim_silent_instrument_times_out(sim_lib):
    drv = Keysight33522A("TCPIP0::192.168.0.29::INSTR", visa_library=sim_lib, timeout_s=0.2)
    with pytest.raises(DeviceTimeout):
        drv.connect()
    assert drv.resource is None


@pytest.mark.parametrize("resource, match", [
    ("TCPIP0::192.168.0.21::INSTR", "wrong instrument"),         # that is the DMM
    # pyvisa-sim 0.7.1 "opens" an unknown name (session 0) without an error and
    # answers nothing; real backends raise VI_ERROR_RSRC_NFOUND at open
    ("TCPIP0::192.168.0.99::INSTR", r"VI_ERROR_RSRC_NFOUND|unparseable \*IDN\? reply ''")])
@pytest.mark.filterwarnings("ignore:read string doesn't end")
def test_sim_wrong_or_missing_instrument(sim_lib, resource, match):
    with pytest.raises(CommunicationError, match=match):
        Keysight33522A(resource, visa_library=sim_lib).connect()


def test_missing_sim_file_is_a_communication_error(tmp_path):
    with pytest.raises(CommunicationError, match="cannot open"):
        Keysight33522A(AWG, visa_library=f"{tmp_path / 'nope.yaml'}@sim").connect()


def test_injected_faults_raise_translated_errors(sim_lib):
    injector = FaultInjector([
        FaultRule(device="waveform_generator", operation="write", kind="timeout", at_calls=[3]),
        FaultRule(device="waveform_generator", operation="query", kind="visa_error", at_calls=[5]),
    ])
    drv = Keysight33522A(AWG, visa_library=sim_lib,
                         resource_wrapper=fault_wrapper(injector, "waveform_generator"))
    drv.connect()                                       # queries 1 (IDN) and 2 (SYST:ERR?)
    with pytest.raises(DeviceTimeout) as e:
        drv.configure_raster(RASTER)                    # third write
    assert isinstance(e.value.__cause__, VisaIOError)
    with pytest.raises(CommunicationError) as e:
        drv.configure_raster(RASTER)                    # fifth query
    assert type(e.value) is CommunicationError
    assert drv.configure_raster(RASTER) == RASTER       # the instrument itself is fine
    assert [k for *_, k, _ in injector.injected] == ["timeout", "visa_error"]


def test_disconnect_persists_until_reconnect(sim_lib):
    injector = FaultInjector([FaultRule(device="waveform_generator", operation="query",
                                        kind="disconnect", at_calls=[3])])
    drv = Keysight33522A(AWG, visa_library=sim_lib,
                         resource_wrapper=fault_wrapper(injector, "waveform_generator"))
    drv.connect()
    for _ in range(2):
        with pytest.raises(CommunicationError, match="VI_ERROR_CONN_LOST"):
            drv.outputs_on()
    drv.close()                                         # outputs-off fails, close still works
    drv.connect()
    assert drv.outputs_on() is False
