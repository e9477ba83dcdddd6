"""Resume from the journal: nothing finished is repeated, nothing planned
is skipped, a tile cut short is re-acquired as the next version, and a mill
is never repeated or skipped — also when the process is killed with -9."""
from __future__ import annotations

import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from tests.support import ROOT
from tests.support.engine_runs import done_counts, make_engine, planned_tiles, records, write_plan, write_setup
from tests.support.fork_server import SERVER


def resume_engine(tmp_path, out="out", **kw):
    from acq.engine import Engine
    from acq.plan import load_plan
    from devices.factory import build_setup
    plan = load_plan(tmp_path / "plan.yaml")
    setup = build_setup(plan.setup_config)            # a fresh process: new devices, new simulated world
    docs: list = []
    kw.setdefault("on_pause", "stop")
    return Engine(setup, plan, tmp_path / out, subscribers=[docs.append], resume=True, **kw), setup, docs


def truncated_copy(src: Path, dst: Path, stop) -> None:
    """OUTDIR as a kill -9 would leave it right after the first record matching ``stop``."""
    dst.mkdir()
    shutil.copy(src / "plan.json", dst / "plan.json")
    lines = (src / "journal.jsonl").read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
        keep.append(line)
        if stop(json.loads(line)):
            break
    (dst / "journal.jsonl").write_text("".join(keep))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One complete tiny run; tests cut its journal where a crash would have."""
    tmp = tmp_path_factory.mktemp("full")
    engine, setup, _ = make_engine(tmp, out="full")
    try:
        assert engine.run().status == "success"
    finally:
        setup.close()
    return tmp


@pytest.fixture
def crashed(tmp_path, full_run):
    """(tmp_path, cut) -> OUTDIR in tmp_path as a kill -9 would leave it after the first record matching cut."""
    def make(stop):
        shutil.copy(full_run / "plan.yaml", tmp_path / "plan.yaml")
        truncated_copy(full_run / "full", tmp_path / "out", stop)
    return make


def test_journal_tolerates_a_torn_last_line(tmp_path):
    from acq.journal import Journal, read_records
    j = Journal(tmp_path)
    j.open()
    j.append("tile_started", key="a", version=0, cycle=0)
    j.append("tile_done", key="a", version=0, cycle=0, files=[])
    j.close()
    with open(j.path, "ab") as f:
        f.write(b'{"rec": "tile_done", "key": "b", "ver')          # killed mid-write
    j2 = Journal(tmp_path)
    st = j2.open()
    assert st.tiles_done == {"a": 0} and "b" not in st.tiles_started
    j2.append("cycle_done", key="cycle:c0000", cycle=0)
    j2.close()
    assert [r["rec"] for r in read_records(tmp_path)] == ["tile_started", "tile_done", "cycle_done"]


def test_resume_after_abort_completes_every_tile_once(tmp_path):
    engine, setup, docs = make_engine(tmp_path)
    engine.subscribe(lambda d: d.kind == "tile" and len(done_counts(engine.out_dir)) >= 3 and engine.abort())
    try:
        assert engine.run().status == "aborted"
    finally:
        setup.close()
    before = done_counts(engine.out_dir)
    assert 3 <= len(before) < 8
    engine2, setup2, docs2 = resume_engine(tmp_path)
    try:
        res = engine2.run()
        planned = planned_tiles(engine2)
    finally:
        setup2.close()
    assert res.status == "success", res.reason
    counts = done_counts(engine.out_dir)
    assert set(counts) == planned and set(counts.values()) == {1}
    assert {d.tile_id for d in docs2 if d.kind == "tile"} == planned - set(before)   # only what was missing
    assert len(records(engine.out_dir, "mill_started")) == 2 and len(records(engine.out_dir, "mill_done")) == 2
    assert len(records(engine.out_dir, "irr_done")) == 2
    assert [r["resumed"] for r in records(engine.out_dir, "run_start")] == [False, True]
    assert docs2[0].kind == "start" and docs2[0].resumed


def test_tile_started_but_not_finished_is_reacquired_as_next_version(tmp_path, crashed):
    victim = "c0001_s0001_g00_r000_c000"
    # killed during the grab of the victim: its tile_started is the last record
    crashed(lambda r: r["rec"] == "tile_started" and r["key"] == victim)
    engine2, setup2, docs2 = resume_engine(tmp_path)
    try:
        assert engine2.run().status == "success"
    finally:
        setup2.close()
    done = {r["key"]: r["version"] for r in records(tmp_path / "out", "tile_done")}
    assert done[victim] == 1
    assert [v for k, v in done.items() if k != victim] == [0] * 7
    assert set(done_counts(tmp_path / "out").values()) == {1}
    victim_docs = [d for d in docs2 if d.kind == "tile" and d.tile_id == victim]
    assert len(victim_docs) == 1 and victim_docs[0].version == 1


def test_mill_interrupted_after_unknown_time_stops_until_accepted(tmp_path, crashed):
    # killed while the ion beam was on during the first azimuth of the first mill
    crashed(lambda r: r["rec"] == "mill_beam_on" and r["key"] == "mill:c0000")
    engine2, setup2, docs2 = resume_engine(tmp_path)
    try:
        res = engine2.run()
    finally:
        setup2.close()
    assert res.status == "failed"
    assert "interrupted after unknown time" in res.reason and "--accept-interrupted-mill" in res.reason
    assert "--resume" in res.reason
    assert any(d.kind == "incident" and d.cause == "mill_interrupted" for d in docs2)
    assert not [d for d in docs2 if d.kind == "tile"]                 # stopped before doing anything
    engine3, setup3, docs3 = resume_engine(tmp_path, accept_interrupted_mill=True)
    try:
        res = engine3.run()
        milled = setup3.world.mill_log.seconds
    finally:
        setup3.close()
    assert res.status == "success", res.reason
    mills = {r["key"]: r for r in records(tmp_path / "out", "mill_done")}
    assert mills["mill:c0000"]["interrupted"] and mills["mill:c0000"]["accepted"]
    assert Counter(r["key"] for r in records(tmp_path / "out", "mill_started")) == {"mill:c0000": 1,
                                                                                   "mill:c0001": 1}
    assert milled == pytest.approx(60.0)                              # only cycle 1's mill ran
    assert set(done_counts(tmp_path / "out").values()) == {1} and len(done_counts(tmp_path / "out")) == 8


def test_mill_stopped_with_the_beam_blanked_continues_for_the_remaining_time(tmp_path, crashed):
    crashed(lambda r: r["rec"] == "mill_beam_off" and r["key"] == "mill:c0000")     # after azimuth 1 of 3
    engine2, setup2, docs2 = resume_engine(tmp_path)
    try:
        assert engine2.run().status == "success"
        milled = setup2.world.mill_log.seconds
    finally:
        setup2.close()
    assert milled == pytest.approx(40.0 + 60.0)            # the remaining 2/3 of mill 0, all of mill 1
    assert any(d.kind == "incident" and d.cause == "mill_continued" for d in docs2)
    assert len(records(tmp_path / "out", "mill_started")) == 2
    assert [r["seconds"] for r in records(tmp_path / "out", "mill_done")] == [pytest.approx(60.0)] * 2


def test_resume_refuses_a_changed_plan_and_a_finished_run_stays_finished(tmp_path, capsys):
    from acq.cli import run_plan
    setup = write_setup(tmp_path)
    plan = write_plan(tmp_path, setup, cycles=1, mill=None, irradiation=None)
    out = tmp_path / "run"
    assert run_plan(plan, out=out) == 0
    n = len(records(out, "tile_done"))
    changed = write_plan(tmp_path, setup, name="changed.yaml", cycles=2, mill=None, irradiation=None)
    assert run_plan(changed, resume=out) == 2
    err = capsys.readouterr().err
    assert "cycles (cycles and section order) changed" in err and "cannot be overridden" in err
    assert run_plan(plan, resume=out) == 0
    assert len(records(out, "tile_done")) == n and "0 tiles acquired this run" in capsys.readouterr().out


def _journal_lines(out: Path) -> int:
    try:
        return (out / "journal.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


class _Child:
    """A run in a forked child of the zygote (which reports its exit code):
    enough of Popen for the test."""

    def __init__(self, zygote_lines: queue.Queue, log: Path):
        self.lines, self.log, self.returncode = zygote_lines, log, None
        self.pid = int(self.lines.get(timeout=30))

    def poll(self):
        if self.returncode is None:
            try:
                self.returncode = int(self.lines.get_nowait())
            except queue.Empty:
                pass
        return self.returncode

    def send_signal(self, sig):
        os.kill(self.pid, sig)

    def wait(self, timeout):
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            assert time.monotonic() < deadline, "run did not finish"
            time.sleep(0.02)
        return self.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL")
def test_sigkill_at_random_points_then_resume(tmp_path):
    """kill -9 the command line at >= 5 random moments (fixed seed), resume
    each time: every planned tile is done exactly once, every mill once."""
    setup = write_setup(tmp_path)
    plan = write_plan(tmp_path, setup, cycles=3, grid_template={"rows": 2, "cols": 2},
                      mill={"duration_s": 300, "check_interval_s": 2})
    out = tmp_path / "run"
    rng = random.Random(20240601)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    zygote = subprocess.Popen([sys.executable, "-c", SERVER], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x.strip()) for x in zygote.stdout], daemon=True).start()
    kills = runs = 0
    try:
        while True:
            runs += 1
            assert runs <= 20, "the run never completed"
            mode = ["--resume", str(out)] if (out / "journal.jsonl").exists() else ["--out", str(out)]
            if mode[0] == "--out" and out.exists():
                shutil.rmtree(out)                  # killed before the journal existed: start over
            args = ["run", str(plan), *mode, "--accept-interrupted-mill"]
            log = tmp_path / f"run{runs}.log"
            if runs == 1:                            # the real entry point, once
                proc = subprocess.Popen([sys.executable, "-m", "acq.cli", *args], cwd=ROOT, env=env,
                                        stdout=open(log, "wb"), stderr=subprocess.STDOUT)
                proc.output = log.read_text
            else:
                if runs == 2:
                    assert lines.get(timeout=60) == "ready"
                zygote.stdin.write(json.dumps({"log": str(log), "argv": args}) + "\n")
                zygote.stdin.flush()
                proc = _Child(lines, log)
            if kills < 5:
                # the moment: after a random number of new journal records (so each run is cut short
                # whatever the machine's speed), then a random few ms more to land mid-operation
                target = _journal_lines(out) + rng.randint(2, 12)
                deadline = time.monotonic() + 60
                while proc.poll() is None and _journal_lines(out) < target and time.monotonic() < deadline:
                    time.sleep(0.002)
                time.sleep(rng.uniform(0.0, 0.05))
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    kills += 1
            code = proc.wait(timeout=120)
            if code == 0:
                break
            assert code in (-signal.SIGKILL, 1), proc.output()
    finally:
        zygote.stdin.close()
        zygote.wait(timeout=10)
    assert kills >= 5
    recs = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines() if line.strip()]
    done = Counter(r["key"] for r in recs if r["rec"] == "tile_done")
    assert len(done) == 2 * 4 * 3 and set(done.values()) == {1}, done
    started = Counter(r["key"] for r in recs if r["rec"] == "mill_started")
    finished = Counter(r["key"] for r in recs if r["rec"] == "mill_done")
    assert started == finished == Counter({"mill:c0000": 1, "mill:c0001": 1, "mill:c0002": 1})
    for r in recs:                               # every journaled tile file is really there
        if r["rec"] == "tile_done":
            assert r["files"] and all((out / f).is_file() for f in r["files"])   # relative to OUTDIR
    assert 5 <= sum(r["rec"] == "run_start" for r in recs) <= runs


# ------------------------------------------------------------------ acknowledgements
def test_dispatcher_back_pressure_order_and_writer_acks():
    import numpy as np

    from acq.documents import CycleDone, TileEvent
    from acq.stream import Dispatcher

    class SlowWriter:
        def __init__(self, delay, fail_on=None):
            self.delay, self.fail_on, self.got = delay, fail_on, []

        def handle(self, doc):
            time.sleep(self.delay)
            if doc.kind == "tile" and doc.tile_id == self.fail_on:
                raise OSError("disk gone")
            self.got.append(doc)
            return [f"/data/{getattr(doc, 'tile_id', doc.kind)}"]

        def flush(self):
            pass

    d = Dispatcher(maxsize=2)
    fast, slow = SlowWriter(0.0), SlowWriter(0.05, fail_on="t3")
    d.add_writer(fast)
    d.add_writer(slow)
    seen = []
    d.add_subscriber(seen.append)
    acks = {}
    t = time.perf_counter()
    for i in range(6):
        tile = TileEvent("u", f"t{i}", 0, 0, 0, 0, 0, i, np.zeros((2, 2), np.uint8), 1e-8, 1e-7, {}, (0, 0), 0.0,
                         5e-3, (0, 0), 0, 0)
        d.publish(tile, ack=lambda ack, i=i: acks.__setitem__(i, (ack.files, ack.errors)))
    blocked = time.perf_counter() - t
    assert blocked >= 0.05 * (6 - 2 - 1) * 0.9          # the slow writer's full queue held publish back
    d.publish(CycleDone("u", 0))
    d.close()
    assert [x.tile_id for x in seen if x.kind == "tile"] == [f"t{i}" for i in range(6)]
    assert seen[-1].kind == "cycle_done"
    assert sorted(acks) == list(range(6))
    assert acks[0][1] == {} and set(acks[0][0]) == {"SlowWriter", "SlowWriter#2"}
    assert "OSError: disk gone" in acks[3][1]["SlowWriter#2"]          # not acknowledged: not done
