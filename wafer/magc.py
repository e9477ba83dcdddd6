"""Read and write MagC ``.magc`` files (MagFinder / SBEMimage MagC mode).

A .magc file is INI text (Python configparser). What we read and write::

    [sections]            number = N
    [sections.0007]       polygon = x1,y1,x2,y2,...   center = x,y
                          area = A   angle = FILE_ANGLE
    [rois]                number = M
    [rois.0007]           template, polygon, center, area, angle  (one ROI per section)
    [landmarks]           number = L
    [landmarks.0000]      location = x,y
    [tsporder]            tsporder = 7,3,12,...   ("[]" when empty)

That is the layout of SBEMimage's example file (array/example/wafer_example1.magc),
whose reader (src/ArrayData.py) matches headers by prefix: ``sections.``/``section.``,
``rois.``/``roi.``, ``landmarks.``/``landmark.``, ``tsporder``/``stage_order``; every
dotted header must end in integer ids, and a ROI's section must come before it.
We read those spellings plus ``landmarksEM.N`` (written by older versions of this
module) and the other unknown blocks (``magnets``, ``focus``, ``serialorder``) are
skipped. ``write_magc(dialect=...)`` writes the layout above ("sbemimage") or
MagFinder's newer one ("magfinder": ``section.N``, ``roi.S.R`` with several ROIs
per section, ``landmark.N``, ``stage_order``, ``serial_order``).

Coordinates are the file's (MagFinder: overview-image pixels, x = column, y = row),
times ``um_per_unit`` on read, divided on write; Python's shortest round-trip float
repr keeps a write/read cycle exact. Angles: in the example file the polygon's first
edge points at ``90 - FILE_ANGLE`` degrees in that (x, y) frame (checked on all 433
sections and ROIs, to 0.002 deg), which is our ``angle_deg`` convention
(common/geometry.py); SBEMimage's own ``((FILE_ANGLE + 90) % 360) - 180`` is its
negative. Fields the tools do not know (our exact angle, section size, detector
confidence) go in extra keys that both tools ignore; when they disagree with the
standard keys (a file edited in MagFinder), the standard keys win.
"""

from __future__ import annotations

import configparser
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .sections import Section, atomic_write_text

Point = tuple[float, float]


class MagcFormatError(ValueError):
    """Bad .magc content; the message names the INI section and key."""


@dataclass
class Roi:
    section_id: int
    roi_id: int
    polygon_um: tuple[Point, ...]
    center_um: Point
    angle_deg: float
    template: int | None = None
    extra: dict = field(default_factory=dict)  # unknown keys, kept for round trips


def _angle_from_file(a: float) -> float:
    """File angle -> ours, in [-180, 180) (the map is its own inverse)."""
    return ((90.0 - a + 180.0) % 360.0) - 180.0


_angle_to_file = _angle_from_file


def _same_angle(a: float, b: float, tol: float = 1e-6) -> bool:
    d = (a - b) % 360.0
    return min(d, 360.0 - d) <= tol


def _fmt(x: float) -> str:
    return repr(float(x))


def _fmt_points(points: Iterable[Sequence[float]], scale: float) -> str:
    return ",".join(_fmt(v / scale) for p in points for v in p)


def _floats(text: str, where: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip() != ""]
    except ValueError:
        raise MagcFormatError(f"{where}: expected comma-separated numbers, got {text[:60]!r}") from None
    if not all(math.isfinite(v) for v in vals):
        raise MagcFormatError(f"{where}: contains NaN or inf")
    return vals


def _points(text: str, where: str, scale: float) -> tuple[Point, ...]:
    vals = _floats(text, where)
    if len(vals) % 2:
        raise MagcFormatError(f"{where}: odd number of coordinates ({len(vals)})")
    return tuple((vals[i] * scale, vals[i + 1] * scale) for i in range(0, len(vals), 2))


def _point(text: str, where: str, scale: float) -> Point:
    pts = _points(text, where, scale)
    if len(pts) != 1:
        raise MagcFormatError(f"{where}: expected one x,y pair, got {len(pts)}")
    return pts[0]


def _ids(text: str, where: str) -> list[int]:
    text = text.strip()
    if text in ("", "[]"):
        return []
    try:
        return [int(v) for v in text.strip("[]").split(",")]
    except ValueError:
        raise MagcFormatError(f"{where}: expected comma-separated integers, got {text[:60]!r}") from None


def _polygon_area(poly: Sequence[Point]) -> float:
    p = np.asarray(poly, float)
    x, y = p[:, 0], p[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)


def _size_in_frame(poly: Sequence[Point], angle_deg: float) -> Point:
    """Bounding-box size of a polygon in the frame rotated by angle_deg."""
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    p = np.asarray(poly, float)
    u = p[:, 0] * c + p[:, 1] * s
    v = -p[:, 0] * s + p[:, 1] * c
    return (float(u.max() - u.min()), float(v.max() - v.min()))


def _header_id(header: str, parts: int) -> tuple[int, ...]:
    bits = header.split(".")
    if len(bits) != parts + 1:
        raise MagcFormatError(f"[{header}]: expected {parts} numeric id(s) after the name")
    try:
        return tuple(int(b) for b in bits[1:])
    except ValueError:
        raise MagcFormatError(f"[{header}]: ids must be integers") from None


def _angle(sec: configparser.SectionProxy, where: str) -> float:
    """Our angle: the exact extra key if it agrees with the tools' key, else theirs."""
    if "angle" not in sec:
        exact = sec.get("stage_angle_deg")
        return float(exact) if exact is not None else 0.0
    file_angle = _floats(sec["angle"], f"{where}.angle")
    if len(file_angle) != 1:
        raise MagcFormatError(f"{where}.angle: expected one number")
    ours = _angle_from_file(file_angle[0])
    if "stage_angle_deg" in sec:
        exact = _floats(sec["stage_angle_deg"], f"{where}.stage_angle_deg")[0]
        if _same_angle(exact, ours):
            return exact
    return ours


def read_magc(path: str | os.PathLike, um_per_unit: float = 1.0):
    """Return ``(sections, rois, tsporder, landmarks)``:
    sections: list[Section] sorted by id; rois: list[Roi] sorted by (section, roi);
    tsporder: list[int] section ids (stage order; [] if absent);
    landmarks: dict[int, (x, y)]."""
    p = Path(path)
    cp = configparser.ConfigParser(interpolation=None)
    try:
        cp.read_string(p.read_text(encoding="utf-8"), source=str(p))
    except configparser.Error as exc:
        raise MagcFormatError(f"{p}: not a valid .magc/INI file ({exc})") from None
    k = float(um_per_unit)
    sections: list[Section] = []
    rois: list[Roi] = []
    landmarks: dict[int, Point] = {}
    tsporder: list[int] = []
    for header in cp.sections():
        sec = cp[header]
        name = header.split(".")[0]
        where = f"[{header}]"
        if name in ("sections", "section") and "." in header:
            (sid,) = _header_id(header, 1)
            if "polygon" not in sec:
                raise MagcFormatError(f"{where}.polygon: missing")
            poly = _points(sec["polygon"], f"{where}.polygon", k)
            angle = _angle(sec, where)
            if "center" in sec:
                center = _point(sec["center"], f"{where}.center", k)
            else:
                center = tuple(np.asarray(poly).mean(axis=0).tolist())
            if "size" in sec:
                size = _point(sec["size"], f"{where}.size", k)
            else:
                size = _size_in_frame(poly, angle)
            conf = _floats(sec["confidence"], f"{where}.confidence")[0] if "confidence" in sec else 1.0
            sections.append(Section(id=sid, center_um=center, size_um=size, angle_deg=angle,
                                    polygon_um=poly, confidence=conf))
        elif name in ("rois", "roi") and "." in header:
            ids = header.split(".")[1:]
            sid, rid = _header_id(header, 2) if len(ids) == 2 else (_header_id(header, 1)[0], 0)
            poly = _points(sec.get("polygon", ""), f"{where}.polygon", k)
            center = (_point(sec["center"], f"{where}.center", k) if "center" in sec
                      else tuple(np.asarray(poly).mean(axis=0).tolist()) if poly else (0.0, 0.0))
            template = int(sec["template"]) if "template" in sec else None
            known = {"polygon", "center", "angle", "area", "template", "stage_angle_deg"}
            rois.append(Roi(section_id=sid, roi_id=rid, polygon_um=poly, center_um=center,
                            angle_deg=_angle(sec, where), template=template,
                            extra={key: sec[key] for key in sec if key not in known}))
        elif name in ("landmarksEM", "landmarks", "landmark") and "." in header:
            (lid,) = _header_id(header, 1)
            if "location" not in sec:
                raise MagcFormatError(f"{where}.location: missing")
            landmarks[lid] = _point(sec["location"], f"{where}.location", k)
        elif header in ("tsporder", "stage_order"):
            tsporder = _ids(sec.get(header, "[]"), f"{where}.{header}")
    sections.sort(key=lambda s: s.id)
    rois.sort(key=lambda r: (r.section_id, r.roi_id))
    known_ids = {s.id for s in sections}
    unknown = [i for i in tsporder if i not in known_ids]
    if unknown and sections:
        raise MagcFormatError(f"[tsporder]: ids without a section: {unknown[:10]}")
    return sections, rois, tsporder, dict(sorted(landmarks.items()))


def magc_text(sections: Sequence[Section], rois: Sequence[Roi] | None = None,
              tsporder: Sequence[int] | None = None, landmarks: dict[int, Sequence[float]] | None = None,
              um_per_unit: float = 1.0, dialect: str = "sbemimage") -> str:
    """The .magc text for the given content (see ``write_magc``)."""
    if dialect not in ("sbemimage", "magfinder"):
        raise ValueError(f"dialect: expected 'sbemimage' or 'magfinder', got {dialect!r}")
    k = float(um_per_unit)
    rois = list(rois or [])
    ids = [s.id for s in sections]
    if len(set(ids)) != len(ids):
        raise MagcFormatError("sections: duplicate section ids")
    orphans = sorted({r.section_id for r in rois} - set(ids))
    if orphans:  # SBEMimage files a ROI under its section: one without fails its reader
        raise MagcFormatError(f"rois: section ids without a section: {orphans[:10]}")
    if tsporder is not None and sorted(set(tsporder) - set(ids)):
        raise MagcFormatError(f"tsporder: ids without a section: {sorted(set(tsporder) - set(ids))[:10]}")
    mf = dialect == "magfinder"
    cp = configparser.ConfigParser(interpolation=None)
    cp.optionxform = str  # keep key case; the tools write lower-case keys anyway
    cp["sections"] = {"number": str(len(sections))}
    for s in sorted(sections, key=lambda s: s.id):
        cp[f"{'section' if mf else 'sections'}.{s.id:04d}"] = {
            "polygon": _fmt_points(s.polygon_um, k),
            "center": _fmt_points([s.center_um], k),
            "area": _fmt(_polygon_area(s.polygon_um) / (k * k)),
            "angle": _fmt(_angle_to_file(s.angle_deg)),
            "stage_angle_deg": _fmt(s.angle_deg),
            "size": _fmt_points([s.size_um], k),
            "confidence": _fmt(s.confidence),
        }
    if rois:
        per_section: dict[int, int] = {}
        for r in rois:
            per_section[r.section_id] = per_section.get(r.section_id, 0) + 1
        if not mf and max(per_section.values()) > 1:
            raise MagcFormatError("rois: the sbemimage dialect stores one ROI per section; use dialect='magfinder'")
        cp["rois"] = {"number": str(len(rois))}
        for r in sorted(rois, key=lambda r: (r.section_id, r.roi_id)):
            header = f"roi.{r.section_id:04d}.{r.roi_id}" if mf else f"rois.{r.section_id:04d}"
            body = dict(r.extra)
            for key, val in body.items():
                if not mf and "%" in str(val):  # SBEMimage's configparser interpolates '%'
                    raise MagcFormatError(f"[{header}].{key}: '%' is not allowed in the sbemimage dialect")
            if r.template is not None:
                body["template"] = str(int(r.template))
            body.update({
                "polygon": _fmt_points(r.polygon_um, k),
                "center": _fmt_points([r.center_um], k),
                "area": _fmt(_polygon_area(r.polygon_um) / (k * k)) if len(r.polygon_um) >= 3 else "0.0",
                "angle": _fmt(_angle_to_file(r.angle_deg)),
                "stage_angle_deg": _fmt(r.angle_deg),
            })
            cp[header] = body
    if landmarks:
        name = "landmark" if mf else "landmarks"
        cp["landmarks"] = {"number": str(len(landmarks))}
        for lid, loc in sorted(landmarks.items()):
            cp[f"{name}.{int(lid):04d}"] = {"location": _fmt_points([loc], k)}
    order_key = "stage_order" if mf else "tsporder"
    order = list(tsporder or [])
    cp[order_key] = {order_key: ",".join(str(int(i)) for i in order) if order else "[]"}
    if mf:  # MagFinder also expects the cutting order; without one it is the id order
        cp["serial_order"] = {"serial_order": ",".join(str(i) for i in sorted(ids)) if ids else "[]"}
    buf = io.StringIO()
    cp.write(buf)
    return buf.getvalue()


def write_magc(path: str | os.PathLike, sections: Sequence[Section], rois: Sequence[Roi] | None = None,
               tsporder: Sequence[int] | None = None, landmarks: dict[int, Sequence[float]] | None = None,
               *, um_per_unit: float = 1.0, dialect: str = "sbemimage", overwrite: bool = False) -> Path:
    """Write a .magc file atomically (no clobber unless ``overwrite``)."""
    text = magc_text(sections, rois, tsporder, landmarks, um_per_unit=um_per_unit, dialect=dialect)
    return atomic_write_text(path, text, overwrite=overwrite)


# ------------------------------------------------------------ MagC <-> the wafer workflow's sections and grids
@dataclass
class MagcImport:
    """A MagC file in stage µm, as the wafer workflow uses it."""
    sections: list[Section]            # stage µm, by id
    rois: list[Roi]                    # stage µm
    grids: list                        # wafer.grids.Grid: one per ROI, or per section without one
    order: list[int]                   # section ids: the file's tsporder, then the rest by id
    landmarks: dict[int, Point]        # as in the file (overview units)
    transform: object                  # wafer.landmarks.Registration applied (file -> stage)
    registration: object | None = None  # the same when fitted to landmarks (residuals, RMS)


def import_magc(path: str | os.PathLike, *, stage_landmarks: dict[int, Sequence[float]] | None = None,
                um_per_unit: float = 1.0, origin_um: Sequence[float] = (0.0, 0.0),
                frame_size_px: Sequence[int] = (1024, 768), pixel_size_nm: float = 10.0, overlap_px: float = 0.0,
                margin_um: float = 0.0) -> MagcImport:
    """Read a .magc file and map it to the stage: by an affine fitted to
    ``stage_landmarks`` (id -> stage µm; wafer.landmarks.fit_affine) when given,
    else ``stage = origin_um + p * um_per_unit``. Each ROI gets the smallest grid
    of the given tiles covering it, turned with the ROI; a section without ROI
    gets one covering its outline."""
    from .grids import grid_for_points, tile_geometry
    from .landmarks import fit_affine, map_roi, map_section, scale_registration

    sections, rois, tsporder, landmarks = read_magc(path)
    registration = None
    if stage_landmarks is not None:
        if tuple(origin_um) != (0.0, 0.0) or um_per_unit != 1.0:
            raise ValueError("give stage landmarks or a pixel size/origin, not both: the landmarks fix both")
        registration = transform = fit_affine(landmarks, stage_landmarks)
    else:
        transform = scale_registration(um_per_unit, origin_um)
    sections = [map_section(transform, s) for s in sections]
    rois = [map_roi(transform, r) for r in rois]
    tile, ov = tile_geometry(frame_size_px, pixel_size_nm, overlap_px)
    frame = (int(frame_size_px[0]), int(frame_size_px[1]))
    grids = []
    with_roi = set()
    for r in rois:
        if len(r.polygon_um) < 3:
            continue
        with_roi.add(r.section_id)
        grids.append(grid_for_points(r.polygon_um, r.angle_deg, tile, ov, grid_id=r.roi_id, section_id=r.section_id,
                                     margin_um=margin_um, pixel_size_nm=pixel_size_nm, frame_size_px=frame))
    for s in sections:
        if s.id not in with_roi:
            grids.append(grid_for_points(s.polygon_um, s.angle_deg, tile, ov, grid_id=0, section_id=s.id,
                                         margin_um=margin_um, pixel_size_nm=pixel_size_nm, frame_size_px=frame))
    grids.sort(key=lambda g: (g.section_id, g.id))
    seen = set(tsporder)
    order = list(dict.fromkeys(tsporder)) + [s.id for s in sections if s.id not in seen]
    return MagcImport(sections, rois, grids, order, landmarks, transform, registration)


def rois_from_grids(grids: Iterable[tuple[int, int, object]]) -> list[Roi]:
    """MagC ROIs for ``(section id, grid id, common.geometry.TileGrid)`` items: the
    outline of the tiles, turned with the grid, so a tool that builds its grid
    from the ROI's rectangle images what ours would."""
    out = []
    for sid, gid, geo in grids:
        outline = tuple((float(x), float(y)) for x, y in geo.outline_um())
        out.append(Roi(section_id=int(sid), roi_id=int(gid), polygon_um=outline,
                       center_um=(float(geo.center_um[0]), float(geo.center_um[1])),
                       angle_deg=float(geo.rotation_deg)))
    return sorted(out, key=lambda r: (r.section_id, r.roi_id))
