"""Acquisition grids: a section's region of interest as rows x cols SEM tiles.

A grid is a rectangle of tiles in its own frame, rotated by ``rotation_deg``
(counter-clockwise, stage frame) about its centre ``origin_um``. Neighbouring
tiles advance by ``tile - overlap`` so adjacent tiles share ``overlap_um``.
Where the tiles are is common.geometry.TileGrid's (row-major, row 0 and
column 0 at the grid's local -y / -x side), the same as acquisition's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Sequence

import numpy as np

from common.geometry import TileGrid, rotation

from .sections import Section

Pair = tuple[float, float]


@dataclass(frozen=True)
class Grid:
    id: int
    section_id: int | None
    origin_um: Pair  # centre of the tile rectangle
    rotation_deg: float
    rows: int
    cols: int
    tile_size_um: Pair  # (w, h) = frame size x pixel size
    overlap_um: Pair  # (x, y) shared by neighbouring tiles
    margin_um: float = 0.0
    pixel_size_nm: float = 0.0
    frame_size_px: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        for name in ("rows", "cols"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v:
                raise ValueError(f"grid {self.id}: {name} must be an integer, got {v!r}")
            object.__setattr__(self, name, int(v))
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"grid {self.id}: rows/cols must be >= 1, got {self.rows}x{self.cols}")
        w, h = self.tile_size_um
        ox, oy = self.overlap_um
        if not (w > 0 and h > 0):
            raise ValueError(f"grid {self.id}: tile_size_um must be positive, got {self.tile_size_um}")
        if not (0 <= ox < w and 0 <= oy < h):
            raise ValueError(f"grid {self.id}: overlap_um {self.overlap_um} must be in [0, tile size)")
        object.__setattr__(self, "origin_um", (float(self.origin_um[0]), float(self.origin_um[1])))
        object.__setattr__(self, "tile_size_um", (float(w), float(h)))
        object.__setattr__(self, "overlap_um", (float(ox), float(oy)))

    @cached_property
    def geometry(self) -> TileGrid:
        (w, h), (ox, oy) = self.tile_size_um, self.overlap_um
        return TileGrid(self.origin_um, self.rotation_deg, self.rows, self.cols, (w, h), (w - ox, h - oy))

    @property
    def step_um(self) -> Pair:
        return self.geometry.step_um

    @property
    def extent_um(self) -> Pair:
        """Width and height of the union of all tiles (in the grid frame)."""
        return self.geometry.extent_um

    @property
    def n_tiles(self) -> int:
        return self.rows * self.cols

    def to_stage(self, local: np.ndarray) -> np.ndarray:
        return self.geometry.to_stage(local)

    def to_local(self, stage: np.ndarray) -> np.ndarray:
        return self.geometry.to_local(stage)

    def tile_centres_um(self) -> np.ndarray:
        """(rows*cols, 2) tile centres in stage µm, row-major."""
        return self.geometry.tile_centres_um()

    def tile_corners_um(self) -> np.ndarray:
        """(rows*cols, 4, 2) tile corners in stage µm, counter-clockwise."""
        return self.geometry.tile_corners_um()

    def outline_um(self) -> np.ndarray:
        """(4, 2) corners of the whole grid in stage µm."""
        return self.geometry.outline_um()

    def tiles_containing(self, points_um) -> np.ndarray:
        """(m, rows*cols) bool: which tiles contain each point (edges count)."""
        p = self.to_local(np.atleast_2d(points_um))
        c = self.geometry.local_centres_um()
        w, h = self.tile_size_um
        tol = 1e-9 * max(w, h)
        dx = np.abs(p[:, None, 0] - c[None, :, 0])
        dy = np.abs(p[:, None, 1] - c[None, :, 1])
        return (dx <= w / 2 + tol) & (dy <= h / 2 + tol)


def tile_geometry(frame_size_px: Sequence[int], pixel_size_nm: float, overlap_px: float | None = None,
                  overlap_fraction: float | None = None) -> tuple[Pair, Pair]:
    """Tile size and overlap in µm from the scan frame and pixel size. With
    ``overlap_px`` the step (tile - overlap) is acquisition's to the bit
    (common.geometry.TileGrid.of_frames), so a grid made here has the tile
    centres the plan will image."""
    fw, fh = (int(v) for v in frame_size_px)
    if fw <= 0 or fh <= 0:
        raise ValueError(f"frame_size_px: must be positive, got {frame_size_px}")
    if not pixel_size_nm > 0:
        raise ValueError(f"pixel_size_nm: must be > 0, got {pixel_size_nm}")
    if overlap_px is not None and overlap_fraction is not None:
        raise ValueError("give overlap_px or overlap_fraction, not both")
    opx = 0.0 if overlap_fraction is not None else float(overlap_px or 0.0)
    if not 0 <= opx < min(fw, fh):
        raise ValueError(f"overlap_px: must be in [0, {min(fw, fh)}), got {overlap_px}")
    frames = TileGrid.of_frames((0.0, 0.0), 0.0, 1, 1, pixel_size_nm, (fw, fh), opx)
    (w, h), ov = frames.tile_size_um, frames.overlap_um
    if overlap_fraction is not None:
        if not 0 <= overlap_fraction < 1:
            raise ValueError(f"overlap_fraction: must be in [0, 1), got {overlap_fraction}")
        ov = (w * overlap_fraction, h * overlap_fraction)
    return (w, h), ov


def _tiles_needed(length: float, tile: float, overlap: float) -> int:
    """Smallest k >= 1 with k * (tile - overlap) + overlap >= length."""
    step = tile - overlap
    k = math.ceil((length - overlap) / step - 1e-9)  # tolerance: exact fits need no extra tile
    return max(1, k)


def grid_for_points(points_um, angle_deg: float, tile_size_um: Pair, overlap_um: Pair, *, grid_id: int,
                    section_id: int | None = None, margin_um: float = 0.0, pixel_size_nm: float = 0.0,
                    frame_size_px: tuple[int, int] = (0, 0)) -> Grid:
    """Smallest grid at ``angle_deg`` whose tiles cover all points grown by ``margin_um``.

    The union of a grid's tiles is its full rectangle (overlap < tile), so a grid
    covers a point set plus margin exactly when it covers the set's bounding box
    in the grid frame grown by the margin; that box fixes rows, cols and centre."""
    if margin_um < 0:
        raise ValueError(f"margin_um: must be >= 0, got {margin_um}")
    pts = np.asarray(points_um, float).reshape(-1, 2)
    local = pts @ rotation(angle_deg)  # rotate by -angle into the grid frame
    lo, hi = local.min(axis=0) - margin_um, local.max(axis=0) + margin_um
    cols = _tiles_needed(hi[0] - lo[0], tile_size_um[0], overlap_um[0])
    rows = _tiles_needed(hi[1] - lo[1], tile_size_um[1], overlap_um[1])
    centre = rotation(angle_deg) @ ((lo + hi) / 2.0)
    return Grid(id=grid_id, section_id=section_id, origin_um=(centre[0], centre[1]), rotation_deg=float(angle_deg),
                rows=rows, cols=cols, tile_size_um=tile_size_um, overlap_um=overlap_um, margin_um=float(margin_um),
                pixel_size_nm=float(pixel_size_nm), frame_size_px=(int(frame_size_px[0]), int(frame_size_px[1])))


def grid_for_section(section: Section, frame_size_px: Sequence[int] = (4096, 3072), pixel_size_nm: float = 10.0,
                     overlap_px: float | None = None, overlap_fraction: float | None = None,
                     margin_um: float = 0.0, grid_id: int | None = None) -> Grid:
    """The smallest grid, aligned with the section's angle, covering its polygon + margin."""
    tile, ov = tile_geometry(frame_size_px, pixel_size_nm, overlap_px, overlap_fraction)
    return grid_for_points(section.polygon_um, section.angle_deg, tile, ov,
                           grid_id=section.id if grid_id is None else grid_id, section_id=section.id,
                           margin_um=margin_um, pixel_size_nm=pixel_size_nm,
                           frame_size_px=(int(frame_size_px[0]), int(frame_size_px[1])))


class GridSet:
    """Grids under edit, with undo/redo.

    Every state is an immutable tuple of frozen Grids; the history is a list of
    such snapshots and a cursor. An edit drops any redo branch and appends the
    new snapshot. Edits return the grid(s) they produced (or removed)."""

    def __init__(self, grids: Sequence[Grid] = (), max_history: int = 500):
        self._max_history = max(2, int(max_history))
        self._check_unique(grids)
        self._history: list[tuple[Grid, ...]] = [tuple(grids)]
        self._cursor = 0

    @staticmethod
    def _check_unique(grids: Sequence[Grid]) -> None:
        ids = [g.id for g in grids]
        if len(ids) != len(set(ids)):
            raise ValueError(f"grid ids must be unique, got {ids}")

    # --- state ------------------------------------------------------------------
    @property
    def grids(self) -> tuple[Grid, ...]:
        return self._history[self._cursor]

    def __len__(self) -> int:
        return len(self.grids)

    def __iter__(self):
        return iter(self.grids)

    def get(self, grid_id: int) -> Grid:
        for g in self.grids:
            if g.id == grid_id:
                return g
        raise KeyError(f"no grid with id {grid_id}")

    def new_id(self) -> int:
        return max((g.id for g in self.grids), default=-1) + 1

    def _commit(self, grids: tuple[Grid, ...]) -> None:
        self._check_unique(grids)
        del self._history[self._cursor + 1:]
        self._history.append(grids)
        if len(self._history) > self._max_history:
            del self._history[0]
        self._cursor = len(self._history) - 1

    def _replace(self, old_id: int, *new: Grid) -> None:
        self.get(old_id)  # KeyError for unknown ids, before anything changes
        out: list[Grid] = []
        for g in self.grids:
            out.extend(new if g.id == old_id else (g,))
        self._commit(tuple(out))

    # --- edits ------------------------------------------------------------------
    def add(self, grid: Grid) -> Grid:
        if any(g.id == grid.id for g in self.grids):
            raise ValueError(f"grid id {grid.id} already exists (use new_id())")
        self._commit(self.grids + (grid,))
        return grid

    def delete(self, grid_id: int) -> Grid:
        g = self.get(grid_id)
        self._commit(tuple(x for x in self.grids if x.id != grid_id))
        return g

    def move(self, grid_id: int, dx: float, dy: float) -> Grid:
        g = self.get(grid_id)
        new = replace(g, origin_um=(g.origin_um[0] + dx, g.origin_um[1] + dy))
        self._replace(grid_id, new)
        return new

    def rotate(self, grid_id: int, deg: float) -> Grid:
        """Rotate about the grid centre; the angle is kept in [-180, 180)."""
        g = self.get(grid_id)
        new = replace(g, rotation_deg=((g.rotation_deg + deg + 180.0) % 360.0) - 180.0)
        self._replace(grid_id, new)
        return new

    def resize(self, grid_id: int, rows: int, cols: int, anchor: str = "center") -> Grid:
        """Change the tile count. ``anchor="center"`` keeps the centre fixed;
        ``"corner"`` keeps tile (0, 0) where it is (adding rows/cols at the far side)."""
        g = self.get(grid_id)
        new = replace(g, rows=int(rows), cols=int(cols))
        if anchor == "corner":
            shift = g.tile_centres_um()[0] - new.tile_centres_um()[0]
            new = replace(new, origin_um=(new.origin_um[0] + shift[0], new.origin_um[1] + shift[1]))
        elif anchor != "center":
            raise ValueError(f"anchor: expected 'center' or 'corner', got {anchor!r}")
        self._replace(grid_id, new)
        return new

    def split(self, grid_id: int, axis: str = "rows") -> tuple[Grid, Grid]:
        """Cut a grid into two whose tiles are exactly the original tiles:
        ``axis="rows"`` gives a lower and an upper part, ``"cols"`` left and right.
        The first part keeps the id, the second gets ``new_id()``."""
        g = self.get(grid_id)
        if axis not in ("rows", "cols"):
            raise ValueError(f"axis: expected 'rows' or 'cols', got {axis!r}")
        count = g.rows if axis == "rows" else g.cols
        if count < 2:
            raise ValueError(f"grid {grid_id}: need at least 2 {axis} to split, has {count}")
        first = count // 2
        parts = []
        sx, sy = g.step_um
        for n_here, offset in ((first, 0), (count - first, first)):
            part = replace(g, rows=n_here) if axis == "rows" else replace(g, cols=n_here)
            # Shift the part so its tile (0, 0) lands on original tile (offset) of that axis.
            want = g.geometry.local_centres_um()[offset * (g.cols if axis == "rows" else 1)]
            have = part.geometry.local_centres_um()[0]
            shift = rotation(g.rotation_deg) @ (want - have)
            parts.append(replace(part, origin_um=(g.origin_um[0] + shift[0], g.origin_um[1] + shift[1])))
        a, b = parts[0], replace(parts[1], id=self.new_id())
        self._replace(grid_id, a, b)
        return a, b

    def merge(self, id_a: int, id_b: int) -> Grid:
        """Replace two grids by the smallest grid, in a's frame (angle, tile size,
        overlap), covering every tile of both. Both must share the pixel size."""
        a, b = self.get(id_a), self.get(id_b)
        if id_a == id_b:
            raise ValueError("merge: need two different grids")
        if not math.isclose(a.pixel_size_nm, b.pixel_size_nm, rel_tol=1e-9, abs_tol=1e-12):
            raise ValueError(f"merge: pixel sizes differ ({a.pixel_size_nm} vs {b.pixel_size_nm} nm)")
        corners = np.vstack([a.tile_corners_um().reshape(-1, 2), b.tile_corners_um().reshape(-1, 2)])
        m = grid_for_points(corners, a.rotation_deg, a.tile_size_um, a.overlap_um, grid_id=a.id,
                            section_id=a.section_id, margin_um=0.0, pixel_size_nm=a.pixel_size_nm,
                            frame_size_px=a.frame_size_px)
        m = replace(m, margin_um=a.margin_um)
        out = []
        for g in self.grids:
            if g.id == id_a:
                out.append(m)
            elif g.id != id_b:
                out.append(g)
        self._commit(tuple(out))
        return m

    # --- history ----------------------------------------------------------------
    @property
    def can_undo(self) -> bool:
        return self._cursor > 0

    @property
    def can_redo(self) -> bool:
        return self._cursor < len(self._history) - 1

    def undo(self) -> tuple[Grid, ...]:
        """Step back one edit and return the state; IndexError if there is none."""
        if not self.can_undo:
            raise IndexError("nothing to undo")
        self._cursor -= 1
        return self.grids

    def redo(self) -> tuple[Grid, ...]:
        if not self.can_redo:
            raise IndexError("nothing to redo")
        self._cursor += 1
        return self.grids
