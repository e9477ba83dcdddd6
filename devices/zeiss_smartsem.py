"""ZEISS SmartSEM remote API driver (COM control ``CZ.EMApiCtrl.1``): SEM and stage.

Behaviour as SmartSEM needs it: every frame is a valid store resolution (a
smaller request is cropped from the centre of the smallest store holding it);
every wait is bounded by the work (scan time, travel time) rather than a fixed
timeout; the scan is frozen between frames, so the beam does not dwell on the
sample while the program moves or thinks; a frame starts only after the stage
has settled. The COM wrapper: devices/zeiss_api.py; tables and timeout
arithmetic: devices/zeiss_tables.py; building from a setup: devices/zeiss_setup.py.
AP_ values are SI, not the UI/TIFF display units (see each reader).
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Callable

import numpy as np
import tifffile

from common.constants import E_CHARGE
from devices.calibration import PIXEL_SCALE_RANGE
from devices.errors import AcquisitionFailed, DeviceError, DeviceTimeout, LimitViolation, MoveFailed
from devices.interfaces import (SEM, BeamOff, Capability, Frame, Stage, StagePosition,
                                _unsupported)
from devices.zeiss_api import (DEVICE, PROG_ID, SmartSEMApi, SmartSEMError, _as_api, _comm,
                               _finite, _flag)
from devices.zeiss_tables import (API_ERRORS, DEFAULT_DWELL_TABLE, DEFAULT_STAGE_SPEED,
                                  DEFAULT_STORE_TABLE, RUNUP_OFF, RUNUP_ON, TimeoutPolicy,
                                  centre_crop, scan_time_s, snap_store)

# the names callers import from here (the API wrapper and tables live beside)
__all__ = ["API_ERRORS", "DEFAULT_DWELL_TABLE", "DEFAULT_STORE_TABLE", "PROG_ID", "SmartSEMApi",
           "SmartSEMError", "ZeissSEM", "ZeissStage"]


# SI accessors for analogue parameters; scale = SI units per API unit. The
# setter refuses non-finite and non-positive values before sending anything.
def _reader(param: str, scale: float = 1.0):
    def read(self) -> float:
        return self.api.get_float(param) * scale
    return read


def _writer(param: str, quantity: str, scale: float = 1.0):
    def write(self, value: float) -> None:
        self.api.set(param, _finite(quantity, value, positive=True) / scale)
    return write


class _OnSharedApi:
    """Life cycle and polling shared by the SEM and the stage on one SmartSEMApi."""
    def _init_common(self, api, timeout_s, poll_s, clock, sleep) -> None:
        self.api = _as_api(api)
        self.timeout_s, self.poll_s = timeout_s, poll_s
        # clock: a devices.clock.Clock (now/sleep) or a bare callable
        if clock is not None and hasattr(clock, "now"):
            clock, sleep = clock.now, sleep or clock.sleep
        self._clock, self._sleep = clock or time.monotonic, sleep or time.sleep

    def connect(self) -> None:
        self.api.connect()

    def close(self) -> None:
        self.api.close()

    def _wait(self, what: str, read: Callable[[], Any], done: Callable[[Any], bool],
              timeout_s: float, operation: str):
        """Poll ``read`` until ``done``; sleeps only between unsuccessful polls."""
        t0 = self._clock()
        while not done(value := read()):
            if self._clock() - t0 >= timeout_s:
                raise DeviceTimeout(f"{what} not reached within {timeout_s:.3g} s (last: "
                                    f"{value!r})", device=DEVICE, operation=operation)
            self._sleep(self.poll_s)
        return value


def _requested_fits(requested, store, stores) -> bool:
    return requested is not None and snap_store(*requested, stores) == store


class ZeissSEM(_OnSharedApi, SEM):
    # Fitted-or-not features (high current, VP, FCC) are probed at connect.
    BASE_CAPABILITIES = (Capability.AUTOFOCUS | Capability.AUTOSTIG | Capability.FREEZE
                         | Capability.SCAN_ROTATION | Capability.BEAM_BLANKING
                         | Capability.EHT_CONTROL | Capability.APERTURE)
    capabilities = BASE_CAPABILITIES

    def __init__(self, api=None, *, timeout_s: float = 5.0, poll_s: float = 0.05,
                 image_dir: str | None = None, clock=None,
                 sleep: Callable[[float], None] | None = None,
                 dwell_table: dict[int, float] | None = None,
                 store_table: dict[tuple[int, int], int] | None = None,
                 grab_region=(0, 0, 1024, 768), grab_reduction: int = 0,
                 autofocus_start_s: float = 2.0, pixel_size_rel_tol: float = 0.01,
                 policy: TimeoutPolicy | None = None, focus_settle_s: float = 0.2,
                 pixel_size_scale: float = 1.0):
        self._init_common(api, timeout_s, poll_s, clock, sleep)
        lo, hi = PIXEL_SCALE_RANGE
        if isinstance(pixel_size_scale, bool) or not (isinstance(pixel_size_scale, (int, float))
                                                       and lo <= pixel_size_scale <= hi):
            raise ValueError(f"pixel_size_scale = {pixel_size_scale!r}: allowed {lo:g}..{hi:g}")
        # true pixel size / SmartSEM's AP_PIXEL_SIZE, from devices/calibration.py
        self.pixel_size_scale = float(pixel_size_scale)
        # timeout_s is the margin on top of the work, never the whole bound
        self.policy = policy or TimeoutPolicy(margin_s=timeout_s)
        self.image_dir, self.autofocus_start_s = image_dir, autofocus_start_s
        self.dwell_table = dict(dwell_table or DEFAULT_DWELL_TABLE)
        self.store_table = dict(store_table or DEFAULT_STORE_TABLE)
        # Grab's region is in the 1024x768 display frame; reduction 0 writes the
        # full store resolution (how SBEMimage grabs its 4096x3072 tiles).
        self.grab_region, self.grab_reduction = grab_region, grab_reduction
        self.pixel_size_rel_tol, self.focus_settle_s = pixel_size_rel_tol, focus_settle_s
        self._requested: tuple[int, int] | None = None   # frame asked for, maybe not a store

    def connect(self) -> None:
        super().connect()
        caps = self.BASE_CAPABILITIES
        for flag, probe in ((Capability.HIGH_CURRENT, "DP_HIGH_CURRENT"),
                            (Capability.VARIABLE_PRESSURE, "DP_VP_SYSTEM"),
                            (Capability.CHARGE_COMPENSATION, "DP_CAPCC_FITTED")):
            try:
                value = str(self.api.get(probe)).strip().lower()
            except SmartSEMError:          # the parameter does not exist: not fitted
                continue
            if probe == "DP_HIGH_CURRENT" or value in ("yes", "fitted", "1"):
                caps |= flag
        self.capabilities = caps

    def identity(self) -> str:
        return f"ZEISS SmartSEM {self.api.get('SV_VERSION')}".strip()

    # The API speaks SI here, hence scale 1, though the UI and the TIFF header show
    # mm/nm/kV/pA: WaferMapper sets AP_WD 0.009 for 9 mm and divides stage metres
    # by AP_PIXEL_SIZE (ZeissTrial: "pixel size in m"); SBEMimage sets AP_MANUALKV
    # to kV*1000 and AP_IPROBE to pA*1e-12.
    eht = _reader("AP_ACTUALKV")                                  # V, measured (0 when off)
    set_eht = _writer("AP_MANUALKV", "eht")                       # V, target
    probe_current = _reader("AP_IPROBE")                          # A
    set_probe_current = _writer("AP_IPROBE", "probe_current")
    working_distance = _reader("AP_WD")                           # m
    raw_pixel_size = _reader("AP_PIXEL_SIZE")                     # m, SmartSEM's: set via mag
    magnification = _reader("AP_MAG")
    aperture = _reader("AP_APERTURESIZE")                         # m
    chamber_pressure = _reader("AP_CHAMBER_PRESSURE")             # Pa

    def _lens_step(self) -> None:
        # a focus or stigmator step: the next frame waits for the lens to follow
        self.api.ready_at = max(self.api.ready_at, self._clock() + self.focus_settle_s)

    def set_working_distance(self, metres: float) -> None:
        self.api.set("AP_WD", _finite("working_distance", metres, positive=True))
        self._lens_step()

    def stig(self) -> tuple[float, float]:
        return self.api.get_float("AP_STIG_X"), self.api.get_float("AP_STIG_Y")   # %

    def set_stig(self, x: float, y: float) -> None:
        x, y = _finite("stig_x", x), _finite("stig_y", y)
        self.api.set("AP_STIG_X", x)
        self.api.set("AP_STIG_Y", y)
        self._lens_step()

    def pixel_size(self) -> float:
        """The calibrated pixel size: SmartSEM's reading x pixel_size_scale."""
        return self.raw_pixel_size() * self.pixel_size_scale

    def set_pixel_size(self, metres: float) -> None:
        """Via AP_MAG (pixel size ∝ 1/mag); AP_PIXEL_SIZE itself is read-only.
        Aims at the calibrated size, so SmartSEM's reading ends at target/scale."""
        target = _finite("pixel_size", metres, positive=True)
        mag, px = self.magnification(), self.pixel_size()
        for _ in range(3):    # re-correct: the column may round or clip the mag
            self.api.set("AP_MAG", mag * px / target)
            mag, px = self.magnification(), self.pixel_size()
            if abs(px / target - 1.0) <= self.pixel_size_rel_tol:
                return
        raise DeviceError(f"pixel size {px:.4g} m reached instead of {target:.4g} m (mag "
                          f"{mag:.6g}; outside the magnification range?)", device=DEVICE,
                          operation="set_pixel_size")

    def dwell_time(self) -> float:
        rate = self.api.get("DP_SCANRATE")
        try:
            return self.dwell_table[int(float(rate))]
        except (KeyError, TypeError, ValueError):
            raise _comm(f"DP_SCANRATE {rate!r} not in {sorted(self.dwell_table)}", "get") from None

    def set_dwell_time(self, seconds: float) -> None:
        """Nearest scan rate (log ratio); refuses a dwell > 2x off every entry."""
        seconds, table = _finite("dwell_time", seconds, positive=True), self.dwell_table
        n = min(table, key=lambda k: abs(math.log(table[k] / seconds)))
        if abs(math.log(table[n] / seconds)) > math.log(2.0):
            raise LimitViolation("dwell_time", seconds, f"{min(table.values()):.3g}.."
                                 f"{max(table.values()):.3g} s", device=DEVICE)
        self.api.execute(f"CMD_SCANRATE{n}")

    # -------------------------------------------------------- store and frame
    def store_size(self) -> tuple[int, int]:
        """The store SmartSEM scans (DP_IMAGE_STORE), whatever was asked for."""
        value = self.api.get("DP_IMAGE_STORE")
        m = re.fullmatch(r"\s*(\d+)\s*\*\s*(\d+)\s*", str(value))
        if not m:
            raise _comm(f"DP_IMAGE_STORE: unexpected value {value!r}", "get")
        return int(m.group(1)), int(m.group(2))

    def frame_size(self) -> tuple[int, int]:
        """The frame acquire_frame returns: the size asked for when the store
        is the one chosen for it, else the store itself."""
        store = self.store_size()
        return self._requested if _requested_fits(self._requested, store, self.store_table) \
            else store

    def set_frame_size(self, width: int, height: int) -> None:
        """Any size up to the largest store: the smallest store that holds it is
        scanned and the frame cropped from its centre (pixel size unchanged)."""
        if not (isinstance(width, (int, np.integer)) and isinstance(height, (int, np.integer))
                and width > 0 and height > 0):
            raise LimitViolation("frame_size", (width, height), "positive whole pixels",
                                 device=DEVICE)
        try:
            store = snap_store(int(width), int(height), self.store_table)
        except ValueError as e:
            raise LimitViolation("frame_size", (width, height), str(e), device=DEVICE) from None
        if store != self.store_size():
            # SmartSEM unfreezes on a store change: freeze on command around it,
            # then back to freeze at end of frame (SBEMimage does the same).
            try:
                self.api.set("DP_FREEZE_ON", 2)
                self.api.set("DP_IMAGE_STORE", self.store_table[store])
                self.api.execute("CMD_FREEZE_ALL")
                self.api.set("DP_FREEZE_ON", 0)
            except BaseException:
                self._safe_freeze()             # never left scanning live after a failed store change
                raise
        self._requested = (int(width), int(height))

    def scan_rotation(self) -> float:
        if not _flag("DP_SCAN_ROT", self.api.get("DP_SCAN_ROT")):
            return 0.0                               # disabled: the angle is not applied
        return math.radians(self.api.get_float("AP_SCANROTATION"))

    def set_scan_rotation(self, radians: float) -> None:
        degrees = math.degrees(_finite("scan_rotation", radians)) % 360.0
        self.api.set("DP_SCAN_ROT", 1 if degrees else 0)
        self.api.set("AP_SCANROTATION", degrees)

    def blanked(self) -> bool:
        return _flag("DP_BEAM_BLANKING", self.api.get("DP_BEAM_BLANKING"))

    def set_blanked(self, blanked: bool) -> None:
        self.api.set("DP_BEAM_BLANKING", 1 if blanked else 0)

    # ------------------------------------------------ EHT and column options
    # CMD_BEAM_ON / CMD_EHT_OFF switch the gun (EHT), not the blanker.
    def eht_state(self) -> str:
        return str(self.api.get("DP_RUNUPSTATE")).strip()

    def eht_on(self) -> bool:
        return self.eht_state().lower() == RUNUP_ON.lower()

    def set_eht_on(self, on: bool, *, wait: bool = True) -> None:
        self.api.execute("CMD_BEAM_ON" if on else "CMD_EHT_OFF")
        if wait:
            label = (RUNUP_ON if on else RUNUP_OFF).lower()
            self._wait(f"DP_RUNUPSTATE={label}", self.eht_state, lambda v: v.lower() == label,
                       self.policy.eht_runup_s, "eht")

    def _require_beam(self, operation: str) -> None:
        state = self.eht_state()
        if state.lower() != RUNUP_ON.lower():
            raise BeamOff(f"EHT is not on (DP_RUNUPSTATE {state!r})", device=DEVICE,
                          operation=operation)

    def set_aperture(self, index: int) -> None:
        if not isinstance(index, (int, np.integer)) or index < 0:
            raise LimitViolation("aperture", index, "an aperture index >= 0", device=DEVICE)
        self.api.set("DP_APERTURE", int(index))

    def _need(self, flag: Capability, what: str) -> None:
        if not flag & self.capabilities:
            _unsupported(self, what, flag)

    def high_current(self) -> bool:
        self._need(Capability.HIGH_CURRENT, "high_current")
        return _flag("DP_HIGH_CURRENT", self.api.get("DP_HIGH_CURRENT"))

    def set_high_current(self, on: bool) -> None:
        self._need(Capability.HIGH_CURRENT, "set_high_current")
        self.api.set("DP_HIGH_CURRENT", 1 if on else 0)

    def variable_pressure(self) -> bool:
        self._need(Capability.VARIABLE_PRESSURE, "variable_pressure")
        return "variable" in str(self.api.get("DP_VAC_MODE")).lower()

    def set_variable_pressure(self, on: bool, target_pa: float | None = None) -> None:
        self._need(Capability.VARIABLE_PRESSURE, "set_variable_pressure")
        if target_pa is not None:
            self.api.set("AP_HP_TARGET", _finite("vp_target", target_pa, positive=True))
        self.api.execute("CMD_GOTO_VP" if on else "CMD_GOTO_HV")

    def charge_compensation(self) -> bool:
        self._need(Capability.CHARGE_COMPENSATION, "charge_compensation")
        return _flag("DP_CC_STATUS", self.api.get("DP_CC_STATUS"))

    def set_charge_compensation(self, on: bool, level: float | None = None) -> None:
        self._need(Capability.CHARGE_COMPENSATION, "set_charge_compensation")
        if level is not None:
            self.api.set("AP_CC_PRESSURE", _finite("fcc_level", level, positive=True))
        self.api.execute("CMD_CC_IN" if on else "CMD_CC_OUT")

    # ------------------------------------------------------- freeze and grab
    def _until(self, frozen: bool, timeout_s: float, operation: str) -> None:
        self._wait(f"DP_FROZEN={'Frozen' if frozen else 'Live'}", lambda: self.api.get("DP_FROZEN"),
                   lambda v: _flag("DP_FROZEN", v) == frozen, timeout_s, operation)

    def _frame_bound(self) -> float:
        return self.policy.grab(*self.store_size(), self.dwell_time())

    def freeze(self, timeout_s: float | None = None) -> None:
        """Freeze at the end of the frame being scanned; waits up to a frame's time."""
        self.api.execute("CMD_FREEZE_ALL")
        self._until(True, timeout_s or self._frame_bound(), "freeze")

    def unfreeze(self) -> None:
        self.api.execute("CMD_UNFREEZE_ALL")
        self._until(False, self.policy.margin_s, "unfreeze")

    def _wait_ready(self, operation: str) -> None:
        """No scan before the stage is idle and settled, and the lens has followed
        a focus step: a frame never mixes two positions or two focus values."""
        self._wait("DP_STAGE_IS=Idle", lambda: str(self.api.get("DP_STAGE_IS")).strip(),
                   lambda v: v.lower() != "busy", self.policy.margin_s, operation)
        left = self.api.ready_at - self._clock()
        if left > 0:
            self._sleep(left)

    def _safe_freeze(self) -> None:
        with contextlib.suppress(DeviceError):       # keep the original error
            self.api.execute("CMD_FREEZE_ALL")

    def acquire_frame(self) -> Frame:
        self._require_beam("acquire_frame")
        store, dwell = self.store_size(), self.dwell_time()
        want = self._requested if _requested_fits(self._requested, store, self.store_table) \
            else store
        budget = self.policy.grab(*store, dwell)
        self._wait_ready("acquire_frame")
        started, t0 = datetime.now(timezone.utc).isoformat(), self._clock()
        try:
            self.api.set("DP_FREEZE_ON", 0)              # 0 = freeze at end of frame
            # Live first (a fresh frame starts), else the stale frozen frame ends the
            # poll at once; then freeze at the end of that frame: one frame of dose.
            self.unfreeze()
            self.api.execute("CMD_FREEZE_ALL")
            self._sleep(scan_time_s(*store, dwell, self.policy.line_flyback_s))
            self._until(True, budget, "acquire_frame")
            t_frozen = self._clock()
            image = self._grab(*store)
            metadata = self._frame_metadata(store, want, dwell)     # read while frozen
        except BaseException:
            self._safe_freeze()
            raise
        if want != store:
            x0, y0 = centre_crop(store, want)
            image = image[y0:y0 + want[1], x0:x0 + want[0]]
            metadata.update(cropped_from_store=True, crop_offset=(x0, y0))
        # stays frozen: the beam waits on a frozen frame until the next grab
        metadata.update(started_utc=started, t_start=t0, timestamp=t0, t_frozen=t_frozen,
                        t_end=self._clock(), timeout_s=budget,
                        finished_utc=datetime.now(timezone.utc).isoformat())
        return Frame(image=np.ascontiguousarray(image), metadata=metadata)

    def _frame_metadata(self, store, want, dwell) -> dict:
        """SmartSEM's names (working_distance, eht ...) and the simulator's SI
        keys the engine and writers read (wd_m, eht_v, stage, electrons_per_nm2)."""
        wd, stig, raw = self.working_distance(), self.stig(), self.raw_pixel_size()
        px = raw * self.pixel_size_scale                      # calibrated: what the frame shows
        eht, current, rot = self.eht(), self.probe_current(), self.scan_rotation()
        x, y, z, t, r, _m = self.api.stage_position()
        return {"source": DEVICE, "frame_size": want, "store_size": store, "dwell_time": dwell,
                "working_distance": wd, "stig": stig, "pixel_size": px,
                "magnification": self.magnification(), "eht": eht, "probe_current": current,
                "scan_rotation": rot, "pixel_size_m": px, "smartsem_pixel_size_m": raw,
                "pixel_size_scale": self.pixel_size_scale, "dwell_s": dwell, "wd_m": wd,
                "eht_v": eht, "probe_current_a": current, "scan_rotation_rad": rot,
                "scan_time_s": scan_time_s(*store, dwell, self.policy.line_flyback_s),
                "blanked": self.blanked(),
                "stage": {"x": x, "y": y, "z": z, "r": math.radians(r), "t": math.radians(t)},
                "electrons_per_nm2": current * dwell / E_CHARGE / (px * 1e9) ** 2}

    def _grab(self, w: int, h: int) -> np.ndarray:
        # SmartSEM's host writes this path: remoting needs a share seen by both.
        path = os.path.join(self.image_dir or tempfile.gettempdir(),
                            f"smartsem_grab_{uuid.uuid4().hex}.tif")
        try:
            self.api.grab(*self.grab_region, self.grab_reduction, path)
            try:
                image = np.asarray(tifffile.imread(path))
            except (OSError, ValueError) as e:
                raise AcquisitionFailed(f"cannot read grabbed TIFF {path}: {e}", device=DEVICE,
                                        operation="grab") from e
        finally:
            if os.path.exists(path):
                os.remove(path)
        if image.ndim == 3 and image.shape[-1] in (3, 4):
            image = image[..., 0]                         # grey saved as RGB(A)
        if image.dtype != np.uint8 or image.shape != (h, w):
            raise AcquisitionFailed(f"grabbed image is {image.dtype} {image.shape}, expected "
                                    f"uint8 {(h, w)}", device=DEVICE, operation="grab")
        return image

    # ------------------------------------------------- SmartSEM's own routines
    def _run_auto(self, command: str, operation: str) -> None:
        """A SmartSEM routine needs a live scan; frozen again afterwards."""
        self._require_beam(operation)
        self._wait_ready(operation)
        try:
            self.unfreeze()
            self.api.execute(command)
            busy = lambda: str(self.api.get("DP_AUTO_FN_STATUS")).strip().lower() == "busy"  # noqa
            with contextlib.suppress(DeviceTimeout):   # Busy may show late; never seen = done
                self._wait("DP_AUTO_FN_STATUS=Busy", busy, bool, self.autofocus_start_s, operation)
            try:
                self._wait("DP_AUTO_FN_STATUS=Idle", busy, lambda b: not b, self.policy.autofocus_s,
                           operation)
            except DeviceTimeout:
                with contextlib.suppress(DeviceError):
                    self.api.execute("CMD_ABORT_AUTO")
                raise
            self.freeze()
        except BaseException:
            self._safe_freeze()
            raise

    def run_autofocus(self) -> None:
        self._run_auto("CMD_AUTO_FOCUS_FINE", "autofocus")

    def run_autostig(self) -> None:
        self._run_auto("CMD_AUTO_STIG", "autostig")


class ZeissStage(_OnSharedApi, Stage):
    capabilities = Capability.STAGE_ROTATION | Capability.STAGE_TILT
    DEFAULT_TOLERANCE = dict(x=1e-6, y=1e-6, z=1e-6, r=math.radians(0.05), t=math.radians(0.05))

    def __init__(self, api=None, *, timeout_s: float = 5.0, poll_s: float = 0.05,
                 tolerance: dict[str, float] | None = None, backlash_m: float = 0.0,
                 settle_s: float = 1.0, clock=None,
                 sleep: Callable[[float], None] | None = None,
                 speed: dict[str, float] | None = None, policy: TimeoutPolicy | None = None):
        if not (math.isfinite(backlash_m) and backlash_m >= 0):
            raise ValueError(f"backlash_m must be >= 0, got {backlash_m}")
        if not (math.isfinite(settle_s) and settle_s >= 0):
            raise ValueError(f"settle_s must be >= 0, got {settle_s}")
        self._init_common(api, timeout_s, poll_s, clock, sleep)
        self.policy = policy or TimeoutPolicy(margin_s=timeout_s)
        self.speed = {**DEFAULT_STAGE_SPEED, **(speed or {})}
        for a, v in self.speed.items():
            if a not in DEFAULT_STAGE_SPEED or not (math.isfinite(v) and v > 0):
                raise ValueError(f"stage speed {a}={v!r}: allowed axes x, y, z, r, t with speed > 0")
        self.tolerance = {**self.DEFAULT_TOLERANCE, **(tolerance or {})}
        self.backlash_m, self.settle_s = backlash_m, settle_s
        self._m = 0.0             # the API's 6th axis: read and passed back unchanged
        self.last_timeout_s = 0.0

    def identity(self) -> str:
        return "ZEISS SmartSEM stage"

    def position(self) -> StagePosition:
        # GetStagePosition gives x, y, z in metres and t, r in degrees: SBEMimage
        # multiplies x, y, z by 1e6 for µm and uses t, r as degrees; WaferMapper
        # passes AP_STAGE_AT_X ("StageX_Meters") straight to MoveStage.
        x, y, z, t, r, m = self.api.stage_position()
        self._m = m
        return StagePosition(x=x, y=y, z=z, r=math.radians(r), t=math.radians(t))

    def move_timeout(self, start: StagePosition, target: StagePosition) -> float:
        """distance / speed per axis (the slowest bounds) x factor + settle + margin."""
        return self.policy.move(start.as_dict(), target.as_dict(), self.speed, self.settle_s)

    def _wait_idle(self, timeout_s: float) -> None:
        self._wait("DP_STAGE_IS=Idle", lambda: str(self.api.get("DP_STAGE_IS")).strip(),
                   lambda v: v.lower() != "busy", timeout_s, "move")
        # no frame before the stage has settled (ZeissSEM waits for this)
        self.api.ready_at = max(self.api.ready_at, self._clock() + self.settle_s)

    def _send(self, start: StagePosition, p: StagePosition) -> None:
        self.last_timeout_s = self.move_timeout(start, p)
        self.api.move_stage(p.x, p.y, p.z, math.degrees(p.t), math.degrees(p.r), self._m)
        try:
            self._wait_idle(self.last_timeout_s)
        except DeviceTimeout:
            # stop it: a stage still moving would refuse the retry (and go on moving)
            with contextlib.suppress(DeviceError):
                self.stop()
            raise

    def _off_axes(self, target: StagePosition, actual: StagePosition) -> dict[str, float]:
        off = {a: getattr(actual, a) - getattr(target, a) for a in StagePosition.AXES}
        off["r"] = (off["r"] + math.pi) % (2 * math.pi) - math.pi      # rotation wraps
        return {a: d for a, d in off.items() if abs(d) > self.tolerance[a]}

    def move_to(self, target: StagePosition, *, verify: bool = True) -> StagePosition:
        for a, v in target.as_dict().items():
            _finite(f"stage.{a}", v)
        current, b = self.position(), self.backlash_m
        # Approach x, y from the negative side so the last motion takes up the lash
        # the same way each time; no detour when already coming from there, nor
        # when x/y do not change (a z-, r- or t-only step stays single-axis).
        moves_xy = abs(target.x - current.x) > self.tolerance["x"] or abs(target.y - current.y) > self.tolerance["y"]
        if b > 0 and moves_xy and not (current.x <= target.x - b and current.y <= target.y - b):
            via = current.with_(x=target.x - b, y=target.y - b)       # the detour changes x/y only
            self._send(current, via)
            current = via
        self._send(current, target)
        if not verify:
            return self.position()
        # SmartSEM may still say Idle before a move starts: poll up to settle_s
        # (waiting out Busy again) before calling the move failed.
        t_idle = self._clock()
        while off := self._off_axes(target, actual := self.position()):
            if self._clock() - t_idle >= max(self.settle_s, self.poll_s):
                detail = ", ".join(f"{a} off by {d:.3g}" for a, d in off.items())
                raise MoveFailed(f"target {target} not reached: {detail} (actual {actual})",
                                 device=DEVICE, operation="move")
            self._sleep(self.poll_s)
            self._wait_idle(self.last_timeout_s)
        return actual

    def is_moving(self) -> bool:
        return str(self.api.get("DP_STAGE_IS")).strip().lower() == "busy"

    def stop(self) -> None:
        self.api.execute("CMD_STAGE_ABORT")
