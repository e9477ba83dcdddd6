"""`wafer detect`: find the sections on an overview mosaic and write the section JSON.

    python main.py wafer detect overview.tif --pixel-size-um 4 --origin-um -7000 -7000 --json sections.json
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import typer

from wafer.overview_image import read_overview

app = typer.Typer(help="Section detection on wafer overviews.", no_args_is_help=True)


def _overview_and_transform(path: Path, pixel_size_um, origin_um):
    """The image plus pixel size and origin: given ones win; else those an
    overview mosaic (wafer/mosaic.py) carries; a plain image needs the pixel size."""
    carried = None
    if path.suffix.lower() in (".tif", ".tiff"):
        from wafer.mosaic import load_overview
        try:
            carried = load_overview(path)
        except ValueError:                      # a plain TIFF: no stage transform in it
            carried = None
    img = carried.image if carried is not None else read_overview(path)
    if pixel_size_um is None:
        if carried is None:
            raise ValueError(f"--pixel-size-um is needed: {path} carries no stage transform "
                             "(only `wafer mosaic` overviews do)")
        pixel_size_um = carried.pixel_um
    if not pixel_size_um > 0:
        raise ValueError(f"--pixel-size-um = {pixel_size_um}: must be > 0")
    if origin_um is None:
        origin_um = carried.origin_um if carried is not None else (0.0, 0.0)
    return img, float(pixel_size_um), (float(origin_um[0]), float(origin_um[1]))


@app.callback()
def _main() -> None:
    """Section detection tools."""


@app.command("detect")
def detect_cmd(
    overview: Path = typer.Argument(..., help="Overview mosaic (PNG or TIFF).", exists=True, dir_okay=False,
                                    readable=True),
    pixel_size_um: Optional[float] = typer.Option(
        None, "--pixel-size-um", help="Overview pixel size in µm (seed: 4) (default: from a `wafer mosaic` file)."),
    origin_um: Optional[Tuple[float, float]] = typer.Option(
        None, "--origin-um", help="Stage X Y (µm) of the top-left pixel's centre (default: from a `wafer mosaic` "
        "file, else 0 0)."),
    json_out: Path = typer.Option(..., "--json", help="Section JSON to write (never overwritten)."),
    model_path: Optional[Path] = typer.Option(None, "--model", help="Weights (default: models/sections_unet.pt)."),
    threshold: float = typer.Option(0.5, "--threshold", help="Tissue probability threshold."),
    similar: bool = typer.Option(True, "--similar/--no-similar", help="Also take resin frames off the network's "
                                 "sections, cut ribbons it drew as one strip at their gaps (where it is sure of "
                                 "no section) and find sections by their likeness to the confident ones on "
                                 "this overview."),
    threads: int = typer.Option(0, "--threads", help="Torch CPU threads (0: torch's default). On a busy "
                                "shared CPU 1 is often fastest: idle OpenMP threads spin."),
) -> None:
    """Detect tissue sections (U-Net + minimum-area rectangles, then more sections like the confident ones)
    and write their rectangles in stage µm."""
    from wafer.detect import detect_sections, load_model
    from wafer.sections import Section, save_sections

    if json_out.exists():
        typer.echo(f"error: {json_out} exists; refusing to overwrite it", err=True)
        raise typer.Exit(2)
    try:
        img, pixel_size_um, origin_um = _overview_and_transform(overview, pixel_size_um, origin_um)
        model = load_model(model_path)
    except (ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    if threads > 0:
        import torch
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    found = detect_sections(img, pixel_size_um, tuple(origin_um), model=model, threshold=threshold,
                            similar=similar)
    dt = time.perf_counter() - t0
    try:
        save_sections([Section(**d) for d in found], json_out, overwrite=False)
    except FileExistsError:
        typer.echo(f"error: {json_out} appeared meanwhile; refusing to overwrite it", err=True)
        raise typer.Exit(2)
    conf = float(np.mean([d["confidence"] for d in found])) if found else float("nan")
    h, w = img.shape[:2]
    rows = [("overview", f"{w} x {h} px @ {pixel_size_um:g} µm"), ("sections", str(len(found))),
            ("mean confidence", f"{conf:.3f}"), ("time", f"{dt:.2f} s"), ("written", str(json_out))]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        typer.echo(f"{k.ljust(width)}  {v}")
