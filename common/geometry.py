"""Plane geometry in stage coordinates, one version for acquisition
(acq/plan.py, acq/expand.py), the wafer tools (wafer/) and the GUI
(gui/wafer_model.py): tile grids, section outlines and the overview image's
pixel <-> stage mapping. Plain frozen dataclasses and numpy; nothing else.

Conventions
-----------
* Lengths are stage micrometres (µm), x and y as the stage reports them.
  Images and the stage map draw +y downwards (rows grow with y).
* Angles are degrees, counter-clockwise in the stage (x, y) frame: a local
  vector (u, v) lies at (cos a·u − sin a·v, sin a·u + cos a·v). Drawn with
  +y down, a positive angle turns clockwise on screen.
* Grid: ``rows`` x ``cols`` tiles of ``tile_size_um``, neighbours
  ``step_um`` apart (tile − overlap). Tile (r, c) has the row-major index
  r·cols + c; row 0 and column 0 are on the grid's local −y / −x side. Its
  centre is the grid centre plus the rotated offset
  ((c − (cols−1)/2)·step_x, (r − (rows−1)/2)·step_y), computed with exactly
  the arithmetic acquisition has always used (acq/plan.py before this
  module): tile positions are recorded in run fingerprints, so they must not
  change by a bit.
* Overview image (``OverviewTransform``): integer pixel coordinates
  (col, row) name pixel *centres*. Pixel (0, 0) is the centre of the
  top-left pixel (array row 0, column 0) and lies at ``origin_um``;
  stage = origin_um + (col, row)·pixel_um, columns along +stage x, rows along
  +stage y, no rotation or flip. The image's outer edge is therefore half a
  pixel beyond the centres: x from origin_x − pixel/2 to
  origin_x + (w − 1/2)·pixel. This is what the section detector assumes
  (cv2 contour coordinates are pixel centres), what the mosaic writes and
  what the GUI's overview acquisition produces.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Sequence

import numpy as np

Point = tuple[float, float]


# ------------------------------------------------------------ rotation
def rotation(angle_deg: float) -> np.ndarray:
    """2x2 matrix turning column vectors counter-clockwise by ``angle_deg``."""
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    return np.array([[c, -s], [s, c]])


def rotate(points, angle_deg: float, offset: Sequence[float] | None = None) -> np.ndarray:
    """Points (..., 2) turned counter-clockwise about (0, 0), then moved by
    ``offset``. Element-wise, not a matrix product: BLAS may fuse
    multiply-adds, and tile centres must come out exactly as acquisition
    computes them ((c·u − s·v) + x0, (s·u + c·v) + y0)."""
    p = np.asarray(points, float)
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    u, v = p[..., 0], p[..., 1]
    out = np.empty(p.shape)
    x, y = out[..., 0], out[..., 1]
    np.multiply(u, c, out=x)
    x -= s * v
    np.multiply(u, s, out=y)
    y += c * v
    if offset is not None:
        x += offset[0]
        y += offset[1]
    return out


def _box(w: float, h: float) -> np.ndarray:
    """Corners of a w x h rectangle about (0, 0), counter-clockwise from (−x, −y)."""
    return np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])


# ------------------------------------------------------------ grids
@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of a grid are (see the module docstring). Validation is
    the caller's (the plan schema, wafer.grids.Grid, the GUI's spin boxes)."""
    center_um: Point
    rotation_deg: float
    rows: int
    cols: int
    tile_size_um: Point          # one frame: width, height
    step_um: Point               # centre to centre along the grid's x and y

    @classmethod
    def of_frames(cls, center_um: Sequence[float], rotation_deg: float, rows: int, cols: int,
                  pixel_size_nm: float, frame_size: Sequence[int], overlap_px: float = 0) -> "TileGrid":
        """A grid of SEM frames: ``frame_size`` px at ``pixel_size_nm``, neighbours sharing ``overlap_px``."""
        p = pixel_size_nm * 1e-3
        w, h = frame_size
        return cls((center_um[0], center_um[1]), rotation_deg, rows, cols, (w * p, h * p),
                   ((w - overlap_px) * p, (h - overlap_px) * p))

    @property
    def n_tiles(self) -> int:
        return self.rows * self.cols

    @property
    def overlap_um(self) -> Point:
        return self.tile_size_um[0] - self.step_um[0], self.tile_size_um[1] - self.step_um[1]

    @property
    def extent_um(self) -> Point:
        """Width and height of the union of all tiles, in the grid's frame."""
        (tw, th), (sx, sy) = self.tile_size_um, self.step_um
        return tw + (self.cols - 1) * sx, th + (self.rows - 1) * sy

    def local_centres_um(self) -> np.ndarray:
        """(rows·cols, 2) tile centres relative to the grid centre, unrotated, row-major."""
        sx, sy = self.step_um
        r, c = np.divmod(np.arange(self.n_tiles), self.cols)
        return np.stack([(c - (self.cols - 1) / 2) * sx, (r - (self.rows - 1) / 2) * sy], axis=1)

    def to_stage(self, local) -> np.ndarray:
        """Grid-frame points (..., 2) → stage µm."""
        return rotate(local, self.rotation_deg, self.center_um)

    def to_local(self, stage) -> np.ndarray:
        """Stage points (..., 2) → the grid's frame (centre at 0, axes along rows/cols)."""
        return rotate(np.asarray(stage, float) - np.asarray(self.center_um), -self.rotation_deg)

    def offsets_um(self) -> np.ndarray:
        """(rows·cols, 2) tile centres relative to the grid centre, rotated."""
        return rotate(self.local_centres_um(), self.rotation_deg)

    def tile_centres_um(self) -> np.ndarray:
        """(rows·cols, 2) tile centres in stage µm, row-major."""
        return self.to_stage(self.local_centres_um())

    def tile_offsets(self) -> list[tuple[int, int, float, float]]:
        """(row, col, dx, dy) of every tile, row-major: what acquisition iterates."""
        d = self.offsets_um().tolist()
        return [(i // self.cols, i % self.cols, dx, dy) for i, (dx, dy) in enumerate(d)]

    def tile_corners_um(self) -> np.ndarray:
        """(rows·cols, 4, 2) corners of every tile in stage µm, counter-clockwise."""
        local = self.local_centres_um()[:, None, :] + _box(*self.tile_size_um)[None]
        return self.to_stage(local)

    def outline_um(self) -> np.ndarray:
        """(4, 2) corners of the whole grid in stage µm, counter-clockwise."""
        return self.to_stage(_box(*self.extent_um))


# ------------------------------------------------------------ sections
class SectionFormatError(ValueError):
    """Bad section data; the message names the offending field."""


def _as_point(value: Any, where: str) -> Point:
    try:
        if len(value) != 2:
            raise TypeError
        x, y = float(value[0]), float(value[1])
    except (TypeError, ValueError):
        raise SectionFormatError(f"{where}: expected [x, y] numbers, got {value!r}") from None
    if not (math.isfinite(x) and math.isfinite(y)):
        raise SectionFormatError(f"{where}: coordinates must be finite, got {value!r}")
    return (x, y)


def _as_float(value: Any, where: str) -> float:
    if isinstance(value, bool):  # bool is an int subclass; reject "true" as an angle
        raise SectionFormatError(f"{where}: expected a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise SectionFormatError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(out):
        raise SectionFormatError(f"{where}: must be finite, got {value!r}")
    return out


def _as_id(value: Any, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        as_int = int(value)
        ok = float(value) == as_int and not isinstance(value, bool)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise SectionFormatError(f"{where}.id: expected an integer, got {value!r}")
    return as_int


def _as_polygon(poly: Any, where: str) -> np.ndarray:
    """(N >= 3, 2) read-only float array; the error names the first bad vertex."""
    if isinstance(poly, np.ndarray) and poly.dtype == np.float64 and not poly.flags.writeable \
            and poly.ndim == 2 and poly.shape[1] == 2 and len(poly) >= 3:
        return poly                     # already checked (an edit that kept the outline)
    try:
        a = np.array(poly, dtype=float)
    except (TypeError, ValueError):
        a = None
    if a is None or a.ndim != 2 or a.shape[1] != 2 or not np.isfinite(a).all():
        try:
            for i, p in enumerate(poly):
                _as_point(p, f"{where}.polygon_um[{i}]")
        except TypeError:
            pass
        raise SectionFormatError(f"{where}.polygon_um: expected a list of [x, y], got {poly!r}")
    if len(a) < 3:
        raise SectionFormatError(f"{where}.polygon_um: need at least 3 vertices, got {len(a)}")
    a.flags.writeable = False
    return a


def normalise_rect(center, size, angle_deg) -> tuple[Point, Point, float]:
    """Width = longer side, angle of the width axis in [-90, 90)."""
    w, h = float(size[0]), float(size[1])
    a = float(angle_deg)
    if h > w:
        w, h, a = h, w, a + 90.0
    a = (a + 90.0) % 180.0 - 90.0
    return (float(center[0]), float(center[1])), (w, h), a


def rectangle_polygon(center: Sequence[float], size: Sequence[float], angle_deg: float) -> list[Point]:
    """Corners of a rotated rectangle, counter-clockwise, starting bottom-left."""
    cx, cy = center
    hw, hh = size[0] / 2.0, size[1] / 2.0
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    return [(cx + c * x - s * y, cy + s * x + c * y) for x, y in ((-hw, -hh), (hw, -hh), (hw, hh), (-hw, hh))]


@dataclass(frozen=True, eq=False)
class Section:
    """One section on the wafer: a rotated rectangle (``size_um[0]`` along the
    direction ``angle_deg``) and its real outline ``polygon_um`` ((N, 2),
    read-only; the rectangle when none is given). Numbers are checked and
    normalised on construction (SectionFormatError names the field); two
    sections are equal exactly when all their numbers are."""
    id: int
    center_um: Point
    size_um: Point
    angle_deg: float
    polygon_um: np.ndarray = field(default=None, repr=False)
    confidence: float = 1.0

    def __post_init__(self) -> None:
        where = f"section {self.id!r}"
        put = object.__setattr__
        put(self, "id", _as_id(self.id, where))
        put(self, "center_um", _as_point(self.center_um, f"{where}.center_um"))
        put(self, "size_um", _as_point(self.size_um, f"{where}.size_um"))
        if self.size_um[0] < 0 or self.size_um[1] < 0:
            raise SectionFormatError(f"{where}.size_um: must be non-negative, got {self.size_um}")
        put(self, "angle_deg", _as_float(self.angle_deg, f"{where}.angle_deg"))
        put(self, "confidence", _as_float(self.confidence, f"{where}.confidence"))
        poly = self.polygon_um
        if poly is None or len(poly) == 0:
            # no outline from the detector: the oriented rectangle is the best we know
            poly = rectangle_polygon(self.center_um, self.size_um, self.angle_deg)
        put(self, "polygon_um", _as_polygon(poly, where))

    def __eq__(self, other) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return (self.id, self.center_um, self.size_um, self.angle_deg, self.confidence) == \
            (other.id, other.center_um, other.size_um, other.angle_deg, other.confidence) and \
            np.array_equal(self.polygon_um, other.polygon_um)

    def __hash__(self) -> int:
        return hash((self.id, self.center_um, self.size_um, self.angle_deg))

    def rectangle(self) -> np.ndarray:
        """(4, 2) corners of the nominal rectangle (not the outline)."""
        return np.array(rectangle_polygon(self.center_um, self.size_um, self.angle_deg))

    def moved(self, dx: float, dy: float) -> "Section":
        return Section(self.id, (self.center_um[0] + dx, self.center_um[1] + dy), self.size_um, self.angle_deg,
                       self.polygon_um + (dx, dy), self.confidence)

    def rotated(self, angle_deg: float) -> "Section":
        """Turned about its centre to ``angle_deg``, outline with it."""
        c = np.asarray(self.center_um)
        poly = rotate(self.polygon_um - c, angle_deg - self.angle_deg, c)
        return Section(self.id, self.center_um, self.size_um, angle_deg, poly, self.confidence)

    def resized(self, size_um: Sequence[float], center_um: Sequence[float]) -> "Section":
        """New nominal size and centre; the outline is scaled along the section's own axes."""
        local = rotate(self.polygon_um - np.asarray(self.center_um), -self.angle_deg)
        scale = (size_um[0] / max(self.size_um[0], 1e-9), size_um[1] / max(self.size_um[1], 1e-9))
        poly = rotate(local * scale, self.angle_deg, center_um)
        return Section(self.id, tuple(center_um), tuple(size_um), self.angle_deg, poly, self.confidence)

    def to_dict(self) -> dict[str, Any]:
        """The section in the detection JSON format (wafer/sections.py)."""
        return {"id": self.id, "center_um": list(self.center_um), "size_um": list(self.size_um),
                "angle_deg": self.angle_deg, "polygon_um": self.polygon_um.tolist(), "confidence": self.confidence}

    @classmethod
    def from_dict(cls, d: Any, where: str = "section") -> "Section":
        if not isinstance(d, dict):
            raise SectionFormatError(f"{where}: expected an object, got {type(d).__name__}")
        for key in ("id", "center_um", "size_um", "angle_deg"):
            if key not in d:
                raise SectionFormatError(f"{where}.{key}: missing")
        try:
            return cls(id=d["id"], center_um=d["center_um"], size_um=d["size_um"], angle_deg=d["angle_deg"],
                       polygon_um=d.get("polygon_um"), confidence=d.get("confidence", 1.0))
        except SectionFormatError as exc:
            # prefix the position in the file, which is what a user can find
            raise SectionFormatError(f"{where}: {exc}") from None


# ------------------------------------------------------------ overview images
@dataclass(frozen=True)
class OverviewTransform:
    """Pixel (col, row) <-> stage µm of an overview image (see the module
    docstring: pixel (0, 0) is the centre of the top-left pixel)."""
    origin_um: Point
    pixel_um: float

    def to_stage(self, col, row):
        """Stage (x, y) µm of pixel position (col, row); scalars or arrays."""
        return self.origin_um[0] + col * self.pixel_um, self.origin_um[1] + row * self.pixel_um

    def to_pixel(self, x, y):
        """Pixel position (col, row) of stage (x, y) µm; integers are pixel centres."""
        return (x - self.origin_um[0]) / self.pixel_um, (y - self.origin_um[1]) / self.pixel_um

    def affine(self) -> list[list[float]]:
        """(col, row, 1) → stage (x, y) µm as a 2x3 matrix."""
        p, (ox, oy) = self.pixel_um, self.origin_um
        return [[p, 0.0, ox], [0.0, p, oy]]

    def bounds_um(self, shape: Sequence[int]) -> tuple[float, float, float, float]:
        """(x0, y0, width, height) µm covered by an image of ``shape`` (h, w), pixel edges included."""
        h, w = shape[:2]
        p = self.pixel_um
        return self.origin_um[0] - p / 2, self.origin_um[1] - p / 2, w * p, h * p


@dataclass(frozen=True, eq=False)
class OverviewImage:
    """An overview (uint8 (h, w)) placed on the stage: ``origin_um`` is the
    stage position of pixel (0, 0)'s centre, ``pixel_um`` the pixel size;
    ``info`` carries what made it (tiles, refinement)."""
    image: np.ndarray
    origin_um: Point
    pixel_um: float
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "origin_um", (float(self.origin_um[0]), float(self.origin_um[1])))
        object.__setattr__(self, "pixel_um", float(self.pixel_um))

    @cached_property
    def transform(self) -> OverviewTransform:
        return OverviewTransform(self.origin_um, self.pixel_um)

    def rect_um(self) -> tuple[float, float, float, float]:
        """(x0, y0, width, height) µm the image covers, pixel edges included."""
        return self.transform.bounds_um(self.image.shape)
