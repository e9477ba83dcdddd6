"""An external electron source switched by a shutter (or an emission relay)
on a serial line: RS-232, USB-serial, or "socket://host:port" (pyserial URL).

The line protocol is plain ASCII, one command per line, one reply per
command, and every string is a setup option (devices.electron_source.options),
so a shutter controller or a relay box with another vocabulary needs no code:

  option        default    meaning
  open          OPEN       command that opens the shutter
  close         CLOSE      command that closes it
  query         STATE?     command whose reply is the state
  open_reply    OPEN       state reply: open
  closed_reply  CLOSED     state reply: closed
  ack           OK         reply to open/close
  error_prefix  ERR        a reply starting with this is the controller's error
  terminator    "\\r\\n"     line end sent; replies may end in CR LF or LF
  baudrate      9600       8N1, no handshake

Every open and close is verified by the state query. The shutter is closed
on connect, on any error during an operation (best effort, then the error
is raised) and on close. The source's beam energy is set on the source by
hand: the driver reports none, the plan's eht_kv is U in the dose.
"""
from __future__ import annotations

import logging
import threading
from typing import Mapping, Optional

import serial

from devices.errors import CommunicationError, DeviceError, DeviceTimeout, InterlockError, NotConnected
from devices.interfaces import DeviceStatus, ElectronSource, ElectronSourceStatus

log = logging.getLogger(__name__)

DEFAULTS: dict[str, object] = {"open": "OPEN", "close": "CLOSE", "query": "STATE?", "open_reply": "OPEN",
                               "closed_reply": "CLOSED", "ack": "OK", "error_prefix": "ERR",
                               "terminator": "\r\n", "baudrate": 9600}


def shutter_options(options: Optional[Mapping]) -> dict:
    """DEFAULTS updated by ``options``; ValueError naming a wrong entry."""
    out = dict(DEFAULTS)
    for k, v in dict(options or {}).items():
        where = f"devices.electron_source.options.{k}"
        if k not in DEFAULTS:
            raise ValueError(f"{where}: unknown option; allowed {sorted(DEFAULTS)}")
        if k == "baudrate":
            if isinstance(v, bool) or not isinstance(v, int) or v not in serial.SerialBase.BAUDRATES:
                raise ValueError(f"{where} = {v!r}: a standard baud rate (e.g. 9600, 19200, 115200)")
        elif k == "terminator":
            if v not in ("\r\n", "\n", "\r"):
                raise ValueError(f"{where} = {v!r}: allowed CR LF, LF or CR")
        elif not isinstance(v, str) or not v.strip() or "\r" in v or "\n" in v:
            raise ValueError(f"{where} = {v!r}: a non-empty text of one line")
        out[k] = v
    if out["open_reply"] == out["closed_reply"]:
        raise ValueError("devices.electron_source.options: open_reply and closed_reply must differ")
    return out


class SerialShutterSource(ElectronSource):
    def __init__(self, url: str, options: Optional[Mapping] = None, timeout_s: float = 2.0,
                 name: str = "electron_source"):
        if not url:
            raise ValueError("devices.electron_source.url: the serial port (COM3, /dev/ttyUSB0, socket://host:port)")
        self.url, self.name, self.timeout_s = url, name, float(timeout_s)
        self.opts = shutter_options(options)
        self._port: Optional[serial.SerialBase] = None
        self._lock = threading.RLock()

    # ------------------------------------------------------------ life cycle
    def connect(self) -> None:
        with self._lock:
            if self._port is not None:
                return
            try:
                self._port = serial.serial_for_url(
                    self.url, baudrate=int(self.opts["baudrate"]), bytesize=serial.EIGHTBITS,
                    parity=serial.PARITY_NONE, stopbits=serial.STOPBITS_ONE, timeout=self.timeout_s,
                    write_timeout=self.timeout_s)
            except (serial.SerialException, OSError, ValueError) as e:
                raise CommunicationError(f"cannot open {self.url!r}: {e}", device=self.name,
                                         operation="connect") from e
            try:
                self.set_beam(False)          # whatever it was left at: closed before anything else
            except BaseException:
                self._close_port()
                raise

    def close(self) -> None:
        with self._lock:
            if self._port is None:
                return
            try:
                self._command("close")
            except DeviceError as e:          # closing the port must go on; the log keeps the doubt
                log.error("%s: could not close the shutter on disconnect: %s", self.name, e)
            self._close_port()

    def _close_port(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            try:
                port.close()
            except (serial.SerialException, OSError) as e:
                log.warning("%s: error while closing the port: %s", self.name, e)

    def identity(self) -> str:
        return f"serial shutter on {self.url}"

    def status(self) -> DeviceStatus:
        if self._port is None:
            return DeviceStatus(False, "not connected")
        try:
            return DeviceStatus(True, "open" if self.beam_on() else "closed")
        except DeviceError as e:
            return DeviceStatus(False, str(e))

    # ------------------------------------------------------------ protocol
    def _transact(self, command: str, operation: str) -> str:
        with self._lock:
            if self._port is None:
                raise NotConnected("not connected", device=self.name, operation=operation)
            try:
                self._port.reset_input_buffer()           # a late reply must not answer this command
                self._port.write((command + str(self.opts["terminator"])).encode("ascii"))
                raw = self._port.readline()
            except serial.SerialTimeoutException as e:
                raise DeviceTimeout(f"{command!r} not sent within {self.timeout_s:g} s", device=self.name,
                                    operation=operation) from e
            except (serial.SerialException, OSError) as e:
                raise CommunicationError(f"{command!r} failed: {e}", device=self.name, operation=operation) from e
        if not raw.endswith(b"\n"):
            raise DeviceTimeout(f"no reply to {command!r} within {self.timeout_s:g} s", device=self.name,
                                operation=operation)
        reply = raw.decode("ascii", "replace").strip()
        if reply.startswith(str(self.opts["error_prefix"])):
            raise DeviceError(f"{command!r}: the controller says {reply!r}", device=self.name, operation=operation)
        return reply

    def _command(self, which: str) -> None:
        reply = self._transact(str(self.opts[which]), which)
        if reply != self.opts["ack"]:
            raise CommunicationError(f"{self.opts[which]!r}: reply {reply!r}, expected {self.opts['ack']!r}",
                                     device=self.name, operation=which)

    # ------------------------------------------------------------ the interface
    def source_status(self) -> ElectronSourceStatus:
        reply = self._transact(str(self.opts["query"]), "query")
        if reply == self.opts["open_reply"]:
            return ElectronSourceStatus(True)
        if reply == self.opts["closed_reply"]:
            return ElectronSourceStatus(False)
        raise CommunicationError(f"state reply {reply!r}: expected {self.opts['open_reply']!r} or "
                                 f"{self.opts['closed_reply']!r}", device=self.name, operation="query")

    def set_beam(self, on: bool) -> None:
        with self._lock:
            try:
                self._command("open" if on else "close")
                if self.beam_on() != bool(on):
                    raise InterlockError(f"the shutter did not {'open' if on else 'close'} (state read back)",
                                         device=self.name, operation="open" if on else "close")
            except DeviceError:
                if on:                            # best effort: never leave it open after a doubtful open
                    try:
                        self._command("close")
                    except DeviceError as e:
                        log.error("%s: close after a failed open failed too: %s", self.name, e)
                raise
