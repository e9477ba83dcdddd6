"""Acquisition: choose or build a plan, start, pause, resume, stop, continue
a run after a crash; progress per cycle / section / tile with ETA, the step
under way, why a run is paused and what the operator can do, incidents;
"Open run report" writes and opens the run's HTML report (acq/report/)."""
from __future__ import annotations

import time
from pathlib import Path

from PyQt5.QtWidgets import (QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QLineEdit, QProgressBar,
                             QPushButton, QSplitter, QVBoxLayout, QWidget)
from PyQt5.QtCore import Qt, QUrl
from PyQt5.QtGui import QDesktopServices

from common.paths import configs_dir, default_out_root
from gui.incidents import IncidentList
from gui.resume_dialog import ResumeDialog
from gui.run_progress import pause_advice, report_folder
from gui.widgets import Notice

STATE_STYLE = {"running": "background: #2e7d32; color: white;", "paused": "background: #f9a825; color: black;",
               "stopping": "background: #ef6c00; color: white;", "idle": "background: #607d8b; color: white;",
               "error": "background: #c62828; color: white;"}
PLANS_DIR = configs_dir() / "plans"
OUT_ROOT = default_out_root()


class AcquisitionPanel(QWidget):
    def __init__(self, session, controller, parent=None):
        super().__init__(parent)
        self.session, self.ctl = session, controller
        v = QVBoxLayout(self)
        v.setContentsMargins(4, 4, 4, 4)
        # --- plan and output
        box = QGroupBox("Plan")
        f = QFormLayout(box)
        self.plan_label = QLabel("no plan: build one in the wafer workflow or load a file")
        self.plan_label.setWordWrap(True)
        row = QHBoxLayout()
        load = QPushButton("Load plan …")
        load.clicked.connect(self.load_plan)
        demo = QPushButton("Demo plan")
        demo.setToolTip("configs/plans/demo_wafer.yaml")
        demo.clicked.connect(lambda: self.load_plan(PLANS_DIR / "demo_wafer.yaml"))
        row.addWidget(load)
        row.addWidget(demo)
        row.addStretch(1)
        f.addRow(self.plan_label)
        f.addRow(row)
        self.out_dir = QLineEdit(str(OUT_ROOT / time.strftime("run_%Y%m%d_%H%M%S")))
        browse = QPushButton("…")
        browse.setMaximumWidth(30)
        browse.clicked.connect(self._browse_out)
        orow = QHBoxLayout()
        orow.addWidget(self.out_dir, 1)
        orow.addWidget(browse)
        f.addRow("Output folder", orow)
        v.addWidget(box)
        # --- control
        row = QHBoxLayout()
        self.start_button = QPushButton("Start")
        self.pause_button = QPushButton("Pause")
        self.resume_button = QPushButton("Resume")
        self.stop_button = QPushButton("Stop")
        self.recover_button = QPushButton("Resume run …")
        self.recover_button.setToolTip("continue a run that stopped or crashed, from its folder's journal")
        for b, fn in ((self.start_button, self.start), (self.pause_button, self.ctl.pause),
                      (self.resume_button, self.ctl.resume), (self.stop_button, self.ctl.stop),
                      (self.recover_button, self.recover)):
            b.clicked.connect(fn)
            row.addWidget(b)
        self.start_button.setStyleSheet("font-weight: bold;")
        v.addLayout(row)
        self.state_label = QLabel("IDLE")
        self.state_label.setAlignment(Qt.AlignCenter)
        self.state_label.setStyleSheet(STATE_STYLE["idle"] + "font-weight: bold; padding: 4px;")
        v.addWidget(self.state_label)
        self.advice = QLabel("")
        self.advice.setWordWrap(True)
        self.advice.setStyleSheet("background: #fff8e1; border: 1px solid #f9a825; padding: 4px;")
        self.advice.setVisible(False)
        v.addWidget(self.advice)
        self.notice = Notice()
        v.addWidget(self.notice)
        # --- progress
        box = QGroupBox("Progress")
        f = QFormLayout(box)
        self.cycle_bar, self.section_bar, self.tile_bar = QProgressBar(), QProgressBar(), QProgressBar()
        for b in (self.cycle_bar, self.section_bar, self.tile_bar):
            b.setFormat("%v / %m")
            b.setRange(0, 1)
            b.setValue(0)
        self.eta = QLabel("ETA –")
        self.step_label = QLabel("–")
        self.step_label.setWordWrap(True)
        f.addRow("Cycle", self.cycle_bar)
        f.addRow("Section", self.section_bar)
        f.addRow("Tiles", self.tile_bar)
        f.addRow("", self.eta)
        self.exposures = QLabel("exposures per tile: –")
        self.exposures.setToolTip("Scans of each tile's area this cycle (grabs, retries, autofocus over it); "
                                  "the run pauses at the setup's exposure budget")
        f.addRow("", self.exposures)
        f.addRow("Now", self.step_label)
        self.report_button = QPushButton("Open run report")
        self.report_button.setToolTip("write OUTDIR/report/report.html from the run's journal (also while it runs) "
                                      "and open it in the browser: autofocus, QC, dose, exposures, incidents, ETA")
        self.report_button.clicked.connect(lambda: self.open_report())
        f.addRow("", self.report_button)
        split = QSplitter(Qt.Vertical)
        split.addWidget(box)
        self.incidents = IncidentList()
        split.addWidget(self.incidents)
        split.setStretchFactor(1, 1)
        v.addWidget(split, 1)
        controller.state_changed.connect(self._on_state)
        controller.step_changed.connect(self.step_label.setText)
        controller.progress_changed.connect(self._on_progress)
        controller.plan_changed.connect(self._on_plan)
        # bound methods, not lambdas: Qt disconnects them when this panel is destroyed
        controller.error.connect(self._on_error)
        controller.bridge.incident.connect(self.incidents.add)
        session.setup_changed.connect(self._on_setup)
        self._buttons()

    # ------------------------------------------------------------ actions
    def load_plan(self, path=None) -> bool:
        path = path or QFileDialog.getOpenFileName(self, "Load plan", str(PLANS_DIR),
                                                   "Plan (*.yaml *.yml)")[0]
        if not path:
            return False
        self.notice.clear_notice()
        return self.ctl.load_plan(path)

    def _browse_out(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "Output folder", str(OUT_ROOT))
        if d:
            self.out_dir.setText(d)

    def start(self) -> bool:
        self.notice.clear_notice()
        self.incidents.clear()
        out = Path(self.out_dir.text())
        if out.exists() and any(out.iterdir()):
            self.notice.show_notice(f"{out} is not empty: choose a new folder, or continue that run with "
                                    "Resume run …", "warning")
            return False
        return self.ctl.start(out)

    def recover(self, folder=None, accept_change=None, max_exposures: int | None = None) -> bool:
        """Continue the run in ``folder``. Chosen here (no folder given), the operator is
        also asked which parts may have changed and the exposure budget (ResumeDialog)."""
        ask = not folder
        folder = folder or QFileDialog.getExistingDirectory(self, "Run folder to continue", str(OUT_ROOT))
        if not folder:
            return False
        folder = Path(folder)
        if not (folder / "journal.jsonl").exists():
            self.notice.show_notice(f"{folder} holds no journal.jsonl: nothing to continue", "warning")
            return False
        saved = folder / "gui_plan.yaml"
        if saved.exists() and not self.ctl.load_plan(saved):
            return False
        if self.ctl.plan is None:
            self.notice.show_notice("load the plan of that run first", "warning")
            return False
        if self.session.setup is None:
            self.notice.show_notice("open the run's setup first (File > Open setup file …)", "warning")
            return False
        if ask:
            from acq.dose_budget import budget_for
            dialog = ResumeDialog(folder, budget_for(self.ctl.plan, self.session.setup.config), self)
            if dialog.exec() != ResumeDialog.Accepted:
                return False
            accept_change, max_exposures = dialog.choices()
        self.out_dir.setText(str(folder))
        return self.ctl.start(folder, resume=True, accept_change=accept_change or (), max_exposures=max_exposures)

    def open_report(self, folder=None) -> bool:
        """(Re)write the report of the run in ``folder`` (default: the output
        folder field, else the last run's) off the GUI thread, then open it."""
        folder = report_folder([folder] if folder else [self.out_dir.text(), self.ctl.out_dir])
        if folder is None:
            self.notice.show_notice("no run to report on: the output folder holds no journal.jsonl yet", "warning")
            return False
        from acq.report import write_report
        self.report_button.setEnabled(False)
        self.report_button.setText("Writing the run report …")
        self.session.runner.submit("run report", write_report, folder, on_result=self._report_written,
                                   on_error=self._report_failed, on_finished=self._report_done)
        return True

    def _report_written(self, path) -> None:
        if not QDesktopServices.openUrl(QUrl.fromLocalFile(str(path))):
            self.notice.show_notice(f"report written to {path}; no browser could be opened for it", "warning")

    def _report_failed(self, err: Exception) -> None:
        self.notice.show_notice(f"run report not written: {err}", "error")

    def _report_done(self) -> None:
        self.report_button.setText("Open run report")
        self.report_button.setEnabled(True)

    # ------------------------------------------------------------ updates
    def _on_error(self, text: str) -> None:
        self.notice.show_notice(text, "error")

    def _on_setup(self, _setup) -> None:
        self._buttons()

    def _on_plan(self, plan) -> None:
        secs = plan.sections
        n = (f"{len(secs)} sections, {sum(len(s.grids) for s in secs)} grids" if secs is not None
             else "sections from the simulated wafer")
        extra = [f"autofocus {plan.autofocus.method}"]
        if plan.mill is not None:
            extra.append(f"mill {plan.mill.duration_s:g} s")
        if plan.irradiation is not None:
            extra.append("irradiation")
        src = plan.source or "built in the wafer workflow"
        self.plan_label.setText(f"{src}\n{n}; {plan.n_cycles()} cycle(s); {', '.join(extra)}")
        self.out_dir.setText(str(OUT_ROOT / time.strftime("run_%Y%m%d_%H%M%S")))
        self._buttons()

    def _on_state(self, state: str, reason: str) -> None:
        text = state.upper() + (f" — {reason}" if reason and state != "running" else "")
        self.state_label.setText(text)
        self.state_label.setStyleSheet(STATE_STYLE.get(state, "") + "font-weight: bold; padding: 4px;")
        self.advice.setVisible(state == "paused")
        if state == "paused":
            self.advice.setText(f"<b>Paused:</b> {reason}<br>{pause_advice(self.ctl.pause_info)}")
            self.step_label.setText("paused (beams blanked)")
        self._buttons()

    def _on_progress(self) -> None:
        p = self.ctl.progress
        if p is None:
            return
        self.cycle_bar.setRange(0, max(p.n_cycles, 1))
        self.cycle_bar.setValue(min(p.cycle + (1 if p.cycle_tiles >= p.tiles_per_cycle else 0), p.n_cycles))
        self.cycle_bar.setFormat(f"cycle {p.cycle + 1} of {p.n_cycles}")
        n_sec = p.tiles_per_section.get(p.section, 0) if p.section is not None else 0
        self.section_bar.setRange(0, max(n_sec, 1))
        self.section_bar.setValue(min(p.section_tiles, max(n_sec, 1)))
        self.section_bar.setFormat(f"section {p.section}: %v / %m tiles" if p.section is not None else "–")
        self.tile_bar.setRange(0, max(p.total, 1))
        self.tile_bar.setValue(p.done)
        self.eta.setText(p.eta_text())
        self.exposures.setText(p.exposures_text())

    def _buttons(self) -> None:
        st = self.ctl.state
        active = self.ctl.running
        have = self.session.setup is not None and self.ctl.plan is not None
        self.start_button.setEnabled(have and not active)
        self.recover_button.setEnabled(self.session.setup is not None and not active)
        self.pause_button.setEnabled(active and st == "running")
        self.resume_button.setEnabled(active and st == "paused")
        self.stop_button.setEnabled(active and st in ("running", "paused"))
