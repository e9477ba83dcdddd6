"""Operator GUI on the simulator: every device visible, setpoints checked
against the safety windows with a visible reason, stage moves (panel and
click-to-move on the map), connect/disconnect."""
import math

import pytest
from PyQt5.QtCore import QPoint, Qt
from PyQt5.QtWidgets import QPushButton
from tests.support.gui import wait_for


pytest.importorskip("pytestqt")


@pytest.fixture(scope="module")
def win(win, qapp):
    """conftest's window, with every device polled once."""
    win.session.poll()
    wait_for(qapp, lambda: {"sem", "stage", "ion_gun"} <= set(win.session.last))
    return win


def click(qtbot, button):
    assert button.isEnabled(), button.text()
    qtbot.mouseClick(button, Qt.LeftButton)


def test_every_device_is_listed_with_its_state(win, qtbot):
    from common.roles import ROLES
    from gui.session import READERS, Session
    assert set(win.devices.rows) == set(ROLES) == set(READERS)
    assert set(Session.RUN_ROLES) < set(ROLES)              # the roles polled during a run: a subset
    qtbot.waitUntil(lambda: all(win.devices.leds[r].state is True for r in ("sem", "stage", "ion_gun")), timeout=5000)
    assert "kV" in win.sem_panel.rb_eht.text()
    assert "mm" in win.stage_panel.readback["x"].text()
    assert win.ion_panel.rb_blank.text() == "blanked"
    assert set(win.ion_panel.interlock_leds) == {"vacuum", "gas", "door"}


def test_out_of_window_wd_is_refused_with_a_visible_reason(win, qtbot):
    sem = win.session.setup.sem
    before = sem.working_distance()
    win.sem_panel.wd.setValue(20.0)                     # safety.wd_mm is [3, 8]
    click(qtbot, win.sem_panel.findChild(QPushButton, "set_working"))
    notice = win.sem_panel.notice
    assert notice.isVisible() and notice.level == "warning"
    assert "working_distance" in notice.text() and "[3, 8] mm" in notice.text()
    assert "refused" in win.status_text.text()
    qtbot.wait(50)
    assert sem.working_distance() == before             # nothing was sent


def test_in_window_wd_and_stig_are_set(win, qtbot):
    sem = win.session.setup.sem
    win.sem_panel.wd.setValue(5.25)
    win.sem_panel.set_wd()
    qtbot.waitUntil(lambda: math.isclose(sem.working_distance(), 5.25e-3), timeout=3000)
    qtbot.waitUntil(lambda: win.sem_panel.rb_wd.text() == "5.2500 mm", timeout=3000)
    win.sem_panel.stig_x.setValue(0.5)
    win.sem_panel.stig_y.setValue(-0.25)
    win.sem_panel.set_stig()
    qtbot.waitUntil(lambda: tuple(sem.stig()) == (0.5, -0.25), timeout=3000)
    win.sem_panel.stig_x.setValue(12.0)                  # stig window is [-10, 10]
    win.sem_panel.set_stig()
    assert "stig_x" in win.sem_panel.notice.text()
    assert tuple(sem.stig()) == (0.5, -0.25)


def test_eht_and_probe_current_windows(win, qtbot):
    win.sem_panel.eht.setValue(10.0)                     # eht window [0.5, 5] kV
    assert not win.sem_panel.apply("eht", lambda: None, precheck=lambda: win.session.guard.check_eht(10e3))
    win.sem_panel.set_eht()
    assert "eht" in win.sem_panel.notice.text()
    win.sem_panel.current.setValue(50.0)                 # [0.01, 10] nA
    win.sem_panel.set_current()
    assert "probe_current" in win.sem_panel.notice.text()


def test_stage_moves_and_refuses_outside_travel(win, qtbot):
    stage = win.session.setup.stage
    p = win.stage_panel
    p.targets["x"].setValue(1.0)
    p.targets["y"].setValue(-0.5)
    p.move_to_target()
    qtbot.waitUntil(lambda: abs(stage.position().x - 1e-3) < 2e-6 and abs(stage.position().y + 0.5e-3) < 2e-6,
                    timeout=5000)
    qtbot.waitUntil(lambda: abs(float(p.readback["x"].text().split()[0]) - 1.0) < 0.002, timeout=3000)
    p.targets["x"].setValue(20.0)                        # travel is ±15 mm
    p.move_to_target()
    assert p.notice.isVisible() and "stage.x" in p.notice.text()
    assert abs(stage.position().x - 1e-3) < 2e-6


def test_click_to_move_asks_first(win, qtbot):
    stage = win.session.setup.stage
    m = win.stage_map
    m.fit_wafer(animate=False)
    asked = []
    m.confirm_move = lambda x, y: asked.append((x, y)) or False
    target = m.view().to_screen(-2000.0, 1500.0)
    qtbot.mouseDClick(m, Qt.LeftButton, pos=QPoint(int(target.x()), int(target.y())))
    assert len(asked) == 1
    qtbot.wait(100)
    assert abs(stage.position().x + 2e-3) > 1e-4          # declined: no move
    m.confirm_move = lambda x, y: True
    qtbot.mouseDClick(m, Qt.LeftButton, pos=QPoint(int(target.x()), int(target.y())))
    wx, wy = asked[0]
    qtbot.waitUntil(lambda: abs(stage.position().x - wx * 1e-6) < 2e-6 and abs(stage.position().y - wy * 1e-6) < 2e-6,
                    timeout=5000)
    qtbot.waitUntil(lambda: m.renderer.stage_um is not None and abs(m.renderer.stage_um[0] - wx) < 5, timeout=3000)


def test_ion_gun_refusals(win, qtbot):
    ion = win.ion_panel
    ion.set_blank(False)                                 # the stage is not at the mill position
    assert "mill position" in ion.notice.text()
    ion.energy.setValue(12.0)                            # [0, 10] kV
    ion.set_energy()
    assert "ion energy" in ion.notice.text()
    ion.cluster.setValue(100)                            # [500, 5000]
    ion.set_cluster()
    assert "cluster size" in ion.notice.text()
    ion.energy.setValue(5.0)
    ion.set_energy()
    qtbot.waitUntil(lambda: ion.rb_energy.text() == "5.000 kV", timeout=5000)


def test_raster_and_dose_chain(win, qtbot):
    r = win.raster_panel
    r.x_vpp.setValue(25.0)                               # awg_max_vpp 20
    r.configure()
    assert "x raster amplitude" in r.notice.text()
    r.x_vpp.setValue(2.0)
    r.configure()
    qtbot.waitUntil(lambda: r.rb_x.text() == "2.000 Vpp", timeout=8000)
    d = win.dose_panel
    d.sens.setCurrentIndex(d.sens.findData(1e-8))
    d.set_sensitivity()
    qtbot.waitUntil(lambda: d.rb_sens.text().startswith("1e-08"), timeout=5000)
    win.session.poll(["multimeter"])
    qtbot.waitUntil(lambda: "nA" in d.rb_current.text(), timeout=5000)


def test_disconnect_and_connect_a_device(win, qtbot):
    b = win.devices.buttons["multimeter"]
    click(qtbot, b)
    qtbot.waitUntil(lambda: win.devices.state_of("multimeter") == "disconnected", timeout=5000)
    assert b.text() == "Connect"
    click(qtbot, b)
    qtbot.waitUntil(lambda: b.text() == "Disconnect" and win.devices.leds["multimeter"].state is True, timeout=5000)


def test_grabbed_frame_reaches_the_live_view(win, qtbot):
    shown = win.live.tiles_shown
    win.sem_panel.grab()
    qtbot.waitUntil(lambda: win.live.tiles_shown > shown, timeout=8000)
    assert win.live.tile_pane.image is not None
