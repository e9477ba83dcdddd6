"""Review of the detected sections: a table kept in step with the map's
selection; delete the selected or the low-confidence ones (undoable)."""
from __future__ import annotations

from PyQt5.QtCore import Qt
from PyQt5.QtWidgets import (QAbstractItemView, QDoubleSpinBox, QHBoxLayout, QHeaderView, QPushButton,
                             QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget)

from gui import wafer_commands as cmd

HEADERS = ("id", "x mm", "y mm", "w µm", "h µm", "angle °", "conf.", "grids", "tiles")


class SectionTable(QWidget):
    def __init__(self, layout, zoom_to=None, parent=None):
        super().__init__(parent)
        self.model = layout
        self.zoom_to = zoom_to
        v = QVBoxLayout(self)
        v.setContentsMargins(0, 0, 0, 0)
        self.table = QTableWidget(0, len(HEADERS))
        self.table.setHorizontalHeaderLabels(HEADERS)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
        self.table.setMinimumHeight(130)
        self.table.itemSelectionChanged.connect(self._selected)
        self.table.cellDoubleClicked.connect(lambda r, _c: self._zoom(r))
        v.addWidget(self.table)
        row = QHBoxLayout()
        self.delete_button = QPushButton("Delete selected")
        self.delete_button.clicked.connect(self.delete_selected)
        row.addWidget(self.delete_button)
        self.min_conf = QDoubleSpinBox()
        self.min_conf.setRange(0, 1)
        self.min_conf.setSingleStep(0.05)
        self.min_conf.setValue(0.5)
        self.min_conf.setPrefix("conf. < ")
        self.low_button = QPushButton("Delete low confidence")
        self.low_button.clicked.connect(self.delete_low_confidence)
        row.addWidget(self.min_conf)
        row.addWidget(self.low_button)
        row.addStretch(1)
        v.addLayout(row)
        self._ids: list[int] = []
        self._syncing = False
        layout.changed.connect(self._on_changed)

    def _on_changed(self, what: str) -> None:
        if what in ("sections", "grids", "order"):
            self.refresh()
        elif what == "selection":
            self._show_selection()

    def refresh(self) -> None:
        lay = self.model
        self._ids = [s.id for s in lay.ordered_sections()] + [i for i in lay.sections if i not in lay.order]
        self._syncing = True
        self.table.setUpdatesEnabled(False)
        self.table.setRowCount(len(self._ids))
        for r, sid in enumerate(self._ids):
            s = lay.sections[sid]
            grids = lay.grids_of(sid)
            vals = (sid, s.center_um[0] / 1e3, s.center_um[1] / 1e3, s.size_um[0], s.size_um[1], s.angle_deg,
                    s.confidence, len(grids), sum(g.n_tiles for g in grids))
            fmts = ("{}", "{:.3f}", "{:.3f}", "{:.0f}", "{:.0f}", "{:.1f}", "{:.2f}", "{}", "{}")
            for c, (v, f) in enumerate(zip(vals, fmts)):
                item = self.table.item(r, c)
                if item is None:
                    item = QTableWidgetItem()
                    item.setTextAlignment(Qt.AlignRight | Qt.AlignVCenter)
                    self.table.setItem(r, c, item)
                item.setText(f.format(v))
        self.table.setUpdatesEnabled(True)
        self._syncing = False
        self._show_selection()

    def _show_selection(self) -> None:
        sel = self.model.selection
        sid = sel[1] if sel and sel[0] == "section" else (sel[1][0] if sel and sel[0] == "grid" else None)
        self._syncing = True
        if sid in self._ids:
            self.table.selectRow(self._ids.index(sid))
        else:
            self.table.clearSelection()
        self._syncing = False

    def _selected(self) -> None:
        if self._syncing:
            return
        rows = self.table.selectionModel().selectedRows()
        if rows:
            self.model.select(("section", self._ids[rows[0].row()]))

    def _zoom(self, row: int) -> None:
        if self.zoom_to is not None and 0 <= row < len(self._ids):
            s = self.model.sections[self._ids[row]]
            self.zoom_to(*s.polygon_um.min(0), *s.polygon_um.max(0))

    def delete_selected(self) -> None:
        sel = self.model.selection
        if sel and sel[0] == "section":
            cmd.delete_section(self.model, sel[1])

    def delete_low_confidence(self) -> int:
        lay = self.model
        low = [sid for sid, s in lay.sections.items() if s.confidence < self.min_conf.value()]
        if low:
            cmd.push(lay, f"delete {len(low)} low-confidence sections", {sid: None for sid in low},
                     {k: None for k in lay.grids if k[0] in low})
        return len(low)
