"""Acquisition plan: a YAML file validated into pydantic models.

A plan is data. ``load_plan`` checks it completely (schema, files, and the
setup's safety windows) before anything is created on disk; ``expand`` turns
it into the event stream the engine executes (see acq/expand.py). The engine
never reads YAML.

Units in the file are human (µm, nm, ns, kV, nA, deg); the events carry the
same numbers, the engine converts to SI at the device call.

Every number is finite and bounded (the Field ranges below); what depends on
the instruments (frame sizes, raster frequencies, meter ranges, preamp gains)
is checked against the setup's drivers in ``check_against_setup``, so a step
cannot fail mid-run on a value that was wrong in the file.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from acq.qc import QCConfig, QCPolicy
from acq.section_focus import forbidden_area_at
from common import geometry
from devices.setup_config import (ConfigError, Options, SetupConfig, format_validation_error, json_like,
                                  load_setup, read_yaml, validate_config)

OVERVIEW_SECTION = 9999        # section id of overview tiles in tile ids; plan sections stay below


def _refuse_non_finite(value, where: str) -> None:
    """ValueError naming the first .inf/.nan anywhere in ``value``."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} = {value!r}: numbers must be finite")
    if isinstance(value, dict):
        for k, v in value.items():
            _refuse_non_finite(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _refuse_non_finite(v, f"{where}.{i}")


class _Strict(BaseModel):
    # allow_inf_nan=False: no .inf/.nan in any float field (tuples included)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


Pair = tuple[float, float]
Position = tuple[Annotated[float, Field(ge=-200_000, le=200_000)],
                 Annotated[float, Field(ge=-200_000, le=200_000)]]     # µm; the setup's travel is checked later
FRAME_SIDE = (16, 32768)        # px per side, any SEM; the setup's SEM may allow less (check_against_setup)
DAY_S = 86_400.0


def _frame_sides(v: tuple[int, int]) -> tuple[int, int]:
    lo, hi = FRAME_SIDE
    if not all(lo <= s <= hi for s in v):
        raise ValueError(f"frame size {list(v)} not allowed: each side {lo}..{hi} px")
    return v


FrameSize = Annotated[tuple[int, int], AfterValidator(_frame_sides)]


class TileGeometry(_Strict):
    rows: int = Field(ge=1, le=1000)
    cols: int = Field(ge=1, le=1000)
    pixel_size_nm: float = Field(gt=0, le=100_000)
    frame_size: FrameSize = (1024, 768)
    dwell_ns: float = Field(200.0, ge=10, le=100_000)
    overlap_px: int = Field(0, ge=0, le=FRAME_SIDE[1])

    @model_validator(mode="after")
    def _overlap(self):
        if self.overlap_px * 2 >= min(self.frame_size):
            raise ValueError(f"overlap_px = {self.overlap_px} must be below half the smaller frame side "
                             f"({min(self.frame_size) // 2})")
        return self

    @property
    def n_tiles(self) -> int:
        return self.rows * self.cols

    def tile_grid(self, center_um: Pair = (0.0, 0.0), rotation_deg: float = 0.0) -> geometry.TileGrid:
        """These tiles placed at ``center_um``, turned by ``rotation_deg`` (common/geometry.py)."""
        return geometry.TileGrid.of_frames(center_um, rotation_deg, self.rows, self.cols, self.pixel_size_nm,
                                           self.frame_size, self.overlap_px)

    def step_um(self) -> Pair:
        """Centre-to-centre tile distance (µm) along the grid's x and y."""
        return self.tile_grid().step_um

    def tile_offsets_um(self, rotation_deg: float) -> list[tuple[int, int, float, float]]:
        """(row, col, dx, dy) of every tile centre relative to the grid centre,
        row by row (serpentine would save little: moves are short)."""
        return self.tile_grid(rotation_deg=rotation_deg).tile_offsets()


class Grid(TileGeometry):
    id: int = Field(ge=0, le=99)
    center_um: Position
    rotation_deg: float = Field(0.0, ge=-180, le=180)

    @property
    def geometry(self) -> geometry.TileGrid:
        return self.tile_grid(self.center_um, self.rotation_deg)


class GridTemplate(TileGeometry):
    """Grid placed on every simulated wafer section (``sections_from: wafer_truth``)."""
    rotation_deg: Union[Annotated[float, Field(ge=-180, le=180)], Literal["section"]] = "section"


class Section(_Strict):
    id: int = Field(ge=0, lt=OVERVIEW_SECTION)
    grids: list[Grid] = Field(min_length=1)

    @field_validator("grids")
    @classmethod
    def _unique(cls, v):
        ids = [g.id for g in v]
        if len(set(ids)) != len(ids):
            raise ValueError(f"grid ids must be unique within a section, got {ids}")
        return v

    @property
    def geometry(self) -> geometry.Section:
        """The section as far as a plan knows it: its first grid's outline."""
        g = self.grids[0].geometry
        return geometry.Section(self.id, g.center_um, g.extent_um, g.rotation_deg)


class Overview(TileGeometry):
    center_um: Position
    every_n_cycles: int = Field(0, ge=0, le=100_000, description="0 = first cycle only")


class Imaging(_Strict):
    eht_kv: float = Field(1.5, gt=0, le=30)
    probe_current_na: float = Field(1.8, gt=0, le=1000)
    wd_mm: Optional[float] = Field(None, gt=0, le=100, description="start working distance; None = keep")


class AutofocusStep(_Strict):
    method: str = "none"
    where: Literal["per_section", "per_grid"] = "per_section"
    every_n_cycles: int = Field(1, ge=1, le=100_000)
    # the classical sweep ("sweep"); other methods read what they need
    sweep_range_um: float = Field(30.0, gt=0, le=1000)
    sweep_steps: int = Field(7, ge=3, le=31)
    frame_size: FrameSize = (512, 512)            # DeepFocus (20 nm model): four distinct 128² patches
    pixel_size_nm: float = Field(10.0, gt=0, le=100_000)
    dwell_ns: float = Field(100.0, ge=10, le=100_000)
    options: Options = Field(default_factory=dict, description="passed to the method (AutofocusRequest.options); "
                             "plain values only (text, numbers, lists, mappings), bounded size")
    # where the focus of a section comes from (acq/section_focus.py)
    memory: Literal["per_section", "none"] = Field(
        "per_section", description="per_section: a section starts every cycle from its own last wd/stig; "
        "none: from wherever the previous section left the focus")
    points: int = Field(1, ge=1, le=9, description="autofocus spots per section (per grid with where: per_grid); "
                        "3 or more fit a plane that gives every tile its own wd/stig (a focus map)")
    locations: Literal["auto", "centre"] = Field(
        "auto", description="auto: spots in textured tissue (from the section's last tiles), never the spot "
        "of the previous autofocus; centre: always the grid centre")
    pinned: dict[int, Annotated[list[Position], Field(min_length=1, max_length=64)]] = Field(
        default_factory=dict, description="section id -> stage positions (µm) to focus at instead of choosing")
    forbidden: Annotated[list[tuple[float, float, Annotated[float, Field(gt=0, le=100_000)]]],
                         Field(max_length=1000)] = Field(
        default_factory=list, description="(x µm, y µm, radius µm) stage areas autofocus never uses")

    @model_validator(mode="after")
    def _locations_allowed(self):
        for sid, pts in self.pinned.items():
            for x, y in pts:
                area = forbidden_area_at((x, y), self.forbidden)
                if area is not None:
                    fx, fy, r = area
                    raise ValueError(f"autofocus.pinned.{sid}: ({x}, {y}) µm lies in the forbidden area "
                                     f"({fx}, {fy}) µm radius {r} µm")
        return self

    @field_validator("method")
    @classmethod
    def _known(cls, v):
        # the registry as the application filled it at start-up (autofocus.register_methods)
        from acq.autofocus_step import AUTOFOCUS_METHODS, unknown_method
        if v not in AUTOFOCUS_METHODS:
            raise ValueError(unknown_method(v))
        return v


class IrradiationStep(_Strict):
    """Irradiate to a deposited energy density ρ_E = U·q/(A·d) (seed eq. 2.1),
    given in 1e27 eV/cm³ (the unit of the seed's Table 2.1): 0.5 means
    0.5e27 eV/cm³. ``source``: the SEM's scan, or the setup's external
    electron source (devices.electron_source); either way q is the measured
    specimen current (preamp + DMM) integrated over time."""
    source: Literal["sem", "external"] = "sem"
    target_dose_1e27_ev_cm3: float = Field(gt=0, le=10, description="ρ_E in 1e27 eV/cm³")
    area_um2: float = Field(gt=0, le=1e8, description="at most 10 x 10 mm")
    thickness_nm: float = Field(gt=0, le=100_000)
    sample_interval_s: float = Field(1.0, gt=0, le=3600)
    max_duration_s: float = Field(gt=0, le=DAY_S, description="at most 24 h")
    eht_kv: float = Field(3.0, gt=0, le=30, description="U in ρ = U·q/(A·d): the SEM's EHT (sem) or the "
                          "external source's beam energy (external; set on it if it can, else checked against it)")
    probe_current_na: float = Field(10.0, gt=0, le=1000, description="sem only")
    emission_current_na: Optional[float] = Field(None, gt=0, le=1e6, description="external only: the source's "
                                                 "emission setpoint; None = as set on the source")
    preamp_sensitivity_a_per_v: float = Field(1e-8, gt=0, le=1, description="a setting of the setup's preamp")
    dmm_range_v: float = Field(10.0, gt=0, le=1000, description="a range of the setup's multimeter")
    dmm_nplc: float = Field(1.0, gt=0, le=100, description="an integration time of the setup's multimeter")

    @model_validator(mode="after")
    def _interval(self):
        if self.sample_interval_s > self.max_duration_s:
            raise ValueError(f"sample_interval_s = {self.sample_interval_s} is longer than max_duration_s = "
                             f"{self.max_duration_s}")
        if self.emission_current_na is not None and self.source != "external":
            raise ValueError("emission_current_na is a setting of the external source: only with source: external")
        return self


RASTER_HZ = (1e-3, 1e6)     # any raster generator; the setup's own (AWG_RAMP_HZ) is checked against the setup


class MillStep(_Strict):
    duration_s: float = Field(gt=0, le=DAY_S, description="per mill, at most 24 h")
    azimuths: int = Field(3, ge=1, le=24)
    delay_s: float = Field(10.0, ge=0, le=3600, description="at most 1 h")
    glancing_angle_deg: Optional[float] = Field(None, gt=0, le=90, description="None = setup's mill position")
    raster_vpp: Pair
    raster_hz: tuple[Annotated[float, Field(ge=RASTER_HZ[0], le=RASTER_HZ[1])],
                     Annotated[float, Field(ge=RASTER_HZ[0], le=RASTER_HZ[1])]] = Field(
        (100.0, 1.0), description=f"x, y sawtooth frequencies, each {RASTER_HZ[0]:g}..{RASTER_HZ[1]:g} Hz "
                                  "and within the setup's waveform generator")
    ion_energy_kv: float = Field(gt=0, le=100)
    cluster_size: int = Field(gt=0, le=1_000_000)
    current_na: float = Field(gt=0, le=10_000, description="expected target current")
    current_tolerance: float = Field(0.5, gt=0, le=10, description="relative; outside it the mill suspends")
    check_interval_s: float = Field(5.0, ge=0.1, le=600, description="0.1..600 s, at most duration_s")
    on_interrupted: Literal["skip", "pause"] = "pause"

    @model_validator(mode="after")
    def _interval(self):
        if self.check_interval_s > self.duration_s:
            raise ValueError(f"check_interval_s = {self.check_interval_s} is longer than duration_s = "
                             f"{self.duration_s}")
        return self

    @field_validator("raster_vpp")
    @classmethod
    def _positive(cls, v):
        if not all(a > 0 for a in v):
            raise ValueError(f"raster amplitudes must be > 0 Vpp, got {list(v)}")
        return v


class StopRule(_Strict):
    target_depth_nm: Optional[float] = Field(None, gt=0, le=1e7)
    depth_per_cycle_nm: Optional[float] = Field(None, gt=0, le=1e6, description="None = estimate from Table 2.1")
    section_exhausted: bool = False
    exhausted_flat_cv: float = Field(0.1, gt=0, le=1, description="a 64 px block with less relative contrast "
                                     "(after 8x8 binning) shows bare wafer or resin, no tissue")
    exhausted_fraction: float = Field(0.9, gt=0, le=1, description="flat share of a section's tiles, in two "
                                      "consecutive cycles, for the section to be no longer imaged")
    max_cycles: int = Field(1000, ge=1, le=100_000)

    @model_validator(mode="after")
    def _something(self):
        if self.target_depth_nm is None and not self.section_exhausted:
            raise ValueError("give target_depth_nm and/or section_exhausted: true")
        return self


class Retries(_Strict):
    acquire: int = Field(3, ge=1, le=20)
    move: int = Field(2, ge=1, le=20)
    autofocus: int = Field(2, ge=1, le=20)
    mill: int = Field(3, ge=1, le=20)
    irradiation: int = Field(3, ge=1, le=20)
    backoff_s: float = Field(1.0, ge=0, le=600)
    max_exposures_per_tile: Optional[int] = Field(
        None, ge=1, le=100, description="scans of a tile's area per cycle (grabs, retries, autofocus over it) "
        "before the run pauses naming it; None = the setup's safety.max_exposures_per_tile; at most that")


class Suspenders(_Strict):
    probe_current_tolerance: float = Field(0.2, gt=0, le=10, description="relative to imaging.probe_current_na")
    max_consecutive_failures: int = Field(5, ge=1, le=10_000)
    min_free_gb: float = Field(1.0, ge=0, le=1e6)
    poll_s: float = Field(5.0, gt=0, le=3600)
    max_suspend_s: float = Field(3600.0, gt=0, le=7 * DAY_S, description="then the run pauses for the operator")


class TileQC(_Strict):
    """Per-tile quality control (acq/qc.py): what is checked, what a failure does."""
    enabled: bool = True
    checks: QCConfig = QCConfig()
    policy: QCPolicy = QCPolicy()


class Output(_Strict):
    writers: list[str] = Field(default_factory=lambda: ["ome_tiff"], max_length=32)
    options: Annotated[dict[str, dict], AfterValidator(json_like)] = Field(
        default_factory=dict, description="per writer, passed through; plain values only, bounded size")
    queue_maxsize: int = Field(8, ge=1, le=1024)


DEFAULT_MAX_TILES_PER_CYCLE = 100_000


class Limits(_Strict):
    """Guards against a typo that would plan a run of years (or exhaust memory
    expanding it); raise them in the plan when a big run is intended."""
    max_tiles_per_cycle: int = Field(
        DEFAULT_MAX_TILES_PER_CYCLE, ge=1, le=100_000_000,
        description="tiles one cycle may image (sections x grids x rows x cols, plus the overview)")


class Plan(_Strict):
    setup: Path
    output: Output = Output()
    imaging: Imaging = Imaging()
    overview: Optional[Overview] = None
    sections: Optional[list[Section]] = None
    sections_from: Optional[Literal["wafer_truth"]] = None
    grid_template: Optional[GridTemplate] = None
    order: Union[Literal["path"], Annotated[list[int], Field(max_length=10_000)]] = "path"
    autofocus: AutofocusStep = AutofocusStep()
    irradiation: Optional[IrradiationStep] = None
    mill: Optional[MillStep] = None
    cycles: Union[int, StopRule] = Field(1)
    qc: TileQC = TileQC()
    retries: Retries = Retries()
    suspenders: Suspenders = Suspenders()
    limits: Limits = Limits()
    _setup_config: Optional[SetupConfig] = PrivateAttr(None)
    _source: Optional[Path] = PrivateAttr(None)

    @field_validator("setup")
    @classmethod
    def _setup_exists(cls, v: Path, info: ValidationInfo):
        base = (info.context or {}).get("base")
        p = v if v.is_absolute() or base is None else Path(base) / v
        if not p.is_file():
            raise ValueError(f"setup file {str(p)!r} does not exist")
        return p.resolve()

    @field_validator("cycles")
    @classmethod
    def _cycles(cls, v):
        if isinstance(v, int) and not 1 <= v <= 100_000:
            raise ValueError(f"cycles = {v}: allowed 1..100000 or a stop rule")
        return v

    @model_validator(mode="after")
    def _qc_finite(self):
        # the QC models (acq/qc.py) do not refuse .inf/.nan themselves
        _refuse_non_finite(self.qc.model_dump(mode="python"), "qc")
        return self

    @model_validator(mode="after")
    def _sections(self):
        if self.sections is not None and self.sections_from is not None:
            raise ValueError("give exactly one of sections (a list) or sections_from: wafer_truth")
        if self.sections is None and self.sections_from is None and self.overview is None:
            raise ValueError("give sections (a list), sections_from: wafer_truth, or an overview "
                             "(an overview-only plan maps the wafer before sections are known)")
        if self.sections_from and self.grid_template is None:
            raise ValueError("sections_from: wafer_truth needs a grid_template (rows, cols, pixel_size_nm ...)")
        if self.sections is not None:
            ids = [s.id for s in self.sections]
            if len(set(ids)) != len(ids):
                raise ValueError(f"section ids must be unique, got {ids}")
            if isinstance(self.order, list):
                unknown = sorted(set(self.order) - set(ids))
                if unknown or len(set(self.order)) != len(self.order):
                    raise ValueError(f"order {self.order}: each id at most once, all from the sections {ids}")
        return self

    @property
    def setup_config(self) -> SetupConfig:
        if self._setup_config is None:
            self._setup_config = load_setup(self.setup)
        return self._setup_config

    @property
    def source(self) -> Optional[Path]:
        return self._source

    def n_cycles(self) -> int:
        """Planned number of cycles (an upper bound with section_exhausted)."""
        if isinstance(self.cycles, int):
            return self.cycles
        rule = self.cycles
        if rule.target_depth_nm is None:
            return rule.max_cycles
        from acq.steps_mill import estimated_depth_per_cycle_nm
        per = rule.depth_per_cycle_nm or estimated_depth_per_cycle_nm(self)
        return max(1, min(rule.max_cycles, math.ceil(rule.target_depth_nm / per - 1e-9)))


# ------------------------------------------------------------------ loading
def load_plan(path: str | Path, setup_path: str | Path | None = None) -> Plan:
    """Read and validate a plan; ``setup_path`` (``--config``) replaces the
    plan's ``setup``. Raises ConfigError naming field, value and what is allowed."""
    path = Path(path)
    data = read_yaml(path, "plan file")
    if setup_path is not None and isinstance(data, dict):  # not a mapping: validate_config says so
        sp = Path(setup_path)
        if not sp.is_file():
            raise ConfigError(f"--config: setup file {str(sp)!r} does not exist")
        data = {**data, "setup": str(sp.resolve())}
    plan = plan_from_data(data, str(path), base=path.parent)
    plan._source = path
    return plan


def plan_from_data(data, source: str, base: str | Path | None = None) -> Plan:
    """Validate plan data (a mapping as read from a plan file) completely:
    schema, the setup's safety windows and drivers, writer options. ``base``:
    where a relative ``setup`` path starts. Raises ConfigError naming ``source``."""
    plan = validate_config(Plan, data, source, context={"base": base})
    try:
        cfg = load_setup(plan.setup)
    except ConfigError as e:
        raise ConfigError(f"{source}: setup = {str(plan.setup)!r}:\n{e}") from None
    plan._setup_config = cfg
    from acq.plan_checks import check_against_setup     # (it imports the plan's models)
    check_against_setup(plan, cfg, source)
    writer_options(plan, source)
    return plan


def writer_options(plan: Plan, source: str = "plan"):
    """The writers' options for this plan (acq/writers); ConfigError naming
    output.writers / output.options when the writers refuse them."""
    if plan.output.writers and "ome_tiff" not in plan.output.writers:
        raise ConfigError(f"{source}: output.writers = {plan.output.writers!r}: must include 'ome_tiff': a frame "
                          "is safe only once it is on disk as its OME-TIFF (the other writers derive from it, and "
                          "after a crash rebuild from it)")
    try:
        from acq.writers import options_from_plan
    except ImportError:             # writers not installed: nothing to check them against
        return None
    try:
        return options_from_plan(plan.output.writers, plan.output.options)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, f"{source}: output.options").replace(
            "invalid configuration", "invalid writer options")) from None
    except ValueError as e:
        raise ConfigError(f"{source}: output.writers = {plan.output.writers!r}: {e}") from None


def dump_plan(plan: Plan) -> dict:
    """The validated plan as JSON-able data (for RunStart and the journal)."""
    return plan.model_dump(mode="json")


def expand(plan: Plan, setup, start_cycle: int = 0, state=None):
    """Events of ``plan`` on ``setup`` from ``start_cycle``: see acq/expand.py
    (kept there so this module stays the schema)."""
    from acq.expand import expand as _expand
    return _expand(plan, setup, start_cycle, state)
