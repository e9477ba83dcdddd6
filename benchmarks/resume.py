"""Resume at production scale: how long ``Journal(out).open()`` takes and how
much memory it needs on journals of 100 k, 1 M and 2.5 M tiles.

The journals are written through ``Journal.append`` itself (``durable=False``:
no fsync, otherwise the same bytes, the same periodic snapshots), with the
records of a real run: run_start (and a resume every 40 cycles), per cycle and
section autofocus_done, tile_started + tile_done (4 files, full QC) per tile,
section_done; then mill_started, mill_beam_on/off per azimuth, mill_done,
cycle_done. 500 sections x 25 tiles = 12.5 k tiles per cycle. The last cycle
is left open as a crash would leave it: its tiles done, the mill's beam on.

Then the worst case: records appended until the journal ends one record
before its next snapshot, and resume measured again. Each resume runs in a
fresh Python process: wall time of open() and its peak memory, i.e. the peak
RSS during open() (VmHWM, reset just before it) minus the RSS of the
interpreter with its imports; the child's ru_maxrss is shown too (it also
holds the imports' own peak). Also shown: the whole journal read without its
snapshot (what a lost snapshot costs once).

  python benchmarks/resume.py [--sizes 100k,1M,2.5M] [--dir DIR] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from acq.journal import JOURNAL_NAME, SNAPSHOT_EVERY, SNAPSHOT_NAME, Journal

SECTIONS, TILES = 500, 25                  # per cycle: 12.5 k tiles
AZIMUTHS = 4
TARGET_S, TARGET_MB = 5.0, 500.0           # for 2.5 M tiles

CHILD = r"""
import gc, json, os, resource, sys, time
from acq.journal import Journal


def status(field):                                   # kB, from /proc/self/status (Linux)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


gc.collect()
base_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
base = status("VmRSS")
try:                                                 # peak RSS from here on (the imports' peak left out)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
j = Journal(sys.argv[1])
t0 = time.perf_counter()
if sys.argv[2] == "open":
    st = j.open()
else:
    st = j.read(use_snapshot=False)
dt = time.perf_counter() - t0
maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
hwm = status("VmHWM")
peak = hwm if hwm is not None and base is not None else maxrss
base = base if hwm is not None and base is not None else base_maxrss
i = j.last_read
print(json.dumps({"s": dt, "mb": (peak - base) / 1024, "base_mb": base / 1024, "peak_mb": peak / 1024,
                  "maxrss_mb": maxrss / 1024, "base_maxrss_mb": base_maxrss / 1024,
                  "tail_bytes": i.tail_bytes, "tail_records": i.tail_records, "snapshot": i.snapshot,
                  "records": st.records, "tiles_total": st.tiles_done_total, "open_tiles": len(st.tiles_done),
                  "open_cycle": st.first_open_cycle(), "mill": st.mill_status(f"mill:c{st.first_open_cycle():04d}")}))
sys.stdout.flush()
os._exit(0)          # no close(): a crashed run leaves no snapshot at close
"""


def parse_size(s: str) -> int:
    s = s.strip().lower()
    mult = {"k": 1_000, "m": 1_000_000}.get(s[-1], 1)
    return int(float(s[:-1] if s[-1] in "km" else s) * mult)


def qc(rng: random.Random) -> dict:
    u = rng.uniform
    return {"ok": True, "reasons": [], "mean": u(80, 160), "sd": u(20, 50), "max_diff_previous": rng.randint(30, 200),
            "sd_top": u(20, 50), "sd_middle": u(20, 50), "sd_bottom": u(20, 50), "flat_rows_top": 0,
            "flat_rows_bottom": 0, "focus": u(0.01, 0.2)}


def generate(out: Path, n_tiles: int, snapshot_every: int) -> dict:
    """A journal of ``n_tiles`` tiles done; the last cycle open (mill beam on)."""
    out.mkdir(parents=True, exist_ok=True)
    per_cycle = SECTIONS * TILES
    full = max(0, -(-(n_tiles - per_cycle) // per_cycle))     # complete cycles; the rest in the open one
    rng = random.Random(n_tiles)
    j = Journal(out, durable=False, snapshot_every=snapshot_every)
    j.open()
    t0 = time.perf_counter()
    done = 0
    c = 0
    while done < n_tiles:
        if c % 40 == 0:
            j.append("run_start", run_uid=f"run{c:04d}", resumed=c > 0, plan_source="/data/plans/brain.yaml")
        last = c >= full
        for s in range(SECTIONS):
            if done >= n_tiles:
                break
            j.append("autofocus_done", key=f"af:c{c:04d}_s{s:04d}", cycle=c, wd_m=0.0050 + rng.uniform(-1e-5, 1e-5),
                     stig=[rng.uniform(-1, 1), rng.uniform(-1, 1)], ok=True, method="mapfost", frames=4, message="",
                     center_um=[rng.uniform(-2e4, 2e4), rng.uniform(-2e4, 2e4)], radius_um=14.5, section=s)
            for t in range(TILES):
                if done >= n_tiles:
                    break
                key = f"c{c:04d}_s{s:04d}_g00_r{t // 5:03d}_c{t % 5:03d}"
                rel = f"tiles/{s:04d}/{c:04d}/{key}_v0.ome.tif"
                j.append("tile_started", key=key, version=0, cycle=c)
                j.append("tile_done", key=key, version=0, cycle=c,
                         files=[str(out / rel)] + [str(out / f"mipmaps/{lv}/{rel}.tif") for lv in (1, 2, 3)], qc=qc(rng))
                done += 1
            j.append("section_done", key=f"sec:c{c:04d}_s{s:04d}", cycle=c, section=s)
        mk = f"mill:c{c:04d}"
        j.append("mill_started", key=mk, cycle=c, duration_s=600.0)
        for az in range(AZIMUTHS):
            j.append("mill_beam_on", key=mk, done_s=150.0 * az, azimuth=az)
            if last and az == 1:
                break                      # the crash: beam on
            j.append("mill_beam_off", key=mk, done_s=150.0 * (az + 1))
        if last:
            break
        j.append("mill_done", key=mk, cycle=c, seconds=600.0, interrupted=False, accepted=False)
        j.append("cycle_done", key=f"cycle:c{c:04d}", cycle=c)
        if c % 17 == 3:
            j.append("incident", severity="warning", cause="qc_failed", message=f"tile of cycle {c}: too dark")
        c += 1
    records = j.state.records
    os.close(j._fd)                          # like a crash: no snapshot at close
    j._fd = None
    return {"seconds": time.perf_counter() - t0, "records": records, "cycles": c + 1}


def pad_tail(out: Path, snapshot_every: int) -> None:
    """The worst case for resume: the journal ends one record before the next
    snapshot (re-acquisitions of the open cycle's tiles: tile_started + tile_done)."""
    j = Journal(out, durable=False, snapshot_every=snapshot_every)
    st = j.open()
    rng = random.Random(7)
    keys = sorted(st.tiles_done)
    i = 0
    while j._since_snapshot < snapshot_every - 1:
        key = keys[i % len(keys)]
        i += 1
        if j._since_snapshot == snapshot_every - 2:
            j.append("incident", severity="info", cause="padding", message="")
            break
        v = j.state.next_version(key)
        c, s = int(key[1:5]), int(key[7:11])
        rel = f"tiles/{s:04d}/{c:04d}/{key}_v{v}.ome.tif"
        j.append("tile_started", key=key, version=v, cycle=c)
        j.append("tile_done", key=key, version=v, cycle=c,
                 files=[str(out / rel)] + [str(out / f"mipmaps/{lv}/{rel}.tif") for lv in (1, 2, 3)], qc=qc(rng))
    os.close(j._fd)                          # like a crash: no snapshot at close
    j._fd = None


def measure(out: Path, mode: str) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, str(out), mode], capture_output=True, text=True,
                       check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100k,1M,2.5M", help="tiles per journal, comma separated (100k, 1M, 2.5M)")
    ap.add_argument("--dir", default=None, help="where to write the journals (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the journals")
    ap.add_argument("--snapshot-every", type=int, default=SNAPSHOT_EVERY)
    ap.add_argument("--no-full", action="store_true", help="skip the read without snapshot (slow on big journals)")
    a = ap.parse_args(argv)
    base = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="journal_bench_"))
    base.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for size in [parse_size(s) for s in a.sizes.split(",")]:
            out = base / f"tiles_{size}"
            if (out / JOURNAL_NAME).exists() and (out / "bench.json").exists():
                gen = json.loads((out / "bench.json").read_text())
            else:
                shutil.rmtree(out, ignore_errors=True)
                print(f"writing a journal of {size:,} tiles ...", flush=True)
                gen = generate(out, size, a.snapshot_every)
                (out / "bench.json").write_text(json.dumps(gen))
            res = measure(out, "open")
            full = None if a.no_full else measure(out, "full")
            jsize, ssize = (out / JOURNAL_NAME).stat().st_size, (out / SNAPSHOT_NAME).stat().st_size
            if not gen.get("padded"):
                pad_tail(out, a.snapshot_every)
                gen["padded"] = True
                (out / "bench.json").write_text(json.dumps(gen))
            worst = measure(out, "open")
            rows.append((size, gen, jsize, ssize, res, full, worst))
            print(f"  {size:,} tiles: generated in {gen['seconds']:.0f} s, resume {res['s']:.2f} s", flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"journals kept in {base}")
    print()
    print(f"resume = Journal(out).open() in a fresh process; snapshot every {a.snapshot_every} records "
          f"(worst tail: the journal ends {a.snapshot_every - 1} records after its snapshot); "
          f"peak mem = peak RSS during open() minus the interpreter's RSS after its imports "
          f"({rows[0][4]['base_mb']:.0f} MB); (RSS) = the child's peak RSS (ru_maxrss)")
    hdr = (f"{'tiles':>10} {'records':>10} {'journal':>9} {'snapshot':>9} {'tail read':>10} {'resume':>8} "
           f"{'peak mem':>9} {'(RSS)':>7} {'target':>17} {'worst tail':>11} {'resume':>7} {'mem':>6} "
           f"{'full read':>10} {'full mem':>9}")
    print(hdr)
    print("-" * len(hdr))
    for size, gen, jsize, ssize, res, full, worst in rows:
        target = f"< {TARGET_S:g} s, < {TARGET_MB:g} MB"
        ok = all(r["s"] < TARGET_S and r["mb"] < TARGET_MB for r in (res, worst))
        ws = f"{worst['tail_bytes'] / 1e6:>9.2f}MB {worst['s']:>6.2f}s {worst['mb']:>4.0f}MB"
        fs = f"{full['s']:>9.1f}s {full['mb']:>7.0f}MB" if full else f"{'-':>10} {'-':>9}"
        print(f"{size:>10,} {gen['records']:>10,} {jsize / 1e6:>7.0f}MB {ssize / 1e6:>7.1f}MB "
              f"{res['tail_bytes'] / 1e6:>8.2f}MB {res['s']:>7.2f}s {res['mb']:>7.0f}MB {res['maxrss_mb']:>5.0f}MB "
              f"{target:>14} {'ok' if ok else 'MISS':>2} {ws} {fs}")
        assert res["tiles_total"] == size and res["snapshot"], res
        if full:
            assert full["tiles_total"] == size and full["records"] == res["records"], (full, res)
    last = rows[-1][4]
    print(f"\nstate after resume ({rows[-1][0]:,} tiles): open cycle {last['open_cycle']}, "
          f"{last['open_tiles']:,} tiles of it in memory, tiles_done_total {last['tiles_total']:,}, "
          f"mill {last['mill']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
