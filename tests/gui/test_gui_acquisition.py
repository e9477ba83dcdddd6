"""Acquisition from the GUI through the engine's API and document stream:
progress and tile states, pause/resume with the reason shown, stop and
continue from the journal, the demo plan, and a responsive event loop."""
import faulthandler
import threading
import time

import numpy as np
from PyQt5.QtCore import QTimer

from gui.wafer_model import ACQUIRED
from tests.support import ROOT
from tests.support.gui import small_plan


def finish(qtbot, win, timeout=60000):
    qtbot.waitUntil(lambda: win.controller.finished() and win.controller.state == "idle", timeout=timeout)
    return win.controller.engine.result


def stopped_run(win, qtbot, tmp_path, rows: int, cols: int, tiles: int):
    """(plan, run folder, result) of a two-cycle run of the small plan, stopped once `tiles`
    tiles were taken."""
    plan = small_plan(win, rows=rows, cols=cols, frame=(256, 256), cycles=2)
    acq, ctl = win.acquisition, win.controller
    out = tmp_path / "run"
    acq.out_dir.setText(str(out))
    assert acq.start()
    qtbot.waitUntil(lambda: ctl.progress.tiles >= tiles, timeout=20000)
    qtbot.mouseClick(acq.stop_button, 1)
    res = finish(qtbot, win)
    assert res.status == "aborted"
    return plan, out, res


def test_run_shows_progress_tiles_and_live_image(win, qtbot, tmp_path):
    small_plan(win, rows=1, cols=2, cycles=2)
    n_sec = len(win.layout_model.sections)
    acq = win.acquisition
    acq.out_dir.setText(str(tmp_path / "run"))
    steps = []
    win.controller.step_changed.connect(steps.append)
    assert acq.start()
    assert win.session.run_active and not win.layout_model.editable
    res = finish(qtbot, win)
    assert res.status == "success" and res.tiles == 2 * n_sec * 2
    qtbot.waitUntil(lambda: acq.tile_bar.value() == acq.tile_bar.maximum() == 2 * n_sec * 2, timeout=3000)
    assert acq.state_label.text().startswith("IDLE")
    assert acq.cycle_bar.format() == "cycle 2 of 2"
    assert all((a == ACQUIRED).all() for a in win.layout_model.tile_state.values())
    assert any(s.startswith("acquiring tile") for s in steps) and any(s.startswith("moving stage") for s in steps)
    qtbot.waitUntil(lambda: win.live.tile_pane.image is not None, timeout=2000)
    assert win.live.tile_pane.image.shape == (256, 256)
    assert len(win.live.qc["focus"]) == res.tiles
    assert sorted(win.autofocus.history) == [0, 1]                # focus per section, per cycle
    assert list((tmp_path / "run").rglob("*.tif")) and (tmp_path / "run" / "gui_plan.yaml").exists()
    assert not win.session.run_active and win.layout_model.editable


def test_pause_says_why_and_resume_continues(win, qtbot, tmp_path):
    small_plan(win, rows=2, cols=2, frame=(512, 512), cycles=3)
    acq, ctl = win.acquisition, win.controller
    acq.out_dir.setText(str(tmp_path / "run"))
    assert acq.start()
    qtbot.waitUntil(lambda: ctl.progress.tiles >= 3, timeout=20000)
    qtbot.mouseClick(acq.pause_button, 1)
    qtbot.waitUntil(lambda: ctl.state == "paused", timeout=20000)
    assert acq.advice.isVisible() and "paused by the operator" in acq.advice.text()
    assert "Resume" in acq.advice.text() and acq.resume_button.isEnabled() and not acq.pause_button.isEnabled()
    assert win.session.setup.sem.blanked()                           # paused = beams blanked
    assert not win.session.run_active                                # settings may be fixed while paused
    n = ctl.progress.tiles
    qtbot.wait(300)
    assert ctl.progress.tiles == n
    qtbot.mouseClick(acq.resume_button, 1)
    res = finish(qtbot, win)
    assert res.status == "success" and ctl.progress.tiles == ctl.progress.total
    assert not acq.advice.isVisible()


def test_stop_then_resume_the_run_from_its_folder(win, qtbot, tmp_path):
    plan, out, res = stopped_run(win, qtbot, tmp_path, rows=2, cols=2, tiles=5)
    acq, ctl = win.acquisition, win.controller
    assert 0 < res.tiles_done < ctl.progress.total
    done_first = res.tiles_done
    assert acq.start() is False and "not empty" in acq.notice.text()      # a new run never overwrites
    assert acq.recover(out)                                               # continue from the journal
    res2 = finish(qtbot, win)
    assert res2.status == "success"
    total = plan.n_cycles() * sum(len(s.grids) * 4 for s in plan.sections)
    assert res2.tiles_done == total and res2.tiles == total - done_first  # nothing acquired twice


def test_resume_from_the_gui_may_allow_a_changed_part_and_a_higher_budget(win, qtbot, tmp_path):
    """The run's plan copy edited (autofocus every 2 cycles): resuming refuses the
    change, names it, and takes it when the operator allows it; the exposure budget
    chosen for the resumed run is the engine's."""
    import yaml
    _, out, _ = stopped_run(win, qtbot, tmp_path, rows=2, cols=2, tiles=3)
    acq, ctl = win.acquisition, win.controller
    saved = out / "gui_plan.yaml"
    plan = yaml.safe_load(saved.read_text())
    plan["autofocus"]["every_n_cycles"] = 2
    saved.write_text(yaml.safe_dump(plan, sort_keys=False))
    assert acq.recover(out) is False
    assert "autofocus" in acq.notice.text() and "changed" in acq.notice.text()
    assert acq.recover(out, accept_change=["autofocus"], max_exposures=5)
    assert ctl.engine.budget == 5
    assert finish(qtbot, win).status == "success"


def test_resume_run_chosen_in_the_gui_asks_then_continues(win, qtbot, tmp_path, monkeypatch):
    """Resume run … with the folder chosen in the file dialog: the resume dialog is
    asked, Cancel changes nothing, Resume continues the run with its choices."""
    from PyQt5.QtWidgets import QFileDialog
    from gui.resume_dialog import ResumeDialog
    _, out, _ = stopped_run(win, qtbot, tmp_path, rows=1, cols=2, tiles=2)
    acq, ctl = win.acquisition, win.controller
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a, **k: str(out))
    asked = []

    def answer(result):
        def exec_(dialog):
            asked.append(dialog.budget.value())
            dialog.budget.setValue(4)
            return result
        return exec_
    monkeypatch.setattr(ResumeDialog, "exec", answer(ResumeDialog.Rejected))
    assert acq.recover() is False and not ctl.running
    monkeypatch.setattr(ResumeDialog, "exec", answer(ResumeDialog.Accepted))
    assert acq.recover()
    assert asked == [3, 3] and ctl.engine.budget == 4                 # the setup's budget offered
    assert finish(qtbot, win).status == "success"


def test_resume_dialog_offers_every_part_that_may_change_and_the_budget(win):
    from acq.fingerprint import OVERRIDABLE
    from gui.resume_dialog import ResumeDialog
    dialog = ResumeDialog("/data/run", budget=3, parent=win)
    assert set(dialog.allow) == set(OVERRIDABLE)
    assert dialog.choices() == ([], 3)                               # nothing allowed unless ticked
    dialog.allow["writers"].setChecked(True)
    dialog.budget.setValue(6)
    assert dialog.choices() == (["writers"], 6)


def test_demo_plan_runs(win, qtbot, tmp_path):
    acq, ctl = win.acquisition, win.controller
    assert acq.load_plan(ROOT / "configs" / "plans" / "demo_wafer.yaml")
    assert "demo_wafer.yaml" in acq.plan_label.text()
    ctl.plan.cycles = 1                                    # one cycle keeps the test short
    ctl.plan.output.writers = ["ome_tiff"]
    steps = []
    ctl.step_changed.connect(steps.append)
    acq.out_dir.setText(str(tmp_path / "demo"))
    assert acq.start()
    res = finish(qtbot, win, timeout=120000)
    assert res.status == "success", res.reason
    kinds = {s.split()[0].rstrip(",") for s in steps}
    assert {"autofocus", "irradiating", "milling", "acquiring"} <= kinds
    assert "irradiation_dose" in acq.incidents.causes()
    assert acq.incidents.table.rowCount() == len(acq.incidents.incidents)


def _runqueue_ms():
    """Time this thread waited for a CPU while runnable (Linux schedstat), or
    None: on a shared machine that wait is the scheduler's, not the GUI's."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/schedstat") as f:
            return int(f.read().split()[1]) / 1e6
    except (OSError, IndexError, ValueError):
        return None


def _thread_stacks(dump: str, ident: int) -> str:
    """The blocks of a faulthandler dump that belong to one thread."""
    blocks = dump.split("\n\n")
    mine = "\n".join(b for b in blocks if f"{ident:#018x}" in b)[:1500]
    others = sorted({b.splitlines()[1].strip() for b in blocks if len(b.splitlines()) > 1})
    return mine + "\nother threads' innermost frames:\n" + "\n".join(others[:60])


def test_event_loop_never_blocked_during_acquisition(win, qtbot, tmp_path):
    """A 10 ms timer during a run (1024 x 768 tiles, OME-TIFF written, map and
    live view updating) is never more than 100 ms late, less the time the OS had
    no CPU for the GUI thread; its lateness stays below 20 ms in 95 % of the gaps
    and the GUI's own work per gap below 50 ms. The run follows the demo test,
    so the simulator generates new procedural specimen slices in the engine
    thread: a per-vesicle loop of small numpy calls there once starved the GUI
    of the GIL for 100-300 ms. A stall over 90 ms prints the GUI thread's stack
    and every other thread's innermost frame (faulthandler)."""
    small_plan(win, rows=2, cols=2, frame=(1024, 768), cycles=1)
    win.docks["Live view"].raise_()
    late, busy, starved = [], [], []
    last = [time.perf_counter(), time.thread_time(), _runqueue_ms()]

    stalls = tmp_path / "stalls.txt"
    dump = open(stalls, "w")

    def tick():
        faulthandler.dump_traceback_later(0.09, file=dump)    # re-armed every tick: fires only on a stall
        now, cpu, rq = time.perf_counter(), time.thread_time(), _runqueue_ms()
        late.append((now - last[0]) * 1e3 - 10.0)
        busy.append((cpu - last[1]) * 1e3)              # GUI-thread CPU time in the gap: our own work
        starved.append(0.0 if rq is None else rq - last[2])
        last[:] = [now, cpu, rq]
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(tick)
    win.acquisition.out_dir.setText(str(tmp_path / "run"))
    assert win.acquisition.start()
    last[:] = [time.perf_counter(), time.thread_time(), _runqueue_ms()]
    timer.start()
    try:
        res = finish(qtbot, win)
    finally:
        timer.stop()
        faulthandler.cancel_dump_traceback_later()
        dump.close()
    assert res.status == "success" and res.tiles >= 12
    late, busy, starved = np.array(late[1:]), np.array(busy[1:]), np.array(starved[1:])
    blocked = late - starved
    print(f"event loop over {len(late)} ticks: lateness median {np.median(late):.1f} ms, max {late.max():.1f} ms; "
          f"less CPU starvation max {blocked.max():.1f} ms; GUI work per gap max {busy.max():.1f} ms")
    if blocked.max() > 90:
        print("GUI thread at stalls:\n" + _thread_stacks(stalls.read_text(), threading.main_thread().ident))
    assert len(late) > 20
    assert busy.max() < 50.0
    assert np.percentile(blocked, 95) < 20.0
    assert blocked.max() < 100.0
