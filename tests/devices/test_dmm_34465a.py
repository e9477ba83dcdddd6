"""Keysight 34465A driver: unit tests on a fake transport, then pyvisa-sim with a
live voltage source (devices.sim.visa_link)."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from pyvisa import constants
from pyvisa.errors import VisaIOError

from devices.dmm_34465a import Keysight34465A
from devices.errors import CommunicationError, DeviceError, DeviceTimeout, LimitViolation, NotConnected
from devices.setup_config import FaultRule
from devices.sim.faults import FaultInjector
from devices.sim.visa_link import attach_voltage_source, fault_wrapper, sim_device
from tests.support.visa_fakes import FakeScpi, NO_ERROR, connect_quietly, install_fake

DMM = "TCPIP0::192.168.0.21::INSTR"
IDN = "Keysight Technologies,34465A,MY59000456,A.03.01-03.15-03.01-00.52-04-02"


# ------------------------------------------------------------ fake transport
class FakeMeter(FakeScpi):
    """FakeScpi, plus: CONF:VOLT:DC sets the range; READ? answers ``reading``
    and notes the timeout it was asked with."""

    def __init__(self):
        super().__init__(IDN)
        self.state["VOLT:DC:RANG:AUTO?"] = "1"
        self.reading = "+1.23456789E-01"
        self.timeout_at_read = None

    def _echo_key(self, head):
        return "VOLT:DC:RANG?" if head == "CONF:VOLT:DC" else super()._echo_key(head)

    def _reply(self, cmd):
        if cmd == "READ?":
            self.timeout_at_read = self.timeout
            return self.reading
        return super()._reply(cmd)


@pytest.fixture
def fake(monkeypatch):
    return install_fake(monkeypatch, FakeMeter())


@pytest.fixture
def dmm(fake):
    return connect_quietly(Keysight34465A(DMM, visa_library="@fake"), fake)


def test_idn_must_be_a_34465a(fake):
    fake.state["*IDN?"] = "Keysight Technologies,34461A,MY1,A.02"
    with pytest.raises(CommunicationError, match="wrong instrument"):
        Keysight34465A(DMM, visa_library="@fake").connect()
    assert fake.closed


def test_configure_sequence_and_readback(dmm, fake):
    dmm.configure_dc_voltage(10, 1)
    assert fake.log[:8] == ["CONF:VOLT:DC 10", "VOLT:DC:RANG:AUTO 0", "VOLT:DC:NPLC 1",
                            "TRIG:SOUR IMM", "TRIG:COUN 1", "SAMP:SOUR IMM", "SAMP:COUN 1",
                            "SYST:ERR?"]
    assert fake.log[8:] == ["VOLT:DC:RANG?", "VOLT:DC:RANG:AUTO?", "VOLT:DC:NPLC?"]
    assert (dmm.range_v, dmm.nplc) == (10.0, 1.0)


@pytest.mark.parametrize("range_v, nplc, field", [
    (5, 1, "range_v"), (0.01, 1, "range_v"), (10, 3, "nplc"), (10, math.nan, "nplc")])
def test_configure_limits_sent_nothing(dmm, fake, range_v, nplc, field):
    with pytest.raises(LimitViolation) as e:
        dmm.configure_dc_voltage(range_v, nplc)
    assert e.value.quantity == field and fake.log == []


@pytest.mark.parametrize("query, reply, message", [
    ("VOLT:DC:RANG:AUTO?", "1", "autorange still on"),
    ("VOLT:DC:RANG?", "+1.00000000E+02", "range set 10"),
    ("VOLT:DC:NPLC?", "+1.00000000E+01", "NPLC set 1")])
def test_configure_readback_mismatch(dmm, fake, query, reply, message):
    fake.fixed[query] = reply
    with pytest.raises(CommunicationError, match=message):
        dmm.configure_dc_voltage(10, 1)


def test_configure_instrument_error(dmm, fake):
    fake.errors = ['-221,"Settings conflict"']
    with pytest.raises(CommunicationError, match="Settings conflict"):
        dmm.configure_dc_voltage(10, 0.001)


def test_read_voltage_restores_single_sample_once(dmm, fake):
    assert dmm.read_voltage() == pytest.approx(0.123456789)
    assert fake.log == ["SAMP:SOUR IMM", "SAMP:COUN 1", "READ?"]   # state unknown after connect
    fake.log.clear()
    dmm.read_voltage()
    assert fake.log == ["READ?"]


def test_read_block_commands_times_and_timeout(dmm, fake):
    fake.fixed["SAMP:TIM?"] = "+1.20000000E-03"        # the meter rounded 1.23 ms
    fake.reading = "+1.0E-03,+2.0E-03,-3.0E-03,+4.0E-03"
    t, v = dmm.read_block(4, 0.00123)
    assert fake.log == ["TRIG:SOUR IMM", "TRIG:COUN 1", "SAMP:SOUR TIM", "SAMP:TIM 0.00123",
                        "SAMP:COUN 4", "SYST:ERR?", "SAMP:TIM?", "READ?"]
    np.testing.assert_allclose(t, [0, 1.2e-3, 2.4e-3, 3.6e-3])
    np.testing.assert_allclose(v, [1e-3, 2e-3, -3e-3, 4e-3])
    assert fake.timeout == 2000                         # restored
    fake.fixed["SAMP:TIM?"] = "+1.00000000E+01"
    fake.reading = ",".join(["+1.0E-03"] * 100)
    dmm.read_block(100, 10.0)
    assert fake.timeout_at_read >= 1000 * (2 + 100 * 10)  # waits for the whole block
    fake.log.clear()
    fake.reading = "+5.0E-01"
    dmm.read_voltage()
    assert fake.log == ["SAMP:SOUR IMM", "SAMP:COUN 1", "READ?"]


@pytest.mark.parametrize("reply, error, message", [
    ("+1.0E-03,+2.0E-03", CommunicationError, "expected 3 readings, got 2"),
    ("+1.0E-03,oops,+2.0E-03", CommunicationError, "unparseable"),
    ("+1.0E-03,+9.90000000E+37,-9.90000000E+37", DeviceError, "overload in 2 of 3")])
def test_read_block_bad_replies(dmm, fake, reply, error, message):
    fake.fixed["SAMP:TIM?"] = "+1.0E-02"
    fake.reading = reply
    with pytest.raises(error, match=message):
        dmm.read_block(3, 0.01)


@pytest.mark.parametrize("count, interval", [
    (0, 0.1), (1_000_001, 0.1), (2.5, 0.1), (True, 0.1), (10, 0.0), (10, -1.0), (10, math.nan),
    (10, 7200.0)])
def test_read_block_limits_sent_nothing(dmm, fake, count, interval):
    with pytest.raises(LimitViolation):
        dmm.read_block(count, interval)
    assert fake.log == []


def test_errors_translated(dmm, fake):
    fake.fail["READ?"] = VisaIOError(constants.StatusCode.error_timeout)
    with pytest.raises(DeviceTimeout):
        dmm.read_voltage()
    fake.fail["READ?"] = VisaIOError(constants.StatusCode.error_connection_lost)
    with pytest.raises(CommunicationError) as e:
        dmm.read_voltage()
    assert type(e.value) is CommunicationError
    dmm.close()
    with pytest.raises(NotConnected):
        dmm.read_voltage()


# ------------------------------------------------------------ pyvisa-sim (sim_lib: conftest.py)
@pytest.fixture
def sim_dmm(sim_lib):
    drv = Keysight34465A(DMM, visa_library=sim_lib)
    drv.connect()
    drv.configure_dc_voltage(10, 1)
    yield drv
    drv.close()


def test_sim_reading_follows_a_live_source(sim_dmm):
    values = iter([0.5, -1.25, 3.0e-3])
    detach = attach_voltage_source(sim_dmm, lambda: next(values))
    assert [sim_dmm.read_voltage() for _ in range(3)] == [0.5, -1.25, 3.0e-3]
    detach()
    assert sim_dmm.read_voltage() == 0.0                # static YAML reading again


def test_sim_block_follows_the_source(sim_dmm):
    counter = itertools.count()
    attach_voltage_source(sim_dmm, lambda: 0.01 * next(counter))
    t, v = sim_dmm.read_block(5, 0.002)
    np.testing.assert_allclose(t, [0, 0.002, 0.004, 0.006, 0.008])
    np.testing.assert_allclose(v, [0, 0.01, 0.02, 0.03, 0.04])
    assert sim_dmm.read_voltage() == pytest.approx(0.05)    # back to one sample
    dev = sim_device(sim_dmm.resource)
    assert dev._properties["sample_count"].get_value() == 1
    assert dev._properties["sample_source"].get_value() == "IMM"


def test_sim_overrange_is_an_overload(sim_dmm):
    sim_dmm.configure_dc_voltage(1, 10)
    level = [1.15]
    attach_voltage_source(sim_dmm, lambda: level[0])
    assert sim_dmm.read_voltage() == pytest.approx(1.15)      # 120 % over-range still reads
    level[0] = -1.5
    with pytest.raises(DeviceError, match="overload"):
        sim_dmm.read_voltage()


def test_sim_instrument_refuses_nplc_without_dig_option(sim_dmm):
    with pytest.raises(CommunicationError, match=r'-100,"Command error'):
        sim_dmm.configure_dc_voltage(10, 0.001)
    assert sim_dmm.query("SYST:ERR?") == NO_ERROR


def test_sim_injected_read_timeout_then_recovery(sim_lib):
    injector = FaultInjector([FaultRule(device="multimeter", operation="query", kind="timeout",
                                        at_calls=[7])])
    drv = Keysight34465A(DMM, visa_library=sim_lib,
                         resource_wrapper=fault_wrapper(injector, "multimeter"))
    drv.connect()                                       # queries 1-2
    drv.configure_dc_voltage(10, 1)                     # queries 3-6
    attach_voltage_source(drv, lambda: 0.25)            # through the FaultyResource
    with pytest.raises(DeviceTimeout):
        drv.read_voltage()                              # query 7
    assert drv.read_voltage() == 0.25
    assert injector.injected == [("multimeter", "query", "timeout", 7)]


def test_attach_needs_a_connected_simulated_meter():
    with pytest.raises(TypeError):
        attach_voltage_source(Keysight34465A(DMM), lambda: 0.0)
