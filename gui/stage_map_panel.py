"""The stage map with its toolbar (view, edit tools, undo/redo, layers),
legend and a status line (cursor, stage position, paint time)."""
from __future__ import annotations

import math

from PyQt5.QtCore import Qt
from PyQt5.QtWidgets import QHBoxLayout, QLabel, QMenu, QSizePolicy, QToolBar, QToolButton, QVBoxLayout, QWidget

from gui.stage_map import StageMap
from gui.stage_map_items import STATE_COLORS
from gui.wafer_model import STATE_NAMES


class StageMapPanel(QWidget):
    def __init__(self, session, layout, parent=None):
        super().__init__(parent)
        self.session = session
        self.map = StageMap(layout)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.setSpacing(2)
        tb = QToolBar()
        tb.setToolButtonStyle(Qt.ToolButtonTextOnly)
        tb.addAction("Fit wafer", self.map.fit_wafer).setToolTip("show the whole wafer (F)")
        tb.addAction("Zoom to tile", self.map.zoom_to_tile).setToolTip("zoom to a tile of the selected grid")
        tb.addAction("Go to stage", self.center_on_stage)
        tb.addSeparator()
        self.add_grid_action = tb.addAction("Add grid", lambda: self._mode("add_grid"))
        self.add_grid_action.setToolTip("then click inside a section")
        self.add_section_action = tb.addAction("Add section", lambda: self._mode("add_section"))
        self.delete_action = tb.addAction("Delete", self.map.delete_selected)
        self.delete_action.setToolTip("delete the selected grid or section (Del)")
        tb.addSeparator()
        # short labels: the toolbar must not grow with the undo text (it is the tooltip)
        self.undo_action = tb.addAction("Undo", layout.undo.undo)
        self.redo_action = tb.addAction("Redo", layout.undo.redo)
        layout.undo.canUndoChanged.connect(self.undo_action.setEnabled)
        layout.undo.canRedoChanged.connect(self.redo_action.setEnabled)
        # bound methods: a QUndoStack emits these while it is destroyed, maybe after this panel
        layout.undo.undoTextChanged.connect(self._undo_text)
        layout.undo.redoTextChanged.connect(self._redo_text)
        self.undo_action.setEnabled(False)
        self.redo_action.setEnabled(False)
        tb.addSeparator()
        layers = QToolButton()
        layers.setText("Layers")
        layers.setPopupMode(QToolButton.InstantPopup)
        menu = QMenu(layers)
        self.layer_actions = {}
        for name in ("overview", "sections", "grids", "tiles", "path", "labels"):
            a = menu.addAction(name)
            a.setCheckable(True)
            a.setChecked(True)
            a.toggled.connect(lambda on, n=name: self._layer(n, on))
            self.layer_actions[name] = a
        layers.setMenu(menu)
        tb.addWidget(layers)
        lay.addWidget(tb)
        lay.addWidget(self.map, 1)
        foot = QHBoxLayout()
        for state, name in enumerate(STATE_NAMES):
            c = STATE_COLORS[state]
            sw = QLabel("  ")
            sw.setStyleSheet(f"background: rgba({c.red()},{c.green()},{c.blue()},{max(c.alpha(), 120)});"
                             "border: 1px solid #888;")
            foot.addWidget(sw)
            foot.addWidget(QLabel(name))
        self.status = QLabel("")
        # the status text must never widen the map's minimum size (that would squeeze the docks)
        self.status.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
        self.status.setAlignment(Qt.AlignLeft | Qt.AlignVCenter)
        foot.addWidget(self.status, 1)
        lay.addLayout(foot)
        self._cursor = (0.0, 0.0)
        self.map.cursor_moved.connect(self._on_cursor)
        self.map.message.connect(session.message)
        session.setup_changed.connect(self._on_setup)
        session.state.connect(self._on_state)
        session.run_active_changed.connect(self._on_run_active)

    def _undo_text(self, text: str) -> None:
        self.undo_action.setToolTip(f"undo {text}")

    def _redo_text(self, text: str) -> None:
        self.redo_action.setToolTip(f"redo {text}")

    def _mode(self, mode: str) -> None:
        self.map.mode = mode
        self.session.message.emit("click inside a section to add a grid" if mode == "add_grid"
                                  else "click where the new section goes", "info")

    def _layer(self, name: str, on: bool) -> None:
        self.map.renderer.layers[name] = on
        self.map.update()

    def _on_run_active(self, active: bool) -> None:
        # a running plan uses the layout: edits would not reach it and would mislead
        self.map.layout_model.editable = not active
        for a in (self.add_grid_action, self.add_section_action, self.delete_action):
            a.setEnabled(not active)
        self.map.update()

    def _on_setup(self, setup) -> None:
        r = self.map.renderer
        if setup is None:
            r.stage_um = r.fov_um = None
            self.map.update()
            return
        cfg = setup.config
        sim = cfg.simulation
        r.wafer_radius_um = sim.wafer.diameter_mm * 500.0 if (sim is not None and setup.world is not None
                                                               and setup.world.wafer is not None) else None
        t = cfg.safety.stage
        r.travel_um = (t.x_mm[0] * 1e3, t.y_mm[0] * 1e3, t.x_mm[1] * 1e3, t.y_mm[1] * 1e3)
        mp = cfg.safety.mill_position
        r.mill_um = (mp.x_mm * 1e3, mp.y_mm * 1e3, mp.imaging_exclusion_mm * 1e3)
        if r.wafer_radius_um is None:
            x0, y0, x1, y1 = r.travel_um
            self.map.zoom_to_rect(x0, y0, x1, y1, animate=False)
        else:
            self.map.fit_wafer(animate=False)

    def _on_state(self, role: str, v: dict) -> None:
        r = self.map.renderer
        if role == "stage":
            p = v["position"]
            r.stage_um = (p.x * 1e6, p.y * 1e6)
        elif role == "sem":
            w, h = v["frame_size"]
            px = v["pixel_size_m"] * 1e6
            r.fov_um = (w * px, h * px, math.degrees(v["scan_rotation_rad"]))
        else:
            return
        self._update_status()
        self.map.update()

    def center_on_stage(self) -> None:
        r = self.map.renderer
        if r.stage_um is not None:
            fov = r.fov_um or (100.0, 100.0, 0.0)
            x, y = r.stage_um
            s = 4 * max(fov[0], fov[1])
            self.map.zoom_to_rect(x - s, y - s, x + s, y + s)

    def _on_cursor(self, x: float, y: float) -> None:
        self._cursor = (x, y)
        self._update_status()

    def _update_status(self) -> None:
        x, y = self._cursor
        st = self.map.renderer.stage_um
        stage = f"stage ({st[0] / 1e3:.4f}, {st[1] / 1e3:.4f}) mm   " if st else ""
        self.status.setText(f"{stage}cursor ({x / 1e3:.4f}, {y / 1e3:.4f}) mm   "
                            f"paint {self.map.last_paint_ms:.1f} ms")
