"""Detected sections on a wafer and the JSON exchange format for them.

Format (written by the section detector, read here)::

    {"sections": [{"id": int, "center_um": [x, y], "size_um": [w, h],
                   "angle_deg": float, "polygon_um": [[x, y], ...],
                   "confidence": float}, ...]}

All coordinates are stage micrometres. ``angle_deg`` is the counter-clockwise
rotation of the section's width axis (``size_um[0]``) from the stage x axis.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from common.atomic import atomic_write


class SectionFormatError(ValueError):
    """Bad section data; the message names the offending field."""


Point = tuple[float, float]


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


def rectangle_polygon(center: Sequence[float], size: Sequence[float], angle_deg: float) -> list[Point]:
    """Corners of a rotated rectangle, counter-clockwise, starting bottom-left."""
    cx, cy = center
    hw, hh = size[0] / 2.0, size[1] / 2.0
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    return [(cx + c * x - s * y, cy + s * x + c * y) for x, y in ((-hw, -hh), (hw, -hh), (hw, hh), (-hw, hh))]


@dataclass
class Section:
    """One detected section. Sequences are normalised to tuples of floats so that
    two sections compare equal exactly when their numbers do."""

    id: int
    center_um: Point
    size_um: Point
    angle_deg: float
    polygon_um: tuple[Point, ...] = field(default=())
    confidence: float = 1.0

    def __post_init__(self) -> None:
        where = f"section {self.id!r}"
        if isinstance(self.id, bool) or not isinstance(self.id, int):
            try:
                as_int = int(self.id)
                ok = float(self.id) == as_int and not isinstance(self.id, bool)
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise SectionFormatError(f"{where}.id: expected an integer, got {self.id!r}")
            self.id = as_int
        self.center_um = _as_point(self.center_um, f"{where}.center_um")
        self.size_um = _as_point(self.size_um, f"{where}.size_um")
        if self.size_um[0] < 0 or self.size_um[1] < 0:
            raise SectionFormatError(f"{where}.size_um: must be non-negative, got {self.size_um}")
        self.angle_deg = _as_float(self.angle_deg, f"{where}.angle_deg")
        self.confidence = _as_float(self.confidence, f"{where}.confidence")
        poly = self.polygon_um
        if poly is None or len(poly) == 0:
            # No outline from the detector: the oriented rectangle is the best we know.
            poly = rectangle_polygon(self.center_um, self.size_um, self.angle_deg)
        try:
            pts = tuple(_as_point(p, f"{where}.polygon_um[{i}]") for i, p in enumerate(poly))
        except TypeError:
            raise SectionFormatError(f"{where}.polygon_um: expected a list of [x, y], got {poly!r}") from None
        if len(pts) < 3:
            raise SectionFormatError(f"{where}.polygon_um: need at least 3 vertices, got {len(pts)}")
        self.polygon_um = pts

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "center_um": list(self.center_um),
            "size_um": list(self.size_um),
            "angle_deg": self.angle_deg,
            "polygon_um": [list(p) for p in self.polygon_um],
            "confidence": self.confidence,
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "section") -> "Section":
        if not isinstance(d, dict):
            raise SectionFormatError(f"{where}: expected an object, got {type(d).__name__}")
        for key in ("id", "center_um", "size_um", "angle_deg"):
            if key not in d:
                raise SectionFormatError(f"{where}.{key}: missing")
        try:
            return cls(
                id=d["id"],
                center_um=d["center_um"],
                size_um=d["size_um"],
                angle_deg=d["angle_deg"],
                polygon_um=d.get("polygon_um") or (),
                confidence=d.get("confidence", 1.0),
            )
        except SectionFormatError as exc:
            # Prefix the position in the file, which is what a user can find.
            raise SectionFormatError(f"{where}: {exc}") from None


def sections_from_json_obj(obj: Any) -> list[Section]:
    if not isinstance(obj, dict) or "sections" not in obj:
        raise SectionFormatError('top level: expected an object with a "sections" list')
    raw = obj["sections"]
    if not isinstance(raw, list):
        raise SectionFormatError(f"sections: expected a list, got {type(raw).__name__}")
    out = [Section.from_dict(d, f"sections[{i}]") for i, d in enumerate(raw)]
    seen: dict[int, int] = {}
    for i, s in enumerate(out):
        if s.id in seen:
            raise SectionFormatError(f"sections[{i}].id: duplicate id {s.id} (also at sections[{seen[s.id]}])")
        seen[s.id] = i
    return out


def load_sections(path: str | os.PathLike) -> list[Section]:
    """Read the detection JSON. Raises SectionFormatError naming the bad field."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"sections file not found: {p}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SectionFormatError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    return sections_from_json_obj(obj)


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = False) -> Path:
    """Write UTF-8 ``text`` with common.atomic.atomic_write: readers see the old file or
    the complete new one; an existing file is kept unless ``overwrite`` (best effort
    on filesystems without hard links)."""
    return atomic_write(path, text.encode("utf-8"), overwrite=overwrite, link_fallback=True)


def save_sections(sections: Iterable[Section], path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write sections in the detection JSON format (atomic; no clobber unless asked)."""
    secs = list(sections)
    ids = [s.id for s in secs]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise SectionFormatError(f"sections.id: duplicate ids {dup}")
    text = json.dumps({"sections": [s.to_dict() for s in secs]}, indent=1)
    return atomic_write_text(path, text + "\n", overwrite=overwrite)


def centers_array(sections: Sequence[Section]):
    """(n, 2) numpy array of section centres, in the given order."""
    import numpy as np

    return np.array([s.center_um for s in sections], dtype=float).reshape(-1, 2)
