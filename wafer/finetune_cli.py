"""`wafer train`: fine-tune the section U-Net on the lab's own `wafer annotate` labels.

    python main.py wafer train --overview ov.png --labels ov.labels.png --pixel-um 4 \
        --out models/sections_unet_lab.pt --steps 1000

Then detect with it: ``python main.py wafer detect ... --model models/sections_unet_lab.pt``.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from wafer.finetune import DEFAULT_LR, DEFAULT_OUT

app = typer.Typer(help="Fine-tune the section detector on annotated overviews.", no_args_is_help=True)


@app.callback()
def _main() -> None:
    """Section detector fine-tuning."""


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3f}"


@app.command("train")
def train_cmd(
    overview: List[Path] = typer.Option(..., "--overview", help="Overview image (PNG or TIFF); repeat for "
                                        "several, each followed in order by its --labels."),
    labels: List[Path] = typer.Option(..., "--labels", help="Label image from `wafer annotate` (0 background, "
                                      "1 tissue, 2 ignore), one per --overview, same order. Its "
                                      "<stem>.polygons.json beside it, if there, gives section scores."),
    pixel_um: List[float] = typer.Option(..., "--pixel-um", help="Overview pixel size in µm: once for all "
                                         "overviews, or once per --overview."),
    model: Optional[Path] = typer.Option(None, "--model", help="Weights to start from "
                                         "(default: the shipped models/sections_unet.pt)."),
    out: Path = typer.Option(DEFAULT_OUT, "--out", help="New weights (.pt, with a .json card beside it); "
                             "never overwritten."),
    steps: int = typer.Option(1000, "--steps", min=1, help="Training iterations."),
    holdout: float = typer.Option(0.25, "--holdout", help="Fraction of each overview's columns, on the right, "
                                  "held back for validation (never trained on)."),
    seed: int = typer.Option(0, "--seed"),
    lr: float = typer.Option(DEFAULT_LR, "--lr", help="AdamW learning rate (constant)."),
    batch: int = typer.Option(8, "--batch", min=1),
    patch: int = typer.Option(96, "--patch", help="Training patch side at the network's pixel size."),
    threads: int = typer.Option(0, "--threads", help="Torch CPU threads (0: torch's default)."),
) -> None:
    """Fine-tune the section U-Net on annotated overviews; validates on a held-back block of
    each before and after, writes the new weights and a JSON card."""
    def fail(msg: str):
        typer.echo(f"error: {msg}", err=True)
        raise typer.Exit(2)

    if len(overview) != len(labels):
        fail(f"{len(overview)} --overview but {len(labels)} --labels: give one --labels per --overview, "
             "in the same order")
    if len(pixel_um) not in (1, len(overview)):
        fail(f"{len(pixel_um)} --pixel-um for {len(overview)} --overview: give one, or one per --overview")
    if not 0 < holdout < 1:
        fail(f"--holdout {holdout}: must be between 0 and 1 (the held-back fraction of columns)")
    for opt, paths in (("--overview", overview), ("--labels", labels)):
        for p in paths:
            if not p.is_file():
                fail(f"{opt} {p}: no such file")
    if model is not None and not model.is_file():
        fail(f"--model {model}: no such file")
    for p in (out, out.with_suffix(".json")):
        if p.exists():
            fail(f"{p} exists; refusing to overwrite it (choose another --out)")
    from wafer.finetune import finetune
    try:
        card = finetune(overview, labels, pixel_um if len(pixel_um) > 1 else pixel_um[0], model=model, out=out,
                        steps=steps, holdout=holdout, seed=seed, lr=lr, batch=batch, patch=patch,
                        threads=threads or None, log=lambda s: typer.echo(s))
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    b, a = card["validation_before"], card["validation"]
    typer.echo("held-back validation   before   after")
    for key, name in (("pixel_iou", "pixel IoU (tissue)"), ("f1", "section F1"), ("mean_iou", "section mean IoU")):
        typer.echo(f"  {name.ljust(20)} {_fmt(b[key]).rjust(6)}  {_fmt(a[key]).rjust(6)}")
    if a.get("sections") is None:
        typer.echo("  (no tissue outlines in the held-back part: no section scores)")
    typer.echo(f"detect with it: main.py wafer detect OVERVIEW ... --model {out}")
