"""The whole simulated setup from configs/sim.yaml: every real driver over its
real transport, and the simulated loops closed (dose chain, ion milling)."""
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devices import errors
from devices.factory import build_setup
from devices.interfaces import RasterSettings, ScanParams, StagePosition

ROOT = Path(__file__).resolve().parents[2]


def test_devices_check_cli_reports_every_role_healthy():
    r = subprocess.run([sys.executable, str(ROOT / "main.py"), "devices", "check"], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    for role in ("sem", "stage", "ion_gun", "waveform_generator", "multimeter", "current_preamp", "electron_source"):
        assert role in r.stdout
    assert "7/7 devices healthy" in r.stdout


def test_devices_check_fails_when_a_device_is_unreachable(tmp_path):
    import yaml
    data = yaml.safe_load((ROOT / "configs" / "sim.yaml").read_text())
    data["devices"]["ion_gun"]["url"] = "socket://127.0.0.1:9"      # nothing listens there
    data["devices"]["ion_gun"]["command_table"] = str(ROOT / "configs" / "iongun" / "ionoptika_sim.yaml")
    for role in ("waveform_generator", "multimeter"):
        data["devices"][role]["visa_library"] = str(ROOT / "configs" / data["devices"][role]["visa_library"])
    cfg = tmp_path / "broken.yaml"
    cfg.write_text(yaml.safe_dump(data))
    r = subprocess.run([sys.executable, str(ROOT / "main.py"), "devices", "check", "--config", str(cfg)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 1
    assert "FAIL" in r.stdout and "6/7 devices healthy" in r.stdout


def test_multimeter_reads_the_specimen_current_through_the_preamp(sim_config):
    with build_setup(sim_config) as s:
        s.current_preamp.set_sensitivity(1e-9)          # 1 nA/V
        s.multimeter.configure_dc_voltage(10.0, 1.0)
        s.sem.set_probe_current(1e-9)
        s.sem.set_blanked(True)
        assert abs(s.multimeter.read_voltage()) < 1e-3
        s.sem.set_blanked(False)
        # the SR570 takes its new gain asynchronously (listen-only serial): poll briefly
        deadline = time.monotonic() + 3.0
        while True:
            current = s.current_preamp.voltage_to_current(s.multimeter.read_voltage())
            if current == pytest.approx(s.world.specimen_current_a(), rel=1e-3) or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert current == pytest.approx(s.world.specimen_current_a(), rel=1e-3)
        assert 0.5e-9 < current < 1e-9


def test_ion_milling_thins_sections_only_with_beam_raster_and_stage_at_mill_position(sim_config):
    with build_setup(sim_config) as s:
        wafer = s.world.wafer
        sid = wafer.sections[0].id
        mp = sim_config.safety.mill_position
        s.stage.move_to(StagePosition(x=mp.x_mm * 1e-3, y=mp.y_mm * 1e-3))
        s.waveform_generator.configure_raster(RasterSettings(20.0, 20.0))   # 22 mm square at 1.1 mm/Vpp
        s.waveform_generator.set_outputs(True)
        gun = s.ion_gun
        gun.set_energy(10e3)
        gun.set_cluster_size(2000)
        gun.set_raster(True)
        gun.set_beam(True)
        s.clock.sleep(3600)                      # beam still blanked: nothing milled
        assert wafer.milled_depth_m(sid) == 0
        gun.set_blanked(False)
        with pytest.raises(errors.InterlockError):
            s.stage.move_to(StagePosition(x=0.0, y=0.0))   # never move with the ion beam on
        s.clock.sleep(3600)
        depth = wafer.milled_depth_m(sid)
        rate = s.world.mill_depth_rate()
        assert depth == pytest.approx(rate * 3600, rel=0.05) and depth > 0
        gun.set_blanked(True)
        s.clock.sleep(3600)
        assert wafer.milled_depth_m(sid) == pytest.approx(depth)
        gun.set_beam(False)


def test_stage_move_costs_focus_and_frames_follow_the_stage(sim_config):
    with build_setup(sim_config) as s:
        sec = s.world.wafer.sections[0]
        s.stage.move_to(StagePosition(x=sec.center_m[0], y=sec.center_m[1]))
        s.sem.set_blanked(False)
        s.sem.set_scan(ScanParams(pixel_m=10e-9, frame=(256, 192)))
        fr = s.sem.acquire_frame()
        assert fr.image.shape == (192, 256) and fr.image.std() > 5          # tissue, not bare wafer
        assert fr.metadata["stage"]["x"] == pytest.approx(sec.center_m[0], abs=2e-6)
        with pytest.raises(errors.LimitViolation, match="working_distance"):
            s.sem.set_working_distance(20e-3)
        assert s.sem.working_distance() != 20e-3
