"""A column's stigmator axes for a referenced DeepFocus model (recalibration, issue 15).

A referenced model (autofocus/column_scale.py) already reads any column's
defocus once the column's α is known; what differs between microscopes is
the stigmator: its units, the angle of its axes against the scan, the scan
rotation. So recalibrating one needs no retraining: on `autofocus collect`
pairs of known aberration, the stig corrections the model reads (in the
axes of the columns it trained on) are mapped linearly onto this column's:

    (stig x, stig y)_column = (stig x, stig y, wd µm)_read · S      (S: 3 x 2)

The wd row takes up the stig a model reads from a strong defocus on a
column whose astigmatism axes lie differently. The fit minimises the L1
error (iteratively reweighted least squares), as the models' own training
does. On setup B (scan rotated 90°) the map reads stig x from the model's
stig y (0.97) and stig y from minus its stig x (-0.73). Unlike fine-tuning
the last layers on the ~90 collected pairs, it keeps the network's whole
range: the seed's large start (30 µm, -6, 6) on setup B reaches the margins
at 4-7 of 9 locations instead of none.

The map is fitted on the pairs near focus where there are enough of them:
the network's stig reading is not linear in the aberration (setup B: pairs
20 µm out read stig ~1.25x what pairs near focus do), and one linear map can
be right in one regime only. Near focus is where the loop's last iterations
decide the margin; far out, a step 20 % long still lands nearer. Fitted on
all of `recalibrate`'s pairs the map read setup B's stig 0.8x near focus and
the large start left 0.2-0.35 units at 4 of 9 locations after 3 iterations;
fitted near focus, 9/9 (procedural and ISBI specimens, 2048x1536 at 50 ns).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

MIN_PAIRS = 6            # twice the three unknowns of each stig axis
NEAR_FOCUS_UM = 5.0      # pairs whose wd correction is within this count as near focus
MIN_NEAR_PAIRS = 2 * MIN_PAIRS   # fewer near focus: the map is fitted on all pairs
ROWS = ("stig x", "stig y", "wd µm")


def fit(readings: np.ndarray, targets: np.ndarray, iterations: int = 30) -> np.ndarray:
    """S (3 x 2) with targets[:, 1:] ≈ [readings stig x, stig y, wd] · S,
    least absolute error, over the pairs within NEAR_FOCUS_UM of focus where at
    least MIN_NEAR_PAIRS are. readings, targets: (N, 3) of (wd µm, stig x, stig y)."""
    r, t = np.asarray(readings, float), np.asarray(targets, float)
    ok = np.isfinite(r).all(1) & np.isfinite(t).all(1)
    r, t = r[ok], t[ok]
    near = np.abs(t[:, 0]) <= NEAR_FOCUS_UM
    if near.sum() >= MIN_NEAR_PAIRS:
        r, t = r[near], t[near]
    if len(r) < MIN_PAIRS:
        raise ValueError(f"{len(r)} usable pairs; the stigmator map needs at least {MIN_PAIRS}")
    x, y = np.c_[r[:, 1:], r[:, :1]], t[:, 1:]
    s = np.linalg.lstsq(x, y, rcond=None)[0]
    for _ in range(iterations):
        w = 1.0 / np.maximum(np.abs(x @ s - y).sum(1), 1e-3)
        s = np.linalg.lstsq(x * np.sqrt(w)[:, None], y * np.sqrt(w)[:, None], rcond=None)[0]
    return s


def apply(s: np.ndarray, d_wd_um: float, d_stig: Sequence[float]) -> tuple[float, float]:
    sx, sy = np.array([d_stig[0], d_stig[1], d_wd_um], float) @ np.asarray(s, float)
    return float(sx), float(sy)


def to_card(s: np.ndarray) -> dict:
    return {"rows": list(ROWS), "columns": ["stig x", "stig y"], "values": np.round(s, 5).tolist()}


def from_card(card: dict) -> np.ndarray | None:
    m = (card.get("recalibration") or {}).get("stig_map")
    return None if not m else np.asarray(m["values"], float).reshape(3, 2)
