"""Serial (RS-232 / USB-serial / TCP) ion gun driver driven by a command table.

Everything protocol-specific lives in the YAML command table
(devices/command_table.py); this module only does the transaction, the unit
conversion at the edge (table units <-> SI) and the safety policy:

* the beam is blanked right after connecting, on any error during an
  operation (best effort, then the error is re-raised) and on close (blank,
  then beam off, then the port is closed);
* setpoints are checked against the table's and the setup's windows before
  anything is sent;
* beam on / unblank are refused while the gun reports an open interlock, and a
  target current above the setup maximum blanks the beam.
"""
from __future__ import annotations

import logging
import math
import threading
from pathlib import Path
from typing import Optional

import serial
from serial import serial_for_url

from devices.command_table import CommandTable, load_command_table
from devices.errors import CommunicationError, DeviceError, DeviceTimeout, InterlockError, LimitViolation, \
    NotConnected
from devices.interfaces import Capability, DeviceStatus, IonGun, IonGunStatus

log = logging.getLogger(__name__)

_TRUE = {"1", "ON", "TRUE", "YES", "Y", "T", "OK", "CLOSED"}
_FALSE = {"0", "OFF", "FALSE", "NO", "N", "F", "OPEN", "FAULT"}


def setup_limits(safety) -> dict:
    """The driver's ``limits`` dict (SI) from a ``setup_config.Safety``."""
    return {
        "energy_v": (safety.ion_energy_kv[0] * 1e3, safety.ion_energy_kv[1] * 1e3),
        "cluster_size": tuple(safety.ion_cluster_size),
        "current_a_max": safety.ion_current_na_max * 1e-9,
    }


class SerialIonGun(IonGun):
    capabilities = Capability.BEAM_BLANKING | Capability.RASTER | Capability.CLUSTER_SIZE

    def __init__(self, url: str, command_table: Path | str | CommandTable, limits: Optional[dict] = None,
                 timeout_s: Optional[float] = None, name: str = "ion_gun"):
        self.url = url
        self.table = command_table if isinstance(command_table, CommandTable) \
            else load_command_table(command_table)
        self.limits = dict(limits or {})
        unknown = set(self.limits) - {"energy_v", "cluster_size", "current_a_max"}
        if unknown:
            raise ValueError(f"{name}: unknown limit(s) {sorted(unknown)}; "
                             "allowed energy_v, cluster_size, current_a_max")
        self.timeout_s = timeout_s          # replaces the table's default; per-operation timeouts stand
        self.name = name
        self._port = None
        self._connected = False             # between connect() and close(); the port may be reopened
        self._lock = threading.RLock()      # one transaction (or check-then-act sequence) at a time
        self._identity = ""
        self._gun_error = ""                # the gun's last error reply, for IonGunStatus.error

    # ------------------------------------------------------------ life cycle
    def connect(self) -> None:
        with self._lock:
            if self._connected:
                return
            self._open()
            self._connected = True
            try:
                self._identity = self._transact("identify").string
                self._transact("blank")     # nothing may mill until the engine asks for it
            except Exception:
                self._connected = False
                self._close_port()
                raise
            log.info("%s: connected to %s (%s), beam blanked", self.name, self.url, self._identity)

    def close(self) -> None:
        """Blank, beam off, close the port. Both safing steps are tried; the
        first failure is re-raised after the port is closed."""
        with self._lock:
            if not self._connected:
                return
            first: Optional[Exception] = None
            for op in ("blank", "beam_off"):
                try:
                    self._transact(op)
                except DeviceError as e:
                    log.error("%s: %s failed while closing: %s", self.name, op, e)
                    first = first or e
            self._connected = False
            self._close_port()
            if first is not None:
                raise first

    def identity(self) -> str:
        return self._identity

    def status(self) -> DeviceStatus:
        try:
            st = self.gun_status()
        except DeviceError as e:
            return DeviceStatus(False, str(e))
        if not st.interlocks_ok:
            open_ = [k for k, ok in st.interlocks.items() if not ok]
            return DeviceStatus(False, f"interlock open {open_ or ''}".strip())
        return DeviceStatus(True, "ok")

    # ------------------------------------------------------------ IonGun API
    def gun_status(self) -> IonGunStatus:
        m = self._op("status")
        e_scale = self.table.op("get_energy").scale
        i_scale = self.table.op("get_current").scale
        g = m.groupdict()
        st = IonGunStatus(
            beam_on=self._bool("status", "beam", g["beam"]),
            blanked=self._bool("status", "blank", g["blank"]),
            interlocks_ok=self._bool("status", "interlocks_ok", g["interlocks_ok"]),
            interlocks=self._interlocks(g.get("interlocks")),
            energy=self._num("status", "energy", g["energy"]) * e_scale,
            cluster_size=int(round(self._num("status", "cluster_size", g["cluster_size"]))),
            emission_current=self._num("status", "emission", g["emission"]) * i_scale,
            target_current=self._num("status", "target", g["target"]) * i_scale,
            raster_on=self._bool("status", "raster", g["raster"]),
            error=self._gun_error,
        )
        self._check_current(st.target_current)
        return st

    def set_beam(self, on: bool) -> None:
        with self._lock:                    # no other transaction between the check and beam on
            if on:
                self._require_interlocks("beam on")
                self._op("beam_on")
            else:
                self._op("beam_off")

    def set_blanked(self, blanked: bool) -> None:
        with self._lock:
            if blanked:
                self._op("blank")
            else:
                self._require_interlocks("unblank")
                self._op("unblank")

    def set_energy(self, volts: float) -> None:
        self._op("set_energy", value=self._setpoint("set_energy", "energy_v", volts, integer=False))

    def energy(self) -> float:
        return self._read_value("get_energy")

    def set_cluster_size(self, n: int) -> None:
        self._op("set_cluster_size", value=self._setpoint("set_cluster_size", "cluster_size", n, integer=True))

    def set_raster(self, on: bool) -> None:
        self._op("raster_on" if on else "raster_off")

    def target_current(self) -> float:
        amps = self._read_value("get_current")
        self._check_current(amps)
        return amps

    def last_error(self) -> str:
        m = self._op("last_error")
        g = m.groupdict()
        if g.get("code") is not None and g["code"].strip().lstrip("+-").isdigit() and int(g["code"]) == 0:
            return ""
        msg = g.get("message")
        return (msg if msg is not None else m.string).strip()

    # ------------------------------------------------------------ checks
    def _setpoint(self, op: str, limit_key: str, value, *, integer: bool):
        """SI value -> table value, refused (LimitViolation, nothing sent)
        outside the setup window (SI) or the table window (table units)."""
        quantity = "cluster_size" if integer else "energy"
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise LimitViolation(quantity, value, "a number", device=self.name) from None
        if not math.isfinite(v) or (integer and v != int(v)):
            raise LimitViolation(quantity, value, "a finite " + ("integer" if integer else "number"),
                                 device=self.name)
        setup = self.limits.get(limit_key)
        if setup is not None and not setup[0] <= v <= setup[1]:
            unit = "" if integer else " V"
            raise LimitViolation(quantity, value, f"[{setup[0]:g}, {setup[1]:g}]{unit} (setup safety)",
                                 device=self.name)
        o = self.table.op(op)
        table_value = v / o.scale
        if o.limits is not None and not o.limits[0] <= table_value <= o.limits[1]:
            lo, hi = o.limits[0] * o.scale, o.limits[1] * o.scale
            raise LimitViolation(quantity, value, f"[{lo:g}, {hi:g}] (command table {self.table.name})",
                                 device=self.name)
        if integer:
            return int(round(table_value))
        return table_value

    def _require_interlocks(self, what: str) -> None:
        st = self.gun_status()
        if not st.interlocks_ok:
            open_ = [k for k, ok in st.interlocks.items() if not ok]
            err = InterlockError(f"{what} refused: interlock open {open_ or '(unspecified)'}",
                                 device=self.name, operation=what.replace(" ", "_"))
            self._safe_blank(err)
            raise err

    def _check_current(self, amps: float) -> None:
        cap = self.limits.get("current_a_max")
        if cap is not None and amps > cap:
            err = InterlockError(f"target current {amps:.3e} A above setup maximum {cap:.3e} A; beam blanked",
                                 device=self.name, operation="target_current")
            self._safe_blank(err)
            raise err

    # ------------------------------------------------------------ transport
    def _op(self, op: str, **fields):
        """One operation with the safety policy: any failure blanks the beam."""
        with self._lock:
            try:
                return self._transact(op, **fields)
            except DeviceError as e:
                if op != "blank":           # a failed blank was already retried per table
                    self._safe_blank(e)
                raise

    def _safe_blank(self, cause: Exception) -> None:
        with self._lock:
            if not self._connected:
                return
            try:
                self._transact("blank")
                log.warning("%s: beam blanked after error: %s", self.name, cause)
            except DeviceError as e:
                log.error("%s: could NOT blank the beam after error (%s): %s", self.name, cause, e)

    def _transact(self, op: str, **fields):
        """Send ``op`` and return the reply's regex match; retries timeouts and
        garbled / lost replies per the table. An error reply is not retried:
        the gun understood and refused."""
        if not self._connected:
            raise NotConnected("not connected", device=self.name, operation=op)
        o = self.table.op(op)
        term = self.table.terminator_for(op)
        enc = self.table.encoding
        line_out = (o.command.format(**fields) + term).encode(enc)
        timeout = o.timeout_s or self.timeout_s or self.table.timeout_s
        attempts = 1 + self.table.retries_for(op)
        last: Optional[DeviceError] = None
        for attempt in range(1, attempts + 1):
            try:
                if self._port is None:      # lost on a previous attempt: reopen (e.g. USB re-enumerated)
                    self._open()
                port = self._port
                assert port is not None
                port.timeout = timeout
                port.reset_input_buffer()   # drop a late answer to an earlier, timed-out command
                port.write(line_out)
                raw = port.read_until(term.encode(enc))
            except (serial.SerialException, OSError) as e:
                self._close_port()
                last = CommunicationError(f"transport error: {e}", device=self.name, operation=op)
                log.warning("%s: %s attempt %d/%d: %s", self.name, op, attempt, attempts, last)
                continue
            except CommunicationError as e:  # reopening failed; counts as an attempt
                last = e
                continue
            text = raw.decode(enc, errors="replace")
            if not text.endswith(term):
                what = f"incomplete reply {text!r}" if text else "no reply"
                last = DeviceTimeout(f"{what} within {timeout:g} s", device=self.name, operation=op)
                log.warning("%s: %s attempt %d/%d: %s", self.name, op, attempt, attempts, last)
                continue
            text = text[: -len(term)]
            m = o.reply_re.fullmatch(text)
            if m is not None:
                return m
            em = o.error_re.fullmatch(text) if o.error_re is not None else None
            if em is not None:
                g = em.groupdict()
                msg = (g.get("message") or text).strip()
                self._gun_error = msg
                code = f" {g['code']}" if g.get("code") else ""
                raise CommunicationError(f"gun reported error{code}: {msg}", device=self.name, operation=op)
            last = CommunicationError(f"unexpected reply {text!r} (expected {o.reply})",
                                      device=self.name, operation=op)
            log.warning("%s: %s attempt %d/%d: %s", self.name, op, attempt, attempts, last)
        assert last is not None
        raise last

    def _open(self) -> None:
        try:
            self._port = serial_for_url(self.url, timeout=self.timeout_s or self.table.timeout_s)
        except (serial.SerialException, OSError, ValueError) as e:
            self._port = None
            raise CommunicationError(f"cannot open {self.url}: {e}", device=self.name, operation="connect") \
                from None

    def _close_port(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            try:
                port.close()
            except Exception as e:         # closing a dead port must not hide the real error
                log.debug("%s: closing port: %s", self.name, e)

    # ------------------------------------------------------------ parsing
    def _read_value(self, op: str) -> float:
        m = self._op(op)
        return self._num(op, "value", m.group("value")) * self.table.op(op).scale

    def _num(self, op: str, group: str, text: str) -> float:
        try:
            v = float(text)
        except (TypeError, ValueError):
            v = math.nan
        if not math.isfinite(v):
            err = CommunicationError(f"reply field {group}={text!r} is not a number", device=self.name,
                                     operation=op)
            self._safe_blank(err)
            raise err
        return v

    def _bool(self, op: str, group: str, text: str) -> bool:
        t = (text or "").strip().upper()
        if t in _TRUE:
            return True
        if t in _FALSE:
            return False
        err = CommunicationError(f"reply field {group}={text!r} is not a flag (1/0, ON/OFF, ...)",
                                 device=self.name, operation=op)
        self._safe_blank(err)
        raise err

    def _interlocks(self, text: Optional[str]) -> dict[str, bool]:
        """'vacuum:1,gas:0' (also '=' and ';' or spaces) -> {'vacuum': True, 'gas': False}."""
        out: dict[str, bool] = {}
        if not text:
            return out
        for item in text.replace(";", ",").replace(" ", ",").split(","):
            if not item:
                continue
            name, sep, flag = item.replace("=", ":").partition(":")
            if not sep:
                err = CommunicationError(f"interlock entry {item!r} is not name:flag", device=self.name,
                                         operation="status")
                self._safe_blank(err)
                raise err
            out[name.strip()] = self._bool("status", f"interlocks.{name}", flag)
        return out
