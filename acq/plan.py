"""Acquisition plan: a YAML file validated into pydantic models.

A plan is data. ``load_plan`` checks it completely (schema, files, and the
setup's safety windows) before anything is created on disk; ``expand`` turns
it into the event stream the engine executes (see acq/expand.py). The engine
never reads YAML.

Units in the file are human (µm, nm, ns, kV, nA, deg); the events carry the
same numbers, the engine converts to SI at the device call.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from acq.qc import QCConfig, QCPolicy
from devices.setup_config import (ConfigError, SetupConfig, format_validation_error, load_setup, read_yaml,
                                  validate_config)

OVERVIEW_SECTION = 9999        # section id of overview tiles in tile ids; plan sections stay below


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Pair = tuple[float, float]


class TileGeometry(_Strict):
    rows: int = Field(ge=1, le=1000)
    cols: int = Field(ge=1, le=1000)
    pixel_size_nm: float = Field(gt=0, le=100_000)
    frame_size: tuple[int, int] = (1024, 768)
    dwell_ns: float = Field(200.0, ge=10, le=100_000)
    overlap_px: int = Field(0, ge=0)

    @field_validator("frame_size")
    @classmethod
    def _frame(cls, v):
        if not all(16 <= s <= 32768 for s in v):
            raise ValueError(f"frame size {list(v)} not allowed: each side 16..32768 px")
        return v

    @model_validator(mode="after")
    def _overlap(self):
        if self.overlap_px * 2 >= min(self.frame_size):
            raise ValueError(f"overlap_px = {self.overlap_px} must be below half the smaller frame side "
                             f"({min(self.frame_size) // 2})")
        return self

    def step_um(self) -> Pair:
        """Centre-to-centre tile distance (µm) along the grid's x and y."""
        w, h = self.frame_size
        p = self.pixel_size_nm * 1e-3
        return (w - self.overlap_px) * p, (h - self.overlap_px) * p

    def tile_offsets_um(self, rotation_deg: float) -> list[tuple[int, int, float, float]]:
        """(row, col, dx, dy) of every tile centre relative to the grid centre,
        row by row (serpentine would save little: moves are short)."""
        sx, sy = self.step_um()
        c, s = math.cos(math.radians(rotation_deg)), math.sin(math.radians(rotation_deg))
        out = []
        for r in range(self.rows):
            for col in range(self.cols):
                u = (col - (self.cols - 1) / 2) * sx
                v = (r - (self.rows - 1) / 2) * sy
                out.append((r, col, c * u - s * v, s * u + c * v))
        return out


class Grid(TileGeometry):
    id: int = Field(ge=0, le=99)
    center_um: Pair
    rotation_deg: float = Field(0.0, ge=-180, le=180)


class GridTemplate(TileGeometry):
    """Grid placed on every simulated wafer section (``sections_from: wafer_truth``)."""
    rotation_deg: Union[float, Literal["section"]] = "section"


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


class Overview(TileGeometry):
    center_um: Pair
    every_n_cycles: int = Field(0, ge=0, description="0 = first cycle only")


class Imaging(_Strict):
    eht_kv: float = Field(1.5, gt=0)
    probe_current_na: float = Field(1.8, gt=0)
    wd_mm: Optional[float] = Field(None, gt=0, description="start working distance; None = keep")


class AutofocusStep(_Strict):
    method: str = "none"
    where: Literal["per_section", "per_grid"] = "per_section"
    every_n_cycles: int = Field(1, ge=1)
    # the classical sweep ("sweep"); other methods read what they need
    sweep_range_um: float = Field(30.0, gt=0)
    sweep_steps: int = Field(7, ge=3, le=31)
    frame_size: tuple[int, int] = (512, 512)      # DeepFocus (20 nm model): four distinct 128² patches
    pixel_size_nm: float = Field(10.0, gt=0)
    dwell_ns: float = Field(100.0, ge=10)
    options: dict = Field(default_factory=dict, description="passed to the method (AutofocusRequest.options)")

    @field_validator("method")
    @classmethod
    def _known(cls, v):
        from acq.autofocus_step import AUTOFOCUS_METHODS, load_plugins
        if v not in AUTOFOCUS_METHODS:
            load_plugins()              # plug-ins (DeepFocus ...) only when a plan names one
        if v not in AUTOFOCUS_METHODS:
            raise ValueError(f"unknown autofocus method {v!r}: allowed {sorted(AUTOFOCUS_METHODS)}")
        return v


class IrradiationStep(_Strict):
    target_dose_1e27_ev_cm3: float = Field(gt=0, le=10)
    area_um2: float = Field(gt=0)
    thickness_nm: float = Field(gt=0)
    sample_interval_s: float = Field(1.0, gt=0, le=3600)
    max_duration_s: float = Field(gt=0)
    eht_kv: float = Field(3.0, gt=0, description="U in ρ = U·q/(A·d)")
    probe_current_na: float = Field(10.0, gt=0)
    preamp_sensitivity_a_per_v: float = Field(1e-8, gt=0)
    dmm_range_v: float = 10.0
    dmm_nplc: float = 1.0


class MillStep(_Strict):
    duration_s: float = Field(gt=0)
    azimuths: int = Field(3, ge=1, le=24)
    delay_s: float = Field(10.0, ge=0)
    glancing_angle_deg: Optional[float] = Field(None, gt=0, le=90, description="None = setup's mill position")
    raster_vpp: Pair
    raster_hz: Pair = (100.0, 1.0)
    ion_energy_kv: float = Field(gt=0)
    cluster_size: int = Field(gt=0)
    current_na: float = Field(gt=0, description="expected target current")
    current_tolerance: float = Field(0.5, gt=0, le=10, description="relative; outside it the mill suspends")
    check_interval_s: float = Field(5.0, gt=0)
    on_interrupted: Literal["skip", "pause"] = "pause"

    @field_validator("raster_vpp")
    @classmethod
    def _positive(cls, v):
        if not all(a > 0 for a in v):
            raise ValueError(f"raster amplitudes must be > 0 Vpp, got {list(v)}")
        return v


class StopRule(_Strict):
    target_depth_nm: Optional[float] = Field(None, gt=0)
    depth_per_cycle_nm: Optional[float] = Field(None, gt=0, description="None = estimate from Table 2.1")
    section_exhausted: bool = False
    exhausted_flat_cv: float = Field(0.1, gt=0, le=1, description="a 64 px block with less relative contrast "
                                     "(after 8x8 binning) shows bare wafer or resin, no tissue")
    exhausted_fraction: float = Field(0.9, gt=0, le=1, description="flat share of a section's tiles")
    max_cycles: int = Field(1000, ge=1)

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
    backoff_s: float = Field(1.0, ge=0)


class Suspenders(_Strict):
    probe_current_tolerance: float = Field(0.2, gt=0, description="relative to imaging.probe_current_na")
    max_consecutive_failures: int = Field(5, ge=1)
    min_free_gb: float = Field(1.0, ge=0)
    poll_s: float = Field(5.0, gt=0)
    max_suspend_s: float = Field(3600.0, gt=0, description="then the run pauses for the operator")


class TileQC(_Strict):
    """Per-tile quality control (acq/qc.py): what is checked, what a failure does."""
    enabled: bool = True
    checks: QCConfig = QCConfig()
    policy: QCPolicy = QCPolicy()


class Output(_Strict):
    writers: list[str] = Field(default_factory=lambda: ["ome_tiff"])
    options: dict[str, dict] = Field(default_factory=dict, description="per writer, passed through")
    queue_maxsize: int = Field(8, ge=1, le=1024)


class Plan(_Strict):
    setup: Path
    output: Output = Output()
    imaging: Imaging = Imaging()
    overview: Optional[Overview] = None
    sections: Optional[list[Section]] = None
    sections_from: Optional[Literal["wafer_truth"]] = None
    grid_template: Optional[GridTemplate] = None
    order: Union[Literal["path"], list[int]] = "path"
    autofocus: AutofocusStep = AutofocusStep()
    irradiation: Optional[IrradiationStep] = None
    mill: Optional[MillStep] = None
    cycles: Union[int, StopRule] = Field(1)
    qc: TileQC = TileQC()
    retries: Retries = Retries()
    suspenders: Suspenders = Suspenders()
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
    plan = validate_config(Plan, data, str(path), context={"base": path.parent})
    plan._source = path
    try:
        cfg = load_setup(plan.setup)
    except ConfigError as e:
        raise ConfigError(f"{path}: setup = {str(plan.setup)!r}:\n{e}") from None
    plan._setup_config = cfg
    check_against_setup(plan, cfg, str(path))
    writer_options(plan, str(path))
    return plan


def writer_options(plan: Plan, source: str = "plan"):
    """The writers' options for this plan (acq/writers); ConfigError naming
    output.writers / output.options when the writers refuse them."""
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


def _within(where: str, value: float, rng, allowed_from: str, unit: str, source: str) -> None:
    lo, hi = rng
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ConfigError(f"{source}: {where} = {value!r}: outside the setup's safety window, "
                          f"allowed [{lo:g}, {hi:g}] {unit} ({allowed_from})")


def tile_centres(plan: Plan, grids) -> list[tuple[str, float, float]]:
    """(label, x_um, y_um) of every tile of the given (section id, grid) pairs."""
    out = []
    for sid, g in grids:
        for r, c, dx, dy in g.tile_offsets_um(g.rotation_deg):
            out.append((f"sections[id={sid}].grids[id={g.id}] tile r{r} c{c}",
                        g.center_um[0] + dx, g.center_um[1] + dy))
    return out


def check_positions(cfg: SetupConfig, tiles, source: str) -> None:
    """Tile centres must lie inside the stage travel and away from the mill position."""
    s = cfg.safety
    mp = s.mill_position
    for label, x, y in tiles:
        _within(f"{label}: x_um", x, (s.stage.x_mm[0] * 1e3, s.stage.x_mm[1] * 1e3), "safety.stage.x_mm", "µm",
                source)
        _within(f"{label}: y_um", y, (s.stage.y_mm[0] * 1e3, s.stage.y_mm[1] * 1e3), "safety.stage.y_mm", "µm",
                source)
        if math.hypot(x - mp.x_mm * 1e3, y - mp.y_mm * 1e3) <= mp.imaging_exclusion_mm * 1e3:
            raise ConfigError(f"{source}: {label} at ({x:.1f}, {y:.1f}) µm is within "
                              f"safety.mill_position.imaging_exclusion_mm = {mp.imaging_exclusion_mm} mm of the mill "
                              "position, where the ion beam may be on: not allowed for imaging")


def check_against_setup(plan: Plan, cfg: SetupConfig, source: str) -> None:
    s = cfg.safety
    im = plan.imaging
    _within("imaging.eht_kv", im.eht_kv, s.eht_kv, "safety.eht_kv", "kV", source)
    _within("imaging.probe_current_na", im.probe_current_na, s.probe_current_na, "safety.probe_current_na", "nA",
            source)
    if im.wd_mm is not None:
        _within("imaging.wd_mm", im.wd_mm, s.wd_mm, "safety.wd_mm", "mm", source)
    if plan.sections is not None:
        check_positions(cfg, tile_centres(plan, [(sec.id, g) for sec in plan.sections for g in sec.grids]), source)
    if plan.overview is not None:
        ov = plan.overview
        g = Grid(id=0, center_um=ov.center_um, rows=ov.rows, cols=ov.cols, pixel_size_nm=ov.pixel_size_nm,
                 frame_size=ov.frame_size, dwell_ns=ov.dwell_ns, overlap_px=ov.overlap_px)
        check_positions(cfg, [(f"overview {lbl.split(' ', 1)[1]}", x, y)
                              for lbl, x, y in tile_centres(plan, [(OVERVIEW_SECTION, g)])], source)
    if plan.sections_from == "wafer_truth" and (cfg.simulation is None or cfg.devices.sem.driver != "sim"):
        raise ConfigError(f"{source}: sections_from = 'wafer_truth': needs a simulated setup "
                          f"(devices.sem.driver: sim), {cfg.source} has {cfg.devices.sem.driver!r}")
    if plan.irradiation is not None:
        ir = plan.irradiation
        for role in ("multimeter", "current_preamp"):
            if getattr(cfg.devices, role) is None:
                raise ConfigError(f"{source}: irradiation: needs devices.{role} in the setup {cfg.source}")
        _within("irradiation.eht_kv", ir.eht_kv, s.eht_kv, "safety.eht_kv", "kV", source)
        _within("irradiation.probe_current_na", ir.probe_current_na, s.probe_current_na,
                "safety.probe_current_na", "nA", source)
    if plan.mill is not None:
        m = plan.mill
        for role in ("ion_gun", "waveform_generator"):
            if getattr(cfg.devices, role) is None:
                raise ConfigError(f"{source}: mill: needs devices.{role} in the setup {cfg.source}")
        for i, v in enumerate(m.raster_vpp):
            _within(f"mill.raster_vpp.{i}", v, (0.0, s.awg_max_vpp), "safety.awg_max_vpp", "Vpp", source)
        _within("mill.ion_energy_kv", m.ion_energy_kv, s.ion_energy_kv, "safety.ion_energy_kv", "kV", source)
        _within("mill.cluster_size", m.cluster_size, s.ion_cluster_size, "safety.ion_cluster_size", "", source)
        _within("mill.current_na", m.current_na, (0.0, s.ion_current_na_max), "safety.ion_current_na_max", "nA",
                source)
        angle = m.glancing_angle_deg if m.glancing_angle_deg is not None else s.mill_position.glancing_angle_deg
        tilt_hi = min(s.mill_position.max_tilt_deg, s.stage.t_deg[1])
        _within("mill.glancing_angle_deg", angle, (max(0.0, s.stage.t_deg[0]), tilt_hi),
                "safety.mill_position.max_tilt_deg and safety.stage.t_deg", "deg", source)


def dump_plan(plan: Plan) -> dict:
    """The validated plan as JSON-able data (for RunStart and the journal)."""
    return plan.model_dump(mode="json")


def expand(plan: Plan, setup, start_cycle: int = 0, state=None):
    """Events of ``plan`` on ``setup`` from ``start_cycle``: see acq/expand.py
    (kept there so this module stays the schema)."""
    from acq.expand import expand as _expand
    return _expand(plan, setup, start_cycle, state)
