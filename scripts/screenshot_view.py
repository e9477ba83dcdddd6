"""Screenshot of `python main.py view OUTDIR` (the real napari window) for
docs/screenshots/view.png. Needs a display: run it under Xvfb

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshot_view.py \\
        out/view_demo docs/screenshots/view.png [--tiles]

When OUTDIR does not exist, a demo run is made there first on the simulator
(configs/plans/demo_wafer.yaml with larger pixels, so the sections' volumes
are visible against the wafer, OME-TIFF + OME-Zarr writers only) and an
overview of the sections' area is saved beside it as OUTDIR/overview.ome.tif.
Re-runnable: an existing OUTDIR is shown as it is; the PNG is replaced.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def make_demo(outdir: Path) -> None:
    from acq.cli import run_plan
    plan = yaml.safe_load((ROOT / "configs/plans/demo_wafer.yaml").read_text())
    plan["setup"] = str(ROOT / "configs/sim.yaml")
    plan["output"] = {"writers": ["ome_tiff", "ome_zarr"], "queue_maxsize": 8}
    plan["autofocus"] = {"method": "none"}
    # 0.25 µm pixels, 3 x 2 frames of 512 x 384: ~370 x 180 µm of each 500 x 250 µm section
    plan["grid_template"].update(rows=2, cols=3, pixel_size_nm=250, frame_size=[512, 384], overlap_px=32)
    plan["cycles"] = 2
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "view_demo.yaml"
        path.write_text(yaml.safe_dump(plan))
        rc = run_plan(path, out=outdir)
    if rc != 0:
        raise SystemExit(f"demo run failed (exit {rc})")
    save_demo_overview(outdir)


def save_demo_overview(outdir: Path, margin_um: float = 400.0, pixel_um: float = 2.0) -> None:
    """The simulated wafer around the run's sections, as `wafer mosaic` would save it."""
    from acq.view_layers import section_specs
    from devices.factory import build_setup
    from devices.setup_config import load_setup
    from gui.wafer_tasks import acquire_overview
    from wafer.mosaic import save_overview
    boxes = [s.meta["content_um"] for s in section_specs(outdir) if s.meta.get("content_um")]
    ys = [c[0] for b in boxes for c in b]
    xs = [c[1] for b in boxes for c in b]
    region = (min(xs) - margin_um, min(ys) - margin_um, max(xs) + margin_um, max(ys) + margin_um)
    setup = build_setup(load_setup(ROOT / "configs/sim.yaml"))
    try:
        ov = acquire_overview(setup, region, pixel_um)
    finally:
        setup.close()
    save_overview(outdir / "overview.ome.tif", ov)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", type=Path)
    ap.add_argument("png", type=Path)
    ap.add_argument("--tiles", action="store_true", help="show the tiles too")
    args = ap.parse_args()
    if not os.environ.get("DISPLAY"):
        print("error: no display; run under xvfb-run (see the docstring)", file=sys.stderr)
        return 2
    if not args.outdir.exists():
        make_demo(args.outdir)

    from qtpy.QtWidgets import QApplication

    from gui.screenshot_tour import save_small
    from gui.view import open_viewer
    try:        # napari's PyQt5 deprecation notice would sit on the canvas (private flag; best effort)
        import napari._qt.qt_main_window as qmw
        qmw.SHOW_QT_WARNING = False
    except (ImportError, AttributeError):
        pass
    viewer = open_viewer(args.outdir, tiles=args.tiles, show=True)
    win = viewer.window._qt_window
    win.resize(1600, 1000)
    app = QApplication.instance()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3.0:     # layout, then the multiscale levels for this zoom
        app.processEvents()
        time.sleep(0.05)
    from gui.view import frame_view
    frame_view(viewer)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3.0:
        app.processEvents()
        time.sleep(0.05)
    args.png.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.png.with_name(f".{args.png.name}.part.png")
    save_small(win, tmp, max_bytes=600_000)
    os.replace(tmp, args.png)               # a screenshot is regenerated: replacing it is its nature
    print(f"saved {args.png}")
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
