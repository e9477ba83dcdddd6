"""Typed device interfaces. SI units everywhere (m, s, A, V, rad).

Drivers convert vendor units at their edge. Code that needs an optional
feature checks ``Capability`` flags, never a model name.
"""
from __future__ import annotations

import abc
import contextlib
import enum
from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterator, Optional

import numpy as np

from devices.errors import AcquisitionFailed, DeviceError


class Capability(enum.Flag):
    NONE = 0
    AUTOFOCUS = enum.auto()          # the microscope's own autofocus routine
    FREEZE = enum.auto()             # frame store can be frozen / polled
    SCAN_ROTATION = enum.auto()
    STAGE_ROTATION = enum.auto()
    STAGE_TILT = enum.auto()
    BEAM_BLANKING = enum.auto()
    RASTER = enum.auto()             # ion gun's own raster / deflectors
    CLUSTER_SIZE = enum.auto()
    EHT_CONTROL = enum.auto()        # SEM gun on/off and its run-up state
    APERTURE = enum.auto()
    HIGH_CURRENT = enum.auto()
    VARIABLE_PRESSURE = enum.auto()
    CHARGE_COMPENSATION = enum.auto()  # focal charge compensation (gas jet)
    AUTOSTIG = enum.auto()           # the microscope's own autostig routine


@dataclass
class DeviceStatus:
    healthy: bool
    detail: str = ""


class Device(abc.ABC):
    """Common life cycle: connect, identify, report health, close."""

    role: str = ""
    capabilities: Capability = Capability.NONE

    @abc.abstractmethod
    def connect(self) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def identity(self) -> str: ...

    def status(self) -> DeviceStatus:
        return DeviceStatus(True, "ok")

    def __enter__(self):
        self.connect()
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------- SEM
@dataclass
class Frame:
    image: np.ndarray                     # uint8, shape (height, width)
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ScanParams:
    """Scan parameters for ``SEM.set_scan``; None leaves that one as it is."""
    pixel_m: Optional[float] = None
    frame: Optional[tuple[int, int]] = None           # width, height
    dwell_s: Optional[float] = None
    rotation_rad: Optional[float] = None

    def only(self, given: "ScanParams") -> "ScanParams":
        """These values for the parameters ``given`` sets, None for the others."""
        return ScanParams(**{f.name: getattr(self, f.name) if getattr(given, f.name) is not None else None
                             for f in fields(self)})


class NotSupported(DeviceError):
    """The device lacks this feature (its Capability flag is not set)."""


class BeamOff(AcquisitionFailed):
    """The SEM's EHT is off (or still running up): no frame can be scanned."""


def _unsupported(dev: "Device", what: str, flag: Capability):
    raise NotSupported(f"{what} is not available (Capability.{flag.name} not set)",
                       device=type(dev).__name__, operation=what)


class SEM(Device):
    """The per-parameter setters are what a driver implements; callers set a
    scan through ``set_scan`` (or ``scanning``), which fixes the order."""
    role = "sem"

    @abc.abstractmethod
    def eht(self) -> float: ...
    @abc.abstractmethod
    def set_eht(self, volts: float) -> None: ...
    @abc.abstractmethod
    def probe_current(self) -> float: ...
    @abc.abstractmethod
    def set_probe_current(self, amperes: float) -> None: ...
    @abc.abstractmethod
    def working_distance(self) -> float: ...
    @abc.abstractmethod
    def set_working_distance(self, metres: float) -> None: ...
    @abc.abstractmethod
    def stig(self) -> tuple[float, float]: ...
    @abc.abstractmethod
    def set_stig(self, x: float, y: float) -> None: ...
    @abc.abstractmethod
    def pixel_size(self) -> float: ...
    @abc.abstractmethod
    def set_pixel_size(self, metres: float) -> None: ...
    @abc.abstractmethod
    def dwell_time(self) -> float: ...
    @abc.abstractmethod
    def set_dwell_time(self, seconds: float) -> None: ...
    @abc.abstractmethod
    def frame_size(self) -> tuple[int, int]: ...
    @abc.abstractmethod
    def set_frame_size(self, width: int, height: int) -> None: ...
    @abc.abstractmethod
    def scan_rotation(self) -> float: ...
    @abc.abstractmethod
    def set_scan_rotation(self, radians: float) -> None: ...
    @abc.abstractmethod
    def blanked(self) -> bool: ...
    @abc.abstractmethod
    def set_blanked(self, blanked: bool) -> None: ...
    @abc.abstractmethod
    def acquire_frame(self) -> Frame: ...

    def scan(self) -> ScanParams:
        return ScanParams(self.pixel_size(), tuple(self.frame_size()), self.dwell_time(), self.scan_rotation())

    def set_scan(self, scan: ScanParams) -> None:
        """Set the given parameters, the frame size before the pixel size: on a
        real column the pixel size follows from magnification and frame width,
        so a frame set afterwards would change it again."""
        if scan.frame is not None:
            self.set_frame_size(*scan.frame)
        if scan.pixel_m is not None:
            self.set_pixel_size(scan.pixel_m)
        if scan.dwell_s is not None:
            self.set_dwell_time(scan.dwell_s)
        if scan.rotation_rad is not None:
            self.set_scan_rotation(scan.rotation_rad)

    @contextlib.contextmanager
    def scanning(self, scan: ScanParams, *, unblank: bool = True) -> Iterator["SEM"]:
        """``scan`` (and the beam unblanked) for the block; afterwards the
        parameters it changed and the blanking are put back, also after an error."""
        before, blanked = self.scan().only(scan), self.blanked()
        try:
            self.set_scan(scan)
            if unblank and blanked:
                self.set_blanked(False)
            yield self
        finally:
            self.set_scan(before)
            if unblank and blanked:
                self.set_blanked(True)

    def field_of_view(self) -> tuple[float, float]:
        w, h = self.frame_size()
        p = self.pixel_size()
        return w * p, h * p

    def run_autofocus(self) -> None:
        """The microscope's own autofocus (only with Capability.AUTOFOCUS)."""
        _unsupported(self, "run_autofocus", Capability.AUTOFOCUS)

    # A SEM that scans only inside acquire_frame (the simulator) has nothing to
    # freeze; SmartSEM stays frozen between frames and scans live only between
    # unfreeze() and freeze() (an SEM-scan irradiation needs exactly that).
    def unfreeze(self) -> None:
        """Scan live until freeze()."""

    def freeze(self) -> None:
        """Stop the live scan (at the end of the frame being scanned)."""

    # Optional controls: each raises NotSupported unless its Capability is set.
    def run_autostig(self) -> None:
        _unsupported(self, "run_autostig", Capability.AUTOSTIG)

    def eht_on(self) -> bool:
        """True only when the beam is fully on (run-up finished)."""
        _unsupported(self, "eht_on", Capability.EHT_CONTROL)

    def eht_state(self) -> str:
        """The gun's state as the microscope names it ("Beam On", "EHT Off", ...)."""
        _unsupported(self, "eht_state", Capability.EHT_CONTROL)

    def set_eht_on(self, on: bool, *, wait: bool = True) -> None:
        """Switch the gun; with ``wait`` until run-up (or shut-down) is over."""
        _unsupported(self, "set_eht_on", Capability.EHT_CONTROL)

    def aperture(self) -> float:
        """Aperture diameter in m."""
        _unsupported(self, "aperture", Capability.APERTURE)

    def set_aperture(self, index: int) -> None:
        """Select the aperture by the microscope's index."""
        _unsupported(self, "set_aperture", Capability.APERTURE)

    def high_current(self) -> bool:
        _unsupported(self, "high_current", Capability.HIGH_CURRENT)

    def set_high_current(self, on: bool) -> None:
        _unsupported(self, "set_high_current", Capability.HIGH_CURRENT)

    def variable_pressure(self) -> bool:
        """True in variable-pressure mode, False in high vacuum."""
        _unsupported(self, "variable_pressure", Capability.VARIABLE_PRESSURE)

    def set_variable_pressure(self, on: bool, target_pa: Optional[float] = None) -> None:
        _unsupported(self, "set_variable_pressure", Capability.VARIABLE_PRESSURE)

    def chamber_pressure(self) -> float:
        """Pa."""
        _unsupported(self, "chamber_pressure", Capability.VARIABLE_PRESSURE)

    def charge_compensation(self) -> bool:
        _unsupported(self, "charge_compensation", Capability.CHARGE_COMPENSATION)

    def set_charge_compensation(self, on: bool, level: Optional[float] = None) -> None:
        """Focal charge compensation in (``level``: the microscope's AP_CC_PRESSURE) or out."""
        _unsupported(self, "set_charge_compensation", Capability.CHARGE_COMPENSATION)


# ------------------------------------------------------------------- stage
@dataclass(frozen=True)
class StagePosition:
    x: float = 0.0   # m
    y: float = 0.0   # m
    z: float = 0.0   # m
    r: float = 0.0   # rad, rotation about the vertical axis
    t: float = 0.0   # rad, tilt

    AXES = ("x", "y", "z", "r", "t")

    def with_(self, **axes: float) -> "StagePosition":
        return replace(self, **axes)

    def as_dict(self) -> dict[str, float]:
        return {a: getattr(self, a) for a in self.AXES}


class Stage(Device):
    role = "stage"

    @abc.abstractmethod
    def position(self) -> StagePosition: ...

    @abc.abstractmethod
    def move_to(self, target: StagePosition, *, verify: bool = True) -> StagePosition:
        """Move (z last when going up, first when going down is the caller's
        business), wait for settle, verify against tolerance, return actual."""

    @abc.abstractmethod
    def stop(self) -> None: ...

    def is_moving(self) -> bool:
        """Whether the stage reports motion (drivers that cannot tell: False
        once move_to has returned)."""
        return False

    def move_by(self, **delta: float) -> StagePosition:
        pos = self.position()
        return self.move_to(pos.with_(**{a: getattr(pos, a) + d for a, d in delta.items()}))


# ----------------------------------------------------------------- ion gun
@dataclass
class IonGunStatus:
    beam_on: bool
    blanked: bool
    interlocks_ok: bool
    interlocks: dict[str, bool] = field(default_factory=dict)
    energy: float = 0.0           # V (acceleration voltage)
    cluster_size: int = 0
    emission_current: float = 0.0  # A
    target_current: float = 0.0    # A
    raster_on: bool = False
    error: str = ""


class IonGun(Device):
    role = "ion_gun"

    @abc.abstractmethod
    def gun_status(self) -> IonGunStatus: ...
    @abc.abstractmethod
    def set_beam(self, on: bool) -> None: ...
    @abc.abstractmethod
    def set_blanked(self, blanked: bool) -> None: ...
    @abc.abstractmethod
    def set_energy(self, volts: float) -> None: ...
    @abc.abstractmethod
    def set_cluster_size(self, n: int) -> None: ...
    @abc.abstractmethod
    def set_raster(self, on: bool) -> None: ...
    @abc.abstractmethod
    def target_current(self) -> float: ...
    @abc.abstractmethod
    def last_error(self) -> str: ...


class Blanker(Device):
    role = "blanker"

    @abc.abstractmethod
    def set_blanked(self, blanked: bool) -> None: ...
    @abc.abstractmethod
    def blanked(self) -> bool: ...


# --------------------------------------------------- raster and dose chain
@dataclass
class RasterSettings:
    x_amplitude_vpp: float
    y_amplitude_vpp: float
    x_frequency_hz: float = 100.0
    y_frequency_hz: float = 1.0
    x_offset_v: float = 0.0
    y_offset_v: float = 0.0


class WaveformGenerator(Device):
    role = "waveform_generator"

    @abc.abstractmethod
    def configure_raster(self, raster: RasterSettings) -> RasterSettings:
        """Configure both channels; returns the settings read back."""
    @abc.abstractmethod
    def set_outputs(self, on: bool) -> None: ...
    @abc.abstractmethod
    def outputs_on(self) -> bool: ...


class Multimeter(Device):
    role = "multimeter"

    @abc.abstractmethod
    def configure_dc_voltage(self, range_v: float, nplc: float) -> None: ...
    @abc.abstractmethod
    def read_voltage(self) -> float: ...
    @abc.abstractmethod
    def read_block(self, count: int, interval_s: float) -> tuple[np.ndarray, np.ndarray]:
        """``count`` timed samples: (times in s from the first, volts)."""


class CurrentPreamp(Device):
    role = "current_preamp"

    @abc.abstractmethod
    def set_sensitivity(self, amperes_per_volt: float) -> None: ...
    @abc.abstractmethod
    def sensitivity(self) -> float: ...

    def voltage_to_current(self, volts):
        """Output voltage of the preamp (as read by the DMM) to input current."""
        return self.sign * self.sensitivity() * volts

    sign: float = -1.0   # SR570 inverts; configurable per setup


# ------------------------------------------------- external electron source
@dataclass
class ElectronSourceStatus:
    beam_on: bool                               # emission on and shutter open: electrons reach the specimen
    emission_current: Optional[float] = None    # A, the source's own read-back (None: it has none)
    energy: Optional[float] = None              # V, the beam energy it reports (None: not reported)
    error: str = ""


class ElectronSource(Device):
    """An external electron source (flood gun) that irradiates sections for
    conductivity (seed ch. 2: an EH-50 from STAIB). The dose is not taken
    from the source: the specimen current is measured by the preamp + DMM
    chain. ``beam_off`` is the safe state every error path calls."""
    role = "electron_source"
    emission_setpoint: bool = False            # set_emission_current is available
    energy_setpoint: bool = False              # set_energy is available

    @abc.abstractmethod
    def set_beam(self, on: bool) -> None:
        """Open (True) or close the shutter / switch emission; verified by read-back."""
    @abc.abstractmethod
    def source_status(self) -> ElectronSourceStatus: ...

    def beam_on(self) -> bool:
        return self.source_status().beam_on

    def beam_off(self) -> None:
        self.set_beam(False)

    def set_emission_current(self, amperes: float) -> None:
        raise NotImplementedError("this electron source has no emission setpoint")

    def set_energy(self, volts: float) -> None:
        raise NotImplementedError("this electron source has no energy setpoint")
