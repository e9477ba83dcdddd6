"""Keysight (Agilent) 33522A two-channel waveform generator driving the ion-beam raster.

Channel 1 deflects X, channel 2 deflects Y; both run a sawtooth (RAMP, 100 %
symmetry).  The deflection amplifier input is high impedance, so the output
load is set to INF and amplitudes are Vpp at that load.

This module also holds ``ScpiVisaDevice``, the VISA/SCPI plumbing shared with
the 34465A driver: opening, *IDN? parsing, SYST:ERR? draining and the
translation of pyvisa errors into ``devices.errors``.
"""
from __future__ import annotations

import logging
import math
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import pyvisa
from pyvisa import constants as visa_constants
from pyvisa import errors as visa_errors

from devices.errors import (CommunicationError, DeviceError, DeviceTimeout, LimitViolation,
                            NotConnected)
from devices.interfaces import DeviceStatus, RasterSettings, WaveformGenerator

log = logging.getLogger(__name__)

ResourceWrapper = Callable[[Any], Any]


def scpi_number(value: float) -> str:
    """Plain SCPI numeric literal (no unit suffix: SI values are sent as-is)."""
    return f"{float(value):.10g}"


def parse_scpi_bool(reply: str, *, device: str, what: str) -> bool:
    text = reply.strip().upper()
    if text in ("1", "ON"):
        return True
    if text in ("0", "OFF"):
        return False
    raise CommunicationError(f"unparseable boolean {reply!r} for {what}", device=device,
                             operation="query")


class ScpiVisaDevice:
    """VISA transport with SCPI conventions. Subclasses set ``model_token``."""

    model_token = ""
    #: bound on SYST:ERR? reads, so a misbehaving instrument cannot loop us forever
    max_error_reads = 32

    def __init__(self, resource: str, visa_library: str, timeout_s: float, name: str,
                 resource_wrapper: Optional[ResourceWrapper]):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.resource_name = resource
        self.visa_library = visa_library
        self.timeout_s = float(timeout_s)
        self.name = name
        self._wrapper = resource_wrapper
        self._res: Any = None
        # one lock per instrument: a query (write+read) and multi-command
        # sequences must not interleave when engine and GUI share the driver
        self._lock = threading.RLock()
        self.idn: Optional[tuple[str, str, str, str]] = None

    # ------------------------------------------------------------ life cycle
    @property
    def resource(self) -> Any:
        """The opened pyvisa resource (after ``resource_wrapper``), or None."""
        return self._res

    @property
    def connected(self) -> bool:
        return self._res is not None

    def _open(self) -> None:
        with self._lock:
            if self._res is not None:
                return
            try:
                rm = pyvisa.ResourceManager(self.visa_library)
                raw = rm.open_resource(self.resource_name, read_termination="\n",
                                       write_termination="\n",
                                       timeout=max(1, round(self.timeout_s * 1000)))
            except (visa_errors.VisaIOError, visa_errors.VisaIOWarning) as e:
                raise self._translate(e, "connect") from e
            except (OSError, ValueError, LookupError, visa_errors.Error) as e:
                # no VISA backend, bad resource name, unreadable pyvisa-sim file ...
                raise CommunicationError(
                    f"cannot open {self.resource_name!r} with VISA library "
                    f"{self.visa_library!r}: {e}", device=self.name, operation="connect") from e
            self._res = self._wrapper(raw) if self._wrapper else raw
            try:
                self.idn = self._identify()
                self._drain_errors()
            except BaseException:
                self.idn = None
                self._close_resource()
                raise
            log.info("%s connected: %s", self.name, self.identity())

    def _identify(self) -> tuple[str, str, str, str]:
        reply = self.query("*IDN?")
        parts = [p.strip() for p in reply.split(",")]
        if len(parts) != 4 or not all(parts[:2]):
            raise CommunicationError(f"unparseable *IDN? reply {reply!r}", device=self.name,
                                     operation="connect")
        manufacturer, model, serial, firmware = parts
        if self.model_token not in model:
            raise CommunicationError(
                f"wrong instrument at {self.resource_name}: model {model!r} "
                f"(expected {self.model_token})", device=self.name, operation="connect")
        return manufacturer, model, serial, firmware

    def _drain_errors(self) -> None:
        """Discard errors left from before we connected, so they are not blamed on us."""
        for _ in range(self.max_error_reads):
            reply = self.query("SYST:ERR?")
            if self._error_code(reply) == 0:
                return
            log.warning("%s: stale instrument error discarded: %s", self.name, reply)

    def _close_resource(self) -> None:
        # Only the resource is closed, never the ResourceManager: pyvisa shares one
        # manager per VISA library, so closing it would cut the other instruments.
        with self._lock:
            res, self._res = self._res, None
        if res is None:
            return
        try:
            res.close()
        except Exception as e:   # closing is best effort; the session is gone either way
            log.warning("%s: error while closing: %s", self.name, e)

    def identity(self) -> str:
        if self.idn is None:
            raise NotConnected("identity unknown: never connected", device=self.name,
                               operation="identity")
        manufacturer, model, serial, firmware = self.idn
        return f"{manufacturer} {model} (s/n {serial}, firmware {firmware})"

    def status(self) -> DeviceStatus:
        if self._res is None:
            return DeviceStatus(False, "not connected")
        return DeviceStatus(True, self.identity())

    # ------------------------------------------------------------ transport
    def _translate(self, e: Exception, operation: str) -> DeviceError:
        code = getattr(e, "error_code", None)
        what = f"{getattr(e, 'abbreviation', type(e).__name__)}: {getattr(e, 'description', e)}"
        if code == visa_constants.StatusCode.error_timeout:
            return DeviceTimeout(f"no reply within {self.timeout_s:g} s ({what})",
                                 device=self.name, operation=operation)
        return CommunicationError(f"VISA error {what}", device=self.name, operation=operation)

    @contextmanager
    def _io(self, operation: str) -> Iterator[Any]:
        if self._res is None:
            raise NotConnected("not connected", device=self.name, operation=operation)
        try:
            yield self._res
        except (visa_errors.VisaIOError, visa_errors.VisaIOWarning) as e:
            raise self._translate(e, operation) from e
        except visa_errors.InvalidSession as e:
            raise NotConnected("VISA session closed", device=self.name,
                               operation=operation) from e
        except (OSError, UnicodeDecodeError) as e:
            raise CommunicationError(str(e), device=self.name, operation=operation) from e

    def write(self, command: str) -> None:
        with self._lock, self._io("write") as res:
            log.debug("%s <- %s", self.name, command)
            res.write(command)

    def query(self, command: str) -> str:
        with self._lock, self._io("query") as res:
            reply = res.query(command).strip()
            log.debug("%s <- %s -> %s", self.name, command, reply)
            return reply

    def query_float(self, command: str) -> float:
        reply = self.query(command)
        try:
            return float(reply)
        except ValueError:
            raise CommunicationError(f"unparseable reply {reply!r} to {command}",
                                     device=self.name, operation="query") from None

    def _error_code(self, reply: str) -> int:
        try:
            return int(reply.split(",", 1)[0])
        except ValueError:
            raise CommunicationError(f"unparseable SYST:ERR? reply {reply!r}",
                                     device=self.name, operation="query") from None

    def check_errors(self, operation: str) -> None:
        """Read the error queue until '+0,...'; any entry fails the operation."""
        found = []
        for _ in range(self.max_error_reads):
            reply = self.query("SYST:ERR?")
            if self._error_code(reply) == 0:
                break
            found.append(reply)
        else:
            found.append(f"(error queue not empty after {self.max_error_reads} reads)")
        if found:
            raise CommunicationError("instrument reported " + "; ".join(found),
                                     device=self.name, operation=operation)


# ----------------------------------------------------------------- 33522A
HIGH_Z_OHM = 9.9e37        # what the 33500 series reports for OUTP:LOAD INF
MIN_VPP_HIGH_Z = 2e-3      # smallest amplitude into high impedance (1 mVpp into 50 ohm)
MAX_PEAK_V_HIGH_Z = 10.0   # |offset| + Vpp/2 may not exceed this into high impedance

# read-back tolerances (abs, rel): the instrument rounds to its own resolution
_TOL = {"frequency_hz": (1e-6, 1e-6), "amplitude_vpp": (1e-4, 1e-3), "offset_v": (1e-3, 1e-3)}


class Keysight33522A(ScpiVisaDevice, WaveformGenerator):
    model_token = "33522"

    def __init__(self, resource: str, visa_library: str = "@py", timeout_s: float = 2.0,
                 max_vpp: float = 20.0, name: str = "waveform_generator",
                 resource_wrapper: Optional[ResourceWrapper] = None):
        if not (math.isfinite(max_vpp) and max_vpp > 0):
            raise ValueError(f"max_vpp must be a positive number, got {max_vpp!r}")
        super().__init__(resource, visa_library, timeout_s, name, resource_wrapper)
        # the setup's safety window; the instrument itself refuses > 20 Vpp into high-Z
        self.max_vpp = float(max_vpp)
        #: settings read back by the last successful configure_raster (None: unknown)
        self.last_raster: Optional[RasterSettings] = None

    def connect(self) -> None:
        self.last_raster = None      # someone may have used the front panel meanwhile
        self._open()

    def close(self) -> None:
        if self._res is not None:
            try:   # an unattended raster must not keep running after we let go
                self.set_outputs(False)
            except DeviceError as e:
                log.warning("%s: could not switch outputs off on close: %s", self.name, e)
        self._close_resource()

    # ------------------------------------------------------------ raster
    def _channels(self, r: RasterSettings):
        return ((1, "x", r.x_frequency_hz, r.x_amplitude_vpp, r.x_offset_v),
                (2, "y", r.y_frequency_hz, r.y_amplitude_vpp, r.y_offset_v))

    def check_limits(self, raster: RasterSettings) -> None:
        """Raise LimitViolation (naming the field) for anything outside the window."""
        for _, axis, freq, amp, offs in self._channels(raster):
            if not (math.isfinite(freq) and freq > 0):
                raise LimitViolation(f"{axis}_frequency_hz", freq, "> 0 Hz", device=self.name)
            if not (math.isfinite(amp) and MIN_VPP_HIGH_Z <= amp <= self.max_vpp):
                raise LimitViolation(f"{axis}_amplitude_vpp", amp,
                                     f"[{MIN_VPP_HIGH_Z:g}, {self.max_vpp:g}] Vpp into high impedance",
                                     device=self.name)
            if not (math.isfinite(offs) and abs(offs) + amp / 2 <= MAX_PEAK_V_HIGH_Z):
                raise LimitViolation(f"{axis}_offset_v", offs,
                                     f"|offset| + amplitude/2 <= {MAX_PEAK_V_HIGH_Z:g} V "
                                     f"(amplitude {amp:g} Vpp)", device=self.name)

    def configure_raster(self, raster: RasterSettings) -> RasterSettings:
        self.check_limits(raster)          # before anything is sent
        with self._lock:
            self.last_raster = None
            for ch, _, freq, amp, offs in self._channels(raster):
                src = f"SOUR{ch}"
                self.write(f"{src}:FUNC RAMP")
                self.write(f"{src}:FUNC:RAMP:SYMM 100")
                self.write(f"{src}:FREQ {scpi_number(freq)}")
                # the load must be set first: the 33522A reinterprets VOLT for the load
                self.write(f"OUTP{ch}:LOAD INF")
                self.write(f"{src}:VOLT:UNIT VPP")
                # offset to 0 first, so old offset + new amplitude cannot
                # transiently exceed the peak limit (the instrument would clip)
                self.write(f"{src}:VOLT:OFFS 0")
                self.write(f"{src}:VOLT {scpi_number(amp)}")
                self.write(f"{src}:VOLT:OFFS {scpi_number(offs)}")
            self.write("SOUR1:PHAS:SYNC")   # restart both ramps together: X and Y in step
            self.check_errors("configure_raster")
            actual = self.read_raster()
        self._verify(raster, actual)
        self.last_raster = actual
        return actual

    def read_raster(self) -> RasterSettings:
        """Read both channels back; waveform and load must be what a raster needs."""
        values = {}
        with self._lock:
            for ch, axis in ((1, "x"), (2, "y")):
                src = f"SOUR{ch}"
                func = self.query(f"{src}:FUNC?").strip('"').upper()
                symmetry = self.query_float(f"{src}:FUNC:RAMP:SYMM?")
                load = self.query_float(f"OUTP{ch}:LOAD?")
                unit = self.query(f"{src}:VOLT:UNIT?").upper()
                problems = []
                if func != "RAMP":
                    problems.append(f"function {func!r} (expected RAMP)")
                if not math.isclose(symmetry, 100.0, abs_tol=1e-3):
                    problems.append(f"ramp symmetry {symmetry:g} % (expected 100)")
                if not load >= HIGH_Z_OHM:      # INF reads back as 9.9E+37 (or inf)
                    problems.append(f"load {load:g} ohm (expected INF)")
                if unit != "VPP":
                    problems.append(f"amplitude unit {unit!r} (expected VPP)")
                if problems:
                    raise CommunicationError(f"channel {ch} read-back: " + ", ".join(problems),
                                             device=self.name, operation="configure_raster")
                values[f"{axis}_frequency_hz"] = self.query_float(f"{src}:FREQ?")
                values[f"{axis}_amplitude_vpp"] = self.query_float(f"{src}:VOLT?")
                values[f"{axis}_offset_v"] = self.query_float(f"{src}:VOLT:OFFS?")
        return RasterSettings(**values)

    def _verify(self, wanted: RasterSettings, actual: RasterSettings) -> None:
        bad = []
        for field, value in vars(wanted).items():
            kind = field.split("_", 1)[1]
            abs_tol, rel_tol = _TOL[kind]
            got = getattr(actual, field)
            if not math.isclose(got, value, abs_tol=abs_tol, rel_tol=rel_tol):
                bad.append(f"{field} set {value:g}, read back {got:g}")
        if bad:
            raise CommunicationError("read-back mismatch: " + "; ".join(bad), device=self.name,
                                     operation="configure_raster")

    # ------------------------------------------------------------ outputs
    def set_outputs(self, on: bool) -> None:
        state = 1 if on else 0
        with self._lock:
            self.write(f"OUTP1 {state}")
            self.write(f"OUTP2 {state}")
            self.check_errors("set_outputs")
            if self.outputs_on() != bool(on):
                raise CommunicationError(f"outputs did not switch {'on' if on else 'off'}",
                                         device=self.name, operation="set_outputs")

    def outputs_on(self) -> bool:
        """True when both channels are on, False when both are off."""
        with self._lock:
            x = parse_scpi_bool(self.query("OUTP1?"), device=self.name, what="OUTP1?")
            y = parse_scpi_bool(self.query("OUTP2?"), device=self.name, what="OUTP2?")
        if x != y:
            # half a raster (a line scan) is neither "on" nor "off": make someone look
            raise DeviceError(f"outputs disagree: channel 1 {'on' if x else 'off'}, "
                              f"channel 2 {'on' if y else 'off'}", device=self.name,
                              operation="outputs_on")
        return x
