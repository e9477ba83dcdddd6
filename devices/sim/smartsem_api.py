"""A fake ``CZ.EMApiCtrl.1``: SmartSEM's remote API as win32com shows it, with
time and state, so the ZEISS driver (devices/zeiss_smartsem.py) runs on any
machine and its waits are tested against what the microscope takes.

Modelled on an injectable clock (devices.clock.Clock: ``now()``/``sleep()``):
- scanning: one frame takes w·h·dwell + h·flyback for the store and scan rate;
  CMD_UNFREEZE_ALL starts a fresh frame; CMD_FREEZE_ALL freezes at the end of
  the frame being scanned (DP_FREEZE_ON 0) or at once (2, "on command"); a store
  or scan-rate change unfreezes, as SmartSEM does. ``live_s()`` counts every
  second the gun was on while the scan ran live: the dose nobody asked for.
- the stage: a move takes the slowest axis' distance / speed; DP_STAGE_IS is
  "Busy" until then, GetStagePosition interpolates, a move while busy fails.
- the gun: CMD_BEAM_ON runs up for ``runup_s`` (DP_RUNUPSTATE "Run Up", then
  "Beam On"; AP_ACTUALKV ramps); CMD_EHT_OFF gives "EHT Off" and 0 V.
- SmartSEM's autofocus / autostig: Busy for ``autofocus_s`` on a live scan,
  then the world's best focus / stigmation.
- an uncalibrated magnification: ``mag_error`` = rendered (true) pixel size /
  AP_PIXEL_SIZE, which devices.calibration measures and the driver's
  pixel_size_scale undoes.
- return codes: unknown names, bad values, values beyond limits, calls before
  InitialiseRemoting, busy states; ``fail`` forces a code per name.
With a SimWorld, Grab writes a frame rendered from its specimen at the stage
position, focus and stigmation the frame was scanned with, and the stage moves
the world's stage.
"""
from __future__ import annotations

import math
import os

import numpy as np
import tifffile

from devices.clock import SimClock
from devices.interfaces import StagePosition
from devices.zeiss_tables import (CODE, DEFAULT_DWELL_TABLE, DEFAULT_LINE_FLYBACK_S,
                                  DEFAULT_STAGE_SPEED, MERLIN_STORES, RUNUP_OFF, RUNUP_ON,
                                  scan_time_s)

K_MAG = 0.1142784           # m: pixel size = K / (mag × store width) (1024 px at mag 1 ≈ 0.11 mm)
RUNUP = "Run Up"            # the intermediate label (SmartSEM's own wording not on record)
APERTURES_M = (30e-6, 7.5e-6, 10e-6, 15e-6, 20e-6, 60e-6, 120e-6)
# AP_ limits (SI, as the API speaks): beyond them Set answers LIMIT_LOW / LIMIT_HIGH
AP_LIMITS = {"AP_WD": (1e-4, 0.05), "AP_MAG": (12.0, 2e6), "AP_MANUALKV": (20.0, 30e3),
             "AP_IPROBE": (1e-12, 4e-8), "AP_STIG_X": (-100.0, 100.0),
             "AP_STIG_Y": (-100.0, 100.0), "AP_SCANROTATION": (0.0, 360.0),
             "AP_HP_TARGET": (1.0, 133.0), "AP_CC_PRESSURE": (0.0, 100.0)}
STAGE_LIMITS = ((-0.15, 0.15), (-0.15, 0.15), (-0.05, 0.05), (-10.0, 70.0), (-720.0, 720.0))
# axes in the API's order x, y, z (m), t, r (deg); speeds in m/s and deg/s
_SPEED = (DEFAULT_STAGE_SPEED["x"], DEFAULT_STAGE_SPEED["y"], DEFAULT_STAGE_SPEED["z"],
          math.degrees(DEFAULT_STAGE_SPEED["t"]), math.degrees(DEFAULT_STAGE_SPEED["r"]))



def _limit_code(v: float, limits) -> int:
    """SmartSEM's answer to a value against its (low, high) limits: 0 if inside."""
    lo, hi = limits
    if not math.isfinite(v):
        return CODE["SET_FLOAT_FAIL"]
    if v < lo:
        return CODE["SET_FLOAT_LIMIT_LOW"]
    return CODE["SET_FLOAT_LIMIT_HIGH"] if v > hi else 0

class SimEMApi:
    def __init__(self, clock=None, world=None, *, stores=MERLIN_STORES,
                 dwell_table=DEFAULT_DWELL_TABLE, line_flyback_s=DEFAULT_LINE_FLYBACK_S,
                 stage_speed=_SPEED, runup_s: float = 30.0, autofocus_s: float = 8.0,
                 eht_on: bool = True, vp_fitted: bool = True, fcc_fitted: bool = True,
                 high_current_fitted: bool = True, seed: int = 0, mag_error: float = 1.0):
        self.clock = clock or (world.clock if world is not None else SimClock(0.0, start=0.0))
        self.world = world
        self.stores, self.dwell_table, self.flyback = tuple(stores), dict(dwell_table), line_flyback_s
        self.stage_speed, self.runup_s, self.autofocus_s = tuple(stage_speed), runup_s, autofocus_s
        self.fitted = {"DP_VP_SYSTEM": vp_fitted, "DP_CAPCC_FITTED": fcc_fitted,
                       "DP_HIGH_CURRENT": high_current_fitted}
        if not (math.isfinite(mag_error) and 0.5 <= mag_error <= 2.0):
            raise ValueError(f"mag_error = {mag_error!r}: allowed 0.5..2")
        # an uncalibrated column: frames are rendered at AP_PIXEL_SIZE x mag_error
        self.mag_error = float(mag_error)
        self.initialised = False
        self.fail: dict[str, int] = {}          # name/command/method -> forced return code
        self._rng = np.random.default_rng(seed)
        self.ap = {"AP_WD": 5e-3, "AP_STIG_X": 0.0, "AP_STIG_Y": 0.0, "AP_MAG": 1000.0,
                   "AP_MANUALKV": 1500.0, "AP_IPROBE": 1.5e-9, "AP_SCANROTATION": 0.0,
                   "AP_HP_TARGET": 30.0, "AP_CC_PRESSURE": 50.0}
        self.dp = {"DP_SCAN_ROT": 0, "DP_SCANRATE": 4, "DP_IMAGE_STORE": 0, "DP_BEAM_BLANKING": 0,
                   "DP_FREEZE_ON": 0, "DP_APERTURE": 0, "DP_HIGH_CURRENT": 0, "DP_VAC_MODE": 0,
                   "DP_CC_STATUS": 0}
        # scanning: live since (None = frozen), when a pending freeze completes
        self._live_since: float | None = None
        self._freeze_at: float | None = None
        self._live_acc = 0.0
        self.frames: list[tuple[float, float]] = []     # (start, end) of each frozen frame
        self._snapshot: dict | None = None               # what the frozen frame shows
        # stage: (t0, start, t1, target) of the last move; x, y, z (m), t, r (deg), m
        self._pos = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
        self._move: tuple[float, list, float, list] | None = None
        self.moves: list[tuple[float, float]] = []
        # gun and SmartSEM's routines
        self._eht = RUNUP_ON if eht_on else RUNUP_OFF
        self._runup_end = 0.0
        self._auto: tuple[str, float] | None = None      # (Focus | Stig, end time)
        self.grabs_while_live = 0
        if world is not None:
            p = world.stage_actual
            self._pos = [p.x, p.y, p.z, math.degrees(p.t), math.degrees(p.r), 0.0]

    # ----------------------------------------------------------- time model
    def now(self) -> float:
        return self.clock.now()

    def frame_time(self) -> float:
        w, h = self.stores[self.dp["DP_IMAGE_STORE"]]
        return scan_time_s(w, h, self.dwell_table[self.dp["DP_SCANRATE"]], self.flyback)

    def _beam_on_at(self, t: float) -> bool:
        return self._eht == RUNUP_ON or (self._eht == RUNUP and t >= self._runup_end)

    def _update(self) -> None:
        now = self.now()
        if self._move is None and self.world is not None:
            p = self.world.stage_actual          # another stage driver may move the world
            self._pos[:5] = [p.x, p.y, p.z, math.degrees(p.t), math.degrees(p.r)]
        if self._eht == RUNUP and now >= self._runup_end:
            self._eht = RUNUP_ON
        if self._move is not None and now >= self._move[2]:
            self._pos[:5] = list(self._move[3])
            self._move = None
            self._to_world()
        if self._live_since is not None and self._freeze_at is not None and now >= self._freeze_at:
            self.frames.append((self._freeze_at - self.frame_time(), self._freeze_at))
            self._snapshot = self._state_at(self._freeze_at)
            self._stop_live(self._freeze_at)
        if self._auto is not None and now >= self._auto[1]:
            self._finish_auto(self._auto[0])
            self._auto = None

    def _stop_live(self, t: float) -> None:
        if self._live_since is not None and self._beam_on_at(t):
            self._live_acc += t - self._live_since
        self._live_since, self._freeze_at = None, None

    def _go_live(self, t: float) -> None:
        """A fresh frame from ``t`` (unfreeze, or a store / rate change while live)."""
        self._stop_live(t)
        self._live_since = t

    def live_s(self) -> float:
        """Seconds the scan ran live with the gun on, so far."""
        self._update()
        now = self.now()
        running = now - self._live_since if self._live_since is not None and self._beam_on_at(now) else 0.0
        return self._live_acc + running

    def frozen(self) -> bool:
        self._update()
        return self._live_since is None

    def frames_during_motion(self) -> list[tuple[float, float]]:
        """Frames whose scan overlapped a stage move (should be none)."""
        return [f for f in self.frames if any(f[0] < m1 and m0 < f[1] for m0, m1 in self.moves)]

    # ---------------------------------------------------------------- stage
    def _pos_at(self, t: float) -> list[float]:
        if self._move is None:
            return list(self._pos[:5])
        t0, start, t1, target = self._move
        f = 1.0 if t >= t1 else max(0.0, (t - t0) / (t1 - t0))
        return [a + (b - a) * f for a, b in zip(start, target)]

    def _to_world(self) -> None:
        if self.world is not None:
            x, y, z, t, r = self._pos[:5]
            with self.world.lock:
                self.world.stage_actual = StagePosition(x=x, y=y, z=z, r=math.radians(r),
                                                        t=math.radians(t))

    # --------------------------------------------------------- world mirror
    def _ap(self, name: str) -> float:
        w = self.world
        if w is not None:
            if name == "AP_WD":
                return w.sem.wd_m
            if name in ("AP_STIG_X", "AP_STIG_Y"):
                return w.sem.stig[name == "AP_STIG_Y"]
            if name == "AP_IPROBE":
                return w.sem.probe_current_a
            if name == "AP_MANUALKV":
                return w.sem.eht_v
        return self.ap[name]

    def _set_ap(self, name: str, v: float) -> None:
        self.ap[name] = v
        w = self.world
        if w is None:
            return
        if name == "AP_WD":
            w.sem.wd_m = v
        elif name in ("AP_STIG_X", "AP_STIG_Y"):
            sx, sy = w.sem.stig
            w.sem.stig = (v, sy) if name == "AP_STIG_X" else (sx, v)
        elif name == "AP_IPROBE":
            w.sem.probe_current_a = v
        elif name == "AP_MANUALKV":
            w.sem.eht_v = v

    def _blanked(self) -> bool:
        return self.world.sem.blanked if self.world is not None else bool(self.dp["DP_BEAM_BLANKING"])

    def _pixel(self) -> float:
        return K_MAG / (self.ap["AP_MAG"] * self.stores[self.dp["DP_IMAGE_STORE"]][0])

    def _state_at(self, t: float) -> dict:
        return {"pos": self._pos_at(t), "wd": self._ap("AP_WD"),
                "stig": (self._ap("AP_STIG_X"), self._ap("AP_STIG_Y")),
                "current": self._ap("AP_IPROBE"), "pixel": self._pixel() * self.mag_error,
                "store": self.stores[self.dp["DP_IMAGE_STORE"]],
                "dwell": self.dwell_table[self.dp["DP_SCANRATE"]],
                "rotation": math.radians(self.ap["AP_SCANROTATION"]) if self.dp["DP_SCAN_ROT"] else 0.0,
                "beam": self._beam_on_at(t) and not self._blanked()}

    # ------------------------------------------------------------ COM calls
    def _code(self, key: str) -> int:
        if not self.initialised:
            return CODE["NOT_INITIALISED"]
        return self.fail.get(key, 0)

    def InitialiseRemoting(self):
        if self.fail.get("InitialiseRemoting"):
            return self.fail["InitialiseRemoting"]
        self.initialised = True
        return 0

    def ClosingControl(self):
        self.initialised = False
        return 0

    def Get(self, name, _flag=0):
        # A failed Get still carries a plausible number: a driver that ignored
        # the code would read it as a value (tests catch exactly that).
        if code := self._code(name):
            return code, 0.0
        self._update()
        value = self._get(str(name))
        if value is None:
            return CODE["GET_BAD_PARAMETER"], 0.0
        return 0, value

    def _get(self, name: str):
        dp = self.dp
        if name in self.fitted and not self.fitted[name]:
            return None
        if name == "DP_FROZEN":
            return "Live" if self._live_since is not None else "Frozen"
        if name == "DP_STAGE_IS":
            return "Busy" if self._move is not None else "Idle"
        if name == "DP_RUNUPSTATE":
            return self._eht
        if name == "DP_AUTO_FN_STATUS":
            return "Busy" if self._auto else "Idle"
        if name == "DP_AUTO_FUNCTION":
            return self._auto[0] if self._auto else "None"
        if name == "DP_IMAGE_STORE":
            return "%d * %d" % self.stores[dp[name]]
        if name == "DP_SCANRATE":
            return str(dp[name])
        if name == "DP_FREEZE_ON":
            return {0: "End Frame", 1: "End Line", 2: "Command"}[dp[name]]
        if name in ("DP_SCAN_ROT", "DP_HIGH_CURRENT", "DP_CC_STATUS"):
            return "On" if dp[name] else "Off"
        if name == "DP_BEAM_BLANKING":
            return "Yes" if self._blanked() else "No"
        if name == "DP_VAC_MODE":
            return "Variable Pressure" if dp[name] else "High vacuum"
        if name in ("DP_VP_SYSTEM", "DP_CAPCC_FITTED"):
            return "Yes"
        if name == "DP_APERTURE":
            return str(dp[name])
        if name == "AP_APERTURESIZE":
            return APERTURES_M[dp["DP_APERTURE"]]
        if name == "AP_PIXEL_SIZE":
            return self._pixel()
        if name == "AP_ACTUALKV":
            if self._eht == RUNUP_ON:
                return self._ap("AP_MANUALKV")
            if self._eht == RUNUP:
                left = max(0.0, self._runup_end - self.now())
                return self._ap("AP_MANUALKV") * (1.0 - left / self.runup_s)
            return 0.0
        if name == "AP_CHAMBER_PRESSURE":
            return self.ap["AP_HP_TARGET"] if dp["DP_VAC_MODE"] else 1e-4
        if name == "SV_VERSION":
            return "V06.03 (simulated)"
        if name in self.ap:
            return self._ap(name)
        return None

    def Set(self, name, value):
        if code := self._code(name):
            return code, value
        self._update()
        return self._set(str(name), value), value

    def _set(self, name: str, value) -> int:
        if name in AP_LIMITS:
            try:
                v = float(value)
            except (TypeError, ValueError):
                return CODE["SET_FLOAT_FAIL"]
            if code := _limit_code(v, AP_LIMITS[name]):
                return code
            self._set_ap(name, v)
            return 0
        allowed = {"DP_IMAGE_STORE": range(len(self.stores)), "DP_SCAN_ROT": (0, 1),
                   "DP_BEAM_BLANKING": (0, 1), "DP_FREEZE_ON": (0, 1, 2),
                   "DP_APERTURE": range(len(APERTURES_M)), "DP_HIGH_CURRENT": (0, 1)}
        if name not in allowed or (name == "DP_HIGH_CURRENT" and not self.fitted[name]):
            return CODE["SET_BAD_PARAMETER"]
        try:
            v = int(float(value))
        except (TypeError, ValueError):
            return CODE["SET_BAD_VALUE"]
        if v not in allowed[name] or v != float(value):
            return CODE["SET_BAD_VALUE"]
        self.dp[name] = v
        if name == "DP_BEAM_BLANKING" and self.world is not None:
            self.world.sem.blanked = bool(v)
        if name == "DP_IMAGE_STORE":
            self._go_live(self.now())          # SmartSEM unfreezes on a store change
        return 0

    def Execute(self, cmd):
        cmd = str(cmd)
        if code := self._code(cmd):
            return code
        self._update()
        now = self.now()
        if cmd == "CMD_UNFREEZE_ALL":
            if self._live_since is None:
                self._go_live(now)
            self._freeze_at = None
        elif cmd == "CMD_FREEZE_ALL":
            if self._live_since is not None:
                if self.dp["DP_FREEZE_ON"] == 2:        # on command: at once, frame unfinished
                    self._snapshot = self._state_at(now)
                    self._stop_live(now)
                elif self._freeze_at is None:           # at the end of the frame being scanned
                    period = self.frame_time()
                    self._freeze_at = self._live_since + (math.floor((now - self._live_since)
                                                                     / period) + 1) * period
        elif cmd.startswith("CMD_SCANRATE"):
            try:
                rate = int(cmd[len("CMD_SCANRATE"):])
            except ValueError:
                return CODE["EXEC_BAD_COMMAND"]
            if rate not in self.dwell_table:
                return CODE["EXEC_BAD_COMMAND"]
            self.dp["DP_SCANRATE"] = rate
            if self._live_since is not None:
                self._go_live(now)
        elif cmd == "CMD_BEAM_ON":
            if self._eht == RUNUP_OFF:
                self._eht, self._runup_end = RUNUP, now + self.runup_s
        elif cmd == "CMD_EHT_OFF":
            if self._live_since is not None:
                self._live_acc += now - self._live_since if self._beam_on_at(now) else 0.0
                self._live_since = now
            self._eht = RUNUP_OFF
        elif cmd in ("CMD_AUTO_FOCUS_FINE", "CMD_AUTO_STIG", "CMD_FOCUS_STIG"):
            if self._live_since is None or self._eht != RUNUP_ON or self._auto or self._move:
                return CODE["EXEC_CMD_FAIL"]            # needs a live image of a still sample
            kind = {"CMD_AUTO_FOCUS_FINE": "Focus", "CMD_AUTO_STIG": "Stig"}.get(cmd, "Focus Stig")
            self._auto = (kind, now + self.autofocus_s)
        elif cmd == "CMD_ABORT_AUTO":
            self._auto = None
        elif cmd == "CMD_STAGE_ABORT":
            if self._move is not None:
                self._pos[:5] = self._pos_at(now)
                self.moves[-1] = (self.moves[-1][0], now)
                self._move = None
                self._to_world()
        elif cmd in ("CMD_GOTO_VP", "CMD_GOTO_HV"):
            if not self.fitted["DP_VP_SYSTEM"]:
                return CODE["EXEC_CMD_FAIL"]
            self.dp["DP_VAC_MODE"] = int(cmd == "CMD_GOTO_VP")
        elif cmd in ("CMD_CC_IN", "CMD_CC_OUT"):
            if not self.fitted["DP_CAPCC_FITTED"]:
                return CODE["EXEC_CMD_FAIL"]
            self.dp["DP_CC_STATUS"] = int(cmd == "CMD_CC_IN")
        else:
            return CODE["EXEC_BAD_COMMAND"]
        return 0

    def _finish_auto(self, kind: str) -> None:
        w = self.world
        if w is None:
            return
        wd0, sx0, sy0 = w.focus_baseline(w.stage_actual.x, w.stage_actual.y)
        if "Focus" in kind:
            w.sem.wd_m = wd0 + float(self._rng.normal(0.0, 0.3e-6))
        if "Stig" in kind:
            w.sem.stig = (sx0, sy0)

    def GetStagePosition(self):
        if code := self._code("GetStagePosition"):
            return (code, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        self._update()
        return (0, *self._pos_at(self.now()), self._pos[5])

    def MoveStage(self, x, y, z, t, r, m=0.0):
        if code := self._code("MoveStage"):
            return code
        self._update()
        if self._move is not None:
            return CODE["EXEC_CMD_FAIL"]                # busy: SmartSEM refuses a second move
        target = [float(v) for v in (x, y, z, t, r)]
        for v, limits in zip(target, STAGE_LIMITS):
            if code := _limit_code(v, limits):
                return code
        now, start = self.now(), list(self._pos[:5])
        dt = max(abs(b - a) / s for a, b, s in zip(start, target, self.stage_speed))
        self._pos[5] = float(m)
        if dt > 0:
            self._move = (now, start, now + dt, target)
            self.moves.append((now, now + dt))
        return 0

    def Grab(self, x, y, w, h, reduction, filename):
        if code := self._code("Grab"):
            return code
        self._update()
        if reduction != 0 or not (0 <= x < x + w <= 1024 and 0 <= y < y + h <= 768):
            return CODE["GRAB_FAIL"]
        if self._live_since is not None:
            self.grabs_while_live += 1                  # a half-new frame on a real one
        snap = self._snapshot or self._state_at(self.now())
        image = self._render(snap)
        sw, sh = snap["store"]
        fx, fy = sw / 1024, sh / 768
        image = image[round(y * fy):round((y + h) * fy), round(x * fx):round((x + w) * fx)]
        tmp = f"{filename}.part"
        try:
            tifffile.imwrite(tmp, np.ascontiguousarray(image))
            os.replace(tmp, filename)
        except OSError:
            return CODE["GRAB_FAIL"]
        return 0

    def _render(self, snap: dict) -> np.ndarray:
        sw, sh = snap["store"]
        w = self.world
        if w is None:            # no specimen: a reproducible texture
            return self._rng.integers(0, 256, (sh, sw), dtype=np.uint8)
        from devices.sim import optics
        from devices.sim.sem import render
        x, y = snap["pos"][0], snap["pos"][1]
        if not snap["beam"]:
            return optics.dark_frame((sh, sw), snap["dwell"], w.mp.detector_offset, w.mp.read_noise, self._rng)
        wd0, sx0, sy0 = w.focus_baseline(x, y)
        ab = optics.Aberration(snap["wd"] - wd0, snap["stig"][0] - sx0, snap["stig"][1] - sy0)
        return render(w, (x, y), snap["pixel"], (sh, sw), snap["rotation"], ab, snap["current"],
                      snap["dwell"], self._rng)
