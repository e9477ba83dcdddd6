"""The events a plan expands into (acq/expand.py) and the engine executes.

Plain frozen dataclasses. Every event has a ``key`` that is stable across
runs of the same plan: the journal records it and a resume skips it. Each
class names its ``kind`` (a ClassVar, never a field) and describes itself
for the operator (``describe()``), so no consumer switches on class names.
The engine runs an event with the handler its table holds for the class
(acq/engine.py, ``Engine.add_step``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional, Union

if TYPE_CHECKING:
    from acq.plan import AutofocusStep, IrradiationStep, MillStep

Point = tuple[float, float]


@dataclass(frozen=True)
class Event:
    """Base of every event: a stable key, a kind and an operator's text."""
    key: str
    kind: ClassVar[str] = "event"

    def describe(self) -> str:
        return f"{self.kind} {self.key}"


@dataclass(frozen=True)
class Configure(Event):
    """Imaging settings (EHT, probe current, start wd); run at every (re)start."""
    eht_kv: float
    probe_current_na: float
    wd_mm: Optional[float]
    kind: ClassVar[str] = "configure"

    def describe(self) -> str:
        return f"configuring imaging ({self.eht_kv:g} kV, {self.probe_current_na:g} nA)"


@dataclass(frozen=True)
class MoveStage(Event):
    cycle: int
    x_um: float
    y_um: float
    for_key: str                     # the event this move prepares; skipped with it on resume
    kind: ClassVar[str] = "move_stage"

    def describe(self) -> str:
        return f"moving stage to ({self.x_um / 1e3:.4f}, {self.y_um / 1e3:.4f}) mm"


@dataclass(frozen=True)
class Autofocus(Event):
    cycle: int
    section: int
    grid: Optional[int]
    center_um: Point
    step: "AutofocusStep"
    tile_keys: tuple[str, ...]       # the tiles imaged with this focus
    kind: ClassVar[str] = "autofocus"

    def describe(self) -> str:
        return f"autofocus ({self.step.method}) on section {self.section}, cycle {self.cycle + 1}"


@dataclass(frozen=True)
class Irradiate(Event):
    section: int
    center_um: Point
    step: "IrradiationStep"
    kind: ClassVar[str] = "irradiate"

    def describe(self) -> str:
        return f"irradiating section {self.section}"


@dataclass(frozen=True)
class Mill(Event):
    cycle: int
    step: "MillStep"
    kind: ClassVar[str] = "mill"

    def describe(self) -> str:
        return f"milling, cycle {self.cycle + 1} ({self.step.duration_s:g} s at the mill position)"


@dataclass(frozen=True)
class AcquireTile(Event):
    tile_id: str
    cycle: int
    section: int
    grid: int
    row: int
    col: int
    center_um: Point
    pixel_size_nm: float
    frame_size: tuple[int, int]
    dwell_ns: float
    rotation_deg: float
    overview: bool = False
    kind: ClassVar[str] = "acquire_tile"

    def describe(self) -> str:
        return f"acquiring tile {self.tile_id}" + (" (overview)" if self.overview else "")


@dataclass(frozen=True)
class SectionEnd(Event):
    cycle: int
    section: int
    tile_ids: tuple[str, ...]
    kind: ClassVar[str] = "section_end"

    def describe(self) -> str:
        return f"section {self.section} done"


@dataclass(frozen=True)
class CycleEnd(Event):
    cycle: int
    last: bool
    kind: ClassVar[str] = "cycle_end"

    def describe(self) -> str:
        return f"cycle {self.cycle + 1} done"


PlanEvent = Union[Configure, MoveStage, Autofocus, Irradiate, Mill, AcquireTile, SectionEnd, CycleEnd]
