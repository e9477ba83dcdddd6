"""Focus that follows each section: memory across cycles, a focus map per
tile, autofocus spots that move between cycles, pinned and forbidden spots."""
from __future__ import annotations

import math
from collections import defaultdict

import pytest
import yaml

from acq.section_focus import choose_spots, focus_at, pinned_spots
from tests.support.engine_runs import records, write_plan, write_setup

NO_MILL = {"irradiation": None, "mill": None}


def tilted_setup(tmp_path):
    """Two sections ~0.8 mm apart on a wafer tilted 10 µm/mm: their focus
    differs by several µm, more than a sweep's error."""
    path = write_setup(tmp_path)
    d = yaml.safe_load(path.read_text())
    d["simulation"]["wafer"]["tilt_um_per_mm"] = [10.0, 0.0]
    path.write_text(yaml.safe_dump(d))
    return path


def run(tmp_path, autofocus: dict, cycles: int, grid=None, out="out"):
    from acq.engine import Engine
    from acq.plan import load_plan
    from devices.factory import build_setup
    setup_path = tilted_setup(tmp_path)
    over = dict(NO_MILL, cycles=cycles, autofocus=dict({"method": "sweep", "sweep_range_um": 20,
                                                       "frame_size": [128, 128]}, **autofocus))
    if grid:
        over["grid_template"] = dict(yaml.safe_load(write_plan(tmp_path, setup_path).read_text())["grid_template"],
                                     **grid)
    plan = load_plan(write_plan(tmp_path, setup_path, **over))
    setup = build_setup(plan.setup_config)
    docs: list = []
    try:
        res = Engine(setup, plan, tmp_path / out, subscribers=[docs.append], on_pause="stop").run()
    finally:
        setup.close()
    assert res.status == "success", res.reason
    tiles = [d for d in docs if d.kind == "tile"]
    return tmp_path / out, tiles


def wd_by(tiles, cycle):
    out = defaultdict(list)
    for t in tiles:
        if t.cycle == cycle:
            out[t.section_id].append(t.wd_m)
    return out


def test_each_section_starts_the_next_cycle_from_its_own_focus(tmp_path):
    """Autofocus every second cycle: in cycle 1 (no autofocus) each section
    is imaged at the focus it ended cycle 0 with, not at the focus the
    previous section left."""
    out, tiles = run(tmp_path, {"every_n_cycles": 2}, cycles=2)
    c0, c1 = wd_by(tiles, 0), wd_by(tiles, 1)
    assert abs(c0[0][-1] - c0[1][-1]) > 2e-6          # the sections do differ in focus
    for s in (0, 1):
        assert c1[s] == pytest.approx([c0[s][-1]] * len(c1[s]), abs=1e-9)
    done = {r["section"]: r for r in records(out, "section_done") if r["cycle"] == 0}
    assert done[0]["focus"][0][2] == pytest.approx(c0[0][-1], abs=1e-9)


def test_without_memory_the_focus_carries_over_from_the_previous_section(tmp_path):
    _, tiles = run(tmp_path, {"every_n_cycles": 2, "memory": "none"}, cycles=2)
    c0, c1 = wd_by(tiles, 0), wd_by(tiles, 1)
    assert c1[0][0] == pytest.approx(c0[1][-1], abs=1e-9)      # section 0 inherits section 1's focus


def test_focus_map_gives_every_tile_the_plane_value(tmp_path):
    """Three autofocus spots per section, spread over a 3x3 grid; every tile's
    wd/stig is the plane through them at its centre (inside their span)."""
    out, tiles = run(tmp_path, {"points": 3, "frame_size": [64, 64]}, cycles=1,
                     grid={"rows": 3, "cols": 3, "frame_size": [256, 256]})
    af = defaultdict(list)
    for r in records(out, "autofocus_done"):
        af[r["section"]].append([*r["center_um"], r["wd_m"], *r["stig"]])
    for s, rows in af.items():
        assert len(rows) == 3 and len({(r[0], r[1]) for r in rows}) == 3
        lo, hi = min(r[2] for r in rows), max(r[2] for r in rows)
        for t in (t for t in tiles if t.section_id == s):
            wd, stig = focus_at(rows, *t.target_um)
            assert t.wd_m == pytest.approx(wd, abs=1e-9)
            assert t.stig == pytest.approx(stig, abs=1e-6)
            assert lo - 1e-12 <= t.wd_m <= hi + 1e-12


def test_autofocus_spots_move_between_consecutive_cycles(tmp_path):
    out, _ = run(tmp_path, {}, cycles=3, grid={"rows": 2, "cols": 2})
    spots = {(r["section"], r["cycle"]): r["center_um"] for r in records(out, "autofocus_done")}
    radius = 0.5 * math.hypot(128, 128) * 10e-3           # the 128² autofocus frame at 10 nm, µm
    for s in (0, 1):
        for c in (0, 1):
            assert math.dist(spots[(s, c)], spots[(s, c + 1)]) >= 2 * radius, (s, c)
    nxt = {r["section"]: r["af_next"]["section"][0] for r in records(out, "section_done") if r["cycle"] == 1}
    assert all(spots[(s, 2)] == pytest.approx(nxt[s]) for s in (0, 1))      # as journaled for the restart


def test_pinned_spots_are_used_and_a_forbidden_pin_is_refused(tmp_path, capsys):
    from acq.cli import run_plan
    from acq.plan import load_plan
    from devices.factory import build_setup
    from acq.expand import resolve_sections
    setup_path = tilted_setup(tmp_path)
    plan = load_plan(write_plan(tmp_path, setup_path, **NO_MILL))
    setup = build_setup(plan.setup_config)
    try:
        centre = resolve_sections(plan, setup)[0].grids[0].center_um
    finally:
        setup.close()
    pin = [centre[0] + 1.0, centre[1] - 0.5]
    out, _ = run(tmp_path, {"pinned": {0: [pin]}}, cycles=2)
    assert [r["center_um"] for r in records(out, "autofocus_done") if r["section"] == 0] == [pin, pin]
    bad = write_plan(tmp_path, setup_path, name="bad.yaml", **NO_MILL,
                     autofocus={"method": "sweep", "pinned": {0: [pin]}, "forbidden": [[*pin, 2.0]]})
    assert run_plan(bad, out=tmp_path / "never") == 2
    assert "autofocus.pinned.0" in capsys.readouterr().err and not (tmp_path / "never").exists()


def test_spot_choice_avoids_low_texture_forbidden_and_the_previous_spot():
    cands = [(0.0, 0.0), (10.0, 0.0), (20.0, 0.0), (30.0, 0.0)]
    tex = {(0.0, 0.0): 0.30, (10.0, 0.0): 0.02, (20.0, 0.0): 0.25, (30.0, 0.0): 0.28}
    # (10, 0) is resin-like (below half the median), (0, 0) was used last, (30, 0) is forbidden
    assert choose_spots(cands, 1, (15.0, 0.0), 2.0, tex, previous=[(0.0, 0.0)],
                        forbidden=[(30.0, 0.0, 1.0)]) == [(20.0, 0.0)]
    # three spots for a plane: the best textured first, then spread out
    assert choose_spots(cands, 3, (15.0, 0.0), 2.0, tex) == [(0.0, 0.0), (30.0, 0.0), (20.0, 0.0)]
    # first cycle (no texture): the spot nearest the centre
    assert choose_spots(cands, 1, (12.0, 1.0), 2.0) == [(10.0, 0.0)]
    assert pinned_spots([(1, 1), (2, 2), (3, 3)], 1, cycle=4) == [(2, 2)]


def test_focus_map_never_extrapolates_past_what_the_points_measured():
    rows = [[0, 0, 4.000e-3, 0.0, 0.0], [100, 0, 4.010e-3, 1.0, 0.0], [0, 100, 4.000e-3, 0.0, -1.0]]
    wd, stig = focus_at(rows, 50, 0)
    assert wd == pytest.approx(4.005e-3) and stig == pytest.approx((0.5, 0.0))
    wd, stig = focus_at(rows, 10_000, -10_000)        # far outside: held inside the measured span
    assert wd == pytest.approx(4.010e-3) and stig == pytest.approx((1.0, 0.0))


def test_section_focus_survives_the_cycle_and_a_journal_snapshot():
    from acq.journal_state import JournalState, apply
    st = JournalState()
    apply(st, {"rec": "section_done", "key": "sec:c0000_s0003", "cycle": 0, "section": 3,
               "focus": [[1.0, 2.0, 4e-3, 0.1, 0.2]], "af_used": {"section": [[1.0, 2.0]]},
               "af_next": {"section": [[5.0, 2.0]]}})
    apply(st, {"rec": "cycle_done", "key": "cycle:c0000", "cycle": 0})
    again = JournalState.from_json(st.to_json())
    assert again.section_focus[3]["af_next"] == {"section": [[5.0, 2.0]]}
    assert again.section_focus[3]["focus"][0][2] == 4e-3
