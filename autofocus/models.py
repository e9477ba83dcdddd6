"""DeepFocus networks (Schubert, thesis ch. 3): autofocus and autostigmation
from a pair of images taken at wd ± Δ, and DeepScore, a single-image
aberration-magnitude regressor used for recalibration.

All DeepFocus models take a patch-pair batch (B, 2, H, W) in [-1, 1]
(channel 0 = image at wd + Δ, channel 1 = wd − Δ) and treat it as a 3-D
volume (B, 1, 2, H, W) whose z axis holds the two images, so (1, k, k)
kernels share weights across the pair. Outputs are corrections to ADD to the
current setting: (Δwd µm, Δstig x, Δstig y) [, score].
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

# Seed layer table for the image-to-scalar models: (out channels, kernel, pool).
# Valid convolutions, floor pooling; the same stack serves every input size.
DEEPFOCUS_CONV = ((20, 5, 2), (30, 5, 2), (40, 4, 2), (50, 4, 2), (60, 2, 2), (70, 1, 2), (70, 1, 1))
# FC (input, hidden) per patch side, as in the seed
DEEPFOCUS_FC = {128: (140, 100), 256: (1260, 250), 384: (3500, 250), 512: (6860, 250)}
DEEPSCORE_CONV = ((20, 3, 2), (30, 3, 2), (40, 3, 2), (50, 3, 2), (60, 3, 2), (70, 3, 2))
DEEPSCORE_FC = {512: (2520, 250)}
DROPOUT = 0.1
# Fixed output scale (Δwd µm, stig x, stig y, score): the targets span ±20 µm
# and ±5, so the last layer works at unit scale and escapes the predict-the-
# median plateau within a CPU budget (the seed had 10⁶ GPU steps). A
# reparametrisation only: outputs stay in µm / stig units.
OUTPUT_SCALE = (10.0, 2.0, 2.0, 1.0)
COLUMN_INPUTS = 3          # ColumnDeepFocusNet: [known, known·ln(α_seen/α_ref), known·ln(feed pixel/card pixel)]
COLUMN_INPUT_CARD = ("[known, known * ln(alpha_seen / alpha_ref), known * ln(feed pixel / card pixel)] per pair, "
                     "alpha_seen = the column's probe half-angle x card pixel / feed pixel (stated, recalibrated "
                     "or learned); zeros = unknown. Models of stage T take the first two only (card "
                     "column_inputs)")
PATCH_SCORE_ALPHA = 0.25


class Conv3DBlock(nn.Module):
    """Seed Conv3D layer with a (1, k, k) kernel: convolution, batch norm, ReLU,
    max pool (1, p, p), dropout. A z-kernel of 1 applies the same 2-D kernel to
    each image of the pair, so it runs as a 2-D layer on the pair folded into the
    batch, (B·2, C, H, W): identical arithmetic (BatchNorm2d over B·2 planes =
    BatchNorm3d over (B, z)), but ~2x faster on CPU and channels-last capable."""

    def __init__(self, cin: int, cout: int, k: int, pool: int, dropout: float = DROPOUT):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k)
        self.bn = nn.BatchNorm2d(cout)
        self.pool = nn.MaxPool2d(pool) if pool > 1 else nn.Identity()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.pool(F.relu(self.bn(self.conv(x)))))


def conv_out_side(side: int, table) -> int:
    for _, k, p in table:
        side = (side - k + 1) // p
    return side


class PlanarStack(nn.Module):
    """The Conv3D blocks over (B, Z, H, W); returns flat features in Conv3D
    order, i.e. (B, C, Z, h, w) flattened."""

    def __init__(self, table, dropout: float = DROPOUT):
        super().__init__()
        layers, cin = [], 1
        for cout, k, p in table:
            layers.append(Conv3DBlock(cin, cout, k, p, dropout))
            cin = cout
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, z, h, w = x.shape
        f = self.layers(x.reshape(b * z, 1, h, w))
        f = f.reshape(b, z, f.shape[1], f.shape[2], f.shape[3]).transpose(1, 2)
        return torch.flatten(f, 1)


class DeepFocusNet(nn.Module):
    """Image-to-scalar DeepFocus; n_out = 3 (corrections) or 4 (+ patch score)."""

    def __init__(self, patch: int, n_out: int = 3, dropout: float = DROPOUT):
        super().__init__()
        if patch not in DEEPFOCUS_FC:
            raise ValueError(f"no seed layer table for {patch}² patches (have {sorted(DEEPFOCUS_FC)})")
        fc_in, hidden = DEEPFOCUS_FC[patch]
        side = conv_out_side(patch, DEEPFOCUS_CONV)
        got = DEEPFOCUS_CONV[-1][0] * 2 * side * side
        assert got == fc_in, f"conv stack gives {got} features, seed says {fc_in}"
        self.patch, self.n_out = patch, n_out
        self.features = PlanarStack(DEEPFOCUS_CONV, dropout)
        self.fc = nn.Sequential(nn.Linear(fc_in, hidden), nn.ReLU(), nn.Linear(hidden, 50), nn.ReLU(),
                                nn.Linear(50, n_out))
        self.register_buffer("out_scale", torch.tensor(OUTPUT_SCALE[:n_out]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x)) * self.out_scale


class ColumnDeepFocusNet(DeepFocusNet):
    """DeepFocusNet told which column it reads (issue 15): ``column`` (B,
    COLUMN_INPUTS) from column_input(): whether the column is known, the probe
    half-angle it has at the model pixel (stated by the setup, recalibrated or
    learned from the loop's moves) and the pixel it is fed at; zeros where
    none is known. Why: one pair fixes α²·Δz only
    loosely for a wide column, and an L1 network reads the median over the
    columns it trained on (P fine-tuned on 18-25 mrad alone read 22 mrad within
    12 % but 15 mrad 27 % high); told the column, the prior narrows to it.
    The column enters every fully connected layer through its own map,
    zero-initialised, so the network starts as the one it is fine-tuned from
    and an unknown column reads as that one did."""

    def __init__(self, patch: int, n_out: int = 3, dropout: float = DROPOUT):
        super().__init__(patch, n_out, dropout)
        _, hidden = DEEPFOCUS_FC[patch]
        self.column = nn.ModuleList([nn.Linear(COLUMN_INPUTS, n, bias=False) for n in (hidden, 50, n_out)])
        for lin in self.column:
            nn.init.zeros_(lin.weight)

    def forward(self, x: torch.Tensor, column: Optional[torch.Tensor] = None) -> torch.Tensor:
        f = self.features(x)
        if column is None:           # unknown column
            c = torch.zeros(f.shape[0], self.column[0].in_features, dtype=f.dtype, device=f.device)
        else:
            c = column.to(f.dtype)
        h = F.relu(self.fc[0](f) + self.column[0](c))
        h = F.relu(self.fc[2](h) + self.column[1](c))
        return (self.fc[4](h) + self.column[2](c)) * self.out_scale


def takes_column(variant: str) -> bool:
    """Whether a model of this variant takes the column input (ColumnDeepFocusNet)."""
    v = VARIANTS.get(variant)
    return v is not None and v.name.startswith("deepfocus-column-")


def column_input(alpha_mrad: Optional[float], alpha_ref_mrad: Optional[float],
                 feed_ratio: float = 1.0) -> tuple[float, float, float]:
    """ColumnDeepFocusNet's column input for a column of α (mrad) fed at feed_ratio x the
    card's pixel, where it looks like α / feed_ratio, to a model referenced to α_ref; zeros
    where α or α_ref is unknown. Why the feed pixel too: a column looks like α_ref wherever
    it is fed coarse enough, but a specimen and a probe waist seen coarser are not the
    reference column's (fed to look like 8 mrad, stage U read a 22 mrad column's 6 µm of
    defocus as 4 µm)."""
    if not alpha_mrad or not alpha_ref_mrad:
        return 0.0, 0.0, 0.0
    ratio = float(feed_ratio)
    return 1.0, math.log(float(alpha_mrad) / ratio / float(alpha_ref_mrad)), math.log(ratio)


class DeepScoreNet(nn.Module):
    """Single image (B, 1, H, W) -> (s_wd, s_stig): |Δwd| in µm and the L1 norm
    |Δstig x| + |Δstig y| (seed: the two absolute stig components are summed)."""

    def __init__(self, patch: int = 512, dropout: float = DROPOUT):
        super().__init__()
        fc_in, hidden = DEEPSCORE_FC[patch]
        side = conv_out_side(patch, DEEPSCORE_CONV)
        assert DEEPSCORE_CONV[-1][0] * side * side == fc_in
        self.patch, self.n_out = patch, 2
        self.features = PlanarStack(DEEPSCORE_CONV, dropout)
        self.fc = nn.Sequential(nn.Linear(fc_in, hidden), nn.ReLU(), nn.Linear(hidden, 50), nn.ReLU(),
                                nn.Linear(50, 2))
        self.register_buffer("out_scale", torch.tensor((10.0, 2.0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x)) * self.out_scale


# ------------------------------------------------------------ pixel score
class PlanarBlock(nn.Module):
    """Two (1,3,3) same-padded convolutions with group norm (8 groups) + ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(cin, cout, (1, 3, 3), padding=(0, 1, 1)), nn.GroupNorm(8, cout), nn.ReLU(),
            nn.Conv3d(cout, cout, (1, 3, 3), padding=(0, 1, 1)), nn.GroupNorm(8, cout), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class ResizeConv(nn.Module):
    """Upsample then convolve (Odena et al. 2016): no checkerboard artefacts."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest"))


class PixelScoreUNet(nn.Module):
    """3-D U-Net with 3 planar levels, 32 start filters. Returns per-pixel maps
    (B, 4, H, W): three corrections and a score; the two z planes of the last
    32 features are concatenated to 64 channels and projected by 1x1 convs."""

    def __init__(self, patch: int, start: int = 32):
        super().__init__()
        if patch % 4:
            raise ValueError("pixel-score patches must be divisible by 4")
        self.patch, self.n_out = patch, 4
        f = start
        self.enc1, self.enc2, self.bottom = PlanarBlock(1, f), PlanarBlock(f, 2 * f), PlanarBlock(2 * f, 4 * f)
        self.up2, self.dec2 = ResizeConv(4 * f, 2 * f), PlanarBlock(4 * f, 2 * f)
        self.up1, self.dec1 = ResizeConv(2 * f, f), PlanarBlock(2 * f, f)
        self.head = nn.Sequential(nn.Conv2d(2 * f, 20, 1), nn.ReLU(), nn.Conv2d(20, 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(1)
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool3d(e1, (1, 2, 2)))
        b = self.bottom(F.max_pool3d(e2, (1, 2, 2)))
        d2 = self.dec2(torch.cat([self.up2(b), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        n, c, z, h, w = d1.shape
        return self.head(d1.reshape(n, c * z, h, w))


class PixelScorePatches(nn.Module):
    """Export wrapper: per-patch (P, 3) softmax-pixel-weighted corrections, so
    every shipped DeepFocus model maps (P, 2, H, W) -> (P, 3 or 4)."""

    def __init__(self, net: PixelScoreUNet):
        super().__init__()
        self.net = net
        self.patch, self.n_out = net.patch, 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_weighted(self.net(x))


# ------------------------------------------------------------ reductions/losses
def score_weighted(out: torch.Tensor) -> torch.Tensor:
    """(B, N, 4) per-patch outputs -> (B, 3): softmax of the N scores as weights."""
    w = torch.softmax(out[..., 3], dim=-1)
    return (out[..., :3] * w.unsqueeze(-1)).sum(-2)


def pixel_weighted(maps: torch.Tensor) -> torch.Tensor:
    """(B, 4, H, W) per-pixel maps -> (B, 3): softmax over pixels as weights."""
    w = torch.softmax(maps[:, 3].flatten(1), dim=1)
    return torch.einsum("bcp,bp->bc", maps[:, :3].flatten(2), w)


def score_loss(mean_pred: torch.Tensor, individual: torch.Tensor, target: torch.Tensor,
               alpha: float = PATCH_SCORE_ALPHA) -> torch.Tensor:
    """Seed eq. 3.1: (1 − α)·L1(weighted mean) + L1(individual predictions).
    individual: (B, N, 3) per patch or (B, 3, H, W) per pixel."""
    if individual.dim() == 3:
        ind = F.l1_loss(individual, target.unsqueeze(1).expand_as(individual))
    else:
        ind = F.l1_loss(individual, target[:, :, None, None].expand_as(individual))
    return (1 - alpha) * F.l1_loss(mean_pred, target) + ind


def batch_loss(kind: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor,
               column: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and (B, 3 or 2) aggregated prediction for one batch.

    x: scalar/deepscore (B, C, H, W); patch- and pixel-score (B, N, 2, H, W)
    with N aligned patch pairs of one aberration per sample.
    column: (B, COLUMN_INPUTS) for a ColumnDeepFocusNet (ignored by the others).
    """
    if isinstance(model, ColumnDeepFocusNet):
        pred = model(x, column)
        return F.l1_loss(pred, target), pred
    if kind in ("scalar", "deepscore"):
        pred = model(x)
        return F.l1_loss(pred, target), pred
    b, n = x.shape[:2]
    out = model(x.flatten(0, 1))
    if kind == "patchscore":
        out = out.view(b, n, 4)
        pred = score_weighted(out)
        return score_loss(pred, out[..., :3], target), pred
    # pixel score: one weighted mean per patch, patches combined by their plain mean
    per_patch = pixel_weighted(out).view(b, n, 3)
    pred = per_patch.mean(1)
    maps = out[:, :3].reshape(b, n, 3, *out.shape[-2:]).transpose(1, 2).flatten(2, 3)
    return score_loss(pred, maps, target), pred


# ------------------------------------------------------------ registry
@dataclass(frozen=True)
class Variant:
    name: str
    kind: str                  # "scalar" | "patchscore" | "pixelscore" | "deepscore"
    patch: int
    build: Callable[..., nn.Module]        # build(dropout=...) for the image-to-scalar kinds

    @property
    def n_inputs(self) -> int:
        return 1 if self.kind == "deepscore" else 2


def _register() -> dict[str, Variant]:
    v: dict[str, Variant] = {}
    for p in DEEPFOCUS_FC:
        v[f"deepfocus-{p}"] = Variant(f"deepfocus-{p}", "scalar", p, lambda p=p, **kw: DeepFocusNet(p, 3, **kw))
        v[f"deepfocus-column-{p}"] = Variant(f"deepfocus-column-{p}", "scalar", p,
                                             lambda p=p, **kw: ColumnDeepFocusNet(p, 3, **kw))
        v[f"deepfocus-patchscore-{p}"] = Variant(f"deepfocus-patchscore-{p}", "patchscore", p,
                                                 lambda p=p, **kw: DeepFocusNet(p, 4, **kw))
    for p in (128, 256, 384):
        v[f"deepfocus-pixelscore-{p}"] = Variant(f"deepfocus-pixelscore-{p}", "pixelscore", p,
                                                 lambda p=p, **kw: PixelScoreUNet(p))
    v["deepscore-512"] = Variant("deepscore-512", "deepscore", 512, lambda **kw: DeepScoreNet(512, **kw))
    return v


VARIANTS: dict[str, Variant] = _register()


def build(name: str, dropout: float = DROPOUT) -> nn.Module:
    """dropout: the seed's 0.1 by default; it is identity at inference, so a
    model trained with another rate has the same exported architecture."""
    if name not in VARIANTS:
        raise KeyError(f"unknown variant {name!r}; known: {', '.join(sorted(VARIANTS))}")
    return VARIANTS[name].build(dropout=dropout)


def export_module(name: str, model: nn.Module) -> nn.Module:
    """The module that goes into TorchScript: per-patch outputs for every kind."""
    return PixelScorePatches(model) if VARIANTS[name].kind == "pixelscore" else model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------ file integrity
# A TorchScript file is a program: torch.jit.load runs whatever it was compiled
# from. A model is therefore loaded only when its bytes hash to the "sha256"
# pinned in its JSON card (the card ships with the model, and the training code
# writes it when it exports one), so a swapped or tampered .pt is refused.
MAX_CARD_BYTES = 10 * 1024 * 1024
MAX_MODEL_BYTES = 2 * 1024 ** 3
_SHA256 = re.compile(r"[0-9a-f]{64}")


class UnverifiedModel(ValueError):
    """A model file whose sha256 is missing from, or differs from, its card."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_card(model_path: str | Path) -> dict:
    """The JSON card next to ``model_path`` (same name, .json); FileNotFoundError
    if there is none, ValueError naming the file if it is not a JSON object."""
    p = Path(model_path).with_suffix(".json")
    if not p.is_file():
        raise FileNotFoundError(f"model card {p} missing next to {model_path}")
    if p.stat().st_size > MAX_CARD_BYTES:
        raise ValueError(f"model card {p}: larger than {MAX_CARD_BYTES // 2 ** 20} MiB, not a card")
    try:
        card = json.loads(p.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"model card {p}: not a JSON text file ({type(e).__name__})") from None
    if not isinstance(card, dict):
        raise ValueError(f"model card {p}: expected a JSON object, got {type(card).__name__}")
    return card


def read_verified_model(model_path: str | Path) -> tuple[bytes, dict]:
    """(the model file's bytes, its card) once the bytes hash to the card's
    "sha256"; UnverifiedModel naming the file otherwise. Load from the returned
    bytes, not the path, so the file checked is the file loaded."""
    path = Path(model_path)
    try:
        card = read_card(path)
    except (FileNotFoundError, ValueError) as e:
        raise UnverifiedModel(f"{path}: not loaded: {e} (its sha256 must be pinned in the card)") from None
    want = card.get("sha256")
    if not (isinstance(want, str) and _SHA256.fullmatch(want.lower())):
        raise UnverifiedModel(f"{path}: not loaded: its card {path.with_suffix('.json').name} has no \"sha256\" "
                              "field (64 hex digits). A model file can run code when loaded; add the hash "
                              "(sha256sum) to the card only for a file you trust")
    if not path.is_file():
        raise UnverifiedModel(f"{path}: model file does not exist")
    if path.stat().st_size > MAX_MODEL_BYTES:
        raise UnverifiedModel(f"{path}: not loaded: larger than {MAX_MODEL_BYTES // 2 ** 30} GiB")
    data = path.read_bytes()
    got = sha256_bytes(data)
    if got != want.lower():
        raise UnverifiedModel(f"{path}: not loaded: its sha256 {got[:16]}... differs from the card's "
                              f"{want.lower()[:16]}... (the file was changed or replaced)")
    return data, card


def verification_problem(model_path: str | Path) -> str | None:
    """Why ``model_path`` would be refused (None: it verifies). For the code
    that lists models: skip or flag an unverified file instead of loading it."""
    try:
        read_verified_model(model_path)
    except UnverifiedModel as e:
        return str(e)
    return None
