"""TCP emulator of a serial ion gun, speaking whatever command table it is given.

The real driver talks to it through pyserial's ``socket://`` URL, so tests
and the simulated setup exercise the same code path as a real RS-232 gun.

Nothing of the protocol is hard-coded: commands are recognised by turning
each operation's format string into a regex, and replies are synthesised by
turning the operation's reply regex back into a template (literals plus
named groups, each group filled with a rendering of the value that the
group's own sub-pattern accepts; see devices/command_table.py). Tables using
regex features that cannot be inverted (alternation, classes outside named
groups, ...) are rejected at construction with the operation's name. What
the operations *do* (beam, blanker, interlocks, ranges) is the emulator's.

``on_state_change(IonGunEmulatorState)`` is called from the client thread,
before the reply is sent, whenever a command or a test hook changed the state.

Internal state is in the table's units; snapshots for callbacks are SI.
"""
from __future__ import annotations

import logging
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from common.paths import configs_dir
from devices.command_table import CommandTable, command_parser, load_command_table, render, reply_template

log = logging.getLogger(__name__)

DEFAULT_TABLE = configs_dir() / "iongun" / "ionoptika_sim.yaml"
_CHANGES = ("beam_on", "beam_off", "blank", "unblank", "set_energy", "set_cluster_size", "raster_on", "raster_off")
# error codes of the emulated gun
E_UNKNOWN, E_RANGE, E_INTERLOCK, E_SYNTAX = 1, 2, 3, 4


@dataclass
class IonGunEmulatorState:
    """A snapshot in SI, handed to ``on_state_change`` and returned by ``state()``."""
    time: float                    # time.monotonic() of the snapshot
    beam_on: bool
    blanked: bool
    raster_on: bool
    energy_v: float
    cluster_size: int
    emission_current_a: float
    target_current_a: float
    interlocks: dict[str, bool] = field(default_factory=dict)

    @property
    def milling(self) -> bool:
        """Ions reach the sample as a rastered (uniform) beam: dose accrues."""
        return self.beam_on and not self.blanked and self.raster_on and self.target_current_a > 0


class _GunError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class _Op:
    """One operation compiled for the emulator: command parser, reply templates."""

    def __init__(self, name: str, table: CommandTable):
        o = table.op(name)
        self.name = name
        self.terminator = table.terminator_for(name)
        self.command_re, self.kinds = command_parser(o.command)
        try:
            self.reply = reply_template(o.reply)
            self.error = reply_template(o.error_reply) if o.error_reply else None
        except ValueError as e:
            raise ValueError(f"{table.name}: operations.{name}: emulator cannot synthesise replies: {e}") from None
        self.reply_re, self.error_re = o.reply_re, o.error_re

    def parse(self, line: str) -> Optional[dict]:
        m = self.command_re.fullmatch(line)
        return None if m is None else m.groupdict()

    def build(self, values: dict, error: bool = False) -> str:
        template, groups = self.error if error else self.reply
        filled = {}
        for g, sub in groups.items():
            if g in values:
                filled[g] = render(g, values[g], sub)
            else:   # a group the emulator has no meaning for: any text the pattern accepts
                filled[g] = next((c for c in ("SIM", "0", "1", "1.0", "x", "") if re.fullmatch(sub, c)), "")
        text = template.format(**filled)
        rx = self.error_re if error else self.reply_re
        if not rx.fullmatch(text):
            raise ValueError(f"operations.{self.name}: synthesised {text!r} does not match {rx.pattern!r}")
        return text


class IonGunEmulator:
    """Emulated gun on 127.0.0.1:<ephemeral>; ``url`` is the pyserial URL."""

    def __init__(self, command_table: Path | str | CommandTable = DEFAULT_TABLE, *, faults=None,
                 target_current_a: float = 5e-9, emission_current_a: float = 200e-6,
                 energy_v: float = 2500.0, cluster_size: int = 1000,
                 energy_limits_v: Optional[tuple[float, float]] = None,
                 cluster_limits: Optional[tuple[int, int]] = None,
                 interlocks: Optional[dict[str, bool]] = None,
                 on_state_change: Optional[Callable[[IonGunEmulatorState], None]] = None,
                 identity: Optional[dict[str, str]] = None):
        self.table = command_table if isinstance(command_table, CommandTable) \
            else load_command_table(command_table)
        self.ops = {name: _Op(name, self.table) for name in self.table.operations}
        # parameterless commands first so "EN?" is never taken for "EN {value}"
        self._order = sorted(self.ops.values(), key=lambda op: bool(op.kinds))
        self.faults = faults
        self.on_state_change = on_state_change
        self._e_scale = self.table.op("get_energy").scale
        self._i_scale = self.table.op("get_current").scale
        se, sc = self.table.op("set_energy"), self.table.op("set_cluster_size")
        # hardware ranges in table units: explicit ones (SI) else the table's
        self.energy_limits = tuple(v / se.scale for v in energy_limits_v) if energy_limits_v \
            else (se.limits or (0.0, float("inf")))
        self.cluster_limits = tuple(v / sc.scale for v in cluster_limits) if cluster_limits \
            else (sc.limits or (1, float("inf")))
        self.identity = {"model": "GCIB-10S-SIM", "serial": "SIM0001", "firmware": "1.0", **(identity or {})}
        self._lock = threading.RLock()
        self.beam_on, self.blanked, self.raster_on = False, True, False
        self.energy = energy_v / self._e_scale              # table units
        self.cluster_size = int(round(cluster_size / sc.scale))
        self._target = target_current_a / self._i_scale      # table units, when milling
        self._emission = emission_current_a / self._i_scale
        self.interlocks = dict(interlocks if interlocks is not None else {"vacuum": True, "gas": True, "door": True})
        self._error: tuple[int, str] = (0, "")
        self.received: list[tuple[Optional[str], str]] = []   # (operation or None, raw line)
        self._srv: Optional[socket.socket] = None
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        for op in self.ops.values():            # a table the emulator cannot speak fails now, not mid-test
            op.build(self._values(op.name))
            if op.error:
                op.build({"code": E_UNKNOWN, "message": "self test"}, error=True)

    # ------------------------------------------------------------ server
    def start(self) -> "IonGunEmulator":
        if self._srv is not None:
            return self
        self._stop.clear()
        self._srv = socket.create_server(("127.0.0.1", 0))
        self._srv.settimeout(0.05)
        t = threading.Thread(target=self._accept_loop, name="iongun-emulator", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        srv, self._srv = self._srv, None
        if srv is not None:
            srv.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            _close(c)
        for t in list(self._threads):
            t.join(timeout=1.0)
        self._threads = []

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def port(self) -> int:
        if self._srv is None:
            raise RuntimeError("emulator not started")
        return self._srv.getsockname()[1]

    @property
    def url(self) -> str:
        return f"socket://127.0.0.1:{self.port}"

    def _accept_loop(self) -> None:
        srv = self._srv
        while not self._stop.is_set() and srv is not None:
            try:
                conn, _ = srv.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            conn.settimeout(0.05)
            with self._lock:
                self._conns.append(conn)
            t = threading.Thread(target=self._client_loop, args=(conn,), name="iongun-emulator-client", daemon=True)
            t.start()
            self._threads.append(t)

    def _client_loop(self, conn: socket.socket) -> None:
        enc = self.table.encoding
        terms = [t.encode(enc) for t in self.table.terminators()]
        buf = b""
        try:
            while not self._stop.is_set():
                try:
                    data = conn.recv(4096)
                except socket.timeout:
                    continue
                except OSError:
                    return
                if not data:
                    return
                buf += data
                while True:
                    hits = [(buf.find(t), -len(t), t) for t in terms if buf.find(t) >= 0]
                    if not hits:
                        break
                    pos, _, term = min(hits)
                    line, buf = buf[:pos], buf[pos + len(term):]
                    action, payload = self._process(line.decode(enc, errors="replace"))
                    if action == "disconnect":
                        return
                    if payload is not None:
                        conn.sendall(payload.encode(enc, errors="replace"))
        finally:
            with self._lock:
                if conn in self._conns:
                    self._conns.remove(conn)
            _close(conn)

    # ------------------------------------------------------------ protocol
    def _process(self, line: str) -> tuple[str, Optional[str]]:
        """-> ("reply", text with terminator) | ("silent", None) | ("disconnect", None)."""
        for op in self._order:
            raw = op.parse(line)
            if raw is not None:
                break
        else:
            self.received.append((None, line))
            with self._lock:
                self._error = (E_UNKNOWN, f"unknown command {line!r}")
            err_op = next((o for o in self.ops.values() if o.error), None)
            text = err_op.build({"code": E_UNKNOWN, "message": self._error[1]}, error=True) if err_op else "?"
            return "reply", text + self.table.terminator
        self.received.append((op.name, line))
        kind = self.faults.draw("ion_gun", op.name) if self.faults is not None else None
        if kind == "timeout":
            return "silent", None           # lost: not executed, no answer
        if kind == "disconnect":
            return "disconnect", None
        if kind is not None:                # communication (and anything else): line noise
            return "reply", "\x15#?%garbled" + op.terminator
        before = self._fingerprint()
        try:
            values = {k: self._convert(op, k, v) for k, v in raw.items()}
            with self._lock:
                self._execute(op.name, values.get("value"))
                reply = op.build(self._values(op.name))
                if op.name == "last_error":     # reading the error clears it, as most instruments do
                    self._error = (0, "")
        except _GunError as e:
            with self._lock:
                self._error = (e.code, e.message)
            if op.error is None:
                return "reply", "?" + op.terminator
            return "reply", op.build({"code": e.code, "message": e.message}, error=True) + op.terminator
        if op.name in _CHANGES and self._fingerprint() != before:
            self._notify()
        return "reply", reply + op.terminator

    @staticmethod
    def _convert(op: _Op, name: str, text: str):
        try:
            return op.kinds[name](text)
        except ValueError:
            raise _GunError(E_SYNTAX, f"bad {name} {text!r}") from None

    def _execute(self, op: str, value) -> None:
        """Apply ``op`` to the state (caller holds the lock); _GunError if refused."""
        if op == "beam_on":
            self._need_interlocks("beam on")
            self.beam_on = True
        elif op == "beam_off":
            self.beam_on = False
        elif op == "blank":
            self.blanked = True
        elif op == "unblank":
            self._need_interlocks("unblank")
            self.blanked = False
        elif op == "set_energy":
            lo, hi = self.energy_limits
            if not lo <= value <= hi:
                raise _GunError(E_RANGE, f"energy {value:g} outside {lo:g}..{hi:g}")
            self.energy = float(value)
        elif op == "set_cluster_size":
            lo, hi = self.cluster_limits
            if value != int(value) or not lo <= value <= hi:
                raise _GunError(E_RANGE, f"cluster size {value:g} outside {lo:g}..{hi:g}")
            self.cluster_size = int(value)
        elif op in ("raster_on", "raster_off"):
            self.raster_on = op == "raster_on"

    def _values(self, op: str) -> dict:
        """Everything a reply group of ``op`` may draw from, by group name."""
        v = {"set_energy": self.energy, "get_energy": self.energy, "set_cluster_size": self.cluster_size,
             "get_current": self._target_now()}.get(op)
        return {**self.identity, "value": v, "beam": self.beam_on, "blank": self.blanked,
                "interlocks_ok": all(self.interlocks.values()), "interlocks": dict(self.interlocks),
                "energy": self.energy, "cluster_size": self.cluster_size,
                "emission": self._emission if self.beam_on else 0.0, "target": self._target_now(),
                "raster": self.raster_on, "code": self._error[0], "message": self._error[1]}

    def _need_interlocks(self, what: str) -> None:
        open_ = [k for k, ok in self.interlocks.items() if not ok]
        if open_:
            raise _GunError(E_INTERLOCK, f"{what} refused, interlock open: {','.join(open_)}")

    def _target_now(self) -> float:
        return self._target if self.beam_on and not self.blanked else 0.0

    # ------------------------------------------------------------ test / world hooks
    def state(self) -> IonGunEmulatorState:
        with self._lock:
            return IonGunEmulatorState(
                time=time.monotonic(), beam_on=self.beam_on, blanked=self.blanked, raster_on=self.raster_on,
                energy_v=self.energy * self._e_scale, cluster_size=self.cluster_size,
                emission_current_a=(self._emission if self.beam_on else 0.0) * self._i_scale,
                target_current_a=self._target_now() * self._i_scale, interlocks=dict(self.interlocks))

    def set_interlock(self, name: str, ok: bool) -> None:
        """Open (ok=False) or close an interlock. Opening one trips the beam
        (off and blanked), as the hardware interlock chain would."""
        with self._lock:
            before = self._fingerprint()
            self.interlocks[name] = bool(ok)
            if not ok:
                self.beam_on, self.blanked = False, True
                self._error = (E_INTERLOCK, f"interlock {name} opened, beam tripped")
        if self._fingerprint() != before:
            self._notify()

    def set_target_current(self, amperes: float) -> None:
        with self._lock:
            before = self._fingerprint()
            self._target = amperes / self._i_scale
        if self._fingerprint() != before:
            self._notify()

    def received_ops(self) -> list[Optional[str]]:
        return [op for op, _line in self.received]

    def clear_log(self) -> None:
        self.received.clear()

    def _fingerprint(self) -> tuple:
        with self._lock:
            return (self.beam_on, self.blanked, self.raster_on, self.energy, self.cluster_size, self._target,
                    tuple(sorted(self.interlocks.items())))

    def _notify(self) -> None:
        if self.on_state_change is None:
            return
        try:                                # outside the lock: the callback may call state()
            self.on_state_change(self.state())
        except Exception:                   # a broken world must not take the gun's protocol down
            log.exception("ion gun emulator: on_state_change callback failed")


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
