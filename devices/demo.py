"""A short headless demo on the configured (simulated) setup: what
`python main.py` runs where the operator GUI is not installed."""
from __future__ import annotations

from pathlib import Path


def headless_demo(config: Path) -> int:
    from devices.check import check_devices
    from devices.factory import build_setup
    from devices.interfaces import ScanParams, StagePosition
    from devices.setup_config import load_setup

    print("Operator GUI not available: running the headless demo.\n")
    rows, ok = check_devices(config)
    for role, driver, ident, detail, good in rows:
        print(f"  {role:20s} {driver:16s} {'OK' if good else 'FAIL':4s} {ident}")
    cfg = load_setup(config)
    with build_setup(cfg) as setup:
        sec = setup.world.wafer.sections[0] if setup.world and setup.world.wafer else None
        if sec is not None:
            setup.stage.move_to(StagePosition(x=sec.center_m[0], y=sec.center_m[1]))
        with setup.sem.scanning(ScanParams(frame=(1024, 768))):
            fr = setup.sem.acquire_frame()
        md = fr.metadata
        print(f"\nframe {fr.image.shape[1]}x{fr.image.shape[0]} at stage "
              f"({md['stage']['x']*1e3:.3f}, {md['stage']['y']*1e3:.3f}) mm, mean {fr.image.mean():.1f}, "
              f"scan {md['scan_time_s']:.2f} s, rendered in {md['render_s']*1e3:.0f} ms")
    return 0 if ok else 1
