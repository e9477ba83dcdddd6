"""Per-tile quality control: is this frame worth keeping, and what to do if not.

``ImageInspector(QCConfig).inspect(image, previous)`` measures a frame and
returns a QCResult (ok, reasons, values). Reasons are short machine-readable
strings: too_dark, too_bright, low_contrast, high_contrast, frozen,
incomplete_top, incomplete_bottom, out_of_focus. ``values`` always holds mean,
sd, focus (and the rest), so TileEvent.qc can carry them even when ok.

``QCPolicy.decide(result, attempt)`` tells the engine what to do next:
accept, retry, refocus_retry or give_up (keep the last version and raise an
Incident "qc_failed"). Acquisition glitches (frozen, incomplete) are plain
retries even under refocus_retry: refocusing cannot cure a stale frame buffer.

Everything runs in OpenCV/numpy on whole arrays (no per-pixel Python);
6144x4608 frames take a few tens of ms.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

GLITCHES = frozenset({"frozen", "incomplete_top", "incomplete_bottom"})


class QCConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_mean: float = Field(8.0, ge=0, le=255)
    max_mean: float = Field(247.0, ge=0, le=255)
    min_sd: float = Field(2.0, ge=0, description="below: blank or beam off")
    max_sd: float = Field(110.0, ge=0, description="above: saturated/clipped two-level image")
    frozen_max_diff: int = Field(0, ge=0, le=255, description="max |a-b| still counted as the same frame")
    edge_fraction: float = Field(0.05, gt=0, le=0.25, description="top/bottom share of lines checked")
    edge_sd_threshold: float = Field(1.0, ge=0, description="an edge block flatter than this is unscanned")
    min_focus: Optional[float] = Field(None, ge=0, description="focus score below which a tile fails; "
                                       "None = report only (values depend on the sample)")
    focus_max_side: int = Field(1024, ge=64, description="focus measured on a copy shrunk to this size")


@dataclass
class QCResult:
    ok: bool
    reasons: list[str] = field(default_factory=list)
    values: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """For TileEvent.qc and the journal."""
        return {"ok": self.ok, "reasons": list(self.reasons), **self.values}


def _mean_sd(img: np.ndarray) -> tuple[float, float]:
    m, s = cv2.meanStdDev(img)
    return float(m[0, 0]), float(s[0, 0])


def focus_score(img: np.ndarray, max_side: int = 1024) -> float:
    """Normalised Tenengrad: mean squared Sobel gradient over the image
    variance, on a copy area-shrunk to ``max_side`` (which also averages out
    shot noise that would otherwise pass for sharpness). Contrast-independent;
    higher is sharper; comparable only between frames of similar content."""
    h, w = img.shape
    f = max(h, w) / max_side
    if f > 1:
        img = cv2.resize(img, (max(1, round(w / f)), max(1, round(h / f))), interpolation=cv2.INTER_AREA)
    x = img.astype(np.float32)
    gx = cv2.Sobel(x, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(x, cv2.CV_32F, 0, 1, ksize=3)
    energy = float(cv2.mean(gx * gx + gy * gy)[0])
    _, sd = cv2.meanStdDev(x)
    var = float(sd[0, 0]) ** 2
    return energy / (var + 1e-6)


def uniform_edge_rows(block: np.ndarray, threshold: float, from_end: bool) -> int:
    """How many consecutive rows at one edge of ``block`` are (nearly) constant."""
    sd = block.astype(np.float32).std(axis=1)
    flat = sd < threshold
    if from_end:
        flat = flat[::-1]
    if flat.all():
        return len(flat)
    return int(np.argmin(flat))          # index of the first non-flat row


class ImageInspector:
    def __init__(self, config: QCConfig | dict | None = None):
        self.config = config if isinstance(config, QCConfig) else QCConfig(**(config or {}))

    def inspect(self, image: np.ndarray, previous: Optional[np.ndarray] = None) -> QCResult:
        """``previous``: the last frame of the same grid (frozen-frame check)."""
        c = self.config
        if image.ndim != 2 or image.size == 0:
            return QCResult(False, ["bad_shape"], {"shape": list(image.shape)})
        if image.dtype != np.uint8:
            return QCResult(False, ["bad_dtype"], {"dtype": str(image.dtype)})
        reasons: list[str] = []
        mean, sd = _mean_sd(image)
        v: dict = {"mean": mean, "sd": sd}
        if mean < c.min_mean:
            reasons.append("too_dark")
        if mean > c.max_mean:
            reasons.append("too_bright")
        if sd < c.min_sd:
            reasons.append("low_contrast")
        if sd > c.max_sd:
            reasons.append("high_contrast")

        if previous is not None and previous.shape == image.shape:
            diff = int(cv2.norm(image, previous, cv2.NORM_INF))
            v["max_diff_previous"] = diff
            if diff <= c.frozen_max_diff:
                reasons.append("frozen")

        # incomplete grab: flat lines at top/bottom while the middle has texture
        h = image.shape[0]
        n = max(1, int(round(h * c.edge_fraction)))
        if h >= 3 * n:
            _, sd_mid = _mean_sd(image[n:h - n])
            top, bottom = image[:n], image[h - n:]
            _, sd_top = _mean_sd(top)
            _, sd_bottom = _mean_sd(bottom)
            v.update(sd_top=sd_top, sd_middle=sd_mid, sd_bottom=sd_bottom)
            textured = sd_mid >= c.edge_sd_threshold
            # the whole edge block flat, or a run of flat rows reaching the edge
            rows_top = uniform_edge_rows(top, c.edge_sd_threshold, from_end=False)
            rows_bottom = uniform_edge_rows(bottom, c.edge_sd_threshold, from_end=True)
            v.update(flat_rows_top=rows_top, flat_rows_bottom=rows_bottom)
            min_rows = max(2, n // 4)
            if textured and (sd_top < c.edge_sd_threshold or rows_top >= min_rows):
                reasons.append("incomplete_top")
            if textured and (sd_bottom < c.edge_sd_threshold or rows_bottom >= min_rows):
                reasons.append("incomplete_bottom")

        focus = focus_score(image, c.focus_max_side)
        v["focus"] = focus
        if c.min_focus is not None and focus < c.min_focus:
            reasons.append("out_of_focus")
        return QCResult(not reasons, reasons, v)


Action = Literal["accept", "retry", "refocus_retry", "give_up"]


@dataclass(frozen=True)
class QCDecision:
    action: Action
    reasons: tuple[str, ...] = ()
    attempt: int = 0                    # acquisitions done so far for this tile (1 = first)

    @property
    def reacquire(self) -> bool:
        return self.action in ("retry", "refocus_retry")


class QCPolicy(BaseModel):
    """What the engine does with a failed tile.

    Use: ``d = policy.decide(result, attempt)`` after the attempt-th acquisition
    of a tile (attempt = 1 for the first). ``d.action``:
      accept        - keep it (QC passed);
      retry         - acquire again (next version), same focus;
      refocus_retry - run autofocus, then acquire again;
      give_up       - retries used up: keep the last version, emit an Incident.
    """
    model_config = ConfigDict(extra="forbid")
    action_on_fail: Literal["retry", "refocus_retry"] = "retry"
    max_retries: int = Field(2, ge=0, le=20, description="re-acquisitions after the first attempt")

    def decide(self, result: QCResult, attempt: int = 1) -> QCDecision:
        reasons = tuple(result.reasons)
        if result.ok:
            return QCDecision("accept", reasons, attempt)
        if attempt > self.max_retries:
            return QCDecision("give_up", reasons, attempt)
        if self.action_on_fail == "refocus_retry" and not set(reasons) <= GLITCHES:
            return QCDecision("refocus_retry", reasons, attempt)
        return QCDecision("retry", reasons, attempt)
