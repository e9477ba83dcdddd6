"""What the operator may allow when continuing a run from its folder: the
command line's ``--accept-change NAME`` (a plan or setup part that may change
mid-run, acq/fingerprint.py OVERRIDABLE) and ``--max-exposures N`` (the
exposure budget per tile and cycle, acq/dose_budget.py)."""
from __future__ import annotations

from PyQt5.QtWidgets import QCheckBox, QDialog, QDialogButtonBox, QFormLayout, QLabel, QSpinBox, QVBoxLayout

from acq.fingerprint import OVERRIDABLE

MAX_BUDGET = 100          # as a setup may allow (devices/setup_config.py max_exposures_per_tile)


class ResumeDialog(QDialog):
    def __init__(self, folder, budget: int, parent=None):
        super().__init__(parent)
        self.setWindowTitle("Resume run")
        self.setMinimumWidth(640)
        v = QVBoxLayout(self)
        note = QLabel(f"Continue the run in {folder}. The plan and setup must match the run's; tick a part "
                      "only to change it on purpose (it is journaled). Tiles, cycles, mill and irradiation "
                      "never change mid-run.")
        note.setWordWrap(True)
        v.addWidget(note)
        form = QFormLayout()
        self.allow = {}
        for name, what in OVERRIDABLE.items():
            box = QCheckBox(f"allow changed {name}")
            what_label = QLabel(what)
            what_label.setWordWrap(True)
            self.allow[name] = box
            form.addRow(box, what_label)
        self.budget = QSpinBox()
        self.budget.setRange(1, MAX_BUDGET)
        self.budget.setValue(max(1, min(MAX_BUDGET, int(budget))))
        self.budget.setToolTip("scans of one tile's area per cycle (retries, refocus); each is dose the "
                               "sample never gets back")
        form.addRow("Exposures per tile and cycle", self.budget)
        v.addLayout(form)
        buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
        buttons.button(QDialogButtonBox.Ok).setText("Resume")
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        v.addWidget(buttons)

    def choices(self) -> tuple[list[str], int]:
        """(parts allowed to change, exposure budget)."""
        return [n for n, b in self.allow.items() if b.isChecked()], int(self.budget.value())
