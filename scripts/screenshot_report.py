"""Screenshot of a run report as a browser shows it: docs/screenshots/report.png.

Runs a tiny simulated acquisition (two sections, three cycles, sweep
autofocus, a few injected grab faults so retries, re-exposures and incidents
show), writes its report with ``acq.report.write_report`` and renders the
page in a real browser engine (Qt WebEngine) in a window, then grabs the
window. Development tool, not a requirement of the program:

    pip install PyQtWebEngine==5.15.7        # matches PyQt5 5.15.x
    xvfb-run -a python scripts/screenshot_report.py [--out PNG] [--run OUTDIR]

``--run OUTDIR`` reports on an existing run instead of making one.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]


def demo_run(tmp: Path, live_at: Optional[int]) -> Path:
    """A tiny simulated run with some faults and QC failures; the path of its
    report, written while the run is going (after ``live_at`` tiles, as an
    operator would look at it) or, with None, once it has finished."""
    import logging
    import autofocus
    from acq.cli import run_plan
    from acq.report import report_path, write_report
    from tests.support.engine_runs import write_plan, write_setup
    autofocus.register_methods()
    logging.basicConfig(level=logging.ERROR)          # the page lists the incidents; no log lines here
    rules = [{"device": "sem", "operation": "acquire_frame", "kind": "timeout", "at_calls": [2]},
             {"device": "sem", "operation": "acquire_frame", "kind": "incomplete_frame", "at_calls": [24, 25, 99]},
             {"device": "sem", "operation": "acquire_frame", "kind": "frozen_frame", "at_calls": [46, 150]}]
    setup = write_setup(tmp, faults=rules)
    # a strict focus threshold fails some tiles: QC re-acquisitions and incidents to show
    plan = write_plan(tmp, setup, autofocus={"method": "sweep", "sweep_range_um": 30}, cycles=4,
                      grid_template={"rows": 2, "cols": 2},
                      qc={"checks": {"min_focus": 19.5}, "policy": {"max_retries": 1}})
    out = tmp / "run"
    seen = []

    def watch(engine) -> None:
        def on_doc(doc) -> None:            # a subscriber thread: the run goes on meanwhile
            if doc.kind == "tile":
                seen.append(doc)
                if len(seen) == live_at:
                    write_report(out)
        if live_at:
            engine.subscribe(on_doc)
    run_plan(plan, out=out, max_exposures=10, stream=io.StringIO(), on_engine=watch)
    return report_path(out) if live_at else write_report(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots" / "report.png")
    ap.add_argument("--run", type=Path, default=None, help="report on this run folder (default: a demo run)")
    ap.add_argument("--size", default="1280x1700", help="window size WxH")
    ap.add_argument("--live-at", type=int, default=20, help="demo run: write the report after this many tiles "
                    "(of 32), while the run goes on; 0 = once it has finished")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))           # tests.support for the demo run (a script, not the package)
    from acq.report import write_report
    with tempfile.TemporaryDirectory(prefix="report_demo_") as tmp:
        page = write_report(args.run) if args.run else demo_run(Path(tmp), args.live_at or None)
        return grab(page, args.out, tuple(int(v) for v in args.size.split("x")))


def grab(page: Path, png: Path, size: tuple[int, int]) -> int:
    if hasattr(os, "geteuid") and os.geteuid() == 0:     # Chromium refuses its sandbox as root (containers)
        os.environ.setdefault("QTWEBENGINE_DISABLE_SANDBOX", "1")
    from PyQt5.QtCore import QTimer, QUrl
    from PyQt5.QtWebEngineWidgets import QWebEngineView
    from PyQt5.QtWidgets import QApplication
    app = QApplication.instance() or QApplication(["report-screenshot"])
    view = QWebEngineView()
    view.resize(*size)
    result = {"rc": 1}

    def loaded(ok: bool) -> None:
        if not ok:
            print(f"error: the browser could not load {page}", file=sys.stderr)
            app.quit()
            return
        QTimer.singleShot(1500, shoot)          # let it lay out and paint

    def shoot() -> None:
        png.parent.mkdir(parents=True, exist_ok=True)
        if view.grab().save(str(png)):
            print(png)
            result["rc"] = 0
        app.quit()
    view.loadFinished.connect(loaded)
    view.load(QUrl.fromLocalFile(str(page)))
    view.show()
    QTimer.singleShot(60000, app.quit)          # never hang a headless session
    app.exec_()
    return result["rc"]


if __name__ == "__main__":
    raise SystemExit(main())
