"""What every device panel shares: its role, a notice line for refusals and
failures, read-back updates from the session, and setpoint rows that are
disabled while a run owns the microscope."""
from __future__ import annotations

from typing import Callable

from PyQt5.QtWidgets import (QGridLayout, QGroupBox, QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget)

from gui.widgets import Led, Notice

RUN_OWNS = "an acquisition is running and owns the microscope: pause or stop it first"


class DevicePanel(QWidget):
    role = ""
    title = ""

    def __init__(self, session, parent=None):
        super().__init__(parent)
        self.session = session
        self.setpoint_widgets: list[QWidget] = []
        outer = QVBoxLayout(self)
        outer.setContentsMargins(4, 4, 4, 4)
        self.box = QGroupBox(self.title)
        outer.addWidget(self.box)
        self.body = QVBoxLayout(self.box)
        head = QHBoxLayout()
        self.led = Led()
        self.status_label = QLabel("not connected")
        self.status_label.setWordWrap(True)
        head.addWidget(self.led)
        head.addWidget(self.status_label, 1)
        self.body.addLayout(head)
        self.grid = QGridLayout()
        self.grid.setHorizontalSpacing(6)
        self.grid.setVerticalSpacing(3)
        self.body.addLayout(self.grid)
        self.notice = Notice()
        outer.addWidget(self.notice)
        outer.addStretch(1)
        session.state.connect(self._on_state)
        session.refused.connect(self._on_refused)
        session.device_status.connect(self._on_status)
        session.setup_changed.connect(self._on_setup)
        session.run_active_changed.connect(self._on_run_active)
        self._on_setup(session.setup)

    # ------------------------------------------------------------ rows
    def add_row(self, name: str, editor: QWidget | None, on_set: Callable[[], None] | None,
                unit_hint: str = "") -> QLabel:
        """name | read-back | editor | Set. Enter in the editor sets too."""
        r = self.grid.rowCount()
        self.grid.addWidget(QLabel(name), r, 0)
        readback = QLabel("–")
        readback.setMinimumWidth(80)
        if unit_hint:
            readback.setToolTip(unit_hint)
        self.grid.addWidget(readback, r, 1)
        if editor is not None:
            self.grid.addWidget(editor, r, 2)
            self.setpoint_widgets.append(editor)
        if on_set is not None:
            b = QPushButton("Set")
            b.setMaximumWidth(48)
            b.setObjectName(f"set_{name.split(' ')[0].lower()}")
            b.clicked.connect(on_set)
            self.grid.addWidget(b, r, 3)
            self.setpoint_widgets.append(b)
            if editor is not None and hasattr(editor, "editingFinished"):
                le = editor.lineEdit() if hasattr(editor, "lineEdit") else None
                if le is not None:
                    le.returnPressed.connect(on_set)
        return readback

    def button(self, text: str, fn: Callable[[], None], setpoint: bool = True, tip: str = "") -> QPushButton:
        b = QPushButton(text)
        b.clicked.connect(fn)
        if tip:
            b.setToolTip(tip)
        if setpoint:
            self.setpoint_widgets.append(b)
        return b

    def apply(self, label: str, fn: Callable, *args, precheck=None, on_done=None) -> bool:
        self.notice.clear_notice()
        return self.session.apply(self.role, label, fn, *args, precheck=precheck, on_done=on_done)

    @property
    def dev(self):
        return self.session.device(self.role)

    # ------------------------------------------------------------ updates
    def _on_state(self, role: str, values: dict) -> None:
        if role == self.role:
            self.show_state(values)

    def _on_refused(self, role: str, text: str) -> None:
        if role == self.role:
            self.notice.show_notice(text, "warning")

    def _on_status(self, role: str, healthy: bool, detail: str) -> None:
        if role == self.role:
            self.led.set_state(healthy)
            self.status_label.setText(detail or ("ok" if healthy else "fault"))

    def _on_setup(self, setup) -> None:
        present = setup is not None and getattr(setup, self.role, None) is not None
        self.box.setEnabled(present)
        if not present:
            self.led.set_state(None)
            self.status_label.setText("not connected" if setup is None else "not in this setup")
        else:
            try:
                self.status_label.setText(getattr(setup, self.role).identity())
            except Exception as e:             # identity over a dead link: say so, do not crash
                self.status_label.setText(str(e))
        self._on_run_active(self.session.run_active)

    def _on_run_active(self, active: bool) -> None:
        for w in self.setpoint_widgets:
            w.setEnabled(not active)
            w.setToolTip(RUN_OWNS if active else "")

    def show_state(self, values: dict) -> None:
        raise NotImplementedError
