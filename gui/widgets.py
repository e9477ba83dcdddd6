"""Small widgets shared by the panels."""
from __future__ import annotations

import time

from PyQt5.QtCore import Qt, QTimer
from PyQt5.QtGui import QColor, QPainter
from PyQt5.QtWidgets import QDoubleSpinBox, QLabel, QSizePolicy, QWidget

LEVEL_STYLE = {
    "info": "color: #1b5e20; background: #e8f5e9;",
    "warning": "color: #7a4a00; background: #fff3cd;",
    "error": "color: #8b0000; background: #fde2e1;",
}


class Notice(QLabel):
    """A panel's own message line: why a setpoint was refused, what failed.
    Stays until replaced or cleared (a refusal must not vanish unread)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setWordWrap(True)
        self.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.setSizePolicy(QSizePolicy.Preferred, QSizePolicy.Minimum)
        self.level = ""
        self.clear_notice()

    def show_notice(self, text: str, level: str = "warning") -> None:
        self.level = level
        self.setText(f"{time.strftime('%H:%M:%S')}  {text}")
        self.setStyleSheet(LEVEL_STYLE.get(level, "") + " padding: 3px; border-radius: 3px;")
        self.setVisible(True)

    def clear_notice(self) -> None:
        self.level = ""
        self.setText("")
        self.setVisible(False)


class Led(QWidget):
    """Round state indicator: green ok, red fault, grey unknown, amber warning."""

    COLORS = {True: QColor("#2e7d32"), False: QColor("#c62828"), None: QColor("#9e9e9e"),
              "warn": QColor("#f9a825")}

    def __init__(self, state=None, parent=None, size: int = 12):
        super().__init__(parent)
        self._state = state
        self.setFixedSize(size, size)

    def set_state(self, state) -> None:
        if state != self._state:
            self._state = state
            self.update()

    @property
    def state(self):
        return self._state

    def paintEvent(self, _ev):
        p = QPainter(self)
        p.setRenderHint(QPainter.Antialiasing)
        p.setBrush(self.COLORS.get(self._state, self.COLORS[None]))
        p.setPen(Qt.NoPen)
        p.drawEllipse(1, 1, self.width() - 2, self.height() - 2)


def spin(lo: float, hi: float, decimals: int, value: float = 0.0, suffix: str = "", step: float = 0.0,
         width: int = 100) -> QDoubleSpinBox:
    """A spin box that does not clamp to the safety window: its range is the
    physical one, so an out-of-window value reaches the guard and is refused
    with a reason instead of being silently changed."""
    s = QDoubleSpinBox()
    s.setRange(lo, hi)
    s.setDecimals(decimals)
    s.setValue(value)
    s.setKeyboardTracking(False)
    if suffix:
        s.setSuffix(" " + suffix)
    s.setSingleStep(step or 10 ** -decimals * 10)
    s.setMinimumWidth(width)
    s.setAccelerated(True)
    return s


class Debouncer:
    """Coalesces bursts of calls into one call after ``ms`` (e.g. redraws on
    document streams)."""

    def __init__(self, fn, ms: int = 100):
        self._fn = fn
        self._timer = QTimer()
        self._timer.setSingleShot(True)
        self._timer.setInterval(ms)
        self._timer.timeout.connect(fn)

    def __call__(self):
        if not self._timer.isActive():
            self._timer.start()
