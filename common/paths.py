"""Where the shipped data is: configs/ (setups, plans, instrument tables) and
models/ (network weights with their JSON cards).

A source checkout (``make``, ``pip install -e .``) has them beside the
packages. ``pip install .`` (the microscope PC) cannot put them inside a
package without moving them out of the repository root, so pyproject.toml
installs them as data files, ``<prefix>/share/gcib-acq/{configs,models}``:
the venv's own folder, or the user base for ``pip install --user``.
Every module that reads a shipped file asks here rather than building the
path from its own ``__file__``.
"""
from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parents[1]
DATA_SUBDIR = ("share", "gcib-acq")         # as [tool.setuptools.data-files] in pyproject.toml


def _is_checkout(root: Path) -> bool:
    # site-packages holds main.py too, and maybe some other project's configs/;
    # only a checkout has pyproject.toml beside configs/
    return (root / "pyproject.toml").is_file() and (root / "configs").is_dir()


def _installed_roots() -> list[Path]:
    """The data folders an install may have used, in pip's order of preference."""
    prefixes = [sysconfig.get_path("data"), sys.prefix]
    try:
        prefixes.append(sysconfig.get_path("data", sysconfig.get_preferred_scheme("user")))
    except KeyError:                          # no user scheme on this platform/build
        pass
    roots: list[Path] = []
    for p in prefixes:
        if p:
            r = Path(p).joinpath(*DATA_SUBDIR)
            if r not in roots:
                roots.append(r)
    return roots


def is_source_checkout() -> bool:
    """True when running from the repository (make, editable install)."""
    return _is_checkout(SOURCE_ROOT)


def data_root() -> Path:
    """The folder holding configs/ and models/: the checkout, else the first
    install data folder that has configs/. Where neither has it, the checkout's
    path, so the error that follows names a path a user can check."""
    if is_source_checkout():
        return SOURCE_ROOT
    for root in _installed_roots():
        if (root / "configs").is_dir():
            return root
    return SOURCE_ROOT


def configs_dir() -> Path:
    return data_root() / "configs"


def models_dir() -> Path:
    return data_root() / "models"


def default_config() -> Path:
    """The simulated setup every command uses without --config."""
    return configs_dir() / "sim.yaml"


def default_out_root() -> Path:
    """Where the GUI proposes new run folders: out/ of the checkout, or
    ~/gcib-acq/out when installed (never inside site-packages)."""
    if is_source_checkout():
        return SOURCE_ROOT / "out"
    return Path.home() / "gcib-acq" / "out"
