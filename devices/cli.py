"""`python main.py devices check`: connect every configured device and report."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

import typer

from common.paths import default_config
from devices.check import check_devices
from devices.setup_config import ConfigError

app = typer.Typer(add_completion=False, help="Configured devices.")
DEFAULT_CONFIG = default_config()


def finite(lo: Optional[float] = None, hi: Optional[float] = None) -> Callable:
    """Callback for a float option (or a tuple of floats): each value finite and
    within [lo, hi]. Click's min/max let "nan" through (every comparison with
    NaN is false), so a NaN would reach the simulator or a driver unchecked."""
    allowed = "a finite number" + (f" in {lo:g}..{hi:g}" if lo is not None and hi is not None else "")

    def check(value):
        if value is None:
            return value
        for v in (value if isinstance(value, (tuple, list)) else (value,)):
            if not (math.isfinite(v) and (lo is None or v >= lo) and (hi is None or v <= hi)):
                raise typer.BadParameter(f"{v!r}: give {allowed}")
        return value
    return check


@app.command()
def check(config: Path = typer.Option(DEFAULT_CONFIG, "--config", help="setup YAML")) -> None:
    """Connect every device, print role, driver, identity and status; exit 0 only if all are healthy."""
    try:
        rows, ok_all = check_devices(config)
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2)
    head = ("role", "driver", "identity", "status")
    table = [head] + [(r, d, i, ("OK " if ok else "FAIL ") + s) for r, d, i, s, ok in rows]
    widths = [max(len(str(row[c])) for row in table) for c in range(4)]
    for n, row in enumerate(table):
        typer.echo("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
        if n == 0:
            typer.echo("  ".join("-" * w for w in widths))
    typer.echo(f"{sum(r[4] for r in rows)}/{len(rows)} devices healthy")
    raise typer.Exit(0 if ok_all else 1)


@app.command("calibrate-pixel")
def calibrate_pixel(
        config: Path = typer.Option(DEFAULT_CONFIG, "--config", help="setup YAML"),
        pitch_nm: float = typer.Option(..., "--pitch-nm", callback=finite(1.0, 1e6),
                                       help="grating pitch in nm (e.g. 463 for a 2160 lines/mm replica)"),
        pixel_nm: Optional[float] = typer.Option(None, "--pixel-nm", callback=finite(0.01, 1e5),
                                                 help="pixel size to image at (default: the current one)"),
        frame: Optional[tuple[int, int]] = typer.Option(None, "--frame", metavar="W H",
                                                        help="frame size in pixels (default: the current one)"),
) -> None:
    """Image a grating of known pitch at the current stage position and print the
    pixel_size_scale to put in the setup (the setup file is never edited here)."""
    from devices.calibration import PIXEL_SCALE_RANGE, calibrate_sem
    from devices.factory import build_setup
    from devices.setup_config import load_setup
    if frame is not None and min(frame) <= 0:
        raise typer.BadParameter(f"{frame!r}: give a positive width and height", param_hint="--frame")
    try:
        cfg = load_setup(config)
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2)
    with build_setup(cfg) as setup:
        try:
            result, nominal, new_scale = calibrate_sem(
                setup.sem, pitch_nm * 1e-9, pixel_m=None if pixel_nm is None else pixel_nm * 1e-9,
                frame=frame)
        except ValueError as e:          # no grating found, too few periods ...
            typer.echo(f"calibration failed: {e}", err=True)
            raise typer.Exit(1)
    axes = ", ".join(f"{a} {s:.5f}" for a, s in (("x", result.scale_x), ("y", result.scale_y))
                     if s is not None)
    typer.echo(f"nominal pixel size {nominal * 1e9:.4g} nm; measured true/nominal "
               f"{result.scale:.5f} ± {result.uncertainty:.5f} ({axes})")
    typer.echo(f"true pixel size {nominal * result.scale * 1e9:.4g} nm")
    lo, hi = PIXEL_SCALE_RANGE
    if not lo <= new_scale <= hi:
        typer.echo(f"pixel_size_scale {new_scale:.5f} is outside {lo:g}..{hi:g}: check the pitch "
                   "and the column rather than calibrating this away", err=True)
        raise typer.Exit(1)
    typer.echo("put in the setup under devices.sem.options:")
    typer.echo(f"  pixel_size_scale: {new_scale:.5f}")
