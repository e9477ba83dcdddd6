"""The dose panel plots an irradiation's dose over time from the documents a
real run publishes (an external-source irradiation on the simulator)."""
import pytest

pytest.importorskip("pytestqt")


def test_dose_panel_plots_the_irradiation_of_a_run(qtbot, tmp_path, monkeypatch):
    import tests.support.engine_runs as er
    from gui.doc_bridge import DocBridge
    from gui.panel_dose import DosePanel
    from gui.session import Session
    from tests.acq.test_external_irradiation import EXTERNAL, add_source

    plain = er.write_setup
    monkeypatch.setattr(er, "write_setup", lambda tmp, **kw: add_source(plain(tmp, sections=1, **kw)))
    engine, setup, _docs = er.make_engine(tmp_path, EXTERNAL, on_pause="stop")
    panel = DosePanel(Session(tmp_path / "setup.yaml"))        # the session stays unconnected: no polling
    qtbot.addWidget(panel)
    bridge = DocBridge()
    panel.follow(bridge)
    bridge.attach(engine)
    try:
        engine.start()
        qtbot.waitUntil(lambda: not engine.alive, timeout=30_000)
        qtbot.waitUntil(lambda: bool(panel.points), timeout=5_000)   # queued signals reach the GUI thread
        res = engine.result
        assert res.status == "success", res.reason
    finally:
        engine.wait(30)
        setup.close()
    times, doses = panel.points[0]
    assert len(times) >= 2 and times == sorted(times) and doses == sorted(doses)
    x, y = panel.curves[0].getData()
    assert list(x) == times and list(y) == doses                       # what is drawn is what arrived
    assert doses[-1] >= 0.5 and panel.target_line.value() == pytest.approx(0.5) and panel.target_line.isVisible()
    # a new run starts a clean plot
    bridge.run_started.emit(None)
    assert not panel.curves and not panel.target_line.isVisible()
