"""Stage: position read-back, move to a target, jog, stop. Moves run in the
stage lane; Stop goes to its own lane so it is never queued behind a move."""
from __future__ import annotations

import math

from PyQt5.QtWidgets import QGridLayout, QHBoxLayout, QLabel, QPushButton

from devices.interfaces import StagePosition
from gui.panel_base import DevicePanel
from gui.widgets import spin


class StagePanel(DevicePanel):
    role = "stage"
    title = "Stage"

    def __init__(self, session, parent=None):
        super().__init__(session, parent)
        self.targets = {
            "x": spin(-1000, 1000, 4, 0.0, "mm", 0.1), "y": spin(-1000, 1000, 4, 0.0, "mm", 0.1),
            "z": spin(-100, 100, 4, 0.0, "mm", 0.01), "r": spin(-720, 720, 3, 0.0, "°", 1.0),
            "t": spin(-90, 90, 3, 0.0, "°", 1.0)}
        self.readback = {}
        for axis, w in self.targets.items():
            unit = "mm" if axis in "xyz" else "°"
            self.readback[axis] = self.add_row(f"{axis.upper()} [{unit}]", w, None)
        row = QHBoxLayout()
        row.addWidget(self.button("Move", self.move_to_target, tip="move to the target position"))
        self.stop_button = QPushButton("STOP")
        self.stop_button.setStyleSheet("font-weight: bold; color: #b00020;")
        self.stop_button.clicked.connect(self.stop)
        row.addWidget(self.stop_button)
        row.addWidget(self.button("Target = here", self.copy_position, setpoint=False))
        row.addStretch(1)
        self.body.addLayout(row)
        jog = QGridLayout()
        self.jog_step = spin(0.1, 10000, 1, 100.0, "µm", 10, width=90)
        jog.addWidget(QLabel("Jog"), 0, 0)
        jog.addWidget(self.jog_step, 0, 1)
        for col, (text, dx, dy) in enumerate((("−X", -1, 0), ("+X", 1, 0), ("−Y", 0, -1), ("+Y", 0, 1)), start=2):
            b = self.button(text, lambda _=False, dx=dx, dy=dy: self.jog(dx, dy))
            b.setMaximumWidth(48)
            jog.addWidget(b, 0, col)
        jog.setColumnStretch(6, 1)
        self.body.addLayout(jog)
        self.moving = QLabel("")
        self.body.addWidget(self.moving)
        self.position: StagePosition | None = None
        self._loaded = False

    def target(self) -> StagePosition:
        t = self.targets
        return StagePosition(x=t["x"].value() * 1e-3, y=t["y"].value() * 1e-3, z=t["z"].value() * 1e-3,
                             r=math.radians(t["r"].value()), t=math.radians(t["t"].value()))

    def move_to_target(self):
        self.move_to(self.target())

    def move_to(self, target: StagePosition) -> bool:
        """Refused at once (with the reason) when outside the travel window."""
        label = f"stage move to ({target.x * 1e3:.4f}, {target.y * 1e3:.4f}) mm"
        stage = self.dev

        def started_ok(_pos):
            self.moving.setText("")
        ok = self.apply(label, lambda: stage.move_to(target), precheck=lambda: self.session.guard.check_stage(target),
                        on_done=started_ok)
        self.moving.setText(f"moving to ({target.x * 1e3:.4f}, {target.y * 1e3:.4f}) mm ..." if ok else "")
        return ok

    def jog(self, dx: int, dy: int):
        if self.position is None:
            return
        step = self.jog_step.value() * 1e-6
        self.move_to(self.position.with_(x=self.position.x + dx * step, y=self.position.y + dy * step))

    def stop(self):
        stage = self.dev
        if stage is None:
            return
        self.session.runner.submit("stage stop", stage.stop, lane="stage-stop",
                                   on_result=lambda _: self.notice.show_notice("stage stopped", "info"))

    def copy_position(self):
        if self.position is not None:
            self._load(self.position)

    def _load(self, p: StagePosition):
        for axis in "xyz":
            self.targets[axis].setValue(getattr(p, axis) * 1e3)
        for axis in "rt":
            self.targets[axis].setValue(math.degrees(getattr(p, axis)))

    def show_state(self, v: dict) -> None:
        p: StagePosition = v["position"]
        self.position = p
        for axis in "xyz":
            self.readback[axis].setText(f"{getattr(p, axis) * 1e3:.4f} mm")
        for axis in "rt":
            self.readback[axis].setText(f"{math.degrees(getattr(p, axis)):.3f}°")
        if not self.session.runner.pending("stage move"):
            self.moving.setText("")
        if not self._loaded:
            self._loaded = True
            self._load(p)

    def _on_setup(self, setup) -> None:
        self._loaded = False
        super()._on_setup(setup)

    def _on_run_active(self, active: bool) -> None:
        super()._on_run_active(active)
        if hasattr(self, "stop_button"):
            self.stop_button.setEnabled(True)             # stop is always possible
