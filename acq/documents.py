"""The document stream the engine publishes (Bluesky-style provenance).

Subscribers (writers, QC, GUI, logger, journal) receive these in order,
most of them through a ``DocumentRouter`` (one method per document kind).
Every document class names its ``kind`` (a ClassVar: the router's method
is ``on_<kind>``). A
tile is named by a ``tile_id`` that is stable across resumes:
``c{cycle:04d}_s{section:04d}_g{grid:02d}_r{row:03d}_c{col:03d}``;
a re-acquired tile keeps its tile_id and gets the next ``version``.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Optional

import numpy as np


def tile_id(cycle: int, section: int, grid: int, row: int, col: int) -> str:
    return f"c{cycle:04d}_s{section:04d}_g{grid:02d}_r{row:03d}_c{col:03d}"


@dataclass
class RunStart:
    run_uid: str
    plan: dict                      # the validated plan, as data
    setup: dict                     # the setup config, as data
    software_version: str
    out_dir: str
    resumed: bool = False
    time: float = field(default_factory=time.time)
    kind: ClassVar[str] = "start"


@dataclass
class TileEvent:
    run_uid: str
    tile_id: str
    version: int                    # 0 for the first acquisition, 1, 2 ... for re-acquisitions
    cycle: int
    section_id: int
    grid_id: int
    row: int
    col: int
    image: np.ndarray               # uint8 (h, w)
    pixel_size_m: float
    dwell_s: float
    stage: dict                     # x, y, z, r, t in m / rad (actual, after the move)
    target_um: tuple[float, float]  # planned tile centre in stage µm
    rotation_deg: float
    wd_m: float
    stig: tuple[float, float]
    t_start: float
    t_end: float
    qc: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)   # the SEM's frame metadata
    overview: bool = False          # a tile of the plan's overview (section OVERVIEW_SECTION), not of a section
    kind: ClassVar[str] = "tile"

    def header(self) -> dict:
        """Everything but the pixels (for logs, journals, JSON)."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "image"}
        d["shape"] = list(self.image.shape)
        return d


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class IncidentCause(StrEnum):
    """Why an incident was raised; the value is what the journal and the
    logs record. ``context`` carries its structured data."""
    AUTOFOCUS_FAILED = "autofocus_failed"
    DEVICE_ERROR = "device_error"            # context: event, consecutive, error
    DOSE_BUDGET = "dose_budget"              # context: event, tile_id, exposures, budget
    EHT_OFF = "eht_off"                      # a grab found the SEM's gun off; context: event, error
    ENGINE_ERROR = "engine_error"
    INTERLOCK = "interlock"
    IRRADIATION_DOSE = "irradiation_dose"
    IRRADIATION_RESUMED = "irradiation_resumed"
    IRRADIATION_SHORT = "irradiation_short"
    JOURNAL_FAILED = "journal_failed"
    LIMIT_VIOLATION = "limit_violation"
    MILL_ACCEPTED = "mill_accepted"
    MILL_CONTINUED = "mill_continued"
    MILL_INTERRUPTED = "mill_interrupted"
    MILL_SAFING = "mill_safing"
    STAGE_CHECK = "stage_check"              # a mill approach/return step failed; context: event
    QC_FAILED = "qc_failed"
    RETRY = "retry"
    SAFING_UNCONFIRMED = "safing_unconfirmed"
    SECTION_EXHAUSTED = "section_exhausted"
    TILE_ADOPTED = "tile_adopted"
    WRITER_FAILED = "writer_failed"
    SUSPENDED_FAILURES = "suspended_failures"
    SUSPENDED_DISK_SPACE = "suspended_disk_space"          # context: suspender
    SUSPENDED_PROBE_CURRENT = "suspended_probe_current"
    SUSPENDED_ION_INTERLOCK = "suspended_ion_interlock"
    SUSPENDED_EHT = "suspended_eht"
    RESUMED_DISK_SPACE = "resumed_disk_space"
    RESUMED_PROBE_CURRENT = "resumed_probe_current"
    RESUMED_ION_INTERLOCK = "resumed_ion_interlock"
    RESUMED_EHT = "resumed_eht"


@dataclass
class Incident:
    run_uid: str
    severity: Severity
    cause: IncidentCause
    message: str                    # what happened and what the operator can do
    context: dict = field(default_factory=dict)
    time: float = field(default_factory=time.time)
    uid: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    kind: ClassVar[str] = "incident"

    def __post_init__(self) -> None:          # a cause or severity outside the vocabulary is a bug: fail here
        self.severity, self.cause = Severity(self.severity), IncidentCause(self.cause)


@dataclass
class SectionDone:
    """All tiles of one section in one cycle are acquired (writers flush)."""
    run_uid: str
    cycle: int
    section_id: int
    tile_ids: list[str]
    kind: ClassVar[str] = "section_done"


@dataclass
class CycleDone:
    run_uid: str
    cycle: int
    kind: ClassVar[str] = "cycle_done"


class FinishReason(StrEnum):
    """How a run ended (RunStop.exit_status, RunResult.status, the journal's run_stop)."""
    SUCCESS = "success"
    ABORTED = "aborted"             # the operator or a signal stopped it at a safe point: resumable
    FAILED = "failed"               # a bug, an operator-needing pause on the command line, lost frames


@dataclass
class RunStop:
    run_uid: str
    exit_status: FinishReason
    reason: str = ""
    tiles: int = 0
    incidents: int = 0
    time: float = field(default_factory=time.time)
    kind: ClassVar[str] = "stop"


@dataclass
class CatchUp:
    """Asks the derived writers to re-derive, from the OME-TIFFs on disk,
    what they lack: every plane, or those of ``section_id`` / ``cycle``
    (None: any). Published like any document (each writer handles it in its
    own thread, in order); the primary writer ignores it."""
    section_id: Optional[int] = None
    cycle: Optional[int] = None
    full: bool = False              # tile specs / TrakEM2: rewrite even planes that look up to date
    kind: ClassVar[str] = "catch_up"


Document = RunStart | TileEvent | Incident | SectionDone | CycleDone | RunStop | CatchUp


class DocumentRouter:
    """Base of every document consumer: override ``on_<kind>`` for the kinds
    you need (each gets the document; the others are ignored). Calling the
    router, or ``handle(doc)`` (the writer protocol, acq/stream.py), routes
    a document to its method and returns what that returns (a writer: the
    files it wrote)."""

    def __call__(self, doc: Document) -> Any:
        return getattr(self, "on_" + doc.kind)(doc)      # the one place a kind picks the code

    def handle(self, doc: Document) -> Any:
        """The writer protocol (acq/stream.py): the files written, [] for none."""
        out = self(doc)
        return [] if out is None else out

    def on_start(self, doc: RunStart) -> Any:
        return None

    def on_tile(self, doc: TileEvent) -> Any:
        return None

    def on_incident(self, doc: Incident) -> Any:
        return None

    def on_section_done(self, doc: SectionDone) -> Any:
        return None

    def on_cycle_done(self, doc: CycleDone) -> Any:
        return None

    def on_catch_up(self, doc: CatchUp) -> Any:
        return None

    def on_stop(self, doc: RunStop) -> Any:
        return None
