"""Safety windows of the setup, enforced in front of every driver.

Each check raises LimitViolation *before* anything is sent, so a refused
setpoint changes nothing. The guarded proxies are what the rest of the
program holds; raw drivers stay inside devices/.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

from devices.errors import InterlockError, LimitViolation
from devices.interfaces import SEM, Stage, StagePosition
from devices.setup_config import Safety


def _window(quantity: str, value: float, lo: float, hi: float, unit: str, scale: float = 1.0) -> None:
    if not (math.isfinite(value) and lo <= value <= hi):
        raise LimitViolation(quantity, round(value * scale, 9), f"[{lo * scale:g}, {hi * scale:g}] {unit}",
                             device="safety")


class SafetyGuard:
    def __init__(self, safety: Safety, on_violation: Optional[Callable[[LimitViolation], None]] = None):
        self.s = safety
        self.on_violation = on_violation

    def _report(self, fn, *args):
        try:
            fn(*args)
        except LimitViolation as e:
            if self.on_violation:
                self.on_violation(e)
            raise

    def check_stage(self, p: StagePosition) -> None:
        t = self.s.stage
        def run():
            for axis, rng, scale, unit in (("x", t.x_mm, 1e-3, "mm"), ("y", t.y_mm, 1e-3, "mm"),
                                           ("z", t.z_mm, 1e-3, "mm"), ("r", t.r_deg, math.pi / 180, "deg"),
                                           ("t", t.t_deg, math.pi / 180, "deg")):
                _window(f"stage.{axis}", getattr(p, axis), rng[0] * scale, rng[1] * scale, unit, 1 / scale)
        self._report(run)

    def check_wd(self, metres: float) -> None:
        lo, hi = self.s.wd_mm
        self._report(_window, "working_distance", metres, lo * 1e-3, hi * 1e-3, "mm", 1e3)

    def check_stig(self, x: float, y: float) -> None:
        lo, hi = self.s.stig
        self._report(_window, "stig_x", x, lo, hi, "")
        self._report(_window, "stig_y", y, lo, hi, "")

    def check_eht(self, volts: float) -> None:
        lo, hi = self.s.eht_kv
        self._report(_window, "eht", volts, lo * 1e3, hi * 1e3, "kV", 1e-3)

    def check_probe_current(self, amperes: float) -> None:
        lo, hi = self.s.probe_current_na
        self._report(_window, "probe_current", amperes, lo * 1e-9, hi * 1e-9, "nA", 1e9)

    def clamp_autofocus_step(self, d_wd_m: float, d_stig: tuple[float, float]) -> tuple[float, tuple[float, float]]:
        """Limit one autofocus correction to the configured maximum step."""
        m = self.s.max_autofocus_step_wd_um * 1e-6
        ms = self.s.max_autofocus_step_stig
        clip = lambda v, lim: max(-lim, min(lim, v))
        return clip(d_wd_m, m), (clip(d_stig[0], ms), clip(d_stig[1], ms))

    def near_mill_position(self, p: StagePosition) -> bool:
        mp = self.s.mill_position
        return math.hypot(p.x - mp.x_mm * 1e-3, p.y - mp.y_mm * 1e-3) <= mp.imaging_exclusion_mm * 1e-3


class _Proxy:
    def __init__(self, inner, guard: SafetyGuard):
        self._inner = inner
        self.guard = guard

    def __getattr__(self, name):
        return getattr(self._inner, name)

    @property
    def inner(self):
        return self._inner


class GuardedSEM(_Proxy):
    def set_working_distance(self, metres: float) -> None:
        self.guard.check_wd(metres)
        self._inner.set_working_distance(metres)

    def set_stig(self, x: float, y: float) -> None:
        self.guard.check_stig(x, y)
        self._inner.set_stig(x, y)

    def set_eht(self, volts: float) -> None:
        self.guard.check_eht(volts)
        self._inner.set_eht(volts)

    def set_probe_current(self, amperes: float) -> None:
        self.guard.check_probe_current(amperes)
        self._inner.set_probe_current(amperes)


class GuardedStage(_Proxy):
    """Checks travel windows and refuses to move while the ion beam is on."""

    def __init__(self, inner, guard: SafetyGuard, ion_beam_on: Callable[[], bool] = lambda: False):
        super().__init__(inner, guard)
        self._ion_beam_on = ion_beam_on

    def move_to(self, target: StagePosition, *, verify: bool = True) -> StagePosition:
        self.guard.check_stage(target)
        if self._ion_beam_on():
            raise InterlockError("stage move refused: ion beam is not blanked", device="stage",
                                 operation="move_to")
        return self._inner.move_to(target, verify=verify)

    def move_by(self, **delta: float) -> StagePosition:
        pos = self._inner.position()
        return self.move_to(pos.with_(**{a: getattr(pos, a) + d for a, d in delta.items()}))


SEM.register(GuardedSEM)
Stage.register(GuardedStage)
