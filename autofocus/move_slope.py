"""A gain learned from the autofocus loop's own moves.

At one location the loop sets states c (a wd, a stigmator value) and the
method reads corrections r that follow r = k·(focus − c): the slope of r
against c is −k whatever the location's focus. The slopes of all locations
seen are pooled with a ridge towards a prior (all of them for the column,
which does not change; the latest few for the specimen's stigmator gain),
and the correction is the reading over k.

Two users: the column's defocus scale (autofocus/column_scale.py, k =
(α/α_ref)²) and the stigmator gain per axis (``stig_gains``). DeepFocus reads
a stigmator error with a gain that depends on the specimen: astigmatism
shows only along directions the texture has edges in. On setup B,
recalibrated on the procedural specimen, the micrograph left out of
training read the column's stig y at 0.6-0.8 of its error near focus, so
from the seed's large start (30 µm, -6, 6) each step left a quarter of the
last and one location of nine still had 0.27 after three iterations (margin
0.25); learning the gain from the moves, every location ended within 0.15.
"""
from __future__ import annotations

import math
from typing import Optional

# a stigmator reading is trusted to within this factor of the model's (recalibrated) axes
STIG_GAIN_BOUNDS = (0.4, 2.5)
# what the model's own stig gain is worth against the moves, in stig units² of spread of the set
# values at a location: the large start's moves (3 units) outweigh it, a near-focus touch-up's
# (0.1 units) and the readings' scatter (~0.05 at 50 ns) do not
STIG_PRIOR_WEIGHT = 1.0
# the stig gain follows the specimen, which changes over a weeks-long run (section to section,
# wafer to wafer), so it pools only the latest locations (one seed grid); the column does not change
STIG_RECENT_LOCATIONS = 9


class MoveSlope:
    """k from the moves: prior, then the slope of readings against set states.

    prior_weight: how much spread of set states (summed squares about each
    location's mean) the prior is worth. near: only states within this
    distance of the location's own zero count (its zero from all its pairs).
    saturation: readings (``raw`` where given) this large carry no slope.
    recent: pool only this many latest locations (None: all)."""

    def __init__(self, prior: float, *, prior_weight: float, bounds: tuple[float, float],
                 near: float = math.inf, saturation: float = math.inf, recent: Optional[int] = None):
        self.prior = float(prior)
        self.prior_weight = float(prior_weight)
        self.bounds = (float(bounds[0]), float(bounds[1]))
        self.near = float(near)
        self.saturation = float(saturation)
        self.recent = recent
        self.locations: list[list[tuple[float, float]]] = [[]]

    @property
    def _weight(self) -> float:
        return self.prior_weight

    def begin_location(self) -> None:
        if self.locations[-1]:
            self.locations.append([])
        if self.recent is not None:
            del self.locations[:-self.recent]

    def observe(self, state: float, reading: float, *, raw: Optional[float] = None) -> None:
        raw = reading if raw is None else raw
        if math.isfinite(state) and math.isfinite(reading) and abs(raw) < self.saturation:
            self.locations[-1].append((float(state), float(reading)))

    def moments(self) -> tuple[float, float]:
        """(Σ(c − c̄)², Σ(c − c̄)(r − r̄)) pooled over locations, over the states
        within ``near`` of the location's zero: far out a reading may not be
        linear, and by its leverage it would set the slope alone."""
        sxx = sxy = 0.0
        for pts in self.locations:
            if len(pts) < 2:
                continue
            # the location's zero from all its pairs (their own slope where it has the right sign)
            cm, rm, lxx, lxy = _centred(pts)
            k = min(max(-lxy / lxx, self.bounds[0]), self.bounds[1]) if lxx > 0 and lxy < 0 else self.prior
            zero = cm + rm / k
            near = [(c, r) for c, r in pts if abs(c - zero) <= self.near]
            if len(near) >= 2:
                _, _, nxx, nxy = _centred(near)
                sxx, sxy = sxx + nxx, sxy + nxy
        return sxx, sxy

    @property
    def has_slope(self) -> bool:
        """Whether any location's moves have counted towards k yet."""
        return self.moments()[0] > 0

    @property
    def value(self) -> float:
        sxx, sxy = self.moments()
        w = self._weight
        k = (w * self.prior - sxy) / (w + sxx)
        return min(max(k, self.bounds[0]), self.bounds[1])


def _centred(pts) -> tuple[float, float, float, float]:
    """(c̄, r̄, Σ(c − c̄)², Σ(c − c̄)(r − r̄))."""
    cm = sum(c for c, _ in pts) / len(pts)
    rm = sum(r for _, r in pts) / len(pts)
    return cm, rm, sum((c - cm) ** 2 for c, _ in pts), sum((c - cm) * (r - rm) for c, r in pts)


def stig_gains() -> tuple[MoveSlope, MoveSlope]:
    """The stigmator gain of x and y, each learned from its own axis's moves.
    Which pairs count is the caller's choice (DeepFocusMethod.estimate: those
    whose wd reading is within column_scale.NEAR_UM of focus); their readings
    are in the units the corrections are applied in (after the column scale
    and a recalibrated stigmator map), so a column scale still being learned
    (no α stated) is partly taken up here."""
    def axis() -> MoveSlope:
        return MoveSlope(1.0, prior_weight=STIG_PRIOR_WEIGHT, bounds=STIG_GAIN_BOUNDS, recent=STIG_RECENT_LOCATIONS)
    return axis(), axis()
