"""Command line for wafer planning; mounted by the main program as ``wafer``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Tuple

import typer

from .sections import SectionFormatError, atomic_write_text, centers_array, load_sections
from .tour import SOLVERS, default_solver, fast_tsp_available, order_sections

app = typer.Typer(help="Wafer planning: order sections to minimise stage travel.", no_args_is_help=True)


@app.callback()
def _main() -> None:
    """Wafer planning tools (section order, grids, MagC files)."""


def _table(rows: list[tuple[str, float, float]], best: float) -> str:
    head = ("solver", "length mm", "seconds", "vs best %")
    body = [(name, f"{mm:.3f}", f"{sec:.2f}", f"{(mm / best - 1) * 100:+.2f}" if best > 0 else "+0.00")
            for name, mm, sec in rows]
    widths = [max(len(r[i]) for r in [head] + body) for i in range(4)]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(head)] + [fmt(r) for r in body])


@app.command("order")
def order_cmd(
    sections_json: Path = typer.Argument(..., help="Detection JSON with a 'sections' list.", exists=True,
                                         dir_okay=False, readable=True),
    json_out: Path = typer.Option(..., "--json", help="Where to write the orders (JSON)."),
    start_um: Optional[Tuple[float, float]] = typer.Option(
        None, "--start-um", help="Current stage position X Y in µm (default: 0 0)."),
    solver: Optional[List[str]] = typer.Option(
        None, "--solver", help=f"Solver to run; repeat for several. One of {', '.join(SOLVERS)} (default: fast_tsp if installed, else fast)."),
    seed: int = typer.Option(0, help="Random seed (fast, sa)."),
    time_limit_s: Optional[float] = typer.Option(None, "--time-limit-s", help="Per-solver time cap in seconds."),
    force: bool = typer.Option(False, "--force", help="Overwrite JSON_OUT if it exists."),
) -> None:
    """Order the sections as an open path from the stage position and compare solvers.

    The output's "default" is the solver with the shortest path (first listed on ties)."""
    solvers = list(dict.fromkeys(solver or [default_solver()]))  # de-duplicate, keep order
    bad = [s for s in solvers if s not in SOLVERS]
    if bad:
        raise typer.BadParameter(f"unknown solver(s) {bad}; choose from {', '.join(SOLVERS)}", param_hint="--solver")
    if "fast_tsp" in solvers and not fast_tsp_available():
        raise typer.BadParameter("fast_tsp needs the optional package fast-tsp (pip install fast-tsp)",
                                 param_hint="--solver")
    if json_out.exists() and not force:
        typer.echo(f"error: {json_out} exists (use --force to overwrite)", err=True)
        raise typer.Exit(1)
    try:
        sections = load_sections(sections_json)
    except SectionFormatError as exc:
        typer.echo(f"error: {sections_json}: {exc}", err=True)
        raise typer.Exit(1)
    start = (0.0, 0.0) if start_um is None else (float(start_um[0]), float(start_um[1]))
    pts = centers_array(sections)
    ids = [s.id for s in sections]
    results = {}
    for name in solvers:
        r = order_sections(pts, start, solver=name, seed=seed, time_limit_s=time_limit_s)
        results[name] = r
    best_name = min(solvers, key=lambda s: (results[s].length_um, solvers.index(s)))
    payload = {
        "start_um": list(start),
        "solvers": {name: {"order": [ids[i] for i in r.order], "length_mm": r.length_um / 1000.0,
                           "seconds": r.seconds} for name, r in results.items()},
        "default": best_name,
    }
    atomic_write_text(json_out, json.dumps(payload, indent=1) + "\n", overwrite=force)
    best_mm = results[best_name].length_um / 1000.0
    typer.echo(f"{len(sections)} sections, start at ({start[0]:.1f}, {start[1]:.1f}) µm")
    typer.echo(_table([(n, r.length_um / 1000.0, r.seconds) for n, r in results.items()], best_mm))
    typer.echo(f"default: {best_name} -> {json_out}")
