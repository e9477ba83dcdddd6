"""`report OUTDIR`: write OUTDIR/report/report.html, the run's report page.

    python main.py report out/run_20260101_120000

Works on a finished run and on one still going (or cut off): the page is a
snapshot of what the journal, the tile headers and the manifest say now; run
it again for a newer one (it replaces the previous report.html). Exit 0 with
the page's path; 2 when OUTDIR is not a run folder or an option is out of
range; 1 when the page cannot be written.

Mount in main.py with ``app.command("report")(acq.report_cli.report_cmd)``.
"""
from __future__ import annotations

from pathlib import Path

import typer


def report_cmd(out_dir: Path = typer.Argument(..., help="output folder of a run (finished or still going)"),
               max_headers: int = typer.Option(
                   5000, "--max-headers", help="tile headers read for the electron dose (the latest tiles); "
                   "0..1000000, 0 = none")) -> None:
    """Write OUTDIR/report/report.html: autofocus, QC, dose and mill, exposures per tile, incidents,
    throughput and ETA, as one self-contained page (replaces the previous report)."""
    from acq.report import NotARun, write_report
    if not 0 <= max_headers <= 1_000_000:
        typer.echo(f"error: --max-headers {max_headers}: allowed 0..1000000", err=True)
        raise typer.Exit(2)
    if out_dir.exists() and not out_dir.is_dir():
        typer.echo(f"error: OUTDIR {out_dir}: is a file, not a run's output folder", err=True)
        raise typer.Exit(2)
    try:
        page = write_report(out_dir, max_headers=max_headers)
    except NotARun as e:
        typer.echo(f"error: OUTDIR {e}", err=True)
        raise typer.Exit(2)
    except OSError as e:
        typer.echo(f"error: cannot write the report of {out_dir}: {e}", err=True)
        raise typer.Exit(1)
    typer.echo(str(page))
