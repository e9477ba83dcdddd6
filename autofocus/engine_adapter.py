"""The autofocus loop as acquisition-engine methods (acq.autofocus_step).

``register_all`` (what ``autofocus.register_methods`` calls) registers
"mapfost", "deepfocus" (and every shipped DeepFocus variant by name),
"sharpness-nm" and "deepscore-nm" in AUTOFOCUS_METHODS. The engine calls
``fn(setup, request)``; the loop moves wd/stig itself (clamped, inside the
windows) and returns where it ended; a diverged or failed loop has already
put the SEM back and returns ok=False, so the engine keeps the previous
focus. Per-plan knobs come in ``request.options``: perturbation_um,
max_iterations, n_patches, mapfost_calibration (a JSON file written by
``save_calibration``), stop_score (Nelder–Mead), nm_iterations.
"""
from __future__ import annotations

import json
import logging
import weakref
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from acq.autofocus_step import AutofocusRequest, AutofocusResult, register_autofocus
from autofocus.loop import AutofocusLoop, AutofocusTrace
from autofocus.mapfost_method import MapfostCalibration
from autofocus.methods import deepfocus_variants, make_pair_method
from autofocus.nelder_mead import NelderMeadAutofocus, make_objective

log = logging.getLogger(__name__)
# Methods and objectives built for a microscope, per SEM object: models load
# and MAPFoSt calibrates once per run, and the entries go with the SEM (an id
# could be reused by the next run's SEM and hand it a stale calibration).
_BUILT: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()
LAST_TRACES: list[AutofocusTrace] = []  # most recent first is the last element; bounded


def save_calibration(cal: MapfostCalibration, path: Path) -> None:
    Path(path).write_text(json.dumps(asdict(cal), indent=1))


def load_calibration(path: Path) -> MapfostCalibration:
    d = json.loads(Path(path).read_text())
    d["stig_scale"] = tuple(d["stig_scale"])
    return MapfostCalibration(**d)


def _mapfost_calibration(setup, opts: dict):
    if opts.get("mapfost_calibration"):
        return load_calibration(Path(opts["mapfost_calibration"]))
    world = getattr(setup, "world", None)
    if world is not None:                # simulator: its parameters are the installation's calibration
        return "microscope"
    raise RuntimeError("MAPFoSt needs a calibration: options.mapfost_calibration = JSON from save_calibration")


def built_for(sem) -> dict:
    """What was built for ``sem`` so far: (name, options) -> method or objective."""
    return _BUILT.setdefault(sem, {})


def _pair_method(setup, name: str, req: AutofocusRequest):
    opts = req.options or {}
    cache, key = built_for(setup.sem), (name, json.dumps(opts, sort_keys=True, default=str))
    if key not in cache:
        kw = dict(sem=setup.sem, perturbation_m=float(opts.get("perturbation_um", 5.0)) * 1e-6,
                  n_patches=opts.get("n_patches"), seed=int(opts.get("seed", 0)),
                  column_alpha_mrad=setup.config.calibration.probe_half_angle_mrad)
        if name == "mapfost":
            world = getattr(setup, "world", None)
            kw.update(mapfost_calibration=_mapfost_calibration(setup, opts),
                      microscope=world.mp if world is not None else None,
                      scan_rotation_rad=setup.sem.scan_rotation())
        cache[key] = make_pair_method(name, **kw)
    return cache[key]


def _result(tr: AutofocusTrace) -> AutofocusResult:
    LAST_TRACES.append(tr)
    del LAST_TRACES[:-50]
    res = AutofocusResult(tr.final_wd_m, tuple(tr.final_stig), ok=tr.ok, frames=tr.evaluations,
                          message=f"{tr.method}: {tr.status} after {len(tr.iterations)} iterations, "
                                  f"{tr.dose_e_per_nm2:.1f} e/nm²; {tr.message}")
    res.trace = tr                       # the whole trace for the journal
    return res


def pair_autofocus(name: str):
    def run(setup, req: AutofocusRequest) -> AutofocusResult:
        opts = req.options or {}
        try:
            method = _pair_method(setup, name, req)
        except (RuntimeError, ValueError, FileNotFoundError, ImportError) as e:
            return AutofocusResult(setup.sem.working_distance(), tuple(setup.sem.stig()), ok=False,
                                   message=f"{name} unavailable: {e}")
        loop = AutofocusLoop(setup.sem, setup.guard, method,
                             perturbation_m=float(opts.get("perturbation_um", 5.0)) * 1e-6,
                             max_iterations=int(opts.get("max_iterations", 5)), dwell_s=req.dwell_s,
                             frame_size=tuple(req.frame_size), pixel_size_m=req.pixel_size_m)
        return _result(loop.run())
    run.__name__ = f"autofocus_{name}"
    return run


def search_autofocus(name: str):
    def run(setup, req: AutofocusRequest) -> AutofocusResult:
        opts = req.options or {}
        try:
            cache, key = built_for(setup.sem), (name, "objective")
            if key not in cache:
                cache[key] = make_objective(name)
            objective = cache[key]
        except (FileNotFoundError, ImportError) as e:
            return AutofocusResult(setup.sem.working_distance(), tuple(setup.sem.stig()), ok=False,
                                   message=f"{name} unavailable: {e}")
        stop: Optional[float] = opts.get("stop_score")
        nm = NelderMeadAutofocus(setup.sem, setup.guard, objective, name=name,
                                 max_iterations=int(opts.get("nm_iterations", 30)),
                                 stop_score=None if stop is None else float(stop), dwell_s=req.dwell_s,
                                 frame_size=tuple(req.frame_size), pixel_size_m=req.pixel_size_m)
        return _result(nm.run())
    run.__name__ = f"autofocus_{name}"
    return run


def register_all() -> list[str]:
    names = ["mapfost", "deepfocus", *sorted(set(deepfocus_variants()) - {"deepfocus"})]
    for n in names:
        register_autofocus(n, pair_autofocus(n))
    for n in ("sharpness-nm", "deepscore-nm"):
        register_autofocus(n, search_autofocus(n))
    return names + ["sharpness-nm", "deepscore-nm"]
