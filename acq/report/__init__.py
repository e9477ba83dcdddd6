"""The run report: OUTDIR/report/report.html, one self-contained page
(inline CSS and SVG charts; no scripts, nothing fetched) with autofocus,
QC, dose and mill, exposures per tile, incidents, throughput and ETA.

It is a derived view, rebuilt from the journal, the tile headers and the
manifest each time: ``write_report`` replaces the previous report.html
(temporary file and rename, so a reader never sees half a page) instead of
adding a new version beside it, unlike the run's data files, which are never
overwritten. Reading takes no lock and writes nothing else, so it works
while the run is going (acq/report/data.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from acq.report.data import MAX_HEADERS, NotARun, RunData, gather
from common.atomic import atomic_write

REPORT_DIR = "report"
REPORT_NAME = "report.html"

__all__ = ["NotARun", "RunData", "gather", "report_path", "write_report"]


def report_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / REPORT_DIR / REPORT_NAME


def write_report(out_dir: str | Path, *, max_headers: int = MAX_HEADERS, now: Optional[float] = None) -> Path:
    """Build the report of the run in ``out_dir`` and write it (replacing the
    previous one); its path. Raises NotARun without a journal."""
    from acq.report.html import render
    run = gather(out_dir, max_headers=max_headers, now=now)
    return atomic_write(report_path(out_dir), render(run).encode("utf-8"), overwrite=True)
