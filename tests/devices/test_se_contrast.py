"""Secondary-electron contrast of the simulated SEM and the column presets
(issue 15): what makes a real SE frame differ from a blurred texture."""
from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from autofocus.data import column_microscope
from devices.setup_config import MicroscopeParams, Simulation
from devices.sim.frames import specimen_world
from devices.sim.optics import Aberration
from devices.sim.sem import render


def frames(n: int = 1, size=(256, 256), dwell_s=400e-9, **mp) -> list[np.ndarray]:
    """n scans of one field at focus, each with its own noise (and its own
    brightness, charging ... where those vary per frame)."""
    world = specimen_world(Simulation(microscope=MicroscopeParams(**mp)), [], None)
    return [render(world, (3e-6, -2e-6), 10e-9, size, 0.0, Aberration(0.0, 0.0, 0.0), 1.5e-9, dwell_s,
                   np.random.default_rng([5, k])).astype(np.float64) for k in range(n)]


def test_edge_brightening_raises_the_signal_where_the_specimen_changes():
    plain, edged = frames()[0], frames(se_edge_gain=1.0)[0]
    gy, gx = np.gradient(plain)
    edges = np.hypot(gx, gy) > np.percentile(np.hypot(gx, gy), 80)
    lift = edged - plain
    assert lift[edges].mean() > 2 * lift[~edges].mean() > 0


def test_a_non_linear_detector_compresses_the_bright_end():
    lin, comp = frames()[0], frames(detector_gamma=0.7)[0]
    # gamma < 1 brightens mid-tones most: the order is kept, the spread shrinks relative to the mean
    assert comp.mean() > lin.mean() + 5
    assert np.corrcoef(lin.ravel(), comp.ravel())[0, 1] > 0.95
    assert comp.std() / (comp.mean() - 20) < lin.std() / (lin.mean() - 20)


def test_brightness_and_contrast_change_between_the_two_frames_of_a_pair():
    steady = frames(2)
    wander = frames(2, frame_gain_sd=0.1, frame_offset_sd=8.0)
    d_steady = abs(steady[0].mean() - steady[1].mean())
    d_wander = abs(wander[0].mean() - wander[1].mean())
    assert d_steady < 0.5 and d_wander > 2.0


def test_charging_drifts_the_brightness_along_the_slow_scan_axis():
    def top_bottom(img):
        return img[:32].mean() - img[-32:].mean()
    steady = [top_bottom(f) for f in frames(4)]
    charged = [top_bottom(f) for f in frames(4, charging_sd=0.15)]
    assert max(map(abs, steady)) < 3 < max(map(abs, charged))


def test_neutral_values_leave_frames_unchanged():
    base = frames()[0]
    same = frames(se_edge_gain=0.0, detector_gamma=1.0, frame_gain_sd=0.0, frame_offset_sd=0.0, charging_sd=0.0)[0]
    assert np.array_equal(base, same)
    assert not np.array_equal(base, frames(charging_sd=0.05)[0])


def test_presets_fill_the_column_and_given_keys_win():
    a = MicroscopeParams(preset="setup-a", stig_x0=0.4)
    assert (a.alpha_mrad, a.wd_focus_mm, a.stig_x0) == (8.0, 4.5, 0.4) and a.se_edge_gain > 0
    b = MicroscopeParams(preset="setup-b", alpha_mrad=10.0)
    assert b.alpha_mrad == 10.0 and b.scan_rotation_offset_deg == 90.0
    with pytest.raises(ValidationError, match="preset"):
        MicroscopeParams(preset="merlin")
    with pytest.raises(ValidationError, match="detector_gamma"):
        MicroscopeParams(detector_gamma=0.0)


def test_training_columns_cover_real_apertures_and_beyond():
    rng = np.random.default_rng(0)
    alphas = np.array([column_microscope(rng).alpha_mrad for _ in range(2000)])
    assert alphas.min() >= 2.0 and alphas.max() <= 25.0
    assert (alphas < 4).mean() > 0.03 and (alphas > 18).mean() > 0.03       # both tails are trained
    assert ((alphas >= 5) & (alphas <= 15)).mean() > 0.6                     # real columns well covered
