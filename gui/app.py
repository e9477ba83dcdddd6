"""Start the operator GUI: ``run_gui(config_path)`` (what `python main.py`
calls), or ``python -m gui.app --config FILE [--screenshot-tour DIR]``."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

from common.paths import default_config

DEFAULT_CONFIG = default_config()


def make_app(argv: Optional[list[str]] = None):
    import pyqtgraph as pg
    from PyQt5.QtWidgets import QApplication

    pg.setConfigOptions(imageAxisOrder="row-major", antialias=True, background="w", foreground="k")
    # The engine, writers and emulators are Python threads: with the default 5 ms
    # switch interval the GUI thread can wait that long for the GIL at every
    # wake-up, several times in a row under load. 1 ms keeps the window responsive.
    sys.setswitchinterval(0.001)
    app = QApplication.instance() or QApplication(argv or [sys.argv[0]])
    app.setApplicationName("GCIB-SEM acquisition")
    return app


def build_window(config_path: str | Path, connect: bool = True):
    """Session + main window (tests use this with the ``qtbot`` fixture)."""
    import autofocus
    from gui.main_window import MainWindow
    from gui.session import Session

    autofocus.register_methods()               # the plan builder lists and validates these methods
    session = Session(config_path)
    win = MainWindow(session)
    if connect:
        session.open_setup()
    return win


def run_gui(config_path: str | Path = DEFAULT_CONFIG, screenshot_tour: Optional[str | Path] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = make_app()
    win = build_window(config_path)
    win.resize(1600, 1000)
    win.show()
    from PyQt5.QtCore import QTimer
    QTimer.singleShot(300, win.default_dock_sizes)    # again once the window manager has placed it
    if screenshot_tour is not None:
        from gui.screenshot_tour import ScreenshotTour
        tour = ScreenshotTour(win, Path(screenshot_tour), on_done=app.quit)
        tour.start()
    code = app.exec_()
    win.shutdown()              # also when quit without closing the window: beams blanked, devices closed
    return code


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="GCIB-SEM acquisition GUI")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="setup YAML")
    ap.add_argument("--screenshot-tour", default=None, metavar="DIR",
                    help="walk through the wafer workflow on the simulator, save PNGs to DIR, quit")
    args = ap.parse_args(argv)
    return run_gui(args.config, args.screenshot_tour)


if __name__ == "__main__":
    sys.exit(main())
