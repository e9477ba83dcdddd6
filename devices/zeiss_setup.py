"""Building the SmartSEM drivers from a setup's ``devices.sem`` / ``devices.stage``
options. ``check_options`` runs when the setup file is loaded, so an unknown
key or a bad value fails there, naming ``devices.<role>.options.<key>``.

Options (SI units; every one optional):
  sem:   api ("com" | "sim"), grab_dir, store_table ([[w, h], ...] in SmartSEM's
         index order), dwell_table ([s per scan rate 0, 1, ...]), line_flyback_s,
         timeout_factor, autofocus_timeout_s, eht_runup_timeout_s, focus_settle_s,
         pixel_size_scale (true pixel size / SmartSEM's AP_PIXEL_SIZE, 0.5..2, from
         `devices calibrate-pixel`),
         and the OME instrument fields manufacturer, model, serial_number, detector
  stage: api, backlash_m, settle_s, speed_m_per_s {x, y, z}, speed_deg_per_s {r, t},
         timeout_factor, tolerance_m {x, y, z}, tolerance_deg {r, t}
The setup's ``timeout_s``, when given, is the margin added to each bound.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from devices.calibration import PIXEL_SCALE_RANGE
from devices.zeiss_tables import TimeoutPolicy, parse_dwell_table, parse_store_table

API_KINDS = ("com", "sim")
DEFAULT_MARGIN_S = 5.0
_POLICY_KEYS = {"timeout_factor": "factor", "line_flyback_s": "line_flyback_s",
                "autofocus_timeout_s": "autofocus_s", "eht_runup_timeout_s": "eht_runup_s"}
SEM_OPTIONS = {"api", "grab_dir", "store_table", "dwell_table", "focus_settle_s", *_POLICY_KEYS,
               "pixel_size_scale",
               # instrument description for the OME metadata (acq/writers/ome_tiff.py)
               "manufacturer", "model", "serial_number", "detector"}
STAGE_OPTIONS = {"api", "backlash_m", "settle_s", "speed_m_per_s", "speed_deg_per_s",
                 "timeout_factor", "tolerance_m", "tolerance_deg"}


def _number(options: Mapping, key: str, where: str, *, positive: bool = False) -> float:
    v = options[key]
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
        and (v > 0 if positive else v >= 0)
    if not ok:
        raise ValueError(f"{where}.{key} = {v!r}: allowed a number {'> 0' if positive else '>= 0'}")
    return float(v)


def _axes(options: Mapping, key: str, axes: tuple[str, ...], where: str, scale: float = 1.0,
          positive: bool = True) -> dict[str, float]:
    block = options.get(key) or {}
    if not isinstance(block, Mapping):
        raise ValueError(f"{where}.{key} = {block!r}: allowed a mapping of {', '.join(axes)}")
    out = {}
    for axis in block:
        if axis not in axes:
            raise ValueError(f"{where}.{key}.{axis}: unknown axis; allowed {', '.join(axes)}")
        out[axis] = _number(block, axis, f"{where}.{key}", positive=positive) * scale
    return out


def _common(options: Mapping, allowed: set[str], where: str, timeout_s: float | None) -> dict:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown {', '.join(unknown)}; allowed {', '.join(sorted(allowed))}")
    if options.get("api", "com") not in API_KINDS:
        raise ValueError(f"{where}.api = {options['api']!r}: allowed {' or '.join(API_KINDS)}")
    margin = DEFAULT_MARGIN_S if timeout_s is None else timeout_s
    policy = {"margin_s": margin}
    for key, field in _POLICY_KEYS.items():
        if key in options and key in allowed:
            policy[field] = _number(options, key, where, positive=True)
    return {"policy": TimeoutPolicy(**policy), "timeout_s": margin}


def sem_kwargs(options: Mapping, timeout_s: float | None = None) -> dict[str, Any]:
    where = "devices.sem.options"
    kw = _common(options, SEM_OPTIONS, where, timeout_s)
    for key, parse in (("store_table", parse_store_table), ("dwell_table", parse_dwell_table)):
        if key in options:
            try:
                kw[key] = parse(options[key])
            except ValueError as e:
                raise ValueError(f"{where}.{key}: {e}") from None
    if "grab_dir" in options:
        if not isinstance(options["grab_dir"], str) or not options["grab_dir"]:
            raise ValueError(f"{where}.grab_dir = {options['grab_dir']!r}: allowed a folder path "
                             "that SmartSEM's host and this program both see")
        kw["image_dir"] = options["grab_dir"]
    if "focus_settle_s" in options:
        kw["focus_settle_s"] = _number(options, "focus_settle_s", where)
    if "pixel_size_scale" in options:
        lo, hi = PIXEL_SCALE_RANGE
        v = options["pixel_size_scale"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise ValueError(f"{where}.pixel_size_scale = {v!r}: allowed a number in {lo:g}..{hi:g} "
                             "(true pixel size / SmartSEM's; see `devices calibrate-pixel`)")
        kw["pixel_size_scale"] = float(v)
    return kw


def stage_kwargs(options: Mapping, timeout_s: float | None = None) -> dict[str, Any]:
    where = "devices.stage.options"
    kw = _common(options, STAGE_OPTIONS, where, timeout_s)
    for key in ("backlash_m", "settle_s"):
        if key in options:
            kw[key] = _number(options, key, where)
    speed = _axes(options, "speed_m_per_s", ("x", "y", "z"), where)
    speed |= _axes(options, "speed_deg_per_s", ("r", "t"), where, math.pi / 180)
    tol = _axes(options, "tolerance_m", ("x", "y", "z"), where)
    tol |= _axes(options, "tolerance_deg", ("r", "t"), where, math.pi / 180)
    kw["speed"], kw["tolerance"] = speed or None, tol or None
    return kw


def check_options(role: str, options: Mapping) -> None:
    """ValueError naming the option when a setup's Zeiss options are wrong."""
    (sem_kwargs if role == "sem" else stage_kwargs)(options)


def make_api(options: Mapping, *, clock=None, world=None):
    """``options.api``: "com" (default: win32com, Windows) or "sim" (the fake
    devices/sim/smartsem_api.py, on the setup's clock and simulated world)."""
    from devices.zeiss_smartsem import SmartSEMApi
    kind = options.get("api", "com")
    if kind == "com":
        return SmartSEMApi()
    if kind == "sim":
        from devices.sim.smartsem_api import SimEMApi
        return SmartSEMApi(SimEMApi(clock=clock, world=world))
    raise ValueError(f"options.api = {kind!r}: allowed {' or '.join(API_KINDS)}")


def build_sem(api, options: Mapping, *, timeout_s: float | None, clock):
    from devices.zeiss_smartsem import ZeissSEM
    return ZeissSEM(api, clock=clock, **sem_kwargs(options, timeout_s))


def build_stage(api, options: Mapping, *, timeout_s: float | None, clock):
    from devices.zeiss_smartsem import ZeissStage
    return ZeissStage(api, clock=clock, **stage_kwargs(options, timeout_s))
