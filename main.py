"""GCIB-SEM acquisition: operator GUI and command line.

    python main.py                      start the operator GUI (configs/sim.yaml)
    python main.py devices check        connect every configured device
    python main.py sim frame ...        render one simulated frame
    python main.py wafer ...            section detection, ordering, MagC import/export
    python main.py run PLAN --out DIR   run an acquisition plan (--resume DIR continues one)
    python main.py report DIR           the run at a glance: DIR/report/report.html
    python main.py view DIR             napari (or a neuroglancer state) of everything a run wrote
    gcib-acq ...                        the same commands, once installed (pip install .)

``--config CFG`` before the command applies to every command that takes a
setup (as if given after it); a command without one refuses it, as does a
different --config after the command.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from common.paths import default_config

ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIG = default_config()      # the checkout's configs/, or the installed copy (common/paths.py)
_ARGS = "main.subcommand_args"


class _MainGroup(TyperGroup):
    """Remembers the words after the top-level options, so ``_default`` can
    tell which command runs and whether it has a --config of its own."""

    def resolve_command(self, ctx: typer.Context, args: list[str]):
        ctx.meta.setdefault(_ARGS, list(args))
        return super().resolve_command(ctx, args)


app = typer.Typer(add_completion=False, no_args_is_help=False, cls=_MainGroup,
                  help="Acquisition software for wafer-based GCIB-SEM volume electron microscopy.")


def _mount() -> None:
    from devices.cli import app as devices_app
    from devices.sim.cli import app as sim_app
    app.add_typer(devices_app, name="devices")
    app.add_typer(sim_app, name="sim")
    from acq.cli import run as acq_run
    app.command("run", help="Run an acquisition plan (or --resume one).")(acq_run)
    from acq.cli import journal_app, verify
    app.command("verify")(verify)
    app.add_typer(journal_app, name="journal")
    from acq.report_cli import report_cmd
    from gui.view_cli import view_cmd
    app.command("view", help="Show a run in napari (overview, section volumes, tiles) or write a neuroglancer "
                             "state.")(view_cmd)
    app.command("report", help="Write OUTDIR/report/report.html: how a run went (also while it runs).")(report_cmd)
    from wafer.cli import app as wafer_app
    from wafer.detect_cli import detect_cmd
    wafer_app.command("detect")(detect_cmd)
    from wafer.mosaic_cli import mosaic_cmd
    wafer_app.command("mosaic")(mosaic_cmd)
    from wafer.annotate import annotate_cmd
    wafer_app.command("annotate")(annotate_cmd)
    from wafer.magc_cli import magc_app
    wafer_app.add_typer(magc_app, name="magc")
    from wafer.finetune_cli import train_cmd
    wafer_app.command("train", help="Fine-tune the section detector on your own annotated overviews.")(train_cmd)
    app.add_typer(wafer_app, name="wafer")
    from wafer.volume_cli import volume_app
    app.add_typer(volume_app, name="volume")
    from autofocus.cli import app as autofocus_app
    app.add_typer(autofocus_app, name="autofocus")
    train_app = typer.Typer(add_completion=False, help="Train the networks on the simulator.")
    from wafer.train_sections import train_sections_cmd
    train_app.command("sections")(train_sections_cmd)
    try:
        from autofocus.train import train_deepfocus_cmd
        train_app.command("deepfocus")(train_deepfocus_cmd)
    except ImportError:
        pass
    app.add_typer(train_app, name="train")


def _gui_or_demo(config: Path) -> int:
    """The operator GUI; the headless demo where PyQt is not installed."""
    try:
        from gui.app import run_gui
    except ImportError:
        from devices.demo import headless_demo
        return headless_demo(config)
    return run_gui(config)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _is_group(cmd) -> bool:
    return hasattr(cmd, "get_command") and hasattr(cmd, "list_commands")


def _takes_config(cmd) -> bool:
    return any(p.name == "config" for p in cmd.params)


def _config_commands(group, ctx: typer.Context, prefix: str = "") -> list[str]:
    """Every command (by its full name) that has a --config option."""
    out = []
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if _is_group(cmd):
            out += _config_commands(cmd, ctx, f"{prefix}{name} ")
        elif cmd is not None and _takes_config(cmd):
            out.append(prefix + name)
    return out


def _invoked(ctx: typer.Context) -> tuple[list[str], Optional[object], list[str]]:
    """(names from the top, the command that will run or None, its arguments)."""
    args, cmd, names, i = ctx.meta.get(_ARGS, []), ctx.command, [], 0
    while _is_group(cmd):
        while i < len(args) and args[i].startswith("-"):    # the groups below take no valued options
            i += 1
        sub = cmd.get_command(ctx, args[i]) if i < len(args) else None
        if sub is None:
            return names, None, []
        names.append(args[i])
        cmd, i = sub, i + 1
    return names, cmd, args[i:]


def _own_config(args: list[str]) -> Optional[str]:
    for i, a in enumerate(args):
        if a == "--":
            break
        if a == "--config" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return None


@app.callback(invoke_without_command=True)
def _default(ctx: typer.Context,
             config: Path = typer.Option(DEFAULT_CONFIG, "--config",
                                         help="setup YAML; applies to every command that takes a setup")) -> None:
    """Without a subcommand: start the operator GUI."""
    import autofocus
    from devices.setup_config import ConfigError, load_setup

    autofocus.register_methods()              # before any plan is validated or run, and for the GUI

    source = ctx.get_parameter_source("config")
    given = source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")
    if ctx.invoked_subcommand is None or given:
        try:                                  # a bad setup is refused here, whatever runs next
            load_setup(config)
        except ConfigError as e:
            _fail(f"--config: {e}")
    if ctx.invoked_subcommand is None:
        raise typer.Exit(_gui_or_demo(config))
    if not given:
        return
    names, cmd, rest = _invoked(ctx)
    if cmd is None:                           # --help, or an unknown command: click says so
        return
    shown = " ".join(names)
    if not _takes_config(cmd):
        _fail(f"--config {config}: `{shown}` takes no setup file; --config applies to: "
              + ", ".join(_config_commands(ctx.command, ctx)))
    own = _own_config(rest)
    if own is not None and Path(own).resolve() != config.resolve():
        _fail(f"--config given twice with different files: {config} before `{shown}`, {own} after it; "
              "give it once")
    # click's default_map supplies an option's default to the subcommand it names
    defaults: dict = {"config": config}
    for name in reversed(names):
        defaults = {name: defaults}
    ctx.default_map = defaults


_mount()

if __name__ == "__main__":
    app()
