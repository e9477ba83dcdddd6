"""The setup file: which driver plays each role, how to reach it, calibration,
and the safety windows nothing may leave.

Human units in the YAML (mm, µm, kV, deg, ns); ``SafetyWindows`` offers SI.
A bad file fails at load with the key, the value and what is allowed.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Literal, Optional, TypeVar

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)


class ConfigError(ValueError):
    """A configuration or plan file is invalid; the message names the field."""


M = TypeVar("M", bound=BaseModel)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


Range = tuple[float, float]


def _ordered(v: Range) -> Range:
    if v[0] > v[1]:
        raise ValueError(f"lower bound {v[0]} is above upper bound {v[1]}")
    return v


# ---------------------------------------------------------------- safety
class StageTravel(_Strict):
    x_mm: Range = (-50.0, 50.0)
    y_mm: Range = (-50.0, 50.0)
    z_mm: Range = (-1.0, 1.0)
    r_deg: Range = (-360.0, 360.0)
    t_deg: Range = (0.0, 60.0)

    _check = field_validator("*")(classmethod(lambda cls, v: _ordered(v)))


class MillPosition(_Strict):
    x_mm: float = 0.0
    y_mm: float = 0.0
    z_mm: float = 0.0
    glancing_angle_deg: float = Field(30.0, ge=0, le=90)
    max_tilt_deg: float = Field(60.0, ge=0, le=90)
    imaging_exclusion_mm: float = Field(
        5.0, ge=0, description="ion beam may be on only within this radius of the mill position")


class Safety(_Strict):
    stage: StageTravel = StageTravel()
    wd_mm: Range = (2.0, 15.0)
    stig: Range = (-10.0, 10.0)
    max_autofocus_step_wd_um: float = Field(50.0, gt=0)
    max_autofocus_step_stig: float = Field(3.0, gt=0)
    eht_kv: Range = (0.2, 30.0)
    probe_current_na: Range = (0.001, 100.0)
    ion_energy_kv: Range = (0.0, 10.0)
    ion_cluster_size: Range = (100, 5000)
    ion_current_na_max: float = Field(100.0, gt=0)
    awg_max_vpp: float = Field(20.0, gt=0, le=20.0)
    mill_position: MillPosition = MillPosition()

    @field_validator("wd_mm", "stig", "eht_kv", "probe_current_na", "ion_energy_kv", "ion_cluster_size")
    @classmethod
    def _ordered(cls, v):
        return _ordered(v)


# ---------------------------------------------------------- simulation
class MicroscopeParams(_Strict):
    """Hidden parameters of a simulated microscope (different values make a
    different 'microscope')."""
    alpha_mrad: float = Field(3.0, gt=0, le=50, description="probe half-angle")
    sigma0_nm: float = Field(1.5, ge=0, le=100, description="in-focus probe s.d.")
    stig_rotation_deg: float = Field(15.0, ge=-180, le=180, description="θ")
    stig_scale_x_um: float = Field(3.0, gt=0, description="defocus-equivalent per stig unit, x")
    stig_scale_y_um: float = Field(3.0, gt=0, description="defocus-equivalent per stig unit, y")
    wd_focus_mm: float = Field(5.0, gt=0, description="working distance of focus at stage z = 0")
    stig_x0: float = 0.0
    stig_y0: float = 0.0
    probe_shape: Literal["gaussian", "pillbox"] = "gaussian"
    scan_rotation_offset_deg: float = 0.0
    detector_efficiency: float = Field(0.05, gt=0, le=1, description="detected SE per primary at full yield")
    detector_full_scale: float = Field(200.0, gt=0, le=255, description="grey levels at SE yield 1")
    detector_offset: float = Field(20.0, ge=0, le=255)
    read_noise: float = Field(1.0, ge=0, description="grey levels s.d.")
    drift_nm_per_frame: float = Field(0.5, ge=0)
    line_jitter_px: float = Field(0.1, ge=0)
    flyback_s: float = Field(100e-6, ge=0, description="per line")


class SpecimenParams(_Strict):
    images: list[Path] = Field(default_factory=list, description="grayscale textures; empty = procedural")
    pixel_size_nm: Optional[float] = Field(None, gt=0, description="texture pixel size; None = 1:1 with the frame")
    slice_thickness_nm: float = Field(50.0, gt=0)
    seed: int = 0

    @field_validator("images")
    @classmethod
    def _exist(cls, v: list[Path], info: ValidationInfo):
        return [_existing_file(p, info, "specimen image") for p in v]


class WaferParams(_Strict):
    diameter_mm: float = Field(25.4, gt=0, le=300)
    sections: int = Field(6, ge=0, le=5000)
    section_size_um: tuple[float, float] = (500.0, 250.0)
    size_jitter: float = Field(0.1, ge=0, le=0.5)
    rotation_deg: float = Field(0.0, ge=-180, le=180)
    rotation_jitter_deg: float = Field(5.0, ge=0, le=180)
    spacing_um: float = Field(300.0, ge=0)
    resin_margin_um: float = Field(40.0, ge=0)
    thickness_nm: float = Field(250.0, gt=0)
    mill_inhomogeneity: float = Field(0.05, ge=0, le=0.5)
    tilt_um_per_mm: tuple[float, float] = (0.3, -0.2)
    seed: int = 0


class StageParams(_Strict):
    speed_mm_s: float = Field(5.0, gt=0)
    settle_s: float = Field(0.2, ge=0)
    backlash_um: float = Field(2.0, ge=0)
    repeatability_um: float = Field(0.5, ge=0)
    z_shift_um_per_cm: float = Field(2.0, ge=0, description="focus displacement s.d. per cm travelled")
    tolerance_um: float = Field(1.0, gt=0)
    tolerance_deg: float = Field(0.05, gt=0)


class FaultRule(_Strict):
    device: Literal["sem", "stage", "ion_gun", "waveform_generator", "multimeter", "current_preamp"]
    operation: str
    kind: Literal["timeout", "grab_failure", "move_failure", "disconnect", "visa_error", "communication",
                  "incomplete_frame", "frozen_frame"]
    probability: float = Field(0.0, ge=0, le=1)
    at_calls: list[int] = Field(default_factory=list, description="1-based call numbers that fail")


class Simulation(_Strict):
    seed: int = 0
    time_factor: float = Field(0.0, ge=0, description="0 = no real waiting; 1 = real time")
    microscope: MicroscopeParams = MicroscopeParams()
    specimen: SpecimenParams = SpecimenParams()
    wafer: WaferParams = WaferParams()
    stage: StageParams = StageParams()
    faults: list[FaultRule] = Field(default_factory=list)
    mill_rate_nm_per_s_per_na: float = Field(
        0.0, ge=0, description="0 = derive from seed Table 2.1 for the configured irradiation dose")
    irradiation_dose_1e27_ev_cm3: float = Field(0.5, ge=0, le=2)
    mill_area_mm2: float = Field(484.0, gt=0, description="ion raster area over which the current spreads")


# ---------------------------------------------------------------- devices
class DeviceConfig(_Strict):
    driver: str
    url: Optional[str] = None              # pyserial URL or COM port
    resource: Optional[str] = None         # VISA resource name
    visa_library: Optional[str] = None     # '@py', or 'configs/visa/x.yaml@sim'
    command_table: Optional[Path] = None   # ion gun YAML
    timeout_s: float = Field(2.0, gt=0)
    sign: Optional[float] = None           # current preamp output sign
    options: dict = Field(default_factory=dict)

    @field_validator("command_table")
    @classmethod
    def _table_exists(cls, v, info: ValidationInfo):
        return None if v is None else _existing_file(v, info, "command table")

    @field_validator("visa_library")
    @classmethod
    def _visa_yaml(cls, v, info: ValidationInfo):
        # 'file.yaml@sim' names a pyvisa-sim description relative to the setup file
        if v and v.endswith("@sim") and v != "@sim":
            return f"{_existing_file(Path(v[:-4]), info, 'pyvisa-sim description')}@sim"
        return v


KNOWN_DRIVERS = {
    "sem": {"sim", "zeiss_smartsem"},
    "stage": {"sim", "zeiss_smartsem"},
    "ion_gun": {"serial"},
    "waveform_generator": {"keysight_33522a"},
    "multimeter": {"keysight_34465a"},
    "current_preamp": {"sr570"},
}


class Devices(_Strict):
    sem: DeviceConfig
    stage: DeviceConfig
    ion_gun: Optional[DeviceConfig] = None
    waveform_generator: Optional[DeviceConfig] = None
    multimeter: Optional[DeviceConfig] = None
    current_preamp: Optional[DeviceConfig] = None

    @model_validator(mode="after")
    def _known(self):
        for role, allowed in KNOWN_DRIVERS.items():
            dev = getattr(self, role)
            if dev is not None and dev.driver not in allowed:
                raise ValueError(f"devices.{role}.driver = {dev.driver!r}: allowed {sorted(allowed)}")
        return self


class Calibration(_Strict):
    ion_raster_mm_per_vpp: tuple[float, float] = (1.1, 1.1)
    stage_to_image_rotation_deg: float = 0.0


class SetupConfig(_Strict):
    name: str
    devices: Devices
    safety: Safety = Safety()
    calibration: Calibration = Calibration()
    simulation: Optional[Simulation] = None
    source: Optional[Path] = Field(None, exclude=True)

    @model_validator(mode="after")
    def _sim_needs_simulation(self):
        if self.simulation is None and (self.devices.sem.driver == "sim" or self.devices.stage.driver == "sim"):
            self.simulation = Simulation()
        mp = self.safety.mill_position
        travel = self.safety.stage
        for axis, v in (("x_mm", mp.x_mm), ("y_mm", mp.y_mm), ("z_mm", mp.z_mm)):
            lo, hi = getattr(travel, axis)
            if not lo <= v <= hi:
                raise ValueError(f"safety.mill_position.{axis} = {v} is outside safety.stage.{axis} [{lo}, {hi}]")
        return self


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not allowed here)"
        shown = e.get("input")
        value = "" if isinstance(shown, dict) else f" = {shown!r}"
        lines.append(f"  {loc}{value}: {msg}")
    return "\n".join(lines)


def _existing_file(p: Path, info: ValidationInfo, what: str) -> Path:
    """Relative paths are relative to the setup file's folder."""
    p = Path(p).expanduser()
    base = (info.context or {}).get("base") if info is not None else None
    if not p.is_absolute() and base is not None:
        p = Path(base) / p
    if not p.is_file():
        raise ValueError(f"{what} {str(p)!r} does not exist")
    return p.resolve()


# ----------------------------------------- loading (also plans, command tables)
def read_yaml(path: Path, what: str = "configuration file"):
    """The parsed contents of a YAML file; ConfigError if it is missing or not YAML."""
    if not path.is_file():
        raise ConfigError(f"{path}: {what} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None


def validate_config(model_cls: type[M], data, source: str, *, context: Optional[dict] = None,
                    format_error: Callable[[ValidationError, str], str] = format_validation_error) -> M:
    """``model_cls`` validated from ``data``, which must be a mapping; ConfigError
    (text from ``format_error``) naming field, value and what is allowed."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return model_cls.model_validate(data, context=context)
    except ValidationError as e:
        raise ConfigError(format_error(e, source)) from None


def load_yaml_model(path: str | Path, model_cls: type[M], *, what: str = "configuration file",
                    context: Optional[dict] = None,
                    format_error: Callable[[ValidationError, str], str] = format_validation_error) -> M:
    """read_yaml then validate_config, with the file's path as the source in messages."""
    path = Path(path)
    return validate_config(model_cls, read_yaml(path, what), str(path), context=context, format_error=format_error)


def load_setup(path: str | Path) -> SetupConfig:
    path = Path(path)
    cfg = load_yaml_model(path, SetupConfig, what="setup file", context={"base": path.parent})
    cfg.source = path
    return cfg


def deg(v: float) -> float:
    return math.radians(v)
