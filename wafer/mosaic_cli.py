"""`wafer mosaic`: assemble the overview tiles of an acquisition run into one
overview in stage coordinates (OME-TIFF with its stage transform).

    python main.py run configs/plans/overview_wafer.yaml --out out/overview
    python main.py wafer mosaic out/overview --pixel-size-um 4 --out out/overview.ome.tif
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer


def mosaic_cmd(
    run_dir: Path = typer.Argument(..., help="Output folder of a run whose plan has an overview.", exists=True,
                                   file_okay=False),
    out: Path = typer.Option(..., "--out", help="Overview OME-TIFF to write (never overwritten)."),
    pixel_size_um: float = typer.Option(4.0, "--pixel-size-um", help="Overview pixel size in µm (seed: 4 for "
                                        "section detection); at least the tiles' pixel size."),
    cycle: Optional[int] = typer.Option(None, "--cycle", help="Cycle whose overview to use (default: the first)."),
    refine: bool = typer.Option(True, "--refine/--no-refine",
                                help="Refine tile positions by cross-correlating the overlaps."),
) -> None:
    """Overview mosaic: tiles placed at their stage positions, refined, blended, saved with the stage transform."""
    from common.atomic import FileExists
    from wafer.mosaic import build_overview, save_overview, tiles_from_run

    if out.exists():
        typer.echo(f"error: {out} exists; refusing to overwrite it", err=True)
        raise typer.Exit(2)
    t0 = time.perf_counter()
    try:
        tiles = tiles_from_run(run_dir, cycle)
        ov = build_overview(tiles, pixel_size_um, refine=refine)
    except (ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    try:
        save_overview(out, ov)
    except FileExists:
        typer.echo(f"error: {out} appeared meanwhile; refusing to overwrite it", err=True)
        raise typer.Exit(2)
    h, w = ov.image.shape
    t = tiles[0]
    ref = ov.info.get("refinement")
    rows = [("tiles", f"{len(tiles)} of {t.image.shape[1]} x {t.image.shape[0]} px @ {t.pixel_um:g} µm"),
            ("overview", f"{w} x {h} px @ {pixel_size_um:g} µm"),
            ("origin", f"({ov.origin_um[0]:.1f}, {ov.origin_um[1]:.1f}) µm stage = pixel (0, 0)"),
            ("refinement", "off" if ref is None else
             f"{ref['links_used']}/{ref['links']} overlaps used, rms residual {ref['rms_residual_px']:.2f} px, "
             f"largest correction {ref['max_correction_px']:.2f} px"),
            ("time", f"{time.perf_counter() - t0:.2f} s"), ("written", str(out))]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        typer.echo(f"{k.ljust(width)}  {v}")
