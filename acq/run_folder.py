"""An acquisition's output folder as a run: is there one to resume, is it
still empty, does a resume match it (runs from before fingerprint.json),
how much is in it."""
from __future__ import annotations

import json
import os
from pathlib import Path

from acq import fingerprint
from acq.journal import Journal
from acq.outdir_lock import LOCK_NAME
from acq.plan import Plan, dump_plan
from devices.setup_config import ConfigError

PLAN_COPY = "plan.json"
# what a resume must not change (runs from before fingerprint.json): which tiles, mills and doses
_DEFINING = ("sections", "sections_from", "grid_template", "overview", "order", "cycles", "mill", "irradiation")


def run_started(out_dir: Path) -> bool:
    """OUTDIR holds a run that --resume can continue (journal or its first files)."""
    out_dir = Path(out_dir)
    return any((out_dir / n).exists() for n in (Journal(out_dir).path.name, PLAN_COPY, fingerprint.FINGERPRINT))


def holds_nothing(out_dir: Path) -> bool:
    """OUTDIR has no data: at most empty folders, the lock and temporary
    files of a start that was cut before its first file (a run there starts afresh)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return not out_dir.exists()
    for _root, _dirs, files in os.walk(out_dir):
        if any(f != LOCK_NAME and not f.endswith(".part") and f != ".write_probe" for f in files):
            return False
    return True


def plan_copy(out_dir: Path) -> dict:
    """The plan the run stored (PLAN_COPY), for readers that only report on a
    run: {} when it is missing or unreadable."""
    try:
        data = json.loads((Path(out_dir) / PLAN_COPY).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def same_plan(out_dir: Path, plan: Plan) -> None:
    """A resumed run must acquire what the journal's run planned."""
    path = out_dir / PLAN_COPY
    if not path.exists():
        if Journal(out_dir).path.exists():
            raise ConfigError(f"--resume {out_dir}: {PLAN_COPY} and {fingerprint.FINGERPRINT} are missing, so what "
                              "this run images cannot be checked; restore them from a backup")
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--resume {out_dir}: {path} is unreadable ({e}); restore it from a backup") from None
    new = dump_plan(plan)
    changed = [k for k in _DEFINING if old.get(k) != new.get(k)]
    if changed:
        raise ConfigError(f"--resume {out_dir}: the plan's {', '.join(changed)} differ from the run being resumed "
                          f"({path}); resume with the same plan")


def disk_usage(folder: Path) -> tuple[int, int]:
    n = size = 0
    for root, _dirs, files in os.walk(folder):
        for f in files:
            try:
                size += os.path.getsize(os.path.join(root, f))
                n += 1
            except OSError:
                pass
    return n, size
