"""--screenshot-tour: drive the real window through the wafer workflow on the
simulator with timer steps (the event loop keeps running throughout) and save
PNGs of the main views. Used by scripts/screenshots.sh under Xvfb."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Optional

from PyQt5.QtCore import QObject, Qt, QTimer
from PyQt5.QtGui import QImage

log = logging.getLogger(__name__)
MAX_BYTES = 300_000


def _quantized(img: QImage, path: Path) -> None:
    """256-colour PNG: a UI is mostly flat colour, so a median-cut palette
    without dithering keeps text sharp at a fraction of the size."""
    try:
        from PIL import Image
    except ImportError:
        img.convertToFormat(QImage.Format_Indexed8, Qt.ThresholdDither | Qt.AvoidDither).save(str(path), "PNG")
        return
    rgb = img.convertToFormat(QImage.Format_RGB888)
    ptr = rgb.constBits()
    ptr.setsize(rgb.bytesPerLine() * rgb.height())
    pil = Image.frombuffer("RGB", (rgb.width(), rgb.height()), bytes(ptr), "raw", "RGB", rgb.bytesPerLine(), 1)
    pil.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(str(path), optimize=True)


def save_small(widget, path: Path, max_bytes: int = MAX_BYTES) -> Path:
    """PNG of a widget, below max_bytes: a 256-colour palette if needed, then smaller."""
    img = widget.grab().toImage()
    img.save(str(path), "PNG")
    if path.stat().st_size > max_bytes:
        _quantized(img, path)
    scale = 0.9
    while path.stat().st_size > max_bytes and scale > 0.4:
        _quantized(img.scaledToWidth(int(img.width() * scale), Qt.SmoothTransformation), path)
        scale -= 0.1
    return path


class ScreenshotTour(QObject):
    def __init__(self, win, out_dir: Path, on_done: Optional[Callable[[], None]] = None):
        super().__init__(win)
        self.win, self.out = win, Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.on_done = on_done
        self.saved: list[Path] = []
        self._steps = self._tour()
        self._wait: Optional[Callable[[], bool]] = None
        self._deadline = 0.0
        self._timer = QTimer(self)
        self._timer.setInterval(100)
        self._timer.timeout.connect(self._tick)

    def start(self) -> None:
        self._timer.start()

    def _tick(self) -> None:
        if self._wait is not None:
            if not self._wait() and time.monotonic() < self._deadline:
                return
            if time.monotonic() >= self._deadline:
                log.warning("screenshot tour: a step timed out, going on")
            self._wait = None
        try:
            pred = next(self._steps)
        except StopIteration:
            self._timer.stop()
            log.info("screenshot tour: %d images in %s", len(self.saved), self.out)
            if self.on_done:
                self.on_done()
            return
        except Exception:
            log.exception("screenshot tour failed")
            self._timer.stop()
            if self.on_done:
                self.on_done()
            return
        if pred is not None:
            self._wait, self._deadline = (pred if callable(pred) else (lambda t=time.monotonic() + pred: time.monotonic() >= t)), \
                time.monotonic() + 180

    def shot(self, name: str, widget=None) -> None:
        self.saved.append(save_small(widget or self.win, self.out / name))
        log.info("saved %s", self.out / name)

    def _tour(self):
        w = self.win
        s, wf, m, acq, ctl = w.session, w.workflow, w.stage_map, w.acquisition, w.controller
        yield lambda: s.setup is not None and "sem" in s.last and "stage" in s.last
        yield 1.5
        w.default_dock_sizes()
        yield 0.3
        w.docks["Devices"].raise_()
        w.docks["Wafer workflow"].raise_()
        m.fit_wafer(animate=False)
        yield 0.5
        self.shot("01_main_window.png")
        # 1 overview of the whole wafer at 4 µm
        wf.ov_region.setCurrentText("whole wafer")
        wf.acquire_overview()
        yield lambda: not wf.busy
        # 2 sections: the detector when it has a model, else the simulator's truth
        if wf.detect_button.isEnabled():
            wf.detect()
            yield lambda: not wf.busy
        if not w.layout_model.sections:
            wf.sections_from_truth()
        # 4 grids: 20 nm tiles, a few hundred per section
        wf.tile_pixel.setValue(20.0)
        wf.create_grids()
        wf.optimise_order()
        yield lambda: not wf.busy
        lay = w.layout_model
        first = lay.ordered_sections()[0]
        lay.select(("section", first.id))
        yield 0.5
        self.shot("02_workflow_after_detection.png")
        lay.select(None)
        xs = [p for sec in lay.sections.values() for p in sec.polygon_um]
        import numpy as np
        pts = np.array(xs)
        m.zoom_to_rect(*pts.min(0), *pts.max(0), animate=False, margin=1.3)
        yield 0.5
        self.shot("03_stage_map_sections_grids.png", w.map_panel)
        # 6 plan and start: tiles coloured as they come in
        wf.cycles.setValue(2)
        wf.build_plan()
        import tempfile
        run_dir = Path(tempfile.mkdtemp(prefix="gui_tour_"))        # the tour's tiles are not data to keep
        acq.out_dir.setText(str(run_dir / "run"))
        acq.start()
        yield lambda: ctl.progress is not None and ctl.progress.tiles >= 60
        w.docks["Live view"].raise_()
        key = (first.id, 0)
        m.zoom_to_rect(*lay.grids[key].outline_um().min(0), *lay.grids[key].outline_um().max(0), animate=False)
        yield 1.0
        self.shot("04_acquisition_running.png")
        m.zoom_to_tile(key, 7, animate=False)
        yield 0.5
        self.shot("05_stage_map_tile_zoom.png", w.map_panel)
        ctl.pause()
        yield lambda: ctl.state == "paused"
        yield 0.5
        self.shot("06_acquisition_paused.png", w.docks["Acquisition"])
        ctl.stop()
        yield lambda: ctl.finished() and ctl.state == "idle"
        import shutil
        shutil.rmtree(run_dir, ignore_errors=True)
        # live view + autofocus after the run: MAPFoSt at the first section
        m.zoom_to_rect(*pts.min(0), *pts.max(0), animate=False, margin=1.3)
        w.docks["Autofocus"].raise_()
        w.stage_panel.move_to(s.setup.stage.position().with_(x=first.center_um[0] * 1e-6,
                                                               y=first.center_um[1] * 1e-6))
        yield lambda: not s.runner.pending("stage move")
        sem = s.setup.sem
        sem.set_working_distance(sem.working_distance() + 5e-6)
        sem.set_stig(0.8, -0.6)
        w.autofocus.method.setCurrentText("mapfost")
        w.autofocus.run_now()
        yield lambda: w.autofocus._task is None
        yield 0.5
        self.shot("07_autofocus.png")
        w.docks["Live view"].raise_()
        w.live.setCurrentWidget(w.live.qc_plot)
        yield 0.5
        self.shot("08_live_view_qc.png", w.docks["Live view"])
        w.live.setCurrentWidget(w.live.tile_pane)
        yield 0.3
        self.shot("09_live_view_tile.png", w.docks["Live view"])
        w.docks["SEM"].raise_()
        w.sem_panel.wd.setValue(20.0)
        w.sem_panel.set_wd()
        yield 0.5
        self.shot("10_refused_setpoint.png")
