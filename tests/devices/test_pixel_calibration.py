"""Pixel-size calibration: the grating measurement (devices/calibration.py), the
SmartSEM driver's pixel_size_scale, the fake's uncalibrated magnification and
`devices calibrate-pixel`."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from devices.calibration import calibrate_sem, measure_pixel_scale
from devices.clock import SimClock
from devices.sim import smartsem_api
from devices.sim.smartsem_api import SimEMApi
from devices.zeiss_setup import check_options, sem_kwargs
from devices.zeiss_smartsem import SmartSEMApi, ZeissSEM

ROOT = Path(__file__).resolve().parents[2]
PITCH = 463e-9                     # a 2160 lines/mm cross-grating replica


def grating(shape, period_px, *, angle=0.0, bars=False, crossed=True, noise=15.0, seed=0):
    """A grating image of ``period_px`` (the test's specimen: the simulator has none)."""
    h, w = shape
    y, x = np.mgrid[0:h, 0:w].astype(float)
    c, s = np.cos(angle), np.sin(angle)
    u, v = (x * c + y * s) / period_px, (-x * s + y * c) / period_px
    wave = (lambda t: ((t % 1.0) < 0.5) * 2.0 - 1.0) if bars else (lambda t: np.sin(2 * np.pi * t))
    g = wave(u) + (wave(v) if crossed else 0.0)
    img = 128 + 40 * g + np.random.default_rng(seed).normal(0.0, noise, g.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


# ------------------------------------------------------------ the measurement
@pytest.mark.parametrize("true_scale", [0.83, 0.97, 1.03, 1.21])
@pytest.mark.parametrize("kind", [dict(), dict(bars=True, angle=0.04), dict(angle=-0.1, noise=40.0)])
def test_a_known_scale_is_recovered_within_0_2_percent(true_scale, kind):
    nominal = 10e-9
    image = grating((768, 1024), PITCH / (nominal * true_scale), **kind)
    r = measure_pixel_scale(image, nominal, PITCH)
    assert r.scale == pytest.approx(true_scale, rel=2e-3)
    assert r.scale_x == pytest.approx(true_scale, rel=2e-3)
    assert r.scale_y == pytest.approx(true_scale, rel=2e-3)
    assert 0 < r.uncertainty < 2e-3 * true_scale


def test_non_square_pixels_show_as_different_axis_scales():
    # period 46.3 px along x but 44.95 px along y: y pixels 3 % larger than x
    h, w = 768, 1024
    y, x = np.mgrid[0:h, 0:w].astype(float)
    img = 128 + 40 * (np.sin(2 * np.pi * x / 46.3) + np.sin(2 * np.pi * y / (46.3 / 1.03)))
    r = measure_pixel_scale(img, 10e-9, PITCH)
    assert r.scale_x == pytest.approx(1.0, rel=1e-3) and r.scale_y == pytest.approx(1.03, rel=1e-3)
    assert r.scale == pytest.approx(1.015, rel=1e-3)


def test_a_line_grating_is_measured_along_its_one_axis():
    image = grating((768, 1024), 46.3 / 1.05, crossed=False)
    r = measure_pixel_scale(image, 10e-9, PITCH)
    assert r.scale_y is None and r.period_px[1] is None
    assert r.scale == pytest.approx(1.05, rel=2e-3)


def test_more_noise_gives_a_larger_uncertainty():
    clean = measure_pixel_scale(grating((768, 1024), 46.3, noise=2.0), 10e-9, PITCH)
    noisy = measure_pixel_scale(grating((768, 1024), 46.3, noise=120.0, seed=3), 10e-9, PITCH)
    assert noisy.uncertainty > 1.5 * clean.uncertainty
    for r in (clean, noisy):                         # an honest error bar: covers the error
        assert abs(r.scale - 1.0) < 3 * r.uncertainty


def test_no_grating_in_view_is_an_error_not_a_number():
    noise = np.random.default_rng(1).integers(0, 256, (768, 1024)).astype(np.uint8)
    with pytest.raises(ValueError, match="no grating period"):
        measure_pixel_scale(noise, 10e-9, PITCH)


@pytest.mark.parametrize("args, names", [
    ((np.zeros((768, 1024)), 0.0, PITCH), ["nominal_pixel_m", "> 0"]),
    ((np.zeros((768, 1024)), 10e-9, float("nan")), ["pitch_m", "> 0"]),
    ((np.zeros(1024), 10e-9, PITCH), ["image", "2-D"]),
    ((np.zeros((768, 1024)), 200e-9, PITCH), ["2.5", "raise the magnification"]),
    ((np.zeros((64, 64)), 10e-9, PITCH), ["grating periods", "lower the magnification"]),
])
def test_bad_input_names_the_field(args, names):
    with pytest.raises(ValueError) as e:
        measure_pixel_scale(*args)
    for name in names:
        assert name in str(e.value)


# -------------------------------------------------- the driver and the fake
def rig(scale=1.0, mag_error=1.0):
    clock = SimClock(0.0, start=0.0)
    fake = SimEMApi(clock=clock, mag_error=mag_error)
    # the test's grating specimen, drawn at the pixel size the frame is really scanned with
    fake._render = lambda snap: grating(snap["store"][::-1], PITCH / snap["pixel"], angle=0.02)
    sem = ZeissSEM(SmartSEMApi(fake), clock=clock, timeout_s=2.0, pixel_size_scale=scale)
    sem.connect()
    return fake, sem


def test_the_scale_lands_smartsem_at_target_over_scale_and_reads_the_target():
    fake, sem = rig(scale=1.03)
    sem.set_pixel_size(10e-9)
    assert fake._get("AP_PIXEL_SIZE") == pytest.approx(10e-9 / 1.03, rel=0.01)
    assert sem.pixel_size() == pytest.approx(10e-9, rel=0.01)
    md = sem.acquire_frame().metadata
    assert md["pixel_size_m"] == pytest.approx(sem.pixel_size())
    assert md["smartsem_pixel_size_m"] == pytest.approx(sem.pixel_size() / 1.03)
    assert md["pixel_size_scale"] == 1.03


def test_calibrating_an_uncalibrated_column_makes_frames_true_to_size():
    fake, sem = rig(mag_error=1.03)                     # SmartSEM's reading is 3 % small
    sem.set_blanked(True)
    before = sem.pixel_size()
    result, nominal, new_scale = calibrate_sem(sem, PITCH, pixel_m=10e-9, frame=(1024, 768))
    assert nominal == pytest.approx(10e-9, rel=0.01)
    assert new_scale == pytest.approx(1.03, rel=2e-3)
    assert sem.pixel_size() == pytest.approx(before, rel=0.01) and sem.blanked()   # scan put back
    fake, sem = rig(scale=new_scale, mag_error=1.03)
    sem.set_pixel_size(10e-9)
    assert fake._state_at(0.0)["pixel"] == pytest.approx(10e-9, rel=0.012)   # 1 % driver tol.
    # calibrating again with the factor applied keeps it (ratio ~1, not compounded)
    again = calibrate_sem(sem, PITCH)[2]
    assert again == pytest.approx(new_scale, rel=2e-3)


@pytest.mark.parametrize("value", [0.3, 2.5, "1.03", True, float("nan")])
def test_a_bad_pixel_size_scale_fails_naming_the_option(value):
    with pytest.raises(ValueError, match=r"devices\.sem\.options\.pixel_size_scale.*0\.5\.\.2"):
        check_options("sem", {"pixel_size_scale": value})
    with pytest.raises(ValueError, match="pixel_size_scale"):
        ZeissSEM(SmartSEMApi(SimEMApi()), pixel_size_scale=value)


def test_the_option_reaches_the_driver():
    assert sem_kwargs({"pixel_size_scale": 0.98})["pixel_size_scale"] == 0.98


# --------------------------------------------------------------------- CLI
def setup_file(tmp_path, sem_options):
    data = yaml.safe_load((ROOT / "configs" / "sim.yaml").read_text())
    for role in ("ion_gun", "waveform_generator", "multimeter", "current_preamp", "electron_source"):
        data["devices"].pop(role, None)
    data["devices"]["sem"] = {"driver": "zeiss_smartsem", "options": {"api": "sim", **sem_options}}
    data["devices"]["stage"] = {"driver": "zeiss_smartsem", "options": {}}
    p = tmp_path / "setup.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.fixture
def grating_fake(monkeypatch):
    """Every fake SmartSEM built from a setup: 3 % magnification error, a grating in view."""
    monkeypatch.setattr(SimEMApi, "__init__", functools.partialmethod(SimEMApi.__init__, mag_error=1.03))
    monkeypatch.setattr(smartsem_api.SimEMApi, "_render",
                        lambda self, snap: grating(snap["store"][::-1], PITCH / snap["pixel"]))


@pytest.mark.parametrize("configured", [1.0, 1.03])
def test_cli_prints_the_factor_for_the_setup(tmp_path, grating_fake, configured):
    from devices.cli import app
    cfg = setup_file(tmp_path, {"pixel_size_scale": configured})
    before = cfg.read_text()
    res = CliRunner().invoke(app, ["calibrate-pixel", "--config", str(cfg), "--pitch-nm", "463",
                                   "--pixel-nm", "10", "--frame", "1024", "768"])
    assert res.exit_code == 0, res.output
    line = [ln for ln in res.output.splitlines() if "pixel_size_scale:" in ln]
    assert len(line) == 1
    assert float(line[0].split(":")[1]) == pytest.approx(1.03, rel=2e-3)
    assert cfg.read_text() == before                          # never edits the setup


def test_cli_without_a_grating_fails_clearly(tmp_path):
    from devices.cli import app
    cfg = setup_file(tmp_path, {})
    res = CliRunner().invoke(app, ["calibrate-pixel", "--config", str(cfg), "--pitch-nm", "463",
                                   "--pixel-nm", "10", "--frame", "1024", "768"])
    assert res.exit_code == 1 and "calibration failed" in res.output
