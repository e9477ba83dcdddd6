"""Simulated motorised stage: travel time, settle, backlash, repeatability and
the micrometre focus displacement that centimetre moves cause (why autofocus
runs after every mill cycle)."""
from __future__ import annotations

import math

import numpy as np

from devices import errors
from devices.interfaces import Capability, Stage, StagePosition
from devices.sim.world import SimWorld

MAX_FOCUS_SHIFT_M = 25e-6


class SimStage(Stage):
    capabilities = Capability.STAGE_ROTATION | Capability.STAGE_TILT

    def __init__(self, world: SimWorld, name: str = "stage", approach_from_below: bool = True):
        self.world = world
        self.name = name
        self.p = world.params.stage
        self.approach_from_below = approach_from_below
        self._rng = np.random.default_rng(world.params.seed + 202)
        self._last_dir = np.ones(2)     # direction of the last approach per xy axis
        self._connected = False
        self.moves = 0
        travel = world.safety.stage
        self.limits = {
            "x": tuple(v * 1e-3 for v in travel.x_mm), "y": tuple(v * 1e-3 for v in travel.y_mm),
            "z": tuple(v * 1e-3 for v in travel.z_mm),
            "r": tuple(math.radians(v) for v in travel.r_deg), "t": tuple(math.radians(v) for v in travel.t_deg),
        }

    def connect(self): self._connected = True
    def close(self): self._connected = False
    def identity(self): return "Simulated stage (devices.sim)"

    def position(self) -> StagePosition:
        return self.world.stage_actual

    def stop(self) -> None:
        pass        # moves are atomic in the simulation

    def move_to(self, target: StagePosition, *, verify: bool = True) -> StagePosition:
        if not self._connected:
            raise errors.NotConnected("not connected", device=self.name)
        for axis, (lo, hi) in self.limits.items():
            v = getattr(target, axis)
            if not lo <= v <= hi:
                raise errors.LimitViolation(f"stage.{axis}", v, f"[{lo}, {hi}]", device=self.name)
        fault = self.world.faults.check(self.name, "move_to")
        start = self.world.stage_actual
        if self.approach_from_below:
            # overshoot below the target on axes moving down, then come up: no backlash
            below = {a: getattr(target, a) - self.p.backlash_um * 2e-6
                     for a in ("x", "y") if getattr(target, a) < getattr(start, a)}
            if below:
                self._travel(start, target.with_(**below))
                start = self.world.stage_actual
        actual = self._travel(start, target, stop_short=fault == "move_failure")
        if verify:
            self.verify(target, actual)
        return actual

    def _travel(self, start: StagePosition, target: StagePosition, stop_short: bool = False) -> StagePosition:
        w = self.world
        d = np.array([target.x - start.x, target.y - start.y])
        dist = float(np.hypot(*d))
        dt = max(abs(d).max(initial=0.0), abs(target.z - start.z)) / (self.p.speed_mm_s * 1e-3) + self.p.settle_s
        # backlash: an axis that arrives moving down lags behind by the backlash
        direction = np.where(d < 0, -1.0, np.where(d > 0, 1.0, self._last_dir))
        self._last_dir = direction
        lag = np.where(direction < 0, self.p.backlash_um * 1e-6, 0.0)
        err = self._rng.normal(0.0, self.p.repeatability_um * 1e-6, size=2) if dist > 0 else np.zeros(2)
        x, y = target.x + lag[0] + err[0], target.y + lag[1] + err[1]
        if stop_short:
            x, y = (start.x + x) / 2, (start.y + y) / 2
        with w.lock:
            if dist > 0:
                shift = self._rng.normal(0.0, self.p.z_shift_um_per_cm * 1e-6 * math.sqrt(dist / 1e-2))
                w.stage_focus_shift_m = float(np.clip(w.stage_focus_shift_m + shift,
                                                      -MAX_FOCUS_SHIFT_M, MAX_FOCUS_SHIFT_M))
            w.stage_actual = target.with_(x=x, y=y)
        w.clock.sleep(dt)
        self.moves += 1
        return w.stage_actual

    def verify(self, target: StagePosition, actual: StagePosition) -> None:
        tol = self.p.tolerance_um * 1e-6
        tol_a = math.radians(self.p.tolerance_deg)
        for axis in StagePosition.AXES:
            t = tol if axis in "xyz" else tol_a
            if abs(getattr(actual, axis) - getattr(target, axis)) > t:
                raise errors.MoveFailed(
                    f"{axis} reached {getattr(actual, axis):.9g}, target {getattr(target, axis):.9g} "
                    f"(tolerance {t:.3g})", device=self.name, operation="move_to")
