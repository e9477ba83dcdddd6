"""Acquisition plans: validation at load (field, value, what is allowed;
nothing written) and expansion into events."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from tests.support import ROOT
from tests.support.engine_runs import records, write_plan, write_setup


DEMO = ROOT / "configs" / "plans" / "demo_wafer.yaml"


@pytest.fixture
def setup_file(tmp_path):
    return write_setup(tmp_path)


def run_bad(tmp_path, plan_path, capsys, **kw) -> str:
    """run_plan must refuse with exit 2 and create nothing."""
    from acq.cli import run_plan
    out = tmp_path / "never"
    code = run_plan(plan_path, out=out, **kw)
    err = capsys.readouterr().err
    assert code == 2, err
    assert not out.exists(), "OUTDIR was created for a bad plan"
    return err


EXPLICIT = {"sections_from": None, "grid_template": None,
            "sections": [{"id": 3, "grids": [{"id": 0, "center_um": [100.0, -200.0], "rows": 2, "cols": 3,
                                              "pixel_size_nm": 10, "frame_size": [256, 192], "dwell_ns": 100,
                                              "overlap_px": 16, "rotation_deg": 0}]}]}


@pytest.mark.parametrize("over,field,allowed", [
    ({"milll": {"duration_s": 5}}, "milll", "unknown key"),
    ({"mill": {"duraton_s": 5}}, "mill.duraton_s", "unknown key"),
    ({"mill": {"raster_vpp": [25.0, 5.0]}}, "mill.raster_vpp.0 = 25.0", "[0, 20] Vpp"),
    ({"mill": {"ion_energy_kv": 12}}, "mill.ion_energy_kv = 12", "[0, 10] kV"),
    ({"mill": {"glancing_angle_deg": 75}}, "mill.glancing_angle_deg = 75", "[0, 60] deg"),
    ({"imaging": {"wd_mm": 12}}, "imaging.wd_mm = 12", "[3, 8] mm"),
    ({"grid_template": {"dwell_ns": 5}}, "grid_template.dwell_ns = 5", "greater than or equal to 10"),
    ({"cycles": 0}, "cycles", "1..100000"),
    ({"cycles": "three"}, "cycles", "valid integer"),
    ({"grid_template": {"rows": "two"}}, "grid_template.rows = 'two'", "valid integer"),
    ({"autofocus": {"method": "magic"}}, "autofocus.method = 'magic'", "unknown autofocus method 'magic': allowed"),
    ({"output": {"writers": ["ome_tiff", "bogus"]}}, "output.writers", "unknown writers ['bogus']"),
    ({"setup": "nowhere/setup.yaml"}, "setup = 'nowhere/setup.yaml'", "does not exist"),
])
def test_bad_plans_name_the_field_and_write_nothing(tmp_path, setup_file, capsys, monkeypatch, over, field,
                                                    allowed):
    plan = write_plan(tmp_path, setup_file, **over)
    err = run_bad(tmp_path, plan, capsys)
    assert field in err and allowed in err, err


def test_tile_outside_the_stage_travel_is_refused(tmp_path, setup_file, capsys):
    over = dict(EXPLICIT)
    over["sections"] = [{"id": 1, "grids": [dict(EXPLICIT["sections"][0]["grids"][0], center_um=[14999.0, 0.0])]}]
    err = run_bad(tmp_path, write_plan(tmp_path, setup_file, **over), capsys)
    assert "sections[id=1].grids[id=0] tile r0 c2: x_um = 15001.4" in err
    assert "allowed [-15000, 15000] µm (safety.stage.x_mm)" in err


def test_tile_at_the_mill_position_is_refused(tmp_path, setup_file, capsys):
    over = dict(EXPLICIT)
    over["sections"] = [{"id": 1, "grids": [dict(EXPLICIT["sections"][0]["grids"][0], center_um=[12800.0, 0.0])]}]
    err = run_bad(tmp_path, write_plan(tmp_path, setup_file, **over), capsys)
    assert "imaging_exclusion_mm" in err and "not allowed for imaging" in err


def test_missing_files_and_bad_arguments(tmp_path, setup_file, capsys):
    from acq.cli import run_plan
    assert "plan file does not exist" in run_bad(tmp_path, tmp_path / "missing.yaml", capsys)
    plan = write_plan(tmp_path, setup_file)
    assert "--config: setup file" in run_bad(tmp_path, plan, capsys, config=tmp_path / "nope.yaml")
    assert run_plan(plan) == 2 and "exactly one of --out" in capsys.readouterr().err
    assert run_plan(plan, out=tmp_path / "a", resume=tmp_path / "b") == 2
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("keep me")
    assert run_plan(plan, out=full) == 2 and "not empty" in capsys.readouterr().err
    assert run_plan(plan, resume=tmp_path / "empty") == 2 and "nothing to resume" in capsys.readouterr().err
    assert (full / "x").read_text() == "keep me"


def test_yaml_errors_and_non_mappings(tmp_path, capsys):
    p = tmp_path / "p.yaml"
    p.write_text("setup: [unclosed\n")
    assert "not valid YAML" in run_bad(tmp_path, p, capsys)
    p.write_text("- just\n- a list\n")
    assert "expected a mapping" in run_bad(tmp_path, p, capsys)


# ------------------------------------------------------------------ expansion
def test_demo_plan_loads_and_expands_as_documented():
    from acq.events import AcquireTile, Autofocus, CycleEnd, Irradiate, Mill, MoveStage
    from acq.expand import expand
    from acq.plan import load_plan
    from devices.factory import build_setup
    plan = load_plan(DEMO)
    assert plan.grid_template.frame_size == (1024, 768) and plan.grid_template.dwell_ns == 200
    setup = build_setup(plan.setup_config)
    try:
        events = list(expand(plan, setup))
    finally:
        setup.close()
    kinds = Counter(type(e).__name__ for e in events)
    assert kinds["Mill"] == 3 and kinds["CycleEnd"] == 3 and kinds["Irradiate"] == 4
    assert kinds["AcquireTile"] == 3 * 4 * 4 and kinds["Autofocus"] == 3 * 4
    first_mill = next(i for i, e in enumerate(events) if isinstance(e, Mill))
    assert all(i < first_mill for i, e in enumerate(events) if isinstance(e, Irradiate))
    for i, e in enumerate(events):                  # every tile and autofocus is preceded by its move
        if isinstance(e, (AcquireTile, Autofocus, Irradiate)):
            assert isinstance(events[i - 1], MoveStage) and events[i - 1].for_key == e.key
    assert events[-1] == CycleEnd(key="cycle:c0002", cycle=2, last=True)
    ids = [e.tile_id for e in events if isinstance(e, AcquireTile)]
    assert len(set(ids)) == len(ids) and ids[0] == "c0000_s0000_g00_r000_c000"


def test_grid_geometry_and_autofocus_schedule(tmp_path, setup_file):
    from acq.events import AcquireTile, Autofocus
    from acq.expand import expand
    from acq.plan import load_plan
    grid = dict(EXPLICIT["sections"][0]["grids"][0], rotation_deg=90)
    plan = load_plan(write_plan(tmp_path, setup_file, irradiation=None, mill=None, cycles=4,
                                sections=[{"id": 3, "grids": [grid, dict(grid, id=1, center_um=[900.0, 0.0])]}],
                                sections_from=None, grid_template=None,
                                autofocus={"method": "sweep", "where": "per_grid", "every_n_cycles": 2}))
    events = list(expand(plan, setup=None))
    tiles = [e for e in events if isinstance(e, AcquireTile) and e.cycle == 0 and e.grid == 0]
    assert len(tiles) == 6
    step_x = (256 - 16) * 0.01                     # µm between tile centres along the grid's x
    t00 = next(t for t in tiles if (t.row, t.col) == (0, 0))
    t01 = next(t for t in tiles if (t.row, t.col) == (0, 1))
    # rotated by 90°: the grid's x runs along the stage's y
    assert t01.center_um[0] - t00.center_um[0] == pytest.approx(0, abs=1e-9)
    assert t01.center_um[1] - t00.center_um[1] == pytest.approx(step_x)
    cx = sum(t.center_um[0] for t in tiles) / 6
    assert cx == pytest.approx(100.0) and sum(t.center_um[1] for t in tiles) / 6 == pytest.approx(-200.0)
    af = [e for e in events if isinstance(e, Autofocus)]
    assert sorted({e.cycle for e in af}) == [0, 2] and len(af) == 4        # per grid, every 2nd cycle
    assert all(len(e.tile_keys) == 6 for e in af)


def test_stop_rules_give_the_cycle_count_and_exhaustion_ends_the_run(tmp_path, setup_file):
    from acq.events import Mill, SectionEnd
    from acq.expand import ExpansionState, expand
    from acq.plan import load_plan
    from acq.steps_mill import estimated_depth_per_cycle_nm
    plan = load_plan(write_plan(tmp_path, setup_file, **EXPLICIT,
                                cycles={"target_depth_nm": 240, "section_exhausted": True}))
    per = estimated_depth_per_cycle_nm(plan)
    assert plan.n_cycles() == math.ceil(240 / per)
    # Table 2.1 at 0.5e27 eV/cm³: 1.948e-8 m³/C * 5 nA / (2.2 mm)² * 60 s
    assert per == pytest.approx(1.948e-8 * 5e-9 / (2.2e-3) ** 2 * 60 * 1e9)
    state = ExpansionState()
    seen = []
    for ev in expand(plan, None, state=state):
        seen.append(ev)
        if isinstance(ev, SectionEnd) and ev.cycle == 1:
            state.exhausted.add(3)                # the engine found the wafer in cycle 1
    assert sum(isinstance(e, Mill) for e in seen) == 1            # mill after cycle 0 only
    assert max(e.cycle for e in seen if hasattr(e, "cycle")) == 1


def test_order_lists_and_unique_ids(tmp_path, setup_file, capsys):
    two = [dict(EXPLICIT["sections"][0], id=3), dict(EXPLICIT["sections"][0], id=5)]
    err = run_bad(tmp_path, write_plan(tmp_path, setup_file, sections=two, sections_from=None,
                                       grid_template=None, order=[5, 7]), capsys)
    assert "order" in err and "each id at most once, all from the sections [3, 5]" in err
    err = run_bad(tmp_path, write_plan(tmp_path, setup_file, sections=[two[0], two[0]], sections_from=None,
                                       grid_template=None), capsys)
    assert "section ids must be unique" in err


def test_plan_file_relative_setup_path(tmp_path):
    from acq.plan import load_plan
    plan_dir = tmp_path / "plans"
    plan_dir.mkdir()
    setup = write_setup(tmp_path)
    d = yaml.safe_load(write_plan(tmp_path, setup).read_text())
    d["setup"] = "../setup.yaml"
    (plan_dir / "p.yaml").write_text(yaml.safe_dump(d))
    assert load_plan(plan_dir / "p.yaml").setup == Path(setup).resolve()


def test_section_exhausted_ends_the_run_once_the_wafer_shows(run_tiny):
    """A fast mill (simulated rate) cuts through the 250 nm sections in one
    cycle: the next images show bare wafer, the cycle after confirms it, the
    sections drop out and the run ends without milling again."""
    engine, setup, docs, res = run_tiny(
        plan_over={"irradiation": None, "cycles": {"section_exhausted": True, "max_cycles": 6}},
        setup_kw={"mill_rate_nm_per_s_per_na": 1.0})
    assert res.status == "success", res.reason
    exhausted = [d for d in docs if d.kind == "incident" and d.cause == "section_exhausted"]
    assert sorted(d.context["section"] for d in exhausted) == [0, 1]
    assert {d.context["cycle"] for d in exhausted} == {2}
    assert len(records(engine.out_dir, "mill_done")) == 2            # no mill after it was confirmed
    assert max(d.cycle for d in docs if d.kind == "tile") == 2


def test_an_exhausted_section_is_skipped_while_the_others_go_on(run_tiny):
    """The ion beam's raster lies over section 0 only: it is cut through by the first
    mill, found so in cycles 1 and 2, reported, and not imaged again; section 1,
    never milled, is imaged in all four cycles. The procedural neuropil: the tiny
    runs' three-slice texture has too little contrast in 64 px blocks to tell
    tissue from wafer at 10 nm."""
    def mill_section_0_only(engine, setup):
        wafer = setup.world.wafer
        mill = wafer.mill
        wafer.mill = lambda depth, region=None: mill(np.array([depth, 0.0]), region=region)
    engine, setup, docs, res = run_tiny(
        plan_over={"irradiation": None, "cycles": {"section_exhausted": True, "max_cycles": 4}},
        setup_kw={"mill_rate_nm_per_s_per_na": 1.0, "specimen": {"images": [], "slice_thickness_nm": 50.0, "seed": 0}},
        before=mill_section_0_only)
    assert res.status == "success", res.reason
    exhausted = [d for d in docs if d.kind == "incident" and d.cause == "section_exhausted"]
    assert [(d.context["section"], d.context["cycle"]) for d in exhausted] == [(0, 2)]
    cycles = {k: sorted({d.cycle for d in docs if d.kind == "tile" and d.section_id == k}) for k in (0, 1)}
    assert cycles == {0: [0, 1, 2], 1: [0, 1, 2, 3]}


def test_one_flat_cycle_does_not_end_a_section(run_tiny):
    """Every frame of cycle 1 comes back without tissue contrast (far out of focus; a
    stage offset onto bare wafer looks the same), nothing is milled: no section is
    given up, and both are imaged in every cycle."""
    def flat_cycle_1(engine, setup):
        setup.world.wafer.mill = lambda depth, region=None: None
        cycle = [0]
        engine.on_step(lambda ev: cycle.__setitem__(0, getattr(ev, "cycle", cycle[0])))
        grab = setup.sem.acquire_frame

        def acquire_frame():
            frame = grab()
            if cycle[0] == 1:                        # far out of focus, the detector's noise left
                blurred = cv2.GaussianBlur(frame.image.astype(np.float32), (0, 0), 40)
                noise = np.random.default_rng(len(cycle)).normal(0, 3, blurred.shape)
                cycle.append(0)
                frame.image[:] = np.clip(blurred + noise, 0, 255).astype(np.uint8)
            return frame
        setup.sem.acquire_frame = acquire_frame
    engine, setup, docs, res = run_tiny(
        plan_over={"irradiation": None, "cycles": {"section_exhausted": True, "max_cycles": 4}},
        setup_kw={"specimen": {"images": [], "slice_thickness_nm": 50.0, "seed": 0}}, before=flat_cycle_1)
    assert res.status == "success", res.reason
    tiles = [d for d in docs if d.kind == "tile"]
    assert min(d.qc["flat_fraction"] for d in tiles if d.cycle == 1) >= 0.9          # the bad cycle was seen
    assert not [d for d in docs if d.kind == "incident" and d.cause == "section_exhausted"]
    assert {k: sorted({d.cycle for d in tiles if d.section_id == k}) for k in (0, 1)} == {0: [0, 1, 2, 3],
                                                                                          1: [0, 1, 2, 3]}


def test_a_plan_needs_sections_or_an_overview(tmp_path, setup_file, capsys):
    err = run_bad(tmp_path, write_plan(tmp_path, setup_file, sections_from=None, grid_template=None), capsys)
    assert "give sections (a list), sections_from: wafer_truth, or an overview" in err
