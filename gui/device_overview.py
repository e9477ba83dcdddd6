"""Every device of the setup at a glance: role, driver, identity, health, and
connect/disconnect per device."""
from __future__ import annotations

from PyQt5.QtCore import Qt
from PyQt5.QtWidgets import (QHBoxLayout, QHeaderView, QLabel, QPushButton, QTableWidget, QTableWidgetItem,
                             QVBoxLayout, QWidget)

from gui.session import ROLE_LABELS
from gui.widgets import Led

COLUMNS = ("", "Device", "Driver", "State", "")


class DeviceOverview(QWidget):
    def __init__(self, session, parent=None):
        super().__init__(parent)
        self.session = session
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        self.title = QLabel("No setup open")
        self.title.setStyleSheet("font-weight: bold;")
        lay.addWidget(self.title)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QTableWidget.NoEditTriggers)
        self.table.setSelectionMode(QTableWidget.NoSelection)
        h = self.table.horizontalHeader()
        h.setSectionResizeMode(QHeaderView.ResizeToContents)
        h.setSectionResizeMode(3, QHeaderView.Stretch)
        self.table.setMinimumHeight(215)
        lay.addWidget(self.table)
        self.rows: dict[str, int] = {}
        self.leds: dict[str, Led] = {}
        self.buttons: dict[str, QPushButton] = {}
        self.identities: dict[str, str] = {}
        session.setup_changed.connect(self._on_setup)
        session.device_status.connect(self._on_status)

    def _on_setup(self, setup) -> None:
        self.table.setRowCount(0)
        self.rows.clear()
        self.leds.clear()
        self.buttons.clear()
        if setup is None:
            self.title.setText("No setup open")
            return
        cfg = setup.config
        self.title.setText(f"{cfg.name}  —  {cfg.source}")
        for role, dev in setup.devices().items():
            r = self.table.rowCount()
            self.table.insertRow(r)
            self.rows[role] = r
            led = Led(None)
            holder = QWidget()
            hl = QHBoxLayout(holder)
            hl.setContentsMargins(6, 0, 6, 0)
            hl.addWidget(led)
            self.table.setCellWidget(r, 0, holder)
            self.leds[role] = led
            driver = getattr(cfg.devices, role).driver
            try:
                ident = dev.identity()
            except Exception as e:
                ident = f"({e})"
            self.identities[role] = ident
            for c, text in ((1, ROLE_LABELS.get(role, role)), (2, driver), (3, "…")):
                item = QTableWidgetItem(text)
                item.setFlags(Qt.ItemIsEnabled)
                item.setToolTip(ident)
                self.table.setItem(r, c, item)
            b = QPushButton("Disconnect")
            b.setToolTip("connect / disconnect this device")
            b.setObjectName(f"connect_{role}")
            b.clicked.connect(lambda _=False, role=role: self._toggle(role))
            self.table.setCellWidget(r, 4, b)
            self.buttons[role] = b

    def _toggle(self, role: str) -> None:
        connect = role in self.session.disconnected_roles
        self.session.connect_device(role, connect)

    def _on_status(self, role: str, healthy: bool, detail: str) -> None:
        r = self.rows.get(role)
        if r is None:
            return
        off = role in self.session.disconnected_roles
        self.leds[role].set_state(None if off else healthy)
        if healthy and detail == self.identities.get(role):
            detail = "ok"                            # some drivers report their identity as the detail
        self.table.item(r, 3).setText(detail or ("ok" if healthy else "fault"))
        self.table.item(r, 3).setToolTip(detail)
        self.buttons[role].setText("Connect" if off else "Disconnect")

    def state_of(self, role: str) -> str:
        r = self.rows.get(role)
        return "" if r is None else self.table.item(r, 3).text()
