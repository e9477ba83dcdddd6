"""Focus that follows each section: where autofocus runs, and what wd/stig
each tile gets.

Memory: every section keeps the focus points of its latest autofocus (x, y,
wd, stig x, stig y; journaled in ``section_done`` as ``focus``), so the next
cycle starts from the section's own focus, not from whichever section was
imaged before it (wafer sections sit at different heights). With one point
that is the section's last wd/stig (a QC refocus included); with three or
more a plane through them gives every tile its wd/stig (a focus map), held
inside the span the points measured, so the map never asks for a focus no
autofocus found (each autofocus step was clamped by the safety guard, and the
guarded SEM checks the window again).

Locations: the spots are tile centres of the section. A spot must show
texture in the section's last images (not resin, a vessel or bare wafer: at
least half the section's median texture), lie outside the plan's forbidden
areas and not overlap the spots of the previous autofocus, so the dose of
repeated focusing spreads instead of piling up on one spot (the seed links
local irradiation to mill-rate changes). Several points are spread out
(farthest-point order) for a well-posed plane. The choice for the next cycle
is made when a section ends and journaled with it (``af_next``), so a
restart focuses where the run would have. Pinned spots are used as given
(rotated through when there are more than ``points``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import cv2
import numpy as np

Spot = tuple[float, float]
FocusRow = list[float]              # [x µm, y µm, wd m, stig x, stig y]


def block_cv(image: np.ndarray) -> np.ndarray:
    """Relative s.d. of each 8x8 block of 8x8-binned pixels (64 px blocks):
    binning removes most shot noise, dividing by the mean makes it
    brightness-independent (dark coated or bright silicon wafers alike)."""
    h, w = image.shape
    small = cv2.resize(image, (max(1, w // 8), max(1, h // 8)), interpolation=cv2.INTER_AREA).astype(np.float32)
    bh, bw = small.shape[0] // 8, small.shape[1] // 8
    if bh == 0 or bw == 0:
        return np.array([[small.std() / max(float(small.mean()), 1.0)]], np.float32)
    blocks = small[:bh * 8, :bw * 8].reshape(bh, 8, bw, 8)
    return blocks.std(axis=(1, 3)) / np.maximum(blocks.mean(axis=(1, 3)), 1.0)


def texture_score(contrast: np.ndarray) -> float:
    """How much a tile has to focus on: the median of its block contrasts (block_cv)."""
    return float(np.median(contrast))


def forbidden_area_at(spot: Spot, forbidden: Iterable[tuple[float, float, float]]):
    """The first (x µm, y µm, radius µm) area ``spot`` lies in (edge included), or None."""
    return next((f for f in forbidden if math.hypot(spot[0] - f[0], spot[1] - f[1]) <= f[2]), None)


def _spread(cands: Sequence[Spot], first: Spot, n: int) -> list[Spot]:
    """``first`` then the candidates farthest from those already taken."""
    out = [first]
    rest = [c for c in cands if c != first]
    while len(out) < n and rest:
        far = max(rest, key=lambda c: min(math.dist(c, o) for o in out))
        out.append(far)
        rest.remove(far)
    return out


def choose_spots(candidates: Sequence[Spot], n: int, centre: Spot, radius_um: float,
                 texture: Optional[dict[Spot, float]] = None, previous: Iterable[Spot] = (),
                 forbidden: Iterable[tuple[float, float, float]] = ()) -> list[Spot]:
    """Up to ``n`` autofocus spots among ``candidates`` (tile centres).

    ``radius_um``: half the autofocus frame's diagonal; spots closer than two
    of them to a previous spot would scan the same area again. Without
    texture (a section's first cycle) the spot nearest the centre comes first.
    When every candidate is excluded the least bad one is used (a run is
    never left without focus): the previous spots' farthest, outside the
    forbidden areas if any candidate is."""
    forbidden, previous = list(forbidden), list(previous)
    allowed = [c for c in candidates if forbidden_area_at(c, forbidden) is None]
    pool = allowed or list(candidates)
    if texture:
        known = [texture[c] for c in pool if c in texture]
        floor = 0.5 * float(np.median(known)) if known else 0.0
        textured = [c for c in pool if texture.get(c, floor) >= floor]
        pool = textured or pool
    fresh = [c for c in pool if all(math.dist(c, p) >= 2 * radius_um for p in previous)]
    if not fresh:
        far = max(pool, key=lambda c: min((math.dist(c, p) for p in previous), default=0.0))
        return [far]
    if texture:
        first = max(fresh, key=lambda c: (texture.get(c, 0.0), -math.dist(c, centre)))
    else:
        first = min(fresh, key=lambda c: math.dist(c, centre))
    return _spread(fresh, first, n)


def pinned_spots(pins: Sequence[Spot], n: int, cycle: int) -> list[Spot]:
    """``n`` of the operator's pinned spots, rotating through them by cycle."""
    k = len(pins)
    if k <= n:
        return list(pins)
    return [tuple(pins[(cycle * n + i) % k]) for i in range(n)]


@dataclass
class FocusPoint:
    x_m: float
    y_m: float
    wd_m: float
    stig: tuple[float, float]
    section: Optional[int] = None


def _fit_plane(pts: Sequence[FocusPoint]):
    """Least-squares planes for wd, stig x, stig y over centred coordinates;
    fewer than 3 points (or collinear ones) give the minimum-norm solution,
    i.e. a constant, or a slope only along the line of points."""
    xy = np.array([[p.x_m, p.y_m] for p in pts], float)
    vals = np.array([[p.wd_m, *p.stig] for p in pts], float)
    c = xy.mean(axis=0)
    if len(pts) < 3:
        return c, vals.mean(axis=0), np.zeros((2, 3))
    a = np.column_stack([np.ones(len(pts)), xy - c])
    coef, *_ = np.linalg.lstsq(a, vals, rcond=1e-9)
    return c, coef[0], coef[1:]


class FocusMap:
    """wd/stig anywhere from the autofocus points.

    mode "plane": one least-squares plane (tilted wafer) over all points, ≥ 3
    points for a slope. mode "section": a plane per section where it has ≥ 3
    points, else that section's mean; unknown sections use the global plane."""

    def __init__(self, mode: str = "plane"):
        if mode not in ("plane", "section"):
            raise ValueError("FocusMap mode is 'plane' or 'section'")
        self.mode = mode
        self.points: list[FocusPoint] = []
        self._fits: dict = {}

    def add(self, x_m: float, y_m: float, wd_m: float, stig: tuple[float, float],
            section: Optional[int] = None) -> None:
        self.points.append(FocusPoint(float(x_m), float(y_m), float(wd_m), (float(stig[0]), float(stig[1])),
                                      section))
        self._fits.clear()

    def add_trace(self, x_m: float, y_m: float, trace, section: Optional[int] = None) -> bool:
        """Use a finished autofocus (autofocus.loop.AutofocusTrace) only if it converged or ran its course."""
        if not trace.ok:
            return False
        self.add(x_m, y_m, trace.final_wd_m, trace.final_stig, section)
        return True

    def _fit(self, key):
        if key not in self._fits:
            pts = self.points if key is None else [p for p in self.points if p.section == key]
            self._fits[key] = _fit_plane(pts)
        return self._fits[key]

    def at(self, x_m: float, y_m: float, section: Optional[int] = None) -> tuple[float, tuple[float, float]]:
        if not self.points:
            raise ValueError("focus map has no points")
        key = None
        if self.mode == "section" and section is not None and any(p.section == section for p in self.points):
            key = section
        c, v0, grad = self._fit(key)
        v = v0 + np.array([x_m - c[0], y_m - c[1]]) @ grad
        return float(v[0]), (float(v[1]), float(v[2]))

    def slope_um_per_mm(self) -> tuple[float, float]:
        """wd tilt of the global plane (µm of wd per mm of stage)."""
        _, _, grad = self._fit(None)
        return float(grad[0, 0] * 1e3), float(grad[1, 0] * 1e3)

    def residuals_m(self) -> np.ndarray:
        return np.array([p.wd_m - self.at(p.x_m, p.y_m, p.section)[0] for p in self.points])


def focus_at(rows: Sequence[FocusRow], x_um: float, y_um: float) -> tuple[float, tuple[float, float]]:
    """wd/stig at a stage position from a section's focus points: the value
    itself for one point, a least-squares plane for three or more (the mean
    for two), held inside the span the points measured."""
    if len(rows) == 1:
        r = rows[0]
        return float(r[2]), (float(r[3]), float(r[4]))
    fmap = FocusMap("plane")
    for x, y, wd, sx, sy in rows:
        fmap.add(x * 1e-6, y * 1e-6, wd, (sx, sy))
    wd, (sx, sy) = fmap.at(x_um * 1e-6, y_um * 1e-6)
    a = np.asarray(rows, float)
    lo, hi = a[:, 2:].min(axis=0), a[:, 2:].max(axis=0)
    wd, sx, sy = np.clip([wd, sx, sy], lo, hi)
    return float(wd), (float(sx), float(sy))


def _records_of(records: Iterable[dict], section: int, cycle: int) -> list[dict]:
    """The autofocus_done records of a section in a cycle that say where they focused."""
    return [r for r in records if r.get("section") == section and r.get("cycle") == cycle and "center_um" in r]


def _rows(records: Iterable[dict]) -> list[FocusRow]:
    """Focus points of the autofocus runs that succeeded."""
    return [[float(r["center_um"][0]), float(r["center_um"][1]), float(r["wd_m"]), float(r["stig"][0]),
             float(r["stig"][1])] for r in records if r.get("ok", True)]


def af_radius_um(step) -> float:
    """Half the diagonal of the autofocus frame, µm."""
    w, h = step.frame_size
    return 0.5 * math.hypot(w, h) * step.pixel_size_nm * 1e-3


def spot_group(step, grid: Optional[int]) -> str:
    """Key of a group of autofocus spots in ``af_next``: the grid (per_grid) or the section."""
    return str(grid) if step.where == "per_grid" and grid is not None else "section"


class SectionFocus:
    """The engine's side: sets a section's remembered focus before its
    autofocus and tiles, and says what the section's ``section_done`` record
    keeps (``fields``). State lives in the journal (``JournalState``:
    ``autofocus`` for this cycle's points, ``section_focus`` across cycles),
    so a restart continues from the same focus."""

    def __init__(self, sem, step, state: Callable[[], object]):
        self.sem, self.step, self._state = sem, step, state
        self._entered: Optional[tuple[int, int]] = None      # (cycle, section) whose focus is applied
        self._tile_rows: Optional[list[FocusRow]] = None      # its rows, until the next autofocus

    @property
    def st(self):
        return self._state()

    @property
    def remembers(self) -> bool:
        """Manual focus (method none) is the operator's: never overridden."""
        return self.step.memory == "per_section" and self.step.method != "none"

    def _memory(self, section: int) -> Optional[list[FocusRow]]:
        mem = self.st.section_focus.get(section) if self.remembers else None
        return mem.get("focus") if mem else None

    def rows(self, section: int, cycle: int) -> Optional[list[FocusRow]]:
        """This cycle's autofocus points of the section, else its memory."""
        return _rows(_records_of(self.st.autofocus.values(), section, cycle)) or self._memory(section)

    def _set(self, wd: float, stig: tuple[float, float]) -> None:
        """Through the guarded SEM (windows checked); only what changes."""
        if abs(self.sem.working_distance() - wd) > 1e-9:
            self.sem.set_working_distance(wd)
        sx, sy = self.sem.stig()
        if abs(sx - stig[0]) > 1e-6 or abs(sy - stig[1]) > 1e-6:
            self.sem.set_stig(*stig)

    def before_autofocus(self, ev) -> None:
        """Start the autofocus from the section's own focus at its spot."""
        self._entered, self._tile_rows = (ev.cycle, ev.section), None     # its result changes the rows
        rows = self._memory(ev.section)
        if rows:
            self._set(*focus_at(rows, *ev.center_um))

    def before_tile(self, ev) -> None:
        """A section's first tile of a cycle starts from its focus; with a
        focus map (two or more points) every tile gets the map's value."""
        if ev.overview:
            return
        entering = self._entered != (ev.cycle, ev.section)
        if entering or self._tile_rows is None:      # not read from the journal again for every tile
            self._entered, self._tile_rows = (ev.cycle, ev.section), self.rows(ev.section, ev.cycle) or []
        rows = self._tile_rows
        if rows and (entering or len(rows) > 1):
            self._set(*focus_at(rows, *ev.center_um))

    def fields(self, cycle: int, section: int, tiles: Sequence, texture_now: dict[str, float]) -> dict:
        """What ``section_done`` keeps: ``focus`` (the points to start from
        next time; with one point the wd/stig the section ended with),
        ``af_used`` (the spots of its latest autofocus) and ``af_next`` (the
        spots for its next autofocus, one list per group). ``tiles``: the
        section's AcquireTile events this cycle; ``texture_now``: tile key ->
        texture score of the tiles taken in this process (the journal has
        those taken before a restart)."""
        st = self.st
        mem = st.section_focus.get(section, {})
        texture = {t.key: st.tile_qc[t.key]["texture"] for t in tiles if "texture" in st.tile_qc.get(t.key, {})}
        texture.update((t.key, texture_now[t.key]) for t in tiles if t.key in texture_now)
        recs = _records_of(st.autofocus.values(), section, cycle)
        af_spots: dict[str, list] = {}
        for rec in recs:
            af_spots.setdefault(spot_group(self.step, rec.get("grid")), []).append(rec["center_um"])
        rows = _rows(recs) or mem.get("focus")
        if self.step.points == 1 or not rows:
            at = rows[0][:2] if rows else list(tiles[0].center_um) if tiles else [0.0, 0.0]
            rows = [[float(at[0]), float(at[1]), float(self.sem.working_distance()), *map(float, self.sem.stig())]]
        used = {g: [list(map(float, s)) for s in spots] for g, spots in af_spots.items()} or mem.get("af_used", {})
        out = {"focus": rows, "af_used": used}
        if self.step.locations == "auto" and section not in self.step.pinned:
            groups: dict[str, list] = {}
            for t in tiles:
                groups.setdefault(spot_group(self.step, t.grid), []).append(t)
            nxt = {}
            for g, ts in groups.items():
                cands = [tuple(t.center_um) for t in ts]
                tex = {tuple(t.center_um): texture[t.key] for t in ts if t.key in texture}
                centre = tuple(np.mean(cands, axis=0))
                nxt[g] = [list(s) for s in choose_spots(
                    cands, self.step.points, centre, af_radius_um(self.step), tex,
                    [tuple(s) for s in used.get(g, [])], self.step.forbidden)]
            out["af_next"] = nxt
        return out
