"""Inference for shipped DeepFocus / DeepScore models (TorchScript + JSON card).

    p = DeepFocusPredictor("models/deepfocus_patchscore_256.pt")
    pred = p.predict(img_plus, img_minus, pixel_size_m=10e-9)   # img at wd+Δ, img at wd−Δ
    wd += pred.d_wd_m; stig = (sx + pred.d_stig[0], sy + pred.d_stig[1])

N aligned patch pairs are cropped at random offsets (a fixed seed sequence
gives the same offsets every call, as in the seed's benchmark), run as one
batch, and combined by the softmax-score-weighted mean (patch-score models)
or the plain mean; every second pair goes in with its frames swapped and its
reading negated (the swapped pair is the opposite aberration's), so a reading
the network gives alike both ways round cancels. Images at another pixel
size are resampled to the card's.

CPU path (measured on the 2-core dev box, see the model card "inference"):
TorchScript frozen with torch.jit.optimize_for_inference (batch norm folded
into the convolutions), channels-last, torch.inference_mode, the N patches in
one forward. Half precision / int8 were not used: no native bf16 on the CPU,
and the FC layers are <5 % of the time, so dynamic int8 gains nothing; static
int8 (fbgemm, ONNX Runtime) was no faster on AVX2 without VNNI. ONNX Runtime
fp32 (-8 %), OpenVINO and NNPACK were measured too and not worth a second
model format (README, "Autofocus").
"""
from __future__ import annotations

import io
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import torch

from autofocus.models import column_input, read_card, read_verified_model, takes_column
from common.paths import models_dir

MODELS_DIR = models_dir()
DEFAULT_MODEL = MODELS_DIR / "deepfocus_128.pt"
DEFAULT_SCORE_MODEL = MODELS_DIR / "deepscore_512.pt"
# seed Fig. 3.9: its DeepFocus read ten 384² patch pairs of each 2048x1536 frame at 10 nm
SEED_READ_PX = 10 * 384 ** 2
MIN_PATCHES = 10


@dataclass
class Prediction:
    """Correction to ADD to the current working distance / stigmators."""
    d_wd_m: float
    d_stig: tuple[float, float]
    sd: tuple[float, float, float]          # unweighted s.d. over patches: (wd m, stig x, stig y)
    per_patch: np.ndarray                   # (N, 3): d_wd (m), d_stig x, d_stig y
    weights: np.ndarray                     # (N,) sums to 1
    offsets: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), int))   # (N, 2) row, col
    time_s: float = 0.0


@dataclass
class ScoreDetail:
    score: float                            # s_wd + s_stig (seed: minima over patches, summed)
    s_wd_um: float
    s_stig: float
    per_patch: np.ndarray                   # (N, 2)
    time_s: float = 0.0


def load_card(model_path: str | Path) -> dict:
    """The model's JSON card (reading it runs nothing: no hash check here)."""
    return read_card(model_path)


def resampled_shape(shape: tuple[int, int], pixel_size_m: float, target_pixel_m: float,
                    tol: float = 0.01) -> tuple[int, int]:
    """(h, w) that ``resample`` gives an image of ``shape`` (unchanged within tol)."""
    f = pixel_size_m / target_pixel_m
    if abs(f - 1.0) <= tol:
        return tuple(shape)
    return tuple(max(1, int(round(v * f))) for v in shape)


def resample(img: np.ndarray, pixel_size_m: float, target_pixel_m: float, tol: float = 0.01) -> np.ndarray:
    """Rescale an image taken at pixel_size_m to target_pixel_m pixels (area
    averaging when shrinking, bicubic when enlarging); unchanged within tol."""
    if abs(pixel_size_m / target_pixel_m - 1.0) <= tol:
        return img
    h, w = resampled_shape(img.shape, pixel_size_m, target_pixel_m, tol)
    interp = cv2.INTER_AREA if pixel_size_m < target_pixel_m else cv2.INTER_CUBIC
    out = cv2.resize(np.asarray(img, np.float32), (w, h), interpolation=interp)
    return np.clip(out, 0, 255)


def patch_offsets(shape: tuple[int, int], patch: int, n: int, seed_sequence: Optional[int]) -> np.ndarray:
    """N random (row, col) origins; the same seed gives the same offsets."""
    h, w = shape
    if h < patch or w < patch:
        raise ValueError(f"image {w}x{h} px (at the model pixel size) is smaller than the {patch}² patch")
    rng = np.random.default_rng(seed_sequence)
    return np.stack([rng.integers(0, h - patch + 1, n), rng.integers(0, w - patch + 1, n)], 1)


def _to_unit(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float32) * np.float32(1 / 127.5) - np.float32(1.0)


class _Runner:
    """Loads a TorchScript model for the fastest measured CPU/GPU path."""

    def __init__(self, model_path: str | Path, device: Optional[str], threads: Optional[int],
                 optimize: bool = True):
        self.path = Path(model_path)
        # TorchScript runs code on load: only the bytes whose sha256 the card pins (UnverifiedModel else)
        data, self.card = read_verified_model(self.path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if threads:
            torch.set_num_threads(int(threads))
        m = torch.jit.load(io.BytesIO(data), map_location=self.device).eval()
        if self.device.type == "cpu":
            m = m.to(memory_format=torch.channels_last)
        if optimize:
            m = torch.jit.optimize_for_inference(torch.jit.freeze(m))
        self.model = m
        self.patch = int(self.card["patch_size"])
        self.pixel_m = float(self.card["pixel_size_nm"]) * 1e-9
        self._lock = threading.Lock()       # one forward at a time (thread pools are shared)

    def run(self, x: np.ndarray, column: Optional[tuple[float, ...]] = None) -> np.ndarray:
        """column: a ColumnDeepFocusNet's column input, the same for every patch (None: plain model)."""
        t = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        c = None if column is None else torch.tensor([column], dtype=torch.float32, device=self.device)
        # On the CPU, batches of <= 1 MB input: the first activation (~20x the
        # input) then stays below glibc's 32 MB mmap threshold and is reused
        # from the heap instead of page-faulted afresh on every call (16
        # 128-px pairs: 75 -> 52 ms per 512-px pair in a fresh process).
        step = len(t) if self.device.type != "cpu" else max(1, (1 << 20) // max(1, t[0].numel() * 4))
        with self._lock, torch.inference_mode():
            outs = [self.model(t[i:i + step]) if c is None else
                    self.model(t[i:i + step], c.expand(len(t[i:i + step]), -1)) for i in range(0, len(t), step)]
            return torch.cat(outs).float().cpu().numpy()


class DeepFocusPredictor:
    """Corrections from an image pair taken at wd ± perturbation (see card),
    times the card's ``output_gain`` where one was fitted."""

    def __init__(self, model_path: str | Path, device: Optional[str] = None, threads: Optional[int] = None,
                 optimize: bool = True):
        self._r = _Runner(model_path, device, threads, optimize)
        self.card = self._r.card
        if self.card.get("kind") == "deepscore":
            raise ValueError(f"{model_path} is a DeepScore model; use DeepScorePredictor")
        self.patch = self._r.patch
        self.pixel_size_m = self._r.pixel_m
        self.perturbation_m = float(self.card["perturbation_um"]) * 1e-6
        # post-hoc calibration of the outputs (autofocus/gain.py); 1 where none was fitted
        self.gain = np.asarray((self.card.get("output_gain") or {}).get("values", (1.0, 1.0, 1.0)), np.float64)
        # readings referenced to a column of this α (autofocus/column_scale.py); None = this column's µm
        self.alpha_ref_mrad = (self.card.get("training_data") or {}).get("alpha_ref_mrad")
        # told the column it reads (autofocus.models.ColumnDeepFocusNet): predict's column_alpha_mrad
        self.takes_column = takes_column(str(self.card.get("variant", "")))
        self.column_inputs = int(self.card.get("column_inputs", 2))     # stage T's cards predate the key

    def check_image(self, shape: tuple[int, int], pixel_size_m: float,
                    model_pixel_m: Optional[float] = None) -> tuple[int, int]:
        """(h, w) of an image of ``shape`` taken at pixel_size_m once resampled to
        the model's pixels (the card's unless model_pixel_m); ValueError when that
        is smaller than one patch (so a caller can refuse before it spends dose
        on the pair)."""
        model_pixel_m = model_pixel_m or self.pixel_size_m
        h, w = resampled_shape(shape, pixel_size_m, model_pixel_m)
        if h < self.patch or w < self.patch:
            raise ValueError(f"image {w}x{h} px (at the model pixel size) is smaller than the {self.patch}² patch: "
                             f"frames must span {self.patch * model_pixel_m * 1e6:.2f} µm")
        return h, w

    def patches_to_tile(self, shape: tuple[int, int], pixel_size_m: float,
                        model_pixel_m: Optional[float] = None) -> int:
        """Patches that tile an image of ``shape`` taken at pixel_size_m once it is
        resampled to the model's pixels (16 for 512² at the model's size)."""
        h, w = self.check_image(shape, pixel_size_m, model_pixel_m)
        return (h // self.patch) * (w // self.patch)

    def patches_for(self, shape: tuple[int, int], pixel_size_m: float, model_pixel_m: Optional[float] = None) -> int:
        """How many patches to read from a pair of ``shape`` taken at pixel_size_m
        and fed at model_pixel_m (the card's by default): as many as cover
        SEED_READ_PX of its frame pixels, at least MIN_PATCHES and at most
        those that tile it once. Why: a reading's noise goes with the frame
        pixels (electrons) behind it, and a count fixed in model patches
        reads a quarter of the frame where a narrow column is fed at its
        frame pixel instead of twice it (3 mrad on a micrograph never
        trained on: MAE wd after iteration 2 0.72 µm with 10 patches, 0.36
        with 90)."""
        f = pixel_size_m / (model_pixel_m or self.pixel_size_m)
        tiles = self.patches_to_tile(shape, pixel_size_m, model_pixel_m)
        return max(MIN_PATCHES, min(math.ceil(SEED_READ_PX * f * f / self.patch ** 2), tiles))

    def predict(self, img_plus: np.ndarray, img_minus: np.ndarray, pixel_size_m: float,
                n_patches: Optional[int] = None, seed_sequence: Optional[int] = 0,
                perturbation_m: Optional[float] = None, model_pixel_m: Optional[float] = None,
                column_alpha_mrad: Optional[float] = None) -> Prediction:
        """img_plus at wd + Δ, img_minus at wd − Δ (Δ = card perturbation), aligned.

        model_pixel_m: resample to this pixel size instead of the card's (a
        referenced model reading another column, autofocus.column_scale.model_pixel);
        the outputs are then the model's readings at that pixel, as they come.
        column_alpha_mrad: the probe half-angle of the column the pair comes from
        (stated, recalibrated or learned), told to a column-conditioned model as
        the α it has at the model pixel; None: unknown, the model reads as
        plain P did (autofocus.models.ColumnDeepFocusNet). Others ignore it.
        n_patches: None = patches_for the image.
        seed_sequence: int for a fixed set of patch offsets (reproducible
        iterations), None for fresh random ones."""
        t0 = time.perf_counter()
        if perturbation_m is not None and abs(perturbation_m - self.perturbation_m) > 0.01 * self.perturbation_m:
            raise ValueError(f"pair taken at ±{perturbation_m * 1e6:.2f} µm, the model was trained at "
                             f"±{self.perturbation_m * 1e6:.2f} µm")
        a, b = np.asarray(img_plus), np.asarray(img_minus)
        if a.shape != b.shape or a.ndim != 2:
            raise ValueError(f"need two equal 2-D images, got {a.shape} and {b.shape}")
        model_pixel_m = model_pixel_m or self.pixel_size_m
        self.check_image(a.shape, pixel_size_m, model_pixel_m)
        if n_patches is None:
            n_patches = self.patches_for(a.shape, pixel_size_m, model_pixel_m)
        a = resample(a, pixel_size_m, model_pixel_m)
        b = resample(b, pixel_size_m, model_pixel_m)
        P = self.patch
        offs = patch_offsets(a.shape, P, int(n_patches), seed_sequence)
        x = np.empty((len(offs), 2, P, P), np.float32)
        # every second patch pair goes in with its frames swapped and its reading negated: the pair
        # (wd−Δ, wd+Δ) is the pair of the opposite aberration (the probe covariance goes with A·Aᵀ,
        # devices/sim/optics.py), so this cancels what the network reads alike both ways round, a
        # bias that follows the texture (3 mrad on a micrograph never trained on: every location
        # ended on the same side of focus, mean +0.29 µm after iteration 3; +0.12 µm swapped)
        for i, (r, c) in enumerate(offs):
            x[i, 0] = _to_unit(a[r:r + P, c:c + P])
            x[i, 1] = _to_unit(b[r:r + P, c:c + P])
        flip = np.arange(len(offs)) % 2 == 1
        x[flip] = x[flip, ::-1]
        column = None
        if self.takes_column:
            column = column_input(column_alpha_mrad, self.alpha_ref_mrad,
                                  model_pixel_m / self.pixel_size_m)[:self.column_inputs]
        out = self._r.run(x, column)
        out[flip, :3] *= -1
        corr = out[:, :3].astype(np.float64) * self.gain
        if out.shape[1] == 4:
            s = out[:, 3].astype(np.float64)
            w = np.exp(s - s.max())
            w /= w.sum()
        else:
            w = np.full(len(out), 1.0 / len(out))
        mean = w @ corr
        sd = corr.std(axis=0)
        per = corr.copy()
        per[:, 0] *= 1e-6
        return Prediction(d_wd_m=float(mean[0]) * 1e-6, d_stig=(float(mean[1]), float(mean[2])),
                          sd=(float(sd[0]) * 1e-6, float(sd[1]), float(sd[2])), per_patch=per, weights=w,
                          offsets=offs, time_s=time.perf_counter() - t0)


class DeepScorePredictor:
    """Aberration magnitude of a single image (lower = sharper); machine
    independent enough to drive a Nelder–Mead search on an uncalibrated SEM."""

    def __init__(self, model_path: str | Path, device: Optional[str] = None, threads: Optional[int] = None,
                 optimize: bool = True):
        self._r = _Runner(model_path, device, threads, optimize)
        self.card = self._r.card
        if self.card.get("kind") != "deepscore":
            raise ValueError(f"{model_path} is not a DeepScore model")
        self.patch = self._r.patch
        self.pixel_size_m = self._r.pixel_m

    def score_detail(self, image: np.ndarray, pixel_size_m: float, n_patches: int = 10,
                     seed_sequence: Optional[int] = 0) -> ScoreDetail:
        t0 = time.perf_counter()
        a = resample(np.asarray(image), pixel_size_m, self.pixel_size_m)
        P = self.patch
        offs = patch_offsets(a.shape, P, int(n_patches), seed_sequence)
        x = np.stack([_to_unit(a[r:r + P, c:c + P])[None] for r, c in offs])
        out = self._r.run(x).astype(np.float64)
        s_wd, s_st = float(out[:, 0].min()), float(out[:, 1].min())
        return ScoreDetail(score=s_wd + s_st, s_wd_um=s_wd, s_stig=s_st, per_patch=out,
                           time_s=time.perf_counter() - t0)

    def score(self, image: np.ndarray, pixel_size_m: float, n_patches: int = 10,
              seed_sequence: Optional[int] = 0) -> float:
        """Seed: per score type the minimum over N patches, then the sum."""
        return self.score_detail(image, pixel_size_m, n_patches, seed_sequence).score
