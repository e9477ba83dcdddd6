"""`autofocus collect` -> `train deepfocus --data` -> `autofocus recalibrate
--data` through the SEM interface, on the simulator and on the ZEISS fake;
resuming an interrupted collection without lost or repeated pairs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from autofocus.collect import CollectSettings, Collector, DatasetError, plan_aberrations
from devices.factory import build_setup
from devices.setup_config import load_setup
from devices.sim.world import SimWorld
from tests.acq.test_zeiss_demo import zeiss_setup_file
from tests.support import ROOT
from tests.support.engine_runs import write_setup

SMALL = ["--locations", "2", "--aberrations", "3", "--frame", "512", "384", "--dwell-ns", "100"]


def main_app():
    from main import app
    return app


def on_tissue(setup_file: Path) -> list[str]:
    """--at the first section's centre (the stage starts on bare wafer)."""
    cfg = load_setup(setup_file)
    x, y = SimWorld(cfg.simulation, cfg.safety, cfg.calibration).wafer.sections[0].center_m
    return ["--at", f"{x * 1e3:.6f}", f"{y * 1e3:.6f}"]


def collect(args, setup_file: Path, out: Path):
    return CliRunner().invoke(main_app(), ["autofocus", "collect", "--config", str(setup_file), "--out", str(out),
                                           *on_tissue(setup_file), *args])


def journal(folder: Path, name: str = "pairs.jsonl") -> list[dict]:
    return [json.loads(line) for line in (folder / name).read_text().splitlines()]


def test_pairs_carry_the_aberration_the_microscope_was_set_to(tmp_path):
    setup = write_setup(tmp_path)
    out = tmp_path / "pairs"
    res = collect(SMALL, setup, out)
    assert res.exit_code == 0, res.output
    recs = journal(out)
    assert len(recs) == 6 and len({r["id"] for r in recs}) == 6
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["perturbation_um"] == 5.0 and "Simulated SEM" in manifest["sem"]
    for r in recs:
        assert r["target"] == pytest.approx([-v for v in r["aberration"]])
        for side, sign in (("plus", 1), ("minus", -1)):
            with tifffile.TiffFile(out / r[side]) as tf:
                img, md = tf.asarray(), json.loads(tf.pages[0].description)
            assert img.shape == (384, 512) and md["side"] == side and md["pair"]["id"] == r["id"]
            # what the SEM reported for the frame: baseline + aberration ± 5 µm
            frame_md = r["frame_metadata"][0 if sign > 0 else 1]
            want = r["baseline"][0] + r["aberration"][0] * 1e-6 + sign * 5e-6
            assert frame_md["wd_m"] == pytest.approx(want, abs=1e-12)
    # the operator's focus is the baseline of every location
    assert {tuple(r["baseline"]) for r in recs} == {tuple(manifest["operator_focus"])}


def test_collected_pairs_train_and_recalibrate_a_model(tmp_path):
    setup = write_setup(tmp_path)
    data = tmp_path / "pairs"
    assert collect(SMALL, setup, data).exit_code == 0
    app, runner = main_app(), CliRunner()
    model = tmp_path / "trained.pt"
    res = runner.invoke(app, ["train", "deepfocus", "--data", str(data), "--init", str(ROOT / "models" /
                              "deepfocus_128.pt"), "--steps", "3", "--log-every", "1", "--out", str(model)])
    assert res.exit_code == 0, res.output
    card = json.loads(model.with_suffix(".json").read_text())
    shipped = json.loads((ROOT / "models" / "deepfocus_128.json").read_text())["variant"]
    assert card["variant"] == shipped and card["training_data"]["n_train"] + \
        card["training_data"]["n_val"] == 6
    # never over an existing model
    again = runner.invoke(app, ["train", "deepfocus", "--data", str(data), "--steps", "1", "--out", str(model)])
    assert again.exit_code == 2 and "exists" in again.output
    recal = tmp_path / "recal.pt"
    res = runner.invoke(app, ["autofocus", "recalibrate", "--data", str(data), "--steps", "3", "--out", str(recal)])
    assert res.exit_code == 0, res.output
    assert "held-out location" in res.output and recal.is_file()
    rc = json.loads(recal.with_suffix(".json").read_text())["recalibration"]
    assert rc["train_pairs"] == 3 and rc["held_out_pairs"] == 3


class Interrupt(Exception):
    pass


def run_collector(cfg, out: Path, st: CollectSettings, crash_at: int = 0) -> tuple[int, bool]:
    """One collection on a freshly connected setup (the same frame noise each
    time), cut by an exception at frame ``crash_at``; returns (frames, blanked)."""
    frames = 0
    with build_setup(cfg) as setup:
        grab = setup.sem.inner.acquire_frame

        def counting():
            nonlocal frames
            frames += 1
            if frames == crash_at:
                raise Interrupt("power cut")
            return grab()
        setup.sem.inner.acquire_frame = counting
        try:
            Collector(setup.sem, setup.stage, setup.guard, out, st, progress=lambda s: None).run()
        except Interrupt:
            return frames, setup.sem.blanked()
        return frames, setup.sem.blanked()


def test_an_interrupted_collection_resumes_without_repeating_a_frame(tmp_path):
    cfg = load_setup(write_setup(tmp_path))
    st = CollectSettings(locations=2, aberrations=3, frame=(256, 256), dwell_ns=(100.0,), baseline="sharpness-nm",
                         nm_iterations=3)
    out, out2 = tmp_path / "pairs", tmp_path / "pairs2"
    full_run, _ = run_collector(cfg, out, st)
    per_baseline = json.loads((out / "baselines.jsonl").read_text().splitlines()[0])["frames"]
    # the same collection cut inside its second pair (after the first location's baseline and one pair)
    first_try, blanked = run_collector(cfg, out2, st, crash_at=per_baseline + 4)
    assert blanked                           # no beam on the sample after the crash
    assert len(journal(out2)) == 1
    # a torn journal line, and the cut pair's first frame landed as a lone file
    done = journal(out2)[0]
    (out2 / "pairs.jsonl").write_text(json.dumps(done) + "\n" + '{"id": "000_01", "loc')
    lone = out2 / "pairs" / "000_01_plus.tif"
    tifffile.imwrite(lone, tifffile.imread(out2 / done["plus"]))
    resumed, _ = run_collector(cfg, out2, st)
    recs = journal(out2)
    assert sorted(r["id"] for r in recs) == sorted(r["id"] for r in journal(out)) and len(recs) == 6
    # the first location's baseline search was not repeated: only its two missing pairs and the
    # second location (baseline + three pairs) were taken
    bases = journal(out2, "baselines.jsonl")
    assert [b["location"] for b in bases] == [0, 1]
    assert resumed == 2 * 2 + bases[1]["frames"] + 3 * 2
    assert full_run == sum(b["frames"] for b in journal(out, "baselines.jsonl")) + 6 * 2
    assert [r["aberration"] for r in recs if r["location"] == 1] == [list(a) for a in plan_aberrations(st, 1)]
    assert [p.name.split(".")[0] for p in (out2 / "orphans").glob("*.tif")] == ["000_01_plus"]   # kept


def test_every_crash_point_of_the_folder_resumes_and_damage_is_refused(tmp_path):
    cfg = load_setup(write_setup(tmp_path))
    st = CollectSettings(locations=1, aberrations=3, frame=(256, 256), dwell_ns=(100.0,))
    out = tmp_path / "pairs"
    # a crash while the manifest was being written: only its temporary is there
    out.mkdir()
    (out / ".manifest.json.1234.part").write_bytes(b'{"format": "deepf')
    frames, _ = run_collector(cfg, out, st)
    assert frames == 6 and len(journal(out)) == 3 and not list(out.glob("*.part"))
    # a crash after both files of a pair landed, before its journal line: adopted, not retaken
    lines = (out / "pairs.jsonl").read_text().splitlines(keepends=True)
    (out / "pairs.jsonl").write_text("".join(lines[:2]))
    frames, _ = run_collector(cfg, out, st)
    assert frames == 0 and [r["id"] for r in journal(out)] == ["000_00", "000_01", "000_02"]
    # a whole last record that lost only its newline counts: nothing retaken, no second line
    (out / "pairs.jsonl").write_text("".join(lines)[:-1])
    frames, _ = run_collector(cfg, out, st)
    assert frames == 0 and [r["id"] for r in journal(out)] == ["000_00", "000_01", "000_02"]
    # a damaged line that is not the last is damage, not a torn append: refused, nothing cut
    (out / "pairs.jsonl").write_text(lines[0] + "garbage\n" + lines[2])
    with pytest.raises(DatasetError, match="line 2"):
        run_collector(cfg, out, st)
    assert (out / "pairs.jsonl").read_text() == lines[0] + "garbage\n" + lines[2]


def test_other_settings_in_the_same_folder_are_refused_naming_them(tmp_path):
    setup = write_setup(tmp_path)
    out = tmp_path / "pairs"
    assert collect(SMALL, setup, out).exit_code == 0
    before = sorted(p.name for p in (out / "pairs").iterdir())
    res = collect([*SMALL[:-2], "--dwell-ns", "200", "--seed", "4"], setup, out)
    assert res.exit_code == 2 and "--dwell-ns" in res.output and "--seed" in res.output
    assert sorted(p.name for p in (out / "pairs").iterdir()) == before
    with pytest.raises(DatasetError, match="--baseline"):
        CollectSettings(baseline="guess").check()
    # a frame the SEM refuses is refused before anything is written
    bad = collect(["--frame", "8", "8"], setup, tmp_path / "bad")
    assert bad.exit_code == 2 and "--frame" in bad.output and not (tmp_path / "bad").exists()


def test_collect_runs_on_the_zeiss_driver_against_its_fake(tmp_path):
    setup = zeiss_setup_file(tmp_path)
    out = tmp_path / "pairs"
    res = collect(["--locations", "2", "--aberrations", "2", "--frame", "1024", "768", "--dwell-ns", "100"],
                  setup, out)
    assert res.exit_code == 0, res.output
    recs = journal(out)
    assert len(recs) == 4
    manifest = json.loads((out / "manifest.json").read_text())
    assert "Simulated SEM" not in manifest["sem"]
    for r in recs:
        img = tifffile.imread(out / r["plus"])
        assert img.shape == (768, 1024) and img.std() > 10       # tissue, not bare wafer
    # the stage visited both grid locations, 60 µm apart
    xs = sorted({round(r["stage_m"][0] * 1e6) for r in recs})
    assert len(xs) == 2 and xs[1] - xs[0] == 60


def test_recalibrate_runs_on_the_zeiss_driver_through_the_collector(tmp_path):
    setup = zeiss_setup_file(tmp_path)
    out = tmp_path / "recal.pt"
    res = CliRunner().invoke(main_app(), ["autofocus", "recalibrate", "--config", str(setup), "--locations", "2",
                                          "--aberrations", "2", "--steps", "2", "--frame", "512", "384",
                                          "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.is_file() and len(journal(tmp_path / "recal_pairs")) == 4
    assert "held-out location" in res.output


def test_bench_on_a_connected_microscope_reports_convergence_sharpness_and_dose(tmp_path):
    setup = zeiss_setup_file(tmp_path)
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(main_app(), ["autofocus", "bench", "--config", str(setup), "--method", "deepfocus",
                                          "--locations", "2", "--iterations", "3", "--json", str(out),
                                          *on_tissue(setup)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["settings"]["truth"].startswith("none")
    m = data["methods"]["deepfocus"]
    first, last = m["summary"]["iterations"][0], m["summary"]["iterations"][-1]
    # from ~10 µm off the operator's focus, the corrections shrink to a fraction of the first
    assert first["median_correction_wd_um"] > 5 and last["median_correction_wd_um"] < 2
    assert 0.9 < m["summary"]["median_sharpness_ratio"] < 1.2
    assert all(r["dose_e_per_nm2"] > 0 and r["scoring_dose_e_per_nm2"] > 0 for r in m["locations"])
    assert "of the operator's" in res.output
    # the α DeepFocus learned, to write into the setup file (the fake renders the setup-A column, 8 mrad)
    assert m["column"]["learned_alpha_mrad"] == pytest.approx(8.0, rel=0.2)
    assert "mrad learned from its moves" in res.output


def test_known_aberrations_are_half_near_focus_and_never_leave_the_windows(tmp_path):
    """About half of the aberrations near focus (where the loop ends), the rest
    over the seed's range; next to a window edge the pairs that would cross
    it are skipped, not clamped (a clamped pair would carry a wrong target)."""
    st = CollectSettings(locations=1, aberrations=24, frame=(128, 128), dwell_ns=(100.0,))
    t = np.array(plan_aberrations(st, 0))
    near = (np.abs(t[:, 0]) <= st.near_wd_um) & (np.abs(t[:, 1:]) <= st.near_stig).all(axis=1)
    assert 6 <= near.sum() <= 20 and np.abs(t[:, 0]).max() > 2 * st.near_wd_um
    cfg = load_setup(write_setup(tmp_path))
    with build_setup(cfg) as setup:
        hi = cfg.safety.wd_mm[1] * 1e-3
        edge = (hi - 10e-6, 0.0, 0.0)
        c = Collector(setup.sem, setup.stage, setup.guard, tmp_path / "pairs", st, progress=lambda s: None,
                      baseline_finder=lambda manifest, i: (edge, {"frames": 0}))
        summary = c.run()
        recs = journal(tmp_path / "pairs")
        assert summary["skipped_outside_windows"] > 0 and len(recs) + summary["skipped_outside_windows"] == 24
        assert all(r["wd_plus_m"] <= hi for r in recs)
        # the microscope is left as the operator had it
        assert setup.sem.working_distance() != edge[0]


def test_recalibrating_the_shipped_model_maps_a_rotated_columns_stigmators_and_keeps_the_network(tmp_path):
    """Setup B's scan is rotated 90°: the shipped model's stig readings come out
    in the wrong axes. Recalibration on its collected pairs fits this column's
    axes (and α) onto the unchanged network."""
    from autofocus.recalibrate import RecalSettings, run_recalibration
    cfg = load_setup(write_setup(tmp_path))
    out = tmp_path / "setupB.pt"
    st = RecalSettings(locations=5, aberrations_per_location=8, out=out, base_model="deepfocus_128",
                       test_locations=2, iterations=3, frame=(768, 768), nm_iterations=20)
    rep = run_recalibration(cfg, st, progress=lambda s: None)
    card = json.loads(out.with_suffix(".json").read_text())
    assert out.read_bytes() == (ROOT / "models" / "deepfocus_128.pt").read_bytes()
    assert card["recalibration"]["stig_map"] and card["recalibration"]["train_pairs"] == 32
    assert 10 <= card["recalibration"]["column_alpha_mrad"] <= 17                  # setup B: 12 mrad
    assert rep["after"]["mae_stig"] < 0.5 * rep["before"]["mae_stig"], rep["summary"]
    before, after = rep["before_convergence"][-1], rep["after_convergence"][-1]
    assert after["mae_stig"] < 0.25 < before["mae_stig"] and after["in_margin_fraction"] == 1.0, rep["summary"]
    # a map on top of a map would be fitted to readings the model never gives: refused, naming the way out
    from autofocus.recalibrate import recalibrate_on_data
    with pytest.raises(ValueError, match="already recalibrated.*--model"):
        recalibrate_on_data(st.data_dir(), tmp_path / "again.pt", base_model="setupB", models_dir=tmp_path,
                            progress=lambda s: None)
    assert not (tmp_path / "again.pt").exists() and not (tmp_path / "again.json").exists()
