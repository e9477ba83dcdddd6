"""A DeepFocus told which column it reads (issue 15, autofocus.models.ColumnDeepFocusNet):
it starts as the plain network it is fine-tuned from, the predictor tells it the
column as seen at the pixel the pair is fed at, the method tells it the stated
(or learned) α, and training draws that statement as a setup would make it."""
import math

import numpy as np
import pytest
import torch

from autofocus.data import DataConfig, PairSimulator
from autofocus.inference import DeepFocusPredictor, Prediction
from autofocus.methods import MODELS_DIR, DeepFocusMethod
from autofocus.models import build, column_input, takes_column
from autofocus.train import export, load_weights

CARD = {"patch_size": 128, "pixel_size_nm": 20.0, "perturbation_um": 5.0, "column_inputs": 3,
        "training_data": {"alpha_ref_mrad": 8.0}}


def test_a_conditioned_network_started_from_a_plain_one_reads_as_it_did_whatever_it_is_told(tmp_path):
    torch.manual_seed(3)
    plain = build("deepfocus-128").eval()
    export(plain, "deepfocus-128", tmp_path / "plain.pt", {"variant": "deepfocus-128"})
    told = build("deepfocus-column-128")
    load_weights(told, tmp_path / "plain.pt")
    told.eval()
    x = torch.randn(3, 2, 128, 128)
    with torch.no_grad():
        want = plain(x)
        for column in (None, torch.tensor([[1.0, 0.7, 0.4]] * 3), torch.zeros(3, 3)):
            assert torch.allclose(told(x, column), want, atol=1e-5)
    # weights of another network are still refused
    other = build("deepfocus-256").eval()
    export(other, "deepfocus-256", tmp_path / "other.pt", {"variant": "deepfocus-256"})
    with pytest.raises(ValueError, match="do not match"):
        load_weights(build("deepfocus-column-128"), tmp_path / "other.pt")


def test_a_model_told_two_column_inputs_still_reads_and_starts_a_three_input_one(tmp_path):
    """Stage T's network (and a setup's recalibration of it) takes [known, ln α_seen/α_ref]
    only: the predictor tells it those two, and a three-input network fine-tuned from
    it reads as it did until the feed-pixel input has learned something."""
    torch.manual_seed(9)
    two = build("deepfocus-column-128")
    two.column = torch.nn.ModuleList([torch.nn.Linear(2, lin.out_features, bias=False) for lin in two.column])
    for lin in two.column:
        torch.nn.init.normal_(lin.weight, 0.0, 0.5)
    two.eval()
    path = tmp_path / "two.pt"
    export(two, "deepfocus-column-128", path, {**CARD, "column_inputs": 2, "variant": "deepfocus-column-128"})
    pred = DeepFocusPredictor(path, optimize=False)
    rng = np.random.default_rng(2)
    a, b = (rng.integers(0, 255, (512, 512)).astype(np.uint8) for _ in range(2))
    fed = pred.predict(a, b, 10e-9, model_pixel_m=40e-9, column_alpha_mrad=16.0)
    assert fed.d_wd_m == fed.d_wd_m
    three = build("deepfocus-column-128")
    load_weights(three, path)
    three.eval()
    x = torch.randn(2, 2, 128, 128)
    with torch.no_grad():
        assert torch.allclose(three(x, torch.tensor([[1.0, 0.3, 0.5]] * 2)),
                              two(x, torch.tensor([[1.0, 0.3]] * 2)), atol=1e-5)


def _conditioned_model(tmp_path, variant="deepfocus-column-128"):
    torch.manual_seed(5)
    net = build(variant).eval()
    if takes_column(variant):
        with torch.no_grad():                   # a column that changes the reading through the images
            net.column[0].weight.normal_(0.0, 2.0)
    path = tmp_path / f"{variant}.pt"
    export(net, variant, path, {**CARD, "variant": variant})
    return path


def test_the_predictor_tells_the_model_the_column_it_has_at_the_feed_pixel(tmp_path, monkeypatch):
    pred = DeepFocusPredictor(_conditioned_model(tmp_path), optimize=False)
    told = []
    run = pred._r.run
    monkeypatch.setattr(pred._r, "run", lambda x, column=None: told.append(column) or run(x, column))
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 255, (512, 512)).astype(np.uint8) for _ in range(2))
    unknown = pred.predict(a, b, 10e-9)
    fed = pred.predict(a, b, 10e-9, model_pixel_m=40e-9, column_alpha_mrad=16.0)
    # 16 mrad fed at 40 nm looks like 8 mrad at the card's 20 nm: the reference column
    assert told == [(0.0, 0.0, 0.0), (1.0, pytest.approx(0.0, abs=1e-12), pytest.approx(math.log(2.0)))]
    assert pred.predict(a, b, 10e-9, column_alpha_mrad=16.0).per_patch[:, 0] != pytest.approx(
        unknown.per_patch[:, 0])
    assert told[-1] == (1.0, pytest.approx(math.log(2.0)), 0.0)
    assert fed.d_wd_m == fed.d_wd_m           # finite
    plain = DeepFocusPredictor(_conditioned_model(tmp_path, "deepfocus-128"), optimize=False)
    assert not plain.takes_column
    assert plain.predict(a, b, 10e-9, column_alpha_mrad=16.0).d_wd_m == pytest.approx(
        plain.predict(a, b, 10e-9).d_wd_m)


class _Told:
    """Stands in for a conditioned network: a set reading; records the column it is told."""
    alpha_ref_mrad = 8.0
    pixel_size_m = 20e-9
    patch = 128

    def __init__(self):
        self.told, self.reading_m = [], 4e-6

    def predict(self, *a, column_alpha_mrad=None, **k):
        self.told.append(column_alpha_mrad)
        return Prediction(d_wd_m=self.reading_m, d_stig=(0.0, 0.0), sd=(0.1e-6, 0.1, 0.1),
                          per_patch=np.zeros((4, 3)), weights=np.full(4, 0.25))


def test_the_method_tells_the_stated_column_and_an_unstated_one_once_its_moves_taught_it():
    img = np.zeros((768, 768), np.uint8)
    stated = DeepFocusMethod(MODELS_DIR / "deepfocus_128.pt", column_alpha_mrad=12.0)
    stated.predictor = _Told()
    stated.estimate(img, img, 10e-9, 5e-6)
    assert stated.predictor.told == [12.0]
    unstated = DeepFocusMethod(MODELS_DIR / "deepfocus_128.pt")
    net = unstated.predictor = _Told()
    unstated.begin_location()
    unstated.estimate(img, img, 10e-9, 5e-6, center_wd_m=5.000e-3)
    assert net.told == [None]             # nothing known yet: read as the plain network
    # a second pair 4 µm on reading 4 µm less: the moves teach a slope, the column is told from then on
    net.reading_m = 0.0
    unstated.estimate(img, img, 10e-9, 5e-6, center_wd_m=5.004e-3)
    assert net.told[-1] is None and unstated.column.has_slope
    learned = unstated.column.alpha_mrad(8.0)
    unstated.estimate(img, img, 10e-9, 5e-6, center_wd_m=5.004e-3)
    assert net.told[-1] == pytest.approx(learned)


def test_training_tells_the_column_as_a_setup_states_it_where_asked():
    base = dict(patch=128, pixel_nm=20.0, acquire_pixel_nm=10.0, microscopes="columns", alpha_ref_mrad=8.0,
                column_feed=0.5, procedural_fraction=1.0, augment=False)
    told = PairSimulator(DataConfig(**base, column_known=1.0))
    rng = np.random.default_rng(4)
    for _ in range(6):
        _, _, meta = told.sample(rng)
        known, log_seen, _ = meta["column"]
        seen_true = meta["alpha_mrad"] * 20.0 / meta["model_pixel_nm"]
        assert known == 1.0
        # the statement is the column's α up to column_feed_error (1.25) either way
        assert 1 / 1.25 - 1e-9 <= 8.0 * math.exp(log_seen) / seen_true <= 1.25 + 1e-9
        # and the pixel it is fed at, against the card's
        assert meta["column"][2] == pytest.approx(math.log(meta["model_pixel_nm"] / 20.0))
    silent = PairSimulator(DataConfig(**base), )
    assert silent.sample(np.random.default_rng(4))[2]["column"] == (0.0, 0.0, 0.0)
    assert column_input(None, 8.0) == (0.0, 0.0, 0.0) and column_input(8.0, None) == (0.0, 0.0, 0.0)
