"""GCIB post-processing on synthetic sub-stacks with a known breakthrough map."""

import numpy as np
import pytest
from scipy import ndimage

from wafer.postprocess import (breakthrough_contrast, flatten, last_tissue_index, mill_rate, mill_rate_map, ncc,
                               order_from_scores, order_substacks, otsu_threshold, raw_last_tissue_index,
                               wafer_level_threshold, wafer_mask)

Z, H, W = 40, 64, 64
NOISE = 6.0


def true_cycles(seed=0):
    """Smoothly varying number of mill cycles to remove the tissue (20..32)."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=(H, W)), 8)
    field = (field - field.min()) / (field.max() - field.min())
    return np.rint(20 + 12 * field).astype(int)


def synthetic_stack(cycles, seed=0, wafer_bright=True):
    """Slice k shows tissue where k < cycles (intensity depends on depth k / cycles
    plus a fixed texture), else the wafer; Gaussian noise on everything."""
    rng = np.random.default_rng(seed + 1)
    k = np.arange(Z)[:, None, None]
    depth = k / cycles[None]
    texture = ndimage.gaussian_filter(rng.normal(size=(H, W)), 1.5) * 8
    tissue = 60 + 60 * depth + texture[None]
    wafer = np.full((Z, H, W), 220.0)
    stack = np.where(k < cycles[None], tissue, wafer) + rng.normal(0, NOISE, (Z, H, W))
    if not wafer_bright:
        stack = 255.0 - stack
    return stack


def test_otsu_splits_two_populations():
    rng = np.random.default_rng(0)
    v = np.r_[rng.normal(80, 5, 5000), rng.normal(200, 5, 3000)]
    assert 100 < otsu_threshold(v) < 180


@pytest.mark.parametrize("bright", [True, False])
def test_last_tissue_index_recovers_truth(bright):
    cycles = true_cycles()
    stack = synthetic_stack(cycles, wafer_bright=bright)
    raw = raw_last_tissue_index(wafer_mask(stack))  # polarity detected from the data
    assert (raw == cycles - 1).mean() > 0.99
    est = last_tissue_index(stack)  # Otsu + sigma = 1 smoothing
    err = est - (cycles - 1)
    assert abs(err.mean()) < 0.1
    assert np.abs(err).max() < 1.5


def test_mill_rate_within_noise():
    cycles = true_cycles(seed=2)
    stack = synthetic_stack(cycles, seed=2)
    thickness, duration = 200.0, 30.0
    r = mill_rate(stack, thickness, duration)
    assert r.n_pixels == H * W and r.n_censored == 0
    assert r.mean_cycles == pytest.approx(cycles.mean(), rel=0.01)
    assert r.sd_cycles == pytest.approx(cycles.std(), rel=0.15)  # sigma=1 smoothing trims the spread a bit
    assert r.nm_per_cycle == pytest.approx(thickness / cycles.mean(), rel=0.01)
    assert r.nm_per_s == pytest.approx(r.nm_per_cycle / duration)
    # first-order propagation: relative error of the rate = relative error of the cycles
    assert r.nm_per_cycle_sd / r.nm_per_cycle == pytest.approx(r.sd_cycles / r.mean_cycles)
    assert r.nm_per_s_sd / r.nm_per_s == pytest.approx(r.sd_cycles / r.mean_cycles)


def test_mill_rate_leaves_out_pixels_that_never_broke_through():
    cycles = true_cycles(seed=3)
    cycles[:10, :10] = Z + 5  # tissue still there at the end of the stack
    stack = synthetic_stack(cycles, seed=3)
    r = mill_rate(stack, 200.0, 30.0, wafer_threshold=170.0)
    assert r.n_censored == 100 and r.n_pixels == H * W - 100
    assert r.mean_cycles == pytest.approx(cycles[cycles < Z].mean(), rel=0.01)


def test_flatten_puts_one_depth_in_each_slice():
    cycles = true_cycles(seed=4)
    stack = synthetic_stack(cycles, seed=4)
    flat = flatten(stack, last_tissue_index(stack))
    assert flat.shape == stack.shape
    # Before: at mid-stack some pixels are wafer, others tissue. After: every
    # slice is one depth fraction, so across-pixel spread is texture + noise.
    before = stack.reshape(Z, -1).std(axis=1)
    after = flat.reshape(Z, -1).std(axis=1)
    assert before[25] > 30
    assert after.max() < 12
    # The depth profile is the tissue's: 60 + 60 * depth, from the top to the last tissue slice.
    expected = 60 + 60 * np.linspace(0, (cycles - 1).mean() / cycles.mean(), Z)
    np.testing.assert_allclose(flat.reshape(Z, -1).mean(axis=1), expected, atol=3.0)


def test_flatten_with_exact_index_is_interpolation():
    stack = np.arange(4 * 2 * 1, dtype=float).reshape(4, 2, 1) * np.array([1.0, 10.0])[None, :, None]
    L = np.array([[1.0], [3.0]])  # column 0: slices 0..1 stretched over 4; column 1 unchanged
    out = flatten(stack, L)
    np.testing.assert_allclose(out[:, 0, 0], np.linspace(stack[0, 0, 0], stack[1, 0, 0], 4))
    np.testing.assert_allclose(out[:, 1, 0], stack[:, 1, 0])


def test_order_substacks_recovers_shuffled_order():
    rng = np.random.default_rng(7)
    volume = ndimage.gaussian_filter(rng.normal(size=(48, 40, 40)), (3, 2, 2))
    chunks = [volume[i:i + 6] for i in range(0, 48, 6)]
    perm = rng.permutation(len(chunks))
    shuffled = [chunks[i] + rng.normal(0, 0.02 * volume.std(), chunks[i].shape) for i in perm]
    res = order_substacks(shuffled)
    assert [int(perm[i]) for i in res.order] == list(range(len(chunks)))
    assert min(res.link_scores) > 0.5
    assert res.score_matrix.shape == (8, 8)


def test_ncc_basics():
    a = np.random.default_rng(1).normal(size=(16, 16))
    assert ncc(a, a) == pytest.approx(1.0)
    assert ncc(a, -a) == pytest.approx(-1.0)
    assert ncc(a, 3 * a + 5) == pytest.approx(1.0)
    assert ncc(np.ones((4, 4)), a[:4, :4]) == 0.0


def test_mill_rate_map_per_pixel_with_unequal_mills():
    cycles = true_cycles(seed=5)
    stack = synthetic_stack(cycles, seed=5)
    seconds = np.arange(Z) * 30.0
    seconds[10:] += 15.0                        # the mill before slice 10 ran 45 s instead of 30
    m = mill_rate_map(stack, 200.0, seconds, sigma=0)
    np.testing.assert_allclose(m["cycles"], cycles)
    np.testing.assert_allclose(m["nm_per_cycle"], 200.0 / cycles)
    np.testing.assert_allclose(m["nm_per_s"], 200.0 / (cycles * 30.0 + 15.0))


def test_wafer_level_threshold_sits_near_the_wafer():
    cycles = true_cycles(seed=6)
    stack = synthetic_stack(cycles, seed=6)     # wafer 220 +- 6, tissue up to ~130
    thr = wafer_level_threshold(stack, wafer_bright=True, k=4.0)
    assert otsu_threshold(stack) < thr < 220 - 3 * NOISE
    dark = wafer_level_threshold(255.0 - stack, wafer_bright=False, k=4.0)
    assert dark == pytest.approx(255.0 - thr, abs=1.0)


def test_breakthrough_contrast_tells_a_step_from_noise():
    cycles = true_cycles(seed=8)
    stack = synthetic_stack(cycles, seed=8)
    step = breakthrough_contrast(stack, cycles - 1)
    assert step.min() > 60                      # tissue (60..120) -> wafer (220)
    still = np.repeat(stack[:1], Z, axis=0) + np.random.default_rng(9).normal(0, NOISE, stack.shape)
    assert np.abs(breakthrough_contrast(still, cycles - 1)).max() < 4 * NOISE
    assert np.isnan(breakthrough_contrast(stack, np.full((H, W), Z - 1))).all()   # no slice after


def test_order_from_scores_skips_pairs_without_a_score():
    S = np.array([[0, 0.9, np.nan], [0.1, 0, 0.8], [0.2, np.nan, 0]])
    res = order_from_scores(S)
    assert res.order == [0, 1, 2] and res.link_scores == pytest.approx([0.9, 0.8])
