"""Connect every configured device once and report how each one answers
(`devices check` on the command line, the headless demo)."""
from __future__ import annotations

from pathlib import Path

from devices.factory import build_setup
from devices.setup_config import load_setup

Row = tuple[str, str, str, str, bool]          # role, driver, identity, detail, healthy


def check_devices(config: Path) -> tuple[list[Row], bool]:
    cfg = load_setup(config)
    setup = build_setup(cfg, connect=False)
    rows, ok_all = [], True
    try:
        for role, dev in setup.devices().items():
            driver = getattr(cfg.devices, role).driver
            try:
                dev.connect()
                ident = dev.identity()
                st = dev.status()
                ok, detail = st.healthy, st.detail
            except Exception as e:       # report every device, whatever fails
                ident, ok, detail = "-", False, f"{type(e).__name__}: {e}"
            rows.append((role, driver, ident, detail, ok))
            ok_all &= ok
    finally:
        setup.close()
    return rows, ok_all
