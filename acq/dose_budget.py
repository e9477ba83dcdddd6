"""Exposure budget: how often a tile's area may be scanned in one cycle.

Every scan adds electron dose the section never gets back (seed 004 ch. 2:
irradiation changes the local mill rate), so the run counts, per tile and
cycle, from the journal (a crash does not reset the count):
  - each grab of the tile (first try, glitch retries, QC retries, a new
    version after a crash);
  - each autofocus run whose frame overlaps the tile (one scan pass, however
    many frames it took: the frames are journaled with it as dose);
  - each QC refocus on the tile.
Before the next scan would exceed the budget the run pauses with an
incident naming the tile instead. An operator resume in the GUI grants the
tile one more exposure (journaled); ``run --resume --max-exposures N``
raises the budget for the resumed run (journaled in run_start).
"""
from __future__ import annotations

import math
from typing import Iterable


class DoseBudgetReached(Exception):
    """The next scan of a tile would exceed its exposure budget."""

    def __init__(self, key: str, tile_id: str, count: int, budget: int):
        self.key, self.tile_id, self.count, self.budget = key, tile_id, count, budget
        super().__init__(f"tile {tile_id} has been exposed {count} time{'s' * (count != 1)} this cycle "
                         f"(budget {budget}); not imaging it again")


def _radius_um(frame_size, pixel_size_nm: float) -> float:
    """Radius of the circle around a frame (µm): a cheap, conservative
    overlap test that needs no rotation."""
    w, h = frame_size
    return 0.5 * math.hypot(w, h) * pixel_size_nm * 1e-3


def autofocus_area(ev) -> dict:
    """What an autofocus_done record keeps of where its frames were."""
    return {"center_um": [float(ev.center_um[0]), float(ev.center_um[1])],
            "radius_um": _radius_um(ev.step.frame_size, ev.step.pixel_size_nm), "section": ev.section,
            "grid": ev.grid}


def overlapping_autofocus(records: Iterable[dict], ev) -> int:
    """Autofocus runs of this cycle whose frames overlap the tile ``ev``."""
    (x, y), r = ev.center_um, _radius_um(ev.frame_size, ev.pixel_size_nm)
    n = 0
    for rec in records:
        c = rec.get("center_um")
        if c is None or rec.get("cycle", ev.cycle) != ev.cycle or rec.get("section", ev.section) != ev.section:
            continue
        if math.hypot(c[0] - x, c[1] - y) < r + float(rec.get("radius_um", 0.0)):
            n += 1
    return n


class ExposureBook:
    """Counts exposures from the journal's state; ``check`` before every scan."""

    def __init__(self, journal, budget: int):
        if budget < 1:
            raise ValueError(f"exposure budget {budget}: must be at least 1")
        self.journal, self.budget = journal, budget

    def count(self, ev) -> int:
        st = self.journal.state
        return st.exposures.get(ev.key, 0) + overlapping_autofocus(st.autofocus.values(), ev)

    def check(self, ev) -> int:
        """Raise DoseBudgetReached if one more scan of ``ev``'s tile exceeds
        the budget; else the count so far."""
        n = self.count(ev)
        granted = self.journal.state.exposures_granted.get(ev.key, 0)
        if n + 1 > self.budget + granted:
            raise DoseBudgetReached(ev.key, ev.tile_id, n, self.budget + granted)
        return n

    def extra(self, ev, n: int = 1, why: str = "retry") -> None:
        """Journal scans of the tile beyond its tile_started (glitch/QC retry, refocus)."""
        self.check(ev)
        self.journal.append("exposure", key=ev.key, n=n, why=why)

    def grant(self, key: str) -> None:
        self.journal.append("exposure_granted", key=key)


def budget_for(plan, setup_config) -> int:
    """The plan's budget if it sets one, else the setup's (default 3)."""
    want = plan.retries.max_exposures_per_tile
    return setup_config.safety.max_exposures_per_tile if want is None else want
