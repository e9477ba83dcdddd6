"""`pip install .` into a fresh venv gives a working `gcib-acq` command that
finds its setups and models without the repository (issue 13, item 6).

Nothing is downloaded: the new venv sees this .venv's packages through a .pth
file (they are the pinned dependencies), and the project is installed with
--no-deps --no-build-isolation from a copy of the working tree, which is
deleted before the command runs, so nothing can be read from a checkout.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from tests.support import ROOT

pytestmark = pytest.mark.slow


def _sh(*cmd, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INDEX"] = "1"                 # a missing dependency fails here instead of downloading
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _working_tree() -> list[str]:
    """Tracked and new, not ignored files: what a clone plus local edits holds."""
    r = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                       check=True)
    return [p for p in r.stdout.decode().split("\0") if p and (ROOT / p).is_file()]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    if shutil.which("git") is None:
        pytest.skip("git is needed to list the working tree")
    tmp = tmp_path_factory.mktemp("install")
    src, venv, elsewhere = tmp / "src", tmp / "venv", tmp / "elsewhere"
    shipped = []
    for rel in _working_tree():
        if rel.startswith("tests/"):
            continue
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
        if rel.split("/", 1)[0] in ("configs", "models"):
            shipped.append(rel)
    r = _sh(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp)
    assert r.returncode == 0, r.stderr
    py = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = Path(_sh(py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=tmp).stdout.strip())
    (site / "_gcib_test_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")   # pip, setuptools, deps
    # --ignore-installed: this .venv's editable gcib-acq is visible too; leave it alone
    r = _sh(py, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--ignore-installed", ".", cwd=src)
    assert r.returncode == 0, r.stdout + r.stderr
    shutil.rmtree(src)                        # the command must not need the source tree
    elsewhere.mkdir()
    scripts = venv / ("Scripts" if os.name == "nt" else "bin")
    return {"venv": venv, "py": py, "exe": scripts / ("gcib-acq.exe" if os.name == "nt" else "gcib-acq"),
            "cwd": elsewhere, "shipped": shipped}


def test_installed_command_checks_the_simulated_devices(installed):
    r = _sh(installed["exe"], "devices", "check", cwd=installed["cwd"])
    assert r.returncode == 0, r.stdout + r.stderr
    devices = yaml.safe_load((ROOT / "configs" / "sim.yaml").read_text())["devices"]
    assert {"sem", "stage", "ion_gun"} <= set(devices)
    for role, spec in devices.items():
        assert any(line.split()[:2] == [role, spec["driver"]] for line in r.stdout.splitlines()), (role, r.stdout)
    assert f"{len(devices)}/{len(devices)} devices healthy" in r.stdout


def test_installed_command_has_the_commands_of_main_py(installed):
    r = _sh(installed["exe"], "--help", cwd=installed["cwd"])
    assert r.returncode == 0, r.stderr
    import click
    import typer
    from main import app
    group = typer.main.get_command(app)
    commands = group.list_commands(click.Context(group))
    assert "devices" in commands and "run" in commands
    shown = {ln.split()[1] for ln in r.stdout.splitlines() if ln.startswith("│ ") and len(ln.split()) > 1}
    assert set(commands) <= shown, (commands, r.stdout)


def test_install_carries_every_shipped_config_and_model_and_uses_them(installed):
    share = installed["venv"] / "share" / "gcib-acq"
    assert "configs/sim.yaml" in installed["shipped"] and "models/sections_unet.pt" in installed["shipped"]
    lacking = [rel for rel in installed["shipped"] if not (share / rel).is_file()]
    assert not lacking, f"not installed (add them to [tool.setuptools.data-files]): {lacking}"
    r = _sh(installed["py"], "-c", "import common.paths as p, main, autofocus.methods as m, wafer.detect as d; "
            "print(p.data_root()); print(main.DEFAULT_CONFIG); print(m.MODELS_DIR); print(d.DEFAULT_MODEL)",
            cwd=installed["cwd"])
    assert r.returncode == 0, r.stderr
    root, config, models, unet = (Path(s) for s in r.stdout.split("\n")[:4])
    assert root.resolve() == share.resolve()
    assert config.resolve() == (share / "configs" / "sim.yaml").resolve() and config.is_file()
    assert models.resolve() == (share / "models").resolve() and unet.is_file()
