"""Pixel-size calibration against a grating of known pitch.

SmartSEM's pixel size (AP_PIXEL_SIZE, from the magnification) can be a few %
off until the magnification is calibrated against a standard; SBEMimage keeps
a per-microscope mag/pixel-size factor for the same reason. Here the factor is
``devices.sem.options.pixel_size_scale`` = true pixel size / SmartSEM's
reading, measured by imaging a grating (e.g. a 463 nm cross-grating replica):
the grating's period in pixels comes from the peak of the image's 2-D spectrum
near the x and the y axis, so a grating set a few degrees off the scan axes
still gives its true period.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from devices.interfaces import ScanParams

PIXEL_SCALE_RANGE = (0.5, 2.0)      # a larger error is not a calibration but a wrong setting
MIN_PERIODS = 8                     # per axis in the frame, so each quadrant holds >= 4
MAX_ANGLE_DEG = 20.0                # grating lines this far off the scan axes still count
PEAK_SNR = 20.0                     # peak / median spectrum in the search band
_PAD = 2                            # zero padding: finer spectral bins, smaller interpolation bias
# worst bias of the log-parabola peak on a Hann-windowed, 2x padded spectrum,
# in padded bins (noise-free gratings of 20..80 px period): the floor of the uncertainty
INTERP_BIAS_BINS = 0.011


@dataclass(frozen=True)
class PixelScale:
    scale: float                     # true / nominal pixel size (mean of the axes found)
    uncertainty: float               # one standard error of ``scale``
    scale_x: Optional[float]         # None: no grating period along that axis
    scale_y: Optional[float]
    period_px: tuple[Optional[float], Optional[float]]    # measured period along x, y


def _positive(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} = {value!r}: allowed a number > 0") from None
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} = {value!r}: allowed a number > 0")
    return v


def _axis_peak(spec: np.ndarray, shape: tuple[int, int], p0: float, axis: str) -> Optional[float]:
    """Sub-pixel grating period (px) from the rfft2 magnitude ``spec`` near the
    given axis; None when no peak stands out of the band."""
    hp, wp = shape
    fy = np.fft.fftfreq(hp)[:, None]
    fx = np.fft.rfftfreq(wp)[None, :]
    f = np.hypot(fx, fy)
    along, across = (fx, np.abs(fy)) if axis == "x" else (np.abs(fy), fx)
    # true period p0/scale with scale in PIXEL_SCALE_RANGE; never beyond Nyquist
    lo, hi = PIXEL_SCALE_RANGE[0] / p0, min(PIXEL_SCALE_RANGE[1] / p0, 0.5)
    band = (f >= lo) & (f <= hi) & (across <= along * math.tan(math.radians(MAX_ANGLE_DEG)))
    if not band.any():
        return None
    masked = np.where(band, spec, -np.inf)
    iy, ix = np.unravel_index(int(np.argmax(masked)), spec.shape)
    if spec[iy, ix] < PEAK_SNR * np.median(spec[band]):
        return None

    def at(y: int, x: int) -> float:
        # rfft keeps kx >= 0 only; |F(-kx, ky)| = |F(kx, -ky)| for a real image
        if x < 0:
            y, x = -y, -x
        return math.log(max(spec[y % hp, x], 1e-300))

    def vertex(left: float, mid: float, right: float) -> float:
        d = left - 2 * mid + right
        return 0.0 if d >= 0 else 0.5 * (left - right) / d     # parabola through log |F|

    dx = vertex(at(iy, ix - 1), at(iy, ix), at(iy, ix + 1))
    dy = vertex(at(iy - 1, ix), at(iy, ix), at(iy + 1, ix))
    kx = (ix + dx) / wp
    ky = (np.fft.fftfreq(hp)[iy] * hp + dy) / hp
    return 1.0 / math.hypot(kx, ky)


def _periods(image: np.ndarray, p0: float) -> dict[str, float]:
    h, w = image.shape
    a = image - image.mean()
    a = a * np.hanning(h)[:, None] * np.hanning(w)[None, :]     # no leakage from the edges
    shape = (_PAD * h, _PAD * w)
    spec = np.abs(np.fft.rfft2(a, s=shape))
    out = {}
    for axis, n in (("x", w), ("y", h)):
        if n / p0 >= MIN_PERIODS / 2:      # enough periods to resolve (quadrants: half the frame)
            p = _axis_peak(spec, shape, p0, axis)
            if p is not None:
                out[axis] = p
    return out


def measure_pixel_scale(image, nominal_pixel_m: float, pitch_m: float) -> PixelScale:
    """true / nominal pixel size from an image of a grating of pitch ``pitch_m``
    taken at the nominal pixel size ``nominal_pixel_m``.

    Uncertainty: the spread of the same measurement on the four quadrants
    (standard error of their mean), which catches noise, drift and a grating
    that is not uniform, combined with the peak interpolation's bias; a
    ValueError when no period stands out."""
    nominal = _positive("nominal_pixel_m", nominal_pixel_m)
    pitch = _positive("pitch_m", pitch_m)
    img = np.asarray(image)
    if img.ndim != 2 or min(img.shape) < 32 or not np.issubdtype(img.dtype, np.number):
        raise ValueError(f"image: allowed a 2-D grey image of at least 32x32 pixels, got "
                         f"{img.dtype} {img.shape}")
    img = img.astype(np.float64)
    if not np.isfinite(img).all():
        raise ValueError("image: allowed finite pixel values only")
    p0 = pitch / nominal                         # expected period in pixels
    h, w = img.shape
    if p0 < 2.5:
        raise ValueError(f"pitch_m / nominal_pixel_m = {p0:.3g} px per period: allowed >= 2.5 "
                         "(the grating is not resolved; raise the magnification)")
    if max(w, h) / p0 < MIN_PERIODS:
        raise ValueError(f"the frame holds {max(w, h) / p0:.3g} grating periods: allowed >= "
                         f"{MIN_PERIODS} (lower the magnification or use a larger frame)")
    full = _periods(img, p0)
    if not full:
        raise ValueError(f"no grating period near {p0:.3g} px found in the image (pitch "
                         f"{pitch:.4g} m at {nominal:.4g} m per pixel): is the grating in view "
                         "and in focus?")
    scales = {a: p0 / p for a, p in full.items()}
    scale = float(np.mean(list(scales.values())))
    quarter = []
    for qy in (slice(0, h // 2), slice(h // 2, 2 * (h // 2))):
        for qx in (slice(0, w // 2), slice(w // 2, 2 * (w // 2))):
            q = _periods(img[qy, qx], p0)
            if all(a in q for a in full):             # the same axes, so comparable means
                quarter.append(np.mean([p0 / q[a] for a in full]))
    if len(quarter) < 2:
        raise ValueError("the grating period is not found in the image's quadrants, so its "
                         "uncertainty is unknown: use a larger frame or a lower magnification")
    spread = float(np.std(quarter, ddof=1) / math.sqrt(len(quarter)))
    # a noise-free image still carries the interpolation bias
    size = {"x": w, "y": h}
    bias = max(scales[a] * INTERP_BIAS_BINS * full[a] / (_PAD * size[a]) for a in full)
    uncertainty = math.hypot(spread, bias)
    return PixelScale(scale=scale, uncertainty=uncertainty, scale_x=scales.get("x"),
                      scale_y=scales.get("y"), period_px=(full.get("x"), full.get("y")))


def calibrate_sem(sem, pitch_m: float, *, pixel_m: Optional[float] = None,
                  frame: Optional[tuple[int, int]] = None) -> tuple[PixelScale, float, float]:
    """Grab one frame of a grating at the current stage position (the beam
    unblanked for it, the scan put back afterwards) and measure it.

    Returns (measurement, nominal pixel size, new pixel_size_scale): the new
    factor is relative to SmartSEM's own reading, i.e. the measured ratio times
    the scale the driver already applies."""
    scan = ScanParams(pixel_m=pixel_m, frame=tuple(frame) if frame is not None else None)
    with sem.scanning(scan):
        nominal = sem.pixel_size()
        image = sem.acquire_frame().image
    result = measure_pixel_scale(image, nominal, pitch_m)
    current = float(getattr(sem, "pixel_size_scale", 1.0))
    return result, nominal, current * result.scale
