"""Every crash point is recoverable.

A tiny plan (one section, 1x2 tiles, two cycles with a mill, all five
file writers) runs once with every filesystem operation of the writers, the
journal and the manifest logged (acq/crashpoints.py). Then, for each
distinct (operation, site), a fresh run is killed (os._exit) right before
one occurrence of it and resumed. Every resume must end with the complete
output: each planned tile done once as its latest version and present on
disk, the output folder verifying against its manifest, no tile scanned
more often than its budget, and each mill done once for its full time.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from common.crashpoints import CRASH_EXIT
from tests.support import ROOT
from tests.support.engine_runs import write_plan, write_setup
from tests.support.fork_server import SERVER

WRITERS = ["ome_tiff", "mipmaps", "render_tilespecs", "trakem2", "ome_zarr"]
MILL_S = 6.0


class Runner:
    """Runs through the fork server (tests/support/fork_server.py), each child
    with its crash point; an os._exit at the crash point ends it like a kill."""

    def __init__(self, plan: Path, tmp: Path):
        env = {k: v for k, v in os.environ.items() if not k.startswith("GCIB_CRASH")}
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        assert self.proc.stdout.readline().strip() == "ready"
        self.plan, self.tmp, self.n = plan, tmp, 0

    def __call__(self, out: Path, mode: str, at: str | None = None, ops: Path | None = None) -> tuple[int, str]:
        self.n += 1
        log = self.tmp / f"run{self.n}.log"
        argv = ["run", str(self.plan), "--out" if mode == "out" else "--resume", str(out)]
        argv += ["--accept-interrupted-mill"] if mode == "resume-accept" else []
        crash = [at, str(ops) if ops else None, str(out)]          # set in the child only: a fresh point per run
        self.proc.stdin.write(json.dumps({"log": str(log), "argv": argv, "crash": crash}) + "\n")
        self.proc.stdin.flush()
        self.proc.stdout.readline()                                # the child's pid
        code = int(self.proc.stdout.readline())
        return code, log.read_text(errors="replace")

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def crash_sites(log: Path) -> list[tuple[str, str, int]]:
    """(op, site, occurrence) to crash at: one per distinct (op, site), the
    middle occurrence (inside the run rather than at its edges)."""
    counts = Counter(tuple(line.split("\t")) for line in log.read_text().splitlines())
    return sorted((op, site, (n + 1) // 2) for (op, site), n in counts.items())


def check_complete(out: Path, planned: set[str], budget: int = 3) -> None:
    from acq.journal import read_records
    from acq.verify import verify_outdir
    recs = list(read_records(out))
    done = {r["key"]: r["version"] for r in recs if r["rec"] == "tile_done"}
    assert set(done) == planned
    scans = Counter()
    for r in recs:
        if r["rec"] == "tile_started":
            scans[r["key"]] += 1
        elif r["rec"] == "exposure":
            scans[r["key"]] += r.get("n", 1)
    assert max(scans.values()) <= budget, scans
    mills = Counter(r["cycle"] for r in recs if r["rec"] == "mill_done")
    assert mills == Counter({0: 1, 1: 1})
    for r in recs:
        if r["rec"] == "mill_done":
            assert abs(r["seconds"] - MILL_S) < 1e-6 or r.get("interrupted"), r
    tiles = sorted(p.name for p in (out / "tiles").rglob("*.ome.tif"))
    for key, version in done.items():
        assert sum(1 for t in tiles if key in t and f"_v{version}" in t) == 1, (key, version, tiles)
    report = verify_outdir(out)
    assert report.ok, report.summary()


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks one run per crash point")
def test_crash_at_every_filesystem_operation_then_resume(tmp_path):
    setup = write_setup(tmp_path, sections=1)
    plan = write_plan(tmp_path, setup, cycles=2, irradiation=None, output={"writers": WRITERS},
                      mill={"duration_s": MILL_S, "delay_s": 0, "check_interval_s": 1},
                      suspenders={"min_free_gb": 0})
    run = Runner(plan, tmp_path)
    try:
        ref, ops = tmp_path / "ref", tmp_path / "ops.log"
        code, text = run(ref, "out", ops=ops)
        assert code == 0, text
        from acq.journal import read_records
        planned = {r["key"] for r in read_records(ref) if r["rec"] == "tile_done"}
        assert len(planned) == 4
        points = crash_sites(ops)
        print(f"\ncrash points: {len(points)} distinct (operation, site) pairs")
        hit, failures = 0, []
        for i, (op, site, k) in enumerate(points):
            out = tmp_path / f"c{i:03d}"
            code, text = run(out, "out", at=f"{op}|{site}|{k}")
            if code == CRASH_EXIT:
                hit += 1
                code, text = run(out, "resume")
                if code == 1 and "--accept-interrupted-mill" in text:
                    # killed between journaling mill_beam_on and the beam's blank: the time milled is
                    # unknown, so the operator decides (here: accept it), as the run told them
                    code, text = run(out, "resume-accept")
            if code != 0:
                failures.append(f"{op} {site} #{k}: exit {code}: {text[-1500:]}")
                continue
            try:
                check_complete(out, planned)
            except AssertionError as e:
                failures.append(f"{op} {site} #{k}: {e}")
    finally:
        run.close()
    print(f"crash points hit: {hit} of {len(points)}; failures: {len(failures)}")
    assert not failures, "\n".join(failures)
    assert hit >= 0.9 * len(points)          # writer threads may reorder a few occurrences
