"""What a resumed run must share with the run it continues.

A new run writes OUTDIR/fingerprint.json: a hash per component of what
defines its tiles and mills, plus the tile centres (to say which moved).
``--resume`` recomputes it from the plan and setup given and refuses any
difference, naming it. Components marked overridable can be changed on
purpose with ``--accept-change NAME`` (journaled, and appended to
fingerprint_changes.jsonl so the next resume compares with the new value);
the others never: a different wafer, grid, mill dose or irradiation dose
would make the output a mix of two runs.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Optional

from common.atomic import atomic_write
from acq.expand import expand_tiles
from devices.setup_config import ConfigError

FINGERPRINT = "fingerprint.json"
CHANGES = "fingerprint_changes.jsonl"
# safe to change mid-run: they decide how tiles are written, focused or paced, not which
OVERRIDABLE = {
    "writers": "output.writers and output.options",
    "autofocus": "the autofocus step",
    "step": "mill/irradiation step parameters (raster_hz, check_interval_s, delay_s, current_tolerance, "
            "on_interrupted, sample_interval_s, max_duration_s)",
    "imaging": "imaging EHT, probe current and start working distance",
}
FIXED = {
    "tiles": "tile ids and stage positions (sections, grids, overview, stage-to-image rotation)",
    "cycles": "cycles and section order",
    "mill": "the mill dose (duration, azimuths, angle, raster amplitude, ion energy, cluster size, current, "
            "mill position, raster calibration)",
    "irradiation": "the irradiation dose (target, area, thickness, EHT, current)",
}
_MILL_STEP = ("raster_hz", "check_interval_s", "delay_s", "current_tolerance", "on_interrupted")
_IRR_STEP = ("sample_interval_s", "max_duration_s")


def _h(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
                          ).hexdigest()[:16]


_POS_TOL_UM, _ROT_TOL_DEG = 0.05, 1e-4      # float noise of another machine's libm stays far below


def _tiles(plan, setup, sections) -> list[list]:
    """[id, x µm, y µm, frame, pixel nm, dwell ns, rotation deg] per tile."""
    return [[ev.tile_id, ev.center_um[0], ev.center_um[1], list(ev.frame_size), ev.pixel_size_nm, ev.dwell_ns,
             ev.rotation_deg] for ev in expand_tiles(plan, setup, sections)]


def _exact(tiles: list) -> list:
    """What must match exactly (positions and rotations are compared with a tolerance)."""
    return [[t[0], *t[3:6]] for t in tiles]


def compute(plan, setup, sections) -> dict:
    p = plan.model_dump(mode="json")
    cfg = setup.config
    mill = p.get("mill") or {}
    irr = p.get("irradiation") or {}
    tiles = _tiles(plan, setup, sections)
    parts = {
        "tiles": _h([_exact(tiles), cfg.calibration.stage_to_image_rotation_deg]),
        "cycles": _h([p["cycles"], p["order"]]),
        "mill": _h([{k: v for k, v in mill.items() if k not in _MILL_STEP},
                    cfg.safety.mill_position.model_dump(mode="json") if mill else None,
                    list(cfg.calibration.ion_raster_mm_per_vpp) if mill else None]),
        "irradiation": _h({k: v for k, v in irr.items() if k not in _IRR_STEP}),
        "writers": _h(p["output"]),
        "autofocus": _h(p["autofocus"]),
        "step": _h([{k: mill.get(k) for k in _MILL_STEP}, {k: irr.get(k) for k in _IRR_STEP}]),
        "imaging": _h(p["imaging"]),
    }
    return {"parts": parts, "tiles": tiles, "setup": str(cfg.source or ""), "plan": str(plan.source or "")}


def write_new(out_dir: Path, fp: dict) -> None:
    atomic_write(Path(out_dir) / FINGERPRINT, json.dumps(fp, separators=(",", ":")).encode())


def recorded(out_dir: Path) -> Optional[dict]:
    """The fingerprint the run has now (original plus accepted changes), or None."""
    path = Path(out_dir) / FINGERPRINT
    if not path.exists():
        return None
    try:
        fp = json.loads(path.read_text())
        parts = dict(fp["parts"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: unreadable ({e}); it records what the run images and cannot be rebuilt: "
                          "restore it from a backup") from None
    changes = Path(out_dir) / CHANGES
    if changes.exists():
        for n, line in enumerate(changes.read_text().splitlines(), 1):
            try:
                parts.update(json.loads(line)["parts"])
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"{changes}: line {n} unreadable; restore it or remove the line") from None
    fp["parts"] = parts
    return fp


def _moved(old: list, new: list) -> str:
    a = {t[0]: t for t in old}
    b = {t[0]: t for t in new}
    gone, added = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    worst, n = ("", 0.0), 0
    for tid in sorted(set(a) & set(b)):
        d = math.hypot(a[tid][1] - b[tid][1], a[tid][2] - b[tid][2])
        if d > _POS_TOL_UM or abs(a[tid][6] - b[tid][6]) > _ROT_TOL_DEG or a[tid][3:6] != b[tid][3:6]:
            n += 1
            worst = max(worst, (tid, d), key=lambda w: w[1]) if worst[0] else (tid, d)
    bits = []
    if n:
        bits.append(f"{n} tiles moved or changed (tile {worst[0]} by {worst[1]:.1f} µm)")
    if gone:
        bits.append(f"{len(gone)} tiles no longer planned (e.g. {gone[0]})")
    if added:
        bits.append(f"{len(added)} new tiles (e.g. {added[0]})")
    return "; ".join(bits)


def check_resume(out_dir: Path, new: dict, accept: set[str]) -> Optional[dict]:
    """Compare with the recorded fingerprint. Returns the accepted changes
    ({part: new hash}), or None when the run has no fingerprint (started
    before fingerprints); raises ConfigError naming what differs otherwise."""
    unknown = accept - set(OVERRIDABLE)
    if unknown:
        raise ConfigError(f"--accept-change {', '.join(sorted(unknown))}: allowed {', '.join(sorted(OVERRIDABLE))} "
                          f"(never: {', '.join(sorted(FIXED))})")
    old = recorded(out_dir)
    if old is None:
        return None
    diff = [k for k, v in new["parts"].items() if old["parts"].get(k) != v]
    if "tiles" not in diff and _moved(old.get("tiles", []), new["tiles"]):
        diff.append("tiles")                     # same ids and geometry, other stage positions
    fixed = [k for k in diff if k in FIXED]
    if fixed:
        what = []
        for k in fixed:
            detail = _moved(old.get("tiles", []), new["tiles"]) if k == "tiles" else ""
            what.append(f"{k} ({FIXED[k]}{': ' + detail if detail else ''})")
        raise ConfigError(f"--resume {out_dir}: the plan and setup define a different run: {'; '.join(what)} "
                          f"changed (recorded from {old.get('plan')} with {old.get('setup')}). Resume with the "
                          "same plan and setup; these cannot be overridden")
    refused = [k for k in diff if k not in accept]
    if refused:
        raise ConfigError(f"--resume {out_dir}: {', '.join(f'{k} ({OVERRIDABLE[k]})' for k in refused)} changed "
                          "since the run started; resume with the same plan, or accept the change with "
                          f"--accept-change {','.join(refused)}")
    return {k: new["parts"][k] for k in diff}


def record_changes(out_dir: Path, accepted: dict) -> None:
    if not accepted:
        return
    from acq.writers.manifest import append_durably
    line = json.dumps({"parts": accepted, "t": time.time()}) + "\n"
    append_durably(Path(out_dir) / CHANGES, line.encode())
