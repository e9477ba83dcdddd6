"""Progress of a run from its documents: tiles per cycle / section / run and
the ETA from the tile rate of this session (no Qt, easy to test)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from acq.runner import Pause, PauseReason


@dataclass
class RunProgress:
    n_cycles: int
    tiles_per_cycle: int
    tiles_per_section: dict[int, int]
    done_before: int = 0                     # tiles journaled done by earlier runs (resume)
    tiles: int = 0                           # acquired in this run
    cycle: int = 0
    section: Optional[int] = None
    section_tiles: int = 0
    cycle_tiles: int = 0
    t0: float = field(default_factory=time.monotonic)
    t_first: Optional[float] = None
    exposures: dict[str, int] = field(default_factory=dict)   # tile id -> scans this cycle (dose budget)

    @classmethod
    def for_plan(cls, plan, sections, done_before: int = 0) -> "RunProgress":
        per_section = {s.id: sum(g.rows * g.cols for g in s.grids) for s in sections}
        return cls(plan.n_cycles(), sum(per_section.values()), per_section, done_before)

    @property
    def total(self) -> int:
        return self.n_cycles * self.tiles_per_cycle

    @property
    def done(self) -> int:
        return min(self.total, self.done_before + self.tiles)

    def on_tile(self, doc) -> None:
        if self.t_first is None:
            self.t_first = time.monotonic()
        n = doc.qc.get("exposures") if isinstance(doc.qc, dict) else None
        if n is not None:
            if doc.cycle != self.cycle:
                self.exposures.clear()
            self.exposures[doc.tile_id] = int(n)
        if doc.overview:                         # overview tiles are not part of the section count
            return
        if doc.cycle != self.cycle:
            self.cycle, self.cycle_tiles = doc.cycle, 0
        if doc.section_id != self.section:
            self.section, self.section_tiles = doc.section_id, 0
        if doc.version == 0:
            self.tiles += 1
            self.cycle_tiles += 1
            self.section_tiles += 1

    def exposures_text(self) -> str:
        """Scans per tile this cycle: how much dose retries and refocusing cost."""
        if not self.exposures:
            return "exposures per tile: –"
        worst = max(self.exposures, key=self.exposures.get)
        extra = sum(1 for n in self.exposures.values() if n > 1)
        if not extra:
            return f"exposures per tile: 1 each ({len(self.exposures)} tiles this cycle)"
        return (f"exposures per tile: max {self.exposures[worst]} ({worst}), "
                f"{extra} of {len(self.exposures)} tiles scanned more than once")

    def eta_s(self) -> Optional[float]:
        """Seconds left at the rate of the tiles acquired so far (None before two tiles)."""
        if self.tiles < 2 or self.t_first is None:
            return None
        rate = (time.monotonic() - self.t_first) / (self.tiles - 1)
        return rate * max(self.total - self.done, 0)

    def eta_text(self) -> str:
        s = self.eta_s()
        if s is None:
            return "ETA –"
        h, rem = divmod(int(s + 0.5), 3600)
        m, sec = divmod(rem, 60)
        return f"ETA {h}:{m:02d}:{sec:02d}" if h else f"ETA {m}:{sec:02d}"


def report_folder(candidates: Iterable) -> Optional[Path]:
    """The first of the folders given that holds a run (a journal) for the
    run report; None if none does."""
    for c in candidates:
        if c and (Path(c) / "journal.jsonl").is_file():
            return Path(c)
    return None


_ADVICE = {
    PauseReason.SUSPENDED: "The run waits for the condition to clear and resumes by itself. Fix the cause (see the "
                           "incidents), press Resume to retry now, or Stop (continue later with Resume run …).",
    PauseReason.SAFETY_WINDOW: "A setpoint was outside the setup's safety window. Check the device settings and the "
                               "plan, then Resume; or Stop and correct the plan.",
    PauseReason.DEVICE_FAILURES: "A device kept failing. Check it in the Devices tab (disconnect and connect it "
                                 "again), then Resume to retry the step; or Stop and continue later with Resume "
                                 "run ….",
    PauseReason.DOSE_BUDGET: "A tile has been scanned as often as the dose budget allows this cycle. Check why "
                             "(incidents: QC, grab errors, refocus); Resume allows it one more scan, Stop ends the "
                             "run (continue it later with Resume run … and a higher exposure budget).",
    PauseReason.MILL_INTERRUPTED: "A mill was interrupted with the ion beam on. Inspect the sections; Resume accepts "
                                  "the mill as done, Stop ends the run.",
    PauseReason.OPERATOR: "Paused at your request between two steps (beams blanked). Resume to continue, Stop to "
                          "end the run.",
    PauseReason.STAGE_CHECK: "A step of the stage's way to or from the mill position did not verify: the stage may be "
                             "tilted or rotated at the mill position. Check it, bring it back flat, unrotated and away "
                             "from the mill by hand, then Resume; Stop ends the run.",
    PauseReason.EHT_OFF: "The SEM's EHT (gun) is off, so nothing can be imaged. Switch it on in SmartSEM (Beam On; "
                         "run-up takes about a minute): the run resumes by itself once the beam is on, or press "
                         "Resume then. Stop ends the run (continue later with Resume run …).",
    PauseReason.WRITE_FAILED: "The output keeps refusing data that is held in memory. Free space or fix the output "
                              "folder, then Resume to write it again; Stop loses what is held (imaged again on "
                              "resume).",
}


def pause_advice(pause: Optional[Pause]) -> str:
    """What the operator can do, for the engine's structured pause reason."""
    default = "The run is paused with the beams blanked. Resume to continue or Stop to end it (it can be resumed)."
    return _ADVICE.get(pause.reason, default) if pause is not None else default
