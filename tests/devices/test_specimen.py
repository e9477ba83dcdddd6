"""Specimen signal: what a user of the simulated SEM would notice."""
from pathlib import Path

import cv2
import numpy as np
import pytest

from devices.sim.specimen import Specimen

ISBI = Path(__file__).parents[3] / "shared" / "data" / "em" / "isbi2012"
P = 4e-9


def corr(a, b):
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.fixture(scope="module")
def proc():
    return Specimen(seed=3, procedural_size=512)


@pytest.fixture(scope="module")
def isbi():
    files = sorted(ISBI.glob("isbi2012_train_*.png"))
    if not files:
        pytest.skip(f"ISBI images not available at {ISBI}")
    return Specimen(images=files, texture_pixel_size_m=4e-9, slice_thickness_m=50e-9)


def test_output_type_range_and_determinism(proc):
    a = proc.sample((0.3e-6, -0.2e-6), P, (300, 400), 0.2, 120e-9)
    assert a.shape == (300, 400) and a.dtype == np.float32
    assert 0.0 <= a.min() and a.max() <= 1.0
    fresh = Specimen(seed=3, procedural_size=512)
    np.testing.assert_array_equal(a, fresh.sample((0.3e-6, -0.2e-6), P, (300, 400), 0.2, 120e-9))
    np.testing.assert_array_equal(a, proc.sample((0.3e-6, -0.2e-6), P, (300, 400), 0.2, 120e-9))


def test_procedural_looks_like_neuropil_and_depends_on_seed(proc):
    a = proc.slice_image(0)
    dark = (a < 0.35).mean()
    assert 0.03 < dark < 0.4, dark                 # membranes, mitochondria, myelin
    assert 0.45 < a.mean() < 0.8
    other = Specimen(seed=4, procedural_size=512).slice_image(0)
    assert abs(corr(a, other)) < 0.2


def test_aligned_unrotated_sampling_reproduces_the_texture(proc):
    tex = proc.slice_image(0)
    n = tex.shape[0]
    a = proc.sample((0.0, 0.0), P, (n, n))         # the tile is centred on the origin
    np.testing.assert_allclose(a, tex, atol=1e-6)
    # a half-pixel shift interpolates between neighbours
    b = proc.sample((P / 2, 0.0), P, (n, n))
    np.testing.assert_allclose(b[:, 10:-10], 0.5 * (tex[:, 10:-10] + tex[:, 11:-9]), atol=1e-3)


def test_mirrored_tiling_has_no_seam(proc):
    n = proc.slice_image(0).shape[0]
    edge = n * P / 2                               # a mirror line of the tiling
    a = proc.sample((edge, 0.0), P, (n, 200))
    jumps = np.abs(np.diff(a, axis=1)).mean(axis=0)
    at_seam = jumps[99]                            # columns 99 | 100 straddle the mirror line
    assert at_seam <= np.percentile(jumps, 60)
    np.testing.assert_allclose(a[:, 99], a[:, 100], atol=1e-5)     # reflection, not a jump
    far = proc.sample((7 * edge, -5 * edge), P, (64, 64))          # many periods away still works
    assert np.isfinite(far).all() and far.std() > 0.02


def test_coarse_pixels_match_downscaled_fine_pixels(proc):
    fine = proc.sample((0.1e-6, 0.05e-6), P, (512, 512))
    coarse = proc.sample((0.1e-6, 0.05e-6), 4 * P, (128, 128))
    down = cv2.resize(fine, (128, 128), interpolation=cv2.INTER_AREA)
    assert corr(down, coarse) > 0.9
    assert abs(down.mean() - coarse.mean()) < 0.02
    very = proc.sample((0.0, 0.0), 1e-6, (64, 64))               # overview: averaged out, no aliasing
    assert very.std() < 0.05


def test_rotation_rotates_content(proc):
    a = proc.sample((0.0, 0.0), P, (201, 201), 0.0)
    b = proc.sample((0.0, 0.0), P, (201, 201), np.pi / 2)
    # R(90 deg): frame column offset dj maps to +y, row offset di to -x
    np.testing.assert_allclose(np.rot90(b, -1)[5:-5, 5:-5], a[5:-5, 5:-5], atol=1e-3)


def test_slices_change_gradually_with_depth(proc):
    ref = proc.sample((0, 0), P, (512, 512), depth_m=0)
    c1 = corr(ref, proc.sample((0, 0), P, (512, 512), depth_m=50e-9))
    c5 = corr(ref, proc.sample((0, 0), P, (512, 512), depth_m=250e-9))
    c40 = corr(ref, proc.sample((0, 0), P, (512, 512), depth_m=2e-6))
    assert c1 > 0.35 and c1 > c5 > c40 and abs(c40) < 0.15, (c1, c5, c40)
    assert proc.slice_index(0) == 0 and proc.slice_index(49e-9) == 0 and proc.slice_index(51e-9) == 1


def test_image_stack_slices_and_mirrored_depth(isbi):
    assert isbi.n_slices == 30
    assert [isbi.slice_index(k * 50e-9 + 1e-9) for k in (0, 29, 30, 31, 59, 60)] == [0, 29, 29, 28, 0, 0]
    tex = isbi.slice_image(0)
    assert tex.dtype == np.float32 and tex.shape == (512, 512)
    assert 0.3 < tex.mean() < 0.7 and (tex < 0.3).mean() > 0.05      # dark membranes
    a = isbi.sample((0, 0), P, (512, 512), depth_m=0)
    np.testing.assert_allclose(a, tex, atol=1e-6)
    c1 = corr(a, isbi.sample((0, 0), P, (512, 512), depth_m=50e-9))
    c10 = corr(a, isbi.sample((0, 0), P, (512, 512), depth_m=500e-9))
    assert c1 > c10


def test_image_at_frame_pixel_size_when_texture_pixel_unknown(isbi):
    files = sorted(ISBI.glob("isbi2012_train_*.png"))[:2]
    sp = Specimen(images=files)
    a = sp.sample((0, 0), 10e-9, (512, 512))
    b = sp.sample((0, 0), 3e-9, (512, 512))
    np.testing.assert_allclose(a, b, atol=1e-6)    # 1:1 with the frame whatever the pixel size
    np.testing.assert_allclose(a, sp.slice_image(0), atol=1e-6)


def test_large_frame_is_fast(proc):
    import time
    proc.sample((0, 0), P, (1536, 2048))
    t = time.perf_counter()
    proc.sample((1.3e-7, 2.1e-7), P, (1536, 2048), 0.1)
    assert time.perf_counter() - t < 0.5           # generous: shared CI cores
