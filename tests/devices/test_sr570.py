"""SR570 driver through pyserial's socket:// transport against the listen-only
emulator, and the dose chain SR570 -> 34465A (pyvisa-sim) -> current."""
from __future__ import annotations

import math
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import serial

from devices.dmm_34465a import Keysight34465A
from devices.errors import CommunicationError, DeviceError, DeviceTimeout, LimitViolation, NotConnected
from devices.sim.sr570_emulator import SR570Emulator
from devices.sim.visa_link import attach_voltage_source
from devices.sr570 import SENSITIVITIES_A_PER_V, SR570, sensitivity_index

SIM_YAML = Path(__file__).parents[2] / "configs" / "visa" / "sim_instruments.yaml"


@pytest.fixture
def emulator():
    with SR570Emulator() as emu:
        yield emu


@pytest.fixture
def preamp(emulator):
    drv = SR570(emulator.url, timeout_s=1.0)
    drv.connect()
    yield drv
    drv.close()


def test_sensitivity_table():
    assert len(SENSITIVITIES_A_PER_V) == 28
    assert SENSITIVITIES_A_PER_V[:4] == (1e-12, 2e-12, 5e-12, 1e-11)
    assert SENSITIVITIES_A_PER_V[-1] == 1e-3
    assert [sensitivity_index(s) for s in (1e-12, 2e-9, 1e-6, 5e-4, 1e-3)] == [0, 10, 18, 26, 27]
    assert sensitivity_index(1e-6 * (1 + 1e-9)) == 18          # float noise tolerated
    for ratio in np.array(SENSITIVITIES_A_PER_V[1:]) / np.array(SENSITIVITIES_A_PER_V[:-1]):
        assert round(ratio, 9) in (2.0, 2.5)


def test_port_is_9600_8n2_without_handshake(preamp):
    p = preamp.port
    assert (p.baudrate, p.bytesize, p.parity, p.stopbits) == (9600, 8, serial.PARITY_NONE, 2)
    assert not (p.xonxoff or p.rtscts or p.dsrdtr) and p.is_open


def test_sensitivity_arrives_at_the_emulator(preamp, emulator):
    preamp.set_sensitivity(2e-9)
    preamp.set_sensitivity(1e-6)
    assert emulator.wait_for(2)
    assert emulator.lines == ["SENS 10", "SENS 18"]
    assert bytes(emulator.raw) == b"SENS 10\r\nSENS 18\r\n"      # CR LF framing
    assert emulator.sensitivity == 1e-6 == preamp.sensitivity()
    assert emulator.unknown == []


@pytest.mark.parametrize("bad", [3e-6, 1e-2, 1e-13, 0.0, -1e-6, math.nan, "1e-6"])
def test_invalid_sensitivity_refused_with_nothing_sent(preamp, emulator, bad):
    preamp.set_sensitivity(1e-9)
    with pytest.raises(LimitViolation) as e:
        preamp.set_sensitivity(bad)
    assert e.value.quantity == "sensitivity" and "1e-12" in e.value.allowed and "0.001" in e.value.allowed
    assert preamp.sensitivity() == 1e-9                        # unchanged
    preamp.reset_overload()                                    # a marker after the refusal
    assert emulator.wait_for(2)
    assert emulator.lines == ["SENS 9", "ROLD"]


def test_sensitivity_unknown_until_set(preamp):
    with pytest.raises(DeviceError, match="sensitivity unknown"):
        preamp.sensitivity()
    with pytest.raises(DeviceError):
        preamp.voltage_to_current(1.0)
    preamp.set_sensitivity(1e-3)
    preamp.close()
    preamp.connect()                                           # a new session knows nothing
    with pytest.raises(DeviceError):
        preamp.sensitivity()


def test_driver_never_reads(preamp, emulator, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the SR570 is listen-only: nothing may be read")
    for name in ("read", "read_until", "readline", "reset_input_buffer"):
        monkeypatch.setattr(preamp.port, name, forbidden)
    preamp.set_sensitivity(5e-12)
    preamp.reset_overload()
    assert emulator.wait_for(2)


@pytest.mark.parametrize("sign, emu_sign", [(-1.0, -1.0), (1.0, 1.0)])
def test_current_is_sign_times_sensitivity_times_volts(sign, emu_sign):
    with SR570Emulator(sign=emu_sign) as emu:
        drv = SR570(emu.url, sign=sign)
        with drv:
            drv.set_sensitivity(2e-9)
            assert emu.wait_for(1)
            for current in (3.7e-9, -1.1e-10, 0.0):
                volts = emu.output_voltage(current)
                assert volts == pytest.approx(emu_sign * current / 2e-9)
                assert drv.voltage_to_current(volts) == pytest.approx(current, abs=1e-24)
            v = np.array([0.5, -2.0])
            np.testing.assert_allclose(drv.voltage_to_current(v), sign * 2e-9 * v)


def test_emulator_models_invert_and_blank(emulator):
    assert emulator.sensitivity == 1e-6                        # some front-panel gain
    assert emulator.output_voltage(1e-6) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        SR570Emulator(sensitivity_a_per_v=3e-6)
    with socket.create_connection(("127.0.0.1", emulator.port)) as s:
        s.sendall(b"SENS 27\r\nINVT 1\r\nBOGUS 3\r\n")
        assert emulator.wait_for(3)
        assert emulator.output_voltage(1e-3) == pytest.approx(1.0)   # inverting flipped
        s.sendall(b"BLNK 1\r\n")
        assert emulator.wait_for(4)
        assert emulator.output_voltage(1e-3) == 0.0
    assert emulator.unknown == ["BOGUS 3"]


def test_write_failures_are_translated_and_forget_the_gain(preamp, monkeypatch):
    preamp.set_sensitivity(1e-9)

    def timeout(data):
        raise serial.SerialTimeoutException("Write timeout")
    monkeypatch.setattr(preamp.port, "write", timeout)
    with pytest.raises(DeviceTimeout):
        preamp.set_sensitivity(2e-9)
    with pytest.raises(DeviceError):
        preamp.sensitivity()                                   # gain now unknown

    def broken(data):
        raise serial.SerialException("device reports readiness to read but returned no data")
    monkeypatch.setattr(preamp.port, "write", broken)
    with pytest.raises(CommunicationError):
        preamp.set_sensitivity(2e-9)


def test_connect_failure_and_not_connected():
    with socket.socket() as s:                                 # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(CommunicationError, match="cannot open"):
        SR570(f"socket://127.0.0.1:{port}", timeout_s=0.5).connect()
    drv = SR570("socket://127.0.0.1:1")
    with pytest.raises(NotConnected):
        drv.set_sensitivity(1e-9)
    assert drv.identity() == "SR570 (listen-only)" and not drv.status().healthy
    with pytest.raises(ValueError):
        SR570("socket://127.0.0.1:1", sign=0.5)


def test_dose_chain_current_through_preamp_and_dmm(emulator, preamp, tmp_path):
    """Ion current -> SR570 (emulated) -> 34465A (pyvisa-sim) -> current in A."""
    yaml = tmp_path / "sim_instruments.yaml"
    shutil.copy(SIM_YAML, yaml)
    preamp.set_sensitivity(1e-9)
    assert emulator.wait_for(1)
    ion_current = [2.5e-9]
    with Keysight34465A("TCPIP0::192.168.0.21::INSTR", visa_library=f"{yaml}@sim") as dmm:
        dmm.configure_dc_voltage(10, 1)
        attach_voltage_source(dmm, lambda: emulator.output_voltage(ion_current[0]))
        volts = dmm.read_voltage()
        assert volts == pytest.approx(-2.5)                    # inverting preamp
        assert preamp.voltage_to_current(volts) == pytest.approx(2.5e-9)
        ion_current[0] = 4.0e-9
        _, block = dmm.read_block(3, 0.01)
        np.testing.assert_allclose(preamp.voltage_to_current(block), 4.0e-9)
