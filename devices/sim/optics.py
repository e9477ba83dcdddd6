"""Probe formation and detection of the simulated SEM.

image = specimen ⊛ probe, then shot noise. The probe is a 2-D distribution
with covariance

    Σ = σ0²·I + (α²/4)·A·Aᵀ,   A = [[Δz + aₓ, a_y], [a_y, Δz − aₓ]]
    (aₓ, a_y) = R(2θ)·(sₓ·(stigx − stigx₀), s_y·(stigy − stigy₀))

so ±Δz blur equally without astigmatism and differently with it (the two
line foci), which is what lets a ±Δwd image pair tell the sign of defocus.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.fft as sfft
from scipy.special import j1

from common.constants import E_CHARGE


@dataclass(frozen=True)
class Aberration:
    """Deviation from the focus baseline: defocus in m, stig in setup units."""
    dz_m: float
    stig_x: float
    stig_y: float


def astig_vector(ab: Aberration, stig_scale_m: tuple[float, float], rotation_rad: float):
    u = stig_scale_m[0] * ab.stig_x
    v = stig_scale_m[1] * ab.stig_y
    c, s = math.cos(2 * rotation_rad), math.sin(2 * rotation_rad)
    return c * u - s * v, s * u + c * v


def defocus_matrix(ab: Aberration, stig_scale_m, rotation_rad) -> np.ndarray:
    ax, ay = astig_vector(ab, stig_scale_m, rotation_rad)
    return np.array([[ab.dz_m + ax, ay], [ay, ab.dz_m - ax]])


def probe_covariance(ab: Aberration, alpha_rad: float, sigma0_m: float,
                     stig_scale_m=(3e-6, 3e-6), rotation_rad: float = 0.0) -> np.ndarray:
    """Covariance (m²) of the probe in specimen x/y."""
    a = defocus_matrix(ab, stig_scale_m, rotation_rad)
    return sigma0_m ** 2 * np.eye(2) + (alpha_rad ** 2 / 4.0) * (a @ a.T)


def rotate_covariance(cov: np.ndarray, scan_rotation_rad: float) -> np.ndarray:
    """Express a specimen-frame covariance in the rotated scan frame."""
    c, s = math.cos(scan_rotation_rad), math.sin(scan_rotation_rad)
    r = np.array([[c, -s], [s, c]])
    return r.T @ cov @ r


def probe_otf(shape: tuple[int, int], pixel_size_m: float, cov_defocus: np.ndarray,
              sigma0_m: float, shape_kind: str = "gaussian") -> np.ndarray:
    """Optical transfer function on an rfft2 grid (rows, cols//2+1), float32.

    Gaussian: exp(−2π² fᵀΣf). Pillbox: a uniformly filled ellipse with the
    same second moments as the defocus part (Airy-like ringing, zeros of the
    OTF), times the Gaussian of the in-focus spot σ0.
    """
    h, w = shape
    # frequencies in cycles per pixel; the covariance goes to pixel² units
    fy = sfft.fftfreq(h).astype(np.float32)[:, None]
    fx = sfft.rfftfreq(w).astype(np.float32)[None, :]
    c = (np.asarray(cov_defocus) / pixel_size_m ** 2).astype(np.float32)
    s0 = np.float32((sigma0_m / pixel_size_m) ** 2)
    k = np.float32(-2 * math.pi ** 2)
    if shape_kind == "gaussian":
        q = (c[0, 0] + s0) * fx * fx + (2 * c[0, 1]) * fx * fy + (c[1, 1] + s0) * fy * fy
        return np.exp(k * q)
    q = c[0, 0] * fx * fx + (2 * c[0, 1]) * fx * fy + c[1, 1] * fy * fy
    rho = np.float32(2 * math.pi) * np.sqrt(np.float32(4.0) * np.maximum(q, 0))   # 2π·r·|f| for a disc
    with np.errstate(invalid="ignore", divide="ignore"):
        disc = np.where(rho > 1e-6, 2 * j1(rho) / rho, np.float32(1.0)).astype(np.float32)
    return disc * np.exp(k * s0 * (fx * fx + fy * fy))


def blur_margin_px(cov: np.ndarray, sigma0_m: float, pixel_size_m: float, cap: int = 256) -> int:
    """Padding that keeps FFT wrap-around out of the frame (≈ 3 s.d.)."""
    sd = math.sqrt(max(np.linalg.eigvalsh(cov).max(), 0.0) + sigma0_m ** 2)
    return int(min(cap, math.ceil(3.5 * sd / pixel_size_m) + 2))


def convolve(signal: np.ndarray, otf: np.ndarray) -> np.ndarray:
    spec = sfft.rfft2(signal, workers=-1)
    spec *= otf
    return sfft.irfft2(spec, s=signal.shape, workers=-1).astype(np.float32, copy=False)


def fast_shape(h: int, w: int) -> tuple[int, int]:
    return sfft.next_fast_len(h, real=True), sfft.next_fast_len(w, real=True)


def detect(signal: np.ndarray, probe_current_a: float, dwell_s: float, efficiency: float,
           full_scale: float, offset: float, read_noise: float,
           rng: np.random.Generator) -> np.ndarray:
    """Shot noise and detector: grey levels (float, not yet clipped to 8 bits:
    see quantise) whose SNR grows with √(I·τ).

    Detected electrons per pixel are Poisson with mean N·η·s, N = I·τ/e
    primaries. The detector gain is normalised to the dose (as an operator's
    brightness/contrast would be), so brightness is dose-independent and only
    the noise changes. From 20 detected electrons at full yield on, the
    Gaussian limit of the Poisson law is used (one normal draw that also
    carries the read noise): ~10× faster on large frames.
    """
    n_primary = probe_current_a * dwell_s / E_CHARGE
    scale = n_primary * efficiency
    gain = np.float32(full_scale / max(scale, 1e-12))
    sig = np.clip(signal, 0.0, None)
    if scale < 20:
        grey = rng.poisson(sig * np.float32(scale)).astype(np.float32)
        grey *= gain
        if read_noise > 0:
            grey += rng.standard_normal(sig.shape, dtype=np.float32) * np.float32(read_noise)
    else:
        # variance in grey levels: gain²·λ (shot) + read²
        sd = sig * np.float32(gain * full_scale)
        sd += np.float32(read_noise ** 2)
        np.sqrt(sd, out=sd)
        grey = rng.standard_normal(sig.shape, dtype=np.float32)
        grey *= sd
        grey += sig * np.float32(full_scale)
    grey += np.float32(offset)
    return grey


def dark_frame(shape: tuple[int, int], dwell_s: float, offset: float, read_noise: float,
               rng: np.random.Generator) -> np.ndarray:
    """A frame with the beam blanked: black level and read noise."""
    return quantise(detect(np.zeros(shape, np.float32), 1e-12, dwell_s, 1.0, 0.0, offset, read_noise, rng))


def quantise(grey: np.ndarray) -> np.ndarray:
    """Detector grey levels to the 8-bit frame the SEM delivers."""
    np.clip(grey, 0, 255, out=grey)
    return grey.astype(np.uint8)


def scan_time(width: int, height: int, dwell_s: float, flyback_s: float) -> float:
    return width * height * dwell_s + height * flyback_s


def line_jitter(img: np.ndarray, sd_px: float, rng: np.random.Generator) -> np.ndarray:
    """Per-line sub-pixel shift (scan noise), first-order interpolation, in place."""
    if sd_px <= 0:
        return img
    s = rng.normal(0.0, sd_px, size=(img.shape[0], 1)).astype(np.float32)
    d = img[:, 1:] - img[:, :-1]
    d *= s
    img[:, :-1] += d
    return img
