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

from acq.documents import DocumentRouter, Incident, SectionDone, Severity, TileEvent
from devices.errors import DeviceError
from devices.setup_config import ConfigError

app = typer.Typer(add_completion=False, help="Run an acquisition plan.")


class Progress(DocumentRouter):
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

    def on_tile(self, doc: TileEvent) -> None:
        self.done += 1
        self.cycle, self.section = doc.cycle, doc.section_id
        if self.tty:
            self.out.write(f"\rcycle {doc.cycle + 1}/{self.n_cycles}  section {doc.section_id}  "
                           f"tile {self.done}/{self.total}  ETA {self._eta()}   ")
            self.out.flush()

    def on_section_done(self, doc: SectionDone) -> None:
        if not self.tty:
            self.out.write(f"cycle {doc.cycle + 1}/{self.n_cycles}  section {doc.section_id} done  "
                           f"tiles {self.done}/{self.total}  ETA {self._eta()}\n")
            self.out.flush()

    def on_incident(self, doc: Incident) -> None:
        if doc.severity is not Severity.INFO:
            self.out.write(("\n" if self.tty else "") + f"[{doc.severity}] {doc.cause}: {doc.message}\n")
            self.out.flush()


def run_plan(plan_path: str | Path, out: Optional[str | Path] = None, resume: Optional[str | Path] = None,
             config: Optional[str | Path] = None, *, accept_interrupted_mill: bool = False,
             accept_change: tuple[str, ...] = (), max_exposures: Optional[int] = None,
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
    from acq.run_folder import holds_nothing, run_started
    if max_exposures is not None and not 1 <= max_exposures <= 100:
        return bad(f"--max-exposures {max_exposures}: allowed 1..100")
    try:
        flag = "--out" if out is not None else "--resume"
        if out_dir.exists() and not out_dir.is_dir():
            return bad(f"{flag} {out_dir}: is a file, not a folder")
        plan = load_plan(plan_path, config)
        if out is not None and not holds_nothing(out_dir):
            return bad(f"--out {out_dir}: exists and is not empty (continue a run with --resume {out_dir})")
        if resume is not None and not run_started(out_dir) and not (out_dir.is_dir() and holds_nothing(out_dir)):
            return bad(f"--resume {out_dir}: no journal.jsonl there, nothing to resume")
        options = writer_options(plan, str(plan_path))
        from acq.notify import make_notifier
        notifier = make_notifier(plan.setup_config)     # a missing password variable: refused before the run
    except ConfigError as e:
        return bad(str(e))
    except OSError as e:
        return bad(f"{out_dir}: {e.strerror or e}")
    from devices.factory import build_setup
    try:
        setup = build_setup(plan.setup_config)
    except ConfigError as e:
        return bad(str(e))
    except (DeviceError, OSError) as e:
        err.write(f"error: cannot connect the setup {plan.setup}: {e}\n")
        return 1
    try:
        try:
            # the journal is read (and its damage found) before the engine takes the folder
            try:
                done = Journal(out_dir).read().tiles_done_total if resume is not None else 0
            except OSError as e:
                return bad(f"--resume {out_dir}: cannot read its journal: {e.strerror or e}")
            engine = Engine(setup, plan, out_dir, resume=resume is not None, on_pause="stop",
                            accept_interrupted_mill=accept_interrupted_mill, accept_change=accept_change,
                            max_exposures=max_exposures)
        except ConfigError as e:
            return bad(str(e))
        total = count_tiles(plan, setup) - done
        progress = Progress(max(total, 0), plan.n_cycles(), msg_out)
        engine.subscribe(progress)
        from acq.writers import make_writers      # creates OUTDIR: only now that everything is valid
        try:
            for w in make_writers(out_dir, options):
                engine.add_writer(w)
        except OSError as e:
            engine.close_unstarted()
            return bad(f"{out_dir}: cannot write the output: {e.strerror or e}")
        if notifier is not None:
            notifier.attach(engine)
        if on_engine is not None:
            on_engine(engine)
        restore = _stop_on_signals(engine, err)
        try:
            res = engine.run()
        finally:
            while engine.alive:             # whatever ended the wait: never close the devices under a step
                engine.stop_now("the command line is ending")
                engine.wait(1.0)
            restore()
            if notifier is not None:
                notifier.close()            # the last messages, a bounded wait after the run
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


def stop_signal_names(sig=signal) -> list[str]:
    """The signals that stop a run, those ``sig`` (the signal module) has:
    SIGHUP (terminal closed) is POSIX only, SIGBREAK (Ctrl-Break) Windows only."""
    return ["SIGINT", "SIGTERM"] + [n for n in ("SIGHUP", "SIGBREAK") if hasattr(sig, n)]


def _stop_on_signals(engine, err: TextIO) -> Callable[[], None]:
    """Ctrl-C: stop at the next checkpoint (a mill under way completes).
    SIGTERM, SIGHUP, Ctrl-Break (Windows) or a second Ctrl-C: stop now - a
    mill or irradiation blanks its beam within a second - and end resumable.
    The devices are closed only after the engine thread has stopped, never
    under a step."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    sigs = [getattr(signal, n) for n in stop_signal_names(signal)]
    old = {s: signal.getsignal(s) for s in sigs}
    interrupts = [0]

    def say(text: str) -> None:
        try:                        # a dead terminal (SIGHUP) or a re-entrant write must not stop the stop
            err.write(text)
            err.flush()
        except (OSError, RuntimeError, ValueError):
            pass

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and interrupts[0] == 0:
            interrupts[0] += 1
            engine.abort()
            say("\ninterrupt: stopping at the next safe point (Ctrl-C again: stop now, beams blanked)\n")
            return
        engine.stop_now(name)
        say(f"\n{name}: stopping now at a safe point, beams blanked; the run stays resumable\n")
    for s in sigs:
        signal.signal(s, handler)

    def restore():
        for s, h in old.items():
            signal.signal(s, h)
    return restore


@app.callback()
def _main() -> None:
    """Acquisition runs."""


@app.command("run")
def run(plan: Path = typer.Argument(..., help="plan YAML"),
        out: Optional[Path] = typer.Option(None, "--out", help="new output folder"),
        resume: Optional[Path] = typer.Option(None, "--resume", help="output folder of a run to continue"),
        config: Optional[Path] = typer.Option(None, "--config", help="setup YAML (replaces the plan's setup)"),
        accept_interrupted_mill: bool = typer.Option(
            False, "--accept-interrupted-mill", help="count a mill cut short by a crash as done"),
        accept_change: Optional[str] = typer.Option(
            None, "--accept-change", help="with --resume: accept changed writers,autofocus,step,imaging "
            "(comma-separated; journaled)"),
        max_exposures: Optional[int] = typer.Option(
            None, "--max-exposures", help="exposure budget per tile and cycle for this run (journaled)")) -> None:
    """Run an acquisition plan (or continue one with --resume); exit 0 only if it completed."""
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    for name in ("acq.engine", "acq.runner"):       # incidents are printed by Progress
        logging.getLogger(name).setLevel(logging.CRITICAL)
    changes = tuple(c.strip() for c in (accept_change or "").split(",") if c.strip())
    raise typer.Exit(run_plan(plan, out, resume, config, accept_interrupted_mill=accept_interrupted_mill,
                              accept_change=changes, max_exposures=max_exposures))


def verify(out_dir: Path = typer.Argument(..., help="output folder of a run"),
           no_hash: bool = typer.Option(False, "--no-hash", help="sizes only (fast), no sha256")) -> None:
    """Check every file of OUTDIR against its latest manifest entry, and every
    journal line against its checksum; exit 0 only if all verify."""
    from acq.verify import verify_main
    rc = verify_main(out_dir, check_hash=not no_hash)
    raise typer.Exit(max(rc, _check_journal(out_dir, sys.stdout)))


def _check_journal(out_dir: Path, out: TextIO) -> int:
    """The whole journal read line by line (a resume reads only the tail after
    its snapshot, so damage before it shows here): 1 if a line is damaged."""
    from acq.journal import JOURNAL_NAME
    from acq.journal_repair import repair_journal
    if not (Path(out_dir) / JOURNAL_NAME).exists():
        return 0
    try:
        rep = repair_journal(out_dir, dry_run=True)
    except ConfigError as e:                   # a run holds the folder
        out.write(f"journal not checked: {e}\n")
        return 0
    except OSError as e:
        out.write(f"journal not readable: {e}\n")
        return 1
    if rep.dropped:
        out.write(rep.text() + "\n")
        return 1
    out.write(f"journal: {rep.kept} records, every checksum intact\n")
    return 0


journal_app = typer.Typer(add_completion=False, help="The run journal (OUTDIR/journal.jsonl).")


@journal_app.command("repair")
def journal_repair(out_dir: Path = typer.Argument(..., help="output folder of a run"),
                   dry_run: bool = typer.Option(False, "--dry-run", help="only say what would be dropped")) -> None:
    """Drop unreadable journal lines (after a backup) and say what they may have been."""
    from acq.journal_repair import repair_main
    raise typer.Exit(repair_main(out_dir, dry_run=dry_run))


if __name__ == "__main__":
    app()
