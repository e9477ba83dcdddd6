"""configs/zeiss_merlin.yaml, the example setup for a MERLIN on the microscope
PC: it loads and validates (every SmartSEM option checked) without opening a
single port, and its numbers sit inside the MERLIN's own limits."""
from __future__ import annotations

import pytest

from tests.support import ROOT

MERLIN = ROOT / "configs" / "zeiss_merlin.yaml"


@pytest.fixture
def no_connections(monkeypatch):
    """Any attempt to open a serial port, a VISA session or the COM control fails the test."""
    import pyvisa
    import serial

    def refuse(*a, **k):
        raise AssertionError(f"loading the setup tried to connect: {a}")
    monkeypatch.setattr(serial, "serial_for_url", refuse)
    monkeypatch.setattr(serial, "Serial", refuse)
    monkeypatch.setattr(pyvisa, "ResourceManager", refuse)


def test_the_merlin_example_loads_without_connecting(no_connections):
    from devices.setup_config import load_setup
    from devices.zeiss_setup import sem_kwargs, stage_kwargs
    cfg = load_setup(MERLIN)
    d = cfg.devices
    assert (d.sem.driver, d.stage.driver) == ("zeiss_smartsem", "zeiss_smartsem")
    assert d.sem.options["api"] == "com" and cfg.simulation is None       # the real microscope, no simulator
    assert (d.ion_gun.driver, d.ion_gun.url) == ("serial", "COM3")
    assert d.ion_gun.command_table.is_file()
    assert (d.waveform_generator.driver, d.multimeter.driver) == ("keysight_33522a", "keysight_34465a")
    assert d.waveform_generator.resource.endswith("::INSTR") and d.multimeter.resource.endswith("::INSTR")
    assert (d.current_preamp.driver, d.current_preamp.url, d.current_preamp.sign) == ("sr570", "COM4", -1.0)
    assert d.electron_source is None                                       # commented out
    # the driver options as the driver will get them: the setup's timeout_s is only a margin
    sem = sem_kwargs(d.sem.options, d.sem.timeout_s)
    assert sem["policy"].margin_s == 5.0 and sem["policy"].autofocus_s == 120 and sem["policy"].eht_runup_s == 180
    assert "store_table" not in sem                                        # the MERLIN default table
    stage = stage_kwargs(d.stage.options, d.stage.timeout_s)
    assert stage["settle_s"] == 0.5 and stage["speed"]["x"] == pytest.approx(1e-4)


def test_the_merlin_windows_sit_inside_the_microscope_limits():
    """The product information's numbers the file's comments name."""
    from devices.setup_config import load_setup
    s = load_setup(MERLIN).safety
    assert 0.02 <= s.eht_kv[0] < s.eht_kv[1] <= 30.0
    assert 0 < s.probe_current_na[0] < s.probe_current_na[1] <= 300.0
    for lo, hi in (s.stage.x_mm, s.stage.y_mm):
        assert hi - lo <= 130.0
    assert s.stage.z_mm[1] - s.stage.z_mm[0] <= 50.0
    assert -4.0 <= s.stage.t_deg[0] and s.stage.t_deg[1] <= 70.0
    mp = s.mill_position
    assert s.stage.x_mm[0] <= mp.x_mm <= s.stage.x_mm[1] and s.stage.y_mm[0] <= mp.y_mm <= s.stage.y_mm[1]
    assert mp.glancing_angle_deg <= min(mp.max_tilt_deg, s.stage.t_deg[1])


def test_a_typo_in_the_merlin_options_is_refused_naming_it(tmp_path):
    from devices.setup_config import ConfigError, load_setup
    text = MERLIN.read_text().replace("settle_s: 0.5", "setle_s: 0.5")
    bad = tmp_path / "merlin.yaml"
    bad.write_text(text.replace("command_table: iongun/", f"command_table: {ROOT / 'configs' / 'iongun'}/"))
    with pytest.raises(ConfigError, match=r"devices\.stage\.options: unknown setle_s"):
        load_setup(bad)
