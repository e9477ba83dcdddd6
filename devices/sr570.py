"""Stanford Research SR570 low-noise current preamplifier (ion target current).

The SR570's RS-232 port is listen-only: it accepts commands and never answers,
so nothing is ever read and nothing can be verified on the wire.  The driver
therefore remembers what it last set; until it has set a sensitivity, the
sensitivity (and with it the current conversion) is unknown and refused.

Port settings per the SR570 manual: 9600 baud, 8 data bits, no parity,
2 stop bits, no handshake; commands end in CR LF.  ``serial.serial_for_url``
accepts a COM port / device path as well as "socket://host:port" (emulator).
"""
from __future__ import annotations

import logging
import math
import numbers
import threading
from typing import Optional

import serial

from devices.errors import CommunicationError, DeviceError, DeviceTimeout, LimitViolation, NotConnected
from devices.interfaces import CurrentPreamp, DeviceStatus

log = logging.getLogger(__name__)

TERMINATOR = b"\r\n"

# SENS n: n = 0 is 1 pA/V, then 1-2-5 steps up to n = 27, 1 mA/V.  Built from
# decimal strings so that 2e-9 etc. are the exact floats a caller would type.
SENSITIVITIES_A_PER_V: tuple[float, ...] = tuple(
    float(f"{m}e{e}") for e in range(-12, -3) for m in (1, 2, 5)) + (1e-3,)


def sensitivity_index(amperes_per_volt: float) -> Optional[int]:
    """Index n for ``SENS n``, or None if the value is not an SR570 setting."""
    # SI numbers only: a string such as "1e-6" is a caller bug, not a setting
    if isinstance(amperes_per_volt, bool) or not isinstance(amperes_per_volt, numbers.Real):
        return None
    for n, s in enumerate(SENSITIVITIES_A_PER_V):
        if math.isclose(float(amperes_per_volt), s, rel_tol=1e-6):
            return n
    return None


class SR570(CurrentPreamp):
    def __init__(self, url: str, sign: float = -1.0, timeout_s: float = 2.0,
                 name: str = "current_preamp"):
        if sign not in (-1, 1, -1.0, 1.0):
            raise ValueError(f"sign must be +1 or -1, got {sign!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.url = url
        self.sign = float(sign)      # -1: the SR570 output is inverting (V = -I / sens)
        self.timeout_s = float(timeout_s)
        self.name = name
        self._port: Optional[serial.SerialBase] = None
        self._sensitivity: Optional[float] = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------ life cycle
    @property
    def port(self) -> Optional[serial.SerialBase]:
        """The open pyserial object (None when closed)."""
        return self._port

    def connect(self) -> None:
        with self._lock:
            if self._port is not None:
                return
            try:
                port = serial.serial_for_url(
                    self.url, do_not_open=True, baudrate=9600, bytesize=serial.EIGHTBITS,
                    parity=serial.PARITY_NONE, stopbits=serial.STOPBITS_TWO,
                    xonxoff=False, rtscts=False, dsrdtr=False,
                    timeout=self.timeout_s, write_timeout=self.timeout_s)
                port.open()
            except (serial.SerialException, OSError, ValueError) as e:
                raise CommunicationError(f"cannot open {self.url!r}: {e}", device=self.name,
                                         operation="connect") from e
            self._port = port
            # a listen-only instrument cannot tell us its state: unknown until we set it
            self._sensitivity = None
            log.info("%s: opened %s (listen-only, 9600 8N2)", self.name, self.url)

    def close(self) -> None:
        with self._lock:
            port, self._port = self._port, None
        if port is not None:
            try:
                port.close()
            except (serial.SerialException, OSError) as e:
                log.warning("%s: error while closing: %s", self.name, e)

    def identity(self) -> str:
        return "SR570 (listen-only)"

    def status(self) -> DeviceStatus:
        if self._port is None:
            return DeviceStatus(False, "not connected")
        if self._sensitivity is None:
            return DeviceStatus(True, "connected; sensitivity not set yet")
        return DeviceStatus(True, f"sensitivity {self._sensitivity:g} A/V")

    # ------------------------------------------------------------ commands
    def send(self, command: str) -> None:
        """Send one command line. Nothing comes back, so success means 'written'."""
        data = command.encode("ascii") + TERMINATOR
        with self._lock:
            if self._port is None:
                raise NotConnected("not connected", device=self.name, operation="write")
            try:
                written = self._port.write(data)
                self._port.flush()
            except serial.SerialTimeoutException as e:
                raise DeviceTimeout(f"write of {command!r} not done within {self.timeout_s:g} s",
                                    device=self.name, operation="write") from e
            except (serial.SerialException, OSError) as e:
                raise CommunicationError(f"write of {command!r} failed: {e}", device=self.name,
                                         operation="write") from e
            if written is not None and written != len(data):
                raise CommunicationError(f"only {written} of {len(data)} bytes of {command!r} written",
                                         device=self.name, operation="write")
        log.debug("%s <- %s", self.name, command)

    def set_sensitivity(self, amperes_per_volt: float) -> None:
        n = sensitivity_index(amperes_per_volt)
        if n is None:
            raise LimitViolation(
                "sensitivity", amperes_per_volt,
                "1-2-5 steps from 1e-12 to 1e-3 A/V: "
                + ", ".join(f"{s:g}" for s in SENSITIVITIES_A_PER_V), device=self.name)
        # forget the old value first: if the write fails half way, the gain the
        # instrument ended up with is unknown and must not be used for the dose
        self._sensitivity = None
        self.send(f"SENS {n}")
        self._sensitivity = SENSITIVITIES_A_PER_V[n]

    def sensitivity(self) -> float:
        if self._sensitivity is None:
            raise DeviceError("sensitivity unknown: the SR570 cannot be queried and "
                              "set_sensitivity() has not succeeded since connect",
                              device=self.name, operation="sensitivity")
        return self._sensitivity

    def reset_overload(self) -> None:
        """Clear an input overload (ROLD); the gain setting is unchanged."""
        self.send("ROLD")
