"""The main window: the stage map in the centre, panels in docks. Only
layout and wiring here; each panel owns its behaviour."""
from __future__ import annotations

from PyQt5.QtCore import Qt, QTimer
from PyQt5.QtWidgets import (QApplication, QDockWidget, QFileDialog, QLabel, QMainWindow, QMessageBox, QScrollArea,
                             QVBoxLayout, QWidget)

from devices.interfaces import StagePosition
from gui.acquisition_panel import AcquisitionPanel
from gui.autofocus_panel import AutofocusPanel
from gui.device_overview import DeviceOverview
from gui.live_view import LiveView
from gui.panel_dose import DosePanel, RasterPanel
from gui.panel_iongun import IonGunPanel
from gui.panel_sem import SemPanel
from gui.panel_stage import StagePanel
from gui.run_controller import RunController
from gui.stage_map_panel import StageMapPanel
from gui.wafer_model import WaferLayout
from gui.wafer_workflow import WaferWorkflow
from gui.widgets import LEVEL_STYLE


def _scroll(*widgets) -> QScrollArea:
    inner = QWidget()
    v = QVBoxLayout(inner)
    v.setContentsMargins(0, 0, 0, 0)
    for w in widgets:
        v.addWidget(w)
    v.addStretch(1)
    s = QScrollArea()
    s.setWidgetResizable(True)
    s.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)      # panels fit the dock's width
    s.setWidget(inner)
    return s


class MainWindow(QMainWindow):
    def __init__(self, session):
        super().__init__()
        self.session = session
        session.setParent(self)             # the session (and its worker pools) live as long as the window
        self.setWindowTitle("GCIB-SEM acquisition")
        self.layout_model = WaferLayout(self)
        self.controller = RunController(session, self.layout_model, self)
        # --- panels
        self.map_panel = StageMapPanel(session, self.layout_model)
        self.stage_map = self.map_panel.map
        self.setCentralWidget(self.map_panel)
        self.devices = DeviceOverview(session)
        self.sem_panel = SemPanel(session)
        self.stage_panel = StagePanel(session)
        self.ion_panel = IonGunPanel(session)
        self.raster_panel = RasterPanel(session)
        self.dose_panel = DosePanel(session)
        self.workflow = WaferWorkflow(session, self.layout_model, self.stage_map)
        self.acquisition = AcquisitionPanel(session, self.controller)
        self.live = LiveView()
        self.autofocus = AutofocusPanel(session, self.layout_model)
        # --- docks
        self.docks: dict[str, QDockWidget] = {}
        left = [self._dock("Wafer workflow", self.workflow, Qt.LeftDockWidgetArea),
                self._dock("Acquisition", self.acquisition, Qt.LeftDockWidgetArea)]
        right = [self._dock("Devices", _scroll(self.devices, self.stage_panel), Qt.RightDockWidgetArea),
                 self._dock("SEM", _scroll(self.sem_panel), Qt.RightDockWidgetArea),
                 self._dock("Ion gun", _scroll(self.ion_panel), Qt.RightDockWidgetArea),
                 self._dock("Raster && dose", _scroll(self.raster_panel, self.dose_panel), Qt.RightDockWidgetArea)]
        bottom = [self._dock("Live view", self.live, Qt.BottomDockWidgetArea),
                  self._dock("Autofocus", self.autofocus, Qt.BottomDockWidgetArea)]
        for group in (left, right, bottom):
            for d in group[1:]:
                self.tabifyDockWidget(group[0], d)
            group[0].raise_()
        self._dock_groups = (left[0], right[0], bottom[0])
        self._sized = False
        self._menus()
        # --- status bar
        self.status_text = QLabel("")
        self.busy_text = QLabel("")
        self.run_text = QLabel("")
        self.statusBar().addWidget(self.status_text, 1)
        self.statusBar().addPermanentWidget(self.busy_text)
        self.statusBar().addPermanentWidget(self.run_text)
        # --- wiring between panels
        session.message.connect(self.show_message)
        session.runner.busy_changed.connect(self._busy)
        self.sem_panel.frame_ready.connect(self.live.on_frame)
        self.dose_panel.follow(self.controller.bridge)
        self.controller.bridge.tile.connect(self.live.on_tile)
        self.controller.bridge.tile.connect(self.autofocus.on_tile)
        self.controller.state_changed.connect(self._run_state)
        self.layout_model.changed.connect(self._layout_changed)
        self.workflow.plan_ready.connect(self._plan_ready)
        self.stage_map.move_requested.connect(self.move_stage_to)

    def showEvent(self, ev) -> None:
        super().showEvent(ev)
        if not self._sized:                 # dock sizes only take once the window is laid out
            self._sized = True
            QTimer.singleShot(0, self.default_dock_sizes)

    def default_dock_sizes(self) -> None:
        left, right, bottom = self._dock_groups
        side = max(420, min(480, self.width() // 3 - 60))
        self.resizeDocks([left, right], [side, side], Qt.Horizontal)
        self.resizeDocks([bottom], [max(240, self.height() * 3 // 10)], Qt.Vertical)

    def _dock(self, title: str, widget: QWidget, area) -> QDockWidget:
        d = QDockWidget(title.replace("&&", "&"), self)
        d.setObjectName(title)
        d.setWidget(widget)
        d.setFeatures(QDockWidget.DockWidgetMovable | QDockWidget.DockWidgetFloatable)
        self.addDockWidget(area, d)
        self.docks[title.replace("&&", "&")] = d
        return d

    def _menus(self) -> None:
        m = self.menuBar().addMenu("&Setup")
        m.addAction("&Open setup file …", self.open_setup_file)
        m.addAction("&Reconnect", lambda: self._setup_action(self.session.open_setup))
        m.addAction("&Disconnect", lambda: self._setup_action(self.session.close_setup))
        m.addSeparator()
        m.addAction("&Quit", self.close)
        e = self.menuBar().addMenu("&Edit")
        undo = self.layout_model.undo.createUndoAction(self, "&Undo")
        undo.setShortcut("Ctrl+Z")
        redo = self.layout_model.undo.createRedoAction(self, "&Redo")
        redo.setShortcut("Ctrl+Shift+Z")
        e.addAction(undo)
        e.addAction(redo)
        v = self.menuBar().addMenu("&View")
        for title, d in self.docks.items():
            v.addAction(d.toggleViewAction())
        v.addSeparator()
        v.addAction("Fit wafer", self.stage_map.fit_wafer, "F")

    # ------------------------------------------------------------ actions
    def _setup_action(self, fn) -> bool:
        if self.controller.running:
            self.show_message("an acquisition is running: stop it before disconnecting the setup", "warning")
            return False
        fn()
        return True

    def open_setup_file(self) -> None:
        if self.controller.running:
            self.show_message("an acquisition is running: stop it before opening another setup", "warning")
            return
        path = QFileDialog.getOpenFileName(self, "Open setup", str(self.session.config_path.parent),
                                           "Setup (*.yaml *.yml)")[0]
        if path:
            from pathlib import Path
            self.session.config_path = Path(path)
            self.session.open_setup()

    def move_stage_to(self, x_um: float, y_um: float) -> bool:
        """Click-to-move (already confirmed on the map): x and y change, the rest stays."""
        pos = self.stage_panel.position or StagePosition()
        return self.stage_panel.move_to(pos.with_(x=x_um * 1e-6, y=y_um * 1e-6))

    def show_message(self, text: str, level: str = "info") -> None:
        self.status_text.setText(text)
        self.status_text.setStyleSheet(LEVEL_STYLE.get(level, "") if level != "info" else "")

    def _busy(self, names: list) -> None:
        shown = [n for n in names if not n.startswith("read ")]   # the 1-Hz read-backs are not news
        self.busy_text.setText(("working: " + ", ".join(shown[:3]) + (" …" if len(shown) > 3 else ""))
                               if shown else "")

    def _run_state(self, state: str, reason: str) -> None:
        self.run_text.setText(f"run: {state}")

    def _layout_changed(self, what: str) -> None:
        if what == "overview":
            self.live.show_overview(self.layout_model.overview)

    def _plan_ready(self, plan, data) -> None:
        self.controller.set_plan(plan, data)
        self.docks["Acquisition"].raise_()

    def closeEvent(self, ev) -> None:
        if self.controller.running:
            if QMessageBox.question(self, "Quit", "An acquisition is running. Stop it now (beams blanked; it "
                                    "can be resumed) and quit?") != QMessageBox.Yes:
                ev.ignore()
                return
            self.controller.stop_now("quit")
            engine = self.controller.engine
            while engine.alive:                   # never close the devices under a running step
                engine.wait(0.2)
                QApplication.processEvents()
        self.shutdown()
        ev.accept()

    def shutdown(self) -> None:
        self.session.runner.shutdown(5000)
        self.session.close_setup()
