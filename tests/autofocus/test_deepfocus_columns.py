"""The shipped DeepFocus on columns other than the default one (issue 15):
the setup's stated probe half-angle scales its reading, and the loop learns
the column from its own moves where the setup states none."""
import numpy as np
import pytest

from autofocus import linearity
from autofocus.data import DataConfig, PairSimulator
from autofocus.inference import Prediction
from autofocus.recalibrate import column_alpha_mrad
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


class _Reading:
    """Stands in for the network: a fixed referenced reading."""
    alpha_ref_mrad = 8.0

    def predict(self, *a, **k):
        return Prediction(d_wd_m=9e-6, d_stig=(4.5, -2.25), sd=(0.9e-6, 0.45, 0.45), per_patch=np.zeros((4, 3)),
                          weights=np.full(4, 0.25))


def test_the_method_divides_readings_by_the_column_scale_and_learns_from_pair_centres():
    m = DeepFocusMethod(MODEL, column_alpha_mrad=12.0)
    assert m.column.saturation == pytest.approx(0.75 * m.predictor.card["training_data"]["target_clip"][0])
    assert m.column.bounds == pytest.approx((2.25 / 2.25, 2.25 * 2.25))       # a stated α moves 1.5x at most
    m.predictor = _Reading()
    img = np.zeros((256, 256), np.uint8)
    est = m.estimate(img, img, 10e-9, 5e-6)
    assert est.d_wd_m == pytest.approx(4e-6) and est.d_stig == pytest.approx((2.0, -1.0))
    assert est.sd == pytest.approx((0.4e-6, 0.2, 0.2))
    # two pairs 4 µm apart reading the same: no slope yet (the ridge keeps the prior) ...
    m.begin_location()
    m.estimate(img, img, 10e-9, 5e-6, center_wd_m=5.000e-3)
    assert m.column.value == pytest.approx(2.25)
    # ... and pairs of a new location are not fitted together with the last one
    m.begin_location()
    assert len(m.column.locations) == 2 and len(m.column.locations[0]) == 1
    assert DeepFocusMethod(MODEL).column.bounds[0] < 2.25 / 2.25 ** 2          # unstated: the trained range


def test_recalibrate_reads_the_probe_half_angle_of_a_column_from_its_pairs():
    sim = PairSimulator(DataConfig(patch=512, procedural_seeds=(0,), procedural_slices=(0,), pixel_nm=10.0,
                                   augment=False))
    rng = np.random.default_rng(3)
    col = _column(12.0)
    triples = []
    for dz in (-9.0, -6.0, -4.0, 4.0, 6.0, 9.0):
        x, y, _ = sim.sample(rng, ab=(dz, 0.5, -0.5), mp=col, dwell_ns=200.0)
        triples.append((x[0, 0], x[0, 1], y))
    assert column_alpha_mrad(DeepFocusMethod(MODEL), triples, 10e-9, 5e-6) == pytest.approx(12.0, rel=0.2)


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
