"""Quitting the GUI during a run: the run stops at once with the beams
blanked (as on SIGTERM), and the devices are closed only after the engine
thread has ended - never under a running step. Own module: it closes the
window the module's fixture made."""
from PyQt5.QtWidgets import QMessageBox
from tests.support.gui import small_plan


def test_quit_while_running_stops_first_and_closes_the_devices_after(win, qtbot, tmp_path, monkeypatch):
    small_plan(win, rows=1, cols=2, cycles=3)
    acq = win.acquisition
    acq.out_dir.setText(str(tmp_path / "run"))
    alive_at_close = []
    real_close = win.session.close_setup

    def close_setup():
        engine = win.controller.engine
        alive_at_close.append(engine.alive if engine is not None else False)
        real_close()
    monkeypatch.setattr(win.session, "close_setup", close_setup)
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.Yes)
    assert acq.start()
    engine = win.controller.engine
    qtbot.waitUntil(lambda: engine.alive and win.controller.progress is not None
                    and win.controller.progress.tiles >= 1, timeout=60000)
    win.close()
    assert alive_at_close == [False]                      # the engine had ended before the devices closed
    res = engine.result
    assert res.status == "aborted" and "quit" in res.reason and "--resume" in res.reason
    assert win.session.setup is None
