"""Keysight 34465A digital multimeter: reads the current preamplifier's output
voltage for the ion dose measurement (DC volts, fixed range).

Transport, *IDN? check, SYST:ERR? handling and error translation come from
``ScpiVisaDevice`` (in ``devices.awg_33522a``).
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

import numpy as np

from devices.awg_33522a import ResourceWrapper, ScpiVisaDevice, parse_scpi_bool, scpi_number
from devices.errors import CommunicationError, DeviceError, LimitViolation
from devices.interfaces import Multimeter

log = logging.getLogger(__name__)

VALID_RANGES_V = (0.1, 1.0, 10.0, 100.0, 1000.0)
# 0.001 / 0.002 / 0.006 need the DIG option; without it the instrument reports
# an error, which check_errors turns into CommunicationError
VALID_NPLC = (0.001, 0.002, 0.006, 0.02, 0.06, 0.2, 1.0, 10.0, 100.0)
OVERLOAD_V = 9.9e37          # the 34465A returns +/-9.9E+37 for an overload
MAX_SAMPLES = 1_000_000      # SAMP:COUN upper limit
MAX_INTERVAL_S = 3600.0      # SAMP:TIM upper limit


def _pick(quantity: str, value: float, allowed: Sequence[float], device: str) -> float:
    """Map ``value`` onto one of the instrument's discrete settings, or refuse."""
    for a in allowed:
        if math.isclose(float(value), a, rel_tol=1e-9):
            return a
    raise LimitViolation(quantity, value, "one of " + ", ".join(f"{a:g}" for a in allowed),
                         device=device)


class Keysight34465A(ScpiVisaDevice, Multimeter):
    model_token = "34465A"

    def __init__(self, resource: str, visa_library: str = "@py", timeout_s: float = 2.0,
                 name: str = "multimeter", resource_wrapper: Optional[ResourceWrapper] = None):
        super().__init__(resource, visa_library, timeout_s, name, resource_wrapper)
        self.range_v: Optional[float] = None
        self.nplc: Optional[float] = None
        # instrument sample count as last set by us; None = unknown, so the next
        # single reading re-sends it rather than trusting a stale block setup
        self._sample_count: Optional[int] = None

    def connect(self) -> None:
        self._sample_count = None
        self._open()

    def close(self) -> None:
        self._close_resource()

    # ------------------------------------------------------------ setup
    def configure_dc_voltage(self, range_v: float, nplc: float) -> None:
        range_v = _pick("range_v", range_v, VALID_RANGES_V, self.name)
        nplc = _pick("nplc", nplc, VALID_NPLC, self.name)
        with self._lock:
            self._sample_count = None
            self.write(f"CONF:VOLT:DC {scpi_number(range_v)}")
            # CONF with a range already fixes it; said explicitly because an
            # autoranging meter would change range (and settling) mid-dose
            self.write("VOLT:DC:RANG:AUTO 0")
            self.write(f"VOLT:DC:NPLC {scpi_number(nplc)}")
            self.write("TRIG:SOUR IMM")
            self.write("TRIG:COUN 1")
            self.write("SAMP:SOUR IMM")
            self.write("SAMP:COUN 1")
            self.check_errors("configure_dc_voltage")
            got_range = self.query_float("VOLT:DC:RANG?")
            auto = parse_scpi_bool(self.query("VOLT:DC:RANG:AUTO?"), device=self.name,
                                   what="VOLT:DC:RANG:AUTO?")
            got_nplc = self.query_float("VOLT:DC:NPLC?")
            self._sample_count = 1
        bad = []
        if not math.isclose(got_range, range_v, rel_tol=1e-6):
            bad.append(f"range set {range_v:g} V, read back {got_range:g} V")
        if auto:
            bad.append("autorange still on")
        if not math.isclose(got_nplc, nplc, rel_tol=1e-6):
            bad.append(f"NPLC set {nplc:g}, read back {got_nplc:g}")
        if bad:
            raise CommunicationError("read-back mismatch: " + "; ".join(bad), device=self.name,
                                     operation="configure_dc_voltage")
        self.range_v, self.nplc = range_v, nplc

    # ------------------------------------------------------------ readings
    def read_voltage(self) -> float:
        with self._lock:
            if self._sample_count != 1:
                self.write("SAMP:SOUR IMM")
                self.write("SAMP:COUN 1")
                self._sample_count = 1
            value = self._parse_block(self.query("READ?"), 1)[0]
        return float(value)

    def read_block(self, count: int, interval_s: float) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) \
                or not 1 <= count <= MAX_SAMPLES:
            raise LimitViolation("count", count, f"integer in [1, {MAX_SAMPLES}]",
                                 device=self.name)
        if not (math.isfinite(interval_s) and 0 < interval_s <= MAX_INTERVAL_S):
            raise LimitViolation("interval_s", interval_s, f"(0, {MAX_INTERVAL_S:g}] s",
                                 device=self.name)
        count = int(count)
        with self._lock:
            self._sample_count = None
            self.write("TRIG:SOUR IMM")
            self.write("TRIG:COUN 1")
            self.write("SAMP:SOUR TIM")
            self.write(f"SAMP:TIM {scpi_number(interval_s)}")
            self.write(f"SAMP:COUN {count}")
            self.check_errors("read_block")
            # the meter rounds the interval to its timebase: use what it will do
            interval = self.query_float("SAMP:TIM?")
            self._sample_count = count
            reply = self._query_long("READ?", count * interval)
        volts = self._parse_block(reply, count)
        return np.arange(count) * interval, volts

    def _query_long(self, command: str, expected_s: float) -> str:
        """Query whose answer takes ``expected_s`` on top of the normal timeout."""
        with self._lock, self._io("query") as res:
            old = res.timeout
            res.timeout = max(1, round((self.timeout_s + 1.2 * expected_s) * 1000))
            try:
                return res.query(command).strip()
            finally:
                res.timeout = old

    def _parse_block(self, reply: str, count: int) -> np.ndarray:
        try:
            volts = np.array([float(v) for v in reply.split(",")], dtype=float)
        except ValueError:
            raise CommunicationError(f"unparseable reading {reply[:80]!r}", device=self.name,
                                     operation="read") from None
        if volts.size != count:
            raise CommunicationError(f"expected {count} readings, got {volts.size}",
                                     device=self.name, operation="read")
        over = int(np.count_nonzero(~(np.abs(volts) < OVERLOAD_V)))
        if over:
            # a clipped reading would silently under-report the dose
            rng = f"{self.range_v:g} V" if self.range_v else "the present"
            raise DeviceError(f"overload in {over} of {count} readings (input exceeds {rng} range)",
                              device=self.name, operation="read")
        return volts
