"""Three families of simulated wafers for judging section detection.

- ``training``: the generator the shipped model was trained with
  (detect_data.random_wafer_params and its artefacts), on seeds it never saw.
- ``validation``: the same renderer with other layout ranges (sections
  200-1200 µm, aspect 1:1-3:1, packing 10-400 µm, resin 5-150 µm) on their own
  seeds: where thresholds are to be tuned.
- ``test``: layouts and looks outside the training ranges: long sides
  1.0-2.0 mm (trained up to 0.9 mm), or narrow sections 150-350 µm wide at
  neighbours 0-15 µm apart, touching
  (trained >= 20 µm); resin rims of 2-8 µm (trained >= 10 µm); and in half of
  the overviews a look the training never had: inverted contrast (another
  detector), or tissue contrast squeezed to a third (faint staining), with a
  strong illumination gradient across the whole overview.

Everything is fixed by the seed; no family shares seeds with training
(0-47), the old benchmark (10000-10012) or threshold tuning (20001-20040).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from devices.setup_config import WaferParams
from wafer import detect_data as dd

FAMILY_SEEDS = {"training": 30_000, "validation": 40_000, "test": 50_000}


def validation_params(rng: np.random.Generator, seed: int) -> WaferParams:
    w = rng.uniform(200, 1200)
    h = max(100.0, w * rng.uniform(1 / 3, 1.0))
    return WaferParams(sections=400, section_size_um=(w, h), size_jitter=rng.uniform(0, 0.15),
                       rotation_deg=rng.uniform(-180, 180), rotation_jitter_deg=rng.uniform(0, 30),
                       spacing_um=rng.uniform(10, 400), resin_margin_um=rng.uniform(5, 150), seed=seed)


def test_params(rng: np.random.Generator, seed: int) -> WaferParams:
    if rng.random() < 0.5:                   # large sections
        w = rng.uniform(1000, 2000)
        h = w * rng.uniform(0.25, 0.6)
    else:                                    # narrow ones, up to 4:1
        w = rng.uniform(600, 1000)
        h = max(150.0, w * rng.uniform(0.25, 0.35))
    return WaferParams(sections=500, section_size_um=(w, h), size_jitter=rng.uniform(0, 0.1),
                       rotation_deg=rng.uniform(-180, 180), rotation_jitter_deg=rng.uniform(0, 10),
                       spacing_um=rng.uniform(0, 15), resin_margin_um=rng.uniform(2, 8), seed=seed)


def test_look(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Half the test overviews: inverted or faint, under a strong gradient."""
    u = rng.random()
    if u >= 0.5:
        return img
    f = img.astype(np.float32)
    if u < 0.25:
        f = 255.0 - f
    else:
        m = float(np.median(f))
        f = m + (f - m) / 3.0
    h, w = f.shape
    a = rng.uniform(0, 2 * math.pi)
    ramp = (np.cos(a) * np.linspace(-1, 1, w)[None, :] + np.sin(a) * np.linspace(-1, 1, h)[:, None])
    f = f * (1 + rng.uniform(0.15, 0.35) * ramp)
    return np.clip(np.round(f), 0, 255).astype(np.uint8)


FAMILIES: dict[str, tuple[Callable, Callable | None]] = {
    "training": (dd.random_wafer_params, None),
    "validation": (validation_params, None),
    "test": (test_params, test_look),
}


def family_overviews(family: str, n: int, shape=(1024, 1024)) -> list[dd.Overview]:
    """``n`` overview crops of ``family`` (one per wafer), each crop centred
    near a section."""
    params_fn, look = FAMILIES[family]
    out = []
    for k in range(n):
        seed = FAMILY_SEEDS[family] + k
        o = dd.sample_overviews(seed, 1, shape, params_fn=params_fn, near_section=True)[0]
        if look is not None:
            o.image = look(o.image, np.random.default_rng([seed, 91]))
        out.append(o)
    return out
