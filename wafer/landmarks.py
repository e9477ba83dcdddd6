"""Landmark registration: overview (MagC / wafer-image) coordinates -> stage µm.

The operator measures the stage position of three or more landmarks whose
overview coordinates a MagC file holds; a least-squares affine
``stage = A @ p + t`` maps every section and ROI. An affine (not a similarity)
absorbs a flipped or sheared overview and different x/y pixel sizes. With
exactly three landmarks the fit is exact and the residuals (0) prove nothing;
a fourth gives a check.

Stage landmark file (``load_stage_landmarks``), micrometres:

* CSV with a header row naming ``id``, ``x_um``, ``y_um`` (other columns ignored)::

      id,x_um,y_um
      0,-4512.5,3120.0

* JSON: ``[{"id": 0, "x_um": ..., "y_um": ...}, ...]``, the same list under
  ``"landmarks"``, or ``{"0": [x_um, y_um], ...}``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from common.geometry import Section

Point = tuple[float, float]

# Smallest/largest spread of the landmark cloud below which it counts as a line:
# the affine across the line would be fitted to rounding noise.
COLLINEAR_RATIO = 1e-6


class LandmarkError(ValueError):
    """Too few, degenerate or unreadable landmarks; the message says which and why."""


@dataclass(frozen=True)
class Registration:
    """A fitted overview -> stage affine and how well it fits each landmark."""
    matrix: np.ndarray                     # (2, 2) linear part A
    offset: Point                          # t
    ids: tuple[int, ...]                   # landmarks used, sorted
    residuals_um: tuple[Point, ...]        # fitted - measured stage position, per id
    unmatched: tuple[int, ...] = ()        # MagC landmarks without a stage position

    @property
    def residual_norms_um(self) -> tuple[float, ...]:
        return tuple(math.hypot(dx, dy) for dx, dy in self.residuals_um)

    @property
    def rms_um(self) -> float:
        r = np.asarray(self.residuals_um, float)
        return float(np.sqrt((r ** 2).sum(axis=1).mean())) if len(r) else 0.0

    @property
    def exact(self) -> bool:
        """Three landmarks: the affine has as many unknowns as equations."""
        return len(self.ids) == 3

    def apply(self, points) -> np.ndarray:
        p = np.asarray(points, float)
        return p @ self.matrix.T + np.asarray(self.offset)

    def inverse(self) -> "Registration":
        """stage -> overview (residuals are not carried over)."""
        inv = np.linalg.inv(self.matrix)
        return Registration(inv, tuple((-inv @ np.asarray(self.offset)).tolist()), self.ids, ())

    def scale_rotation(self) -> tuple[float, float, float, bool]:
        """(µm per unit along x, along y, rotation of the x axis in degrees, flipped)."""
        a = self.matrix
        sx, sy = float(np.hypot(*a[:, 0])), float(np.hypot(*a[:, 1]))
        return sx, sy, math.degrees(math.atan2(a[1, 0], a[0, 0])), bool(np.linalg.det(a) < 0)

    def summary(self) -> str:
        sx, sy, rot, flip = self.scale_rotation()
        lines = [f"landmark registration: {len(self.ids)} landmarks, RMS {self.rms_um:.3f} µm"
                 f" (scale {sx:.6g} x {sy:.6g} µm/unit, rotation {rot:.3f}°{', flipped' if flip else ''})"]
        for lid, (dx, dy), n in zip(self.ids, self.residuals_um, self.residual_norms_um):
            lines.append(f"  landmark {lid}: residual {n:.3f} µm ({dx:+.3f}, {dy:+.3f})")
        if self.exact:
            lines.append("  3 landmarks fit exactly: residuals cannot show an error; measure a 4th to check")
        if self.unmatched:
            lines.append(f"  not used (no stage position): {list(self.unmatched)}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"matrix": self.matrix.tolist(), "offset_um": list(self.offset), "ids": list(self.ids),
                "residuals_um": {str(i): list(r) for i, r in zip(self.ids, self.residuals_um)},
                "rms_um": self.rms_um, "unmatched": list(self.unmatched)}


def fit_affine(overview: Mapping[int, Sequence[float]], stage: Mapping[int, Sequence[float]]) -> Registration:
    """Least-squares affine from ``overview`` to ``stage`` landmark positions,
    matched by id. Raises LandmarkError for unknown ids, fewer than 3 common
    landmarks, or a (nearly) collinear set."""
    extra = sorted(set(stage) - set(overview))
    if extra:
        raise LandmarkError(f"stage landmarks {extra} are not in the MagC file (it has {sorted(overview)})")
    ids = tuple(sorted(set(overview) & set(stage)))
    if len(ids) < 3:
        raise LandmarkError(f"need at least 3 landmarks with both positions for an affine, got {len(ids)}"
                            f" ({list(ids)})")
    src = np.array([overview[i] for i in ids], float).reshape(-1, 2)
    dst = np.array([stage[i] for i in ids], float).reshape(-1, 2)
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise LandmarkError("landmark coordinates must be finite")
    for name, pts in (("overview", src), ("stage", dst)):
        s = np.linalg.svd(pts - pts.mean(axis=0), compute_uv=False)
        if s[0] == 0 or s[1] <= COLLINEAR_RATIO * s[0]:
            raise LandmarkError(f"landmarks {list(ids)} lie on one line in {name} coordinates: "
                                "an affine needs 3 landmarks that span a triangle")
    design = np.hstack([src, np.ones((len(ids), 1))])
    sol, *_ = np.linalg.lstsq(design, dst, rcond=None)     # (3, 2): [A^T; t]
    reg = Registration(sol[:2].T.copy(), (float(sol[2, 0]), float(sol[2, 1])), ids, ())
    res = reg.apply(src) - dst
    return replace(reg, residuals_um=tuple((float(x), float(y)) for x, y in res),
                   unmatched=tuple(sorted(set(overview) - set(stage))))


# ------------------------------------------------------------ stage landmark files
def _number(value, where: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise LandmarkError(f"{where}: expected a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(v):
        raise LandmarkError(f"{where}: expected a finite number, got {value!r}")
    return v


def _ident(value, where: str) -> int:
    try:
        i = int(str(value).strip())
    except ValueError:
        raise LandmarkError(f"{where}: expected an integer id, got {value!r}") from None
    return i


def _put(out: dict, lid: int, xy: Point, where: str) -> None:
    if lid in out:
        raise LandmarkError(f"{where}: landmark id {lid} given twice")
    out[lid] = xy


def parse_stage_landmarks(text: str, source: str = "landmarks", *, fmt: str | None = None) -> dict[int, Point]:
    """``{id: (x_um, y_um)}`` from CSV or JSON text (``fmt`` "csv"/"json"; guessed when None)."""
    fmt = fmt or ("json" if text.lstrip()[:1] in ("[", "{") else "csv")
    out: dict[int, Point] = {}
    if fmt == "json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LandmarkError(f"{source}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if isinstance(obj, dict) and "landmarks" in obj:
            obj = obj["landmarks"]
        if isinstance(obj, dict):
            for key, xy in obj.items():
                where = f"{source}[{key!r}]"
                if not isinstance(xy, (list, tuple)) or len(xy) != 2:
                    raise LandmarkError(f"{where}: expected [x_um, y_um], got {xy!r}")
                _put(out, _ident(key, where), (_number(xy[0], where + "[0]"), _number(xy[1], where + "[1]")), where)
        elif isinstance(obj, list):
            for n, row in enumerate(obj):
                where = f"{source}[{n}]"
                if not isinstance(row, dict) or not {"id", "x_um", "y_um"} <= set(row):
                    raise LandmarkError(f"{where}: expected an object with id, x_um, y_um, got {row!r}")
                _put(out, _ident(row["id"], where + ".id"),
                     (_number(row["x_um"], where + ".x_um"), _number(row["y_um"], where + ".y_um")), where)
        else:
            raise LandmarkError(f"{source}: expected a list of {{id, x_um, y_um}} or an object id -> [x_um, y_um]")
    elif fmt == "csv":
        rows = list(csv.reader(io.StringIO(text)))
        rows = [r for r in rows if any(c.strip() for c in r) and not r[0].lstrip().startswith("#")]
        if not rows:
            raise LandmarkError(f"{source}: empty")
        head = [c.strip().lower() for c in rows[0]]
        missing = [c for c in ("id", "x_um", "y_um") if c not in head]
        if missing:
            raise LandmarkError(f"{source}: the header row must name id, x_um, y_um; missing {missing} "
                                f"(got {rows[0]})")
        col = {c: head.index(c) for c in ("id", "x_um", "y_um")}
        for n, row in enumerate(rows[1:], start=2):
            where = f"{source} line {n}"
            if len(row) < len(head):
                raise LandmarkError(f"{where}: expected {len(head)} columns, got {len(row)}")
            _put(out, _ident(row[col["id"]], where + " id"),
                 (_number(row[col["x_um"]], where + " x_um"), _number(row[col["y_um"]], where + " y_um")), where)
    else:
        raise LandmarkError(f"format: expected 'csv' or 'json', got {fmt!r}")
    return out


def load_stage_landmarks(path: str | os.PathLike) -> dict[int, Point]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LandmarkError(f"stage landmark file not found: {p}") from None
    fmt = {".json": "json", ".csv": "csv"}.get(p.suffix.lower())
    return parse_stage_landmarks(text, str(p), fmt=fmt)


# ------------------------------------------------------------ mapping sections and ROIs
def map_angle(matrix: np.ndarray, angle_deg: float) -> float:
    """Where a direction at ``angle_deg`` points after the linear map, in [-180, 180)."""
    a = math.radians(angle_deg)
    d = np.asarray(matrix, float) @ np.array([math.cos(a), math.sin(a)])
    return ((math.degrees(math.atan2(d[1], d[0])) + 180.0) % 360.0) - 180.0


def map_section(reg: Registration, s: Section) -> Section:
    """The section in stage µm: outline and centre mapped; its width axis
    follows the map; sizes scale by how much the map stretches each axis."""
    a = math.radians(s.angle_deg)
    u = np.array([math.cos(a), math.sin(a)])
    v = np.array([-math.sin(a), math.cos(a)])
    w = float(np.linalg.norm(reg.matrix @ u)) * s.size_um[0]
    h = float(np.linalg.norm(reg.matrix @ v)) * s.size_um[1]
    c = reg.apply([s.center_um])[0]
    return Section(id=s.id, center_um=(float(c[0]), float(c[1])), size_um=(w, h),
                   angle_deg=map_angle(reg.matrix, s.angle_deg), polygon_um=reg.apply(s.polygon_um),
                   confidence=s.confidence)


def map_roi(reg: Registration, r):
    """A wafer.magc.Roi in stage µm."""
    poly = tuple(tuple(map(float, p)) for p in reg.apply(r.polygon_um)) if len(r.polygon_um) else ()
    c = reg.apply([r.center_um])[0]
    return replace(r, polygon_um=poly, center_um=(float(c[0]), float(c[1])),
                   angle_deg=map_angle(reg.matrix, r.angle_deg))


def scale_registration(um_per_unit: float = 1.0, origin_um: Sequence[float] = (0.0, 0.0)) -> Registration:
    """The plain overview mapping (stage = origin + p * pixel size) as a Registration without landmarks."""
    k = float(um_per_unit)
    if not (k > 0 and math.isfinite(k)):
        raise LandmarkError(f"pixel size: must be a positive number, got {um_per_unit!r}")
    return Registration(np.eye(2) * k, (float(origin_um[0]), float(origin_um[1])), (), ())
