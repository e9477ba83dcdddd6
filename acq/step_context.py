"""What a step (acq/steps_*.py, or a handler added with Engine.add_step)
gets: the setup, the plan, the journal, the exposure book, a way to report
incidents, and the state carried from one step to the next (scan settings
applied, the imaging height, whether the ion beam is known blanked). The
engine makes one per run; steps touch nothing else of the engine."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from acq.autofocus_step import run_autofocus
from acq.dose_budget import ExposureBook
from acq.events import AcquireTile, Autofocus
from acq.journal import Journal
from acq.qc import ImageInspector
from devices.errors import InterlockError


@dataclass
class StepContext:
    setup: Any
    plan: Any                                         # acq.plan.Plan
    journal: Journal
    exposures: ExposureBook
    run_uid: str
    incident: Callable[..., None]                     # (severity, cause, message, context=None)
    stop_requested: Callable[[], Optional[str]]       # why a signal asked to stop now, or None
    qc_inspector: Optional[ImageInspector] = None
    flat_cv: Optional[float] = None                   # exhausted-section rule: a tile this flat has no tissue
    texture: bool = False                             # score tiles' texture (where autofocus goes next)
    # carried from step to step
    imaging_z: float = 0.0
    scan_cache: Optional[tuple] = None                # the scan settings last applied
    last_frame_sample: Optional[np.ndarray] = None    # for the frozen-frame check
    ion_beam_safe: bool = False
    mill_known_s: dict[str, float] = field(default_factory=dict)   # seconds milled per mill, as known here

    @property
    def clock(self):
        return self.setup.clock

    @property
    def urgent_stop(self) -> Optional[str]:
        return self.stop_requested()

    def invalidate_scan(self) -> None:
        self.scan_cache = None

    def devices_reconnected(self, role: Optional[str]) -> None:
        self.invalidate_scan()
        if role == "ion_gun":
            self.ion_beam_safe = False

    def ensure_ion_beam_safe(self) -> None:
        """Before any stage move or frame: the ion beam must be blanked."""
        gun = self.setup.ion_gun
        if gun is None or self.ion_beam_safe:
            return
        st = gun.gun_status()
        if st.beam_on and not st.blanked:
            gun.set_blanked(True)
            st = gun.gun_status()
            if st.beam_on and not st.blanked:
                raise InterlockError("the ion beam does not blank", device="ion_gun", operation="blank")
        self.ion_beam_safe = True

    def refocus(self, ev: AcquireTile) -> None:
        """QC asked for focus: the plan's autofocus method here, not journaled."""
        if self.plan.autofocus.method == "none":
            return
        af = Autofocus(key=f"refocus:{ev.key}", cycle=ev.cycle, section=ev.section, grid=ev.grid,
                       center_um=ev.center_um, step=self.plan.autofocus, tile_keys=(ev.key,))
        self.exposures.extra(ev, why="refocus")
        run_autofocus(self.setup, af)
        self.invalidate_scan()
