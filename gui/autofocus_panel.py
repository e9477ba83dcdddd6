"""Autofocus: run a method now at the stage position (MAPFoSt; DeepFocus when
autofocus/loop.py and a trained model exist; the classical sweep), watch it
converge (wd and stigmators per iteration), and follow focus per section over
the run (the wd and stig of each section's tiles, cycle after cycle)."""
from __future__ import annotations

import time

import numpy as np
import pyqtgraph as pg
from PyQt5.QtCore import QObject, pyqtSignal
from PyQt5.QtGui import QStandardItem, QStandardItemModel
from PyQt5.QtWidgets import (QComboBox, QFormLayout, QHBoxLayout, QLabel, QPushButton, QSpinBox, QSplitter,
                             QVBoxLayout, QWidget)
from PyQt5.QtCore import Qt

from gui.autofocus_runner import methods_available, run_focus
from gui.session import describe_error
from gui.widgets import Debouncer, Notice, spin


MAX_CYCLES_SHOWN = 6


class _Iterations(QObject):
    """Carries iteration records from the worker thread to the GUI thread."""
    record = pyqtSignal(dict)


class AutofocusPanel(QWidget):
    finished = pyqtSignal(dict)

    def __init__(self, session, layout=None, parent=None):
        super().__init__(parent)
        self.session, self.layout_model = session, layout
        outer = QHBoxLayout(self)
        outer.setContentsMargins(4, 4, 4, 4)
        left = QWidget()
        left.setMaximumWidth(330)
        v = QVBoxLayout(left)
        v.setContentsMargins(0, 0, 0, 0)
        form = QFormLayout()
        self.method = QComboBox()
        self._fill_methods()
        self.perturbation = spin(0.5, 50, 1, 5.0, "µm", 0.5, width=80)
        self.iterations = QSpinBox()
        self.iterations.setRange(1, 20)
        self.iterations.setValue(5)
        self.frame = QComboBox()
        self.frame.addItems(["256", "512", "768", "1024"])
        self.frame.setCurrentText("512")
        self.pixel = spin(0.5, 100, 1, 10.0, "nm", 0.5, width=80)     # DeepFocus needs >= 2.56 µm frames
        form.addRow("Method", self.method)
        form.addRow("Pair ±Δ", self.perturbation)
        form.addRow("Max iterations", self.iterations)
        form.addRow("Frame / pixel", self._pair(self.frame, self.pixel))
        v.addLayout(form)
        row = QHBoxLayout()
        self.run_button = QPushButton("Run now")
        self.run_button.setStyleSheet("font-weight: bold;")
        self.run_button.clicked.connect(self.run_now)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        row.addWidget(self.run_button)
        row.addWidget(self.cancel_button)
        v.addLayout(row)
        self.result = QLabel("–")
        self.result.setWordWrap(True)
        v.addWidget(self.result)
        self.notice = Notice()
        v.addWidget(self.notice)
        v.addStretch(1)
        outer.addWidget(left)
        split = QSplitter(Qt.Horizontal)
        self.conv = pg.GraphicsLayoutWidget()
        self.wd_plot = self.conv.addPlot(title="wd (µm from start) per iteration")
        self.wd_plot.showGrid(x=True, y=True, alpha=0.3)
        self.wd_plot.setLabel("bottom", "iteration")
        self.stig_plot = self.conv.addPlot(title="stigmators per iteration")
        self.stig_plot.showGrid(x=True, y=True, alpha=0.3)
        self.stig_plot.setLabel("bottom", "iteration")
        self.stig_plot.addLegend(offset=(5, 5))
        self.wd_curve = self.wd_plot.plot([], [], pen=pg.mkPen("#1565c0", width=2), symbol="o", symbolSize=6)
        self.sx_curve = self.stig_plot.plot([], [], pen=pg.mkPen("#2e7d32", width=2), symbol="o", symbolSize=6,
                                            name="x")
        self.sy_curve = self.stig_plot.plot([], [], pen=pg.mkPen("#ef6c00", width=2), symbol="t", symbolSize=6,
                                            name="y")
        split.addWidget(self.conv)
        self.hist = pg.GraphicsLayoutWidget()
        self.hist_wd = self.hist.addPlot(title="wd (mm) per section, one line per cycle")
        self.hist_wd.setLabel("bottom", "section")
        self.hist_wd.showGrid(x=True, y=True, alpha=0.3)
        self.hist_wd.addLegend(offset=(5, 5))
        self.hist_stig = self.hist.addPlot(title="stig x, y per section (last cycle)")
        self.hist_stig.setLabel("bottom", "section")
        self.hist_stig.showGrid(x=True, y=True, alpha=0.3)
        self._stig_x = self.hist_stig.plot([], [], pen=pg.mkPen("#2e7d32", width=1.5), symbol="o", symbolSize=5)
        self._stig_y = self.hist_stig.plot([], [], pen=pg.mkPen("#ef6c00", width=1.5), symbol="t", symbolSize=5)
        self._cycle_curves: dict[int, object] = {}
        split.addWidget(self.hist)
        outer.addWidget(split, 1)
        self.records: list[dict] = []
        self.history: dict[int, dict[int, tuple[float, float, float]]] = {}   # cycle -> section -> wd, sx, sy
        self.manual: list[dict] = []
        self._task = None
        self._iter = _Iterations(self)
        self._iter.record.connect(self._on_iteration)
        self._hist_dirty = False
        self._hist_later = Debouncer(self.plot_history, 400)     # redraw once per burst of sections
        session.setup_changed.connect(self._enable)            # bound: disconnected with this panel
        session.run_active_changed.connect(self._enable)
        self._enable()

    @staticmethod
    def _pair(a, b) -> QWidget:
        w = QWidget()
        h = QHBoxLayout(w)
        h.setContentsMargins(0, 0, 0, 0)
        h.addWidget(a)
        h.addWidget(b)
        return w

    def _fill_methods(self) -> None:
        model = QStandardItemModel(self.method)
        for name, why in methods_available().items():
            item = QStandardItem(name)
            item.setEnabled(not why)
            item.setToolTip(why or f"run {name} at the current stage position")
            model.appendRow(item)
        self.method.setModel(model)
        self.method.setCurrentIndex(0)

    def _enable(self, *_) -> None:
        ok = self.session.setup is not None and not self.session.run_active and self._task is None
        self.run_button.setEnabled(ok)
        self.run_button.setToolTip("" if ok else "needs a connected setup and no acquisition running")

    # ------------------------------------------------------------ run now
    def run_now(self) -> bool:
        setup = self.session.setup
        if setup is None or self._task is not None:
            return False
        if self.session.run_active:
            self.notice.show_notice("an acquisition is running: its plan does the autofocus", "warning")
            return False
        name = self.method.currentText()
        self.notice.clear_notice()
        self.records = []
        self._plot_records()
        self.result.setText(f"{name}: running …")
        kwargs = dict(perturbation_um=self.perturbation.value(), max_iterations=self.iterations.value(),
                      frame=int(self.frame.currentText()), pixel_nm=self.pixel.value(),
                      on_iteration=self._iter.record.emit)
        self._task = self.session.runner.submit(f"autofocus {name}", run_focus, setup, name, lane="sem",
                                                on_result=self._done, on_error=self._failed,
                                                on_cancelled=lambda: self.result.setText(f"{name}: cancelled"),
                                                on_finished=self._finished, wants_progress=True, **kwargs)
        self.cancel_button.setEnabled(True)
        self._enable()
        return True

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _finished(self) -> None:
        self._task = None
        self.cancel_button.setEnabled(False)
        self._enable()
        self.session.poll(["sem"])

    def _failed(self, e) -> None:
        self.result.setText("failed")
        self.notice.show_notice(f"autofocus: {describe_error(e)}", "error")

    def _on_iteration(self, rec: dict) -> None:
        self.records.append(rec)
        self._plot_records()

    def _done(self, res: dict) -> None:
        self.records = [{**r, "final": True} for r in res["iterations"]]
        self._plot_records(res)
        d_wd = (res["final_wd_m"] - res["start_wd_m"]) * 1e6
        st = res["final_stig"]
        self.result.setText(f"{res['method']}: {res['status']} — {res['message']}\n"
                            f"wd {res['start_wd_m'] * 1e3:.4f} → {res['final_wd_m'] * 1e3:.4f} mm ({d_wd:+.2f} µm), "
                            f"stig ({st[0]:.3f}, {st[1]:.3f}); {len(res['iterations'])} iteration(s), "
                            f"{res['seconds']:.1f} s")
        self.manual.append({**res, "time": time.time()})
        self.finished.emit(res)

    def _plot_records(self, res: dict | None = None) -> None:
        recs = self.records
        if not recs:
            for c in (self.wd_curve, self.sx_curve, self.sy_curve):
                c.setData([], [])
            return
        # states: before iteration 1, then after each (final trace) or as measured (live)
        wd0 = res["start_wd_m"] if res else recs[0]["wd_m"]
        if res:
            ks = list(range(len(recs) + 1))
            wds = [res["start_wd_m"]] + [r["wd_after_m"] for r in recs]
            sts = [tuple(res["start_stig"])] + [tuple(r["stig_after"]) for r in recs]
        else:
            ks = [r["iteration"] - 1 for r in recs]
            wds = [r["wd_m"] for r in recs]
            sts = [tuple(r["stig"]) for r in recs]
        self.wd_curve.setData(ks, (np.array(wds) - wd0) * 1e6)
        self.sx_curve.setData(ks, [s[0] for s in sts])
        self.sy_curve.setData(ks, [s[1] for s in sts])

    # ------------------------------------------------------------ history
    def on_tile(self, doc) -> None:
        if doc.overview:
            return
        cyc = self.history.setdefault(doc.cycle, {})
        if doc.section_id not in cyc:               # the focus each section was imaged with
            cyc[doc.section_id] = (doc.wd_m, doc.stig[0], doc.stig[1])
            self._hist_dirty = True
            self._hist_later()

    def plot_history(self) -> None:
        """Redraw only what changed, and only when visible: re-creating plot
        items costs the GUI thread tens of ms, once per section."""
        if not self._hist_dirty or not self.isVisible():
            return
        self._hist_dirty = False
        cycles = sorted(self.history)[-MAX_CYCLES_SHOWN:]
        for c in list(self._cycle_curves):
            if c not in cycles:
                self.hist_wd.removeItem(self._cycle_curves.pop(c))
        for i, c in enumerate(cycles):
            secs = sorted(self.history[c])
            wd = [self.history[c][s][0] * 1e3 for s in secs]
            curve = self._cycle_curves.get(c)
            if curve is None:
                color = pg.intColor(c, hues=9)
                curve = self.hist_wd.plot([], [], pen=pg.mkPen(color, width=1.5), symbol="o", symbolSize=5,
                                          symbolBrush=color, name=f"cycle {c + 1}")
                self._cycle_curves[c] = curve
            curve.setData(secs, wd)
        if cycles:
            last = self.history[cycles[-1]]
            secs = sorted(last)
            self._stig_x.setData(secs, [last[s][1] for s in secs])
            self._stig_y.setData(secs, [last[s][2] for s in secs])

    def showEvent(self, ev) -> None:
        super().showEvent(ev)
        self.plot_history()
