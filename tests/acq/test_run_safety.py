"""Runs that end badly end safely: signals blank the ion beam and leave a
resumable run, a second process cannot run in the same folder, a resume
refuses a different run, writers never cost dose, and the exposure budget
stops a tile from being scanned again and again."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from tests.support import ROOT
from tests.support.engine_runs import make_engine, planned_tiles, write_plan, write_setup


def journal(out: Path) -> list[dict]:
    from acq.journal import read_records
    return list(read_records(out))


def scans_per_tile(out: Path) -> Counter:
    """Exposures per tile key from the journal: tile_started and extra scans."""
    n: Counter = Counter()
    for r in journal(out):
        if r["rec"] == "tile_started":
            n[r["key"]] += 1
        elif r["rec"] == "exposure":
            n[r["key"]] += r.get("n", 1)
    return n


def run_closing(engine, setup):
    """Run to the end, then close the devices (as the command line does)."""
    try:
        return engine.run()
    finally:
        setup.close()


def cli(*args, timeout=120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, **kw)


def slow_mill_plan(tmp: Path, time_factor: float = 0.25) -> Path:
    """Tiny plan whose 60 s mill takes ~15 s of real time."""
    setup = write_setup(tmp, sections=1, time_factor=time_factor)
    return write_plan(tmp, setup, cycles=1, irradiation=None,
                      mill={"duration_s": 60, "delay_s": 1, "check_interval_s": 5})


def wait_for(out: Path, rec: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if (out / "journal.jsonl").exists() and any(r["rec"] == rec for r in journal(out)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {rec}: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError(f"no {rec} within {timeout} s")


# ------------------------------------------------------------------ signals
@pytest.mark.parametrize("how", ["SIGTERM", "SIGHUP", "double SIGINT"])
def test_signal_mid_mill_blanks_the_beam_stops_and_resumes_the_rest(tmp_path, how):
    plan, out = slow_mill_plan(tmp_path), tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "run", str(plan), "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(out, "mill_beam_on", proc)
    t0 = time.monotonic()
    if how == "double SIGINT":
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
    else:
        proc.send_signal(getattr(signal, how))
    stdout, stderr = proc.communicate(timeout=30)
    stopped_s = time.monotonic() - t0
    assert proc.returncode == 1, (stdout, stderr)
    assert stopped_s < 5, f"took {stopped_s:.1f} s to stop"
    recs = journal(out)
    kinds = [r["rec"] for r in recs]
    last_on = max(i for i, k in enumerate(kinds) if k == "mill_beam_on")
    assert "mill_beam_off" in kinds[last_on:], "the journal must show the beam blanked after the last unblank"
    assert kinds[-1] == "run_stop" and recs[-1]["status"] == "aborted"
    assert "mill_done" not in kinds
    causes = {r.get("cause") for r in recs if r["rec"] == "incident"}
    assert "mill_safing" not in causes                    # blanking, raster off and beam off all confirmed
    assert "--resume" in stdout
    res = cli("run", plan, "--resume", out)
    assert res.returncode == 0, res.stdout + res.stderr
    recs = journal(out)
    done = [r for r in recs if r["rec"] == "mill_done"]
    assert len(done) == 1 and abs(done[0]["seconds"] - 60) < 1e-6      # the rest was milled, nothing twice


# ------------------------------------------------------------------ one process
def test_second_process_in_a_live_folder_is_refused_with_the_holders_pid(tmp_path):
    plan, out = slow_mill_plan(tmp_path), tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "run", str(plan), "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(out, "mill_beam_on", proc)
        res = cli("run", plan, "--resume", out)
        assert res.returncode == 2
        assert f"pid {proc.pid}" in res.stdout + res.stderr and "in use" in res.stdout + res.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    # the holder died: its lock died with it, the resume goes through and nothing was done twice
    res = cli("run", plan, "--resume", out)
    assert res.returncode == 0, res.stdout + res.stderr
    assert all(n == 1 for n in scans_per_tile(out).values())
    assert sum(r["rec"] == "mill_done" for r in journal(out)) == 1


def test_lock_refuses_in_process_and_dies_with_the_holder(tmp_path):
    from acq.outdir_lock import OutdirBusy, OutdirLock
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time;"
                               "from acq.outdir_lock import OutdirLock; lock = OutdirLock(sys.argv[2]).acquire();"
                               "print('held', flush=True); time.sleep(60)", "-", str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(OutdirBusy, match=f"pid {holder.pid}"):
        OutdirLock(tmp_path).acquire()
    holder.kill()
    holder.wait()
    lock = OutdirLock(tmp_path).acquire()          # kill -9 left the file, not the lock
    assert lock.held
    lock.release()


# ------------------------------------------------------------------ resume checks
def test_resume_refuses_changed_setup_writers_and_missing_plan_copy(tmp_path):
    setup = write_setup(tmp_path, sections=1)
    plan = write_plan(tmp_path, setup, cycles=2, irradiation=None)
    out = tmp_path / "out"
    from acq.cli import run_plan
    import io

    def stop_after_first_tile(engine):
        engine.subscribe(lambda d: d.kind == "tile" and engine.abort())
    assert run_plan(plan, out, stream=io.StringIO(), on_engine=stop_after_first_tile) == 1

    # another wafer: the same tile ids at other stage positions
    moved = _setup_with_wafer_seed(tmp_path, 11)
    s = io.StringIO()
    assert run_plan(plan, None, out, config=moved, stream=s) == 2
    msg = s.getvalue()
    assert "tiles" in msg and "moved" in msg and "µm" in msg and "cannot be overridden" in msg

    # other writers: refused unless accepted on purpose, then journaled
    plan2 = write_plan(tmp_path, setup, name="plan2.yaml", cycles=2, irradiation=None,
                       output={"writers": ["ome_tiff", "mipmaps"]})
    s = io.StringIO()
    assert run_plan(plan2, None, out, stream=s) == 2
    assert "--accept-change writers" in s.getvalue()
    # a corrected step parameter (the AWG's raster frequency) is one of the safe changes
    plan3 = write_plan(tmp_path, setup, name="plan3.yaml", cycles=2, irradiation=None,
                       output={"writers": ["ome_tiff", "mipmaps"]}, mill={"raster_hz": [90.0, 1.0]})
    s = io.StringIO()
    assert run_plan(plan3, None, out, accept_change=("writers", "step"), stream=s) == 0, s.getvalue()
    starts = [r for r in journal(out) if r["rec"] == "run_start"]
    assert starts[-1]["accepted_changes"] == ["step", "writers"]
    assert all(n == 1 for n in scans_per_tile(out).values())

    # plan.json and fingerprint.json gone: nothing to check against, refused
    (out / "plan.json").unlink()
    (out / "fingerprint.json").unlink()
    s = io.StringIO()
    assert run_plan(plan3, None, out, stream=s) == 2
    assert "missing" in s.getvalue()


def _setup_with_wafer_seed(tmp: Path, seed: int) -> Path:
    import yaml
    d = yaml.safe_load((tmp / "setup.yaml").read_text())
    d["simulation"]["wafer"]["seed"] = seed
    p = tmp / f"setup_seed{seed}.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


# ------------------------------------------------------------------ writers and dose
class _BrokenDerived:
    """A derived writer (zarr, mipmaps, Render ...) that always fails."""
    primary = False

    def handle(self, doc):
        if doc.kind == "tile":
            raise RuntimeError("derived writer broken")
        return []

    def flush(self):
        pass


def test_a_permanently_failing_derived_writer_costs_no_dose(tmp_path):
    from acq.writers import make_writers, WriterOptions
    engine, setup, docs = make_engine(tmp_path, on_pause="stop")
    for w in make_writers(engine.out_dir, WriterOptions(mipmaps=False, render_tilespecs=False, trakem2=False,
                                                        ome_zarr=False)):
        engine.add_writer(w)
    engine.add_writer(_BrokenDerived())
    res = run_closing(engine, setup)
    assert res.status == "success", res.reason
    planned = planned_tiles(engine)
    assert set(scans_per_tile(engine.out_dir)) == {k for k in planned}
    assert all(n == 1 for n in scans_per_tile(engine.out_dir).values())       # nothing imaged again
    failed = [d for d in docs if d.kind == "incident" and d.cause == "writer_failed"]
    assert len(failed) == len(planned) and all("_BrokenDerived" in d.message for d in failed)
    assert all("never imaged again" in d.message for d in failed)


def test_a_primary_write_failure_is_written_again_from_memory(tmp_path):
    class FlakyPrimary:
        primary = True

        def __init__(self):
            self.failed, self.written = False, []

        def handle(self, doc):
            if doc.kind == "tile" and doc.tile_id == "c0000_s0001_g00_r000_c001" and not self.failed:
                self.failed = True
                raise RuntimeError("write error")
            if doc.kind == "tile":
                self.written.append((doc.tile_id, doc.version))
            return []

        def flush(self):
            pass
    w = FlakyPrimary()
    engine, setup, docs = make_engine(tmp_path, writers=[w], on_pause="stop")
    res = run_closing(engine, setup)
    assert res.status == "success", res.reason
    assert ("c0000_s0001_g00_r000_c001", 0) in w.written                   # same version: the same frame
    assert all(n == 1 for n in scans_per_tile(engine.out_dir).values())
    assert any(d.kind == "incident" and d.cause == "writer_failed" and "no new exposure" in d.message for d in docs)


def test_disk_full_mid_write_suspends_and_writes_the_frame_after(tmp_path):
    """ENOSPC from the OME-TIFF writer (min_free_gb: 0, so the free-space
    check alone would not have stopped it): the run suspends, then writes
    the frame it holds; nothing is imaged twice."""
    from acq.writers import make_writers, WriterOptions
    engine, setup, docs = make_engine(tmp_path, plan_over={"suspenders": {"min_free_gb": 0}}, on_pause="stop")
    writers = make_writers(engine.out_dir, WriterOptions(mipmaps=False, render_tilespecs=False, trakem2=False,
                                                         ome_zarr=False))
    tiff = writers[0]
    real = tiff.handle
    calls = Counter()

    def full_once(doc):
        if doc.kind == "tile":
            calls[doc.tile_id] += 1
            if doc.tile_id.endswith("r000_c001") and calls[doc.tile_id] == 1:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(doc)
    tiff.handle = full_once
    engine.add_writer(tiff)
    res = run_closing(engine, setup)
    assert res.status == "success", res.reason
    assert any(d.kind == "incident" and d.cause == "suspended_disk_space" for d in docs)
    assert all(n == 1 for n in scans_per_tile(engine.out_dir).values())
    from acq.writers import verify_manifest
    assert verify_manifest(engine.out_dir) == []


def test_exposure_budget_pauses_naming_the_tile_and_resume_may_raise_it(tmp_path):
    from acq.cli import run_plan
    import io
    rule = {"device": "sem", "operation": "acquire_frame", "kind": "incomplete_frame", "at_calls": [2, 3, 4, 5]}
    setup = write_setup(tmp_path, sections=1, faults=[rule])
    plan = write_plan(tmp_path, setup, cycles=1, irradiation=None, mill=None,
                      retries={"acquire": 10, "backoff_s": 0.0})
    out = tmp_path / "out"
    s = io.StringIO()
    assert run_plan(plan, out, stream=s) == 1
    text = s.getvalue()
    assert "exposure budget" in text and "c0000_s0000_g00_r000_c001" in text, text
    assert max(scans_per_tile(out).values()) == 3                         # the default budget, not one more
    inc = [r for r in journal(out) if r["rec"] == "incident" and r.get("cause") == "dose_budget"]
    assert len(inc) == 1
    s = io.StringIO()
    assert run_plan(plan, None, out, max_exposures=6, stream=s) == 0, s.getvalue()
    assert max(scans_per_tile(out).values()) <= 6
    assert [r["max_exposures"] for r in journal(out) if r["rec"] == "run_start"] == [3, 6]


def test_a_reconnect_that_faults_is_tried_again():
    """An AWG whose first reconnect attempt itself fails (the instrument is
    still rebooting) is reconnected on the next try, not given up on."""
    from types import SimpleNamespace

    from acq.device_ops import reconnect
    from devices.clock import SimClock
    from devices.errors import CommunicationError

    class Awg:
        def __init__(self, failures):
            self.failures, self.connects = failures, 0

        def close(self):
            pass

        def connect(self):
            self.connects += 1
            if self.connects <= self.failures:
                raise CommunicationError("VI_ERROR_TMO on *IDN?", device="waveform_generator", operation="connect")

    clock = SimClock()
    awg = Awg(failures=1)
    assert reconnect(SimpleNamespace(waveform_generator=awg, clock=clock), "waveform_generator")
    assert awg.connects == 2
    dead = Awg(failures=99)
    assert not reconnect(SimpleNamespace(waveform_generator=dead, clock=clock), "waveform_generator")
    assert dead.connects == 3                       # bounded: then the engine's failure policy takes over


# ------------------------------------------------------------------ bad disks, for real
@pytest.fixture
def tmpfs(tmp_path):
    """A 48 MB tmpfs (the real full / read-only behaviour of a file system);
    skipped where this process may not mount."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    mounted = [mnt]
    yield mnt, mounted
    for m in reversed(mounted):
        subprocess.run(["umount", "-l", str(m)], capture_output=True)


def _fill(folder: Path) -> Path:
    """Fill the file system holding ``folder`` to the last block."""
    filler = folder / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (1 << 20, 4096):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError as e:
                    assert e.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)
    return filler


def _run_on(tmp_path, out: Path, trigger, fix, plan_over=None, before_step=None):
    """Run the tiny plan into ``out`` (GUI mode: pauses wait); ``trigger(doc)``
    breaks the disk from a subscriber (or ``before_step(event)`` from the engine
    thread), ``fix()`` repairs it when the run pauses."""
    from acq.writers import WriterOptions, make_writers
    plan_over = {"suspenders": {"min_free_gb": 0, "max_suspend_s": 30}, **(plan_over or {})}
    engine, setup, docs = make_engine(tmp_path, plan_over=plan_over, out=str(out), on_pause="wait")
    if trigger is not None:
        engine.subscribe(trigger)
    if before_step is not None:
        engine.on_step(before_step)
    paused = []

    def on_state(state, reason):
        if state == "paused":
            paused.append(reason)
            fix()
            if not reason.startswith("suspended"):
                import threading
                threading.Thread(target=engine.resume, daemon=True).start()
    engine.on_state_change(on_state)
    for w in make_writers(out, WriterOptions(render_tilespecs=False, trakem2=False)):
        engine.add_writer(w)
    res = run_closing(engine, setup)
    assert res.status == "success", res.reason
    from acq.verify import verify_outdir
    assert verify_outdir(out).ok, verify_outdir(out).summary()
    assert set(scans_per_tile(out)) == planned_tiles(engine)
    assert all(n == 1 for n in scans_per_tile(out).values())            # nothing lost, nothing imaged twice
    return docs, paused


def test_full_disk_pauses_before_the_next_exposure_and_resumes(tmp_path, tmpfs):
    mnt, _ = tmpfs
    state = {}

    def before_step(ev):            # in the engine thread, just before the second tile's grab
        from acq.events import AcquireTile
        if isinstance(ev, AcquireTile) and ev.col == 1 and "filler" not in state:
            state["filler"] = _fill(mnt)

    def fix():
        if state.get("filler") and state["filler"].exists():
            state["filler"].unlink()
    docs, paused = _run_on(tmp_path, mnt / "out", None, fix, before_step=before_step)
    assert any("No space left" in r or "full" in r for r in paused), paused
    assert any(d.kind == "incident" and d.cause == "suspended_disk_space" for d in docs)


def test_read_only_output_pauses_and_resumes_when_writable(tmp_path, tmpfs):
    """A read-only file system under the next cycle's tile folder (the kernel's
    EROFS): writing fails, the run pauses naming it, the frame waits in memory."""
    mnt, mounted = tmpfs
    out = mnt / "out"
    ro = out / "tiles" / "0000" / "0001"
    state = {}

    def trigger(doc):
        if doc.kind == "cycle_done" and "ro" not in state:
            ro.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], check=True)
            mounted.append(ro)
            state["ro"] = True

    def fix():
        if state.get("ro") and not state.get("fixed"):
            subprocess.run(["umount", str(ro)], check=True)
            mounted.remove(ro)
            state["fixed"] = True
    docs, paused = _run_on(tmp_path, out, trigger, fix)
    assert state.get("fixed"), "the read-only folder never paused the run"
    assert any("not writable" in r or "Read-only" in r for r in paused), paused


def test_vanished_output_folder_pauses_and_resumes_when_back(tmp_path, tmpfs):
    """The output folder disappears (a dropped network mount): the run pauses
    before the next exposure and goes on once it is back."""
    mnt, _ = tmpfs
    out, away = mnt / "out", mnt / "away"
    state = {}

    def trigger(doc):
        if doc.kind == "tile" and "gone" not in state:
            state["gone"] = True
            out.rename(away)

    def fix():
        if away.exists():
            away.rename(out)
    docs, paused = _run_on(tmp_path, out, trigger, fix)
    assert any("vanished" in r for r in paused), paused


def test_bad_output_folders_are_messages_not_tracebacks(tmp_path):
    plan = write_plan(tmp_path, write_setup(tmp_path, sections=1), cycles=1, mill=None, irradiation=None)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    res = cli("run", plan, "--out", a_file)
    assert res.returncode == 2 and "is a file, not a folder" in res.stderr and "Traceback" not in res.stderr
    res = cli("run", plan, "--out", "/proc/gcib_out")               # a read-only file system (procfs)
    assert res.returncode == 2 and "Traceback" not in res.stderr + res.stdout
    assert "cannot use as output folder" in res.stderr or "not writable" in res.stderr, res.stderr
    res = cli("run", plan, "--resume", a_file)
    assert res.returncode == 2 and "Traceback" not in res.stderr


def test_the_gui_progress_shows_exposures_per_tile(tmp_path):
    from acq.runner import Pause, PauseReason
    from gui.run_progress import RunProgress, pause_advice
    rule = {"device": "sem", "operation": "acquire_frame", "kind": "incomplete_frame", "at_calls": [2]}
    engine, setup, docs = make_engine(tmp_path, plan_over={"cycles": 1, "mill": None, "irradiation": None},
                                      setup_kw={"sections": 1, "faults": [rule]}, on_pause="stop")
    assert run_closing(engine, setup).status == "success"
    progress = RunProgress.for_plan(engine.plan, engine.sections)
    for d in docs:
        if d.kind == "tile":
            progress.on_tile(d)
    text = progress.exposures_text()
    assert "max 2 (c0000_s0000_g00_r000_c001)" in text and "1 of 2 tiles" in text, text
    pause = Pause(PauseReason.DOSE_BUDGET, "exposure budget: tile x has been exposed 3 times")
    assert "Resume allows it one more scan" in pause_advice(pause)


def test_a_corrupt_journal_line_stops_resume_until_repaired(tmp_path):
    """One damaged line in the middle: resume refuses with the line number and
    the repair command (never replays silently); after the repair it goes on
    and nothing is milled or imaged twice."""
    import io

    from acq.cli import run_plan
    setup = write_setup(tmp_path, sections=1)
    plan = write_plan(tmp_path, setup, cycles=3, irradiation=None)

    def stop_in_cycle_2(engine):
        engine.subscribe(lambda d: d.kind == "tile" and d.cycle == 1 and engine.abort())
    out = tmp_path / "out"
    assert run_plan(plan, out, stream=io.StringIO(), on_engine=stop_in_cycle_2) == 1
    path = out / "journal.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    bad = next(i for i, ln in enumerate(lines) if b'"mill_done"' in ln) + 1      # 1-based
    lines[bad - 1] = lines[bad - 1].replace(b'"mill_done"', b'"mill_dune"')
    path.write_bytes(b"".join(lines))
    # the snapshot written at the stop covers the line: resume would take its state from there (correct),
    # but verify reads every line
    res = cli("verify", out)
    assert res.returncode == 1 and f"line {bad}" in res.stdout and "journal repair" in res.stdout, res.stdout
    (out / "journal.snapshot.json").unlink()            # now resume reads the damaged line itself
    s = io.StringIO()
    assert run_plan(plan, None, out, stream=s) == 2
    assert f"line {bad}" in s.getvalue() and "journal repair" in s.getvalue(), s.getvalue()
    res = cli("journal", "repair", out)
    assert res.returncode == 0 and f"line {bad}" in res.stdout and "mill" in res.stdout, res.stdout + res.stderr
    assert list(out.glob("journal.jsonl.corrupt-*"))                      # the damaged journal is kept
    # the dropped line was cycle 0's mill_done: the journal still shows it milled to the end (mill_beam_off)
    res = cli("run", plan, "--resume", out, "--accept-interrupted-mill")
    assert res.returncode == 0, res.stdout + res.stderr
    recs = journal(out)
    assert all(n == 1 for n in scans_per_tile(out).values())
    milled = Counter(r["cycle"] for r in recs if r["rec"] == "mill_started")
    assert milled == Counter({0: 1, 1: 1, 2: 1})                         # no mill started twice
    assert cli("verify", out).returncode == 0


def test_a_mill_record_the_full_disk_refused_never_mills_twice(tmp_path):
    """The disk fills just as the beam is blanked after a stretch of milling:
    the journal refuses mill_beam_off, the run suspends, and after the disk is
    back the mill goes on from the time this process knows - not again."""
    engine, setup, docs = make_engine(tmp_path, plan_over={"cycles": 1, "irradiation": None},
                                      setup_kw={"sections": 1}, on_pause="stop")
    real = engine.journal.append
    refused = []

    def append(rec, **fields):
        if rec == "mill_beam_off" and not refused:
            refused.append(fields)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(rec, **fields)
    engine.journal.append = append
    res = run_closing(engine, setup)
    assert res.status == "success", res.reason
    assert refused, "the fault was never injected"
    assert setup.world.mill_log.seconds == pytest.approx(60.0)         # the plan's 60 s, not 60 + 20
    assert any(d.kind == "incident" and d.cause == "suspended_disk_space" for d in docs)
    done = [r for r in journal(engine.out_dir) if r["rec"] == "mill_done"]
    assert len(done) == 1 and done[0]["seconds"] == pytest.approx(60.0)
