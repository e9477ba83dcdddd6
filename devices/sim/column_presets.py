"""Simulated columns modelled on the seed's two microscopes (issue 15), each
number with where it comes from: [seed] the DeepFocus chapter (004 ch. 3),
[measured] read off a real micrograph pair, [vendor] manufacturer data,
[first principles] estimated from electron optics, [representative] a value
in the range real instruments show, with no single source; training
randomises these over a wide range anyway.

Select one in a setup with ``simulation.microscope.preset: setup-a``; keys
given next to it override the preset's values.
"""
from __future__ import annotations

# Setup A: Zeiss Merlin (Gemini column), 1.5 kV, 1.5 nA, in-lens SE, wd 4.5 mm, 10 nm pixels [seed].
SETUP_A = {
    # [measured] MAPFoSt (same probe model as this simulator) puts a real Merlin ±5 µm pair at its
    # known -13.3 µm defocus only with alpha ~ 8 mrad (3 mrad reads -35 µm); a Gaussian-blur fit
    # between three real frames gives 12-19 mrad (a looser s.d. convention)
    "alpha_mrad": 8.0,
    # [first principles] in-focus probe at 1.5 nA: diffraction 0.61 lambda/alpha = 2.4 nm
    # (lambda = 31.7 pm at 1.5 kV) and chromatic Cc dE/E alpha ~ 5-6 nm (Cc ~ 2 mm, dE 0.6 eV Schottky)
    # in quadrature give ~ 6-7 nm FWHM, s.d. ~ 3 nm ([vendor] 1.4 nm at 1 kV is at low current)
    "sigma0_nm": 3.0,
    # [seed] stigmator units as the seed's DeepFocus training (per microscope: recalibrate)
    "stig_rotation_deg": 15.0, "stig_scale_x_um": 3.0, "stig_scale_y_um": 3.0,
    "wd_focus_mm": 4.5,                       # [seed] working distance
    # [representative] in-lens SE on resin-embedded tissue
    "se_edge_gain": 0.4,                      # edge brightening, signal step per 10 nm
    "detector_gamma": 0.85,                   # mild compression near saturation
    "frame_gain_sd": 0.02, "frame_offset_sd": 2.0,   # emission / auto-B/C wander between frames
    "charging_sd": 0.03,                      # brightness drift over one frame
    "line_jitter_px": 0.3,                    # ~3 nm scan-line noise at 10 nm pixels
    "drift_nm_per_frame": 0.5,
}

# Setup B: Zeiss UltraPlus, 1.2 kV, 60 µm aperture, wd 6 mm, scan rotated 90 degrees [seed].
SETUP_B = {
    # [first principles] setup A scaled by aperture diameter (60 / 30 µm) and working distance
    # (4.5 / 6 mm): 8 x 2 x 0.75 = 12 mrad
    "alpha_mrad": 12.0,
    # [first principles] chromatic blur grows with alpha and 1/E: ~ 9 nm FWHM, s.d. ~ 4 nm
    "sigma0_nm": 4.0,
    # [representative] a different stigmator: other axes and gains (what recalibration learns)
    "stig_rotation_deg": -30.0, "stig_scale_x_um": 2.5, "stig_scale_y_um": 3.5,
    "scan_rotation_offset_deg": 90.0,         # [seed]
    "wd_focus_mm": 6.0,                       # [seed]
    "se_edge_gain": 0.6, "detector_gamma": 0.75, "frame_gain_sd": 0.03, "frame_offset_sd": 3.0,
    "charging_sd": 0.05, "line_jitter_px": 0.4, "drift_nm_per_frame": 1.0,   # [representative]
}

PRESETS = {"setup-a": SETUP_A, "setup-b": SETUP_B}
