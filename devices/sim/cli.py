"""`python main.py sim frame`: one simulated frame at a chosen aberration."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import typer

from common.paths import default_config
from devices.cli import finite
from devices.setup_config import ConfigError, load_setup

app = typer.Typer(add_completion=False, help="The simulated microscope.")
DEFAULT_CONFIG = default_config()


@app.command()
def frame(
    out: Path = typer.Option(..., "--out", help="output TIFF (must not exist)"),
    specimen: Optional[List[Path]] = typer.Option(None, "--specimen", help="grayscale texture(s); repeat for slices"),
    defocus_um: float = typer.Option(0.0, "--defocus-um", help="wd − wd_focus, -1000..1000 µm",
                                     callback=finite(-1000, 1000)),
    stig: Tuple[float, float] = typer.Option((0.0, 0.0), "--stig", help="SX SY relative to the stig baseline, "
                                             "each -100..100", callback=finite(-100, 100)),
    dwell_ns: float = typer.Option(100.0, "--dwell-ns", min=10, max=100000, callback=finite(10, 100000)),
    pixel_nm: float = typer.Option(4.0, "--pixel-nm", min=0.1, max=100000, callback=finite(0.1, 100000)),
    size: Tuple[int, int] = typer.Option((1024, 768), "--size", help="W H"),
    seed: int = typer.Option(0, "--seed", min=0, max=2 ** 32 - 1, help="same seed = same field of view and noise"),
    texture_pixel_nm: Optional[float] = typer.Option(None, "--texture-pixel-nm", callback=finite(0.01, 100000),
                                                     help="texture pixel size, 0.01..100000 nm; default 1:1"),
    config: Path = typer.Option(DEFAULT_CONFIG, "--config"),
) -> None:
    """Render one frame of the specimen plane and write it as a TIFF with its
    parameters in the metadata (ImageDescription, JSON)."""
    from devices.sim.frames import render_frame_to_tiff   # torch-free, but heavy: import late

    if not all(16 <= v <= 8192 for v in size):
        raise typer.BadParameter("give two values in 16..8192: --size W H", param_hint="--size")
    if out.exists():
        typer.echo(f"error: {out} exists; refusing to overwrite", err=True)
        raise typer.Exit(2)
    try:
        cfg = load_setup(config)
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2)
    for p in specimen or []:
        if not p.is_file():
            typer.echo(f"error: --specimen {p}: file does not exist", err=True)
            raise typer.Exit(2)
    try:
        md = render_frame_to_tiff(cfg, out, specimen=list(specimen or []), defocus_m=defocus_um * 1e-6,
                                  stig=(stig[0], stig[1]), dwell_s=dwell_ns * 1e-9, pixel_m=pixel_nm * 1e-9,
                                  size=(size[0], size[1]), seed=seed,
                                  texture_pixel_m=None if texture_pixel_nm is None else texture_pixel_nm * 1e-9)
    except ValueError as e:     # an unreadable --specimen file (image decoders raise ValueError subclasses)
        typer.echo(f"error: --specimen: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(f"wrote {out}  ({size[0]}x{size[1]}, defocus {defocus_um:+.2f} µm, stig {stig[0]:+.2f} "
               f"{stig[1]:+.2f}, {md['electrons_per_nm2']:.2f} e/nm², render {md['render_s']*1e3:.0f} ms)")
