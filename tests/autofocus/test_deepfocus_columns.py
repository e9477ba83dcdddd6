"""The shipped DeepFocus on columns other than the default one (issue 15):
the setup's stated probe half-angle scales its reading, and the loop learns
the column from its own moves where the setup states none."""
import pytest

from autofocus import linearity
from autofocus.bench import BenchSettings, SimBench, build_runner, run_method
from autofocus.methods import MODELS_DIR, DeepFocusMethod
from devices.setup_config import MicroscopeParams, load_setup
from tests.support import ROOT

MODEL = MODELS_DIR / "deepfocus_128.pt"


def _column(alpha_mrad: float) -> MicroscopeParams:
    return MicroscopeParams(preset="setup-a", alpha_mrad=alpha_mrad, wd_focus_mm=5.0)


@pytest.mark.parametrize("alpha", [3.0, 15.0])
def test_a_stated_probe_half_angle_makes_the_first_step_read_the_defocus(alpha):
    rows = linearity.measure(lambda a: DeepFocusMethod(MODEL, column_alpha_mrad=a), [alpha], locations=1,
                             defocus_um=(-10.0, 10.0), frame=(768, 768))
    for r in rows:
        assert r.relative_error < 0.35, r
    # the same pairs read as the unstated default column (10.6 mrad) are off by (α/10.6)²
    plain = linearity.measure(lambda a: DeepFocusMethod(MODEL), [alpha], locations=1, defocus_um=(10.0,),
                              frame=(768, 768))
    assert abs(plain[0].predicted_um / rows[1].predicted_um - (alpha / 10.6) ** 2) < 0.3 * (alpha / 10.6) ** 2


def test_on_a_column_the_setup_says_nothing_about_the_loop_learns_its_alpha_and_focuses():
    cfg = load_setup(ROOT / "configs" / "sim.yaml")
    st = BenchSettings(methods=("deepfocus_128",), locations=3, iterations=3, dwell_s=200e-9, frame=(768, 768),
                       pixel_m=10e-9, stop_at_threshold=False, column_alpha_mrad=None)
    bench = SimBench(cfg, st, _column(15.0))
    runner = build_runner("deepfocus_128", bench)
    res = run_method("deepfocus_128", bench, [(0.0, 0.0), (60e-6, 0.0), (0.0, 60e-6)],
                     [(10.0, -3.0, 3.0), (-9.0, -2.5, 2.0), (11.0, -2.0, 3.5)], progress=lambda s: None,
                     runner=runner, time_it=False)
    assert res.column["stated_alpha_mrad"] is None
    assert res.column["learned_alpha_mrad"] == pytest.approx(15.0, rel=0.25)
    last = res.summary()[-1]
    assert last["in_margin_fraction"] == 1.0, res.summary()
