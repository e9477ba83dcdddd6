"""`run PLAN.yaml --out OUTDIR` / `run PLAN.yaml --resume OUTDIR`.

Everything is validated (plan, setup, safety windows, writer options, the
wafer's sections) before OUTDIR is created: bad input exits 2 with a
message naming the field and leaves nothing behind. Exit 0 only when the
plan completed; 1 when the run stopped (paused for the operator, failed,
aborted with Ctrl-C) — it can be continued with --resume.

Mount in main.py with ``app.command("run")(acq.cli.run)``; tests call
``run_plan``.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional, TextIO

import typer

from devices.errors import DeviceError
from devices.setup_config import ConfigError

app = typer.Typer(add_completion=False, help="Run an acquisition plan.")


class Progress:
    """Document subscriber printing progress: a \\r-updated line on a
    terminal, one line per finished section otherwise."""

    def __init__(self, total_tiles: int, n_cycles: int, stream: TextIO, tty: Optional[bool] = None):
        self.total, self.n_cycles, self.out = total_tiles, n_cycles, stream
        self.tty = stream.isatty() if tty is None else tty
        self.done = 0
        self.t0 = time.monotonic()
        self.cycle = self.section = 0

    def _eta(self) -> str:
        if not self.done:
            return "--:--"
        left = (time.monotonic() - self.t0) / self.done * max(self.total - self.done, 0)
        return f"{int(left // 60):02d}:{int(left % 60):02d}"

    def __call__(self, doc) -> None:
        kind = doc.kind
        if kind == "tile":
            self.done += 1
            self.cycle, self.section = doc.cycle, doc.section_id
            if self.tty:
                self.out.write(f"\rcycle {doc.cycle + 1}/{self.n_cycles}  section {doc.section_id}  "
                               f"tile {self.done}/{self.total}  ETA {self._eta()}   ")
                self.out.flush()
        elif kind == "section_done" and not self.tty:
            self.out.write(f"cycle {doc.cycle + 1}/{self.n_cycles}  section {doc.section_id} done  "
                           f"tiles {self.done}/{self.total}  ETA {self._eta()}\n")
            self.out.flush()
        elif kind == "incident" and doc.severity != "info":
            self.out.write(("\n" if self.tty else "") + f"[{doc.severity}] {doc.cause}: {doc.message}\n")
            self.out.flush()


def run_plan(plan_path: str | Path, out: Optional[str | Path] = None, resume: Optional[str | Path] = None,
             config: Optional[str | Path] = None, *, accept_interrupted_mill: bool = False,
             stream: Optional[TextIO] = None, on_engine: Optional[Callable] = None) -> int:
    """Run (or resume) a plan; returns the exit code. ``on_engine(engine)`` is
    called before the start (tests attach subscribers there)."""
    err = stream or sys.stderr
    msg_out = stream or sys.stdout

    def bad(message: str) -> int:
        err.write(f"error: {message}\n")
        return 2

    if (out is None) == (resume is None):
        return bad("give exactly one of --out OUTDIR (new run) or --resume OUTDIR (continue a run)")
    out_dir = Path(out if out is not None else resume)
    from acq.engine import Engine
    from acq.expand import count_tiles
    from acq.journal import Journal
    from acq.plan import load_plan, writer_options
    try:
        plan = load_plan(plan_path, config)
        if out is not None and out_dir.exists() and any(out_dir.iterdir()):
            return bad(f"--out {out_dir}: exists and is not empty (continue a run with --resume {out_dir})")
        if resume is not None and not Journal(out_dir).path.exists():
            return bad(f"--resume {out_dir}: no journal.jsonl there, nothing to resume")
        options = writer_options(plan, str(plan_path))
    except ConfigError as e:
        return bad(str(e))
    from devices.factory import build_setup
    try:
        setup = build_setup(plan.setup_config)
    except (DeviceError, OSError) as e:
        err.write(f"error: cannot connect the setup {plan.setup}: {e}\n")
        return 1
    try:
        try:
            engine = Engine(setup, plan, out_dir, resume=resume is not None, on_pause="stop",
                            accept_interrupted_mill=accept_interrupted_mill)
            total = count_tiles(plan, setup)
        except ConfigError as e:
            return bad(str(e))
        if resume is not None:
            total -= len(Journal(out_dir).read().tiles_done)
        progress = Progress(max(total, 0), plan.n_cycles(), msg_out)
        engine.subscribe(progress)
        from acq.writers import make_writers      # creates OUTDIR: only now that everything is valid
        for w in make_writers(out_dir, options):
            engine.add_writer(w)
        if on_engine is not None:
            on_engine(engine)
        restore = _abort_on_sigint(engine)
        try:
            res = engine.run()
        finally:
            restore()
    finally:
        setup.close()
    if progress.tty:
        msg_out.write("\n")
    bysev: dict[str, int] = {}
    for inc in engine.incidents:
        bysev[inc.severity] = bysev.get(inc.severity, 0) + 1
    sev = ", ".join(f"{n} {s}" for s, n in sorted(bysev.items())) or "none"
    msg_out.write(f"{res.status}: {res.tiles} tiles acquired this run, {res.tiles_done} done in {out_dir}; "
                  f"incidents: {sev}; {res.files} files, {res.bytes / 1e6:.1f} MB\n")
    if res.reason:
        msg_out.write(f"{res.reason}\n")
    return 0 if res.status == "success" else 1


def _abort_on_sigint(engine) -> Callable[[], None]:
    """Ctrl-C: stop at the next checkpoint (the mill in progress completes)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        sys.stderr.write("\ninterrupt: stopping at the next safe point (Ctrl-C again to force)\n")
        engine.abort()
        signal.signal(signal.SIGINT, old)
    signal.signal(signal.SIGINT, handler)
    return lambda: signal.signal(signal.SIGINT, old)


@app.callback()
def _main() -> None:
    """Acquisition runs."""


@app.command("run")
def run(plan: Path = typer.Argument(..., help="plan YAML"),
        out: Optional[Path] = typer.Option(None, "--out", help="new output folder"),
        resume: Optional[Path] = typer.Option(None, "--resume", help="output folder of a run to continue"),
        config: Optional[Path] = typer.Option(None, "--config", help="setup YAML (replaces the plan's setup)"),
        accept_interrupted_mill: bool = typer.Option(
            False, "--accept-interrupted-mill", help="count a mill cut short by a crash as done")) -> None:
    """Run an acquisition plan (or continue one with --resume); exit 0 only if it completed."""
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    for name in ("acq.engine", "acq.lifecycle"):       # incidents are printed by Progress
        logging.getLogger(name).setLevel(logging.CRITICAL)
    raise typer.Exit(run_plan(plan, out, resume, config, accept_interrupted_mill=accept_interrupted_mill))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    app()
