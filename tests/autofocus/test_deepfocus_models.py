"""DeepFocus networks, training/export, and the shipped models (fast: < 40 s)."""
from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import torch

from autofocus import models as M
from autofocus.data import BASE_MICROSCOPE, DataConfig, PairSimulator, referenced_target
from autofocus.inference import (DEFAULT_MODEL, DEFAULT_SCORE_MODEL, DeepFocusPredictor, DeepScorePredictor,
                                 resample)
from autofocus.train import train, train_on_samples
from devices.setup_config import MicroscopeParams

torch.set_num_threads(1)


@pytest.mark.parametrize("patch,fc_in,hidden", [(128, 140, 100), (256, 1260, 250), (384, 3500, 250),
                                                (512, 6860, 250)])
def test_image_to_scalar_shapes_match_seed(patch, fc_in, hidden):
    for name, n_out in ((f"deepfocus-{patch}", 3), (f"deepfocus-patchscore-{patch}", 4)):
        m = M.build(name).eval()
        assert m.fc[0].in_features == fc_in and m.fc[0].out_features == hidden
        assert [m.fc[2].in_features, m.fc[2].out_features, m.fc[4].out_features] == [hidden, 50, n_out]
        assert len(m.features.layers) == 7
        if patch <= 256:
            with torch.no_grad():
                assert m(torch.zeros(2, 2, patch, patch)).shape == (2, n_out)
    assert M.VARIANTS[f"deepfocus-{patch}"].patch == patch


def test_deepscore_and_pixelscore_shapes():
    ds = M.build("deepscore-512").eval()
    assert ds.fc[0].in_features == 2520 and len(ds.features.layers) == 6
    with torch.no_grad():
        assert ds(torch.zeros(1, 1, 512, 512)).shape == (1, 2)
    px = M.build("deepfocus-pixelscore-128").eval()
    with torch.no_grad():
        maps = px(torch.zeros(1, 2, 128, 128))
        assert maps.shape == (1, 4, 128, 128)
        assert M.export_module("deepfocus-pixelscore-128", px)(torch.zeros(3, 2, 128, 128)).shape == (3, 3)
    assert 4e5 < M.count_parameters(px) < 6e5          # seed: about 0.5 million


def test_patch_score_softmax_weighting_and_loss():
    out = torch.tensor([[[1.0, 2.0, 3.0, 0.0], [5.0, 6.0, 7.0, 0.0]]])
    assert torch.allclose(M.score_weighted(out), torch.tensor([[3.0, 4.0, 5.0]]))
    out[0, 1, 3] = 50.0                                # one dominant score takes all the weight
    assert torch.allclose(M.score_weighted(out), torch.tensor([[5.0, 6.0, 7.0]]), atol=1e-5)
    target = torch.tensor([[5.0, 6.0, 7.0]])
    pred = M.score_weighted(out)
    loss = M.score_loss(pred, out[..., :3], target)
    # (1 − 0.25)·0 + mean |individual − target| = (4 + 4 + 4 + 0 + 0 + 0) / 6
    assert loss.item() == pytest.approx(2.0, abs=1e-4)
    maps = torch.zeros(1, 4, 4, 4)
    maps[0, :3] = torch.arange(16.0).view(4, 4)
    maps[0, 3, 2, 1] = 80.0                            # the pixel score picks pixel (2, 1) = 9
    assert torch.allclose(M.pixel_weighted(maps), torch.full((1, 3), 9.0), atol=1e-4)


def _texture(tmp_path):
    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur((rng.random((256, 256)) * 255).astype(np.float32), (0, 0), 2.0)
    path = tmp_path / "tex.png"
    cv2.imwrite(str(path), cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8))
    return path


def test_three_step_training_exports_and_is_reproducible(tmp_path):
    tex = _texture(tmp_path)
    kw = dict(seed=5, textures=[tex], batch=2, log_every=1, val_samples=2, threads=1,
              data={"procedural_seeds": ()}, log=lambda s: None)
    c1 = train("deepfocus-128", 3, tmp_path / "a.pt", **kw)
    c2 = train("deepfocus-128", 3, tmp_path / "b.pt", **kw)
    assert [r["loss"] for r in c1["log"]] == [r["loss"] for r in c2["log"]]
    card = json.loads((tmp_path / "a.json").read_text())
    assert card["variant"] == "deepfocus-128" and card["steps"] == 3
    assert card["training_data"]["textures"] == ["tex.png"]
    for key in ("patch_size", "normalisation", "pixel_size_nm", "perturbation_um", "optimizer", "scheduler",
                "validation", "training_time_s", "torch", "date"):
        assert key in card
    m = torch.jit.load(str(tmp_path / "a.pt"))
    assert m(torch.zeros(1, 2, 128, 128)).shape == (1, 3)
    # recalibration: only the FC layers change
    rng = np.random.default_rng(1)
    samples = [(rng.integers(0, 255, (160, 160)), rng.integers(0, 255, (160, 160)), (1.0, 0.1, -0.1))
               for _ in range(4)]
    train_on_samples("deepfocus-128", samples, 2, tmp_path / "r.pt", init=tmp_path / "a.pt",
                     freeze_all_but_fc=True, batch=2, threads=1, log=lambda s: None)
    a, r = torch.jit.load(str(tmp_path / "a.pt")).state_dict(), torch.jit.load(str(tmp_path / "r.pt")).state_dict()
    assert all(torch.equal(a[k], r[k]) for k in a if k.startswith("features."))
    assert not all(torch.equal(a[k], r[k]) for k in a if k.startswith("fc."))


def test_head_fine_tune_with_the_last_convolution_blocks_keeps_the_rest(tmp_path):
    """Stage U of the shipped model: the head and the last two convolution
    blocks learn; the earlier blocks and every batch-norm statistic stay as
    the model it started from, so an unknown column still reads as before."""
    tex = tmp_path / "tex.png"
    cv2.imwrite(str(tex), (np.random.default_rng(3).random((320, 320)) * 255).astype(np.uint8))
    kw = dict(seed=5, textures=[tex], batch=2, log_every=2, val_samples=2, threads=1, dropout=0.0,
              data={"procedural_seeds": ()}, log=lambda s: None)
    train("deepfocus-128", 2, tmp_path / "a.pt", **kw)
    card = train("deepfocus-128", 2, tmp_path / "u.pt", init=tmp_path / "a.pt", freeze_all_but_fc=True,
                 trainable_conv_layers=2, **kw)
    assert card["trainable_conv_layers"] == 2
    a, u = torch.jit.load(str(tmp_path / "a.pt")).state_dict(), torch.jit.load(str(tmp_path / "u.pt")).state_dict()
    last = len(M.DEEPFOCUS_CONV) - 2
    changed = {k for k in a if not torch.equal(a[k], u[k])}
    assert any(k.startswith(f"features.layers.{last}.") for k in changed)
    assert any(k.startswith("fc.") for k in changed)
    assert not [k for k in changed if k.startswith("features.")
                and (int(k.split(".")[2]) < last or "running_" in k or "num_batches" in k)]
    with pytest.raises(ValueError, match="trainable_conv_layers must be 0..7"):
        train("deepfocus-128", 1, tmp_path / "x.pt", init=tmp_path / "a.pt", freeze_all_but_fc=True,
              trainable_conv_layers=8, **kw)


def test_coarse_model_trains_on_frames_resampled_as_at_inference():
    """A 20 nm model is fed 10 nm frames averaged 2x2 by the predictor's own
    resampling: same patch shape, four times the dose per pixel (half the
    shot noise) of a frame scanned at 20 nm."""
    kw = dict(patch=128, n_patches=1, pixel_nm=20.0, procedural_seeds=(0,), procedural_slices=(0,))
    direct, resampled = PairSimulator(DataConfig(**kw)), PairSimulator(DataConfig(**kw, acquire_pixel_nm=10.0))
    at_10nm = PairSimulator(DataConfig(**{**kw, "pixel_nm": 10.0}))
    flat = (0.0, 0.0)
    args = (BASE_MICROSCOPE, flat, 3.0, (0.5, -0.5), 100e-9)
    fine = at_10nm.render(at_10nm.worlds[0][0], *args, (256, 256), np.random.default_rng(7))
    coarse = resampled.render(resampled.worlds[0][0], *args, (128, 128), np.random.default_rng(7))
    assert np.array_equal(coarse, np.rint(resample(fine, 10e-9, 20e-9)).astype(np.uint8))

    def noise(s):       # two scans of the same spot differ by shot noise only
        world = s.worlds[0][0]
        a, b = (s.render(world, BASE_MICROSCOPE, flat, 0.0, flat, 100e-9, (128, 128), np.random.default_rng(i))
                for i in (1, 2))
        assert a.shape == (128, 128) and a.dtype == np.uint8
        return np.std(a.astype(float) - b.astype(float))
    assert noise(resampled) < 0.7 * noise(direct)
    with pytest.raises(ValueError, match="finer than the 15 nm frames"):
        PairSimulator(DataConfig(**{**kw, "pixel_nm": 10.0}, acquire_pixel_nm=15.0)).render(
            direct.worlds[0][0], BASE_MICROSCOPE, flat, 0.0, flat, 100e-9, (127, 127), np.random.default_rng(0))


SETUP_A = MicroscopeParams(preset="setup-a")


@pytest.fixture(scope="module")
def sim():
    # procedural specimen seed 0 (configs/sim.yaml): held out from training
    return PairSimulator(DataConfig(patch=256, procedural_seeds=(0,), procedural_slices=(0,)))


def _pair(sim, ab, size=640, seed=0):
    """A pair on the default simulated column (configs/sim.yaml: setup A, 8 mrad, SE contrast)."""
    rng = np.random.default_rng(seed)
    world = sim.worlds[0][0]
    return sim.pair(world, SETUP_A, (3e-6 * seed, -2e-6 * seed), ab, 200e-9, (size, size), rng)


def test_column_feed_pairs_are_fed_as_deepfocus_feeds_a_column_of_stated_alpha(monkeypatch):
    """Stage O's pairs: resampled where the (stated) column looks like the 8 mrad
    reference, never finer than the 10 nm frames, the target referenced at the
    column the model then sees."""
    import autofocus.data as data
    rendered = []                   # (frame pixel m, frame shape) of every scan the simulator makes

    def render(world, center, pixel_m, shape, *a):
        rendered.append((pixel_m, shape))
        return real_render(world, center, pixel_m, shape, *a)
    real_render = data.render
    monkeypatch.setattr(data, "render", render)
    cfg = DataConfig(patch=64, pixel_nm=20.0, acquire_pixel_nm=10.0, microscopes="columns", alpha_ref_mrad=8.0,
                     column_feed=1.0, procedural_seeds=(0,), procedural_slices=(0,))
    sim, rng = PairSimulator(cfg), np.random.default_rng(3)
    ab = (6.0, 1.0, -0.5)
    for alpha in (3.0, 15.0):
        mp = BASE_MICROSCOPE.model_copy(update={"alpha_mrad": alpha})
        for _ in range(4):
            x, y, meta = sim.sample(rng, ab=ab, mp=mp, dwell_ns=200.0)
            px = meta["model_pixel_nm"]
            assert x.shape == (1, 2, 64, 64) and x.dtype == np.uint8
            # both frames scanned at 10 nm over the field of 64 pixels of px (rounded up), then averaged down
            assert rendered[-2:] == [(10e-9, (math.ceil(64 * px / 10 - 1e-6),) * 2)] * 2
            if alpha == 3.0:        # 20 nm x 3/8 is finer than the frame: fed at the frame's 10 nm
                assert px == pytest.approx(10.0)
            else:                   # 37.5 nm, the statement up to 25 % off, within 2 patches across 768 px
                assert 37.5 / 1.25 - 1e-6 <= px <= 37.5 * 1.25 + 1e-6 and (px <= 60.0)
            np.testing.assert_allclose(y, referenced_target(ab, alpha * 20.0 / px, 8.0, cfg.target_clip), rtol=1e-5)
    plain = PairSimulator(DataConfig(patch=64, pixel_nm=20.0, acquire_pixel_nm=10.0, alpha_ref_mrad=8.0,
                                     procedural_seeds=(0,), procedural_slices=(0,)))
    assert plain.sample(rng, ab=ab, mp=BASE_MICROSCOPE)[2]["model_pixel_nm"] == 20.0


def test_shipped_model_corrects_moderate_aberrations(sim):
    p = DeepFocusPredictor(DEFAULT_MODEL, device="cpu")
    # 20 nm model, 10 nm frames: resampled before cropping
    assert p.card["pixel_size_nm"] == 20.0 and DEFAULT_MODEL.stat().st_size < 10e6
    for i, ab in enumerate([(6.0, 1.0, -0.8), (-7.0, -1.2, 0.6), (4.0, 0.3, 1.5)]):
        plus, minus = _pair(sim, ab, seed=i)
        pred = p.predict(plus, minus, 10e-9, n_patches=10)
        assert np.sign(pred.d_wd_m) == -np.sign(ab[0])
        res_wd = abs(ab[0] + pred.d_wd_m * 1e6)
        res_stig = np.hypot(ab[1] + pred.d_stig[0], ab[2] + pred.d_stig[1])
        assert res_wd < 0.4 * abs(ab[0]), (ab, pred)
        assert res_stig < 0.6 * np.hypot(ab[1], ab[2]), (ab, pred)
        assert pred.per_patch.shape == (10, 3) and pred.weights.sum() == pytest.approx(1.0)


def test_fixed_seed_sequence_and_resampling(sim):
    p = DeepFocusPredictor(DEFAULT_MODEL, device="cpu")
    plus, minus = _pair(sim, (5.0, 0.5, 0.5), size=600)
    a = p.predict(plus, minus, 10e-9, n_patches=6, seed_sequence=3)
    b = p.predict(plus, minus, 10e-9, n_patches=6, seed_sequence=3)
    c = p.predict(plus, minus, 10e-9, n_patches=6, seed_sequence=4)
    assert np.array_equal(a.offsets, b.offsets) and a.d_wd_m == b.d_wd_m and a.d_stig == b.d_stig
    assert not np.array_equal(a.offsets, c.offsets)
    # an 8 nm image is resampled to the card's 10 nm before cropping
    big_p = cv2.resize(plus, (750, 750), interpolation=cv2.INTER_CUBIC)
    big_m = cv2.resize(minus, (750, 750), interpolation=cv2.INTER_CUBIC)
    assert resample(big_p, 8e-9, 10e-9).shape == (600, 600)
    d = p.predict(big_p, big_m, 8e-9, n_patches=6, seed_sequence=3)
    assert d.offsets.max() <= round(750 * 8e-9 / p.pixel_size_m) - p.patch
    assert p.patches_to_tile((512, 512), p.pixel_size_m) == 16
    assert p.patches_to_tile((512, 512), p.pixel_size_m / 2) == 4
    assert np.sign(d.d_wd_m) == np.sign(a.d_wd_m)


def test_a_reading_the_network_gives_alike_for_both_frame_orders_moves_nothing(sim):
    # swapping a pair's frames is the pair of the opposite aberration; whatever the network reads
    # the same both ways round (a texture's bias) must not reach the beam
    p = DeepFocusPredictor(DEFAULT_MODEL, device="cpu")
    plus, minus = _pair(sim, (4.0, 0.5, -0.5), size=600)
    clean = p.predict(plus, minus, 10e-9, n_patches=8, seed_sequence=1)
    run = p._r.run
    p._r.run = lambda x, column=None: run(x, column) + np.float32([0.8, 0.3, -0.5])
    biased = p.predict(plus, minus, 10e-9, n_patches=8, seed_sequence=1)
    assert biased.d_wd_m == pytest.approx(clean.d_wd_m, abs=1e-12)
    assert biased.d_stig == pytest.approx(clean.d_stig, abs=1e-6)
    # and the reading of the swapped pair is the opposite correction
    p._r.run = run
    swapped = p.predict(minus, plus, 10e-9, n_patches=8, seed_sequence=1)
    assert np.sign(swapped.d_wd_m) == -np.sign(clean.d_wd_m) == 1


@pytest.mark.skip(reason="no finished DeepScore is shipped yet (issue 4 note)")
def test_shipped_deepscore_ranks_sharpness(sim):
    s = DeepScorePredictor(DEFAULT_SCORE_MODEL, device="cpu")
    rng = np.random.default_rng(2)
    world = sim.worlds[0][0]
    scores = [s.score(sim.render(world, BASE_MICROSCOPE, (0.0, 0.0), dz, st, 200e-9, (640, 640), rng), 10e-9,
                      n_patches=4)
              for dz, st in ((0.0, (0.0, 0.0)), (8.0, (0.0, 0.0)), (0.0, (3.0, -2.0)))]
    assert scores[0] < scores[1] and scores[0] < scores[2]
