"""ZEISS SmartSEM remote API driver (COM control ``CZ.EMApiCtrl.1``): SEM and stage.

Facts relied on (SBEMimage src/sem/SEM_SmartSEM.py, WaferMapper MATLAB scripts,
the ZeissTrial manual, wrappers declaring ZeissErrorCode): calls return a code,
0 = success; win32com returns ``Get(name, 0)`` as (code, value), ``Set`` as
(code, variant), ``GetStagePosition()`` as (code, x, y, z, t, r, m). AP_ values
are SI, not the UI/TIFF display units (see each reader). DP_ values read back as
labels ("Frozen", "Busy", "1024 * 768").
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

from devices.errors import (AcquisitionFailed, CommunicationError, DeviceError, DeviceTimeout,
                            LimitViolation, MoveFailed, NotConnected)
from devices.interfaces import SEM, Capability, Frame, Stage, StagePosition

PROG_ID = "CZ.EMApiCtrl.1"
DEVICE = "zeiss_smartsem"

# ZeissErrorCode values, as declared by several independent API wrappers.
API_ERRORS = dict(enumerate((
    "GET_TRANSLATE_FAIL GET_AP_FAIL GET_DP_FAIL GET_BAD_PARAMETER SET_TRANSLATE_FAIL "
    "SET_STATE_FAIL SET_FLOAT_FAIL SET_FLOAT_LIMIT_LOW SET_FLOAT_LIMIT_HIGH SET_BAD_VALUE "
    "SET_BAD_PARAMETER EXEC_TRANSLATE_FAIL EXEC_CMD_FAIL EXEC_MCF_FAIL EXEC_MCL_FAIL "
    "EXEC_BAD_COMMAND GRAB_FAIL").split(), start=1000)) | {1019: "NOT_INITIALISED",
                                                           1022: "GET_LIMITS_FAIL"}

# Scan rate n -> pixel dwell (s): Merlin/GeminiSEM/Ultra presets of SBEMimage.
DEFAULT_DWELL_TABLE = {n: 50e-9 * 2 ** n for n in range(9)}
# Store resolution (w, h) -> DP_IMAGE_STORE index (SBEMimage presets; Sigma stops at 3).
DEFAULT_STORE_TABLE = {(1024, 768): 0, (512, 384): 1, (2048, 1536): 2, (3072, 2304): 3,
                       (4096, 3072): 4}

_TRUE = {"yes", "on", "1", "1.0", "true", "blanked", "frozen", "enabled"}
_FALSE = {"no", "off", "0", "0.0", "false", "unblanked", "live", "disabled"}


def _comm(message: str, operation: str) -> CommunicationError:
    return CommunicationError(message, device=DEVICE, operation=operation)


class SmartSEMError(CommunicationError):
    """The API answered with a non-zero return code."""
    def __init__(self, what: str, code: int, *, operation: str):
        self.what, self.code = what, code
        super().__init__(f"{what} returned {code} ({API_ERRORS.get(code, 'unknown code')})",
                         device=DEVICE, operation=operation)


def _dispatch_com():
    """Create the COM control; pywin32 is imported here so the module imports on Linux."""
    try:
        import pythoncom
        import win32com.client
    except ImportError as e:
        raise DeviceError(f"the SmartSEM remote API needs Windows, pywin32 and the ZEISS EM API "
                          f"({PROG_ID}) ({e}); elsewhere pass api= (an object with its interface)",
                          device=DEVICE, operation="connect") from e
    try:
        com = win32com.client.Dispatch(PROG_ID)
    except Exception as e:  # pywintypes.com_error: control not registered
        raise _comm(f"cannot create {PROG_ID}: {e}", "connect") from e

    def variant(v):
        # VT_R4 as in SBEMimage; a float also escapes locale parsing of strings.
        return v if isinstance(v, str) else win32com.client.VARIANT(pythoncom.VT_R4, float(v))
    return com, variant


def _flag(name: str, value) -> bool:
    s = str(value).strip().lower()
    if s in _TRUE or s in _FALSE:
        return s in _TRUE
    raise _comm(f"{name}: unexpected state {value!r}", "get")


def _finite(quantity: str, value, positive: bool = False) -> float:
    v = float(value) if isinstance(value, (int, float, np.number)) else math.nan
    if not math.isfinite(v) or (positive and v <= 0):
        raise LimitViolation(quantity, value, "> 0 and finite" if positive else "finite",
                             device=DEVICE)
    return v


class SmartSEMApi:
    """Thin, strict wrapper over the COM control: every non-zero code raises."""
    def __init__(self, com=None, *, to_variant: Callable[[Any], Any] | None = None):
        if com is None:
            com, to_variant = _dispatch_com()
        self._com = com
        self._variant = to_variant or (lambda v: v)
        self._users = 0          # ZeissSEM and ZeissStage share one remoting session

    def _call(self, what: str, operation: str, fn, *, reply_len: int = 0):
        if operation not in ("connect", "close") and not self._users:
            raise NotConnected("SmartSEM API not connected", device=DEVICE, operation=operation)
        try:
            reply = fn()
        except Exception as e:   # COM transport errors (pywintypes.com_error)
            raise _comm(f"{what}: {e}", operation) from e
        if reply_len and (not isinstance(reply, (tuple, list)) or len(reply) < reply_len):
            raise _comm(f"{what}: unexpected reply {reply!r}", operation)
        code = int(reply[0] if isinstance(reply, (tuple, list)) else reply)
        if code != 0:
            raise SmartSEMError(what, code, operation=operation)
        return reply

    def connect(self) -> None:
        if not self._users:
            self._call("InitialiseRemoting", "connect", self._com.InitialiseRemoting)
        self._users += 1

    def close(self) -> None:
        was, self._users = self._users, max(0, self._users - 1)
        if was == 1:             # the last user leaves: end the remoting session
            self._call("ClosingControl", "close", self._com.ClosingControl)

    def get(self, name: str):
        return self._call(f"Get({name})", "get", lambda: self._com.Get(name, 0), reply_len=2)[1]

    def get_float(self, name: str) -> float:
        value = self.get(name)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise _comm(f"Get({name}): not a number: {value!r}", "get") from None

    def set(self, name: str, value) -> None:
        self._call(f"Set({name}={value!r})", "set",
                   lambda: self._com.Set(name, self._variant(value)))

    def execute(self, command: str) -> None:
        self._call(f"Execute({command})", "execute", lambda: self._com.Execute(command))

    def stage_position(self) -> tuple[float, ...]:
        """(x, y, z, t, r, m) in the API's units: metres and degrees."""
        reply = self._call("GetStagePosition", "stage_position", self._com.GetStagePosition,
                           reply_len=7)
        return tuple(float(v) for v in reply[1:7])

    def move_stage(self, x, y, z, t, r, m) -> None:
        self._call("MoveStage", "move_stage", lambda: self._com.MoveStage(x, y, z, t, r, m))

    def grab(self, x: int, y: int, w: int, h: int, reduction: int, filename: str) -> None:
        try:
            self._call("Grab", "grab", lambda: self._com.Grab(x, y, w, h, reduction, filename))
        except SmartSEMError as e:
            raise AcquisitionFailed(str(e), device=DEVICE, operation="grab") from e


def _as_api(api) -> SmartSEMApi:
    return api if isinstance(api, SmartSEMApi) else SmartSEMApi(api)


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


class ZeissSEM(_OnSharedApi, SEM):
    capabilities = (Capability.AUTOFOCUS | Capability.FREEZE | Capability.SCAN_ROTATION
                    | Capability.BEAM_BLANKING)

    def __init__(self, api=None, *, timeout_s: float = 30.0, poll_s: float = 0.05,
                 image_dir: str | None = None, clock: Callable[[], float] | None = None,
                 sleep: Callable[[float], None] | None = None,
                 dwell_table: dict[int, float] | None = None,
                 store_table: dict[tuple[int, int], int] | None = None,
                 grab_region=(0, 0, 1024, 768), grab_reduction: int = 0,
                 autofocus_start_s: float = 2.0, pixel_size_rel_tol: float = 0.01):
        self._init_common(api, timeout_s, poll_s, clock, sleep)
        self.image_dir, self.autofocus_start_s = image_dir, autofocus_start_s
        self.dwell_table = dict(dwell_table or DEFAULT_DWELL_TABLE)
        self.store_table = dict(store_table or DEFAULT_STORE_TABLE)
        # Grab's region is in the 1024x768 display frame; reduction 0 writes the
        # full store resolution (how SBEMimage grabs its 4096x3072 tiles).
        self.grab_region, self.grab_reduction = grab_region, grab_reduction
        self.pixel_size_rel_tol = pixel_size_rel_tol

    def identity(self) -> str:
        return f"ZEISS SmartSEM {self.api.get('SV_VERSION')}".strip()

    # The API speaks SI here, hence scale 1, though the UI and the TIFF header show
    # mm/nm/kV/pA: WaferMapper sets AP_WD 0.009 for 9 mm and divides stage metres
    # by AP_PIXEL_SIZE (ZeissTrial: "pixel size in m"); SBEMimage sets AP_MANUALKV
    # to kV*1000 and AP_IPROBE to pA*1e-12.
    eht = _reader("AP_ACTUALKV")                                  # V, measured
    set_eht = _writer("AP_MANUALKV", "eht")                       # V, target
    probe_current = _reader("AP_IPROBE")                          # A
    set_probe_current = _writer("AP_IPROBE", "probe_current")
    working_distance = _reader("AP_WD")                           # m
    set_working_distance = _writer("AP_WD", "working_distance")
    pixel_size = _reader("AP_PIXEL_SIZE")                         # m, read-only: set via mag
    magnification = _reader("AP_MAG")

    def stig(self) -> tuple[float, float]:
        return self.api.get_float("AP_STIG_X"), self.api.get_float("AP_STIG_Y")   # %

    def set_stig(self, x: float, y: float) -> None:
        x, y = _finite("stig_x", x), _finite("stig_y", y)
        self.api.set("AP_STIG_X", x)
        self.api.set("AP_STIG_Y", y)

    def set_pixel_size(self, metres: float) -> None:
        """Via AP_MAG (pixel size ∝ 1/mag); AP_PIXEL_SIZE itself is read-only."""
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

    def frame_size(self) -> tuple[int, int]:
        value = self.api.get("DP_IMAGE_STORE")
        m = re.fullmatch(r"\s*(\d+)\s*\*\s*(\d+)\s*", str(value))
        if not m:
            raise _comm(f"DP_IMAGE_STORE: unexpected value {value!r}", "get")
        return int(m.group(1)), int(m.group(2))

    def set_frame_size(self, width: int, height: int) -> None:
        index = self.store_table.get((width, height))
        if index is None:
            raise LimitViolation("frame_size", (width, height),
                                 ", ".join(f"{w}x{h}" for w, h in self.store_table), device=DEVICE)
        self.api.set("DP_IMAGE_STORE", index)   # SmartSEM unfreezes on this change

    def scan_rotation(self) -> float:
        if not _flag("DP_SCAN_ROT", self.api.get("DP_SCAN_ROT")):
            return 0.0                               # disabled: the angle is not applied
        return math.radians(self.api.get_float("AP_SCANROTATION"))

    def set_scan_rotation(self, radians: float) -> None:
        degrees = math.degrees(_finite("scan_rotation", radians)) % 360.0
        self.api.set("DP_SCAN_ROT", 1 if degrees else 0)
        self.api.set("AP_SCANROTATION", degrees)

    # CMD_BEAM_ON / CMD_EHT_OFF switch the gun (EHT), not the blanker.
    def blanked(self) -> bool:
        return _flag("DP_BEAM_BLANKING", self.api.get("DP_BEAM_BLANKING"))

    def set_blanked(self, blanked: bool) -> None:
        self.api.set("DP_BEAM_BLANKING", 1 if blanked else 0)

    def _until(self, frozen: bool, timeout_s: float, operation: str) -> None:
        self._wait(f"DP_FROZEN={'Frozen' if frozen else 'Live'}", lambda: self.api.get("DP_FROZEN"),
                   lambda v: _flag("DP_FROZEN", v) == frozen, timeout_s, operation)

    def freeze(self, timeout_s: float | None = None) -> None:
        self.api.execute("CMD_FREEZE_ALL")
        self._until(True, timeout_s or self.timeout_s, "freeze")

    def unfreeze(self) -> None:
        self.api.execute("CMD_UNFREEZE_ALL")
        self._until(False, self.timeout_s, "unfreeze")

    def acquire_frame(self) -> Frame:
        (w, h), dwell = self.frame_size(), self.dwell_time()
        budget = self.timeout_s + 2.0 * w * h * dwell   # a whole frame must fit in the wait
        started, t0 = datetime.now(timezone.utc).isoformat(), self._clock()
        try:
            self.api.set("DP_FREEZE_ON", 0)              # 0 = freeze at end of frame
            # See it live first, else the stale frozen frame ends the poll at once.
            self.unfreeze()
            self.freeze(budget)
            t_frozen = self._clock()
            image = self._grab(w, h)
            metadata = {"source": DEVICE, "frame_size": (w, h), "dwell_time": dwell,  # frozen
                        "working_distance": self.working_distance(), "stig": self.stig(),
                        "pixel_size": self.pixel_size(), "magnification": self.magnification(),
                        "eht": self.eht(), "probe_current": self.probe_current(),
                        "scan_rotation": self.scan_rotation()}
        except BaseException:
            with contextlib.suppress(DeviceError):       # keep the original error
                self.api.execute("CMD_UNFREEZE_ALL")
            raise
        self.unfreeze()
        metadata.update(started_utc=started, t_start=t0, t_frozen=t_frozen, t_end=self._clock(),
                        finished_utc=datetime.now(timezone.utc).isoformat())
        return Frame(image=image, metadata=metadata)

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

    def run_autofocus(self) -> None:
        self.unfreeze()                                   # the routine needs a live scan
        self.api.execute("CMD_AUTO_FOCUS_FINE")
        busy = lambda: str(self.api.get("DP_AUTO_FN_STATUS")).strip().lower() == "busy"  # noqa
        with contextlib.suppress(DeviceTimeout):   # Busy may show late; never seen = done
            self._wait("DP_AUTO_FN_STATUS=Busy", busy, bool, self.autofocus_start_s, "autofocus")
        try:
            self._wait("DP_AUTO_FN_STATUS=Idle", busy, lambda b: not b, self.timeout_s,
                       "autofocus")
        except DeviceTimeout:
            with contextlib.suppress(DeviceError):
                self.api.execute("CMD_ABORT_AUTO")
            raise


class ZeissStage(_OnSharedApi, Stage):
    capabilities = Capability.STAGE_ROTATION | Capability.STAGE_TILT
    DEFAULT_TOLERANCE = dict(x=1e-6, y=1e-6, z=1e-6, r=math.radians(0.05), t=math.radians(0.05))

    def __init__(self, api=None, *, timeout_s: float = 60.0, poll_s: float = 0.05,
                 tolerance: dict[str, float] | None = None, backlash_m: float = 0.0,
                 settle_s: float = 1.0, clock: Callable[[], float] | None = None,
                 sleep: Callable[[float], None] | None = None):
        if not (math.isfinite(backlash_m) and backlash_m >= 0):
            raise ValueError(f"backlash_m must be >= 0, got {backlash_m}")
        self._init_common(api, timeout_s, poll_s, clock, sleep)
        self.tolerance = {**self.DEFAULT_TOLERANCE, **(tolerance or {})}
        self.backlash_m, self.settle_s = backlash_m, settle_s
        self._m = 0.0             # the API's 6th axis: read and passed back unchanged

    def identity(self) -> str:
        return "ZEISS SmartSEM stage"

    def position(self) -> StagePosition:
        # GetStagePosition gives x, y, z in metres and t, r in degrees: SBEMimage
        # multiplies x, y, z by 1e6 for µm and uses t, r as degrees; WaferMapper
        # passes AP_STAGE_AT_X ("StageX_Meters") straight to MoveStage.
        x, y, z, t, r, m = self.api.stage_position()
        self._m = m
        return StagePosition(x=x, y=y, z=z, r=math.radians(r), t=math.radians(t))

    def _wait_idle(self) -> None:
        self._wait("DP_STAGE_IS=Idle", lambda: str(self.api.get("DP_STAGE_IS")).strip(),
                   lambda v: v.lower() != "busy", self.timeout_s, "move")

    def _send(self, p: StagePosition) -> None:
        self.api.move_stage(p.x, p.y, p.z, math.degrees(p.t), math.degrees(p.r), self._m)
        self._wait_idle()

    def _off_axes(self, target: StagePosition, actual: StagePosition) -> dict[str, float]:
        off = {a: getattr(actual, a) - getattr(target, a) for a in StagePosition.AXES}
        off["r"] = (off["r"] + math.pi) % (2 * math.pi) - math.pi      # rotation wraps
        return {a: d for a, d in off.items() if abs(d) > self.tolerance[a]}

    def move_to(self, target: StagePosition, *, verify: bool = True) -> StagePosition:
        for a, v in target.as_dict().items():
            _finite(f"stage.{a}", v)
        current, b = self.position(), self.backlash_m
        # Approach x, y from the negative side so the last motion takes up the lash
        # the same way each time; no detour when already coming from there.
        if b > 0 and not (current.x <= target.x - b and current.y <= target.y - b):
            self._send(target.with_(x=target.x - b, y=target.y - b))
        self._send(target)
        if not verify:
            return self.position()
        # SmartSEM may still say Idle before a move starts: poll up to settle_s
        # (waiting out Busy again) before calling the move failed.
        t_idle = self._clock()
        while off := self._off_axes(target, actual := self.position()):
            if self._clock() - t_idle >= self.settle_s:
                detail = ", ".join(f"{a} off by {d:.3g}" for a, d in off.items())
                raise MoveFailed(f"target {target} not reached: {detail} (actual {actual})",
                                 device=DEVICE, operation="move")
            self._sleep(self.poll_s)
            self._wait_idle()
        return actual

    def stop(self) -> None:
        self.api.execute("CMD_STAGE_ABORT")
