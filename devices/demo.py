"""What `python main.py` does: the operator GUI when it is installed,
otherwise a short headless demo on the configured (simulated) setup."""
from __future__ import annotations

from pathlib import Path


def run_demo_or_gui(config: Path) -> int:
    try:
        from gui.app import run_gui
    except ImportError:
        return headless_demo(config)
    return run_gui(config)


def headless_demo(config: Path) -> int:
    from devices.cli import check_devices
    from devices.factory import build_setup
    from devices.setup_config import load_setup

    print("Operator GUI not available yet: running the headless demo.\n")
    rows, ok = check_devices(config)
    for role, driver, ident, detail, good in rows:
        print(f"  {role:20s} {driver:16s} {'OK' if good else 'FAIL':4s} {ident}")
    cfg = load_setup(config)
    with build_setup(cfg) as setup:
        sec = setup.world.wafer.sections[0] if setup.world and setup.world.wafer else None
        if sec is not None:
            from devices.interfaces import StagePosition
            setup.stage.move_to(StagePosition(x=sec.center_m[0], y=sec.center_m[1]))
        setup.sem.set_blanked(False)
        setup.sem.set_frame_size(1024, 768)
        fr = setup.sem.acquire_frame()
        setup.sem.set_blanked(True)
        md = fr.metadata
        print(f"\nframe {fr.image.shape[1]}x{fr.image.shape[0]} at stage "
              f"({md['stage']['x']*1e3:.3f}, {md['stage']['y']*1e3:.3f}) mm, mean {fr.image.mean():.1f}, "
              f"scan {md['scan_time_s']:.2f} s, rendered in {md['render_s']*1e3:.0f} ms")
    return 0 if ok else 1
