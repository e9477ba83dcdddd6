"""The stage map (viewport): wafer, overview, sections, grids and tiles,
stage position and field of view, mill position, planned path.

Wheel zooms smoothly about the cursor, dragging empty space pans; click
selects a grid or section, dragging it moves it, its corner handle resizes
it (grids by whole tiles) and its round handle rotates it; every edit is one
undo step. Double-click (or the context menu) moves the stage there after a
confirmation. Drawing is gui/stage_map_items.py."""
from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Callable

import numpy as np
from PyQt5.QtCore import QEasingCurve, QPointF, QRectF, Qt, QVariantAnimation, pyqtSignal
from PyQt5.QtGui import QColor, QPainter, QPen, QPolygonF
from PyQt5.QtWidgets import QMenu, QMessageBox, QSizePolicy, QWidget

from common.geometry import rotation
from gui import wafer_commands as cmd
from gui.stage_map_items import MapRenderer, View
from gui.wafer_model import GridSpec, WaferLayout

HANDLE_PX = 9
ROTATE_OFFSET_PX = 26
FORBID_RADIUS_UM = 10.0          # a vessel or fold; mark several for a larger area
MIN_SCALE, MAX_SCALE = 1e-4, 200.0          # px per µm: 100 mm on 10 px ... 1 µm on 200 px


class StageMap(QWidget):
    move_requested = pyqtSignal(float, float)    # stage µm, confirmed
    message = pyqtSignal(str, str)               # text, level
    cursor_moved = pyqtSignal(float, float)

    def __init__(self, layout: WaferLayout, parent=None):
        super().__init__(parent)
        self.layout_model = layout
        self.renderer = MapRenderer(layout)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Expanding)
        self.setMinimumSize(320, 240)
        self.setMouseTracking(True)
        self.setFocusPolicy(Qt.StrongFocus)
        self._center, self._scale = (0.0, 0.0), 0.02
        self._drag = None
        self.mode = "select"                     # select | add_grid | add_section
        self.grid_template = GridSpec(-1, 0, (0.0, 0.0), rows=2, cols=2, overlap_px=77)
        self.confirm_move: Callable[[float, float], bool] = self._ask_move
        self.last_paint_ms = 0.0
        self.last_stats: dict = {}
        self._anim = QVariantAnimation(self)
        self._anim.setDuration(140)
        self._anim.setEasingCurve(QEasingCurve.OutCubic)
        self._anim.valueChanged.connect(self._animate)
        self._anim_fn = None
        layout.changed.connect(self._on_layout_changed)     # bound: disconnected with the widget

    def _on_layout_changed(self, _what: str) -> None:
        self.update()

    # ------------------------------------------------------------ view
    def view(self) -> View:
        return View(self._center, self._scale, self.width(), self.height())

    def set_view(self, center, scale: float) -> None:
        self._anim.stop()
        self._center, self._scale = (float(center[0]), float(center[1])), float(np.clip(scale, MIN_SCALE, MAX_SCALE))
        self.update()

    def _animate(self, t) -> None:
        if self._anim_fn is not None:
            c, s = self._anim_fn(float(t))
            self._center, self._scale = c, s
            self.update()

    def _go(self, center, scale: float, animate: bool) -> None:
        scale = float(np.clip(scale, MIN_SCALE, MAX_SCALE))
        if not animate:
            self.set_view(center, scale)
            return
        c0, l0, l1 = self._center, math.log(self._scale), math.log(scale)
        self._anim_fn = lambda t: ((c0[0] + (center[0] - c0[0]) * t, c0[1] + (center[1] - c0[1]) * t),
                                   math.exp(l0 + (l1 - l0) * t))
        self._anim.stop()
        self._anim.setStartValue(0.0)
        self._anim.setEndValue(1.0)
        self._anim.start()

    def zoom_at(self, factor: float, anchor: QPointF, animate: bool = True) -> None:
        """Zoom keeping the world point under ``anchor`` (screen) in place."""
        start = self._anim_fn(1.0)[1] if self._anim.state() == QVariantAnimation.Running and self._anim_fn else self._scale
        target = float(np.clip(start * factor, MIN_SCALE, MAX_SCALE))
        wx, wy = self.view().to_world(anchor.x(), anchor.y())
        ax, ay = anchor.x() - self.width() / 2, anchor.y() - self.height() / 2
        l0, l1 = math.log(self._scale), math.log(target)

        def fn(t):
            s = math.exp(l0 + (l1 - l0) * t)
            return (wx - ax / s, wy - ay / s), s
        self._anim_fn = fn
        if not animate:
            self._center, self._scale = fn(1.0)
            self.update()
            return
        self._anim.stop()
        self._anim.setStartValue(0.0)
        self._anim.setEndValue(1.0)
        self._anim.start()

    def zoom_to_rect(self, x0: float, y0: float, x1: float, y1: float, animate: bool = True, margin: float = 1.1):
        w, h = max(x1 - x0, 1e-3), max(y1 - y0, 1e-3)
        scale = min(max(self.width(), 1) / (w * margin), max(self.height(), 1) / (h * margin))
        self._go(((x0 + x1) / 2, (y0 + y1) / 2), scale, animate)

    def fit_wafer(self, animate: bool = True) -> None:
        r = self.renderer.wafer_radius_um
        if r:
            self.zoom_to_rect(-r, -r, r, r, animate, margin=1.05)
        elif self.layout_model.sections:
            b = np.array([s.polygon_um for s in self.layout_model.sections.values()], dtype=object)
            pts = np.vstack(list(b))
            self.zoom_to_rect(*pts.min(0), *pts.max(0), animate)

    def zoom_to_tile(self, key=None, index: int = 0, animate: bool = True) -> bool:
        lay = self.layout_model
        if key is None:
            sel = lay.selection
            key = sel[1] if sel and sel[0] == "grid" else next(iter(lay.grids), None)
        if key not in lay.grids:
            return False
        corners = lay.grids[key].tile_corners_um()[index]
        self.zoom_to_rect(*corners.min(0), *corners.max(0), animate, margin=1.6)
        return True

    # ------------------------------------------------------------ paint
    def paintEvent(self, _ev) -> None:
        t0 = time.perf_counter()
        p = QPainter(self)
        view = self.view()
        self.last_stats = self.renderer.paint(p, view)
        self._draw_handles(p, view)
        self.renderer.scale_bar(p, view)
        p.end()
        self.last_paint_ms = (time.perf_counter() - t0) * 1e3

    def _handles(self, view: View):
        """Screen positions of (resize, rotate) handles of the selection."""
        lay = self.layout_model
        sel = lay.selection
        if not sel or not lay.editable:
            return None
        if sel[0] == "grid" and sel[1] in lay.grids:
            g = lay.grids[sel[1]]
            (w, h), c, a = g.extent_um(), g.center_um, g.rotation_deg
        elif sel[0] == "section" and sel[1] in lay.sections:
            s = lay.sections[sel[1]]
            (w, h), c, a = s.size_um, s.center_um, s.angle_deg
        else:
            return None
        r = rotation(a)
        corner = r @ (w / 2, h / 2) + c
        top = r @ (0, -h / 2) + c
        up = r @ (0, -1.0)
        resize = view.to_screen(*corner)
        t = view.to_screen(*top)
        rotate = QPointF(t.x() + up[0] * ROTATE_OFFSET_PX, t.y() + up[1] * ROTATE_OFFSET_PX)
        return resize, rotate, t

    def _draw_handles(self, p: QPainter, view: View) -> None:
        h = self._handles(view)
        if h is None:
            return
        resize, rotate, top = h
        p.setPen(QPen(QColor(255, 255, 255), 1.5))
        p.drawLine(top, rotate)
        p.setBrush(QColor(255, 255, 255))
        p.drawRect(QRectF(resize.x() - HANDLE_PX / 2, resize.y() - HANDLE_PX / 2, HANDLE_PX, HANDLE_PX))
        p.setBrush(QColor(255, 200, 0))
        p.drawEllipse(rotate, HANDLE_PX / 2 + 1, HANDLE_PX / 2 + 1)

    # ------------------------------------------------------------ hit tests
    def grid_at(self, x: float, y: float):
        for key, g in reversed(list(self.layout_model.grids.items())):
            w, h = g.extent_um()
            lx, ly = g.geometry.to_local((x, y))
            if abs(lx) <= w / 2 and abs(ly) <= h / 2:
                return key
        return None

    def section_at(self, x: float, y: float):
        pt = QPointF(x, y)
        for sid, s in reversed(list(self.layout_model.sections.items())):
            lo, hi = s.polygon_um.min(0), s.polygon_um.max(0)
            if lo[0] <= x <= hi[0] and lo[1] <= y <= hi[1]:
                if QPolygonF([QPointF(*map(float, q)) for q in s.polygon_um]).containsPoint(pt, Qt.OddEvenFill) or \
                        QPolygonF([QPointF(*map(float, q)) for q in s.rectangle()]).containsPoint(pt, Qt.OddEvenFill):
                    return sid
        return None

    # ------------------------------------------------------------ mouse
    def wheelEvent(self, ev) -> None:
        steps = ev.angleDelta().y() / 120.0
        if steps:
            self.zoom_at(2 ** (steps / 2), QPointF(ev.pos()))

    def mousePressEvent(self, ev) -> None:
        self.setFocus()
        view = self.view()
        wx, wy = view.to_world(ev.x(), ev.y())
        lay = self.layout_model
        if ev.button() in (Qt.MiddleButton, Qt.RightButton):
            self._drag = ("pan", ev.pos(), self._center, ev.button())
            return
        if ev.button() != Qt.LeftButton:
            return
        if self.mode != "select":
            self._add_at(wx, wy)
            return
        h = self._handles(view)
        if h is not None:
            for kind, hp in (("resize", h[0]), ("rotate", h[1])):
                if abs(hp.x() - ev.x()) <= HANDLE_PX and abs(hp.y() - ev.y()) <= HANDLE_PX:
                    self._drag = (kind, lay.selection, self._item(lay.selection), (wx, wy))
                    return
        key = self.grid_at(wx, wy)
        sel = ("grid", key) if key is not None else None
        if sel is None:
            sid = self.section_at(wx, wy)
            sel = ("section", sid) if sid is not None else None
        lay.select(sel)
        if sel is not None and lay.editable:
            self._drag = ("move", sel, self._item(sel), (wx, wy))
        else:
            self._drag = ("pan", ev.pos(), self._center, Qt.LeftButton)

    def _item(self, sel):
        lay = self.layout_model
        return lay.grids.get(sel[1]) if sel[0] == "grid" else lay.sections.get(sel[1])

    def mouseMoveEvent(self, ev) -> None:
        view = self.view()
        wx, wy = view.to_world(ev.x(), ev.y())
        self.cursor_moved.emit(wx, wy)
        d = self._drag
        if d is None:
            return
        if d[0] == "pan":
            dx, dy = ev.x() - d[1].x(), ev.y() - d[1].y()
            self._center = (d[2][0] - dx / self._scale, d[2][1] - dy / self._scale)
            self.update()
            return
        kind, sel, orig, (px, py) = d
        new = self._edited(kind, sel, orig, wx, wy, px, py)
        if new is not None:
            (self.layout_model.preview_grid if sel[0] == "grid" else self.layout_model.preview_section)(new)

    def _edited(self, kind, sel, orig, wx, wy, px, py):
        if orig is None:
            return None
        is_grid = sel[0] == "grid"
        if kind == "move":
            dx, dy = wx - px, wy - py
            if is_grid:
                return replace(orig, center_um=(orig.center_um[0] + dx, orig.center_um[1] + dy))
            return orig.moved(dx, dy)
        c = np.asarray(orig.center_um)
        if kind == "rotate":
            ang = math.degrees(math.atan2(wy - c[1], wx - c[0])) + 90.0
            ang = round(((ang + 180.0) % 360.0) - 180.0, 1)
            return replace(orig, rotation_deg=ang) if is_grid else orig.rotated(ang)
        # resize: the opposite corner stays where it is
        a = orig.rotation_deg if is_grid else orig.angle_deg
        w, h = orig.extent_um() if is_grid else orig.size_um
        r = rotation(a)
        fixed = r @ (-w / 2, -h / 2) + c
        ex, ey = r.T @ (wx - fixed[0], wy - fixed[1])
        if is_grid:
            (tw, th), (sx, sy) = orig.tile_size_um(), orig.step_um()
            cols = int(np.clip(round((ex - tw) / sx) + 1, 1, 1000))
            rows = int(np.clip(round((ey - th) / sy) + 1, 1, 1000))
            g = replace(orig, rows=rows, cols=cols)
            nw, nh = g.extent_um()
            return replace(g, center_um=tuple(fixed + r @ (nw / 2, nh / 2)))
        nw, nh = max(ex, 5.0), max(ey, 5.0)
        return orig.resized((nw, nh), tuple(fixed + r @ (nw / 2, nh / 2)))

    def mouseReleaseEvent(self, ev) -> None:
        d, self._drag = self._drag, None
        if d is None:
            return
        if d[0] == "pan":
            if d[3] == Qt.RightButton and (ev.pos() - d[1]).manhattanLength() < 4:
                self._context_menu(ev.pos())
            return
        kind, sel, orig, _ = d
        lay = self.layout_model
        now = self._item(sel)
        if now is None or orig is None or now is orig:
            return
        what = {"move": "move", "rotate": "rotate", "resize": "resize"}[kind]
        if sel[0] == "grid":
            cmd.push(lay, f"{what} grid {sel[1][1]} of section {sel[1][0]}", grids={sel[1]: now},
                     grids_before={sel[1]: orig})
        else:
            cmd.push(lay, f"{what} section {sel[1]}", sections={sel[1]: now}, sections_before={sel[1]: orig})

    def mouseDoubleClickEvent(self, ev) -> None:
        if ev.button() == Qt.LeftButton:
            self.request_move(*self.view().to_world(ev.x(), ev.y()))

    def request_move(self, x_um: float, y_um: float) -> bool:
        if self.confirm_move(x_um, y_um):
            self.move_requested.emit(x_um, y_um)
            return True
        return False

    def _ask_move(self, x: float, y: float) -> bool:
        return QMessageBox.question(self, "Move stage", f"Move the stage to\nx = {x / 1e3:.4f} mm, "
                                    f"y = {y / 1e3:.4f} mm?") == QMessageBox.Yes

    # ------------------------------------------------------------ editing
    def _add_at(self, wx: float, wy: float) -> None:
        lay = self.layout_model
        mode, self.mode = self.mode, "select"
        if not lay.editable:
            self.message.emit("the layout is locked while a run uses it", "warning")
            return
        if mode == "add_section":
            sid = cmd.add_section(lay, (wx, wy))
            lay.select(("section", sid))
            return
        sid = self.section_at(wx, wy)
        if sid is None:
            self.message.emit("a grid belongs to a section: click inside a section to add one", "warning")
            return
        gid = lay.next_grid_id(sid)
        if gid > 99:
            self.message.emit(f"section {sid} already has 100 grids", "warning")
            return
        spec = replace(self.grid_template, section_id=sid, id=gid, center_um=(wx, wy),
                       rotation_deg=lay.sections[sid].angle_deg)
        lay.select(("grid", cmd.add_grid(lay, spec)))

    def delete_selected(self) -> bool:
        lay = self.layout_model
        sel = lay.selection
        if sel is None:
            return False
        ok = cmd.delete_grid(lay, sel[1]) if sel[0] == "grid" else cmd.delete_section(lay, sel[1])
        if not ok:
            self.message.emit("the layout is locked while a run uses it", "warning")
        return ok

    def split_selected(self, axis: str) -> bool:
        """Cut the selected grid in two (its tiles stay exactly where they were)."""
        from gui.wafer_tasks import split_grid
        lay = self.layout_model
        key = lay.selection[1]
        g = lay.grids[key]
        try:
            a, b = split_grid(g, axis, lay.next_grid_id(key[0]))
        except (ImportError, ValueError) as e:
            self.message.emit(f"split: {e}", "warning")
            return False
        return cmd.push(lay, f"split grid {key[1]} of section {key[0]}", grids={a.key: a, b.key: b})

    def merge_with_selected(self, other) -> bool:
        from gui.wafer_tasks import merge_grids
        lay = self.layout_model
        key = lay.selection[1]
        try:
            m = merge_grids(lay.grids[key], lay.grids[other])
        except (ImportError, ValueError) as e:
            self.message.emit(f"merge: {e}", "warning")
            return False
        return cmd.push(lay, f"merge grids {key[1]} and {other[1]} of section {key[0]}", grids={key: m, other: None})

    def keyPressEvent(self, ev) -> None:
        k = ev.key()
        if k in (Qt.Key_Delete, Qt.Key_Backspace):
            self.delete_selected()
        elif k == Qt.Key_Escape:
            self.mode = "select"
            self.layout_model.select(None)
        elif k == Qt.Key_F:
            self.fit_wafer()
        elif k in (Qt.Key_Plus, Qt.Key_Equal):
            self.zoom_at(2.0, QPointF(self.width() / 2, self.height() / 2))
        elif k == Qt.Key_Minus:
            self.zoom_at(0.5, QPointF(self.width() / 2, self.height() / 2))
        else:
            super().keyPressEvent(ev)

    def _context_menu(self, pos) -> None:
        wx, wy = self.view().to_world(pos.x(), pos.y())
        m = QMenu(self)
        m.addAction("Move stage here …", lambda: self.request_move(wx, wy))
        m.addSeparator()
        add_grid = m.addAction("Add grid here", lambda: (setattr(self, "mode", "add_grid"), self._add_at(wx, wy)))
        add_sec = m.addAction("Add section here", lambda: (setattr(self, "mode", "add_section"), self._add_at(wx, wy)))
        delete = m.addAction("Delete selected", self.delete_selected)
        lay = self.layout_model
        sel = lay.selection
        grid_sel = sel is not None and sel[0] == "grid" and sel[1] in lay.grids
        under = self.grid_at(wx, wy)
        split_r = m.addAction("Split grid into rows", lambda: self.split_selected("rows"))
        split_c = m.addAction("Split grid into columns", lambda: self.split_selected("cols"))
        merge = m.addAction("Merge this grid with the selected one", lambda: self.merge_with_selected(under))
        for a in (add_grid, add_sec, delete, split_r, split_c, merge):
            a.setEnabled(lay.editable)
        delete.setEnabled(delete.isEnabled() and sel is not None)
        for a in (split_r, split_c):
            a.setEnabled(a.isEnabled() and grid_sel)
        merge.setEnabled(merge.isEnabled() and grid_sel and under is not None and under != sel[1]
                         and under[0] == sel[1][0])
        m.addSeparator()
        af_pin = m.addAction(f"Pin autofocus here (section {under[0]})" if under is not None else
                             "Pin autofocus here (inside a grid)", lambda: lay.pin_autofocus(under[0], wx, wy))
        af_pin.setEnabled(lay.editable and under is not None)
        af_no = m.addAction(f"Forbid autofocus within {FORBID_RADIUS_UM:g} µm of here",
                            lambda: lay.forbid_autofocus(wx, wy, FORBID_RADIUS_UM))
        af_no.setEnabled(lay.editable)
        m.addAction("Clear autofocus marks here", lambda: lay.clear_autofocus_marks(
            wx, wy, 12.0 / self.view().scale))
        m.addSeparator()
        m.addAction("Zoom to tile", lambda: self.zoom_to_tile())
        m.addAction("Fit wafer", self.fit_wafer)
        m.popup(self.mapToGlobal(pos))
