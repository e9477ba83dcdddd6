"""'Run now' autofocus for the GUI (no Qt): the iterative pair loop of
autofocus/loop.py with a named method (MAPFoSt, DeepFocus), or the classical
sweep of acq/autofocus_step.py. Every change goes through the guarded SEM
and the step clamp. ``on_iteration(dict)`` reports each iteration as it
happens; the return value is the whole trace."""
from __future__ import annotations

import time
from typing import Callable, Optional

from devices.interfaces import ScanParams

OnIteration = Optional[Callable[[dict], None]]


def methods_available() -> dict[str, str]:
    """name -> '' when usable, else why not (shown as the disabled entry's tooltip)."""
    out: dict[str, str] = {}
    try:
        import autofocus.mapfost_method  # noqa: F401
        out["mapfost"] = ""
    except Exception as e:
        out["mapfost"] = f"MAPFoSt not available: {e}"
    try:
        from autofocus.loop import AutofocusLoop  # noqa: F401
        from autofocus.methods import deepfocus_variants
        variants = deepfocus_variants()
        for name in sorted(variants):
            out[name] = ""
        if not variants:
            out["deepfocus"] = "no trained DeepFocus model in models/ (deepfocus*.pt)"
    except Exception as e:
        out["deepfocus"] = f"DeepFocus loop not available (autofocus/loop.py): {e}"
    out["sweep"] = ""
    return out


class _Reporting:
    """Wraps a correction method so each estimate is reported at once."""

    def __init__(self, inner, sem, perturbation_m: float, on_iteration: OnIteration, token):
        self.inner, self.sem, self.p, self.cb, self.token = inner, sem, perturbation_m, on_iteration, token
        self.k = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def estimate(self, img_plus, img_minus, pixel_size_m, perturbation_m, **where):
        if self.token is not None:
            self.token.check()              # between iterations: the loop restores the start on an exception
        est = self.inner.estimate(img_plus, img_minus, pixel_size_m, perturbation_m, **where)
        self.k += 1
        if self.cb:
            stig = tuple(self.sem.stig())
            self.cb({"iteration": self.k, "wd_m": self.sem.working_distance() + self.p, "stig": stig,
                     "d_wd_m": est.d_wd_m, "d_stig": tuple(est.d_stig), "final": False})
        return est


def _make_method(setup, name: str, perturbation_m: float, patch: int):
    from autofocus.methods import make_pair_method
    sem = setup.sem
    if name == "mapfost":
        world = getattr(setup, "world", None)
        if world is not None:                # the simulator's own optics: exact calibration
            return make_pair_method("mapfost", mapfost_calibration="microscope", microscope=world.mp,
                                    scan_rotation_rad=sem.scan_rotation(), perturbation_m=perturbation_m,
                                    patch_size=patch)
        return make_pair_method("mapfost", sem=sem, mapfost_calibration="induced", perturbation_m=perturbation_m,
                                patch_size=patch)
    return make_pair_method(name, sem=sem, perturbation_m=perturbation_m, patch_size=patch,
                            column_alpha_mrad=setup.config.calibration.probe_half_angle_mrad)


def run_focus(setup, name: str, *, perturbation_um: float = 5.0, max_iterations: int = 5, frame: int = 512,
              pixel_nm: float = 4.0, dwell_ns: float = 800.0, on_iteration: OnIteration = None,
              progress=None, token=None) -> dict:
    t0 = time.perf_counter()
    sem = setup.sem
    if name == "sweep":
        return _sweep(setup, frame, pixel_nm, dwell_ns, on_iteration, t0)
    try:
        from autofocus.loop import AutofocusLoop
    except ImportError:
        if name != "mapfost":
            raise
        return _mapfost_plain(setup, perturbation_um, max_iterations, frame, pixel_nm, dwell_ns, on_iteration,
                              token, t0)
    p = perturbation_um * 1e-6
    method = _Reporting(_make_method(setup, name, p, frame), sem, p, on_iteration, token)
    loop = AutofocusLoop(sem, setup.guard, method, perturbation_m=p, max_iterations=max_iterations,
                         dwell_s=dwell_ns * 1e-9, frame_size=(frame, frame), pixel_size_m=pixel_nm * 1e-9)
    trace = loop.run()
    its = [{"iteration": r.iteration, "wd_m": r.wd_m, "stig": tuple(r.stig), "d_wd_m": r.applied_d_wd_m,
            "d_stig": tuple(r.applied_d_stig), "wd_after_m": r.wd_after_m, "stig_after": tuple(r.stig_after),
            "clamped": r.clamped} for r in trace.iterations]
    return {"method": name, "status": trace.status, "message": trace.message, "iterations": its,
            "start_wd_m": trace.start_wd_m, "start_stig": tuple(trace.start_stig), "final_wd_m": trace.final_wd_m,
            "final_stig": tuple(trace.final_stig), "seconds": time.perf_counter() - t0, "ok": trace.ok}


def _sweep(setup, frame: int, pixel_nm: float, dwell_ns: float, on_iteration: OnIteration, t0: float) -> dict:
    from acq.autofocus_step import AutofocusRequest, sweep
    sem = setup.sem
    wd0, stig0 = sem.working_distance(), tuple(sem.stig())
    scan = ScanParams(pixel_m=pixel_nm * 1e-9, frame=(frame, frame), dwell_s=dwell_ns * 1e-9)
    with sem.scanning(scan):                 # the sweep sets this scan itself; the operator's comes back
        res = sweep(setup, AutofocusRequest((0.0, 0.0), scan.pixel_m, scan.frame, scan.dwell_s))
        d_wd, _ = setup.guard.clamp_autofocus_step(res.wd_m - wd0, (0.0, 0.0))
        sem.set_working_distance(wd0 + d_wd)
    it = {"iteration": 1, "wd_m": wd0, "stig": stig0, "d_wd_m": d_wd, "d_stig": (0.0, 0.0),
          "wd_after_m": wd0 + d_wd, "stig_after": stig0, "clamped": d_wd != res.wd_m - wd0}
    if on_iteration:
        on_iteration({**it, "final": False})
    return {"method": "sweep", "status": "converged" if res.ok else "failed", "message": res.message,
            "iterations": [it], "start_wd_m": wd0, "start_stig": stig0, "final_wd_m": wd0 + d_wd,
            "final_stig": stig0, "seconds": time.perf_counter() - t0, "ok": res.ok}


def _mapfost_plain(setup, perturbation_um, max_iterations, frame, pixel_nm, dwell_ns, on_iteration, token, t0):
    """MAPFoSt iterations without autofocus/loop.py: pair at wd ± Δ, estimate,
    clamped step, until the correction is below 0.2 µm / 0.05 stig."""
    from autofocus.mapfost_method import calibration_from_microscope, estimate_correction
    sem, guard, world = setup.sem, setup.guard, getattr(setup, "world", None)
    if world is None:
        raise RuntimeError("MAPFoSt without autofocus/loop.py needs the simulator's calibration")
    cal = calibration_from_microscope(world.mp, sem.scan_rotation())
    wd0, stig0 = sem.working_distance(), tuple(sem.stig())
    its, status = [], "max_iterations"
    try:
        with sem.scanning(ScanParams(pixel_m=pixel_nm * 1e-9, frame=(frame, frame), dwell_s=dwell_ns * 1e-9)):
            for k in range(1, max_iterations + 1):
                if token is not None:
                    token.check()
                wd, stig = sem.working_distance(), tuple(sem.stig())
                sem.set_working_distance(wd + perturbation_um * 1e-6)
                a = sem.acquire_frame().image
                sem.set_working_distance(wd - perturbation_um * 1e-6)
                b = sem.acquire_frame().image
                dz, sx, sy = estimate_correction(a, b, perturbation_um, pixel_nm, cal, patch_size=frame)
                d_wd, d_st = guard.clamp_autofocus_step(dz * 1e-6, (sx, sy))
                sem.set_working_distance(wd + d_wd)
                sem.set_stig(stig[0] + d_st[0], stig[1] + d_st[1])
                it = {"iteration": k, "wd_m": wd, "stig": stig, "d_wd_m": d_wd, "d_stig": tuple(d_st),
                      "wd_after_m": wd + d_wd, "stig_after": (stig[0] + d_st[0], stig[1] + d_st[1]),
                      "clamped": False}
                its.append(it)
                if on_iteration:
                    on_iteration({**it, "final": False})
                if abs(dz) < 0.2 and max(abs(sx), abs(sy)) < 0.05:
                    status = "converged"
                    break
    except BaseException:
        sem.set_working_distance(wd0)
        sem.set_stig(*stig0)
        raise
    return {"method": "mapfost", "status": status, "message": f"{len(its)} MAPFoSt iterations", "iterations": its,
            "start_wd_m": wd0, "start_stig": stig0, "final_wd_m": sem.working_distance(),
            "final_stig": tuple(sem.stig()), "seconds": time.perf_counter() - t0, "ok": True}
