"""A simulated external electron source (flood gun with a shutter).

It holds its state (emission on, shutter open, emission current, energy)
and says which current it delivers to the specimen; the simulated dose
chain (devices.factory._link_simulation) adds that current to the SEM's
specimen current before the SR570 emulator turns it into the voltage the
34465A reads, so the irradiation step measures it exactly as it measures
the SEM probe on the real instruments.
"""
from __future__ import annotations

import threading
from typing import Mapping, Optional

from devices.errors import CommunicationError, LimitViolation, NotConnected
from devices.interfaces import ElectronSource, ElectronSourceStatus

DEFAULTS = {"emission_current_na": 1000.0, "specimen_fraction": 0.8, "energy_kv": 3.0, "max_emission_na": 100_000.0}


def sim_options(options: Optional[Mapping]) -> dict:
    """DEFAULTS updated by ``options``; ValueError naming a wrong entry (setup load and driver)."""
    opts = dict(DEFAULTS)
    for k, v in dict(options or {}).items():
        if k not in DEFAULTS:
            raise ValueError(f"devices.electron_source.options.{k}: unknown option; allowed {sorted(DEFAULTS)}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"devices.electron_source.options.{k} = {v!r}: a positive number")
        opts[k] = float(v)
    if opts["specimen_fraction"] > 1:
        raise ValueError(f"devices.electron_source.options.specimen_fraction = {opts['specimen_fraction']}: "
                         "allowed (0, 1]")
    return opts


class SimElectronSource(ElectronSource):
    emission_setpoint = True
    energy_setpoint = True

    def __init__(self, options: Optional[Mapping] = None, name: str = "electron_source"):
        opts = sim_options(options)
        self.name = name
        self.max_emission_a = opts["max_emission_na"] * 1e-9
        self.emission_a = opts["emission_current_na"] * 1e-9
        self.fraction = opts["specimen_fraction"]     # the rest is backscattered / misses the section
        self.energy_v = opts["energy_kv"] * 1e3
        self._open = False
        self._connected = False
        self._lock = threading.Lock()
        self.fail_next: Optional[str] = None           # tests: the next command fails with this text
        self.opened = 0                                # times the shutter was opened (tests)

    # ------------------------------------------------------------ life cycle
    def connect(self) -> None:
        self._connected = True

    def close(self) -> None:
        with self._lock:                       # a source left open would go on irradiating
            self._open = False
            self._connected = False

    def identity(self) -> str:
        return "simulated electron source"

    def _check(self, operation: str) -> None:
        if not self._connected:
            raise NotConnected("not connected", device=self.name, operation=operation)
        if self.fail_next is not None:
            why, self.fail_next = self.fail_next, None
            raise CommunicationError(why, device=self.name, operation=operation)

    # ------------------------------------------------------------ commands
    def set_beam(self, on: bool) -> None:
        with self._lock:
            if on:                             # closing is always possible, also after a failure
                self._check("set_beam")
                self.opened += 1
            self._open = bool(on)

    def source_status(self) -> ElectronSourceStatus:
        with self._lock:
            self._check("source_status")
            return ElectronSourceStatus(self._open, self.emission_a, self.energy_v)

    def set_emission_current(self, amperes: float) -> None:
        if not 0 < amperes <= self.max_emission_a:
            raise LimitViolation("emission_current", amperes, f"(0, {self.max_emission_a:g}] A", device=self.name)
        with self._lock:
            self._check("set_emission_current")
            self.emission_a = float(amperes)

    def set_energy(self, volts: float) -> None:
        if not 0 < volts <= 30e3:
            raise LimitViolation("energy", volts, "(0, 30000] V", device=self.name)
        with self._lock:
            self._check("set_energy")
            self.energy_v = float(volts)

    # ------------------------------------------------------------ physics
    def delivered_current_a(self) -> float:
        """Current the specimen absorbs now (what the preamp measures)."""
        with self._lock:
            return self.emission_a * self.fraction if self._open else 0.0


class ShutterEmulator:
    """A shutter controller on a local TCP port speaking the default line
    protocol of devices.electron_source_serial (OPEN, CLOSE, STATE?), reached
    through pyserial's "socket://127.0.0.1:PORT". Behind the shutter a source
    of ``emission_current_na``, ``specimen_fraction`` of which the specimen
    absorbs. ``stuck`` makes the shutter ignore OPEN/CLOSE (tests)."""

    def __init__(self, emission_current_na: float = 1000.0, specimen_fraction: float = 0.8):
        import socket
        self._socket = socket
        self.emission_a, self.fraction = emission_current_na * 1e-9, specimen_fraction
        self.is_open = False
        self.stuck = False
        self.lines: list[str] = []
        self._server = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.port = 0

    @property
    def url(self) -> str:
        return f"socket://127.0.0.1:{self.port}"

    def start(self) -> "ShutterEmulator":
        self._server = self._socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.05)          # lets the accept loop notice stop()
        self.port = self._server.getsockname()[1]
        self._spawn(self._accept)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2.0)
        if self._server is not None:
            self._server.close()
            self._server = None

    def _spawn(self, target, *args) -> None:
        t = threading.Thread(target=target, args=args, daemon=True, name="shutter-emulator")
        self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except self._socket.timeout:
                continue
            except OSError:
                return
            self._spawn(self._serve, conn)

    def _serve(self, conn) -> None:
        conn.settimeout(0.05)
        pending = b""
        with conn:
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(1024)
                except self._socket.timeout:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    reply = self._execute(line.decode("ascii", "replace").strip())
                    conn.sendall(reply.encode("ascii") + b"\r\n")

    def _execute(self, line: str) -> str:
        self.lines.append(line)
        cmd = line.upper()
        if cmd in ("OPEN", "CLOSE"):
            if not self.stuck:
                self.is_open = cmd == "OPEN"
            return "OK"
        if cmd == "STATE?":
            return "OPEN" if self.is_open else "CLOSED"
        return f"ERR unknown command {line!r}"

    def delivered_current_a(self) -> float:
        return self.emission_a * self.fraction if self.is_open else 0.0
