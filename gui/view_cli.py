"""`view OUTDIR`: a run's overview, section volumes and (optionally) tiles in
napari, placed in stage micrometres; optionally a neuroglancer viewer state.

    python main.py view out/run1                       napari window
    python main.py view out/run1 --tiles               ... with the OME-TIFF tiles
    python main.py view out/run1 --no-window --neuroglancer-state run1_ng.json \\
        --url-root http://localhost:8000/              state for OUTDIR served there
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def view_cmd(
    outdir: Path = typer.Argument(..., help="Output folder of a run."),
    tiles: bool = typer.Option(False, "--tiles", help="Also show the OME-TIFF tiles (one layer each, "
                               "placed by stage position and scan rotation)."),
    max_tiles: int = typer.Option(400, "--max-tiles", min=1, help="At most this many tile layers "
                                  "(the latest cycles first)."),
    overview: Optional[Path] = typer.Option(None, "--overview", help="Overview OME-TIFF from `wafer mosaic` "
                                            "(default: the first one at the top of OUTDIR)."),
    neuroglancer_state: Optional[Path] = typer.Option(None, "--neuroglancer-state", help="Write a neuroglancer "
                                                      "viewer state (JSON) for the section volumes (never "
                                                      "overwritten)."),
    url_root: Optional[str] = typer.Option(None, "--url-root", help="URL OUTDIR is served at, for "
                                           "--neuroglancer-state (e.g. http://localhost:8000/)."),
    no_window: bool = typer.Option(False, "--no-window", help="Do not open napari (list the layers; "
                                   "write the state file if asked)."),
) -> None:
    """Show a run in napari: overview at the bottom, section volumes above, tiles on top (µm, stage frame)."""
    from acq.view_layers import (ViewError, check_url_root, neuroglancer_state as ng_state, run_layers,
                                 write_neuroglancer_state)
    from common.atomic import FileExists

    def fail(msg: str) -> None:
        typer.echo(f"error: {msg}", err=True)
        raise typer.Exit(2)

    if not outdir.is_dir():
        fail(f"OUTDIR {outdir}: not a folder")
    if neuroglancer_state is not None:
        if url_root is None:
            fail("--neuroglancer-state needs --url-root: the URL OUTDIR is served at (e.g. http://localhost:8000/)")
        if neuroglancer_state.exists():
            fail(f"--neuroglancer-state {neuroglancer_state} exists; refusing to overwrite it")
    elif url_root is not None:
        fail("--url-root is only used with --neuroglancer-state")
    if overview is not None and not overview.is_file():
        fail(f"--overview {overview}: no such file")
    try:
        if url_root is not None:
            check_url_root(url_root)
        specs = run_layers(outdir, tiles=tiles, overview=overview, max_tiles=max_tiles)
        state = ng_state(outdir, specs, url_root) if neuroglancer_state is not None else None
    except ViewError as e:
        fail(str(e))
    for s in specs:
        lo = s.to_world([0] * len(s.shape))
        hi = s.to_world([k - 1 for k in s.shape])
        typer.echo(f"{s.name:<40} {s.kind:<8} x {lo[-1]:10.2f} .. {hi[-1]:10.2f} µm   "
                   f"y {lo[-2]:10.2f} .. {hi[-2]:10.2f} µm")
    if state is not None:
        try:
            write_neuroglancer_state(neuroglancer_state, state)
        except FileExists:
            fail(f"--neuroglancer-state {neuroglancer_state} appeared meanwhile; refusing to overwrite it")
        typer.echo(f"neuroglancer state: {neuroglancer_state} ({len(state['layers'])} layers, "
                   f"sources under {state['layers'][0]['source']['url'].split('zarr/')[0].removeprefix('zarr3://')})")
    if not no_window:
        from gui.view import run_viewer
        run_viewer(outdir, specs=specs)
