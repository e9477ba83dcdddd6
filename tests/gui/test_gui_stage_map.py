"""Stage map: edit grids and sections by mouse with undo/redo, zoom about
the cursor, level of detail (tiles only when zoomed in), tile colours."""
import math

import numpy as np
import pytest
from PyQt5.QtCore import QEvent, QPoint, QPointF, Qt
from PyQt5.QtGui import QMouseEvent, QWheelEvent
from PyQt5.QtWidgets import QApplication

from gui import wafer_commands as cmd
from gui.stage_map import StageMap
from common.geometry import Section
from gui.wafer_model import ACQUIRED, FAILED, GridSpec, WaferLayout


def send(widget, kind, pos, button=Qt.LeftButton):
    buttons = Qt.NoButton if kind == QEvent.MouseButtonRelease else button
    ev = QMouseEvent(kind, QPointF(pos), button if kind != QEvent.MouseMove else Qt.NoButton, buttons, Qt.NoModifier)
    QApplication.sendEvent(widget, ev)


def drag(widget, a, b, steps=4):
    send(widget, QEvent.MouseButtonPress, a)
    for i in range(1, steps + 1):
        send(widget, QEvent.MouseMove, a + (b - a) * (i / steps))
    send(widget, QEvent.MouseButtonRelease, b)


@pytest.fixture
def smap(qtbot):
    lay = WaferLayout()
    cmd.add_section(lay, (0.0, 0.0), (500.0, 250.0), 0.0)
    lay.undo.clear()
    m = StageMap(lay)
    m.renderer.wafer_radius_um = 5000
    m.resize(800, 600)
    qtbot.addWidget(m)
    m.show()
    m.zoom_to_rect(-400, -300, 400, 300, animate=False)
    return m


def screen(m, x, y) -> QPointF:
    return m.view().to_screen(x, y)


def add_grid(m, rows=2, cols=2):
    spec = GridSpec(0, 0, (0.0, 0.0), 0.0, rows, cols, pixel_size_nm=50.0, frame_size=(1024, 768), overlap_px=0)
    cmd.add_grid(m.layout_model, spec)
    return spec.key


def test_drag_moves_a_grid_and_undo_redo(smap, qtbot):
    lay = smap.layout_model
    key = add_grid(smap)
    drag(smap, screen(smap, 0, 0), screen(smap, 100, 50))
    assert lay.selection == ("grid", key)
    cx, cy = lay.grids[key].center_um
    assert cx == pytest.approx(100, abs=1) and cy == pytest.approx(50, abs=1)
    assert lay.undo.count() == 2 and lay.undo.undoText().startswith("move grid")
    lay.undo.undo()
    assert lay.grids[key].center_um == (0.0, 0.0)
    lay.undo.redo()
    assert lay.grids[key].center_um[0] == pytest.approx(100, abs=1)


def test_resize_handle_adds_whole_tiles(smap, qtbot):
    lay = smap.layout_model
    key = add_grid(smap)
    lay.select(("grid", key))
    g = lay.grids[key]
    (w, h), (sx, sy) = g.extent_um(), g.step_um()
    corner = screen(smap, w / 2, h / 2)
    drag(smap, corner, screen(smap, w / 2 + 2 * sx, h / 2 + sy))
    g2 = lay.grids[key]
    assert (g2.cols, g2.rows) == (4, 3)
    fixed = g.outline_um()[0]                     # the opposite corner stays put
    assert np.allclose(g2.outline_um()[0], fixed, atol=1e-6)
    lay.undo.undo()
    assert (lay.grids[key].cols, lay.grids[key].rows) == (2, 2)


def test_rotate_handle_turns_a_section(smap, qtbot):
    lay = smap.layout_model
    lay.select(("section", 0))
    _, rotate, _ = smap._handles(smap.view())
    c = screen(smap, 0, 0)
    r = math.hypot(rotate.x() - c.x(), rotate.y() - c.y())
    target = QPointF(c.x() + r, c.y())            # handle from 12 o'clock to 3 o'clock: +90°
    drag(smap, rotate, target)
    assert lay.sections[0].angle_deg == pytest.approx(90, abs=0.5)
    lay.undo.undo()
    assert lay.sections[0].angle_deg == 0.0


def test_add_delete_grid_and_section_with_undo(smap, qtbot):
    lay = smap.layout_model
    smap.mode = "add_grid"
    qtbot.mouseClick(smap, Qt.LeftButton, pos=screen(smap, 50, 20).toPoint())
    assert (0, 0) in lay.grids and lay.selection == ("grid", (0, 0))
    smap.mode = "add_grid"
    qtbot.mouseClick(smap, Qt.LeftButton, pos=screen(smap, 2000, 2000).toPoint())   # outside any section
    assert len(lay.grids) == 1
    smap.setFocus()
    qtbot.keyClick(smap, Qt.Key_Delete)
    assert (0, 0) not in lay.grids
    lay.undo.undo()
    assert (0, 0) in lay.grids
    lay.select(("section", 0))
    assert smap.delete_selected()
    assert not lay.sections and not lay.grids        # a section takes its grids with it
    lay.undo.undo()
    assert 0 in lay.sections and (0, 0) in lay.grids
    smap.mode = "add_section"
    qtbot.mouseClick(smap, Qt.LeftButton, pos=screen(smap, -300, 200).toPoint())
    assert set(lay.sections) == {0, 1}


def test_locked_layout_is_not_edited(smap, qtbot):
    lay = smap.layout_model
    key = add_grid(smap)
    lay.editable = False
    drag(smap, screen(smap, 0, 0), screen(smap, 100, 50))
    assert lay.grids[key].center_um == (0.0, 0.0)
    assert not smap.delete_selected() or key in lay.grids


def test_wheel_zooms_about_the_cursor(smap, qtbot):
    pos = QPointF(600, 150)
    before = smap.view().to_world(pos.x(), pos.y())
    s0 = smap.view().scale
    ev = QWheelEvent(pos, smap.mapToGlobal(pos.toPoint()), QPoint(), QPoint(0, 240), Qt.NoButton, Qt.NoModifier,
                     Qt.NoScrollPhase, False)
    QApplication.sendEvent(smap, ev)
    qtbot.waitUntil(lambda: smap._anim.state() == smap._anim.Stopped, timeout=2000)
    assert smap.view().scale == pytest.approx(2 * s0, rel=1e-6)
    after = smap.view().to_world(pos.x(), pos.y())
    assert after == pytest.approx(before, abs=1e-6)


def test_level_of_detail_and_tile_states(qtbot):
    from benchmarks.viewport import synthetic_layout
    lay = WaferLayout()
    synthetic_layout(lay, 500)
    m = StageMap(lay)
    m.renderer.wafer_radius_um = 12700
    m.resize(1000, 800)
    qtbot.addWidget(m)
    m.fit_wafer(animate=False)
    m.grab()
    assert m.last_stats["grids"] == 500 and m.last_stats["tiles"] == 0       # zoomed out: no single tiles
    key = next(iter(lay.grids))
    m.zoom_to_tile(key, 12, animate=False)
    m.grab()
    assert 0 < m.last_stats["tiles"] <= 4 * 25 and m.last_stats["sections"] < 10
    lay.tile_state[key][:] = ACQUIRED
    lay.set_tile_state(key, 3, FAILED)
    states = {s for s, _ in m.renderer._tiles_of(key)}
    assert states == {ACQUIRED, FAILED}
    assert m.renderer._grid_code(key) == FAILED          # a failed tile colours its whole grid when zoomed out


def test_section_items_keep_outline_when_edited():
    poly = np.array([[-10, -5], [10, -5], [10, 5], [-10, 5]], float)
    s = Section(3, (0.0, 0.0), (20.0, 10.0), 0.0, poly)
    r = s.rotated(90).moved(5, 0)
    assert np.allclose(r.polygon_um, [[10, -10], [10, 10], [0, 10], [0, -10]])
    big = s.resized((40.0, 10.0), (10.0, 0.0))
    assert np.allclose(big.polygon_um[:, 0].min(), -10) and np.allclose(big.polygon_um[:, 0].max(), 30)


def test_split_and_merge_keep_the_tiles(smap):
    lay = smap.layout_model
    key = add_grid(smap, rows=4, cols=3)
    lay.select(("grid", key))
    before = np.sort(lay.grids[key].tile_centres_um().round(6), axis=0)
    assert smap.split_selected("rows")
    assert set(lay.grids) == {(0, 0), (0, 1)} and [lay.grids[k].rows for k in sorted(lay.grids)] == [2, 2]
    after = np.sort(np.vstack([g.tile_centres_um() for g in lay.grids.values()]).round(6), axis=0)
    assert np.allclose(before, after)
    lay.select(("grid", (0, 0)))
    assert smap.merge_with_selected((0, 1))
    assert list(lay.grids) == [(0, 0)] and (lay.grids[key].rows, lay.grids[key].cols) == (4, 3)
    lay.undo.undo()
    lay.undo.undo()
    assert list(lay.grids) == [key] and lay.grids[key].rows == 4


def test_autofocus_pins_and_forbidden_areas_from_the_context_menu_reach_the_plan(smap, qtbot):
    """Right-click in a grid: pin autofocus there, forbid it elsewhere; the
    marks go into the plan the GUI builds (autofocus.pinned/.forbidden), and
    clearing removes them."""
    from PyQt5.QtWidgets import QMenu
    from gui.plan_builder import PlanOptions, build_plan, plan_dict
    from tests.support.gui import SIM_CONFIG
    lay = smap.layout_model
    add_grid(smap)

    def menu_action(x, y, text):
        smap._context_menu(screen(smap, x, y).toPoint())
        menu = smap.findChildren(QMenu)[-1]
        act = next(a for a in menu.actions() if a.text().startswith(text))
        assert act.isEnabled(), act.text()
        act.trigger()
        menu.close()
        menu.deleteLater()

    menu_action(10, -5, "Pin autofocus here (section 0)")
    menu_action(-20, 10, "Forbid autofocus within")
    assert lay.af_pinned[0][0] == pytest.approx((10, -5), abs=0.5)
    data = plan_dict(lay, SIM_CONFIG, PlanOptions(autofocus="sweep"))
    plan = build_plan(data)
    assert plan.autofocus.pinned[0][0] == pytest.approx((10, -5), abs=0.5)
    (fx, fy, r), = plan.autofocus.forbidden
    assert (fx, fy) == pytest.approx((-20, 10), abs=0.5) and r > 0
    smap.grab()                                      # the marks paint without error
    menu_action(10, -5, "Clear autofocus marks here")
    assert not lay.af_pinned and "pinned" not in plan_dict(lay, SIM_CONFIG, PlanOptions())["autofocus"]
