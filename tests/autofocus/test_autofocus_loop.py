"""The autofocus loop on the simulator: it converges with a perfect-ish
method, never commands anything outside the safety windows whatever the
method says, gives up and restores the start when a method makes things
worse; the focus map, the sharpness Nelder–Mead and the bench CLI."""
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from acq.section_focus import FocusMap
from autofocus.loop import AutofocusLoop
from autofocus.methods import Estimate
from autofocus.nelder_mead import NelderMeadAutofocus, SharpnessObjective
from devices.errors import LimitViolation
from devices.interfaces import ScanParams
from devices.safety import GuardedSEM, SafetyGuard
from devices.setup_config import Calibration, MicroscopeParams, Safety, Simulation
from devices.sim.frames import specimen_world
from devices.sim.sem import SimSEM

WD0 = 5e-3                                   # default simulated focus: wd 5 mm, stig (0, 0)
SAFETY = Safety(wd_mm=(WD0 * 1e3 - 0.060, WD0 * 1e3 + 0.060), stig=(-5.0, 5.0),
                max_autofocus_step_wd_um=40.0, max_autofocus_step_stig=3.0)
SCAN = dict(dwell_s=200e-9, frame_size=(256, 256), pixel_size_m=10e-9)


class RecordingSEM:
    """Wraps the guarded SEM and records every wd/stig it is asked to set."""

    def __init__(self, inner):
        self._inner = inner
        self.wd_calls, self.stig_calls = [], []

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def set_working_distance(self, m):
        self.wd_calls.append(m)
        self._inner.set_working_distance(m)

    def set_stig(self, x, y):
        self.stig_calls.append((x, y))
        self._inner.set_stig(x, y)


@pytest.fixture(scope="module")
def world():
    return specimen_world(Simulation(), [], None)


@pytest.fixture
def rig(world):
    raw = SimSEM(world)
    raw.connect()
    raw.set_blanked(False)
    guard = SafetyGuard(SAFETY)
    return raw, guard, RecordingSEM(GuardedSEM(raw, guard))


def start_at(sem, dz_um, sx, sy):
    sem.set_working_distance(WD0 + dz_um * 1e-6)
    sem.set_stig(sx, sy)
    sem.wd_calls.clear()
    sem.stig_calls.clear()


class Oracle:
    """Hidden truth plus noise: tests the loop, not a model. The SEM sits at
    wd − Δ after the pair, so the pair centre's aberration is truth + Δ."""
    name, needs_pair = "oracle", True

    def __init__(self, raw, rng):
        self.raw, self.rng = raw, rng

    def estimate(self, img_plus, img_minus, pixel_size_m, perturbation_m):
        ab = self.raw.aberration()
        return Estimate(-(ab.dz_m + perturbation_m) + self.rng.normal(0, 0.05e-6),
                        (-ab.stig_x + self.rng.normal(0, 0.01), -ab.stig_y + self.rng.normal(0, 0.01)))


class Overshooting(Oracle):
    """The first step 1.7x too long (a column wider than the one assumed), then right."""

    def __init__(self, raw, rng):
        super().__init__(raw, rng)
        self.calls = 0

    def estimate(self, img_plus, img_minus, pixel_size_m, perturbation_m):
        est = super().estimate(img_plus, img_minus, pixel_size_m, perturbation_m)
        self.calls += 1
        return Estimate(est.d_wd_m * (1.7 if self.calls == 1 else 1.0), est.d_stig)


class Learning(Oracle):
    """A method that learns from its moves: told where each location starts and where each pair was taken."""

    def __init__(self, raw, rng):
        super().__init__(raw, rng)
        self.begun, self.centres, self.stigs = 0, [], []

    def begin_location(self):
        self.begun += 1

    def estimate(self, img_plus, img_minus, pixel_size_m, perturbation_m, center_wd_m=None, center_stig=None):
        self.centres.append(center_wd_m)
        self.stigs.append(center_stig)
        return super().estimate(img_plus, img_minus, pixel_size_m, perturbation_m)


class Wrong:
    name, needs_pair = "wrong", True

    def estimate(self, img_plus, img_minus, pixel_size_m, perturbation_m):
        return Estimate(100e-6, (10.0, 10.0))


def assert_inside_windows(sem):
    lo, hi = (v * 1e-3 for v in SAFETY.wd_mm)
    assert sem.wd_calls and all(lo <= w <= hi for w in sem.wd_calls), sem.wd_calls
    assert all(SAFETY.stig[0] <= v <= SAFETY.stig[1] for xy in sem.stig_calls for v in xy), sem.stig_calls


def test_loop_converges_with_an_oracle(rig):
    raw, guard, sem = rig
    start_at(sem, 11.0, -3.2, 2.7)
    sem.set_scan(ScanParams(dwell_s=1e-6))
    tr = AutofocusLoop(sem, guard, Oracle(raw, np.random.default_rng(0)), max_iterations=6, **SCAN).run()
    ab = raw.aberration()
    assert tr.status == "converged", tr.message
    assert abs(ab.dz_m) < 0.3e-6 and max(abs(ab.stig_x), abs(ab.stig_y)) < 0.06
    assert tr.iterations[0].clamped                  # |Δstig| 3.2 > the 3.0 maximum step
    assert len(tr.iterations) <= 4
    # dose: two frames per iteration at 200 ns, recorded per iteration
    assert tr.iterations[0].images == 2 and tr.iterations[0].dose_e_per_nm2 > 0
    assert tr.dose_e_per_nm2 == pytest.approx(sum(r.dose_e_per_nm2 for r in tr.iterations))
    assert sem.dwell_time() == 1e-6                  # the operator's scan settings are back
    assert_inside_windows(sem)


def test_wrong_model_is_clamped_clipped_and_never_leaves_the_windows(rig):
    raw, guard, sem = rig
    start_at(sem, 2.0, 0.5, -0.3)
    # divergence detection off: the wrong model runs into the window edges
    tr = AutofocusLoop(sem, guard, Wrong(), max_iterations=4, collapse_fraction=0.0, patience=99, **SCAN).run()
    assert_inside_windows(sem)
    assert all(r.clamped for r in tr.iterations)
    assert all(abs(r.applied_d_wd_m) <= 40e-6 + 1e-12 for r in tr.iterations)
    assert all(max(abs(v) for v in r.applied_d_stig) <= 3.0 + 1e-9 for r in tr.iterations)
    assert any(r.clipped_to_window for r in tr.iterations)
    hi = SAFETY.wd_mm[1] * 1e-3
    assert tr.final_wd_m == pytest.approx(hi) and tr.final_stig == (5.0, 5.0)
    # next to the edge the pair is taken around a centre that keeps wd + Δ inside
    assert tr.iterations[-1].pair_center_wd_m == pytest.approx(hi - 5e-6)
    # the guard itself refuses anything outside, so the loop cannot even try
    with pytest.raises(LimitViolation):
        sem.set_working_distance(hi + 1e-6)


def test_a_first_step_past_focus_on_a_wide_aperture_column_is_not_a_divergence():
    # at 15 mrad the pair centred on focus (both frames 5 µm off) is blurrier than a pair with one
    # frame in focus, so the mean sharpness of the pair "collapsed" there and the start was restored
    wide = specimen_world(Simulation(microscope=MicroscopeParams(preset="setup-a", alpha_mrad=15.0,
                                                                 wd_focus_mm=WD0 * 1e3)), [], None)
    raw = SimSEM(wide)
    raw.connect()
    raw.set_blanked(False)
    guard = SafetyGuard(SAFETY)
    sem = GuardedSEM(raw, guard)
    sem.set_working_distance(WD0 + 10e-6)
    tr = AutofocusLoop(sem, guard, Overshooting(raw, np.random.default_rng(0)), max_iterations=3,
                       threshold_wd_m=0.0, threshold_stig=0.0, **SCAN).run()
    assert tr.status == "max_iterations", tr.message
    assert abs(sem.working_distance() - WD0) < 0.3e-6


def test_a_learning_method_is_told_each_location_and_where_each_pair_was_taken(rig):
    raw, guard, sem = rig
    m = Learning(raw, np.random.default_rng(1))
    for dz in (4.0, -3.0):
        start_at(sem, dz, 0.2, -0.1)
        tr = AutofocusLoop(sem, guard, m, max_iterations=3, threshold_wd_m=0.0, threshold_stig=0.0, **SCAN).run()
        assert m.centres[-3:] == [r.pair_center_wd_m for r in tr.iterations]
        assert m.stigs[-3:] == [r.stig for r in tr.iterations]
    assert m.begun == 2 and m.centres[0] == pytest.approx(WD0 + 4e-6)


def test_divergence_restores_the_starting_state(rig):
    raw, guard, sem = rig
    start_at(sem, 2.0, 0.5, -0.3)
    tr = AutofocusLoop(sem, guard, Wrong(), max_iterations=5, **SCAN).run()
    assert tr.status == "diverged" and tr.restored, tr.message
    assert "sharpness" in tr.message
    assert sem.working_distance() == pytest.approx(WD0 + 2e-6) and tuple(sem.stig()) == (0.5, -0.3)
    assert tr.states()[-1] == tr.states()[0]
    assert_inside_windows(sem)


def test_focus_map_recovers_a_plane():
    rng = np.random.default_rng(1)
    plane = lambda x, y: (5e-3 + 0.4e-3 * x - 0.25e-3 * y, (0.1 + 50 * x, -0.2 + 20 * y))  # noqa: E731
    fm = FocusMap()
    for x, y in rng.uniform(-2e-3, 2e-3, size=(6, 2)):
        wd, st = plane(x, y)
        fm.add(x, y, wd + rng.normal(0, 1e-9), st)
    wd, st = fm.at(0.5e-3, 1.2e-3)
    want_wd, want_st = plane(0.5e-3, 1.2e-3)
    assert wd == pytest.approx(want_wd, abs=5e-9)
    assert st == pytest.approx(want_st, abs=1e-3)
    assert fm.slope_um_per_mm() == pytest.approx((0.4, -0.25), abs=0.01)
    assert np.abs(fm.residuals_m()).max() < 5e-9
    # per-section: a section with one point answers its own value everywhere
    sm = FocusMap("section")
    sm.add(0, 0, 5.001e-3, (0.0, 0.0), section=1)
    sm.add(1e-3, 0, 5.002e-3, (0.1, 0.0), section=2)
    assert sm.at(0.5e-3, 0.5e-3, section=2)[0] == pytest.approx(5.002e-3)


def test_nelder_mead_on_sharpness_improves_focus(rig):
    raw, guard, sem = rig
    start_at(sem, 5.0, 0.8, -0.6)
    nm = NelderMeadAutofocus(sem, guard, SharpnessObjective(), max_iterations=25, initial_step=(3e-6, 0.6, 0.6),
                             dwell_s=200e-9, frame_size=(384, 384), pixel_size_m=10e-9)
    tr = nm.run()
    ab = raw.aberration()
    assert abs(ab.dz_m) < 2e-6 and np.hypot(ab.stig_x, ab.stig_y) < 0.5, (tr.message, ab)
    assert tr.iterations[-1].score < tr.iterations[0].score
    assert tr.evaluations == sum(r.images for r in tr.iterations) and tr.dose_e_per_nm2 > 0
    assert_inside_windows(sem)


def test_bench_cli_writes_the_json_schema(tmp_path):
    from autofocus.cli import app
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["bench", "--method", "sharpness-nm", "--method", "mapfost", "--method", "deepfocus",
                                   "--mapfost-calibration", "microscope", "--locations", "1", "--iterations", "2",
                                   "--nm-iterations", "2", "--frame", "512", "512", "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert set(data) == {"methods", "settings"}
    assert set(data["methods"]) == {"sharpness-nm", "mapfost", "deepfocus"}
    keys = {"iteration", "mae_wd_um", "sd_wd_um", "mae_stig", "sd_stig", "in_margin_fraction", "dose_e_per_nm2"}
    for name, m in data["methods"].items():
        assert isinstance(m["ms_per_pair"], float) and m["ms_per_pair"] > 0
        its = m["iterations"]
        assert [r["iteration"] for r in its] == list(range(len(its))) and len(its) == 3
        assert all(set(r) == keys and all(isinstance(r[k], (int, float)) for k in keys) for r in its)
        assert its[0]["dose_e_per_nm2"] == 0.0 and its[-1]["dose_e_per_nm2"] > 0
        assert 8 <= its[0]["mae_wd_um"] <= 12
    assert data["methods"]["mapfost"]["iterations"][-1]["mae_wd_um"] < 1.0
    assert "MAE wd" in res.output
    # the speed-up over MAPFoSt is measured in the same run, for pair methods only
    ratio = data["methods"]["mapfost"]["ms_per_pair"] / data["methods"]["deepfocus"]["ms_per_pair"]
    faster = [line for line in res.output.splitlines() if "x faster than mapfost" in line]
    assert len(faster) == 1 and faster[0].startswith(f"deepfocus: {ratio:.1f}x faster than mapfost")


def test_engine_adapter_registers_and_focuses(world):
    """The acquisition engine's registry gets the loop; a simulated setup's
    MAPFoSt uses the simulator's calibration and ends in focus."""
    from types import SimpleNamespace

    from acq.autofocus_step import AUTOFOCUS_METHODS, AutofocusRequest
    from autofocus import engine_adapter
    assert {"mapfost", "deepfocus", "sharpness-nm", "deepscore-nm"} <= set(AUTOFOCUS_METHODS)
    raw = SimSEM(world)
    raw.connect()
    raw.set_blanked(False)
    guard = SafetyGuard(SAFETY)
    setup = SimpleNamespace(sem=GuardedSEM(raw, guard), guard=guard, world=world,
                            config=SimpleNamespace(calibration=Calibration()))
    setup.sem.set_working_distance(WD0 - 6e-6)
    setup.sem.set_stig(0.6, -0.4)
    res = AUTOFOCUS_METHODS["mapfost"](setup, AutofocusRequest(center_um=(0, 0), pixel_size_m=10e-9,
                                                                frame_size=(256, 256), dwell_s=200e-9))
    assert res.ok, res.message
    ab = raw.aberration()
    assert abs(ab.dz_m) < 0.5e-6 and max(abs(ab.stig_x), abs(ab.stig_y)) < 0.1
    assert res.wd_m == setup.sem.working_distance() and res.trace.iterations
    assert engine_adapter.LAST_TRACES[-1] is res.trace


def test_deepfocus_refuses_a_frame_smaller_than_its_patch_before_acquiring(rig):
    """The shipped model works at 20 nm: a 200 px frame at 10 nm (100 px once
    resampled) is below its 128 px patch; the loop says so before it spends
    any dose and leaves the SEM where it started."""
    from autofocus.methods import make_pair_method
    raw, guard, sem = rig
    start_at(sem, 6.0, 0.5, -0.5)
    method = make_pair_method("deepfocus", sem=sem)
    tr = AutofocusLoop(sem, guard, method, perturbation_m=5e-6, max_iterations=3, dwell_s=100e-9,
                       frame_size=(200, 200), pixel_size_m=10e-9).run()
    assert tr.status == "failed" and "refused before acquiring" in tr.message and "128² patch" in tr.message
    assert tr.evaluations == 0 and not tr.iterations and not sem.wd_calls and not sem.stig_calls
    assert sem.working_distance() == pytest.approx(WD0 + 6e-6) and sem.stig() == pytest.approx((0.5, -0.5))


def test_methods_are_built_once_per_microscope_and_go_with_it(world, monkeypatch):
    """Models load once per SEM (not per autofocus), and what was built for a
    SEM is dropped with it: a later SEM never inherits a stale calibration."""
    import gc
    import weakref
    from types import SimpleNamespace

    from acq.autofocus_step import AutofocusRequest
    from autofocus import engine_adapter
    built = []
    monkeypatch.setattr(engine_adapter, "make_pair_method", lambda name, **kw: built.append(name) or Oracle(
        kw["sem"].inner, np.random.default_rng(0)))
    guard = SafetyGuard(SAFETY)
    raw = SimSEM(world)
    raw.connect()
    setup = SimpleNamespace(sem=GuardedSEM(raw, guard), guard=guard, world=world,
                            config=SimpleNamespace(calibration=Calibration()))
    req = AutofocusRequest(center_um=(0, 0), pixel_size_m=10e-9, frame_size=(256, 256), dwell_s=200e-9)
    gc.collect()
    before = len(engine_adapter._BUILT)
    first = engine_adapter._pair_method(setup, "mapfost", req)
    assert engine_adapter._pair_method(setup, "mapfost", req) is first and built == ["mapfost"]
    gone = weakref.ref(setup.sem)
    del setup, first
    gc.collect()
    assert gone() is None                    # nothing the cache holds keeps the SEM alive
    assert len(engine_adapter._BUILT) <= before          # and its entry went with it


def test_acq_knows_only_its_own_methods_until_the_application_registers(tmp_path):
    """acq never imports autofocus: a process that validates a plan without
    registering gets acq's own methods and a clear error for the others."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    code = ("import sys\n"
            "from acq.autofocus_step import AUTOFOCUS_METHODS\n"
            "from acq.plan import AutofocusStep\n"
            "from devices.setup_config import ConfigError, validate_config\n"
            "print(sorted(AUTOFOCUS_METHODS), 'autofocus' in sys.modules)\n"
            "try:\n    validate_config(AutofocusStep, {'method': 'mapfost'}, 'p.yaml')\n"
            "except ConfigError as e:\n    print(e)\n"
            "import autofocus\nautofocus.register_methods()\n"
            "print(validate_config(AutofocusStep, {'method': 'mapfost'}, 'p.yaml').method)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0] == "['none', 'sem-builtin', 'sweep'] False"
    assert "method = 'mapfost'" in out and "unknown autofocus method 'mapfost'" in out
    assert "allowed ['none', 'sem-builtin', 'sweep']" in out and out.splitlines()[-1] == "mapfost"


def test_a_misspelt_method_names_the_field_and_the_nearest_method():
    from acq.plan import AutofocusStep
    from devices.setup_config import ConfigError, validate_config
    with pytest.raises(ConfigError) as e:
        validate_config(AutofocusStep, {"method": "sem_builtin"}, "p.yaml")
    msg = str(e.value)
    assert "method = 'sem_builtin'" in msg and "did you mean 'sem-builtin'?" in msg and "'mapfost'" in msg
