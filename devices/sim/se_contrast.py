"""What makes a real secondary-electron image differ from a blurred texture
(issue 15): edge brightening, slow charging during the scan, a non-linear
detector chain and brightness/contrast that wander between two frames.

Each effect is off at its neutral value (0, or 1 for the gamma) and then draws
no random numbers, so a setup without them renders bit-identical frames.
"""
from __future__ import annotations

import numpy as np

EDGE_REFERENCE_M = 10e-9     # edge gain is per signal step over 10 nm, whatever the frame's pixel


def edge_brighten(sig: np.ndarray, gain: float, pixel_m: float) -> np.ndarray:
    """SE yield rises where the surface (or composition) changes: more
    secondaries escape near an edge. Adds gain·|∇s| (per 10 nm) to the
    specimen signal before the probe blurs it."""
    if gain <= 0:
        return sig
    gy, gx = np.gradient(sig)
    mag = np.hypot(gx, gy)
    mag *= np.float32(gain * EDGE_REFERENCE_M / pixel_m)
    return sig + mag


def charging(sig: np.ndarray, sd: float, rng: np.random.Generator) -> np.ndarray:
    """Slow charging while the frame is scanned: brightness drifts along the
    slow scan axis (a ramp of random size and sign, plus a gentle bend), in
    place. ``sd`` is the s.d. of the relative change over one frame."""
    if sd <= 0:
        return sig
    h = sig.shape[0]
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)
    ramp, bend = rng.normal(0.0, sd), rng.normal(0.0, sd / 2)
    sig *= (1.0 + ramp * t + bend * 4 * t * (1 - t)).astype(np.float32)[:, None]
    return sig


def detector_chain(grey: np.ndarray, gamma: float, offset: float, full_scale: float,
                   gain_sd: float, offset_sd: float, rng: np.random.Generator) -> np.ndarray:
    """Grey levels after the detector's non-linear response (a power law about
    the black level: scintillator/PMT and amplifier saturation) and this
    frame's own brightness and contrast (auto brightness/contrast and gun
    emission drift between the two frames of a pair), in place."""
    if gamma != 1.0:
        u = grey - np.float32(offset)
        np.clip(u, 0.0, None, out=u)
        u *= np.float32(1.0 / full_scale)
        np.power(u, np.float32(gamma), out=u)
        u *= np.float32(full_scale)
        grey = u + np.float32(offset)
    if gain_sd > 0 or offset_sd > 0:
        g = float(np.exp(rng.normal(0.0, gain_sd))) if gain_sd > 0 else 1.0
        o = float(rng.normal(0.0, offset_sd)) if offset_sd > 0 else 0.0
        grey = (grey - np.float32(offset)) * np.float32(g) + np.float32(offset + o)
    return grey
