"""MAPFoSt baseline (Binding et al. 2013; PyPI ``mapfost``): WD and stigmator
correction from one image pair taken at wd ± Δ.

How mapfost 4.3.1 sees the probe (mapfost.mtfLib.getMTF, costLib.cost_mapfost):

    MTF(k) = exp(−NA²/8 · [kx²(z²+a²+2·ax·z) + ky²(z²+a²−2·ax·z) − 4·kx·ky·ay·z])
    (ax, ay) = (sx·x1, sy·x2),  k rotated by stig_rot_deg before use,

k in rad/µm, z/ax/ay in µm. Our simulator (devices/sim/optics.py) has
OTF = exp(−½ kᵀΣk) with Σ = (α²/4)·A·Aᵀ, which expands to the same bracket
with NA = α and +4·kx·ky·ay·z. The cross-term sign difference is cancelled by
mapfost's k-grid, whose ky runs upwards (``[::-1]``) while image rows run
downwards, so (ax, ay), the stig units and the rotation θ carry over as they
are. The conversions that do not carry over are listed in
``calibration_from_microscope``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import numpy as np
from mapfost.mapfost import est_aberr
from scipy.optimize import least_squares
from skimage.registration import phase_cross_correlation

from devices.setup_config import MicroscopeParams

Aberration3 = tuple[float, float, float]          # (Δz µm, stig x, stig y) in setup units


@dataclass(frozen=True)
class MapfostCalibration:
    """Parameters handed to ``mapfost.mapfost.est_aberr``.

    num_aperture is mapfost's own number, α·radial_aperture (not α): see
    ``calibration_from_microscope``. stig_scale is the defocus-equivalent (µm)
    of one stigmator unit along the two stigmator axes, stig_rot_deg the angle
    of the x-stigmator line focus in the image (scan) frame.
    """
    num_aperture: float
    stig_scale: tuple[float, float]
    stig_rot_deg: float
    radial_aperture: float = 0.25
    use_bessel: bool = False

    @property
    def alpha_rad(self) -> float:
        return self.num_aperture / self.radial_aperture


def calibration_from_microscope(mp: MicroscopeParams, scan_rotation_rad: float = 0.0,
                                radial_aperture: float = 0.25) -> MapfostCalibration:
    """The exact mapping for a simulated microscope.

    * num_aperture = α[rad]·radial_aperture. mapfost keeps the central
      radial_aperture·N square of the N×N spectrum but builds its k-grid as if
      that square reached Nyquist (get_kspace_xy's pow_spec_crop_factor=0.5
      ignores radial_aperture), so its k is 1/radial_aperture too large; a
      smaller NA compensates because only NA·k enters the MTF.
    * stig_scale = (stig_scale_x_um, stig_scale_y_um): both are µm of
      defocus-equivalent per stig unit, mapfost multiplies x1, x2 by them.
    * stig_rot_deg = θ − scan rotation: mapfost rotates k by +rot, which turns
      its astigmatism vector by 2·rot exactly like our R(2θ); a scan rotation
      ρ turns the specimen-frame probe by −ρ in the image.
    * use_bessel for the pillbox probe: its OTF 2J₁(α√q)/(α√q) is mapfost's
      Bessel MTF with the same NA; the common σ0 Gaussian cancels in the pair.
    """
    rho = math.degrees(scan_rotation_rad) + mp.scan_rotation_offset_deg
    return MapfostCalibration(
        num_aperture=mp.alpha_mrad * 1e-3 * radial_aperture,
        stig_scale=(mp.stig_scale_x_um, mp.stig_scale_y_um),
        stig_rot_deg=_wrap_half_turn(mp.stig_rotation_deg - rho),
        radial_aperture=radial_aperture,
        use_bessel=mp.probe_shape == "pillbox",
    )


def _wrap_half_turn(deg: float) -> float:
    """Stig rotation is defined modulo 180° (the astigmatism vector turns by 2θ)."""
    return (deg + 90.0) % 180.0 - 90.0


def _periodic_component(u: np.ndarray) -> np.ndarray:
    """Periodic part of the periodic-plus-smooth decomposition (Moisan 2011).

    mapfost takes an unwindowed FFT; the frame border then leaks a bright
    cross into the spectrum that is the same in both images and pulls the
    estimate towards zero (≈6 % low on our specimen). Removing the smooth
    component that carries the border jumps takes that out without windowing,
    and it is linear, so the pair stays a pair of blurs of one specimen.
    """
    u = u.astype(np.float64)
    h, w = u.shape
    v = np.zeros_like(u)
    v[0, :] += u[-1, :] - u[0, :]
    v[-1, :] -= u[-1, :] - u[0, :]
    v[:, 0] += u[:, -1] - u[:, 0]
    v[:, -1] -= u[:, -1] - u[:, 0]
    den = (2 * np.cos(2 * np.pi * np.arange(h) / h)[:, None]
           + 2 * np.cos(2 * np.pi * np.arange(w) / w)[None, :] - 4)
    den[0, 0] = 1.0
    s = np.fft.fft2(v) / den
    s[0, 0] = 0.0
    return u - np.real(np.fft.ifft2(s))


def _patch_origins(extent: int, patch: int, n: int) -> list[int]:
    if extent < patch:
        raise ValueError(f"patch of {patch} px does not fit the {extent} px overlap of the pair")
    if n == 1:
        return [(extent - patch) // 2]
    return [int(round(t)) for t in np.linspace(0, extent - patch, n)]


def _run_mapfost(p_img: np.ndarray, m_img: np.ndarray, perturbation_um: float, pixel_um: float,
                 cal: MapfostCalibration) -> np.ndarray:
    n = p_img.shape[0]
    # mapfost keeps n − 2·int((n − int(ra·n))/2) spectrum rows; its k-grid is
    # too coarse by exactly n / kept, so scale NA by kept/(ra·n) for odd sizes.
    kept = n - 2 * ((n - int(cal.radial_aperture * n)) // 2)
    na = cal.num_aperture * kept / (cal.radial_aperture * n)
    ok, _, res = est_aberr(
        [p_img.astype(np.float32), m_img.astype(np.float32)], [perturbation_um, -perturbation_um],
        pix_size_um=pixel_um, num_aperture=na, stig_rot_deg=cal.stig_rot_deg,
        stig_scale=list(cal.stig_scale), crop_ref=[0, 0], crop_size=(n, n), use_bessel=cal.use_bessel,
        test_ims_aligned=1, radial_aperture=cal.radial_aperture)
    if isinstance(ok, str):              # est_aberr returns the traceback instead of raising
        raise RuntimeError(f"mapfost failed:\n{ok}")
    if not ok or res is None:
        raise RuntimeError("mapfost rejected the crop (patch smaller than 64 px or not square)")
    return np.asarray(res.x, dtype=float)


def estimate_aberration(img_plus: np.ndarray, img_minus: np.ndarray, perturbation_um: float,
                        pixel_size_nm: float, calibration: MapfostCalibration, *, patch_size: int = 512,
                        patches_per_side: int = 1, periodize: bool = True) -> np.ndarray:
    """Aberration (Δz µm, stig x, stig y) of the state the pair was taken around.

    img_plus was taken at wd + Δ, img_minus at wd − Δ (Δ = perturbation_um),
    so with Δz = wd − wd_focus mapfost's test aberrations are [+Δ, −Δ] and its
    result is Δz and the stig offsets directly. The pair is aligned to whole
    pixels once (drift between the frames); patches_per_side² square patches
    on an even grid are estimated separately and combined by the median, which
    shrugs off a patch of empty resin or a charging spot.
    """
    a = np.asarray(img_plus, dtype=np.float64)
    b = np.asarray(img_minus, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"need two equal 2-D frames, got {a.shape} and {b.shape}")
    # b[r − s] ≈ a[r]: b's content is displaced by −s relative to a
    shift = phase_cross_correlation(a, b)[0]
    sr, sc = (int(round(v)) for v in shift)
    h, w = a.shape
    r0, r1 = max(0, sr), min(h, h + sr)          # rows of a whose partner b[r − sr] exists
    c0, c1 = max(0, sc), min(w, w + sc)
    rows = _patch_origins(r1 - r0, patch_size, patches_per_side)
    cols = _patch_origins(c1 - c0, patch_size, patches_per_side)
    prep = _periodic_component if periodize else (lambda x: x)
    estimates = []
    for r in rows:
        for c in cols:
            ra, ca = r0 + r, c0 + c
            pa = a[ra:ra + patch_size, ca:ca + patch_size]
            pb = b[ra - sr:ra - sr + patch_size, ca - sc:ca - sc + patch_size]
            estimates.append(_run_mapfost(prep(pa), prep(pb), perturbation_um, pixel_size_nm * 1e-3,
                                          calibration))
    return np.median(np.array(estimates), axis=0)


def estimate_correction(img_plus: np.ndarray, img_minus: np.ndarray, perturbation_um: float,
                        pixel_size_nm: float, calibration: MapfostCalibration, *, patch_size: int = 512,
                        patches_per_side: int = 1, periodize: bool = True) -> tuple[float, float, float]:
    """(d_wd µm, d_stig_x, d_stig_y) to ADD to the current WD and stigmators.

    The correction is the negative of the estimated aberration: Δz > 0 means
    the WD is set beyond focus, so it must come down by Δz.
    """
    dz, sx, sy = estimate_aberration(img_plus, img_minus, perturbation_um, pixel_size_nm, calibration,
                                     patch_size=patch_size, patches_per_side=patches_per_side,
                                     periodize=periodize)
    return -float(dz), -float(sx), -float(sy)


def calibrate_mapfost(acquire_pair: Callable[[Aberration3], tuple[np.ndarray, np.ndarray]],
                      known_aberrations: Sequence[Aberration3], *, perturbation_um: float,
                      pixel_size_nm: float, initial: Optional[MapfostCalibration] = None,
                      radial_aperture: float = 0.25, use_bessel: bool = False, patch_size: int = 512,
                      patches_per_side: int = 1, max_iter: int = 6, tol: float = 2e-3) -> MapfostCalibration:
    """Fit aperture, stig scales and stig rotation on a real installation.

    acquire_pair(ab) sets the microscope to the known aberration ab = (Δz µm,
    stig x, stig y) away from its best focus and stigmation and returns
    (img_plus, img_minus) taken at wd ± perturbation_um. Needs some pairs with
    Δz ≠ 0 (aperture) and two linearly independent stig settings (scales and
    rotation). Each pair is acquired once; only mapfost is re-run.

    1. Aperture. Defocus information is the ratio of the two MTFs,
       exp(−NA²k²·Δz·Δ/2), so mapfost's Δz scales as 1/NA². Run mapfost with
       trial NA, fit the slope of estimated vs known Δz by least squares
       through the origin, rescale NA by √slope, repeat until the slope is 1.
       This also absorbs the estimator's own small bias into NA.
    2. Stigmators. With unit stig scales and zero rotation mapfost returns the
       raw astigmatism vector m (µm, image frame) = R(2θ)·(sx·stigx, sy·stigy);
       fit (sx, sy, θ) to the known stig settings by nonlinear least squares,
       started from the unconstrained 2×2 linear fit.
    """
    known = np.asarray(known_aberrations, dtype=float).reshape(-1, 3)
    if not np.any(known[:, 0] != 0):
        raise ValueError("calibration needs known aberrations with non-zero defocus")
    if np.linalg.matrix_rank(known[:, 1:], tol=1e-6) < 2:
        raise ValueError("calibration needs two linearly independent stig settings")
    pairs = [acquire_pair(tuple(ab)) for ab in known]
    na = initial.num_aperture * radial_aperture / initial.radial_aperture if initial else 5e-3 * radial_aperture
    raw = MapfostCalibration(na, (1.0, 1.0), 0.0, radial_aperture, use_bessel)

    def run_all(cal: MapfostCalibration) -> np.ndarray:
        return np.array([estimate_aberration(p, m, perturbation_um, pixel_size_nm, cal,
                                             patch_size=patch_size, patches_per_side=patches_per_side)
                         for p, m in pairs])

    dz_true = known[:, 0]
    for _ in range(max_iter):
        est = run_all(raw)
        slope = float(dz_true @ est[:, 0] / (dz_true @ dz_true))
        if slope <= 0:
            raise RuntimeError(f"estimated defocus anti-correlates with the known one (slope {slope:.3g})")
        raw = replace(raw, num_aperture=raw.num_aperture * math.sqrt(slope))
        if abs(slope - 1.0) < tol:
            break
    est = run_all(raw)
    stig, meas = known[:, 1:], est[:, 1:]
    # start: m ≈ stig @ Lᵀ with L = R(2θ)·diag(sx, sy)
    lin = np.linalg.lstsq(stig, meas, rcond=None)[0].T
    theta0 = 0.5 * math.atan2(lin[1, 0] - lin[0, 1], lin[0, 0] + lin[1, 1])
    x0 = [max(np.hypot(*lin[:, 0]), 1e-3), max(np.hypot(*lin[:, 1]), 1e-3), theta0]

    def residual(p):
        c, s = math.cos(2 * p[2]), math.sin(2 * p[2])
        u, v = p[0] * stig[:, 0], p[1] * stig[:, 1]
        return np.concatenate([c * u - s * v - meas[:, 0], s * u + c * v - meas[:, 1]])

    fit = least_squares(residual, x0, bounds=([1e-6, 1e-6, -np.inf], [np.inf, np.inf, np.inf]))
    sx, sy, theta = fit.x
    return MapfostCalibration(raw.num_aperture, (float(sx), float(sy)),
                              _wrap_half_turn(math.degrees(theta)), radial_aperture, use_bessel)
