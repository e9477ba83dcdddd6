"""Live view: the last tile (histogram, contrast stretch), the last overview,
and QC values per tile over the run. Tiles may arrive faster than the screen
needs them: only the newest is drawn, at most every REFRESH_MS."""
from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PyQt5.QtCore import QTimer
from PyQt5.QtWidgets import QCheckBox, QHBoxLayout, QLabel, QPushButton, QTabWidget, QVBoxLayout, QWidget

from acq.documents import TileEvent

REFRESH_MS = 150
QC_KEYS = ("focus", "mean", "sd")
QC_PENS = {"focus": "#1565c0", "mean": "#2e7d32", "sd": "#ef6c00"}
MAX_POINTS = 20000


def stretch_levels(img: np.ndarray, lo: float = 0.5, hi: float = 99.5) -> tuple[float, float]:
    """Contrast stretch: grey levels at the given percentiles, from a histogram
    of a subsample (a fraction of a millisecond on any frame)."""
    step = max(1, int(np.sqrt(img.size / 65536)))
    sample = img[::step, ::step]
    if sample.dtype == np.uint8:
        cdf = np.cumsum(np.bincount(sample.ravel(), minlength=256)) / sample.size
        a, b = float(np.searchsorted(cdf, lo / 100)), float(np.searchsorted(cdf, hi / 100))
    else:
        a, b = (float(v) for v in np.percentile(sample, (lo, hi)))
    return a, max(b, a + 1)


class ImagePane(QWidget):
    """An image with histogram/LUT, auto-stretch and a caption."""

    def __init__(self, parent=None):
        super().__init__(parent)
        v = QVBoxLayout(self)
        v.setContentsMargins(0, 0, 0, 0)
        self.glw = pg.GraphicsLayoutWidget()
        self.vb = self.glw.addViewBox(lockAspect=True, invertY=True)
        self.item = pg.ImageItem()
        self.vb.addItem(self.item)
        self.hist = pg.HistogramLUTItem(image=self.item)
        self.glw.addItem(self.hist)
        v.addWidget(self.glw, 1)
        row = QHBoxLayout()
        self.caption = QLabel("no image yet")
        self.caption.setWordWrap(True)
        self.auto = QCheckBox("auto-stretch")
        self.auto.setChecked(True)
        stretch = QPushButton("Stretch")
        stretch.clicked.connect(self.stretch)
        full = QPushButton("0–255")
        full.clicked.connect(lambda: self.item.setLevels((0, 255)))
        row.addWidget(self.caption, 1)
        row.addWidget(self.auto)
        row.addWidget(stretch)
        row.addWidget(full)
        v.addLayout(row)
        self.image = None

    def show(self, img: np.ndarray, caption: str = "") -> None:
        first = self.image is None or self.image.shape != img.shape
        self.image = img
        self.item.setImage(img, autoLevels=False)
        if self.auto.isChecked() or first:
            self.stretch()
        if first:
            self.vb.autoRange(padding=0.01)
        self.caption.setText(caption)

    def stretch(self) -> None:
        if self.image is not None:
            self.item.setLevels(stretch_levels(self.image))
            self.hist.setLevels(*self.item.getLevels())


class LiveView(QTabWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.tile_pane = ImagePane()
        self.overview_pane = ImagePane()
        self.addTab(self.tile_pane, "Last tile")
        self.addTab(self.overview_pane, "Overview")
        # focus and grey levels differ by orders of magnitude: two plots, one x axis
        self.qc_plot = pg.GraphicsLayoutWidget()
        self.focus_plot = self.qc_plot.addPlot(title="focus score per tile")
        self.level_plot = self.qc_plot.addPlot(title="mean and s.d. (grey levels) per tile")
        self.level_plot.setXLink(self.focus_plot)
        self.level_plot.addLegend(offset=(-5, 5))
        for pl in (self.focus_plot, self.level_plot):
            pl.setLabel("bottom", "tile #")
            pl.showGrid(x=True, y=True, alpha=0.3)
        self.qc_curves = {k: (self.focus_plot if k == "focus" else self.level_plot).plot(
            [], [], pen=pg.mkPen(QC_PENS[k], width=1.5), name=k, symbol="o", symbolSize=4, symbolBrush=QC_PENS[k])
            for k in QC_KEYS}
        self.qc_failed = pg.ScatterPlotItem(size=10, brush=pg.mkBrush(230, 40, 40, 200), symbol="x")
        self.focus_plot.addItem(self.qc_failed)
        self.addTab(self.qc_plot, "QC per tile")
        self.qc: dict[str, list[float]] = {k: [] for k in QC_KEYS}
        self.qc_bad: list[tuple[int, float]] = []
        self.tiles_shown = 0
        self._pending = None
        self._pending_overview = None
        self._qc_dirty = False
        self._timer = QTimer(self)
        self._timer.setInterval(REFRESH_MS)
        self._timer.timeout.connect(self._refresh)
        self._timer.start()

    # ------------------------------------------------------------ inputs
    def on_tile(self, doc) -> None:
        """A TileEvent: keep it for the next refresh; record its QC values.
        Overview tiles of a plan go to the overview tab."""
        if doc.overview:
            self._pending_overview = doc
            return
        self._pending = doc
        qc = doc.qc if isinstance(doc.qc, dict) else {}
        n = len(self.qc["mean"])
        for k in QC_KEYS:
            v = qc.get(k)
            self.qc[k].append(float(v) if isinstance(v, (int, float)) else np.nan)
            if len(self.qc[k]) > MAX_POINTS:
                del self.qc[k][0]
        if qc and not qc.get("ok", True):
            self.qc_bad.append((n, float(qc.get("focus", 0.0) or 0.0)))
        self._qc_dirty = True

    def on_frame(self, image, metadata: dict) -> None:
        """A frame grabbed by hand (SEM panel)."""
        self._pending = (image, metadata)

    def show_overview(self, ov) -> None:
        if ov is None:
            return
        img = ov.image
        f = max(1, int(np.ceil(max(img.shape) / 2048)))          # the screen needs no more than this
        h, w = img.shape
        self.overview_pane.show(img[::f, ::f], f"overview {w} × {h} px at {ov.pixel_um:g} µm")

    def clear_qc(self) -> None:
        self.qc = {k: [] for k in QC_KEYS}
        self.qc_bad = []
        self._qc_dirty = True

    # ------------------------------------------------------------ refresh
    def _refresh(self) -> None:
        ov, self._pending_overview = self._pending_overview, None
        if ov is not None:
            self.overview_pane.show(ov.image, f"plan overview tile {ov.tile_id}, cycle {ov.cycle + 1}")
        pending, self._pending = self._pending, None
        if pending is not None:
            if isinstance(pending, TileEvent):
                d = pending
                caption = (f"{d.tile_id} v{d.version}  cycle {d.cycle + 1}  section {d.section_id}  "
                           f"wd {d.wd_m * 1e3:.4f} mm  stig ({d.stig[0]:.2f}, {d.stig[1]:.2f})")
                q = d.qc if isinstance(d.qc, dict) else {}
                if "focus" in q:
                    caption += f"  focus {q['focus']:.3g}" + ("" if q.get("ok", True) else "  QC FAILED")
                self.tile_pane.show(d.image, caption)
            else:
                image, md = pending
                self.tile_pane.show(image, f"grabbed frame {image.shape[1]}×{image.shape[0]}  "
                                           f"wd {md.get('wd_m', 0) * 1e3:.4f} mm")
            self.tiles_shown += 1
        if self._qc_dirty and self.currentWidget() is self.qc_plot:
            self._qc_dirty = False
            for k, c in self.qc_curves.items():
                c.setData(np.asarray(self.qc[k], float), connect="finite")
            if self.qc_bad:
                xs, ys = zip(*self.qc_bad)
                self.qc_failed.setData(list(xs), list(ys))
