"""Nothing unsafe gets in (issue 14): every input path refuses bad data with a
message naming the file, the field and what is allowed, changes nothing, and
never ends in a traceback."""
from __future__ import annotations

import json
import resource
import shutil
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from devices.setup_config import ConfigError, load_setup, read_yaml
from tests.support import ROOT
from tests.support.engine_runs import write_plan, write_setup

SIM = ROOT / "configs" / "sim.yaml"


def setup_data() -> dict:
    """configs/sim.yaml with absolute paths, so a copy loads from any folder."""
    d = yaml.safe_load(SIM.read_text())
    d["devices"]["ion_gun"]["command_table"] = str(ROOT / "configs" / "iongun" / "ionoptika_sim.yaml")
    for role in ("waveform_generator", "multimeter"):
        d["devices"][role]["visa_library"] = str(ROOT / "configs" / "visa" / "sim_instruments.yaml") + "@sim"
    return d


def write_yaml(path: Path, data, extra: str = "") -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False) + extra)
    return path


def refused_setup(tmp_path, data=None, text=None) -> str:
    p = tmp_path / "setup.yaml"
    if text is not None:
        p.write_text(text)
    else:
        write_yaml(p, data)
    before = sorted(tmp_path.iterdir())
    with pytest.raises(ConfigError) as e:
        load_setup(p)
    assert sorted(tmp_path.iterdir()) == before
    assert str(p) in str(e.value)
    return str(e.value)


def refused_plan(tmp_path, plan: Path) -> str:
    """run_plan refuses with exit 2, names the plan file, creates nothing."""
    import io

    from acq.cli import run_plan
    err = io.StringIO()
    out = tmp_path / "never"
    code = run_plan(plan, out=out, stream=err)
    assert code == 2, err.getvalue()
    assert not out.exists()
    text = err.getvalue()
    assert "Traceback" not in text
    return text


@pytest.fixture
def setup_file(tmp_path):
    return write_setup(tmp_path)


def invoke(*args):
    from main import app
    return CliRunner().invoke(app, [str(a) for a in args])


# ------------------------------------------------------------------ 1. YAML
def test_a_second_safety_block_is_a_duplicate_key_naming_key_and_line(tmp_path):
    text = yaml.safe_dump(setup_data(), sort_keys=False) + "safety:\n  wd_mm: [1.0, 50.0]\n"
    line = text.count("\n") - 1
    msg = refused_setup(tmp_path, text=text)
    assert "duplicate key 'safety'" in msg and f"line {line}" in msg, msg


def test_duplicate_keys_are_refused_at_any_depth(tmp_path):
    p = tmp_path / "deep.yaml"
    p.write_text("a:\n  b:\n    c: 1\n    d: 2\n    c: 3\n")
    with pytest.raises(ConfigError, match=r"line 5: duplicate key 'c' \(first at line 3\)"):
        read_yaml(p)
    p.write_text("{x: 1, x: 2}\n")
    with pytest.raises(ConfigError, match="duplicate key 'x'"):
        read_yaml(p)


def test_alias_bomb_in_autofocus_options_fails_fast_without_memory_growth(tmp_path, setup_file):
    plan = write_plan(tmp_path, setup_file)
    bomb = ["autofocus:", "  method: none", "  options:", "    l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    bomb += [f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 10)]
    data = yaml.safe_load(plan.read_text())
    data.pop("autofocus")
    plan.write_text(yaml.safe_dump(data) + "\n".join(bomb) + "\n")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    err = refused_plan(tmp_path, plan)
    assert time.perf_counter() - t0 < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 100_000     # kB
    assert str(plan) in err and "expands to more than" in err, err


def test_aliases_that_stay_small_still_load(tmp_path):
    # yaml.safe_dump writes &id001/*id001 for an object used twice; the shipped ion-gun table shares a regex
    p = tmp_path / "shared.yaml"
    p.write_text("a: &x [1, 2]\nb: *x\nc: &s 'text'\nd: *s\n")
    assert read_yaml(p) == {"a": [1, 2], "b": [1, 2], "c": "text", "d": "text"}


def test_deep_nesting_and_huge_integers_are_messages_not_tracebacks(tmp_path):
    p = tmp_path / "deep.yaml"
    p.write_text("[" * 2000 + "]" * 2000)
    with pytest.raises(ConfigError, match="nested deeper than"):
        read_yaml(p)
    p.write_text("a: " + "9" * 5000 + "\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml(p)


@pytest.mark.parametrize("content", [bytes(range(256)) * 8, b"name: x\x00\n"])
def test_binary_setup_and_plan_are_not_text_yaml(tmp_path, setup_file, content):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(content)
    with pytest.raises(ConfigError, match=f"{binary}: not a text YAML file"):
        load_setup(binary)
    err = refused_plan(tmp_path, binary)
    assert f"{binary}: not a text YAML file" in err
    r = invoke("--config", binary, "devices", "check")
    assert r.exit_code == 2 and "not a text YAML file" in r.output      # 2, not 1: no exception escaped


# ------------------------------------------------------------------ 2. setup numbers and windows
def _mutated(mutate) -> dict:
    d = setup_data()
    mutate(d)
    return d


@pytest.mark.parametrize("mutate, names", [
    (lambda d: d["safety"].update(wd_mm=[float("nan"), 5.0]), ["safety.wd_mm.0", "finite"]),
    (lambda d: d["safety"]["stage"].update(x_mm=[float("-inf"), 10.0]), ["safety.stage.x_mm.0", "finite"]),
    (lambda d: d["simulation"]["microscope"].update(alpha_mrad=float("nan")),
     ["simulation.microscope.alpha_mrad", "finite"]),
    (lambda d: d["calibration"].update(stage_to_image_rotation_deg=float("nan")),
     ["calibration.stage_to_image_rotation_deg", "finite"]),
    (lambda d: d["devices"]["sem"].update(options={"gain": float("inf")}), ["devices.sem.options", "gain",
                                                                            "must be finite"]),
    (lambda d: d["safety"].update(eht_kv=[-1.0, 5.0]), ["safety.eht_kv", "(0, 30] kV"]),
    (lambda d: d["safety"].update(eht_kv=[0.0, 5.0]), ["safety.eht_kv", "(0, 30] kV"]),
    (lambda d: d["safety"].update(eht_kv=[1.0, 300.0]), ["safety.eht_kv", "(0, 30] kV"]),
    (lambda d: d["safety"].update(probe_current_na=[-5.0, 10.0]), ["safety.probe_current_na", "(0, 1000] nA"]),
    (lambda d: d["safety"].update(probe_current_na=[5.0, 5.0]), ["safety.probe_current_na", "must be below"]),
    (lambda d: d["safety"]["stage"].update(x_mm=[-500.0, 500.0]), ["safety.stage.x_mm", "[-200, 200] mm"]),
    (lambda d: d["safety"]["stage"].update(z_mm=[-150.0, 1.0]), ["safety.stage.z_mm", "[-100, 100] mm"]),
    (lambda d: d["safety"]["stage"].update(t_deg=[-100.0, 60.0]), ["safety.stage.t_deg", "[-90, 90] deg"]),
    (lambda d: d["safety"].update(ion_cluster_size=[0, 5000]), ["safety.ion_cluster_size", "[1, 100000]"]),
    (lambda d: d["simulation"].update(seed=-1), ["simulation.seed", "greater than or equal to 0"]),
    (lambda d: d["devices"]["current_preamp"].update(sign=0.5), ["devices.current_preamp.sign", "+1 or -1"]),
])
def test_setup_numbers_are_finite_and_windows_sensible(tmp_path, mutate, names):
    msg = refused_setup(tmp_path, _mutated(mutate))
    for n in names:
        assert n in msg, msg


def test_every_shipped_config_still_loads():
    load_setup(SIM)
    for p in sorted((ROOT / "configs" / "plans").glob("*.yaml")):
        from acq.plan import load_plan
        load_plan(p)


# ------------------------------------------------------------------ 3. step bounds
@pytest.mark.parametrize("over, names", [
    ({"mill": {"duration_s": 10 ** 6}}, ["mill.duration_s", "86400"]),
    ({"mill": {"duration_s": float("inf")}}, ["mill.duration_s", "finite"]),
    ({"mill": {"check_interval_s": 0.01}}, ["mill.check_interval_s", "0.1"]),
    ({"mill": {"check_interval_s": 900}}, ["mill.check_interval_s", "600"]),
    ({"mill": {"duration_s": 5, "check_interval_s": 10}}, ["check_interval_s = 10", "longer than duration_s"]),
    ({"mill": {"delay_s": 10 ** 5}}, ["mill.delay_s", "3600"]),
    ({"mill": {"raster_hz": [0.0, 1.0]}}, ["mill.raster_hz.0", "0.001"]),
    ({"mill": {"raster_hz": [1e7, 1.0]}}, ["mill.raster_hz.0", "less than or equal to 1000000"]),
    ({"mill": {"raster_hz": [100.0, float("nan")]}}, ["mill.raster_hz.1", "finite"]),
    ({"irradiation": {"max_duration_s": 10 ** 7}}, ["irradiation.max_duration_s", "86400"]),
    ({"autofocus": {"frame_size": [8, 512]}}, ["autofocus.frame_size", "16..32768"]),
    ({"autofocus": {"pixel_size_nm": 1e9}}, ["autofocus.pixel_size_nm", "100000"]),
    ({"autofocus": {"options": {"n": float("nan")}}}, ["autofocus.options", "n = nan", "finite"]),
    ({"autofocus": {"options": {f"k{i}": i for i in range(1500)}}}, ["autofocus.options", "more than 1000"]),
    ({"grid_template": {"rotation_deg": float("nan")}}, ["grid_template.rotation_deg", "finite"]),
    ({"qc": {"checks": {"min_sd": float("inf")}}}, ["qc.checks.min_sd", "finite"]),
])
def test_step_parameters_are_bounded(tmp_path, setup_file, over, names):
    err = refused_plan(tmp_path, write_plan(tmp_path, setup_file, **over))
    assert "plan.yaml" in err
    for n in names:
        assert n in err, err


# ------------------------------------------------------------------ 4. plan size
GRID = {"id": 0, "center_um": [0.0, -3000.0], "pixel_size_nm": 10, "frame_size": [256, 256], "dwell_ns": 100}


def _explicit(rows, cols, **over):
    return {"sections_from": None, "grid_template": None, "order": "path",
            "sections": [{"id": 1, "grids": [{**GRID, "rows": rows, "cols": cols}]}], **over}


def test_a_million_tile_grid_is_refused_quickly_with_how_to_raise_the_limit(tmp_path, setup_file):
    t0 = time.perf_counter()
    err = refused_plan(tmp_path, write_plan(tmp_path, setup_file, **_explicit(1000, 1000)))
    assert time.perf_counter() - t0 < 5
    assert "1000000 tiles per cycle" in err and "limits.max_tiles_per_cycle = 100000" in err, err
    assert "limits: {max_tiles_per_cycle: 1000000}" in err


def test_the_tile_limit_counts_wafer_sections_and_the_overview_and_can_be_raised(tmp_path, setup_file):
    from acq.plan import load_plan
    err = refused_plan(tmp_path, write_plan(tmp_path, setup_file, grid_template={"rows": 300, "cols": 300},
                                            order="path"))
    assert "180000 tiles per cycle (2 wafer sections x 300x300)" in err, err
    over = _explicit(10, 10, overview={"center_um": [0.0, 3000.0], "rows": 5, "cols": 5, "pixel_size_nm": 1000,
                                       "frame_size": [256, 256]})
    err = refused_plan(tmp_path, write_plan(tmp_path, setup_file, limits={"max_tiles_per_cycle": 120}, **over))
    assert "125 tiles per cycle (100 in 1 sections, overview 5x5)" in err, err
    plan = load_plan(write_plan(tmp_path, setup_file, limits={"max_tiles_per_cycle": 125}, **over))
    assert plan.limits.max_tiles_per_cycle == 125


# ------------------------------------------------------------------ 5. against the setup
@pytest.mark.parametrize("over, names", [
    ({"mill": {"raster_hz": [300_000.0, 1.0]}}, ["mill.raster_hz.0 = 300000.0", "keysight_33522a", "200000"]),
    ({"autofocus": {"method": "sweep", "frame_size": [16384, 16384]}},
     ["autofocus.frame_size = [16384, 16384]", "(sim) allows 16..8192"]),
    ({"grid_template": {"frame_size": [10000, 256]}}, ["grid_template.frame_size", "16..8192"]),
    ({"irradiation": {"dmm_range_v": 5}}, ["irradiation.dmm_range_v = 5", "one of 0.1, 1, 10, 100, 1000 V"]),
    ({"irradiation": {"dmm_nplc": 3}}, ["irradiation.dmm_nplc = 3", "keysight_34465a"]),
    ({"irradiation": {"preamp_sensitivity_a_per_v": 3e-8}}, ["irradiation.preamp_sensitivity_a_per_v", "sr570"]),
])
def test_step_parameters_are_checked_against_the_setup_before_anything_is_written(tmp_path, setup_file, over,
                                                                                  names):
    err = refused_plan(tmp_path, write_plan(tmp_path, setup_file, **over))
    for n in names:
        assert n in err, err


def test_a_sweep_wider_than_the_wd_window_is_refused(tmp_path):
    d = setup_data()
    d["safety"]["wd_mm"] = [4.5, 5.5]
    setup = write_yaml(tmp_path / "narrow.yaml", d)
    err = refused_plan(tmp_path, write_plan(tmp_path, setup, autofocus={"method": "sweep", "sweep_range_um": 600}))
    assert "autofocus.sweep_range_um = 600" in err and "safety.wd_mm" in err and "at most 500" in err, err


def test_zeiss_setups_allow_frames_inside_a_store(tmp_path):
    """A SmartSEM scans store resolutions only: a smaller frame (256x256) is
    cropped from the smallest store holding it, a bigger one than every store
    is refused naming the largest."""
    from acq.plan import Plan
    from acq.plan_checks import check_sem_settings
    from devices.setup_config import validate_config
    d = setup_data()
    d["devices"]["sem"] = {"driver": "zeiss_smartsem"}
    cfg = load_setup(write_yaml(tmp_path / "zeiss.yaml", d))

    def plan(frame):
        grid = {**GRID, "frame_size": frame}
        return validate_config(Plan, {"setup": str(tmp_path / "zeiss.yaml"), **_explicit(1, 1),
                                      "sections": [{"id": 1, "grids": [{**grid, "rows": 1, "cols": 1}]}]},
                               "p.yaml", context={"base": tmp_path})
    check_sem_settings(plan([256, 256]), cfg, "p.yaml")
    with pytest.raises(ConfigError, match=r"frame_size = \[30000, 30000\].*up to 32768x24576"):
        check_sem_settings(plan([30000, 30000]), cfg, "p.yaml")


# ------------------------------------------------------------------ 6. top-level --config
def test_top_level_config_must_exist_even_with_a_subcommand(tmp_path):
    r = invoke("--config", tmp_path / "nope.yaml", "devices", "check")
    assert r.exit_code == 2 and "does not exist" in r.output


def test_top_level_config_reaches_the_subcommands_that_take_a_setup(tmp_path, monkeypatch):
    other = write_yaml(tmp_path / "other.yaml", setup_data())
    seen = []
    monkeypatch.setattr("devices.cli.check_devices", lambda config: (seen.append(Path(config)), ([], True))[1])
    monkeypatch.setattr("acq.cli.run_plan", lambda plan, out, resume, config, **kw: seen.append(config) or 0)
    assert invoke("--config", other, "devices", "check").exit_code == 0
    assert invoke("--config", other, "run", "plan.yaml", "--out", tmp_path / "o").exit_code == 0
    assert invoke("--config", other, "devices", "check", "--config", other).exit_code == 0   # same file twice
    assert invoke("devices", "check").exit_code == 0
    assert invoke("run", "plan.yaml", "--out", tmp_path / "o").exit_code == 0
    assert [Path(p) if p else None for p in seen] == [other, other, other, SIM, None]


def test_top_level_config_is_refused_where_it_cannot_apply(tmp_path, monkeypatch):
    r = invoke("--config", SIM, "wafer", "order", "s.json", "--json", tmp_path / "o.json")
    assert r.exit_code == 2 and "`wafer order` takes no setup file" in r.output
    assert "devices check" in r.output and "sim frame" in r.output and "run" in r.output
    other = write_yaml(tmp_path / "other.yaml", setup_data())
    r = invoke("--config", SIM, "devices", "check", "--config", other)
    assert r.exit_code == 2 and "--config given twice with different files" in r.output


def test_a_bad_top_level_config_never_starts_the_gui(tmp_path, monkeypatch):
    monkeypatch.setattr("main._gui_or_demo", lambda config: pytest.fail("GUI started"))
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\xff\xfe binary")
    r = invoke("--config", bad)
    assert r.exit_code == 2 and f"{bad}: not a text YAML file" in r.output


# ------------------------------------------------------------------ 7. CLI floats
@pytest.mark.parametrize("args", [("--defocus-um", "nan"), ("--defocus-um", "inf"), ("--stig", "0", "nan"),
                                  ("--dwell-ns", "nan"), ("--pixel-nm", "nan"), ("--texture-pixel-nm", "nan")])
def test_sim_frame_refuses_non_finite_numbers(tmp_path, args):
    out = tmp_path / "f.tif"
    r = invoke("sim", "frame", "--out", out, "--size", "64", "64", *args)
    assert r.exit_code == 2, r.output
    assert args[0] in r.output and not out.exists()


def test_sim_frame_refuses_an_unreadable_specimen_without_a_traceback(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    r = invoke("sim", "frame", "--out", tmp_path / "f.tif", "--size", "64", "64", "--specimen", junk)
    assert r.exit_code == 2 and "--specimen" in r.output and "could not be read" in r.output


# ------------------------------------------------------------------ 8. fault rules
def _faulty(rule) -> dict:
    d = setup_data()
    d["simulation"]["faults"] = [rule]
    return d


@pytest.mark.parametrize("rule, names", [
    ({"device": "sem", "operation": "aquire_frame", "kind": "timeout"},
     ["simulation.faults.0.operation = 'aquire_frame'", "not an operation of sem", "'acquire_frame'"]),
    ({"device": "ion_gun", "operation": "fire", "kind": "timeout"},
     ["'fire' is not an operation of ion_gun", "'beam_on'", "'set_energy'"]),
    ({"device": "multimeter", "operation": "measure", "kind": "visa_error"}, ["'write', 'query', 'read'"]),
    ({"device": "current_preamp", "operation": "write", "kind": "timeout"}, ["no fault-injection points"]),
    ({"device": "stage", "operation": "move_to", "kind": "incomplete_frame"}, ["only for device 'sem'"]),
    ({"device": "stage", "operation": "move_to", "kind": "move_failure", "at_calls": [0]}, ["at_calls.0"]),
])
def test_fault_rules_must_name_a_real_operation(tmp_path, rule, names):
    msg = refused_setup(tmp_path, _faulty(rule))
    for n in names:
        assert n in msg, msg


def test_real_fault_rules_load_and_the_table_matches_the_call_sites(tmp_path):
    from devices.setup_config import FaultRule
    from devices.sim.faults import FAULT_OPERATIONS, FaultInjector
    rules = [{"device": "sem", "operation": "acquire_frame", "kind": "frozen_frame"},
             {"device": "stage", "operation": "*", "kind": "move_failure"},
             {"device": "ion_gun", "operation": "status", "kind": "communication"},
             {"device": "waveform_generator", "operation": "write", "kind": "timeout"}]
    d = setup_data()
    d["simulation"]["faults"] = rules
    assert len(load_setup(write_yaml(tmp_path / "ok.yaml", d)).simulation.faults) == 4
    from devices.sim.visa_link import FaultyResource
    assert all(callable(getattr(FaultyResource, op)) for op in FAULT_OPERATIONS["multimeter"])
    inj = FaultInjector([FaultRule(device="sem", operation="acquire_frame", kind="timeout", at_calls=[1])])
    with pytest.raises(ValueError, match="missing from FAULT_OPERATIONS"):
        inj.draw("sem", "grab")                     # a call site that drifted from the table


# ------------------------------------------------------------------ 9. model files
def test_shipped_cards_pin_the_sha256_of_their_models():
    from autofocus.models import file_sha256
    pts = sorted((ROOT / "models").glob("*.pt"))
    assert pts
    for pt in pts:
        card = json.loads(pt.with_suffix(".json").read_text())
        assert card.get("sha256") == file_sha256(pt), pt


def test_a_changed_or_unpinned_model_is_refused_before_it_is_loaded(tmp_path, monkeypatch):
    import torch

    from autofocus.inference import DEFAULT_MODEL, DeepFocusPredictor
    from autofocus.models import UnverifiedModel, verification_problem
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load reached"))
    assert verification_problem(DEFAULT_MODEL) is None
    model = tmp_path / "df.pt"
    shutil.copy(DEFAULT_MODEL, model)
    card = json.loads(DEFAULT_MODEL.with_suffix(".json").read_text())
    with model.open("ab") as f:
        f.write(b"\0")
    model.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(UnverifiedModel, match=f"{model}: not loaded: its sha256 .* differs"):
        DeepFocusPredictor(model)
    assert "differs" in verification_problem(model)          # what a model list shows instead of loading
    card.pop("sha256")
    model.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(UnverifiedModel, match='has no "sha256"'):
        DeepFocusPredictor(model)
    model.with_suffix(".json").unlink()
    with pytest.raises(UnverifiedModel, match="model card .* missing"):
        DeepFocusPredictor(model)
    model.with_suffix(".json").write_bytes(b"\x89PNG\xff\xfe")
    with pytest.raises(UnverifiedModel, match="not a JSON text file"):
        DeepFocusPredictor(model)


def test_exported_models_carry_their_hash_and_init_weights_are_verified(tmp_path):
    from autofocus.models import UnverifiedModel, build, file_sha256, read_verified_model
    from autofocus.train import export, load_weights
    out = tmp_path / "m.pt"
    export(build("deepfocus-128"), "deepfocus-128", out, {"variant": "deepfocus-128"})
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["sha256"] == file_sha256(out)
    read_verified_model(out)
    load_weights(build("deepfocus-128"), out)
    card["sha256"] = "0" * 64
    out.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(UnverifiedModel, match="differs"):
        load_weights(build("deepfocus-128"), out)
