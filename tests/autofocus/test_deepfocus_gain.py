"""Output-gain calibration of DeepFocus (autofocus/gain.py) and its use in inference."""
from __future__ import annotations

import json
import shutil

import numpy as np

from autofocus.data import BASE_MICROSCOPE, DataConfig, PairSimulator
from autofocus.gain import fit_output_gain, l1_gain, write_gain
from autofocus.inference import DEFAULT_MODEL, DeepFocusPredictor, load_card


def test_l1_gain_recovers_a_shrinkage_despite_outliers():
    rng = np.random.default_rng(0)
    truth = rng.uniform(-5, 5, 300)
    pred = truth / 1.25 + rng.normal(0, 0.05, 300)
    pred[:15] = rng.uniform(-0.5, 0.5, 15)           # pairs beyond the trained range: no cue at all
    assert abs(l1_gain(truth, pred) - 1.25) < 0.03
    assert l1_gain(truth, np.zeros(300)) == 1.0      # nothing to fit: leave the output alone


def test_predictor_applies_the_cards_gain_and_fit_writes_it(tmp_path):
    model = tmp_path / "df.pt"
    shutil.copy(DEFAULT_MODEL, model)
    card = load_card(DEFAULT_MODEL)
    card.pop("output_gain", None)
    model.with_suffix(".json").write_text(json.dumps(card))
    sim = PairSimulator(DataConfig(patch=256, procedural_seeds=(0,), procedural_slices=(0,)))
    plus, minus = sim.pair(sim.worlds[0][0], BASE_MICROSCOPE, (0.0, 0.0), (6.0, 1.5, -1.0), 200e-9, (512, 512),
                           np.random.default_rng(1))
    raw = DeepFocusPredictor(model).predict(plus, minus, 10e-9, n_patches=8)

    fit = fit_output_gain(model, textures=[], samples=6, seed=1)
    assert len(fit["values"]) == 3 and all(0.2 < g < 5 for g in fit["values"])
    assert fit["samples"] == 6 and len(fit["mae_before"]) == 3
    write_gain(model, {**fit, "values": [0.5, 2.0, -1.0]})      # a gain the test can see
    got = DeepFocusPredictor(model).predict(plus, minus, 10e-9, n_patches=8)
    assert np.isclose(got.d_wd_m, 0.5 * raw.d_wd_m)
    assert np.allclose(got.d_stig, (2.0 * raw.d_stig[0], -raw.d_stig[1]))
    assert np.allclose(got.per_patch, raw.per_patch * [0.5, 2.0, -1.0])
    assert load_card(model)["output_gain"]["samples"] == 6      # the card keeps how it was fitted
