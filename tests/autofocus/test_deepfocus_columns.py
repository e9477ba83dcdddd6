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
from autofocus.move_slope import STIG_RECENT_LOCATIONS
from devices.setup_config import MicroscopeParams, Simulation, load_setup
from devices.sim.frames import render_frame, specimen_world
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
    pixel_size_m = 20e-9
    patch = 128

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


class _Specimen(_Reading):
    """Stands in for the network on a specimen that shows stig x at 1.3 and stig y
    at 0.6 of the error (astigmatism shows only along directions with edges)."""
    show = (1.3, 0.6)

    def __init__(self):
        self.stig_error, self.wd_error_m = (0.0, 0.0), 0.0

    def predict(self, *a, **k):
        d = tuple(-g * e for g, e in zip(self.show, self.stig_error))
        return Prediction(d_wd_m=-self.wd_error_m, d_stig=d, sd=(0.1e-6, 0.05, 0.05), per_patch=np.zeros((4, 3)),
                          weights=np.full(4, 0.25))


def _focus_stig(m, spec, start, steps=3, wd_error_m=0.3e-6):
    """The loop's stig moves at one location: what is left after ``steps``."""
    img = np.zeros((256, 256), np.uint8)
    m.begin_location()
    s = np.array(start, float)
    for _ in range(steps):
        spec.stig_error, spec.wd_error_m = tuple(s), wd_error_m
        est = m.estimate(img, img, 10e-9, 5e-6, center_wd_m=5e-3, center_stig=tuple(s))
        s = s + np.array(est.d_stig)
    return np.abs(s)


def test_the_method_learns_how_strongly_the_specimen_shows_each_stigmator_axis():
    spec = _Specimen()
    fixed = (1 - 0.6) ** 3 * 3.0                  # what three steps leave of stig y at the model's own gain
    m = DeepFocusMethod(MODEL, column_alpha_mrad=8.0)
    m.predictor = spec
    assert [g.value for g in m.stig_gains] == [1.0, 1.0]
    # a near-focus touch-up (moves of 0.05) teaches next to nothing: the readings' scatter is that size
    _focus_stig(m, spec, (0.05, -0.05))
    assert [g.value for g in m.stig_gains] == pytest.approx([1.0, 1.0], abs=0.01)
    # the seed's large start (after the clamped first step): the first location's moves teach both
    # axes, and the next location starts with them
    first = _focus_stig(m, spec, (-3.0, 3.0))
    assert first[1] < fixed / 2
    second = _focus_stig(m, spec, (-3.0, 3.0))
    assert np.all(second < 0.05) and second[1] < fixed / 10
    assert [g.value for g in m.stig_gains] == pytest.approx(spec.show, rel=0.15)
    rep = m.column_report()
    assert rep["stig_gain"] == pytest.approx(spec.show, rel=0.15) and "stigmator read at" in rep["line"]


def test_the_stigmator_gain_follows_a_new_specimen():
    """A weeks-long run moves on to other sections and wafers: the gain pools the latest locations."""
    spec = _Specimen()
    m = DeepFocusMethod(MODEL, column_alpha_mrad=8.0)
    m.predictor = spec
    for _ in range(5):
        _focus_stig(m, spec, (-3.0, 3.0))
    spec.show = (0.7, 1.0)
    for _ in range(STIG_RECENT_LOCATIONS):
        _focus_stig(m, spec, (-3.0, 3.0))
    assert [g.value for g in m.stig_gains] == pytest.approx(spec.show, rel=0.05)
    assert len(m.stig_gains[0].locations) == STIG_RECENT_LOCATIONS


def test_stigmator_readings_far_from_focus_teach_no_gain():
    spec = _Specimen()
    m = DeepFocusMethod(MODEL, column_alpha_mrad=8.0)
    m.predictor = spec
    _focus_stig(m, spec, (-3.0, 3.0), wd_error_m=30e-6)     # 30 µm out: astigmatism reads unlike near focus
    assert [g.value for g in m.stig_gains] == [1.0, 1.0]
    assert not any(g.has_slope for g in m.stig_gains)


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
    # every location inside the margins: the learned α reads low (the network reads wide columns
    # low), so the stig steps come out up to ~1.8x long, and the stigmator gain learned from the
    # moves takes that up (stage V without it left 0.46 at one of the three locations, T 0.38-0.40)
    final = np.abs(res.errors[:, -1])
    assert np.all(final[:, 0] < 1.0) and np.all(final[:, 1:] < 0.25), final
    assert all(g > 1.2 for g in res.column["stig_gain"]), res.column


def test_a_narrow_column_is_read_at_its_own_frame_pixel_and_errs_less_near_focus():
    """3 mrad: a ±5 µm pair blurs by ~1 px at the card's 20 nm; fed at the
    frame's 10 nm the first step near focus errs about a third as much."""
    world = specimen_world(Simulation(microscope=_column(3.0)), [], None)
    m = DeepFocusMethod(MODEL, column_alpha_mrad=3.0)
    card_px = m.predictor.pixel_size_m
    assert m.model_pixel_m((768, 1024), 10e-9) == pytest.approx(10e-9)        # never finer than the frame
    fed_at_card = DeepFocusMethod(MODEL, column_alpha_mrad=3.0)
    fed_at_card.model_pixel_m = lambda shape, px: card_px
    own, card = [], []
    for dz in (-3.0, -1.0, 1.0, 3.0):
        for loc in range(4):
            plus, minus = (render_frame(world, defocus_m=(dz + s * 5.0) * 1e-6, stig=(0.0, 0.0), dwell_s=50e-9,
                                        pixel_m=10e-9, size=(768, 768), seed=loc)[0] for s in (1, -1))
            own.append(m.estimate(plus, minus, 10e-9, 5e-6).d_wd_m * 1e6 + dz)       # the correction is −dz
            card.append(fed_at_card.estimate(plus, minus, 10e-9, 5e-6).d_wd_m * 1e6 + dz)
    rms_own, rms_card = np.sqrt(np.mean(np.square(own))), np.sqrt(np.mean(np.square(card)))
    assert rms_own < 0.6 and rms_own < 0.6 * rms_card, (rms_own, rms_card)


def test_a_wide_column_is_fed_coarser_but_keeps_two_patches_across_the_frame():
    m = DeepFocusMethod(MODEL, column_alpha_mrad=15.0)
    px = m.model_pixel_m((768, 1024), 10e-9)
    assert m.predictor.pixel_size_m < px <= 768 * 10e-9 / (2 * m.predictor.patch) + 1e-15
    # a larger frame is fed no coarser than 1.5x the card's pixel (there the first step reads alike)
    assert m.model_pixel_m((1536, 2048), 10e-9) == pytest.approx(1.5 * m.predictor.pixel_size_m)
    narrow = DeepFocusMethod(MODEL, column_alpha_mrad=10.0)       # 25 nm: below the cap
    assert narrow.model_pixel_m((1536, 2048), 10e-9) == pytest.approx(25e-9)
    # a recalibrated (column-specific) model reads at its card's pixel whatever the column
    m.alpha_ref_mrad = None
    assert m.model_pixel_m((768, 1024), 10e-9) == m.predictor.pixel_size_m


def test_the_stigmator_map_is_fitted_where_the_loop_ends_near_focus():
    """A network reads stig 1.3x stronger on pairs far from focus than near it:
    the map must correct the near-focus readings in full (the loop's last
    steps decide the margin), not the average over both."""
    from autofocus import stig_map
    rng = np.random.default_rng(0)
    axes = np.array([[0.0, 1.4], [-1.1, 0.0]])           # this column's stig -> the model's reading
    wd = np.r_[rng.uniform(-3, 3, 40), rng.uniform(-20, 20, 40)]
    stig = np.r_[rng.uniform(-0.75, 0.75, (40, 2)), rng.uniform(-5, 5, (40, 2))]
    over = np.where(np.abs(wd) > 8, 1.3, 1.0)[:, None]
    read = np.c_[wd, stig @ axes * over + rng.normal(0, 0.02, (80, 2))]
    truth = np.c_[wd, stig]
    near_gain = stig_map.apply(stig_map.fit(read, truth), 0.0, (0.0, 1.4))   # the model's reading of stig x = 1
    assert near_gain[0] == pytest.approx(1.0, abs=0.05) and abs(near_gain[1]) < 0.05
    # with too few pairs near focus it falls back to all of them, rather than refuse
    few = np.r_[np.arange(stig_map.MIN_NEAR_PAIRS - 1), np.arange(40, 80)]
    assert stig_map.fit(read[few], truth[few]).shape == (3, 2)


def test_every_column_reads_as_much_of_the_frame_as_the_seeds_traces():
    """A narrow column is fed at its frame pixel, a reference one at twice it: each reads at least the
    seed's ten 384² patch pairs of frame, so the narrow one averages as many electrons."""
    from autofocus.inference import MIN_PATCHES, SEED_READ_PX
    shape, px = (1536, 2048), 10e-9
    frame = np.zeros(shape, np.uint8)
    read = {}
    for alpha in (3.0, 8.0):
        m = DeepFocusMethod(MODEL, column_alpha_mrad=alpha)
        feed = m.model_pixel_m(shape, px)
        n = m.estimate(frame, frame, px, 5e-6).patches
        read[alpha] = (n, n * (m.predictor.patch * feed / px) ** 2)
    assert read[3.0][1] >= SEED_READ_PX and read[8.0][1] >= SEED_READ_PX
    assert read[3.0][0] >= 3.5 * read[8.0][0]
    # a small frame: the patches that tile it once, never fewer than MIN_PATCHES; a count asked for wins
    p = DeepFocusMethod(MODEL).predictor
    assert p.patches_for((768, 768), px, 10e-9) == 36 and p.patches_for((256, 256), px, 20e-9) == MIN_PATCHES
    assert DeepFocusMethod(MODEL, n_patches=7).estimate(frame, frame, px, 5e-6).patches == 7
