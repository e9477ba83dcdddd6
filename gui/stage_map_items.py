"""Drawing the stage map: a renderer that keeps world-space geometry in
caches (rebuilt only when the layout's revision changes) and draws with
level of detail: whole sections and grid outlines when zoomed out, tiles
coloured by state only where they are at least a few pixels wide, and only
the ones in view. Everything is batched into a few QPainterPaths."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np
from PyQt5.QtCore import QPointF, QRectF, Qt
from PyQt5.QtGui import QColor, QFont, QImage, QPainter, QPainterPath, QPen, QPolygonF, QStaticText, \
    QTransform

try:
    from pyqtgraph.functions import create_qpolygonf, ndarray_from_qpolygonf
except ImportError:                       # older pyqtgraph: build the polygons point by point
    create_qpolygonf = ndarray_from_qpolygonf = None

from gui.wafer_model import ACQUIRED, ACQUIRING, FAILED, PLANNED, REACQUIRED, WaferLayout

STATE_COLORS = {PLANNED: QColor(80, 160, 255, 70), ACQUIRING: QColor(255, 215, 0, 200),
                ACQUIRED: QColor(40, 190, 80, 150), FAILED: QColor(230, 40, 40, 190),
                REACQUIRED: QColor(250, 140, 0, 170)}
TILE_MIN_PX = 6.0           # tiles at least this wide on screen are drawn with outlines
TILE_FILL_PX = 1.5          # down to this width their state is still drawn (fill only); below, per grid
FINE_OUTLINE_PX = 40.0      # sections larger than this on screen get their real outline
LABEL_MIN_PX = 22.0
CHUNK = 32                  # sections per batched outline path
MAX_LABELS = 300


@dataclass
class View:
    center: tuple[float, float]        # µm at the widget centre
    scale: float                       # px per µm
    width: int
    height: int

    @property
    def transform(self) -> QTransform:
        s = self.scale
        return QTransform(s, 0, 0, s, self.width / 2 - self.center[0] * s, self.height / 2 - self.center[1] * s)

    def to_screen(self, x: float, y: float) -> QPointF:
        return QPointF((x - self.center[0]) * self.scale + self.width / 2,
                       (y - self.center[1]) * self.scale + self.height / 2)

    def to_world(self, sx: float, sy: float) -> tuple[float, float]:
        return ((sx - self.width / 2) / self.scale + self.center[0], (sy - self.height / 2) / self.scale + self.center[1])

    def world_box(self) -> tuple[float, float, float, float]:
        hw, hh = self.width / 2 / self.scale, self.height / 2 / self.scale
        return self.center[0] - hw, self.center[1] - hh, self.center[0] + hw, self.center[1] + hh


def _poly(points: np.ndarray) -> QPolygonF:
    """A QPolygonF filled through numpy (one QPointF per vertex from Python is
    the slowest part of rebuilding a few thousand vertices)."""
    pts = np.asarray(points, float).reshape(-1, 2)
    if create_qpolygonf is None:
        return QPolygonF([QPointF(float(x), float(y)) for x, y in pts])
    poly = create_qpolygonf(len(pts))
    ndarray_from_qpolygonf(poly)[:] = pts
    return poly


def _visible(bboxes: np.ndarray, box) -> np.ndarray:
    if len(bboxes) == 0:
        return np.zeros(0, int)
    x0, y0, x1, y1 = box
    return np.flatnonzero((bboxes[:, 0] <= x1) & (bboxes[:, 2] >= x0) & (bboxes[:, 1] <= y1) & (bboxes[:, 3] >= y0))


def _rect_path(corners: np.ndarray) -> QPainterPath:
    """One path of many quadrilaterals ((n, 4, 2) corners)."""
    path = QPainterPath()
    for q in corners:
        path.addPolygon(QPolygonF([QPointF(float(q[0, 0]), float(q[0, 1])), QPointF(float(q[1, 0]), float(q[1, 1])),
                                   QPointF(float(q[2, 0]), float(q[2, 1])), QPointF(float(q[3, 0]), float(q[3, 1]))]))
        path.closeSubpath()
    return path


class OverviewPyramid:
    """The overview image at halving resolutions, as QImages: the map draws the
    level whose pixels are about one screen pixel, never a 40-MP image scaled."""

    def __init__(self, ov):
        self.ov = ov
        self.levels: list[QImage] = []
        img = np.ascontiguousarray(ov.image)
        while True:
            h, w = img.shape
            q = QImage(img.data, w, h, img.strides[0], QImage.Format_Grayscale8).copy()
            self.levels.append(q)
            if max(h, w) <= 512:
                break
            img = cv2.resize(img, (max(1, w // 2), max(1, h // 2)), interpolation=cv2.INTER_AREA)

    def draw(self, p: QPainter, view: View) -> None:
        ov = self.ov
        px_on_screen = ov.pixel_um * view.scale
        k = 0 if px_on_screen >= 1 else min(len(self.levels) - 1, int(math.floor(math.log2(1 / px_on_screen))))
        img = self.levels[k]
        x0, y0, w_um, h_um = ov.rect_um()
        f_x, f_y = img.width() / w_um, img.height() / h_um          # level pixels per µm
        vx0, vy0, vx1, vy1 = view.world_box()
        sx0, sy0 = max(0.0, (vx0 - x0) * f_x), max(0.0, (vy0 - y0) * f_y)
        sx1, sy1 = min(img.width(), (vx1 - x0) * f_x), min(img.height(), (vy1 - y0) * f_y)
        if sx1 <= sx0 or sy1 <= sy0:
            return
        sx0, sy0, sx1, sy1 = math.floor(sx0), math.floor(sy0), math.ceil(sx1), math.ceil(sy1)
        src = QRectF(sx0, sy0, sx1 - sx0, sy1 - sy0)
        tl, br = view.to_screen(x0 + sx0 / f_x, y0 + sy0 / f_y), view.to_screen(x0 + sx1 / f_x, y0 + sy1 / f_y)
        p.drawImage(QRectF(tl, br), img, src)


class MapRenderer:
    def __init__(self, layout: WaferLayout):
        self.layout = layout
        self.layers = {"overview": True, "sections": True, "grids": True, "tiles": True, "path": True,
                       "labels": True}
        self.wafer_radius_um: Optional[float] = None
        self.travel_um: Optional[tuple[float, float, float, float]] = None     # x0, y0, x1, y1
        self.mill_um: Optional[tuple[float, float, float]] = None              # x, y, exclusion radius
        self.stage_um: Optional[tuple[float, float]] = None
        self.fov_um: Optional[tuple[float, float, float]] = None               # w, h, rotation deg
        self._sec_rev = self._grid_rev = self._path_key = self._ov_rev = -1
        self._grid_fill_key = None
        self._tile_cache: dict = {}
        self._codes: dict = {}
        self._fine_cache: dict = {}
        self._sec_geom: dict = {}
        self._codes_key = None
        self._path_pts = None
        self._labels: dict[int, QStaticText] = {}
        self._pyramid: Optional[OverviewPyramid] = None
        self.label_font = QFont()
        self.label_font.setPointSize(8)

    # ------------------------------------------------------------ caches
    def _sections(self) -> None:
        """Per-section geometry, recomputed only for sections that changed (a
        drag replaces one item per mouse move). Outlines are batched in chunks
        of CHUNK sections; an edit rebuilds only its chunk."""
        lay = self.layout
        if self._sec_rev == lay.rev["sections"]:
            return
        self._sec_rev = lay.rev["sections"]
        items = list(lay.sections.values())
        cache = self._sec_geom
        changed = set()
        for it in items:
            hit = cache.get(it.id)
            if hit is None or hit[0] is not it:
                cache[it.id] = (it, (*it.polygon_um.min(0), *it.polygon_um.max(0)), it.rectangle())
                changed.add(it.id)
        for sid in [k for k in cache if k not in lay.sections]:
            del cache[sid]
        ids = [it.id for it in items]
        if ids != getattr(self, "sec_ids", None):           # sections added or removed: new chunks
            self._chunks = [ids[i:i + CHUNK] for i in range(0, len(ids), CHUNK)]
            self._chunk_of = {sid: k for k, chunk in enumerate(self._chunks) for sid in chunk}
            self._chunk_paths = [None] * len(self._chunks)
        for sid in changed:
            k = self._chunk_of.get(sid)
            if k is not None:
                self._chunk_paths[k] = None
        for k, chunk in enumerate(self._chunks):
            if self._chunk_paths[k] is None:
                self._chunk_paths[k] = _rect_path(np.array([cache[sid][2] for sid in chunk]).reshape(-1, 4, 2))
        self.sec_items = items
        self.sec_ids = ids
        self.sec_centres = np.array([it.center_um for it in items], float).reshape(-1, 2)
        self.sec_bboxes = np.array([cache[sid][1] for sid in ids], float).reshape(-1, 4)
        self.sec_extent = (np.maximum(self.sec_bboxes[:, 2] - self.sec_bboxes[:, 0],
                                      self.sec_bboxes[:, 3] - self.sec_bboxes[:, 1]) if items else np.zeros(0))

    def _fine(self, item) -> QPolygonF:
        """Real outline, built on first use and kept while the item is unchanged
        (dragging one section must not rebuild 500 outlines)."""
        hit = self._fine_cache.get(item.id)
        if hit is None or hit[0] is not item:
            hit = (item, _poly(item.polygon_um))
            self._fine_cache[item.id] = hit
        return hit[1]

    def _grids(self) -> None:
        lay = self.layout
        if self._grid_rev == lay.rev["grids"]:
            return
        self._grid_rev = lay.rev["grids"]
        self.grid_keys = list(lay.grids)
        specs = [lay.grids[k] for k in self.grid_keys]
        self.grid_outlines = np.array([g.outline_um() for g in specs]).reshape(-1, 4, 2)
        self.grid_bboxes = np.concatenate([self.grid_outlines.min(1), self.grid_outlines.max(1)], 1) \
            if specs else np.zeros((0, 4))
        self.grid_tile_px = np.array([min(g.tile_size_um()) for g in specs])
        self.grid_outline_path = _rect_path(self.grid_outlines)
        self._grid_fill_key = None
        self._tile_cache = {k: v for k, v in self._tile_cache.items() if k in lay.grids}

    def _grid_code(self, key) -> int:
        """The colour of a whole grid: failed wins (a failure must be visible
        from afar), then acquiring, else the state of most tiles. Cached per
        grid by its tile revision."""
        lay = self.layout
        rev = lay.tile_rev.get(key, 0)
        hit = self._codes.get(key)
        if hit is not None and hit[0] == rev:
            return hit[1]
        st = lay.tile_state.get(key)
        if st is None or len(st) == 0:
            code = PLANNED
        else:
            counts = np.bincount(st, minlength=5)
            code = FAILED if counts[FAILED] else ACQUIRING if counts[ACQUIRING] else int(counts.argmax())
        self._codes[key] = (rev, code)
        return code

    def _grid_fills(self) -> list[tuple[QColor, QPainterPath]]:
        """Zoomed out: one path per grid colour; rebuilt only when a grid's colour changes."""
        tiles_key = (self._grid_rev, self.layout.rev["tiles"])
        if tiles_key != self._codes_key:        # colours can only change with the tiles or the grids
            self._codes_key = tiles_key
            self._codes_now = tuple(self._grid_code(k) for k in self.grid_keys)
        codes = self._codes_now
        key = (self._grid_rev, codes)
        if self._grid_fill_key == key:
            return self._grid_fill
        arr = np.array(codes, int)
        self._grid_fill = [(STATE_COLORS[int(c)], _rect_path(self.grid_outlines[arr == c])) for c in np.unique(arr)]
        self._grid_fill_key = key
        return self._grid_fill

    def _tiles_of(self, key) -> list[tuple[int, QPainterPath]]:
        lay = self.layout
        rev = lay.tile_rev.get(key, 0)
        hit = self._tile_cache.get(key)
        if hit is not None and hit[0] == rev and hit[1] is lay.grids[key]:
            return hit[2]
        spec = lay.grids[key]
        corners = spec.tile_corners_um()
        st = lay.tile_state.get(key, np.zeros(len(corners), np.int8))
        paths = [(int(s), _rect_path(corners[st == s])) for s in np.unique(st)]
        self._tile_cache[key] = (rev, spec, paths)
        return paths

    def _path_polygon(self) -> QPolygonF:
        lay = self.layout
        key = (lay.rev["order"], lay.rev["grids"], lay.rev["sections"])
        if key != self._path_key:
            self._path_key = key
            pts = lay.path_points_um()
            if self._path_pts is None or not np.array_equal(pts, self._path_pts):
                self._path_pts, self._path = pts, _poly(pts)
        return self._path

    # ------------------------------------------------------------ paint
    def paint(self, p: QPainter, view: View) -> dict:
        """Draw everything; returns counts (for tests and the benchmark)."""
        stats = {"sections": 0, "grids": 0, "tiles": 0, "labels": 0}
        p.fillRect(QRectF(0, 0, view.width, view.height), QColor(28, 30, 34))
        world = view.transform
        p.setTransform(world)
        cosmetic = QPen(QColor(150, 150, 150), 0)
        if self.wafer_radius_um:
            r = self.wafer_radius_um
            p.setPen(cosmetic)
            p.setBrush(QColor(58, 62, 70))
            p.drawEllipse(QPointF(0, 0), r, r)
        if self.travel_um:
            pen = QPen(QColor(120, 120, 140), 0, Qt.DashLine)
            p.setPen(pen)
            p.setBrush(Qt.NoBrush)
            x0, y0, x1, y1 = self.travel_um
            p.drawRect(QRectF(x0, y0, x1 - x0, y1 - y0))
        lay = self.layout
        if self.layers["overview"] and lay.overview is not None:
            if self._ov_rev != lay.rev["overview"] or self._pyramid is None:
                self._pyramid = OverviewPyramid(lay.overview)
                self._ov_rev = lay.rev["overview"]
            p.save()
            if self.wafer_radius_um:                 # the mosaic's corners are vacuum: show the disk only
                clip = QPainterPath()
                clip.addEllipse(QPointF(0, 0), self.wafer_radius_um, self.wafer_radius_um)
                p.setClipPath(clip)
            p.resetTransform()
            self._pyramid.draw(p, view)
            p.restore()
            p.setTransform(world)
        box = view.world_box()
        if self.layers["sections"] and lay.sections:
            self._sections()
            vis = _visible(self.sec_bboxes, box)
            stats["sections"] = len(vis)
            p.setPen(QPen(QColor(255, 170, 60), 0))
            p.setBrush(QColor(255, 170, 60, 40))
            if np.median(self.sec_extent) * view.scale >= FINE_OUTLINE_PX:
                for i in vis:
                    p.drawPolygon(self._fine(self.sec_items[i]))
            else:                                   # small on screen: the oriented rectangle is enough
                for path in self._chunk_paths:
                    p.drawPath(path)
        if self.layers["grids"] and lay.grids:
            self._grids()
            vis = _visible(self.grid_bboxes, box)
            stats["grids"] = len(vis)
            tile_px = self.grid_tile_px[vis] * view.scale
            tiles_on = self.layers["tiles"]
            detailed = vis[tile_px >= TILE_MIN_PX] if tiles_on else vis[:0]
            filled = vis[(tile_px >= TILE_FILL_PX) & (tile_px < TILE_MIN_PX)] if tiles_on else vis[:0]
            p.setPen(Qt.NoPen)
            if len(detailed) < len(vis):
                for color, path in self._grid_fills():
                    p.setBrush(color)
                    p.drawPath(path)
            for i in filled:                       # a few px per tile: progress as fills, no outlines
                for state, path in self._tiles_of(self.grid_keys[i]):
                    if state != PLANNED:
                        p.setBrush(STATE_COLORS[state])
                        p.drawPath(path)
                stats["tiles"] += lay.grids[self.grid_keys[i]].n_tiles
            tile_pen = QPen(QColor(200, 220, 255, 160), 0)
            for i in detailed:
                for state, path in self._tiles_of(self.grid_keys[i]):
                    p.setPen(tile_pen)
                    p.setBrush(STATE_COLORS[state])
                    p.drawPath(path)
                stats["tiles"] += lay.grids[self.grid_keys[i]].n_tiles
            p.setPen(QPen(QColor(120, 190, 255), 0))
            p.setBrush(Qt.NoBrush)
            if len(vis) > 200:
                p.drawPath(self.grid_outline_path)
            else:
                for i in vis:
                    p.drawPolygon(_poly(self.grid_outlines[i]))
        if self.layers["path"] and len(lay.order) > 1:
            self._path_polygon()
            # in device pixels: Qt strokes a transformed cosmetic polyline several times slower
            s, (cx, cy) = view.scale, view.center
            pts = (self._path_pts - (cx, cy)) * s + (view.width / 2, view.height / 2)
            p.resetTransform()
            p.setPen(QPen(QColor(190, 190, 190), 1))
            p.drawPolyline(_poly(np.clip(pts, -1e6, 1e6)))
            p.setTransform(world)
        self._draw_markers(p, view)
        p.resetTransform()
        if self.layers["labels"] and lay.sections:
            stats["labels"] = self._draw_labels(p, view, box)
        return stats

    def _draw_markers(self, p: QPainter, view: View) -> None:
        if self.mill_um:
            x, y, r = self.mill_um
            p.setPen(QPen(QColor(230, 60, 230), 0, Qt.DashLine))
            p.setBrush(QColor(230, 60, 230, 30))
            p.drawEllipse(QPointF(x, y), r, r)
        if self.stage_um and self.fov_um:
            w, h, deg = self.fov_um
            p.save()
            p.translate(*self.stage_um)
            p.rotate(deg)
            p.setPen(QPen(QColor(0, 255, 255), 0))
            p.setBrush(QColor(0, 255, 255, 40))
            p.drawRect(QRectF(-w / 2, -h / 2, w, h))
            p.restore()
        sel = self.layout.selection
        if sel is not None:
            outline = None
            if sel[0] == "grid" and sel[1] in self.layout.grids:
                outline = self.layout.grids[sel[1]].outline_um()
            elif sel[0] == "section" and sel[1] in self.layout.sections:
                outline = self.layout.sections[sel[1]].rectangle()
            if outline is not None:
                p.setPen(QPen(QColor(255, 255, 255), 0, Qt.DashLine))
                p.setBrush(Qt.NoBrush)
                p.drawPolygon(_poly(outline))
        for x, y, r in self.layout.af_forbidden:         # autofocus never goes here
            p.setPen(QPen(QColor(255, 70, 70), 0))
            p.setBrush(QColor(255, 70, 70, 50))
            p.drawEllipse(QPointF(x, y), r, r)
        p.resetTransform()
        # constant-size marks in screen space
        p.setPen(QPen(QColor(255, 210, 0), 1.5))
        p.setBrush(Qt.NoBrush)
        for pts in self.layout.af_pinned.values():       # the operator's autofocus spots
            for pt in pts:
                c = view.to_screen(*pt)
                p.drawEllipse(c, 6, 6)
                p.drawLine(c + QPointF(-9, 0), c + QPointF(9, 0))
                p.drawLine(c + QPointF(0, -9), c + QPointF(0, 9))
                p.drawText(c + QPointF(8, 14), "AF")
        if self.mill_um:
            c = view.to_screen(*self.mill_um[:2])
            p.setPen(QPen(QColor(230, 60, 230), 2))
            p.drawLine(c + QPointF(-7, -7), c + QPointF(7, 7))
            p.drawLine(c + QPointF(-7, 7), c + QPointF(7, -7))
            p.drawText(c + QPointF(9, -6), "mill")
        if self.stage_um:
            c = view.to_screen(*self.stage_um)
            p.setPen(QPen(QColor(0, 255, 255), 1.5))
            p.drawLine(c + QPointF(-12, 0), c + QPointF(12, 0))
            p.drawLine(c + QPointF(0, -12), c + QPointF(0, 12))
            p.setBrush(Qt.NoBrush)
            p.drawEllipse(c, 5, 5)

    def _draw_labels(self, p: QPainter, view: View, box) -> int:
        self._sections()
        vis = _visible(self.sec_bboxes, box)
        vis = vis[self.sec_extent[vis] * view.scale >= LABEL_MIN_PX]
        if len(vis) == 0 or len(vis) > MAX_LABELS:
            return 0
        p.setFont(self.label_font)
        p.setPen(QColor(255, 235, 200))
        order_pos = {sid: i for i, sid in enumerate(self.layout.order)}
        for i in vis:
            sid = self.sec_ids[i]
            st = self._labels.get(sid)
            if st is None:
                st = QStaticText(str(sid))
                st.prepare(QTransform(), self.label_font)
                self._labels[sid] = st
            c = view.to_screen(*self.sec_centres[i])
            p.drawStaticText(c - QPointF(st.size().width() / 2, st.size().height() / 2), st)
            if sid in order_pos and self.layers["path"] and view.scale * self.sec_extent[i] > 80:
                p.drawText(c + QPointF(-10, st.size().height() + 2), f"#{order_pos[sid] + 1}")
        return len(vis)

    def scale_bar(self, p: QPainter, view: View) -> None:
        target = 120 / view.scale                             # µm in ~120 px
        mag = 10 ** math.floor(math.log10(target))
        length = max(m * mag for m in (1, 2, 5) if m * mag <= target)
        px = length * view.scale
        x, y = 14, view.height - 16
        p.setPen(QPen(QColor(255, 255, 255), 2))
        p.drawLine(QPointF(x, y), QPointF(x + px, y))
        text = f"{length / 1000:g} mm" if length >= 1000 else f"{length:g} µm"
        p.drawText(QPointF(x, y - 5), text)
