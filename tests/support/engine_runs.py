"""Tiny simulated runs: a setup with a textured specimen, a two-section plan,
an engine (test_engine and the safety, resume and crash tests use them)."""
from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import yaml

from tests.support import ROOT


def texture(path: Path) -> Path:
    """Three EM-like slices (cells with dark membranes, grain): structure for autofocus and QC."""
    if path.exists():
        return path
    import tifffile
    rng = np.random.default_rng(7)
    slices = []
    for _ in range(3):
        cells = cv2.GaussianBlur(rng.normal(size=(384, 384)).astype(np.float32), (0, 0), 9)
        membranes = np.exp(-(cells / (0.15 * cells.std())) ** 2)
        grain = cv2.GaussianBlur(rng.normal(size=(384, 384)).astype(np.float32), (0, 0), 1.5)
        img = 150 - 110 * membranes + 25 * grain / grain.std()
        slices.append(np.clip(img, 0, 255).astype(np.uint8))
    tifffile.imwrite(str(path), np.stack(slices))
    return path


def write_setup(tmp: Path, sections: int = 2, faults=(), name: str = "setup.yaml", **sim) -> Path:
    d = yaml.safe_load((ROOT / "configs" / "sim.yaml").read_text())
    dev = d["devices"]
    dev["ion_gun"]["command_table"] = str(ROOT / "configs" / "iongun" / "ionoptika_sim.yaml")
    dev["ion_gun"]["timeout_s"] = 0.3
    for role in ("waveform_generator", "multimeter"):
        dev[role]["visa_library"] = str(ROOT / "configs" / "visa" / "sim_instruments.yaml") + "@sim"
    d["simulation"]["specimen"] = {"images": [str(texture(tmp / "texture.tif"))], "slice_thickness_nm": 50.0}
    d["simulation"]["wafer"]["sections"] = sections
    d["simulation"]["faults"] = [dict(f) for f in faults]
    d["simulation"].update(sim)
    path = tmp / name
    path.write_text(yaml.safe_dump(d))
    return path


TINY = {
    "output": {"writers": ["ome_tiff"], "queue_maxsize": 4},
    "sections_from": "wafer_truth",
    "grid_template": {"rows": 1, "cols": 2, "pixel_size_nm": 10, "frame_size": [256, 192], "dwell_ns": 100,
                      "overlap_px": 16, "rotation_deg": 0},
    "autofocus": {"method": "none"},
    "irradiation": {"target_dose_1e27_ev_cm3": 0.5, "area_um2": 100, "thickness_nm": 250,
                    "max_duration_s": 600},
    "mill": {"duration_s": 60, "azimuths": 3, "delay_s": 10, "glancing_angle_deg": 30, "raster_vpp": [2.0, 2.0],
             "ion_energy_kv": 10, "cluster_size": 2000, "current_na": 5, "check_interval_s": 10},
    "cycles": 2,
    "retries": {"backoff_s": 0.0},
    "suspenders": {"poll_s": 5, "max_suspend_s": 600},
}


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def write_plan(tmp: Path, setup_file: Path, name: str = "plan.yaml", **over) -> Path:
    d = merge({"setup": str(setup_file), **TINY}, over)
    path = tmp / name
    path.write_text(yaml.safe_dump(d))
    return path


def make_engine(tmp: Path, plan_over: dict | None = None, setup_kw: dict | None = None, out: str = "out",
                **engine_kw):
    """(engine, setup, docs) for a tiny plan; the caller closes the setup."""
    from acq.engine import Engine
    from acq.plan import load_plan
    from devices.factory import build_setup
    setup_path = write_setup(tmp, **(setup_kw or {}))
    plan = load_plan(write_plan(tmp, setup_path, **(plan_over or {})))
    setup = build_setup(plan.setup_config)
    docs: list = []
    engine = Engine(setup, plan, tmp / out, subscribers=[docs.append], **engine_kw)
    return engine, setup, docs


def planned_tiles(engine) -> set[str]:
    from acq.events import AcquireTile
    from acq.expand import expand
    return {e.tile_id for e in expand(engine.plan, engine.setup) if isinstance(e, AcquireTile)}


def done_counts(out: Path) -> Counter:
    from acq.journal import read_records
    return Counter(r["key"] for r in read_records(out) if r["rec"] == "tile_done")


def records(out: Path, kind: str) -> list[dict]:
    from acq.journal import read_records
    return [r for r in read_records(out) if r["rec"] == kind]
