"""The wafer workflow in one panel, top to bottom: overview → sections
(detect, or load) → review and edit → grids → imaging order → plan and start.
Each long step runs in a worker with progress and Cancel; each edit is one
undo step on the shared layout."""
from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

from PyQt5.QtCore import Qt, pyqtSignal
from PyQt5.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel,
                             QProgressBar, QPushButton, QScrollArea, QSizePolicy, QSpinBox, QVBoxLayout, QWidget)

from gui import wafer_commands as cmd
from gui import wafer_tasks as tasks
from gui.section_table import SectionTable
from gui.session import describe_error
from gui.wafer_model import GridSpec
from gui.widgets import Notice, spin


def _box(title: str) -> tuple[QGroupBox, QVBoxLayout]:
    b = QGroupBox(title)
    return b, QVBoxLayout(b)


def _row(*items, stretch: bool = True) -> QHBoxLayout:
    """A horizontal row of widgets (a str becomes a QLabel), left-aligned unless not ``stretch``."""
    row = QHBoxLayout()
    for it in items:
        row.addWidget(QLabel(it) if isinstance(it, str) else it)
    if stretch:
        row.addStretch(1)
    return row


class WaferWorkflow(QScrollArea):
    plan_ready = pyqtSignal(object, dict)          # validated Plan, its data

    def __init__(self, session, layout, stage_map, parent=None):
        super().__init__(parent)
        self.session, self.model, self.map = session, layout, stage_map
        self.setWidgetResizable(True)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        inner = QWidget()
        self.setWidget(inner)
        v = QVBoxLayout(inner)
        # --- the job in progress
        job = QHBoxLayout()
        self.job_label = QLabel("idle")
        self.job_label.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
        self.job_bar = QProgressBar()
        self.job_bar.setRange(0, 1)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        job.addWidget(self.job_label, 1)
        job.addWidget(self.job_bar, 2)
        job.addWidget(self.cancel_button)
        v.addLayout(job)
        self.notice = Notice()
        v.addWidget(self.notice)
        # --- 1 overview
        b, bl = _box("1  Overview")
        f = QFormLayout()
        self.ov_pixel = spin(0.1, 100, 2, 4.0, "µm", 0.5)
        self.ov_region = QComboBox()
        self.ov_region.addItems(["whole wafer", "map view"])
        self.ov_region.setToolTip("'map view': only what the stage map shows now")
        f.addRow("Pixel size", self.ov_pixel)
        f.addRow("Region", self.ov_region)
        bl.addLayout(f)
        self.ov_button = QPushButton("Acquire overview")
        self.ov_button.clicked.connect(self.acquire_overview)
        self.ov_status = QLabel("no overview")
        self.ov_load_button = QPushButton("Load mosaic …")
        self.ov_load_button.setToolTip("an overview written by `wafer mosaic` (OME-TIFF with its stage transform)")
        self.ov_load_button.clicked.connect(self.load_overview)
        bl.addLayout(_row(self.ov_button, self.ov_load_button))
        bl.addWidget(self.ov_status)
        v.addWidget(b)
        # --- 2 sections
        b, bl = _box("2  Sections")
        self.detect_button = QPushButton("Detect sections")
        self.detect_button.clicked.connect(self.detect)
        self.threshold = spin(0.05, 0.95, 2, 0.5, "", 0.05, width=70)
        self.truth_button = QPushButton("From simulator")
        self.truth_button.setToolTip("the simulated wafer's true sections (simulator only)")
        self.truth_button.clicked.connect(self.sections_from_truth)
        bl.addLayout(_row(self.detect_button, "threshold", self.threshold))
        self.section_model_path = None                  # None: the shipped weights
        self.det_model_button = QPushButton("Model …")
        self.det_model_button.setToolTip("section detection weights, e.g. fine-tuned on this lab's overviews by "
                                         "`wafer train` (cancel: back to the shipped model)")
        self.det_model_button.clicked.connect(lambda: self.choose_section_model())
        self.det_model_label = QLabel("model: shipped")
        bl.addLayout(_row(self.det_model_button, self.det_model_label))
        files = []
        for text, fn in (("Load JSON …", self.load_sections), ("Save JSON …", self.save_sections)):
            bt = QPushButton(text)
            bt.clicked.connect(fn)
            files.append(bt)
        bl.addLayout(_row(self.truth_button, *files))
        self.magc_button = QPushButton("Load MagC …")
        self.magc_button.setToolTip("sections and ROIs (as grids of the tiles in 4) from a MagFinder/SBEMimage .magc "
                                    "file; a stage landmark file (CSV id,x_um,y_um) maps them to the stage")
        self.magc_button.clicked.connect(lambda: self.load_magc())
        bl.addLayout(_row(self.magc_button))
        self.sec_status = QLabel("no sections")
        bl.addWidget(self.sec_status)
        self.magc_status = QLabel("")                  # the landmark registration's residuals
        self.magc_status.setWordWrap(True)
        self.magc_status.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.magc_status.hide()
        bl.addWidget(self.magc_status)
        v.addWidget(b)
        # --- 3 review
        b, bl = _box("3  Review and edit")
        self.table = SectionTable(layout, zoom_to=lambda *r: self.map.zoom_to_rect(*r))
        bl.addWidget(self.table)
        hint = QLabel("On the map: drag to move, square handle resizes, round handle rotates; "
                      "right-click adds or deletes; Ctrl+Z undoes.")
        hint.setWordWrap(True)
        hint.setStyleSheet("color: #555;")
        bl.addWidget(hint)
        v.addWidget(b)
        # --- 4 grids
        b, bl = _box("4  Grids")
        f = QFormLayout()
        self.tile_pixel = spin(0.1, 1000, 2, 10.0, "nm", 1)
        self.frame_w, self.frame_h, self.overlap = QSpinBox(), QSpinBox(), QSpinBox()
        for s, lo, hi, val in ((self.frame_w, 16, 32768, 1024), (self.frame_h, 16, 32768, 768),
                               (self.overlap, 0, 4000, 77)):
            s.setRange(lo, hi)
            s.setValue(val)
        self.dwell = spin(10, 100000, 0, 200, "ns", 50)
        self.margin = spin(0, 1000, 1, 0.0, "µm", 5)
        f.addRow("Tile pixel size", self.tile_pixel)
        f.addRow("Frame", _row(self.frame_w, "×", self.frame_h, stretch=False))
        f.addRow("Overlap", self.overlap)
        f.addRow("Dwell", self.dwell)
        f.addRow("Margin around section", self.margin)
        bl.addLayout(f)
        self.grid_button = QPushButton("Create grids")
        self.grid_button.clicked.connect(self.create_grids)
        ok, why = tasks.grids_available()
        self.grid_button.setToolTip("" if ok else why)
        bl.addWidget(self.grid_button)
        self.grid_status = QLabel("no grids")
        bl.addWidget(self.grid_status)
        v.addWidget(b)
        # --- 5 order
        b, bl = _box("5  Imaging order")
        self.solver = QComboBox()
        self.solver.addItems(["fast", "nn", "sa"])
        self.order_button = QPushButton("Optimise order")
        self.order_button.clicked.connect(self.optimise_order)
        bl.addLayout(_row("solver", self.solver, self.order_button))
        self.order_status = QLabel("")
        bl.addWidget(self.order_status)
        v.addWidget(b)
        # --- 6 plan
        b, bl = _box("6  Plan and start")
        f = QFormLayout()
        self.cycles = QSpinBox()
        self.cycles.setRange(1, 100000)
        self.af_method = QComboBox()
        self.mill = QCheckBox("mill between cycles")
        self.mill.setToolTip("GCIB mill after each cycle, with the stage at the mill position")
        self.writers = QComboBox()
        self.writers.addItems(["ome_tiff", "ome_tiff, mipmaps", "ome_tiff, mipmaps, render_tilespecs, trakem2, ome_zarr"])
        self.writers.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.writers.setMinimumContentsLength(16)       # long writer lists must not widen the dock
        f.addRow("Cycles", self.cycles)
        f.addRow("Autofocus", self.af_method)
        f.addRow("Writers", self.writers)
        f.addRow("", self.mill)
        bl.addLayout(f)
        self.plan_button = QPushButton("Build plan → Acquisition")
        self.plan_button.setStyleSheet("font-weight: bold;")
        self.plan_button.clicked.connect(self.build_plan)
        bl.addWidget(self.plan_button)
        v.addWidget(b)
        v.addStretch(1)
        self._task = None
        self._fill_af_methods()
        layout.changed.connect(self._on_model)
        session.setup_changed.connect(self._on_setup)
        self._on_setup(session.setup)

    # ------------------------------------------------------------ helpers
    def _fill_af_methods(self) -> None:
        from acq.autofocus_step import AUTOFOCUS_METHODS
        names = sorted(AUTOFOCUS_METHODS)        # as registered at start-up (gui.app.build_window)
        self.af_method.clear()
        self.af_method.addItems(names)
        self.af_method.setCurrentText("none")

    def _on_setup(self, setup) -> None:
        on = setup is not None
        for w in (self.ov_button, self.order_button):
            w.setEnabled(on)
        sim = on and setup.world is not None and setup.world.wafer is not None
        self.truth_button.setEnabled(sim)
        self._update_detector()

    def _update_detector(self) -> None:
        ok, why = tasks.detector_available(self.section_model_path)
        self.detect_button.setEnabled(ok)
        self.detect_button.setToolTip(why or "U-Net section detection on the overview (wafer/detect.py)")

    def _on_model(self, what: str) -> None:
        lay = self.model
        if what in ("sections", "order"):
            self.sec_status.setText(f"{len(lay.sections)} sections")
        if what in ("grids", "sections"):
            self.grid_status.setText(f"{len(lay.grids)} grids, {lay.n_tiles()} tiles")
        if what == "overview" and lay.overview is not None:
            ov = lay.overview
            h, w = ov.image.shape
            self.ov_status.setText(f"{w} × {h} px at {ov.pixel_um:g} µm")

    def _run(self, label: str, fn, *args, on_result, lane=None) -> None:
        if self._task is not None:
            self.notice.show_notice("another workflow step is still running", "warning")
            return
        self.notice.clear_notice()
        self.job_label.setText(label + " …")
        self.job_bar.setRange(0, 0)
        self.cancel_button.setEnabled(True)

        def progress(done, total, text):
            self.job_bar.setRange(0, max(total, 1))
            self.job_bar.setValue(done)
            self.job_label.setText(text)

        def finished():
            self._task = None
            self.cancel_button.setEnabled(False)
            if self.job_bar.maximum() == 0:
                self.job_bar.setRange(0, 1)

        def failed(e):
            self.job_label.setText(f"{label}: failed")
            self.notice.show_notice(f"{label}: {describe_error(e)}", "error")

        def cancelled():
            self.job_label.setText(f"{label}: cancelled")
            self.job_bar.setRange(0, 1)
            self.job_bar.setValue(0)

        def done(res):
            self.job_bar.setRange(0, 1)
            self.job_bar.setValue(1)
            on_result(res)

        self._task = self.session.runner.submit(label, fn, *args, on_result=done, on_error=failed,
                                                on_progress=progress, on_cancelled=cancelled, on_finished=finished,
                                                lane=lane)

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self.job_label.setText("cancelling …")

    @property
    def busy(self) -> bool:
        return self._task is not None

    # ------------------------------------------------------------ steps
    def acquire_overview(self) -> None:
        setup = self.session.setup
        if setup is None:
            return
        if self.ov_region.currentText() == "map view":
            region = self.map.view().world_box()
        else:
            region = tasks.overview_region(setup)
        px = self.ov_pixel.value()

        def done(ov):
            self.model.set_overview(ov)
            self.job_label.setText("overview acquired")
        # on a real microscope the overview moves the stage: it queues in the stage lane
        lane = None if setup.world is not None and setup.world.wafer is not None else "stage"
        self._run("acquire overview", tasks.acquire_overview, setup, region, px, on_result=done, lane=lane)

    def load_overview(self, path=None) -> None:
        """An overview mosaic from file (e.g. of a run with an overview plan)."""
        path = path or QFileDialog.getOpenFileName(self, "Load overview mosaic", "", "OME-TIFF (*.ome.tif *.tif)")[0]
        if not path:
            return
        from wafer.mosaic import load_overview
        try:
            ov = load_overview(Path(path))
        except Exception as e:
            self.notice.show_notice(f"load {path}: {e}", "error")
            return
        self.model.set_overview(ov)
        self.job_label.setText(f"overview loaded from {Path(path).name}")

    def detect(self) -> None:
        ov = self.model.overview
        if ov is None:
            self.notice.show_notice("acquire an overview first", "warning")
            return

        def done(items):
            cmd.set_sections(self.model, items, f"detect sections ({len(items)})")
            self.job_label.setText(f"{len(items)} sections detected")
        fn = functools.partial(tasks.detect_sections, model_path=self.section_model_path)
        self._run("detect sections", fn, ov, self.threshold.value(), on_result=done)

    def choose_section_model(self, path=None) -> None:
        """Weights for 'Detect sections'; asked for without ``path`` (cancel: the shipped model)."""
        if path is None:
            from common.paths import models_dir
            path = QFileDialog.getOpenFileName(self, "Section detection weights", str(models_dir()),
                                               "Weights (*.pt)")[0] or None
        self.section_model_path = Path(path) if path else None
        self.det_model_label.setText(f"model: {self.section_model_path.name}" if path else "model: shipped")
        self.det_model_label.setToolTip(str(self.section_model_path or ""))
        self._update_detector()

    def sections_from_truth(self) -> None:
        setup = self.session.setup
        items = tasks.truth_sections(setup)
        cmd.set_sections(self.model, items, f"sections from the simulator ({len(items)})")
        self.job_label.setText(f"{len(items)} sections from the simulator")

    def load_sections(self, path=None) -> None:
        path = path or QFileDialog.getOpenFileName(self, "Load sections", "", "JSON (*.json)")[0]
        if not path:
            return
        from wafer.sections import load_sections
        try:
            items = load_sections(path)
        except Exception as e:
            self.notice.show_notice(f"load {path}: {e}", "error")
            return
        cmd.set_sections(self.model, items, f"load {Path(path).name}")

    def load_magc(self, path=None, landmarks_path=None) -> None:
        """A MagC file's sections, with one grid per ROI of the tiles set in 4. Asked
        for interactively, the stage landmark file is optional (cancel: the file's
        coordinates are taken as stage µm)."""
        if not path:
            path = QFileDialog.getOpenFileName(self, "Load MagC", "", "MagC (*.magc)")[0]
            if not path:
                return
            landmarks_path = landmarks_path or QFileDialog.getOpenFileName(
                self, "Stage positions of the landmarks (optional)", str(Path(path).parent),
                "Landmarks (*.csv *.json)")[0]
        try:
            items, specs, order, summary = tasks.load_magc(path, self.template(), self.margin.value(),
                                                           landmarks_path or None)
        except Exception as e:
            self.notice.show_notice(f"load {path}: {describe_error(e)}", "error")
            return
        if not cmd.set_layout(self.model, items, specs, order, f"load MagC {Path(path).name}"):
            self.notice.show_notice("the layout is in use by a run", "warning")
            return
        self.magc_status.setText(summary or "no landmark file: MagC coordinates taken as stage µm")
        self.magc_status.show()
        self.job_label.setText(f"{len(items)} sections, {len(specs)} grids from {Path(path).name}")

    def save_sections(self, path=None) -> None:
        path = path or QFileDialog.getSaveFileName(self, "Save sections", "sections.json", "JSON (*.json)")[0]
        if not path:
            return
        from wafer.sections import save_sections
        try:
            save_sections(self.model.ordered_sections(), path, overwrite=True)
            self.notice.show_notice(f"saved {len(self.model.sections)} sections to {path}", "info")
        except Exception as e:
            self.notice.show_notice(f"save {path}: {e}", "error")

    def template(self) -> GridSpec:
        return GridSpec(-1, 0, (0.0, 0.0), 0.0, 1, 1, self.tile_pixel.value(),
                        (self.frame_w.value(), self.frame_h.value()), self.overlap.value(), self.dwell.value())

    def create_grids(self) -> None:
        lay = self.model
        if not lay.sections:
            self.notice.show_notice("no sections: detect or load them first", "warning")
            return
        t = self.template()
        if 2 * t.overlap_px >= min(t.frame_size):
            self.notice.show_notice(f"overlap {t.overlap_px} px must be below half the frame side", "warning")
            return
        self.map.grid_template = replace(t, rows=2, cols=2)
        specs = [tasks.grid_for_section(s, t, 0, self.margin.value()) for s in lay.ordered_sections()]
        if cmd.set_grids(lay, specs, f"create {len(specs)} grids"):
            self.job_label.setText(f"{len(specs)} grids, {lay.n_tiles()} tiles")

    def optimise_order(self) -> None:
        lay = self.model
        secs = lay.ordered_sections()
        if len(secs) < 2:
            return
        pos = self.session.last.get("stage", {}).get("position")
        start = (pos.x * 1e6, pos.y * 1e6) if pos is not None else (0.0, 0.0)
        ids = [s.id for s in secs]
        import numpy as np
        pts = np.array([(lay.grids_of(s.id)[0].center_um if lay.grids_of(s.id) else s.center_um) for s in secs])
        before = lay.path_length_um(start)

        def done(res):
            order, _ = res
            cmd.set_order(lay, order, "optimise imaging order")
            after = lay.path_length_um(start)
            gain = 100 * (1 - after / before) if before else 0.0
            self.order_status.setText(f"stage path {before / 1e3:.2f} mm → {after / 1e3:.2f} mm  (−{gain:.0f} %)")
        self._run("optimise order", tasks.optimise_order, pts, ids, start, self.solver.currentText(), on_result=done)

    def plan_options(self):
        from gui.plan_builder import PlanOptions
        return PlanOptions(cycles=self.cycles.value(), autofocus=self.af_method.currentText(),
                           writers=[w.strip() for w in self.writers.currentText().split(",")],
                           mill=self.mill.isChecked())

    def build_plan(self) -> None:
        from gui.plan_builder import build_plan, plan_dict
        if self.session.setup is None:
            self.notice.show_notice("open a setup first", "warning")
            return
        data = plan_dict(self.model, self.session.config_path, self.plan_options())
        try:
            plan = build_plan(data)
        except Exception as e:
            self.notice.show_notice(str(e), "error")
            return
        n = sum(len(s["grids"]) for s in data["sections"])
        self.notice.show_notice(f"plan: {len(data['sections'])} sections, {n} grids, {plan.n_cycles()} cycle(s)",
                                "info")
        self.plan_ready.emit(plan, data)
