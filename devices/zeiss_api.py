"""The strict wrapper over SmartSEM's COM control ``CZ.EMApiCtrl.1``: every
non-zero return code raises SmartSEMError (a CommunicationError that carries the
code), so no caller can read a failed Get's payload as a value.

Facts relied on (SBEMimage src/sem/SEM_SmartSEM.py, WaferMapper MATLAB scripts,
the ZeissTrial manual, wrappers declaring ZeissErrorCode): calls return a code,
0 = success; win32com returns ``Get(name, 0)`` as (code, value), ``Set`` as
(code, variant), ``GetStagePosition()`` as (code, x, y, z, t, r, m). DP_ values
read back as labels ("Frozen", "Busy", "1024 * 768").
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from devices.errors import AcquisitionFailed, CommunicationError, DeviceError, LimitViolation, NotConnected
from devices.zeiss_tables import API_ERRORS

PROG_ID = "CZ.EMApiCtrl.1"
DEVICE = "zeiss_smartsem"

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
                          f"({PROG_ID}) ({e}); elsewhere pass api= (an object with its interface), or set "
                          "options.api: sim in the setup for the simulated SmartSEM",
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
        # Clock time before which no frame may start: the stage's settle after
        # its last move, the lens's after a focus step (set by both drivers).
        self.ready_at = -math.inf

    def _call(self, what: str, operation: str, fn, *, reply_len: int = 0):
        if operation not in ("connect", "close") and not self._users:
            raise NotConnected("SmartSEM API not connected", device=DEVICE, operation=operation)
        try:
            reply = fn()
        except Exception as e:   # COM transport errors (pywintypes.com_error)
            raise _comm(f"{what}: {e}", operation) from e
        if reply_len and (not isinstance(reply, (tuple, list)) or len(reply) < reply_len):
            raise _comm(f"{what}: unexpected reply {reply!r}", operation)
        try:
            code = int(reply[0] if isinstance(reply, (tuple, list)) else reply)
        except (TypeError, ValueError):
            raise _comm(f"{what}: no return code in {reply!r}", operation) from None
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
