"""Acquisition engine benchmark on the simulator (time factor 0).

Per-tile software overhead
    The simulator produces a frame's pixels in ``render_s`` (frame metadata),
    its stand-in for the beam scan; on the microscope the scan itself takes
    ``scan_time_s`` (dwell x pixels + flyback). Overhead is everything else
    the software spends per tile: stage-move commands, frame checks and QC,
    journal records (fsync), document dispatch and the writers' work not
    hidden behind the next frame:

        overhead per tile = (first tile's move .. last tile acknowledged by all
                             writers) / tiles - mean render_s
        fraction          = overhead per tile / scan_time_s      (reference < 5 %)

    "engine" is the part spent in the engine thread itself (the critical path
    while writers keep up); the rest is writer work not hidden behind the
    next frame. The run's fixed start and finish (journal, writer flush and
    close) are printed apart: they do not grow with the number of tiles.

Writer throughput
    Writer throughput is what the writers put on disk per second, next to the
    raw sequential write speed of the same disk measured in the same run (write
    + fsync of one big file; this VM's disk swings several-fold with the host's
    cache, so it is measured before, between and after the runs and the median
    is the reference). The writers are saturated: frames are replayed instead
    of rendered, so the engine hands tiles over as fast as the writers take
    them, and bytes on disk per second of stream (first tile acknowledged ..
    writers flushed and closed) is their capacity. Reference: >= 0.5x raw.
    Beside it, tile data per second: OME-TIFF, mipmaps and OME-Zarr each
    store the pixels (~2.4-3x the tile data with all five writers), so this is
    the rate at which the pipeline can take tiles, compared with the rate the
    microscope produces them. Each writer's own time in handle() per tile is
    printed too (from the unsaturated runs).

    The small-tile runs stream 64 tiles: a section's worth (a 100 µm square
    at 4 nm is ~200 of them). With 16, the OME-Zarr shards completed at the
    writers' flush were spread over too few tiles to show a rate a run has.

    .venv/bin/python benchmarks/acquisition.py [--tiles-small 64] [--tiles-large 4] [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]

from acq.engine import Engine
from acq.documents import TileEvent
from acq.events import AcquireTile, MoveStage
from acq.plan import load_plan, writer_options
from acq.writers import make_writers
import autofocus
from devices.factory import build_setup
autofocus.register_methods()          # the application registers the autofocus methods a plan may name

REFERENCE_FRACTION = 0.05
WRITERS = ["ome_tiff", "mipmaps", "render_tilespecs", "trakem2", "ome_zarr"]


def disk_write_speed(folder: Path, size_mb: int = 512) -> float:
    """MB/s of one sequential write + fsync of ``size_mb`` in ``folder``."""
    block = os.urandom(8 << 20)
    path = folder / "disk_speed.tmp"
    t = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(max(1, size_mb // 8)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    dt = time.perf_counter() - t
    path.unlink()
    return max(1, size_mb // 8) * 8 * 1.048576 / dt


class TimedWriter:
    """A writer wrapped to measure its own time on tiles."""

    def __init__(self, inner):
        self.inner, self.name = inner, type(inner).__name__
        self.tile_s = 0.0
        self.tile_bytes = 0

    def handle(self, doc):
        t = time.perf_counter()
        files = self.inner.handle(doc)
        if isinstance(doc, TileEvent):
            self.tile_s += time.perf_counter() - t
            self.tile_bytes += doc.image.nbytes
        return files

    def flush(self):
        self.inner.flush()

    def close(self):
        fn = getattr(self.inner, "close", None)
        if fn is not None:
            fn()


class EngineTimes:
    """Engine-thread time per event class (the engine's step hooks); first
    tile move and last tile acknowledgement."""

    def __init__(self, engine: Engine):
        self.busy = defaultdict(float)
        self.first_tile = self.first_ack = self.last_ack = None
        engine.on_step(self.before)
        engine.after_step(self.after)

    def before(self, ev):
        if self.first_tile is None and isinstance(ev, MoveStage):
            self.first_tile = time.perf_counter()

    def after(self, ev, seconds: float):
        self.busy[type(ev)] += seconds

    def note_ack(self):
        self.last_ack = time.perf_counter()
        if self.first_ack is None:
            self.first_ack = self.last_ack


def plan_file(folder: Path, frame: tuple[int, int], tiles: int, writers=tuple(WRITERS)) -> Path:
    rows = max(1, int(round(tiles ** 0.5)))
    cols = max(1, -(-tiles // rows))
    d = {"setup": str(ROOT / "configs" / "sim.yaml"),
         "output": {"writers": list(writers), "queue_maxsize": 4},
         "sections_from": "wafer_truth", "order": [0],
         "grid_template": {"rows": rows, "cols": cols, "pixel_size_nm": 4, "frame_size": list(frame),
                           "dwell_ns": 100, "overlap_px": frame[1] // 10, "rotation_deg": 0},
         "autofocus": {"method": "none"}, "cycles": 1}
    path = folder / f"plan_{frame[0]}_{len(writers)}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def replay_frames(setup) -> None:
    """Frames without rendering (the first one rendered, then copies rolled
    by a pixel each, which the frozen-frame check tells apart), so the engine
    produces tiles as fast as the writers take them: the writers' capacity."""
    sem, inner, cache = setup.sem, setup.sem.acquire_frame, {}

    def acquire_frame():
        key = tuple(sem.frame_size())
        if key not in cache:
            cache[key] = [inner(), 0]
        f, k = cache[key]
        cache[key][1] += 1
        md = dict(f.metadata, stage=setup.stage.position().as_dict(), render_s=0.0)
        return type(f)(np.roll(f.image, k + 1, axis=1), md)
    sem.acquire_frame = acquire_frame


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run_case(folder: Path, frame: tuple[int, int], tiles: int, saturate: bool = False,
             writers=tuple(WRITERS)) -> dict:
    plan = load_plan(plan_file(folder, frame, tiles, writers))
    out = folder / f"out_{frame[0]}_{len(writers)}{'_saturated' if saturate else ''}"
    setup = build_setup(plan.setup_config)
    if saturate:
        replay_frames(setup)
    meta: list[dict] = []
    try:
        writers = [TimedWriter(w) for w in make_writers(out, writer_options(plan))]
        engine = Engine(setup, plan, out, writers=writers, on_pause="stop")
        times = EngineTimes(engine)
        engine.subscribe(lambda d: isinstance(d, TileEvent) and meta.append(
            {"render_s": d.metadata["render_s"], "scan_s": d.metadata["scan_time_s"], "bytes": d.image.nbytes}))
        append = engine.journal.append

        def journal_append(rec, **kw):                 # tile_done = every writer acknowledged the tile
            out_rec = append(rec, **kw)
            if rec == "tile_done":
                times.note_ack()
            return out_rec
        engine.journal.append = journal_append
        t = time.perf_counter()
        res = engine.run()
        t_end = time.perf_counter()
    finally:
        setup.close()
    if res.status != "success":
        raise SystemExit(f"benchmark run failed: {res.reason}")
    n = len(meta)
    render = sum(m["render_s"] for m in meta) / n
    scan = meta[0]["scan_s"]
    per_tile = (times.last_ack - times.first_tile) / n
    engine_s = (times.busy[AcquireTile] + times.busy[MoveStage]) / n - render
    return {"frame": frame, "tiles": n, "wall_per_tile": per_tile, "render": render, "scan": scan,
            "overhead": per_tile - render, "engine": engine_s, "bytes": meta[0]["bytes"],
            "writers": {w.name: (w.tile_bytes / 1e6 / w.tile_s if w.tile_s else float("inf"), w.tile_s / n)
                        for w in writers},
            "start_s": times.first_tile - t, "finish_s": t_end - times.last_ack,
            # saturated runs: first tile acknowledged (its frame was rendered; the
            # others are replayed) .. end of the run (writers flushed and closed)
            "stream_s": t_end - times.first_ack, "disk_bytes": folder_bytes(out),
            "tiles_bytes": folder_bytes(out / "tiles"),
            "zarr_bytes": folder_bytes(out / "zarr") if (out / "zarr").is_dir() else 0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles-small", type=int, default=64)
    ap.add_argument("--tiles-large", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None, help="folder on the disk to measure (default: a temp dir)")
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="acqbench_", dir=args.out))
    try:
        # this VM's disk speed swings several-fold with the host's caching: measured
        # before, between and after the runs, the median is the reference
        disks = [disk_write_speed(folder)]
        cases = [run_case(folder, (2048, 1536), args.tiles_small), run_case(folder, (6144, 4608), args.tiles_large)]
        saturated = []
        for w in (tuple(WRITERS), ("ome_tiff",)):
            for frame, n in (((2048, 1536), max(args.tiles_small, 2)), ((6144, 4608), max(2 * args.tiles_large, 2))):
                disks.append(disk_write_speed(folder))
                saturated.append((w, run_case(folder, frame, n, saturate=True, writers=w)))
        disks.append(disk_write_speed(folder))
        disk = float(np.median(disks))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"acquisition benchmark (simulator, time factor 0, 100 ns dwell, writers: {', '.join(WRITERS)})")
    print(f"{'tile':>11} {'n':>3} {'scan s':>8} {'render s':>9} {'wall/tile s':>12} {'overhead ms':>12} "
          f"{'engine ms':>10} {'overhead/scan':>14} {'reference':>10}")
    ok = True
    for c in cases:
        frac = c["overhead"] / c["scan"]
        ok &= frac < REFERENCE_FRACTION
        print(f"{c['frame'][0]}x{c['frame'][1]:<6} {c['tiles']:>3} {c['scan']:>8.3f} {c['render']:>9.3f} "
              f"{c['wall_per_tile']:>12.3f} {c['overhead'] * 1e3:>12.1f} {c['engine'] * 1e3:>10.1f} "
              f"{100 * frac:>13.1f}% {'< 5.0%':>10}")
    for c in cases:
        print(f"{c['frame'][0]}x{c['frame'][1]}: OME-Zarr store {c['zarr_bytes'] / 1e6:.1f} MB against "
              f"{c['tiles_bytes'] / 1e6:.1f} MB of OME-TIFF tiles ({c['zarr_bytes'] / c['tiles_bytes']:.2f}x; "
              f"3 levels, sharded, zstd)")
    for c in cases:
        print(f"{c['frame'][0]}x{c['frame'][1]}: per run, not per tile: start {c['start_s']:.2f} s "
              f"(journal, RunStart, devices configured), finish {c['finish_s']:.2f} s (writers flush and close)")
    print(f"\nraw sequential write (write + fsync, same disk): {disk:8.1f} MB/s  (median of "
          f"{', '.join(f'{d:.0f}' for d in disks)} MB/s: before, between and after the runs)")
    print("\nwriter throughput, saturated (frames replayed without rendering, each writer in its thread; first"
          " tile acknowledged .. writers flushed and closed; the first tile is not counted):")
    print(f"{'writers':>9} {'tile':>11} {'n':>3} {'on disk MB/s':>13} {'vs raw disk':>12} {'reference':>10}"
          f" {'tile data MB/s':>15} {'vs microscope':>14}")
    for w, c in saturated:
        tile_mbs = (c["tiles"] - 1) * c["bytes"] / 1e6 / c["stream_s"]
        disk_mbs = c["disk_bytes"] * (c["tiles"] - 1) / c["tiles"] / 1e6 / c["stream_s"]
        scope = c["bytes"] / 1e6 / c["scan"]
        ok &= disk_mbs >= 0.5 * disk
        print(f"{'all five' if len(w) > 1 else w[0]:>9} {c['frame'][0]}x{c['frame'][1]:<6} {c['tiles']:>3} "
              f"{disk_mbs:>13.1f} {disk_mbs / disk:>11.2f}x {'>= 0.50x':>10} {tile_mbs:>15.1f} {tile_mbs / scope:>13.0f}x")
    for c in cases:
        rate = c["bytes"] / 1e6 / c["scan"]
        print(f"{c['frame'][0]}x{c['frame'][1]} (unsaturated run): microscope produces {rate:6.1f} MB/s; "
              f"each writer, tile data per second of its own time in handle():")
        for name, (mbs, s) in c["writers"].items():
            rate_txt = f"{mbs:8.1f} MB/s" if s * 1e3 >= 1.0 else "metadata only"   # writes no pixels
            print(f"    {name:16s} {rate_txt:>13s}   {s * 1e3:8.1f} ms/tile")
    print("\nresult:", "within reference" if ok else "ABOVE reference (see the rows above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
