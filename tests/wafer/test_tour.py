"""Stage-path ordering: open path from the start, solver quality, SA fix, CLI."""

import itertools
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from wafer import tour
from wafer.cli import app
from wafer.sections import Section, SectionFormatError, load_sections, save_sections
from wafer.tour import order_sections, path_length, serpentine_order, default_solver


def disk_points(n, seed, radius=12500.0):
    rng = np.random.default_rng(seed)
    r = radius * np.sqrt(rng.random(n))
    th = 2 * np.pi * rng.random(n)
    return np.c_[r * np.cos(th), r * np.sin(th)]


def brute_force(P, start):
    n = len(P)
    X = np.vstack([start, P])
    D = np.hypot(X[:, None, 0] - X[None, :, 0], X[:, None, 1] - X[None, :, 1])
    perms = np.array(list(itertools.permutations(range(1, n + 1))))
    full = np.hstack([np.zeros((len(perms), 1), int), perms])
    return float(D[full[:, :-1], full[:, 1:]].sum(axis=1).min())


@pytest.mark.parametrize("solver", ["nn", "fast", "sa"])
def test_open_path_starts_at_stage_and_never_returns(solver):
    # Points on a line, shuffled: the only sensible open path walks away from the
    # start once; a closed tour would pay the way back (twice the length).
    xs = np.array([3.0, 1.0, 5.0, 2.0, 4.0, 6.0, 7.0, 8.0])
    P = np.c_[xs, np.zeros_like(xs)]
    r = order_sections(P, (0.0, 0.0), solver=solver, time_limit_s=5)
    assert [xs[i] for i in r.order] == sorted(xs)
    assert r.length_um == pytest.approx(8.0)
    r = order_sections(P, (9.0, 0.0), solver=solver, time_limit_s=5)  # start at the other end
    assert [xs[i] for i in r.order] == sorted(xs, reverse=True)
    assert r.length_um == pytest.approx(8.0)


def test_path_length_has_no_return_leg():
    P = np.array([[3.0, 4.0], [3.0, 0.0]])
    assert path_length(P, [0, 1], (0, 0)) == pytest.approx(5.0 + 4.0)
    assert path_length(P, [], (0, 0)) == 0.0


def test_fast_beats_nearest_neighbour():
    P = disk_points(200, seed=1)
    nn = order_sections(P, (0, 0), solver="nn")
    fast = order_sections(P, (0, 0), solver="fast")
    assert sorted(fast.order) == list(range(200))
    assert fast.length_um == pytest.approx(path_length(P, fast.order, (0, 0)))
    assert fast.length_um < 0.95 * nn.length_um


@pytest.mark.parametrize("n,seed", [(7, 0), (7, 1), (8, 2), (8, 3)])
def test_fast_close_to_brute_force_on_small_instances(n, seed):
    # n > 6, so this exercises the local search, not the exhaustive shortcut.
    rng = np.random.default_rng(seed)
    P, start = rng.random((n, 2)) * 1000, rng.random(2) * 1000
    r = order_sections(P, start, solver="fast", seed=seed)
    assert r.length_um <= 1.03 * brute_force(P, start)


def test_tiny_instances_are_exact():
    rng = np.random.default_rng(5)
    for n in range(0, 7):
        P, start = rng.random((n, 2)) * 100, rng.random(2) * 100
        r = order_sections(P, start)
        assert sorted(r.order) == list(range(n))
        if n >= 2:
            assert r.length_um == pytest.approx(brute_force(P, start))


def test_sa_never_worse_than_its_start():
    # A short time cap stops the annealer while it is still hot: its final state
    # is then typically worse than x0 (the nearest-neighbour path).
    P = disk_points(40, seed=3)
    nn = order_sections(P, (0, 0), solver="nn")
    sa = order_sections(P, (0, 0), solver="sa", time_limit_s=0.2, seed=1)
    assert sorted(sa.order) == list(range(40))
    assert sa.length_um <= nn.length_um + 1e-9


def test_best_tracker_sees_better_states_than_the_final_one():
    from python_tsp.heuristics import solve_tsp_simulated_annealing

    P = disk_points(30, seed=4)
    X = np.vstack([[0, 0], P])
    D = np.hypot(X[:, None, 0] - X[None, :, 0], X[:, None, 1] - X[None, :, 1])
    D[:, 0] = 0
    tracker = tour._BestTracker(D)
    x0 = [0] + [i + 1 for i in tour.nearest_neighbour_order(P, np.zeros(2))]
    np.random.seed(0)
    perm, final = solve_tsp_simulated_annealing(tracker, x0=x0, max_processing_time=0.2)
    assert perm[0] == 0  # x0 starting with the start node keeps it first
    assert tracker.best_value <= final + 1e-9
    assert tracker.best_value == pytest.approx(path_length(P, tour._perm_to_order(tracker.best_perm), (0, 0)))


def test_fast_is_reproducible_for_a_seed():
    P = disk_points(60, seed=7)
    a = order_sections(P, (0, 0), seed=3, time_limit_s=60)
    b = order_sections(P, (0, 0), seed=3, time_limit_s=60)
    assert a.order == b.order


def test_fast_tsp_open_path_reduction_matches_brute_force():
    # fast-tsp solves closed tours; the dummy-node reduction must give our open path
    pytest.importorskip("fast_tsp")
    for seed in range(5):
        rng = np.random.default_rng(seed)
        P, start = rng.random((7, 2)) * 20000, rng.random(2) * 20000
        r = order_sections(P, start, solver="fast_tsp")
        assert r.length_um == pytest.approx(brute_force(P, start), rel=1e-3)


def test_unknown_solver_and_bad_points():
    with pytest.raises(ValueError, match="solver"):
        order_sections(np.zeros((3, 2)), solver="magic")
    with pytest.raises(ValueError, match="points_um"):
        order_sections(np.zeros((3, 3)))


def test_serpentine_order():
    assert serpentine_order(2, 3) == [0, 1, 2, 5, 4, 3]
    assert serpentine_order(3, 2, by_rows=False) == [0, 2, 4, 5, 3, 1]
    order = serpentine_order(4, 5)
    assert sorted(order) == list(range(20))
    steps = [abs(divmod(a, 5)[0] - divmod(b, 5)[0]) + abs(divmod(a, 5)[1] - divmod(b, 5)[1])
             for a, b in zip(order, order[1:])]
    assert steps == [1] * 19  # always to a neighbouring tile


# --- sections file -------------------------------------------------------------

def _sections(n=12, seed=0):
    P = disk_points(n, seed, radius=10000)
    return [Section(id=100 + i, center_um=tuple(p), size_um=(500, 300), angle_deg=10.0 * i,
                    polygon_um=[], confidence=0.5 + i / 100) for i, p in enumerate(P)]


def test_sections_round_trip_and_no_clobber(tmp_path):
    secs = _sections()
    path = save_sections(secs, tmp_path / "s.json")
    assert load_sections(path) == secs
    with pytest.raises(FileExistsError):
        save_sections(secs[:2], path)
    save_sections(secs[:2], path, overwrite=True)
    assert load_sections(path) == secs[:2]
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]  # no temp files left


@pytest.mark.parametrize("bad,field", [
    ({"id": 1, "center_um": [1, "x"], "size_um": [1, 1], "angle_deg": 0}, "center_um"),
    ({"id": 1, "center_um": [1, 2], "size_um": [1], "angle_deg": 0}, "size_um"),
    ({"id": 1, "center_um": [1, 2], "size_um": [1, 1]}, "angle_deg"),
    ({"id": 1, "center_um": [1, 2], "size_um": [1, 1], "angle_deg": 0, "polygon_um": [[0, 0], [1, 1]]}, "polygon_um"),
    ({"id": "a", "center_um": [1, 2], "size_um": [1, 1], "angle_deg": 0}, "id"),
])
def test_bad_section_fields_are_named(tmp_path, bad, field):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"sections": [bad]}))
    with pytest.raises(SectionFormatError, match=rf"sections\[0\].*{field}"):
        load_sections(p)


# --- CLI -------------------------------------------------------------------------

def test_cli_order_writes_json_and_table(tmp_path):
    secs = _sections(30, seed=2)
    src = save_sections(secs, tmp_path / "sections.json")
    out = tmp_path / "order.json"
    res = CliRunner().invoke(app, ["order", str(src), "--start-um", "-500", "250", "--solver", "fast",
                                   "--solver", "nn", "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["start_um"] == [-500.0, 250.0]
    assert set(data["solvers"]) == {"fast", "nn"}
    ids = sorted(s.id for s in secs)
    for name, entry in data["solvers"].items():
        assert sorted(entry["order"]) == ids
        by_id = {s.id: s.center_um for s in secs}
        P = np.array([by_id[i] for i in entry["order"]])
        assert entry["length_mm"] == pytest.approx(path_length(P, range(len(P)), (-500, 250)) / 1000)
        assert entry["seconds"] >= 0
    lengths = {k: v["length_mm"] for k, v in data["solvers"].items()}
    assert data["default"] == min(lengths, key=lengths.get)
    lines = res.output.splitlines()
    header = next(line for line in lines if line.startswith("solver"))
    assert header.split() == ["solver", "length", "mm", "seconds", "vs", "best", "%"]
    assert any(line.startswith("fast ") for line in lines) and any(line.startswith("nn ") for line in lines)

    again = CliRunner().invoke(app, ["order", str(src), "--json", str(out)])
    assert again.exit_code != 0 and "exists" in again.output
    forced = CliRunner().invoke(app, ["order", str(src), "--json", str(out), "--force"])
    assert forced.exit_code == 0
    assert json.loads(out.read_text())["default"] == default_solver()


def test_cli_rejects_unknown_solver(tmp_path):
    src = save_sections(_sections(3), tmp_path / "s.json")
    res = CliRunner().invoke(app, ["order", str(src), "--solver", "nope", "--json", str(tmp_path / "o.json")])
    assert res.exit_code != 0
    assert not (tmp_path / "o.json").exists()
