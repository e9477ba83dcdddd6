"""Frame render time of the simulated SEM against the real scan time.

    python benchmarks/render.py [--dwell-ns 100] [--repeats 3]

The simulator must render a frame faster than the microscope would scan it
(so a demo or an engine test with time factor 1 is paced by the scan, not by
the renderer). Prints one row per frame size: median render time, real scan
time, and their ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


from devices.setup_config import Simulation
from devices.sim import optics
from devices.sim.frames import render_frame, specimen_world

SIZES = [(1024, 768), (2048, 1536), (6144, 4608)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dwell-ns", type=float, default=100.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--specimen", nargs="*", default=[], help="texture images (default: procedural)")
    args = ap.parse_args()
    world = specimen_world(Simulation(), [Path(p) for p in args.specimen], None)
    dwell = args.dwell_ns * 1e-9
    render_frame(world, defocus_m=3e-6, stig=(0.5, -0.5), dwell_s=dwell, pixel_m=5e-9, size=(256, 256), seed=0)
    print(f"simulated SEM frame rendering, {args.dwell_ns:g} ns dwell, defocus 3 µm + stig, "
          f"median of {args.repeats}")
    print(f"{'frame':>11s} {'render s':>9s} {'scan s':>8s} {'render/scan':>12s}  verdict")
    for w, h in SIZES:
        times = []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            render_frame(world, defocus_m=3e-6, stig=(0.5, -0.5), dwell_s=dwell, pixel_m=5e-9,
                         size=(w, h), seed=r + 1)
            times.append(time.perf_counter() - t0)
        render = statistics.median(times)
        scan = optics.scan_time(w, h, dwell, world.mp.flyback_s)
        ratio = render / scan
        verdict = "faster than the microscope" if ratio < 1 else "SLOWER than the microscope"
        print(f"{w:>5d}x{h:<5d} {render:9.3f} {scan:8.3f} {ratio:12.2f}  {verdict}")


if __name__ == "__main__":
    main()
