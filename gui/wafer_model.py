"""What the stage map and the wafer workflow edit: sections, grids, tile
states, imaging order and the overview image, in stage micrometres (y grows
downwards, as rows do in an SEM frame). Items are immutable; an edit replaces
them, which makes undo a matter of keeping the old ones (gui/wafer_commands.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np
from PyQt5.QtCore import QObject, pyqtSignal
from PyQt5.QtWidgets import QUndoStack

PLANNED, ACQUIRING, ACQUIRED, FAILED, REACQUIRED = range(5)
STATE_NAMES = ("planned", "acquiring", "acquired", "failed", "re-acquired")
GridKey = tuple[int, int]                      # (section id, grid id)


def rot(deg: float) -> np.ndarray:
    a = math.radians(deg)
    return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


@dataclass(frozen=True)
class SectionItem:
    id: int
    center_um: tuple[float, float]
    size_um: tuple[float, float]
    angle_deg: float
    polygon_um: np.ndarray = field(compare=False, repr=False, default=None)     # (N, 2)
    confidence: float = 1.0

    def __post_init__(self):
        if self.polygon_um is None:
            object.__setattr__(self, "polygon_um", self.rectangle())

    def rectangle(self) -> np.ndarray:
        w, h = self.size_um
        local = np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])
        return local @ rot(self.angle_deg).T + self.center_um

    def moved(self, dx: float, dy: float) -> "SectionItem":
        return replace(self, center_um=(self.center_um[0] + dx, self.center_um[1] + dy),
                       polygon_um=self.polygon_um + (dx, dy))

    def rotated(self, angle_deg: float) -> "SectionItem":
        c = np.asarray(self.center_um)
        poly = (self.polygon_um - c) @ rot(angle_deg - self.angle_deg).T + c
        return replace(self, angle_deg=angle_deg, polygon_um=poly)

    def resized(self, size_um: tuple[float, float], center_um: tuple[float, float]) -> "SectionItem":
        """New nominal size; the outline is scaled along the section's own axes."""
        c0 = np.asarray(self.center_um)
        r = rot(self.angle_deg)
        local = (self.polygon_um - c0) @ r
        sx = size_um[0] / max(self.size_um[0], 1e-9)
        sy = size_um[1] / max(self.size_um[1], 1e-9)
        poly = (local * (sx, sy)) @ r.T + center_um
        return replace(self, size_um=tuple(size_um), center_um=tuple(center_um), polygon_um=poly)

    def to_section(self):
        from wafer.sections import Section
        return Section(self.id, self.center_um, self.size_um, self.angle_deg,
                       [tuple(p) for p in self.polygon_um], self.confidence)

    @classmethod
    def from_section(cls, s) -> "SectionItem":
        return cls(int(s.id), tuple(s.center_um), tuple(s.size_um), float(s.angle_deg),
                   np.asarray(s.polygon_um, float), float(getattr(s, "confidence", 1.0)))


@dataclass(frozen=True)
class GridSpec:
    """One tile grid; the geometry is acq.plan.TileGeometry's (same tile order)."""
    section_id: int
    id: int
    center_um: tuple[float, float]
    rotation_deg: float = 0.0
    rows: int = 1
    cols: int = 1
    pixel_size_nm: float = 10.0
    frame_size: tuple[int, int] = (1024, 768)
    overlap_px: int = 0
    dwell_ns: float = 200.0

    @property
    def key(self) -> GridKey:
        return (self.section_id, self.id)

    @property
    def n_tiles(self) -> int:
        return self.rows * self.cols

    def tile_size_um(self) -> tuple[float, float]:
        p = self.pixel_size_nm * 1e-3
        return self.frame_size[0] * p, self.frame_size[1] * p

    def step_um(self) -> tuple[float, float]:
        p = self.pixel_size_nm * 1e-3
        return (self.frame_size[0] - self.overlap_px) * p, (self.frame_size[1] - self.overlap_px) * p

    def extent_um(self) -> tuple[float, float]:
        (tw, th), (sx, sy) = self.tile_size_um(), self.step_um()
        return tw + (self.cols - 1) * sx, th + (self.rows - 1) * sy

    def tile_local_um(self) -> np.ndarray:
        """(rows*cols, 2) tile centres relative to the grid centre, unrotated, row by row."""
        sx, sy = self.step_um()
        r, c = np.divmod(np.arange(self.n_tiles), self.cols)
        return np.stack([(c - (self.cols - 1) / 2) * sx, (r - (self.rows - 1) / 2) * sy], 1)

    def tile_centres_um(self) -> np.ndarray:
        return self.tile_local_um() @ rot(self.rotation_deg).T + self.center_um

    def tile_corners_um(self) -> np.ndarray:
        """(n, 4, 2) corners of every tile, in stage µm."""
        tw, th = self.tile_size_um()
        box = np.array([[-tw / 2, -th / 2], [tw / 2, -th / 2], [tw / 2, th / 2], [-tw / 2, th / 2]])
        local = self.tile_local_um()[:, None, :] + box[None]
        return local @ rot(self.rotation_deg).T + self.center_um

    def outline_um(self) -> np.ndarray:
        w, h = self.extent_um()
        box = np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])
        return box @ rot(self.rotation_deg).T + self.center_um


@dataclass
class OverviewImage:
    image: np.ndarray                 # uint8 (h, w); row i at y = origin_y + i * pixel
    origin_um: tuple[float, float]    # stage position of pixel (0, 0)'s centre
    pixel_size_um: float

    def rect_um(self) -> tuple[float, float, float, float]:
        h, w = self.image.shape
        p = self.pixel_size_um
        return self.origin_um[0] - p / 2, self.origin_um[1] - p / 2, w * p, h * p


class WaferLayout(QObject):
    """The model. ``changed(what)``: sections, grids, tiles, order, overview, selection."""

    changed = pyqtSignal(str)

    def __init__(self, parent: Optional[QObject] = None):
        super().__init__(parent)
        self.sections: dict[int, SectionItem] = {}
        self.grids: dict[GridKey, GridSpec] = {}
        self.tile_state: dict[GridKey, np.ndarray] = {}
        self.order: list[int] = []
        self.overview: Optional[OverviewImage] = None
        self.selection: Optional[tuple[str, object]] = None      # ("section", id) | ("grid", key)
        self.undo = QUndoStack(self)
        self.editable = True
        self.rev = {"sections": 0, "grids": 0, "tiles": 0, "order": 0, "overview": 0}
        self.tile_rev: dict[GridKey, int] = {}
        self.current_tile: Optional[tuple[GridKey, int]] = None

    # ------------------------------------------------------------ notify
    def touch(self, what: str) -> None:
        self.rev[what] = self.rev.get(what, 0) + 1
        self.changed.emit(what)

    # ------------------------------------------------------------ raw setters (used by undo commands)
    def put_section(self, sid: int, item: Optional[SectionItem]) -> None:
        if item is None:
            self.sections.pop(sid, None)
            if sid in self.order:
                self.order.remove(sid)
        else:
            if sid not in self.sections and sid not in self.order:
                self.order.append(sid)
            self.sections[sid] = item

    def put_grid(self, key: GridKey, spec: Optional[GridSpec]) -> None:
        if spec is None:
            self.grids.pop(key, None)
            self.tile_state.pop(key, None)
        else:
            old = self.grids.get(key)
            self.grids[key] = spec
            if old is None or old.n_tiles != spec.n_tiles:
                self.tile_state[key] = np.zeros(spec.n_tiles, np.int8)
        self.tile_rev[key] = self.tile_rev.get(key, 0) + 1

    def preview_grid(self, spec: GridSpec) -> None:
        """During a drag: show the change, not yet on the undo stack."""
        self.put_grid(spec.key, spec)
        self.touch("grids")

    def preview_section(self, item: SectionItem) -> None:
        self.sections[item.id] = item
        self.touch("sections")

    # ------------------------------------------------------------ queries
    def grids_of(self, sid: int) -> list[GridSpec]:
        return [g for k, g in self.grids.items() if k[0] == sid]

    def next_section_id(self) -> int:
        return max(self.sections, default=-1) + 1

    def next_grid_id(self, sid: int) -> int:
        return max((k[1] for k in self.grids if k[0] == sid), default=-1) + 1

    def n_tiles(self) -> int:
        return sum(g.n_tiles for g in self.grids.values())

    def ordered_sections(self) -> list[SectionItem]:
        return [self.sections[i] for i in self.order if i in self.sections]

    def path_points_um(self) -> np.ndarray:
        """Where the stage goes, in imaging order: the grid centres of each section."""
        by_section: dict[int, list] = {}
        for (sid, _gid), g in self.grids.items():       # one pass: grids_of per section would be O(n²)
            by_section.setdefault(sid, []).append(g.center_um)
        pts = []
        for s in self.ordered_sections():
            pts.extend(by_section.get(s.id) or [s.center_um])
        return np.asarray(pts, float).reshape(-1, 2)

    def path_length_um(self, start_um=(0.0, 0.0)) -> float:
        p = self.path_points_um()
        if len(p) == 0:
            return 0.0
        seq = np.vstack([start_um, p])
        return float(np.hypot(*np.diff(seq, axis=0).T).sum())

    def select(self, sel: Optional[tuple[str, object]]) -> None:
        if sel != self.selection:
            self.selection = sel
            self.changed.emit("selection")

    # ------------------------------------------------------------ tile states
    def set_tile_state(self, key: GridKey, index: int, state: int) -> bool:
        arr = self.tile_state.get(key)
        if arr is None or not 0 <= index < len(arr):
            return False
        arr[index] = state
        self.tile_rev[key] = self.tile_rev.get(key, 0) + 1
        self.rev["tiles"] += 1
        return True

    def reset_tile_states(self) -> None:
        for key, arr in self.tile_state.items():
            arr[:] = PLANNED
            self.tile_rev[key] = self.tile_rev.get(key, 0) + 1
        self.current_tile = None
        self.touch("tiles")

    def tile_counts(self) -> np.ndarray:
        out = np.zeros(len(STATE_NAMES), int)
        for arr in self.tile_state.values():
            out += np.bincount(arr, minlength=len(STATE_NAMES))[:len(STATE_NAMES)]
        return out

    # ------------------------------------------------------------ bulk
    def clear(self) -> None:
        self.sections.clear()
        self.grids.clear()
        self.tile_state.clear()
        self.order.clear()
        self.selection = None
        self.undo.clear()
        for k in ("sections", "grids", "tiles", "order"):
            self.touch(k)

    def set_overview(self, ov: Optional[OverviewImage]) -> None:
        self.overview = ov
        self.touch("overview")
