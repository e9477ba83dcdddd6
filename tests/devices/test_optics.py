"""The probe model of the simulated SEM behaves like an SEM's."""
import math

import numpy as np
import pytest

from devices.sim import optics
from devices.setup_config import Simulation
from devices.sim.frames import render_frame, specimen_world

ALPHA, SIGMA0 = 3e-3, 1.5e-9
SCALE = (3e-6, 3e-6)


def cov(dz_um, sx=0.0, sy=0.0, theta_deg=0.0):
    return optics.probe_covariance(optics.Aberration(dz_um * 1e-6, sx, sy), ALPHA, SIGMA0, SCALE,
                                   math.radians(theta_deg))


def major_axis_deg(c):
    w, v = np.linalg.eigh(c)
    x, y = v[:, 1]
    return math.degrees(math.atan2(y, x)) % 180


def test_defocus_sign_symmetric_without_astigmatism_and_not_with_it():
    assert np.allclose(cov(+5), cov(-5), rtol=1e-9, atol=0)
    assert not np.allclose(cov(+5, sx=1.0), cov(-5, sx=1.0), rtol=1e-3, atol=0)
    # the two line foci: + and − defocus stretch the probe along perpendicular axes
    assert abs((major_axis_deg(cov(+5, sx=1.0)) - major_axis_deg(cov(-5, sx=1.0))) % 180 - 90) < 1e-6


@pytest.mark.parametrize("theta", [0.0, 15.0, 40.0])
def test_stig_x_and_y_stretch_along_predicted_axes(theta):
    # with positive defocus, stig x stretches along θ and stig y along θ + 45°
    assert major_axis_deg(cov(4, sx=1.0, theta_deg=theta)) == pytest.approx(theta % 180, abs=1e-6)
    assert major_axis_deg(cov(4, sy=1.0, theta_deg=theta)) == pytest.approx((theta + 45) % 180, abs=1e-6)


def test_probe_size_grows_linearly_with_defocus():
    sd = [math.sqrt(cov(dz)[0, 0] - SIGMA0 ** 2) for dz in (5, 10, 20)]
    assert sd[1] / sd[0] == pytest.approx(2.0, rel=1e-6) and sd[2] / sd[0] == pytest.approx(4.0, rel=1e-6)
    assert sd[0] == pytest.approx(ALPHA / 2 * 5e-6, rel=1e-6)


def test_otf_is_unity_at_dc_and_pillbox_has_zeros():
    c = cov(10) - SIGMA0 ** 2 * np.eye(2)
    g = optics.probe_otf((64, 64), 5e-9, c, SIGMA0, "gaussian")
    p = optics.probe_otf((64, 64), 5e-9, c, SIGMA0, "pillbox")
    assert g[0, 0] == pytest.approx(1.0) and p[0, 0] == pytest.approx(1.0)
    assert (p < -1e-3).any() and (g >= 0).all()


def _sharpness(img):
    # gradient energy after a light smoothing, so shot noise does not dominate
    from scipy.ndimage import gaussian_filter
    f = gaussian_filter(img.astype(np.float32), 1.0)
    return float(np.mean(np.diff(f, axis=0) ** 2) + np.mean(np.diff(f, axis=1) ** 2))


@pytest.fixture(scope="module")
def world():
    return specimen_world(Simulation(), [], None)


def _frame(world, dz_um=0.0, sx=0.0, sy=0.0, dwell_ns=800.0, seed=3, current=None):
    img, _ = render_frame(world, defocus_m=dz_um * 1e-6, stig=(sx, sy), dwell_s=dwell_ns * 1e-9,
                          pixel_m=4e-9, size=(256, 256), seed=seed, current_a=current)
    return img


def test_sharpness_is_maximal_at_focus(world):
    s = {dz: _sharpness(_frame(world, dz)) for dz in (-8, -4, -2, 0, 2, 4, 8)}
    assert max(s, key=s.get) == 0
    assert s[0] > 1.3 * s[4] and s[4] > s[8]


def test_plus_minus_defocus_pair_distinguishes_astigmatism(world):
    a, b = _frame(world, +5), _frame(world, -5)
    assert _sharpness(a) == pytest.approx(_sharpness(b), rel=0.1)
    a, b = _frame(world, +5, sx=2.0), _frame(world, -5, sx=2.0)
    # blur direction from the gradient structure tensor swaps between the foci
    def blur_dir(img):
        f = img.astype(np.float32)
        gy, gx = np.gradient(f)
        t = np.array([[np.mean(gx * gx), np.mean(gx * gy)], [np.mean(gx * gy), np.mean(gy * gy)]])
        w, v = np.linalg.eigh(t)
        return math.degrees(math.atan2(v[1, 0], v[0, 0])) % 180   # least gradient = stretch
    d = (blur_dir(a) - blur_dir(b)) % 180
    assert abs(d - 90) < 20


def test_snr_grows_with_sqrt_of_current_times_dwell(world):
    def noise_sd(dwell_ns, current):
        a = _frame(world, 0, dwell_ns=dwell_ns, seed=5, current=current).astype(np.float32)
        # same field, different noise: render twice with different noise streams
        from devices.sim.sem import render
        from devices.sim.frames import location_for_seed
        rng = np.random.default_rng(99)
        b = render(world, location_for_seed(5), 4e-9, (256, 256), 0.0, optics.Aberration(0, 0, 0),
                   current, dwell_ns * 1e-9, rng).astype(np.float32)
        return np.std(a - b) / math.sqrt(2)
    base = noise_sd(100, 1e-9)
    assert noise_sd(400, 1e-9) == pytest.approx(base / 2, rel=0.15)
    assert noise_sd(100, 4e-9) == pytest.approx(base / 2, rel=0.15)
    assert noise_sd(25, 1e-9) == pytest.approx(base * 2, rel=0.15)


def test_same_seed_same_field_of_view(world):
    a = _frame(world, 0, seed=8).astype(float)
    b = _frame(world, 6, seed=8).astype(float)
    c = _frame(world, 0, seed=9).astype(float)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.5
    assert abs(np.corrcoef(a.ravel(), c.ravel())[0, 1]) < 0.3
