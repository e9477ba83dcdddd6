"""What the stage map and the wafer workflow edit: sections, grids, tile
states, imaging order and the overview image, in stage micrometres (y grows
downwards, as rows do in an SEM frame; conventions in common/geometry.py).
Items are immutable; an edit replaces them, which makes undo a matter of
keeping the old ones (gui/wafer_commands.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import numpy as np
from PyQt5.QtCore import QObject, pyqtSignal
from PyQt5.QtWidgets import QUndoStack

from common.geometry import OverviewImage, Section, TileGrid

PLANNED, ACQUIRING, ACQUIRED, FAILED, REACQUIRED = range(5)
STATE_NAMES = ("planned", "acquiring", "acquired", "failed", "re-acquired")
GridKey = tuple[int, int]                      # (section id, grid id)


@dataclass(frozen=True)
class GridSpec:
    """One tile grid as the GUI edits it; where its tiles are is
    common.geometry.TileGrid's, the same code acquisition uses."""
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

    @classmethod
    def from_plan(cls, section_id: int, g) -> "GridSpec":
        """The GUI's copy of an acq.plan.Grid."""
        return cls(section_id, g.id, tuple(g.center_um), float(g.rotation_deg), g.rows, g.cols, g.pixel_size_nm,
                   tuple(g.frame_size), g.overlap_px, g.dwell_ns)

    @cached_property
    def geometry(self) -> TileGrid:
        return TileGrid.of_frames(self.center_um, self.rotation_deg, self.rows, self.cols, self.pixel_size_nm,
                                  self.frame_size, self.overlap_px)

    @property
    def key(self) -> GridKey:
        return (self.section_id, self.id)

    @property
    def n_tiles(self) -> int:
        return self.rows * self.cols

    def tile_size_um(self) -> tuple[float, float]:
        return self.geometry.tile_size_um

    def step_um(self) -> tuple[float, float]:
        return self.geometry.step_um

    def extent_um(self) -> tuple[float, float]:
        return self.geometry.extent_um

    def tile_centres_um(self) -> np.ndarray:
        return self.geometry.tile_centres_um()

    def tile_corners_um(self) -> np.ndarray:
        """(n, 4, 2) corners of every tile, in stage µm."""
        return self.geometry.tile_corners_um()

    def outline_um(self) -> np.ndarray:
        return self.geometry.outline_um()


class WaferLayout(QObject):
    """The model. ``changed(what)``: sections, grids, tiles, order, overview, selection."""

    changed = pyqtSignal(str)

    def __init__(self, parent: Optional[QObject] = None):
        super().__init__(parent)
        self.sections: dict[int, Section] = {}
        self.grids: dict[GridKey, GridSpec] = {}
        self.tile_state: dict[GridKey, np.ndarray] = {}
        self.order: list[int] = []
        self.overview: Optional[OverviewImage] = None
        self.selection: Optional[tuple[str, object]] = None      # ("section", id) | ("grid", key)
        self.undo = QUndoStack(self)
        self.editable = True
        self.rev = {"sections": 0, "grids": 0, "tiles": 0, "order": 0, "overview": 0, "autofocus": 0}
        # the operator's autofocus marks (plan autofocus.pinned / .forbidden), stage µm
        self.af_pinned: dict[int, list[tuple[float, float]]] = {}
        self.af_forbidden: list[tuple[float, float, float]] = []
        self.tile_rev: dict[GridKey, int] = {}
        self.current_tile: Optional[tuple[GridKey, int]] = None

    # ------------------------------------------------------------ notify
    def touch(self, what: str) -> None:
        self.rev[what] = self.rev.get(what, 0) + 1
        self.changed.emit(what)

    # ------------------------------------------------------------ raw setters (used by undo commands)
    def put_section(self, sid: int, item: Optional[Section]) -> None:
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

    def preview_section(self, item: Section) -> None:
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

    def ordered_sections(self) -> list[Section]:
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

    # ------------------------------------------------------------ autofocus marks
    def pin_autofocus(self, sid: int, x: float, y: float) -> None:
        self.af_pinned.setdefault(sid, []).append((round(x, 3), round(y, 3)))
        self.touch("autofocus")

    def forbid_autofocus(self, x: float, y: float, radius_um: float) -> None:
        self.af_forbidden.append((round(x, 3), round(y, 3), float(radius_um)))
        self.touch("autofocus")

    def clear_autofocus_marks(self, x: float, y: float, within_um: float) -> int:
        """Remove the pins and forbidden areas within ``within_um`` of (x, y); how many."""
        n = 0
        for sid in list(self.af_pinned):
            keep = [p for p in self.af_pinned[sid] if math.dist(p, (x, y)) > within_um]
            n += len(self.af_pinned[sid]) - len(keep)
            if keep:
                self.af_pinned[sid] = keep
            else:
                del self.af_pinned[sid]
        keep = [f for f in self.af_forbidden if math.dist(f[:2], (x, y)) > max(within_um, f[2])]
        n += len(self.af_forbidden) - len(keep)
        self.af_forbidden = keep
        if n:
            self.touch("autofocus")
        return n

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
        self.af_pinned.clear()
        self.af_forbidden.clear()
        self.selection = None
        self.undo.clear()
        for k in ("sections", "grids", "tiles", "order", "autofocus"):
            self.touch(k)

    def set_overview(self, ov: Optional[OverviewImage]) -> None:
        self.overview = ov
        self.touch("overview")
