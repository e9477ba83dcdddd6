"""GCIB-SEM acquisition: operator GUI and command line.

    python main.py                      start the operator GUI (configs/sim.yaml)
    python main.py devices check        connect every configured device
    python main.py sim frame ...        render one simulated frame
    python main.py wafer ...            section ordering and wafer tools
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIG = ROOT / "configs" / "sim.yaml"

app = typer.Typer(add_completion=False, no_args_is_help=False,
                  help="Acquisition software for wafer-based GCIB-SEM volume electron microscopy.")


def _mount() -> None:
    from devices.cli import app as devices_app
    from devices.sim.cli import app as sim_app
    app.add_typer(devices_app, name="devices")
    app.add_typer(sim_app, name="sim")
    from acq.cli import run as acq_run
    app.command("run", help="Run an acquisition plan (or --resume one).")(acq_run)
    from wafer.cli import app as wafer_app
    from wafer.detect_cli import detect_cmd
    wafer_app.command("detect")(detect_cmd)
    from wafer.mosaic_cli import mosaic_cmd
    wafer_app.command("mosaic")(mosaic_cmd)
    from wafer.annotate import annotate_cmd
    wafer_app.command("annotate")(annotate_cmd)
    app.add_typer(wafer_app, name="wafer")
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


@app.callback(invoke_without_command=True)
def _default(ctx: typer.Context,
             config: Path = typer.Option(DEFAULT_CONFIG, "--config", help="setup YAML")) -> None:
    """Without a subcommand: start the operator GUI."""
    if ctx.invoked_subcommand is not None:
        return
    from devices.demo import run_demo_or_gui
    raise typer.Exit(run_demo_or_gui(config))


_mount()

if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    app()
