"""Incidents of the run: time, severity, cause and what happened (which says
what the operator can do). Newest first; errors stand out."""
from __future__ import annotations

import time

from PyQt5.QtCore import pyqtSignal
from PyQt5.QtGui import QColor
from PyQt5.QtWidgets import (QComboBox, QHBoxLayout, QHeaderView, QLabel, QPushButton, QTableWidget,
                             QTableWidgetItem, QVBoxLayout, QWidget)

COLORS = {"error": QColor("#fde2e1"), "warning": QColor("#fff3cd"), "info": QColor("#ffffff")}
RANK = {"info": 0, "warning": 1, "error": 2}


class IncidentList(QWidget):
    count_changed = pyqtSignal(int, int)          # all, errors

    def __init__(self, parent=None):
        super().__init__(parent)
        v = QVBoxLayout(self)
        v.setContentsMargins(0, 0, 0, 0)
        head = QHBoxLayout()
        self.title = QLabel("Incidents: none")
        self.title.setStyleSheet("font-weight: bold;")
        self.filter = QComboBox()
        self.filter.addItems(["all", "warnings and errors", "errors"])
        self.filter.currentIndexChanged.connect(self._apply_filter)
        clear = QPushButton("Clear")
        clear.clicked.connect(self.clear)
        head.addWidget(self.title, 1)
        head.addWidget(self.filter)
        head.addWidget(clear)
        v.addLayout(head)
        self.table = QTableWidget(0, 4)
        self.table.setHorizontalHeaderLabels(("time", "severity", "cause", "what happened"))
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QTableWidget.NoEditTriggers)
        self.table.setWordWrap(True)
        h = self.table.horizontalHeader()
        for c in range(3):
            h.setSectionResizeMode(c, QHeaderView.ResizeToContents)
        h.setSectionResizeMode(3, QHeaderView.Stretch)
        v.addWidget(self.table)
        self.incidents: list = []

    def add(self, inc) -> None:
        if (getattr(inc, "context", None) or {}).get("progress"):
            return                  # irradiation progress points: the dose panel plots them
        self.incidents.append(inc)
        self.table.insertRow(0)
        t = time.strftime("%H:%M:%S", time.localtime(getattr(inc, "time", time.time())))
        color = COLORS.get(inc.severity, COLORS["info"])
        for c, text in enumerate((t, inc.severity, inc.cause, inc.message)):
            item = QTableWidgetItem(text)
            item.setBackground(color)
            item.setToolTip(inc.message)
            if c == 1 and inc.severity == "error":
                item.setForeground(QColor("#8b0000"))
            self.table.setItem(0, c, item)
        self.table.setRowHidden(0, RANK.get(inc.severity, 0) < self.filter.currentIndex())
        if self.table.rowCount() > 2000:              # a long run must not grow the table without bound
            self.table.removeRow(self.table.rowCount() - 1)
        self._title()

    def _title(self) -> None:
        n = len(self.incidents)
        errors = sum(1 for i in self.incidents if i.severity == "error")
        warnings = sum(1 for i in self.incidents if i.severity == "warning")
        self.title.setText(f"Incidents: {n}" + (f"  ({errors} errors, {warnings} warnings)" if n else ""))
        self.count_changed.emit(n, errors)

    def _apply_filter(self, level: int) -> None:
        for r in range(self.table.rowCount()):
            sev = self.table.item(r, 1).text()
            self.table.setRowHidden(r, RANK.get(sev, 0) < level)

    def clear(self) -> None:
        self.incidents.clear()
        self.table.setRowCount(0)
        self._title()

    def causes(self) -> list[str]:
        return [i.cause for i in self.incidents]
