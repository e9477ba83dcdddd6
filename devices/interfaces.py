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
        raise NotImplementedError("this SEM has no built-in autofocus")


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
