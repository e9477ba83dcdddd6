"""The setup file: which driver plays each role, how to reach it, calibration,
and the safety windows nothing may leave.

Human units in the YAML (mm, µm, kV, deg, ns); ``SafetyWindows`` offers SI.
A bad file fails at load with the key, the value and what is allowed.

Every number must be finite and inside a stated range (the ``Field`` bounds
and the ``Window`` outer limits below): a typo such as ``.inf`` or a tilt of
900° is refused here rather than reaching a driver mid-run.
"""
from __future__ import annotations

import math
import re
from functools import partial
from pathlib import Path
from typing import Annotated, Literal, Optional

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo,
                      field_validator, model_validator)

from common.roles import ROLES
# the YAML reading lives in devices/yaml_input.py; callers import it from here with the setup model
from devices.yaml_input import (ConfigError, _short, format_validation_error, load_yaml_model,  # noqa: F401
                                read_yaml, validate_config)


class _Strict(BaseModel):
    # allow_inf_nan=False: .inf/.nan (or "nan" strings) in any float field, tuples included, are refused
    model_config = ConfigDict(extra="forbid", frozen=False, allow_inf_nan=False)


Range = tuple[float, float]
SEED_MAX = 2 ** 32 - 1          # numpy generators take non-negative seeds; one bound for every seed field
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]


def _window(v: Range, lo: float, hi: float, unit: str, positive: bool) -> Range:
    """A window [min, max]: min strictly below max, both within the outer limits."""
    if not v[0] < v[1]:
        raise ValueError(f"lower bound {v[0]} must be below upper bound {v[1]}")
    low_ok = v[0] > lo if positive else v[0] >= lo
    if not (low_ok and v[1] <= hi):
        allowed = f"({lo:g}, {hi:g}]" if positive else f"[{lo:g}, {hi:g}]"
        raise ValueError(f"window [{v[0]:g}, {v[1]:g}] {unit} is outside {allowed} {unit}".rstrip())
    return v


def Window(lo: float, hi: float, unit: str, what: str = "", *, positive: bool = False):
    """A Range field type whose two ends must lie within [lo, hi] (lo excluded
    when ``positive``): the physically sensible outer bounds of that window."""
    allowed = f"({lo:g}, {hi:g}]" if positive else f"[{lo:g}, {hi:g}]"
    return Annotated[Range, AfterValidator(partial(_window, lo=lo, hi=hi, unit=unit, positive=positive)),
                     Field(description=f"{what}[min, max] {unit}, min < max, both within {allowed}".strip())]


# --------------------------------------------------------- plain option data
MAX_OPTION_VALUES = 1000        # options are a handful of settings, never bulk data
MAX_OPTION_DEPTH = 8
MAX_OPTION_TEXT = 10_000


def json_like(value, where: str = "") -> dict:
    """``value`` when it is plain JSON-like data of bounded size (text keys;
    null, true/false, integers, finite numbers, text, lists, mappings);
    ValueError naming the offending entry. For the free-form ``options``
    mappings that are passed through to drivers and methods unchecked."""
    count = 0

    def walk(v, path: str, depth: int) -> None:
        nonlocal count
        count += 1
        shown = path or "(options)"
        if count > MAX_OPTION_VALUES:
            raise ValueError(f"more than {MAX_OPTION_VALUES} values: options hold settings, not data")
        if depth > MAX_OPTION_DEPTH:
            raise ValueError(f"{shown}: nested deeper than {MAX_OPTION_DEPTH} levels")
        if v is None or isinstance(v, bool):
            return
        if isinstance(v, int):
            if abs(v) >= 2 ** 63:
                raise ValueError(f"{shown} = {v}: integers must fit in 64 bits")
            return
        if isinstance(v, float):
            if not math.isfinite(v):
                raise ValueError(f"{shown} = {v!r}: numbers must be finite")
            return
        if isinstance(v, str):
            if len(v) > MAX_OPTION_TEXT:
                raise ValueError(f"{shown}: text longer than {MAX_OPTION_TEXT} characters")
            return
        if isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                walk(x, f"{path}[{i}]", depth + 1)
            return
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    raise ValueError(f"{shown}: key {k!r} is not text")
                walk(x, f"{path}.{k}" if path else k, depth + 1)
            return
        raise ValueError(f"{shown}: a {type(v).__name__} is not allowed: only text, numbers, true/false, "
                         "null, lists and mappings")

    walk(value, where, 0)
    return value


Options = Annotated[dict, AfterValidator(json_like)]


# ---------------------------------------------------------------- safety
class StageTravel(_Strict):
    x_mm: Window(-200, 200, "mm", "stage travel ") = (-50.0, 50.0)
    y_mm: Window(-200, 200, "mm", "stage travel ") = (-50.0, 50.0)
    z_mm: Window(-100, 100, "mm", "stage travel ") = (-1.0, 1.0)
    r_deg: Window(-360, 360, "deg", "stage rotation ") = (-360.0, 360.0)
    t_deg: Window(-90, 90, "deg", "stage tilt ") = (0.0, 60.0)


class MillPosition(_Strict):
    x_mm: float = Field(0.0, ge=-200, le=200, description="inside safety.stage.x_mm")
    y_mm: float = Field(0.0, ge=-200, le=200, description="inside safety.stage.y_mm")
    z_mm: float = Field(0.0, ge=-100, le=100, description="inside safety.stage.z_mm")
    glancing_angle_deg: float = Field(30.0, ge=0, le=90)
    max_tilt_deg: float = Field(60.0, ge=0, le=90)
    imaging_exclusion_mm: float = Field(
        5.0, ge=0, le=400, description="ion beam may be on only within this radius of the mill position")


class ElectronSourceSafety(_Strict):
    """Windows of the external electron source (devices.electron_source)."""
    max_current_na: float = Field(
        10_000.0, gt=0, le=1e6, description="measured specimen current above this: the source is closed and the "
        "run pauses (a wrong setting or a short)")
    max_exposure_s: float = Field(
        86_400.0, gt=0, le=86_400.0, description="longest the source may stay open for one irradiation")


class Safety(_Strict):
    stage: StageTravel = StageTravel()
    wd_mm: Window(0, 100, "mm", "working distance ", positive=True) = (2.0, 15.0)
    stig: Window(-100, 100, "", "stigmator ") = (-10.0, 10.0)
    max_autofocus_step_wd_um: float = Field(50.0, gt=0, le=10_000)
    max_autofocus_step_stig: float = Field(3.0, gt=0, le=200)
    # an SEM column tops out at 30 kV and a few hundred nA: anything outside is a typo
    eht_kv: Window(0, 30, "kV", "SEM high tension ", positive=True) = (0.2, 30.0)
    probe_current_na: Window(0, 1000, "nA", "SEM probe current ", positive=True) = (0.001, 100.0)
    ion_energy_kv: Window(0, 60, "kV", "GCIB acceleration ") = (0.0, 10.0)
    ion_cluster_size: Window(1, 100_000, "atoms", "GCIB cluster size ") = (100, 5000)
    ion_current_na_max: float = Field(100.0, gt=0, le=10_000)
    awg_max_vpp: float = Field(20.0, gt=0, le=20.0)
    max_exposures_per_tile: int = Field(
        3, ge=1, le=100, description="scans of one tile's area per cycle before the run pauses (electron dose); "
        "a plan may set fewer, never more")
    mill_position: MillPosition = MillPosition()
    electron_source: ElectronSourceSafety = ElectronSourceSafety()


# ---------------------------------------------------------- simulation
class MicroscopeParams(_Strict):
    """Hidden parameters of a simulated microscope (different values make a
    different 'microscope'). ``preset`` starts from a column modelled on a real
    one (devices/sim/column_presets.py); keys given with it override it."""
    preset: Optional[Literal["setup-a", "setup-b"]] = None
    alpha_mrad: float = Field(3.0, gt=0, le=50, description="probe half-angle")
    sigma0_nm: float = Field(1.5, ge=0, le=100, description="in-focus probe s.d.")
    stig_rotation_deg: float = Field(15.0, ge=-180, le=180, description="θ")
    stig_scale_x_um: float = Field(3.0, gt=0, le=1000, description="defocus-equivalent per stig unit, x")
    stig_scale_y_um: float = Field(3.0, gt=0, le=1000, description="defocus-equivalent per stig unit, y")
    wd_focus_mm: float = Field(5.0, gt=0, le=100, description="working distance of focus at stage z = 0")
    stig_x0: float = Field(0.0, ge=-100, le=100)
    stig_y0: float = Field(0.0, ge=-100, le=100)
    probe_shape: Literal["gaussian", "pillbox"] = "gaussian"
    scan_rotation_offset_deg: float = Field(0.0, ge=-360, le=360)
    detector_efficiency: float = Field(0.05, gt=0, le=1, description="detected SE per primary at full yield")
    detector_full_scale: float = Field(200.0, gt=0, le=255, description="grey levels at SE yield 1")
    detector_offset: float = Field(20.0, ge=0, le=255)
    read_noise: float = Field(1.0, ge=0, le=255, description="grey levels s.d.")
    drift_nm_per_frame: float = Field(0.5, ge=0, le=10_000)
    line_jitter_px: float = Field(0.1, ge=0, le=100)
    flyback_s: float = Field(100e-6, ge=0, le=1, description="per line")
    # secondary-electron contrast (devices/sim/se_contrast.py); neutral values turn each off
    se_edge_gain: float = Field(0.0, ge=0, le=10, description="edge brightening per 10 nm signal step")
    detector_gamma: float = Field(1.0, ge=0.2, le=5, description="detector response exponent")
    frame_gain_sd: float = Field(0.0, ge=0, le=1, description="contrast change between frames (log s.d.)")
    frame_offset_sd: float = Field(0.0, ge=0, le=100, description="brightness change between frames, grey levels")
    charging_sd: float = Field(0.0, ge=0, le=1, description="relative brightness drift over one frame")

    @model_validator(mode="before")
    @classmethod
    def _from_preset(cls, data):
        if isinstance(data, dict) and data.get("preset") is not None:
            from devices.sim.column_presets import PRESETS
            if data["preset"] in PRESETS:        # an unknown name is reported by the field itself
                return {**PRESETS[data["preset"]], **data}
        return data


class SpecimenParams(_Strict):
    images: list[Path] = Field(default_factory=list, max_length=10_000,
                               description="grayscale textures; empty = procedural")
    pixel_size_nm: Optional[float] = Field(None, gt=0, le=100_000,
                                           description="texture pixel size; None = 1:1 with the frame")
    slice_thickness_nm: float = Field(50.0, gt=0, le=100_000)
    seed: Seed = 0

    @field_validator("images")
    @classmethod
    def _exist(cls, v: list[Path], info: ValidationInfo):
        return [_existing_file(p, info, "specimen image") for p in v]


class WaferParams(_Strict):
    diameter_mm: float = Field(25.4, gt=0, le=300)
    sections: int = Field(6, ge=0, le=5000)
    section_size_um: tuple[Annotated[float, Field(gt=0, le=100_000)],
                           Annotated[float, Field(gt=0, le=100_000)]] = (500.0, 250.0)
    size_jitter: float = Field(0.1, ge=0, le=0.5)
    rotation_deg: float = Field(0.0, ge=-180, le=180)
    rotation_jitter_deg: float = Field(5.0, ge=0, le=180)
    spacing_um: float = Field(300.0, ge=0, le=100_000)
    resin_margin_um: float = Field(40.0, ge=0, le=100_000)
    thickness_nm: float = Field(250.0, gt=0, le=100_000)
    mill_inhomogeneity: float = Field(0.05, ge=0, le=0.5)
    tilt_um_per_mm: tuple[Annotated[float, Field(ge=-1000, le=1000)],
                          Annotated[float, Field(ge=-1000, le=1000)]] = (0.3, -0.2)
    seed: Seed = 0


class StageParams(_Strict):
    speed_mm_s: float = Field(5.0, gt=0, le=1000)
    settle_s: float = Field(0.2, ge=0, le=60)
    backlash_um: float = Field(2.0, ge=0, le=1000)
    repeatability_um: float = Field(0.5, ge=0, le=1000)
    z_shift_um_per_cm: float = Field(2.0, ge=0, le=1000, description="focus displacement s.d. per cm travelled")
    tolerance_um: float = Field(1.0, gt=0, le=1000)
    tolerance_deg: float = Field(0.05, gt=0, le=10)


FRAME_FAULTS = ("incomplete_frame", "frozen_frame")     # corrupt a grabbed frame: only the SEM has frames


class FaultRule(_Strict):
    device: Literal[ROLES]
    operation: str = Field(description="an operation the simulated device counts (see devices.sim.faults), "
                                       "or '*' for all")
    kind: Literal["timeout", "grab_failure", "move_failure", "disconnect", "visa_error", "communication",
                  "incomplete_frame", "frozen_frame"]
    probability: float = Field(0.0, ge=0, le=1)
    at_calls: list[Annotated[int, Field(ge=1, le=10 ** 9)]] = Field(
        default_factory=list, max_length=100_000, description="1-based call numbers that fail")

    @field_validator("operation")
    @classmethod
    def _real_operation(cls, v: str, info: ValidationInfo):
        # a misspelt operation would never fire: the reliability test would pass without testing anything
        device = info.data.get("device")
        if device is None:                   # the device itself is wrong: that error is reported
            return v
        from devices.sim.faults import FAULT_OPERATIONS
        allowed = FAULT_OPERATIONS.get(device, ())
        if not allowed:
            raise ValueError(f"the simulated {device} has no fault-injection points: no rule can fire")
        if v != "*" and v not in allowed:
            raise ValueError(f"{v!r} is not an operation of {device}: allowed {['*', *allowed]}")
        return v

    @model_validator(mode="after")
    def _kind_fits(self):
        if self.kind in FRAME_FAULTS and self.device != "sem":
            raise ValueError(f"kind {self.kind!r} corrupts a frame: only for device 'sem', not {self.device!r}")
        return self


class Simulation(_Strict):
    seed: Seed = 0
    time_factor: float = Field(0.0, ge=0, le=100, description="0 = no real waiting; 1 = real time")
    microscope: MicroscopeParams = MicroscopeParams()
    specimen: SpecimenParams = SpecimenParams()
    wafer: WaferParams = WaferParams()
    stage: StageParams = StageParams()
    faults: list[FaultRule] = Field(default_factory=list, max_length=1000)
    mill_rate_nm_per_s_per_na: float = Field(
        0.0, ge=0, le=1e6, description="0 = derive from seed Table 2.1 for the configured irradiation dose")
    irradiation_dose_1e27_ev_cm3: float = Field(0.5, ge=0, le=2)
    mill_area_mm2: float = Field(484.0, gt=0, le=1e5, description="ion raster area over which the current spreads")


# ---------------------------------------------------------------- devices
class DeviceConfig(_Strict):
    driver: str = Field(max_length=100)
    url: Optional[str] = Field(None, max_length=1000)           # pyserial URL or COM port
    resource: Optional[str] = Field(None, max_length=1000)      # VISA resource name
    visa_library: Optional[str] = Field(None, max_length=1000)  # '@py', or 'configs/visa/x.yaml@sim'
    command_table: Optional[Path] = None   # ion gun YAML
    timeout_s: float = Field(2.0, gt=0, le=600)
    sign: Optional[float] = Field(None, description="current preamp output sign: +1, or -1 (inverting)")
    options: Options = Field(default_factory=dict, description="plain values only (text, numbers, lists, "
                                                               f"mappings), at most {MAX_OPTION_VALUES}")

    @field_validator("sign")
    @classmethod
    def _unit_sign(cls, v):
        if v is not None and v not in (-1.0, 1.0):
            raise ValueError("allowed +1 or -1")
        return v

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
    "electron_source": {"sim", "serial_shutter"},
}


class Devices(_Strict):
    sem: DeviceConfig
    stage: DeviceConfig
    ion_gun: Optional[DeviceConfig] = None
    waveform_generator: Optional[DeviceConfig] = None
    multimeter: Optional[DeviceConfig] = None
    current_preamp: Optional[DeviceConfig] = None
    electron_source: Optional[DeviceConfig] = None      # external flood gun: irradiation.source = external

    @model_validator(mode="after")
    def _known(self):
        for role, allowed in KNOWN_DRIVERS.items():
            dev = getattr(self, role)
            if dev is not None and dev.driver not in allowed:
                raise ValueError(f"devices.{role}.driver = {dev.driver!r}: allowed {sorted(allowed)}")
        return self

    @model_validator(mode="after")
    def _electron_source_options(self):
        # checked at load: a typo in the shutter's vocabulary must not surface at the first irradiation
        c = self.electron_source
        if c is None:
            return self
        if c.driver == "sim":
            from devices.sim.electron_source import sim_options
            sim_options(c.options)
        else:
            from devices.electron_source_serial import shutter_options
            shutter_options(c.options)
            if not c.url:
                raise ValueError(f"devices.electron_source.url: {c.driver} needs the serial port "
                                 "(COM3, /dev/ttyUSB0, socket://host:port, or sim:// for the emulator)")
        return self

    @model_validator(mode="after")
    def _zeiss_options(self):
        # the SmartSEM driver's options are checked at load, not at the first run
        from devices.zeiss_setup import check_options
        for role in ("sem", "stage"):
            dev = getattr(self, role)
            if dev.driver == "zeiss_smartsem":
                check_options(role, dev.options)
        return self


class Calibration(_Strict):
    ion_raster_mm_per_vpp: tuple[Annotated[float, Field(gt=0, le=100)],
                                 Annotated[float, Field(gt=0, le=100)]] = (1.1, 1.1)
    stage_to_image_rotation_deg: float = Field(0.0, ge=-360, le=360)
    # the column's probe half-angle where autofocus images (aperture radius over its distance to
    # the focus, or the value `autofocus recalibrate` reports): a DeepFocus model read against a
    # reference column starts from it and refines it from its own moves (autofocus/column_scale.py);
    # None = assume 10.6 mrad (column_scale.UNSTATED_ALPHA_MRAD). 2-25 mrad is what the model trained on.
    probe_half_angle_mrad: Optional[float] = Field(None, ge=2.0, le=25.0)


# ---------------------------------------------------------- notifications
NOTIFY_EVENTS = ("pause", "error", "suspension", "finish")
# one address, no display name: a comma or space means two addresses typed as one
_EMAIL = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")      # an HTTP token (RFC 9110)


def _email_address(v: str) -> str:
    if not _EMAIL.fullmatch(v):
        raise ValueError("not an e-mail address (name@domain, one address per entry)")
    return v


def _env_name(v: str) -> str:
    if not _ENV_NAME.fullmatch(v):
        raise ValueError("not an environment variable name (letters, digits and _, not starting with a digit)")
    return v


def _one_line(v: str) -> str:
    if "\r" in v or "\n" in v:
        raise ValueError("must be one line (no line breaks)")
    return v


EmailAddress = Annotated[str, Field(max_length=254), AfterValidator(_email_address)]
EnvName = Annotated[str, Field(max_length=100), AfterValidator(_env_name)]


class EmailNotify(_Strict):
    host: Annotated[str, Field(min_length=1, max_length=253), AfterValidator(_one_line)]
    port: int = Field(587, ge=1, le=65535)
    starttls: bool = Field(True, description="upgrade the connection with STARTTLS (port 587)")
    ssl: bool = Field(False, description="TLS from the first byte (port 465)")
    username: Optional[Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_one_line)]] = None
    password_env: Optional[EnvName] = Field(
        None, description="name of the environment variable holding the password; never the password itself")
    sender: EmailAddress
    recipients: list[EmailAddress] = Field(min_length=1, max_length=50)
    timeout_s: float = Field(20.0, gt=0, le=300)

    @model_validator(mode="after")
    def _consistent(self):
        if self.ssl and self.starttls:
            raise ValueError("ssl and starttls exclude each other: ssl for port 465, starttls for 587")
        if (self.username is None) != (self.password_env is None):
            raise ValueError("username and password_env go together (both, or neither for no login)")
        return self


class WebhookNotify(_Strict):
    url: str = Field(max_length=2000, description="http:// or https:// address that takes a JSON POST")
    headers: dict[str, str] = Field(default_factory=dict, max_length=20)
    headers_env: dict[str, EnvName] = Field(
        default_factory=dict, max_length=20,
        description="header name -> environment variable holding its value (tokens stay out of the file)")
    timeout_s: float = Field(10.0, gt=0, le=300)

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str):
        from urllib.parse import urlsplit
        if any(c.isspace() for c in v):
            raise ValueError("an address contains no spaces or line breaks")
        try:
            parts = urlsplit(v)
            parts.port                              # raises on a port that is no number or out of range
        except ValueError as e:
            raise ValueError(f"not a valid address: {e}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("allowed: an http:// or https:// address with a host name")
        return v

    @field_validator("headers", "headers_env")
    @classmethod
    def _headers(cls, v: dict):
        for name, value in v.items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"header name {_short(name, 80)}: letters, digits and !#$%&'*+.^_`|~- only")
            if "\r" in value or "\n" in value:
                raise ValueError(f"header {name}: the value must be one line")
        return v


class Notifications(_Strict):
    """Messages to people away from the microscope (acq/notify.py)."""
    enabled: bool = True
    email: Optional[EmailNotify] = None
    webhook: Optional[WebhookNotify] = None
    events: list[Literal[NOTIFY_EVENTS]] = Field(default_factory=lambda: list(NOTIFY_EVENTS), min_length=1)
    min_interval_s: float = Field(
        600.0, ge=0, le=7 * 86400, description="at most one message per event kind in this time; the others "
                                               "are counted and summarised in the next one")
    subject_prefix: Annotated[str, Field(max_length=100), AfterValidator(_one_line)] = "[GCIB-SEM]"
    retries: int = Field(2, ge=0, le=10, description="further tries of a message that could not be sent")
    retry_delay_s: float = Field(30.0, ge=0, le=3600, description="before the first retry; doubles each time")

    @model_validator(mode="after")
    def _somewhere(self):
        if self.email is None and self.webhook is None:
            raise ValueError("give email, webhook or both (nowhere to send the notifications)")
        return self


class SetupConfig(_Strict):
    name: str = Field(min_length=1, max_length=200)
    devices: Devices
    safety: Safety = Safety()
    calibration: Calibration = Calibration()
    simulation: Optional[Simulation] = None
    notifications: Optional[Notifications] = None
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


def _existing_file(p: Path, info: ValidationInfo, what: str) -> Path:
    """Relative paths are relative to the setup file's folder."""
    p = Path(p).expanduser()
    base = (info.context or {}).get("base") if info is not None else None
    if not p.is_absolute() and base is not None:
        p = Path(base) / p
    if not p.is_file():
        raise ValueError(f"{what} {str(p)!r} does not exist")
    return p.resolve()


def load_setup(path: str | Path) -> SetupConfig:
    path = Path(path)
    cfg = load_yaml_model(path, SetupConfig, what="setup file", context={"base": path.parent})
    cfg.source = path
    return cfg


def deg(v: float) -> float:
    return math.radians(v)
