"""Autofocus as a plan step: a registry of methods and the classical sweep.

A method is ``fn(setup, request) -> AutofocusResult``: it may acquire frames
and change wd/stig while it works, and returns the wd/stig it proposes. The
engine applies the proposal through the safety guard (step clamped to
``safety.max_autofocus_step_*``, windows enforced), so no method can take
the microscope out of its windows.

The registry holds this module's own methods ("none", "sem-builtin",
"sweep"; "sem-builtin" with ``options: {stig: true}`` adds the SEM's
autostig); the application adds the others explicitly at
start-up (``autofocus.register_methods()`` in main.py, the GUI, the
benchmarks and the tests): acq never imports the layers above it.
``METHOD_NEEDS`` names the SEM capabilities a method needs, so a plan naming
it is refused on a setup without them.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from devices.interfaces import Capability, ScanParams


@dataclass
class AutofocusRequest:
    center_um: tuple[float, float]
    pixel_size_m: float
    frame_size: tuple[int, int]
    dwell_s: float
    sweep_range_m: float = 30e-6
    sweep_steps: int = 7
    cycle: int = 0
    section: int = 0
    grid: Optional[int] = None
    options: dict = field(default_factory=dict)


@dataclass
class AutofocusResult:
    wd_m: float
    stig: tuple[float, float]
    ok: bool = True
    message: str = ""
    score: Optional[float] = None
    frames: int = 0


AutofocusMethod = Callable[[object, AutofocusRequest], AutofocusResult]
AUTOFOCUS_METHODS: dict[str, AutofocusMethod] = {}


def register_autofocus(name: str, fn: Optional[AutofocusMethod] = None):
    """Register ``fn`` under ``name`` (usable as a decorator)."""
    def add(f):
        AUTOFOCUS_METHODS[name] = f
        return f
    return add(fn) if fn is not None else add


def unknown_method(name: str) -> str:
    """Why ``name`` is no autofocus method: the registered names, and the
    nearest one when it looks like a misspelling."""
    near = difflib.get_close_matches(name, AUTOFOCUS_METHODS, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return f"unknown autofocus method {name!r}{hint}: allowed {sorted(AUTOFOCUS_METHODS)}"


# ------------------------------------------------------------------ methods
@register_autofocus("none")
def _none(setup, req: AutofocusRequest) -> AutofocusResult:
    return AutofocusResult(setup.sem.working_distance(), tuple(setup.sem.stig()), message="no autofocus")


def _flag_option(options: dict, key: str) -> bool:
    v = options.get(key, False)
    if not isinstance(v, bool):
        raise ValueError(f"options.{key} = {v!r}: allowed true or false")
    return v


# What the microscope must offer for a method (checked against the setup when a
# plan is loaded, acq/plan.py): the method name -> (options -> capabilities).
METHOD_NEEDS: dict[str, Callable[[dict], Capability]] = {
    "sem-builtin": lambda o: Capability.AUTOFOCUS | (Capability.AUTOSTIG if _flag_option(o, "stig")
                                                     else Capability.NONE),
}


def method_needs(name: str, options: Optional[dict] = None) -> Capability:
    """The SEM capabilities method ``name`` uses with ``options``; ValueError
    naming the option when one is malformed."""
    need = METHOD_NEEDS.get(name)
    return need(dict(options or {})) if need is not None else Capability.NONE


def _missing(sem, need: Capability) -> Optional[str]:
    have = getattr(sem, "capabilities", Capability.NONE)
    lack = [f.name for f in Capability if f and f in need and f not in have]
    return f"this SEM lacks {', '.join(f'Capability.{n}' for n in lack)}" if lack else None


@register_autofocus("sem-builtin")
def _builtin(setup, req: AutofocusRequest) -> AutofocusResult:
    """The SEM's own autofocus (SmartSEM: CMD_AUTO_FOCUS_FINE); with
    ``options: {stig: true}`` focus, autostig (CMD_AUTO_STIG), focus again.
    Run at the request's pixel size and dwell; the routines change wd/stig
    themselves, so the values read afterwards are the proposal (the engine
    clamps the step)."""
    sem = setup.sem
    stig = _flag_option(req.options, "stig")
    what = "SEM built-in autofocus" + (" and autostig" if stig else "")
    why = _missing(sem, method_needs("sem-builtin", req.options))
    if why:
        return AutofocusResult(sem.working_distance(), tuple(sem.stig()), ok=False, message=f"{what}: {why}")
    wd0, stig0 = sem.working_distance(), tuple(sem.stig())
    sem.set_scan(ScanParams(pixel_m=req.pixel_size_m, frame=tuple(req.frame_size), dwell_s=req.dwell_s))
    sem.set_blanked(False)                 # SmartSEM focuses on the live image
    sem.run_autofocus()
    if stig:                               # stigmation needs a focused image; focus again after it
        sem.run_autostig()
        sem.run_autofocus()
    wd, st = sem.working_distance(), tuple(sem.stig())
    return AutofocusResult(wd, st, message=f"{what}: wd {wd0 * 1e3:.4f} -> {wd * 1e3:.4f} mm, stig "
                                           f"({stig0[0]:.3g}, {stig0[1]:.3g}) -> ({st[0]:.3g}, {st[1]:.3g})")


def gradient_energy(image: np.ndarray) -> float:
    """Mean squared first difference (x and y) over the squared mean: large for
    a sharp image, independent of brightness. The sweep's focus measure."""
    f = image.astype(np.float32)
    gx = np.diff(f, axis=1)
    gy = np.diff(f, axis=0)
    m = float(f.mean()) or 1.0
    return float((np.mean(gx * gx) + np.mean(gy * gy)) / (m * m))


def peak_of(offsets: np.ndarray, scores: np.ndarray) -> float:
    """Offset of the score maximum: a parabola through log(score) around
    the best sample (a Gaussian peak is a parabola in log); the best sample
    itself when the fit has no maximum inside the sampled range."""
    k = int(np.argmax(scores))
    lo, hi = max(0, k - 2), min(len(scores), k + 3)
    x, y = offsets[lo:hi], np.log(np.maximum(scores[lo:hi], 1e-12))
    if len(x) >= 3:
        a, b, _ = np.polyfit(x, y, 2)
        if a < 0:
            top = -b / (2 * a)
            if offsets[lo] <= top <= offsets[hi - 1]:
                return float(top)
    return float(offsets[k])


@register_autofocus("sweep")
def sweep(setup, req: AutofocusRequest) -> AutofocusResult:
    """Acquire at a few wd offsets, fit a parabola, repeat on a narrower range.

    Three passes (range, range/3, range/9) reach a ~µm focus from tens of µm
    off with a few small frames. Every wd set goes through the guarded SEM,
    so a sweep that would leave the wd window raises LimitViolation."""
    sem = setup.sem
    wd0 = sem.working_distance()
    stig = tuple(sem.stig())
    sem.set_scan(ScanParams(pixel_m=req.pixel_size_m, frame=tuple(req.frame_size), dwell_s=req.dwell_s))
    sem.set_blanked(False)
    centre, half, frames, best = wd0, req.sweep_range_m, 0, 0.0
    try:
        for steps in (req.sweep_steps, 5, 5):
            offsets = np.linspace(-half, half, steps)
            scores = []
            for off in offsets:
                sem.set_working_distance(centre + float(off))
                scores.append(gradient_energy(sem.acquire_frame().image))
                frames += 1
            scores = np.asarray(scores)
            centre += peak_of(offsets, scores)
            best = float(scores.max())
            half /= 3.0
    except BaseException:
        sem.set_working_distance(wd0)       # a failed sweep leaves the focus where it was
        raise
    sem.set_working_distance(wd0)           # the engine applies the result (clamped)
    return AutofocusResult(centre, stig, score=best, frames=frames,
                           message=f"sweep: wd {wd0 * 1e3:.4f} -> {centre * 1e3:.4f} mm")


def request_for(ev) -> AutofocusRequest:
    st = ev.step
    return AutofocusRequest(center_um=ev.center_um, pixel_size_m=st.pixel_size_nm * 1e-9,
                            frame_size=tuple(st.frame_size), dwell_s=st.dwell_ns * 1e-9,
                            sweep_range_m=st.sweep_range_um * 1e-6, sweep_steps=st.sweep_steps,
                            cycle=ev.cycle, section=ev.section, grid=ev.grid, options=dict(st.options))


def run_autofocus(setup, ev) -> tuple[AutofocusResult, float, tuple[float, float]]:
    """Run the event's method and apply its proposal, clamped to the maximum
    autofocus step. Returns (result, wd set, stig set)."""
    method = AUTOFOCUS_METHODS.get(ev.step.method)
    if method is None:                      # the plan was checked in a process that registered more
        raise LookupError(unknown_method(ev.step.method))
    sem = setup.sem
    wd_before, stig_before = sem.working_distance(), tuple(sem.stig())
    res = method(setup, request_for(ev))
    if not res.ok:
        return res, wd_before, stig_before
    d_wd, d_stig = setup.guard.clamp_autofocus_step(
        res.wd_m - wd_before, (res.stig[0] - stig_before[0], res.stig[1] - stig_before[1]))
    wd = wd_before + d_wd
    stig = (stig_before[0] + d_stig[0], stig_before[1] + d_stig[1])
    sem.set_working_distance(wd)            # guarded: LimitViolation outside the window
    if stig != stig_before:
        sem.set_stig(*stig)
    return res, wd, stig
