"""How strongly this column's ±Δ pairs read against the model's reference column.

Why it exists: the two frames of a pair differ by the probe covariance
Σ₊ − Σ₋ = α²·Δ·A (devices/sim/optics.py), so a pair fixes α²·Δwd, not Δwd:
a defocus Δz at probe half-angle α looks exactly like 25 µm²/Δz at
α·|Δz|/5 µm. A DeepFocus model trained on referenced targets
(autofocus.data.referenced_target) therefore reads k·Δwd with
k = (α/α_ref)², and the correction is the reading over k.

k comes from the setup (calibration.probe_half_angle_mrad, the column's
nominal α; UNSTATED_ALPHA_MRAD where it says none) as a prior, and from the
loop's own moves (autofocus/move_slope.py): at one location the readings r
at pair centres c follow r = k·(focus − c), so their slope against c is −k
whatever the location's focus.

Where the frames allow, the pair is fed to the model at the pixel size that
makes the column look like the reference column at the card's pixel
(``model_pixel``): blur in pixels goes as α·Δz/pixel, so an α column fed at
pixel p reads like an α·p_card/p column, and the reading is brought back to
the card's pixel by (p/p_card)². Near focus, a 3 mrad column's first step
fed at its 10 nm frames errs a third as much as at the card's 20 nm, where
a ±5 µm pair moves the blur by a third of a pixel per µm.
"""
from __future__ import annotations

import math
from typing import Optional

from autofocus.move_slope import MoveSlope

# the columns the model trained on (autofocus.data.COLUMN_RANGES: 2-25 mrad) at the 8 mrad reference
BOUNDS = ((2.0 / 8.0) ** 2, (25.0 / 8.0) ** 2)
# assumed where the setup states no α: a first step overshoots by k/k₀ at most 2x on real columns
# (5-15 mrad), so it still lands nearer focus (on the other side) and its move teaches the slope
UNSTATED_ALPHA_MRAD = 15.0 / math.sqrt(2.0)
# how far the moves may take a known α (stated by the setup to the precision of an aperture
# table, or a recalibrated model's own column): 1.5x either way
ALPHA_SPREAD = 1.5
# what a known α (stated by the setup, measured by recalibration, or a column-specific model's own
# column) is worth against the moves, in
# µm² of pair-centre spread: it gives k to about ±40 %, and a near-focus reading at 50 ns scatters
# ~0.4 µm, so moves spread by about 1 µm² teach as much. At the unknown-α weight (0.25) two
# iterations 0.5 µm apart at the first location taught a 5.7 mrad column for 8 and every later
# large start overshot by 20 µm (stage O, setup A). This is for pairs fed where the column looks
# like the reference; see ColumnScale.observe for the others
KNOWN_PRIOR_WEIGHT_UM2 = 1.0
# an assumed α (none stated) is worth a 0.7 µm move: the first moves take over
UNKNOWN_PRIOR_WEIGHT_UM2 = 0.25
# only pairs within this distance of focus (µm) count towards the slope
NEAR_UM = 12.0
# resampling to the model pixel keeps at least this many patches across the frame's short side
MIN_PATCHES_ACROSS = 2
# and feeds no coarser than this times the card's pixel: resampled further, a wide column looks
# like the reference one, but its specimen and noise do not look like the card pixel's. The first
# step of a 22 mrad column at 6 µm of defocus read 4.0 µm fed at 55 nm (2048x1536 frames) and
# 5.2-5.3 µm at 30 nm (1024x768 frames); capped, both frame sizes read alike (stage V)
MAX_FEED_COARSENING = 1.5
# referenced targets are clipped here (wd µm, stig units): farther pairs read "far, this way"
TARGET_CLIP = (160.0, 40.0)


class ColumnScale(MoveSlope):
    """k = (α/α_ref)² of the column in use: prior, then the loop's own moves
    (pair centres in µm against referenced readings in µm).

    prior_weight_um2: how much spread of pair centres (µm², summed squares
    about each location's mean) the prior is worth; by default
    KNOWN_PRIOR_WEIGHT_UM2 for a known α (alpha_spread given), else
    UNKNOWN_PRIOR_WEIGHT_UM2.
    saturation_um: readings this large (referenced µm) are the model's "far,
    this way" and carry no slope. Only pairs within NEAR_UM of the location's
    focus count: pairs far out read their defocus low (at 15 mrad a 30 µm
    start with 6 units of astigmatism reads half of it)."""

    def __init__(self, prior: float = 1.0, *, prior_weight_um2: Optional[float] = None,
                 saturation_um: float = 120.0, alpha_spread: Optional[float] = None):
        if not (BOUNDS[0] <= prior <= BOUNDS[1]):
            raise ValueError(f"column scale prior {prior:.3g} is outside the trained columns "
                             f"({BOUNDS[0]:.3g}..{BOUNDS[1]:.3g}, 2-25 mrad at the 8 mrad reference)")
        # a known α (stated, or the model's own column) is kept within this factor: pairs far from
        # focus read low, and a slope through them would make a wide column look narrow
        bounds = BOUNDS if alpha_spread is None else (max(BOUNDS[0], prior / alpha_spread ** 2),
                                                      min(BOUNDS[1], prior * alpha_spread ** 2))
        if prior_weight_um2 is None:
            prior_weight_um2 = UNKNOWN_PRIOR_WEIGHT_UM2 if alpha_spread is None else KNOWN_PRIOR_WEIGHT_UM2
        super().__init__(prior, prior_weight=prior_weight_um2, bounds=bounds, near=NEAR_UM,
                         saturation=saturation_um)
        self.known = alpha_spread is not None
        self.feed_gain = self.prior          # (feed pixel / card pixel)² of the pairs: see observe

    @property
    def _weight(self) -> float:
        return self.prior_weight * (self.feed_gain / self.prior) ** 2 if self.known else self.prior_weight

    def observe(self, center_um: float, reading_um: float, feed_gain: Optional[float] = None) -> None:
        """A pair centred at ``center_um`` (the wd, µm) read ``reading_um`` (referenced µm),
        fed to the model at (feed pixel / card pixel)² = ``feed_gain``: the model's own
        output was reading_um / feed_gain (the saturation is the model's). None: the
        model's own output, fed where the column looks like the reference.

        The model's scatter (raw µm) is about the same at any feed, so a
        referenced reading scatters feed_gain times it while its slope is k: a
        known α is worth (feed_gain/k)² times its weight against the moves. Fed
        where the column looks like the reference, feed_gain = k and nothing
        changes; a 3 mrad column fed at its 10 nm frames (0.25, k 0.14) reads
        near focus 1.8x noisier against its slope, and at weight 1 two
        near-focus pairs 2 µm apart taught it as 4 mrad at the first location,
        so later large starts stopped 16 µm short (1 of 9 in the margins on a
        micrograph never trained on; 5 of 9 at (feed_gain/k)² = 3.2)."""
        raw = reading_um
        if feed_gain is not None:
            self.feed_gain = float(feed_gain)
            raw = reading_um / self.feed_gain
        super().observe(center_um, reading_um, raw=raw)

    def alpha_mrad(self, alpha_ref_mrad: float) -> float:
        return alpha_ref_mrad * math.sqrt(self.value)


def scale_of(alpha_mrad: Optional[float], alpha_ref_mrad: Optional[float]) -> float:
    """k = (α/α_ref)²; 1 for a column-specific model (no α_ref)."""
    if not alpha_ref_mrad:
        return 1.0
    return (float(alpha_mrad or UNSTATED_ALPHA_MRAD) / float(alpha_ref_mrad)) ** 2


def model_pixel(alpha_mrad: float, alpha_ref_mrad: Optional[float], card_pixel_m: float, pixel_m: float,
                short_side_px: int, patch: int, max_coarsening: Optional[float] = MAX_FEED_COARSENING) -> float:
    """Pixel size (m) to feed a pair of a column of ``alpha_mrad``, taken at
    ``pixel_m``, to a model read at ``alpha_ref_mrad`` on ``card_pixel_m``
    pixels: the one where the column looks like the reference column, never
    finer than the frame (interpolation adds its own blur: a 3 mrad column
    upsampled to 6 nm read 88 % low) and never so coarse that fewer than
    MIN_PATCHES_ACROSS patches fit across the short side (unless the card's
    own pixel is coarser) or coarser than max_coarsening x the card's pixel
    (None: as coarse as the frame allows). A column-specific model (no α_ref):
    its card pixel.

    Why the reference and not where the reading is most linear: fed where an
    8 mrad column looks like 10 mrad (16 nm) the first step's worst error over
    |Δz| <= 20 µm fell from 23 to 7 %, but the loop's near-focus readings got
    noisier (fewer frame pixels averaged at 50 ns) and large starts on the
    held-out micrograph fell from 7 to 1 of 9."""
    if not alpha_ref_mrad:
        return card_pixel_m
    coarsest = short_side_px * pixel_m / (MIN_PATCHES_ACROSS * patch)
    if max_coarsening is not None:
        coarsest = min(coarsest, max_coarsening * card_pixel_m)
    coarsest = max(card_pixel_m, coarsest)
    return max(pixel_m, min(card_pixel_m * alpha_mrad / alpha_ref_mrad, coarsest))
