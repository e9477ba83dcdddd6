"""The wafer layout as an acquisition plan (acq/plan.py), validated the same
way a plan file is (schema, safety windows, writer options), and saved next
to the data so a GUI-built run can be repeated from the command line."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from gui.wafer_model import WaferLayout

# a mill of one slice per cycle on the simulated setup (as configs/plans/demo_wafer.yaml)
DEFAULT_MILL = {"duration_s": 2500, "azimuths": 3, "delay_s": 10, "glancing_angle_deg": 30,
                "raster_vpp": [2.0, 2.0], "ion_energy_kv": 10, "cluster_size": 2000, "current_na": 5,
                "check_interval_s": 10, "on_interrupted": "pause"}


@dataclass
class PlanOptions:
    cycles: int = 1
    autofocus: str = "none"
    writers: list[str] = field(default_factory=lambda: ["ome_tiff"])
    mill: bool = False
    eht_kv: float = 1.5
    probe_current_na: float = 1.8
    qc: bool = True


def plan_dict(layout: WaferLayout, setup_path: Path, opts: PlanOptions) -> dict:
    sections = []
    for sec in layout.ordered_sections():
        grids = [{"id": g.id, "center_um": [round(g.center_um[0], 3), round(g.center_um[1], 3)],
                  "rotation_deg": round(((g.rotation_deg + 180.0) % 360.0) - 180.0, 4), "rows": g.rows,
                  "cols": g.cols, "pixel_size_nm": g.pixel_size_nm, "frame_size": list(g.frame_size),
                  "dwell_ns": g.dwell_ns, "overlap_px": g.overlap_px}
                 for g in sorted(layout.grids_of(sec.id), key=lambda g: g.id)]
        if grids:
            sections.append({"id": sec.id, "grids": grids})
    data = {"setup": str(Path(setup_path).resolve()), "output": {"writers": list(opts.writers)},
            "imaging": {"eht_kv": opts.eht_kv, "probe_current_na": opts.probe_current_na},
            "sections": sections, "order": [s["id"] for s in sections],
            "autofocus": {"method": opts.autofocus}, "cycles": int(opts.cycles),
            "qc": {"enabled": bool(opts.qc)}}
    planned = {s["id"] for s in sections}
    pinned = {sid: [list(p) for p in pts] for sid, pts in layout.af_pinned.items() if sid in planned}
    if pinned:
        data["autofocus"]["pinned"] = pinned
    if layout.af_forbidden:
        data["autofocus"]["forbidden"] = [list(f) for f in layout.af_forbidden]
    if opts.mill:
        data["mill"] = dict(DEFAULT_MILL)
    return data


def build_plan(data: dict, source: str = "GUI plan"):
    """Validated by acq.plan's loader, as a plan file is; raises ConfigError naming the field."""
    from acq.plan import plan_from_data
    from devices.setup_config import ConfigError

    if not data.get("sections"):
        raise ConfigError(f"{source}: no section has a grid: create grids first")
    return plan_from_data(data, source)


def save_plan(data: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# written by the operator GUI\n" + yaml.safe_dump(data, sort_keys=False))
    return path


def load_plan_file(path: Path, setup_path: Optional[Path] = None):
    from acq.plan import load_plan
    return load_plan(path, setup_path)
