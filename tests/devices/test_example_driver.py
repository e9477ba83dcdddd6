"""Worked example (docs/architecture.md): adding a device driver.

A driver implements its role's interface (devices/interfaces.py) over a real
transport, converts the vendor's units to SI and raises devices/errors.py
exceptions. The setup wraps it in the safety guard (devices/safety.py), so a
setpoint outside the setup's windows never reaches it. Here: a stage whose
controller speaks ``MOVE x_um y_um`` / ``POS?`` lines over TCP (pyserial's
socket:// transport), against a small controller emulator."""
from __future__ import annotations

import socket
import threading

import pytest
import serial

from devices.errors import CommunicationError, LimitViolation
from devices.interfaces import Stage, StagePosition
from devices.safety import GuardedStage, SafetyGuard


class LineStageEmulator:
    """The controller: answers POS? with 'x_um y_um', MOVE with OK; one client."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"socket://127.0.0.1:{self.server.getsockname()[1]}"
        self.pos_um, self.moves = [0.0, 0.0], 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        conn, _ = self.server.accept()
        with conn, conn.makefile("rwb", buffering=0) as f:
            for line in f:
                cmd = line.decode().split()
                if cmd[:1] == ["MOVE"]:
                    self.pos_um, self.moves = [float(cmd[1]), float(cmd[2])], self.moves + 1
                    f.write(b"OK\n")
                elif cmd == ["POS?"]:
                    f.write(f"{self.pos_um[0]:.3f} {self.pos_um[1]:.3f}\n".encode())
                else:
                    f.write(b"ERR\n")


class LineStage(Stage):
    """The new driver: µm on the wire, metres in the interface."""

    def __init__(self, url: str, timeout_s: float = 1.0):
        self.url, self.timeout_s, self.port = url, timeout_s, None

    def connect(self) -> None:
        self.port = serial.serial_for_url(self.url, timeout=self.timeout_s)

    def close(self) -> None:
        if self.port is not None:
            self.port.close()

    def identity(self) -> str:
        return f"line stage at {self.url}"

    def _ask(self, cmd: str) -> str:
        self.port.write((cmd + "\n").encode())
        answer = self.port.readline().decode().strip()
        if not answer or answer == "ERR":
            raise CommunicationError(f"{cmd!r}: controller answered {answer!r}", device="stage", operation=cmd)
        return answer

    def position(self) -> StagePosition:
        x_um, y_um = (float(v) for v in self._ask("POS?").split())
        return StagePosition(x=x_um * 1e-6, y=y_um * 1e-6)

    def move_to(self, target: StagePosition, *, verify: bool = True) -> StagePosition:
        self._ask(f"MOVE {target.x * 1e6:.3f} {target.y * 1e6:.3f}")
        return self.position()

    def stop(self) -> None:
        pass


def test_a_new_stage_driver_moves_in_si_units_and_the_guard_keeps_it_in_its_window(sim_config):
    emu = LineStageEmulator()
    stage = GuardedStage(LineStage(emu.url), SafetyGuard(sim_config.safety))
    stage.connect()
    try:
        got = stage.move_to(StagePosition(x=1.5e-3, y=-2e-3))
        assert (got.x, got.y) == pytest.approx((1.5e-3, -2e-3))
        assert emu.pos_um == [1500.0, -2000.0]
        far = sim_config.safety.stage.x_mm[1] * 1e-3 + 1e-3           # 1 mm beyond the x window
        with pytest.raises(LimitViolation):
            stage.move_to(StagePosition(x=far, y=0.0))
        assert emu.moves == 1                                        # the refused move never reached it
    finally:
        stage.close()
