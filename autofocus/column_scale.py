"""How strongly this column's ±Δ pairs read against the model's reference column.

Why it exists: the two frames of a pair differ by the probe covariance
Σ₊ − Σ₋ = α²·Δ·A (devices/sim/optics.py), so a pair fixes α²·Δwd, not Δwd:
a defocus Δz at probe half-angle α looks exactly like 25 µm²/Δz at
α·|Δz|/5 µm. A DeepFocus model trained on referenced targets
(autofocus.data.referenced_target) therefore reads k·Δwd with
k = (α/α_ref)², and the correction is the reading over k.

k comes from the setup (calibration.probe_half_angle_mrad, the column's
nominal α; UNSTATED_ALPHA_MRAD where it says none) as a prior, and from the
loop's own moves: at one location the
readings r at pair centres c follow r = k·(focus − c), so their slope against
c is −k whatever the location's focus. The slopes of all locations seen are
pooled (one column per session) with a ridge towards the prior.
"""
from __future__ import annotations

import math
from typing import Optional

# the columns the model trained on (autofocus.data.COLUMN_RANGES: 2-25 mrad) at the 8 mrad reference
BOUNDS = ((2.0 / 8.0) ** 2, (25.0 / 8.0) ** 2)
# assumed where the setup states no α: a first step overshoots by k/k₀ at most 2x on real columns
# (5-15 mrad), so it still lands nearer focus (on the other side) and its move teaches the slope
UNSTATED_ALPHA_MRAD = 15.0 / math.sqrt(2.0)
# how far the moves may take a known α (stated by the setup to the precision of an aperture
# table, or a recalibrated model's own column): 1.5x either way
ALPHA_SPREAD = 1.5
# only pairs within this distance of focus (µm) count towards the slope
NEAR_UM = 12.0
# referenced targets are clipped here (wd µm, stig units): farther pairs read "far, this way"
TARGET_CLIP = (160.0, 40.0)


class ColumnScale:
    """k = (α/α_ref)² of the column in use: prior, then the loop's own moves.

    prior_weight_um2: how much spread of pair centres (µm², summed squares
    about each location's mean) the prior is worth; a 0.7 µm move equals it.
    saturation_um: readings this large (referenced µm) are the model's "far,
    this way" and carry no slope."""

    def __init__(self, prior: float = 1.0, *, prior_weight_um2: float = 0.25, saturation_um: float = 120.0,
                 alpha_spread: Optional[float] = None):
        if not (BOUNDS[0] <= prior <= BOUNDS[1]):
            raise ValueError(f"column scale prior {prior:.3g} is outside the trained columns "
                             f"({BOUNDS[0]:.3g}..{BOUNDS[1]:.3g}, 2-25 mrad at the 8 mrad reference)")
        self.prior = float(prior)
        # a known α (stated, or the model's own column) is kept within this factor: pairs far from
        # focus read low, and a slope through them would make a wide column look narrow
        self.bounds = BOUNDS if alpha_spread is None else (max(BOUNDS[0], prior / alpha_spread ** 2),
                                                           min(BOUNDS[1], prior * alpha_spread ** 2))
        self.prior_weight = float(prior_weight_um2)
        self.saturation = float(saturation_um)
        self.locations: list[list[tuple[float, float]]] = [[]]

    def begin_location(self) -> None:
        if self.locations[-1]:
            self.locations.append([])

    def observe(self, center_um: float, reading_um: float) -> None:
        """A pair centred at ``center_um`` (the wd, µm) read ``reading_um`` (referenced µm)."""
        if math.isfinite(center_um) and math.isfinite(reading_um) and abs(reading_um) < self.saturation:
            self.locations[-1].append((float(center_um), float(reading_um)))

    def moments(self) -> tuple[float, float]:
        """(Σ(c − c̄)², Σ(c − c̄)(r − r̄)) pooled over locations, over the pairs
        within NEAR_UM of the location's focus: pairs far out read their
        defocus low (at 15 mrad a 30 µm start with 6 units of astigmatism
        reads half of it), and by their leverage they would set the slope
        alone."""
        sxx = sxy = 0.0
        for pts in self.locations:
            if len(pts) < 2:
                continue
            # the location's focus from all its pairs (their own slope where it has the right sign)
            cm, rm, lxx, lxy = _centred(pts)
            k = min(max(-lxy / lxx, self.bounds[0]), self.bounds[1]) if lxx > 0 and lxy < 0 else self.prior
            focus = cm + rm / k
            near = [(c, r) for c, r in pts if abs(c - focus) <= NEAR_UM]
            if len(near) >= 2:
                _, _, nxx, nxy = _centred(near)
                sxx, sxy = sxx + nxx, sxy + nxy
        return sxx, sxy

    @property
    def value(self) -> float:
        sxx, sxy = self.moments()
        k = (self.prior_weight * self.prior - sxy) / (self.prior_weight + sxx)
        return min(max(k, self.bounds[0]), self.bounds[1])

    def alpha_mrad(self, alpha_ref_mrad: float) -> float:
        return alpha_ref_mrad * math.sqrt(self.value)


def _centred(pts) -> tuple[float, float, float, float]:
    """(c̄, r̄, Σ(c − c̄)², Σ(c − c̄)(r − r̄))."""
    cm = sum(c for c, _ in pts) / len(pts)
    rm = sum(r for _, r in pts) / len(pts)
    return cm, rm, sum((c - cm) ** 2 for c, _ in pts), sum((c - cm) * (r - rm) for c, r in pts)


def scale_of(alpha_mrad: Optional[float], alpha_ref_mrad: Optional[float]) -> float:
    """k = (α/α_ref)²; 1 for a column-specific model (no α_ref)."""
    if not alpha_ref_mrad:
        return 1.0
    return (float(alpha_mrad or UNSTATED_ALPHA_MRAD) / float(alpha_ref_mrad)) ** 2
