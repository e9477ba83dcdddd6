"""The document stream the engine publishes (Bluesky-style provenance).

Subscribers (writers, QC, GUI, logger, journal) receive these in order. A
tile is named by a ``tile_id`` that is stable across resumes:
``c{cycle:04d}_s{section:04d}_g{grid:02d}_r{row:03d}_c{col:03d}``;
a re-acquired tile keeps its tile_id and gets the next ``version``.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

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
    kind: str = "start"


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
    kind: str = "tile"

    def header(self) -> dict:
        """Everything but the pixels (for logs, journals, JSON)."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "image"}
        d["shape"] = list(self.image.shape)
        return d


@dataclass
class Incident:
    run_uid: str
    severity: str                   # "info" | "warning" | "error"
    cause: str                      # short machine-readable cause, e.g. "qc_failed", "device_error"
    message: str                    # what happened and what the operator can do
    context: dict = field(default_factory=dict)
    time: float = field(default_factory=time.time)
    uid: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    kind: str = "incident"


@dataclass
class SectionDone:
    """All tiles of one section in one cycle are acquired (writers flush)."""
    run_uid: str
    cycle: int
    section_id: int
    tile_ids: list[str]
    kind: str = "section_done"


@dataclass
class CycleDone:
    run_uid: str
    cycle: int
    kind: str = "cycle_done"


@dataclass
class RunStop:
    run_uid: str
    exit_status: str                # "success" | "aborted" | "failed"
    reason: str = ""
    tiles: int = 0
    incidents: int = 0
    time: float = field(default_factory=time.time)
    kind: str = "stop"


Document = RunStart | TileEvent | Incident | SectionDone | CycleDone | RunStop
