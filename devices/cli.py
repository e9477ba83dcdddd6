"""`python main.py devices check`: connect every configured device and report."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

import typer

from devices.check import check_devices
from devices.setup_config import ConfigError

app = typer.Typer(add_completion=False, help="Configured devices.")
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sim.yaml"


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
