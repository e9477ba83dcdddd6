"""The project's layers, enforced on the source (ast only, nothing imported).

Every import in the packages below (module level and inside functions,
``import x``, ``from x import y``, relative imports, and
``importlib.import_module("x")`` with a literal name) must follow LAYERS.
Command-line modules (``cli.py``, ``*_cli.py``) are entry points that
main.py mounts: they follow their package's layer as well (what needs a
higher layer is wired in main.py), and no other module may import them (a
library needing something from a CLI module means that something belongs in
a library module).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# layer -> the layers its modules may import. The direction is
#   common <- devices <- acq <- {autofocus, wafer} <- gui <- main.py / CLIs
# ("<-" = "is imported by"); autofocus and wafer are siblings that never
# import each other. devices.sim is part of devices.
LAYERS: dict[str, frozenset[str]] = {
    "common": frozenset({"common"}),
    "devices": frozenset({"common", "devices"}),
    "acq": frozenset({"common", "devices", "acq"}),
    "autofocus": frozenset({"common", "devices", "acq", "autofocus"}),
    "wafer": frozenset({"common", "devices", "acq", "wafer"}),
    "gui": frozenset({"common", "devices", "acq", "autofocus", "wafer", "gui"}),
}
# top-level project names outside the library layers (never imported by them)
APPLICATION = frozenset({"main", "benchmarks", "scripts", "tests"})


def is_cli(module: str) -> bool:
    last = module.rsplit(".", 1)[-1]
    return last == "cli" or last.endswith("_cli")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    p = ROOT.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[:len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, source: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, imported module) for every import in ``source``; ``from a import b``
    names a.b when that is a module, else a."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, is_package)
            subs = [f"{base}.{a.name}" for a in node.names if is_module(f"{base}.{a.name}")]
            out += [(node.lineno, m) for m in subs or [base]]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("import_module", "__import__")):
            out.append((node.lineno, node.args[0].value))
    return sorted(out)


def violations() -> list[str]:
    found = []
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            module = module_name(path)
            where = path.relative_to(ROOT)
            for line, imported in imports_of(module, path.read_text(encoding="utf-8"),
                                              path.name == "__init__.py"):
                top = imported.split(".")[0]
                if top in LAYERS and top not in LAYERS[layer] or top in APPLICATION:
                    found.append(f"{where}:{line}: {module} → {imported} (layer {layer} may not import {top})")
                elif top in LAYERS and is_cli(imported) and not is_cli(module):
                    found.append(f"{where}:{line}: {module} → {imported} (library code may not import the "
                                 f"command-line module {imported}; move what it needs into a library module)")
    return found


def test_library_imports_follow_the_layers():
    found = violations()
    if found:
        pytest.fail("imports against the layers (see LAYERS in tests/test_layers.py):\n  " + "\n  ".join(found),
                    pytrace=False)


def test_the_check_sees_every_kind_of_import():
    """Function-level, relative and import_module imports are all seen."""
    src = ("import common.atomic\n"
           "def f():\n    from gui import app\n"
           "from .sim import cli\n"
           "import importlib\nimportlib.import_module('autofocus.engine_adapter')\n")
    assert imports_of("devices.probe", src) == [(1, "common.atomic"), (3, "gui.app"),
                                                (4, "devices.sim.cli"), (5, "importlib"),
                                                (6, "autofocus.engine_adapter")]
