"""A bad setup file fails at load, naming the key, the value and what is allowed."""
from pathlib import Path

import pytest
import yaml

from devices.setup_config import ConfigError, load_setup

ROOT = Path(__file__).resolve().parents[2]


def _write(tmp_path, mutate):
    data = yaml.safe_load((ROOT / "configs" / "sim.yaml").read_text())
    mutate(data)
    # keep relative references working from the temporary folder
    for role in ("ion_gun",):
        data["devices"][role]["command_table"] = str(ROOT / "configs" / data["devices"][role]["command_table"])
    for role in ("waveform_generator", "multimeter"):
        lib = data["devices"][role]["visa_library"]
        data["devices"][role]["visa_library"] = str(ROOT / "configs" / lib)
    p = tmp_path / "setup.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_default_sim_config_loads():
    cfg = load_setup(ROOT / "configs" / "sim.yaml")
    assert cfg.devices.sem.driver == "sim"
    assert cfg.simulation.microscope.alpha_mrad > 0
    assert cfg.devices.ion_gun.command_table.is_file()


@pytest.mark.parametrize("mutate, names", [
    (lambda d: d["safety"].update(wd_mmm=[1, 2]), ["safety.wd_mmm", "unknown key"]),
    (lambda d: d["simulation"]["microscope"].update(alpha_mrad=-1), ["simulation.microscope.alpha_mrad", "-1",
                                                                     "greater than 0"]),
    (lambda d: d["simulation"]["wafer"].update(sections="many"), ["simulation.wafer.sections", "'many'"]),
    (lambda d: d["devices"]["sem"].update(driver="hitachi"), ["devices.sem.driver", "'hitachi'", "zeiss_smartsem"]),
    (lambda d: d["safety"].update(wd_mm=[8, 3]), ["safety.wd_mm", "lower bound 8"]),
    (lambda d: d["safety"]["mill_position"].update(x_mm=40), ["safety.mill_position.x_mm = 40", "outside"]),
    (lambda d: d["simulation"]["specimen"].update(images=["/nonexistent/slice.png"]),
     ["simulation.specimen.images", "does not exist"]),
])
def test_bad_setup_names_field_value_and_allowed(tmp_path, mutate, names):
    p = _write(tmp_path, mutate)
    before = sorted(tmp_path.iterdir())
    with pytest.raises(ConfigError) as e:
        load_setup(p)
    for n in names:
        assert n in str(e.value), str(e.value)
    assert sorted(tmp_path.iterdir()) == before      # nothing written


def test_missing_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_setup(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_setup(tmp_path / "list.yaml")
