"""A listen-only SR570 on a local TCP port, reached by the real driver through
pyserial's "socket://127.0.0.1:PORT" URL.

Like the instrument it never sends a byte.  It parses the command lines it
receives (CR LF terminated), keeps the resulting state and turns an input
current into the output voltage the DMM would see, so the dose chain
AWG/ion gun -> SR570 -> 34465A can run without hardware.
"""
from __future__ import annotations

import logging
import socket
import threading
from typing import Optional

from devices.sr570 import SENSITIVITIES_A_PER_V

log = logging.getLogger(__name__)


class SR570Emulator:
    def __init__(self, sign: float = -1.0, sensitivity_a_per_v: float = 1e-6):
        # like the instrument, it always has *some* gain (its front-panel state);
        # only the driver, which cannot ask, starts out not knowing it
        if sensitivity_a_per_v not in SENSITIVITIES_A_PER_V:
            raise ValueError(f"not an SR570 sensitivity: {sensitivity_a_per_v!r}")
        self.sign = float(sign)             # -1: the real front end is inverting
        self._cond = threading.Condition()  # guards the state below; wakes wait_for()
        self._sensitivity = float(sensitivity_a_per_v)
        self._inverted = False              # INVT 1 flips the output polarity
        self._blanked = False               # BLNK 1 holds the output at zero
        self.lines: list[str] = []          # every command line, in order
        self.raw = bytearray()              # every byte, to check framing (CR LF)
        self.unknown: list[str] = []        # lines the emulator did not understand
        self._server: Optional[socket.socket] = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self.port = 0

    # ------------------------------------------------------------ server
    @property
    def url(self) -> str:
        return f"socket://127.0.0.1:{self.port}"

    def start(self) -> "SR570Emulator":
        server = socket.create_server(("127.0.0.1", 0))
        server.settimeout(0.05)             # lets the accept loop notice stop()
        self._server = server
        self.port = server.getsockname()[1]
        self._stop.clear()
        self._spawn(self._accept_loop, server)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2.0)
        self._threads.clear()
        if self._server is not None:
            self._server.close()
            self._server = None

    def __enter__(self) -> "SR570Emulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, target, *args) -> None:
        t = threading.Thread(target=target, args=args, daemon=True,
                             name=f"sr570-emulator-{target.__name__}")
        self._threads.append(t)
        t.start()

    def _accept_loop(self, server: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = server.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self._spawn(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.05)
        pending = bytearray()
        with conn:
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(4096)
                except socket.timeout:
                    continue
                except OSError:
                    return
                if not chunk:
                    return                  # the driver closed the port
                with self._cond:
                    self.raw.extend(chunk)
                pending.extend(chunk)
                # the SR570 ends a command at LF; the CR before it is tolerated
                while b"\n" in pending:
                    line, _, rest = pending.partition(b"\n")
                    pending = bytearray(rest)
                    self._execute(line.rstrip(b"\r").decode("ascii", "replace").strip())

    # ------------------------------------------------------------ commands
    def _execute(self, line: str) -> None:
        if not line:
            return
        head, _, arg = line.partition(" ")
        head = head.upper()
        with self._cond:
            self.lines.append(line)
            try:
                value = int(arg) if arg else None
                if head == "SENS" and value is not None and 0 <= value < len(SENSITIVITIES_A_PER_V):
                    self._sensitivity = SENSITIVITIES_A_PER_V[value]
                elif head == "INVT" and value in (0, 1):
                    self._inverted = bool(value)
                elif head == "BLNK" and value in (0, 1):
                    self._blanked = bool(value)
                elif head in ("ROLD", "*RST") and value is None:
                    if head == "*RST":
                        self._inverted = self._blanked = False
                else:
                    raise ValueError(line)
            except ValueError:
                # the instrument ignores what it cannot parse; we keep a record
                self.unknown.append(line)
                log.warning("SR570 emulator: ignored %r", line)
            self._cond.notify_all()

    def wait_for(self, count: int, timeout_s: float = 2.0) -> bool:
        """Wait until ``count`` command lines have arrived (TCP is asynchronous)."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self.lines) >= count, timeout=timeout_s)

    # ------------------------------------------------------------ physics
    @property
    def sensitivity(self) -> float:
        """A/V as last commanded (the constructor's value until a SENS command)."""
        with self._cond:
            return self._sensitivity

    def output_voltage(self, input_current_a: float) -> float:
        """Output for an input current: sign * I / sensitivity (linear, no clipping)."""
        with self._cond:
            sens, inverted, blanked = self._sensitivity, self._inverted, self._blanked
        if blanked:
            return 0.0
        return (-self.sign if inverted else self.sign) * input_current_a / sens
