"""Paint time of the stage map (gui/stage_map.py) with 500 sections x 25 tiles.

    QT_QPA_PLATFORM=offscreen python benchmarks/viewport.py [--sections 500] [--frames 30]

Renders the real widget into a QImage repeatedly at full zoom-out, where tile
states first show as fills, at section zoom and at tile zoom, and prints the median (and worst) ms per frame next to
the target of 30 ms. "changing" rows change tile states between frames, as
during an acquisition, so the cached batches are rebuilt every frame.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np

TARGET_MS = 30.0


def synthetic_layout(layout, n_sections: int = 500, rows: int = 5, cols: int = 5, wafer_radius_um: float = 12700,
                     seed: int = 0):
    """Fill ``layout`` with n sections (irregular 64-point outlines, like the
    simulator's) on a jittered lattice inside the wafer, one rows x cols grid
    each, and tile states of every kind."""
    from common.geometry import Section, rotation
    from gui.wafer_model import GridSpec

    rng = np.random.default_rng(seed)
    pitch = math.sqrt(math.pi * (0.92 * wafer_radius_um) ** 2 / n_sections / 1.6)
    px, py = pitch * 1.25, pitch / 1.25
    pts = [(x, y) for y in np.arange(-wafer_radius_um, wafer_radius_um, py)
           for x in np.arange(-wafer_radius_um, wafer_radius_um, px)
           if math.hypot(abs(x) + px / 2, abs(y) + py / 2) < 0.97 * wafer_radius_um]
    if len(pts) < n_sections:
        raise ValueError(f"only {len(pts)} sections fit")
    pts = sorted(pts, key=lambda p: math.hypot(*p))[:n_sections]
    t = np.linspace(0, 2 * math.pi, 65)[:-1]
    for sid, (x, y) in enumerate(pts):
        w, h = 0.55 * px, 0.55 * py
        ang = float(rng.uniform(-8, 8))
        wob = 1 - 0.06 * rng.random(64)
        local = np.stack([np.sign(np.cos(t)) * np.abs(np.cos(t)) ** 0.4 * w / 2,
                          np.sign(np.sin(t)) * np.abs(np.sin(t)) ** 0.4 * h / 2], 1) * wob[:, None]
        poly = local @ rotation(ang).T + (x, y)
        layout.sections[sid] = Section(sid, (float(x), float(y)), (w, h), ang, poly)
        layout.order.append(sid)
        g = GridSpec(sid, 0, (float(x), float(y)), ang, rows, cols, pixel_size_nm=10.0, frame_size=(1024, 768),
                     overlap_px=77)
        layout.put_grid(g.key, g)
        layout.tile_state[g.key][:] = rng.integers(0, 5, g.n_tiles)
    # imaging order: serpentine rows, like an optimised tour (short stage moves)
    rows_y = sorted({round(s.center_um[1], 3) for s in layout.sections.values()})
    order = []
    for i, y in enumerate(rows_y):
        row = sorted((s for s in layout.sections.values() if round(s.center_um[1], 3) == y), key=lambda s: s.center_um[0])
        order += [s.id for s in (row if i % 2 == 0 else row[::-1])]
    layout.order[:] = order
    for k in ("sections", "grids", "tiles", "order"):
        layout.touch(k)
    return layout


def frames_ms(widget, image, n: int, mutate=None) -> list[float]:
    from PyQt5.QtGui import QPainter
    out = []
    for i in range(n):
        if mutate:
            mutate(i)
        t0 = time.perf_counter()
        p = QPainter(image)
        widget.render(p)
        p.end()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", type=int, default=500)
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--size", type=int, nargs=2, default=(1280, 900))
    args = ap.parse_args()

    from PyQt5.QtGui import QImage
    from PyQt5.QtWidgets import QApplication

    from gui.stage_map import StageMap
    from gui.wafer_model import ACQUIRED, WaferLayout

    app = QApplication.instance() or QApplication([])
    layout = WaferLayout()
    synthetic_layout(layout, args.sections)
    m = StageMap(layout)
    m.renderer.wafer_radius_um = 12700
    m.resize(*args.size)
    image = QImage(*args.size, QImage.Format_ARGB32_Premultiplied)
    keys = list(layout.grids)
    rng = np.random.default_rng(1)

    def changing(i):
        k = keys[int(rng.integers(len(keys)))]
        layout.set_tile_state(k, int(rng.integers(25)), ACQUIRED)

    sections = list(layout.sections.values())

    def dragging(i):                     # one section follows the mouse: its caches rebuild, not all 500
        layout.preview_section(sections[0].moved(1.0 + i, 0.0))

    rows = []
    for name, setup in (("full zoom-out", lambda: m.fit_wafer(animate=False)),
                        ("tile fills", lambda: m.zoom_to_rect(-2600, -1800, 2600, 1800, animate=False)),
                        ("section zoom", lambda: m.zoom_to_rect(-1500, -1000, 1500, 1000, animate=False)),
                        ("tile zoom", lambda: m.zoom_to_tile(keys[0], 12, animate=False))):
        setup()
        cold = frames_ms(m, image, 1)[0]
        warm = frames_ms(m, image, args.frames)
        live = frames_ms(m, image, args.frames, changing)
        drag = frames_ms(m, image, args.frames, dragging)
        rows.append((name, cold, warm, live, drag, dict(m.last_stats) if m.last_stats else {}))
        app.processEvents()
    print(f"stage map paint, {args.sections} sections x 25 tiles, {args.size[0]}x{args.size[1]} px, "
          f"median of {args.frames} frames (target < {TARGET_MS:g} ms per frame)")
    print(f"{'view':>14s} {'first ms':>9s} {'median ms':>10s} {'worst ms':>9s} {'tiles changing':>15s} "
          f"{'dragging':>9s}  {'drawn (sections/grids/tiles)':>28s}  verdict")
    ok = True
    for name, cold, warm, live, drag, stats in rows:
        med, worst = statistics.median(warm), max(warm)
        med_live, med_drag = statistics.median(live), statistics.median(drag)
        good = max(med, med_live, med_drag) < TARGET_MS
        ok &= good
        drawn = f"{stats.get('sections', 0)} / {stats.get('grids', 0)} / {stats.get('tiles', 0)}"
        print(f"{name:>14s} {cold:9.1f} {med:10.1f} {worst:9.1f} {med_live:15.1f} {med_drag:9.1f}  {drawn:>28s}  "
              f"{'OK' if good else 'SLOW'}")
    print("first = the first frame after the layout was built (caches cold); median/worst = unchanged layout; "
          "tiles changing = one tile state per frame, as during a run; dragging = one section moved per frame")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
