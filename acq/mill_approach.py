"""The way to the mill position and back: single-axis moves in a safe order,
each one verified before the next.

Near the pole piece a combined 5-axis move can swing a tilted specimen into
the column. So the approach first moves z down (away from the pole piece:
stage z up shortens the working distance), then x/y, then rotation, then
tilt; the return to imaging is the mirror: tilt flat first, rotation, x/y, z
back up last. Should the mill z lie above the imaging height, z goes up only
after x/y left the imaging position (x/y, z, r, t; back: t, r, z, x/y): z
never rises under the column. Each azimuth change while milling is a
rotation-only move.

Every waypoint of the approach, the azimuth rotations and the return is
checked against the safety windows before the first move, so a window that
cuts the path refuses the mill with nothing moved. After each move the stage
must be idle and read back within ``TOLERANCE`` of the waypoint on every axis
(the moved ones at their target, the others where they were); the driver's
own verification is not relied on. A failed step blanks the ion beam (it is
never on during a move anyway), stops the sequence where it is and raises
``MillApproachFailed``: the engine's failure policy suspends and then pauses.
Nothing in the plan turns this off.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from acq.device_ops import with_retries
from devices.errors import DeviceError, LimitViolation, MoveFailed
from devices.interfaces import StagePosition
from devices.setup_config import ConfigError

APPROACH_ORDER: tuple[tuple[str, ...], ...] = (("z",), ("x", "y"), ("r",), ("t",))
RETURN_ORDER: tuple[tuple[str, ...], ...] = tuple(reversed(APPROACH_ORDER))
_APPROACH_Z_UP = (("x", "y"), ("z",), ("r",), ("t",))      # mill z above the imaging height


def approach_order(imaging_z: float, mill_z: float):
    return APPROACH_ORDER if mill_z <= imaging_z else _APPROACH_Z_UP


def return_order(imaging_z: float, mill_z: float):
    return tuple(reversed(approach_order(imaging_z, mill_z)))


# Read-back tolerance per axis. Looser than a driver's own (~1 µm, 0.05°): this
# check is about the stage being where the sequence thinks, not about precision.
TOLERANCE = {"x": 5e-6, "y": 5e-6, "z": 5e-6, "r": math.radians(0.2), "t": math.radians(0.2)}
IDLE_WAIT_S = 10.0       # after move_to returned, how long the stage may still report busy
IDLE_POLL_S = 0.1


class MillApproachFailed(MoveFailed):
    """One step of the mill approach or return did not verify; the stage was
    left where it stopped and no further step was commanded."""

    def __init__(self, message: str, *, step: str, axes: Sequence[str]):
        self.step = step
        self.axes = tuple(axes)
        super().__init__(message, device="stage", operation=step)


def check_at_imaging(ctx, pos: StagePosition, when: str) -> None:
    """Refuse (MillApproachFailed: the operator looks) unless the stage is at
    an imaging pose: flat, unrotated, outside the mill position's radius. After
    a failed step the stage may be tilted at the mill: nothing is commanded
    from there automatically, neither a new approach nor a tile's move."""
    mp = ctx.setup.config.safety.mill_position
    near = ctx.setup.guard.near_mill_position(pos)
    bad = [f"tilt {math.degrees(pos.t):.2f} deg"] if abs(pos.t) > TOLERANCE["t"] else []
    if abs(_angle_diff(pos.r, 0.0)) > TOLERANCE["r"]:
        bad.append(f"rotation {math.degrees(pos.r):.2f} deg")
    if near:
        bad.append(f"within {mp.imaging_exclusion_mm:g} mm of the mill position")
    if bad:
        raise MillApproachFailed(
            f"{when}: the stage is not at an imaging pose ({', '.join(bad)}; at x={pos.x * 1e3:.3f} mm, "
            f"y={pos.y * 1e3:.3f} mm, z={pos.z * 1e3:.3f} mm). Bring it back flat, unrotated and away from "
            "the mill position by hand, then resume", step=when, axes=("t", "r", "x", "y"))


@dataclass(frozen=True)
class Waypoint:
    axes: tuple[str, ...]
    position: StagePosition
    what: str


def _label(axes: Sequence[str]) -> str:
    return "/".join(axes)


def _angle_diff(a: float, b: float) -> float:
    return (a - b + math.pi) % (2 * math.pi) - math.pi     # rotation read back may be wrapped (0..360°)


def _off(axis: str, actual: float, want: float) -> float:
    return _angle_diff(actual, want) if axis == "r" else actual - want


def waypoints(start: StagePosition, target: StagePosition, order, what: str) -> list[Waypoint]:
    """The positions after each step of ``order`` from ``start`` to ``target``."""
    out, cur = [], start
    for axes in order:
        cur = cur.with_(**{a: getattr(target, a) for a in axes})
        out.append(Waypoint(tuple(axes), cur, f"{what}: {_label(axes)}"))
    return out


def azimuth_deg(r_window: tuple[float, float], index: int, count: int) -> Optional[float]:
    """Stage rotation of azimuth ``index`` of ``count`` (360°/count apart), as
    the first of a, a - 360°, a + 360° inside the window; None if none is."""
    a = 360.0 * index / count
    return next((v for v in (a, a - 360.0, a + 360.0) if r_window[0] <= v <= r_window[1]), None)


def check_plan_windows(safety, azimuths: int, source: str) -> None:
    """Plan-time check: the windows leave room for the whole sequence. The
    imaging pose (flat, rotation 0) and every azimuth must lie inside them; the
    other axes only take values from the tile positions and the mill position,
    which are checked elsewhere, so every waypoint is then inside too."""
    st = safety.stage
    if not st.t_deg[0] <= 0.0 <= st.t_deg[1]:
        raise ConfigError(f"{source}: mill: safety.stage.t_deg = [{st.t_deg[0]:g}, {st.t_deg[1]:g}] deg "
                          "excludes 0 deg, the flat stage the mill approach starts and ends at")
    for k in range(azimuths):
        if azimuth_deg(st.r_deg, k, azimuths) is None:
            a = 360.0 * k / azimuths
            raise ConfigError(f"{source}: mill.azimuths = {azimuths} needs a stage rotation of {a:g} deg "
                              f"(or {a - 360:g} deg), outside safety.stage.r_deg = "
                              f"[{st.r_deg[0]:g}, {st.r_deg[1]:g}] deg")


class MillApproach:
    """One mill's way in, its azimuth rotations and its way out.

    ``mill_target`` is the mill position at the first azimuth; ``azimuths_rad``
    every rotation the mill will use. The return goes to the imaging pose: the
    x/y the stage started from, the engine's imaging height, flat."""

    def __init__(self, ctx, mill_target: StagePosition, azimuths_rad: Sequence[float]):
        self.ctx = ctx
        self.stage = ctx.setup.stage
        self.target = mill_target
        start = self.stage.position()
        check_at_imaging(ctx, start, "start of the mill approach")
        self.imaging = StagePosition(x=start.x, y=start.y, z=ctx.imaging_z, r=0.0, t=0.0)
        self.failed = False          # a step failed: nothing else may be commanded automatically
        self.started = False         # the approach began: the way back is needed
        self._check_windows(start, azimuths_rad)

    # ---------------------------------------------------------------- checks
    def _check_windows(self, start: StagePosition, azimuths_rad: Sequence[float]) -> None:
        """Every position the sequence can command, before the first move."""
        setup = self.ctx.setup
        mp = setup.config.safety.mill_position
        if self.target.t > math.radians(mp.max_tilt_deg) + 1e-12:
            raise LimitViolation("stage.t", round(math.degrees(self.target.t), 9),
                                 f"[0, {mp.max_tilt_deg:g}] deg (safety.mill_position.max_tilt_deg)",
                                 device="safety")
        points = [w.position for w in waypoints(start, self.target, approach_order(start.z, self.target.z), "")]
        back = return_order(self.imaging.z, self.target.z)
        for r in azimuths_rad:
            points.append(self.target.with_(r=r))
            points += [w.position for w in waypoints(self.target.with_(r=r), self.imaging, back, "")]
        for p in points:
            setup.guard.check_stage(p)

    def _busy(self) -> bool:
        # Stage has no busy query in every driver: move_to returns only once the
        # motion ended, so a stage without one counts as idle here.
        fn = getattr(self.stage, "is_moving", None)
        return bool(fn()) if callable(fn) else False

    def _verify(self, wp: Waypoint, before: StagePosition) -> StagePosition:
        clock = self.ctx.clock
        waited = 0.0
        while self._busy():
            if waited >= IDLE_WAIT_S:
                raise MillApproachFailed(f"stage still busy {IDLE_WAIT_S:g} s after the move",
                                         step=wp.what, axes=wp.axes)
            clock.sleep(IDLE_POLL_S)
            waited += IDLE_POLL_S
        actual = self.stage.position()
        want = before.with_(**{a: getattr(wp.position, a) for a in wp.axes})
        bad = []
        for a in StagePosition.AXES:
            d = _off(a, getattr(actual, a), getattr(want, a))
            if not (math.isfinite(d) and abs(d) <= TOLERANCE[a]):
                scale, unit = (1e6, "µm") if a in "xyz" else (180 / math.pi, "deg")
                bad.append(f"{a} off by {d * scale:.3g} {unit} (tolerance {TOLERANCE[a] * scale:.3g} {unit}"
                           f"{'' if a in wp.axes else ', an axis this step must not move'})")
        if bad:
            raise MillApproachFailed(f"read back {actual}: " + "; ".join(bad), step=wp.what,
                                     axes=wp.axes)
        return actual

    # ------------------------------------------------------------------ moves
    def _blank(self) -> str:
        gun = self.ctx.setup.ion_gun
        try:
            if gun is not None:
                gun.set_blanked(True)
            return ""
        except Exception as e:              # the step's error is what matters; say the blank is unconfirmed
            self.ctx.ion_beam_safe = False
            return f" (blanking the ion beam failed as well: {e})"

    def _step(self, wp: Waypoint) -> None:
        if self.failed:
            raise MillApproachFailed("refused: an earlier step of the mill approach failed",
                                     step=wp.what, axes=wp.axes)
        ctx = self.ctx
        try:
            before = self.stage.position()
            # only this step's axes change: the others are commanded where they are
            cmd = before.with_(**{a: getattr(wp.position, a) for a in wp.axes})
            # an axis already there is not moved again (a SmartSEM move settles for a second)
            if any(abs(_off(a, getattr(before, a), getattr(cmd, a))) > TOLERANCE[a] for a in wp.axes):
                # the guarded stage refuses it while the ion beam is on
                with_retries(ctx, f"stage {wp.what}", ctx.plan.retries.move, lambda: self.stage.move_to(cmd),
                             role="stage")
            self._verify(wp, before)
        except DeviceError as e:
            self.failed = True
            note = self._blank()
            if note:
                raise MillApproachFailed(f"{e}{note}", step=wp.what, axes=wp.axes) from e
            raise

    def _run(self, points: list[Waypoint]) -> StagePosition:
        for wp in points:
            self._step(wp)
        return self.stage.position()

    def approach(self) -> StagePosition:
        """To the mill position: z down, x/y, rotation, tilt (z up comes after x/y)."""
        self.started = True
        here = self.stage.position()
        return self._run(waypoints(here, self.target, approach_order(here.z, self.target.z), "mill approach"))

    def rotate(self, r: float, what: str = "azimuth") -> StagePosition:
        """A rotation-only move (tilted, at the mill position)."""
        return self._run([Waypoint(("r",), self.stage.position().with_(r=r), f"rotation to {what}")])

    def back_to_imaging(self) -> StagePosition:
        """The mirror: tilt flat, rotation 0, x/y, then z up to the imaging height."""
        here = self.stage.position()
        return self._run(waypoints(here, self.imaging, return_order(self.imaging.z, here.z), "return to imaging"))
