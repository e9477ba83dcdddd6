"""Detected sections on a wafer and the JSON exchange format for them.

Format (written by the section detector, read here)::

    {"sections": [{"id": int, "center_um": [x, y], "size_um": [w, h],
                   "angle_deg": float, "polygon_um": [[x, y], ...],
                   "confidence": float}, ...]}

All coordinates are stage micrometres. ``angle_deg`` is the counter-clockwise
rotation of the section's width axis (``size_um[0]``) from the stage x axis.
The section type itself is common.geometry.Section (shared with the GUI).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from common.atomic import atomic_write
from common.geometry import Section, SectionFormatError, rectangle_polygon

__all__ = ["Section", "SectionFormatError", "rectangle_polygon", "sections_from_json_obj", "load_sections",
           "save_sections", "atomic_write_text", "centers_array"]


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
