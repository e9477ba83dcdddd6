"""Simulated motorised stage: travel time, settle, backlash, repeatability and
the micrometre focus displacement that centimetre moves cause (why autofocus
runs after every mill cycle)."""
from __future__ import annotations

import math

import numpy as np

from devices import errors
from devices.interfaces import Capability, Stage, StagePosition
from devices.sim.faults import EXCEPTIONS, STAGE_MOVE
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
        self._commanded = np.array([world.stage_actual.x, world.stage_actual.y])
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
        fault = self.world.faults.draw(self.name, STAGE_MOVE)
        if fault not in (None, "move_failure"):        # a stage that stops short is verified below
            raise EXCEPTIONS[fault](f"injected fault ({fault})", device=self.name, operation="move_to")
        start = self.world.stage_actual
        if self.approach_from_below:
            # overshoot below the target on axes moving down, then come up: no backlash
            # (compared with the commanded position: that is what sets the motor's direction)
            below = {a: getattr(target, a) - self.p.backlash_um * 2e-6
                     for i, a in enumerate(("x", "y")) if getattr(target, a) < self._commanded[i]}
            if below:
                self._travel(start, target.with_(**below))
                start = self.world.stage_actual
        actual = self._travel(start, target, stop_short=fault == "move_failure")
        if verify:
            self.verify(target, actual)
        return actual

    def _travel(self, start: StagePosition, target: StagePosition, stop_short: bool = False) -> StagePosition:
        w = self.world
        cmd = np.array([target.x, target.y])
        d = cmd - self._commanded
        moving = np.abs(d) > 0
        dist = float(np.hypot(*d))
        dt = max(abs(d).max(initial=0.0), abs(target.z - start.z)) / (self.p.speed_mm_s * 1e-3) + self.p.settle_s
        # backlash: an axis that arrives moving down lags behind by the backlash
        self._last_dir = np.where(moving, np.sign(d), self._last_dir)
        lag = np.where(self._last_dir < 0, self.p.backlash_um * 1e-6, 0.0)
        err = self._rng.normal(0.0, self.p.repeatability_um * 1e-6, size=2)
        new = np.where(moving, cmd + lag + err, [start.x, start.y])
        if stop_short:
            new = (np.array([start.x, start.y]) + new) / 2
        self._commanded = new if stop_short else cmd      # a stage that stopped short is where it stopped
        with w.lock:
            if dist > 0:
                shift = self._rng.normal(0.0, self.p.z_shift_um_per_cm * 1e-6 * math.sqrt(dist / 1e-2))
                w.stage_focus_shift_m = float(np.clip(w.stage_focus_shift_m + shift,
                                                      -MAX_FOCUS_SHIFT_M, MAX_FOCUS_SHIFT_M))
            w.stage_actual = target.with_(x=float(new[0]), y=float(new[1]))
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
