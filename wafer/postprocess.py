"""GCIB post-processing of one section's sub-stack: where milling broke through,
the mill rate, computational flattening, and the z-order of sub-stacks.

A sub-stack is an aligned array (z, h, w); slice k was imaged after k mill
cycles (slice 0 = the unmilled surface, unless ``slice0_after_cycles`` says
otherwise). Once a pixel's tissue is gone it shows the wafer signal.

Wafer polarity: the reference work segmented the wafer as *dark* (gray < 10 on
gold-coated wafers); with other detectors/contrast it is bright. ``wafer_bright``
selects it; ``None`` decides from the data (the last slice is mostly wafer, the
first mostly tissue).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage
from scipy.interpolate import interp1d


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a sample (maximises the between-class variance)."""
    v = np.asarray(values, float).ravel()
    v = v[np.isfinite(v)]
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return lo
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2.0
    w0 = np.cumsum(hist).astype(float)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mu1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = (w0 * w1 * (mu0 - mu1) ** 2)[:-1]
    # Well separated classes give a plateau of equal scores over the empty gap:
    # take its middle rather than its first bin, which hugs the lower class.
    top = np.flatnonzero(between >= between.max() * (1 - 1e-12))
    return float(edges[(int(top[0]) + int(top[-1])) // 2 + 1])


def _check_stack(stack: np.ndarray) -> np.ndarray:
    s = np.asarray(stack)
    if s.ndim != 3 or min(s.shape) < 1:
        raise ValueError(f"stack: expected shape (z, h, w), got {s.shape}")
    return s


def wafer_mask(stack: np.ndarray, wafer_threshold: float | None = None,
               wafer_bright: bool | None = None) -> np.ndarray:
    """(z, h, w) bool: where the wafer shows."""
    s = _check_stack(stack).astype(float, copy=False)
    if wafer_bright is None:
        wafer_bright = bool(s[-1].mean() > s[0].mean())
    thr = otsu_threshold(s) if wafer_threshold is None else float(wafer_threshold)
    return s > thr if wafer_bright else s < thr


def wafer_level_threshold(stack: np.ndarray, wafer_bright: bool, k: float = 4.0,
                          min_pixels: int = 50) -> float:
    """A threshold ``k`` robust s.d. from the wafer's own signal, measured where
    the last slice shows wafer (by Otsu); never on the tissue side of Otsu.

    Why: a thin film of tissue left on the wafer already lets the wafer signal
    through, so Otsu's midway threshold calls a pixel milled through while
    tens of nm remain (the mill rate comes out high, more so for bright
    tissue). Close to the wafer level, only k s.d. of noise away, a pixel
    counts as wafer when little film is left. Otsu where the last slice shows
    too little wafer (fewer than ``min_pixels``) to measure it."""
    s = _check_stack(stack).astype(float, copy=False)
    otsu = otsu_threshold(s)
    last = s[-1][np.isfinite(s[-1])]
    wafer = last[last > otsu] if wafer_bright else last[last < otsu]
    if wafer.size < min_pixels:
        return otsu
    level = float(np.median(wafer))
    spread = 1.4826 * float(np.median(np.abs(wafer - level)))  # MAD: robust to film not yet gone
    return max(level - k * spread, otsu) if wafer_bright else min(level + k * spread, otsu)


def raw_last_tissue_index(mask: np.ndarray) -> np.ndarray:
    """Per pixel, the index of the last non-wafer slice; -1 if there is none.

    As in the reference: flip the wafer column top-bottom; its first 0 (argmin of
    a bool column) is the originally last tissue slice. Later tissue-looking
    noise inside the wafer therefore moves the estimate later, never earlier."""
    z = mask.shape[0]
    flipped = mask[::-1]
    idx = z - 1 - np.argmin(flipped, axis=0)
    idx[flipped.all(axis=0)] = -1  # argmin of an all-True column is 0: no tissue at all
    return idx.astype(int)


def _smooth_valid(idx: np.ndarray, valid: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing over valid pixels only (normalised convolution), so
    pixels without a breakthrough do not drag their neighbours."""
    out = idx.astype(float)
    if sigma <= 0 or not valid.any():
        return out
    num = ndimage.gaussian_filter(np.where(valid, out, 0.0), sigma, mode="nearest")
    den = ndimage.gaussian_filter(valid.astype(float), sigma, mode="nearest")
    sm = np.divide(num, den, out=out.copy(), where=den > 1e-12)
    return np.where(valid, sm, out)


def last_tissue_index(stack: np.ndarray, wafer_threshold: float | None = None, sigma: float = 1.0,
                      wafer_bright: bool | None = None) -> np.ndarray:
    """(h, w) float: index of the last tissue slice per pixel, smoothed with a
    Gaussian (sigma in pixels, 1 as in the reference). Pixels whose tissue never
    disappears keep z-1, pixels that never show tissue keep -1; both are left
    out of the smoothing."""
    s = _check_stack(stack)
    raw = raw_last_tissue_index(wafer_mask(s, wafer_threshold, wafer_bright))
    valid = (raw >= 0) & (raw < s.shape[0] - 1)
    return _smooth_valid(raw, valid, sigma)


def breakthrough_contrast(stack: np.ndarray, last_index: np.ndarray) -> np.ndarray:
    """(h, w): per pixel, the mean signal after its last tissue slice minus the
    mean up to it (the index rounded); NaN where it has no slice on either
    side. A pixel that really milled through steps from the tissue's level
    to the wafer's; one that only crossed the threshold in noise barely moves."""
    s = _check_stack(stack).astype(float, copy=False)
    z = s.shape[0]
    L = np.rint(np.nan_to_num(np.asarray(last_index, float), nan=-1.0)).astype(int)
    ok = (L >= 0) & (L < z - 1)
    Lc = np.clip(L, 0, z - 2)
    csum = np.cumsum(s, axis=0)
    upto = np.take_along_axis(csum, Lc[None], axis=0)[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        step = (csum[-1] - upto) / (z - 1 - Lc) - upto / (Lc + 1)
    return np.where(ok, step, np.nan)


@dataclass(frozen=True)
class MillRate:
    mean_cycles: float  # cycles needed to remove the section, mean over pixels
    sd_cycles: float
    nm_per_cycle: float
    nm_per_cycle_sd: float
    nm_per_s: float
    nm_per_s_sd: float
    n_pixels: int  # pixels used
    n_censored: int  # pixels whose tissue outlasted the stack (left out)


def mill_rate(stack: np.ndarray, section_thickness_nm: float, cycle_duration_s: float,
              wafer_threshold: float | None = None, sigma: float = 1.0, wafer_bright: bool | None = None,
              slice0_after_cycles: int = 0) -> MillRate:
    """Mean mill rate from the per-pixel breakthrough.

    cycles = last tissue index + 1 + slice0_after_cycles (tissue seen in slices
    0..L is gone after L+1 cycles). Rate = thickness / cycles; its SD follows
    from first-order error propagation, sd(T/N) = (T/N) * sd(N)/N, and the same
    relative error holds per second (T / (N * cycle duration))."""
    if not section_thickness_nm > 0 or not cycle_duration_s > 0:
        raise ValueError("section_thickness_nm and cycle_duration_s must be > 0")
    s = _check_stack(stack)
    idx = last_tissue_index(s, wafer_threshold, sigma, wafer_bright)
    z = s.shape[0]
    valid = (idx >= 0) & (idx < z - 1)
    censored = int((idx >= z - 1).sum())
    if not valid.any():
        raise ValueError("mill_rate: no pixel shows a breakthrough to the wafer in this stack")
    cycles = idx[valid] + 1.0 + slice0_after_cycles
    n_mean, n_sd = float(cycles.mean()), float(cycles.std())
    rel = n_sd / n_mean
    per_cycle = section_thickness_nm / n_mean
    per_s = per_cycle / cycle_duration_s
    return MillRate(mean_cycles=n_mean, sd_cycles=n_sd, nm_per_cycle=per_cycle, nm_per_cycle_sd=per_cycle * rel,
                    nm_per_s=per_s, nm_per_s_sd=per_s * rel, n_pixels=int(valid.sum()), n_censored=censored)


def mill_rate_map(stack: np.ndarray, section_thickness_nm: float, mill_s_before: Sequence[float],
                  mills_before: Sequence[float] | None = None, wafer_threshold: float | None = None,
                  sigma: float = 1.0, wafer_bright: bool | None = None) -> dict[str, np.ndarray]:
    """Per-pixel mill rate: (h, w) float maps, NaN where the pixel shows no
    breakthrough (tissue outlasted the stack, or no tissue at all).

    ``mill_s_before[k]``: seconds milled before slice k was imaged;
    ``mills_before[k]``: mill cycles before it (default k). Tissue last seen in
    slice L is gone in slice L+1, so the pixel took the mills before slice L+1
    (the convention of ``mill_rate``); the smoothed, fractional L is
    interpolated between slices, so unequal mills (an interrupted one) count
    with the time they really took.

    Keys: ``cycles``, ``seconds`` (to breakthrough), ``nm_per_cycle``, ``nm_per_s``."""
    if not section_thickness_nm > 0:
        raise ValueError("section_thickness_nm must be > 0")
    s = _check_stack(stack)
    z = s.shape[0]
    t = np.asarray(mill_s_before, float)
    n = np.arange(z, dtype=float) if mills_before is None else np.asarray(mills_before, float)
    if t.shape != (z,) or n.shape != (z,):
        raise ValueError(f"mill_s_before / mills_before: expected {z} values (one per slice)")
    idx = last_tissue_index(s, wafer_threshold, sigma, wafer_bright)
    valid = (idx >= 0) & (idx < z - 1)
    at = np.where(valid, idx + 1.0, np.nan)
    cycles = np.interp(at, np.arange(z), n)
    seconds = np.interp(at, np.arange(z), t)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_cycle = np.where(cycles > 0, section_thickness_nm / cycles, np.nan)
        per_s = np.where(seconds > 0, section_thickness_nm / seconds, np.nan)
    return {"cycles": cycles, "seconds": seconds, "nm_per_cycle": per_cycle, "nm_per_s": per_s}


def flatten(stack: np.ndarray, last_index: np.ndarray) -> np.ndarray:
    """Stretch every pixel column's tissue slices 0..L onto the full z extent by
    linear interpolation (scipy interp1d), so each output slice shows one depth
    fraction of the section everywhere. Output has the input's shape (float32,
    or float64 for float64 input).

    L is rounded to whole slices and columns are grouped by L, so interp1d runs
    once per distinct L over all its columns rather than once per pixel.
    Columns with L < 1 (at most one tissue slice) are copied unchanged."""
    s = _check_stack(stack)
    z, h, w = s.shape
    L = np.asarray(last_index, float)
    if L.shape != (h, w):
        raise ValueError(f"last_index: expected shape {(h, w)}, got {L.shape}")
    Li = np.clip(np.rint(np.nan_to_num(L, nan=-1.0)), -1, z - 1).astype(int)
    # float32 unless the input already is float64: a 1000 x 1000 x 50 stack stays 200 MB
    dtype = np.float64 if s.dtype == np.float64 else np.float32
    out = s.reshape(z, -1).astype(dtype)  # copy: columns with L < 1 stay as they are
    cols_by_l = Li.ravel()
    flat = s.reshape(z, -1)
    for l in np.unique(cols_by_l):
        if l < 1:
            continue
        cols = np.flatnonzero(cols_by_l == l)
        f = interp1d(np.arange(l + 1), flat[:l + 1, cols].astype(float), axis=0, kind="linear")
        out[:, cols] = f(np.linspace(0.0, float(l), z))
    return out.reshape(z, h, w)


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    """Zero-mean normalised cross-correlation of two equally shaped images, at zero shift."""
    a = np.asarray(a, float).ravel()
    b = np.asarray(b, float).ravel()
    a = a - a.mean()
    b = b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else 0.0


@dataclass(frozen=True)
class SubstackOrder:
    order: list[int]  # indices into the given sub-stacks, top (first milled) first
    link_scores: list[float]  # NCC of each consecutive pair in ``order``
    score_matrix: np.ndarray  # S[a, b] = NCC(last slice of a, first slice of b)


def order_substacks(substacks: Sequence[np.ndarray]) -> SubstackOrder:
    """Order sub-stacks in z: b should follow a when a's last slice correlates
    with b's first slice.

    Method: greedy chain from the best start. For every possible first stack,
    repeatedly append the unused stack with the highest score to the current
    end; keep the chain with the largest total score. O(n^3) with vectorised
    inner steps; fine for hundreds of sections. Assumes the sub-stacks are
    already aligned in x-y (zero-shift correlation)."""
    n = len(substacks)
    if n == 0:
        return SubstackOrder([], [], np.zeros((0, 0)))
    shapes = {tuple(np.shape(s)[1:]) for s in substacks}
    if len(shapes) != 1 or any(np.ndim(s) != 3 for s in substacks):
        raise ValueError("substacks: all must be (z, h, w) arrays with the same h, w")

    def normed(img):
        v = np.asarray(img, float).ravel()
        v = v - v.mean()
        nrm = np.linalg.norm(v)
        return v / nrm if nrm > 0 else v

    last = np.stack([normed(s[-1]) for s in substacks])
    first = np.stack([normed(s[0]) for s in substacks])
    return order_from_scores(last @ first.T)


def order_from_scores(scores: np.ndarray) -> SubstackOrder:
    """The chain of ``order_substacks`` from a score matrix S[a, b] (how well
    b follows a; the diagonal is ignored), however the scores were made."""
    S = np.array(scores, float)
    n = S.shape[0] if S.ndim == 2 else -1
    if S.shape != (n, n):
        raise ValueError(f"scores: expected a square matrix, got shape {np.shape(scores)}")
    if n == 0:
        return SubstackOrder([], [], np.zeros((0, 0)))
    S[~np.isfinite(S)] = -1.0  # a pair that could not be compared: the worst NCC
    np.fill_diagonal(S, -np.inf)
    best_total, best_chain = -np.inf, list(range(n))
    for start in range(n):
        used = np.zeros(n, dtype=bool)
        used[start] = True
        chain, total = [start], 0.0
        for _ in range(n - 1):
            row = np.where(used, -np.inf, S[chain[-1]])
            nxt = int(np.argmax(row))
            total += row[nxt]
            chain.append(nxt)
            used[nxt] = True
        if total > best_total:
            best_total, best_chain = total, chain
    links = [float(S[a, b]) for a, b in zip(best_chain, best_chain[1:])]
    np.fill_diagonal(S, np.nan)
    return SubstackOrder(order=best_chain, link_scores=links, score_matrix=S)
