"""Wafer workflow on the simulator: overview → sections → review → grids →
order → plan, each step visible in the panel and on the map, undoable."""
import pytest


def test_overview_of_the_map_view(win, qtbot):
    wf, m = win.workflow, win.stage_map
    m.zoom_to_rect(-1500, -1200, 1500, 1200, animate=False)
    wf.ov_region.setCurrentText("map view")
    x0, y0, x1, y1 = m.view().world_box()
    wf.acquire_overview()
    assert wf.busy and wf.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: not wf.busy, timeout=30000)
    ov = win.layout_model.overview
    assert ov is not None and ov.pixel_um == 4.0
    assert ov.image.shape[1] == pytest.approx((x1 - x0) / 4.0, abs=2)
    assert ov.image.std() > 5                                     # sections on silicon, not a blank image
    assert "px at 4 µm" in wf.ov_status.text()
    qtbot.waitUntil(lambda: win.live.overview_pane.image is not None, timeout=2000)


def test_cancelling_a_long_overview(win, qtbot):
    wf = win.workflow
    wf.ov_region.setCurrentText("whole wafer")
    wf.ov_pixel.setValue(1.0)                                     # 25 k × 25 k px: long
    wf.acquire_overview()
    wf.cancel()
    qtbot.waitUntil(lambda: not wf.busy, timeout=20000)
    assert "cancel" in wf.job_label.text()
    wf.ov_pixel.setValue(4.0)


def test_detection_is_offered_only_with_a_model(win):
    from gui.wafer_tasks import detector_available
    ok, why = detector_available()
    assert win.workflow.detect_button.isEnabled() == ok
    if not ok:
        assert win.workflow.detect_button.toolTip() == why and why


def test_sections_grids_order_and_plan(win, qtbot):
    wf, lay = win.workflow, win.layout_model
    wf.sections_from_truth()
    n = len(win.session.setup.world.wafer.sections)
    assert len(lay.sections) == n and wf.table.table.rowCount() == n
    assert wf.sec_status.text() == f"{n} sections"
    wf.table.table.selectRow(2)                                   # review: the table selects on the map
    assert lay.selection == ("section", wf.table._ids[2])
    wf.tile_pixel.setValue(50.0)
    wf.create_grids()
    assert len(lay.grids) == n
    from common.geometry import rotation
    for s in lay.sections.values():                               # every grid covers its section's outline
        g = lay.grids[(s.id, 0)]
        w, h = g.extent_um()
        local = (s.polygon_um - g.center_um) @ rotation(g.rotation_deg)
        assert (abs(local[:, 0]) <= w / 2 + 1e-6).all() and (abs(local[:, 1]) <= h / 2 + 1e-6).all()
    assert f"{n} grids" in wf.grid_status.text()
    lay.order[:] = lay.order[::-1]                                # a poor order to start from
    lay.order.insert(0, lay.order.pop(2))
    before = lay.path_length_um()
    wf.optimise_order()
    qtbot.waitUntil(lambda: "→" in wf.order_status.text(), timeout=20000)
    assert lay.path_length_um() <= before + 1e-6
    undo_text = lay.undo.undoText()
    assert undo_text == "optimise imaging order"
    received = []
    wf.plan_ready.connect(lambda plan, data: received.append((plan, data)))
    wf.cycles.setValue(2)
    wf.build_plan()
    assert received, wf.notice.text()
    plan, data = received[0]
    assert [s.id for s in plan.sections] == lay.order and plan.n_cycles() == 2
    assert "sections" in win.acquisition.plan_label.text() and win.acquisition.start_button.isEnabled()


def test_edit_a_grid_and_undo(win, qtbot):
    from dataclasses import replace

    from gui import wafer_commands as cmd
    lay = win.layout_model
    key = next(iter(lay.grids))
    g = lay.grids[key]
    cmd.push(lay, "move grid", grids={key: replace(g, center_um=(g.center_um[0] + 30, g.center_um[1]))})
    assert lay.grids[key].center_um[0] == pytest.approx(g.center_um[0] + 30)
    win.map_panel.undo_action.trigger()
    assert lay.grids[key] == g
    win.map_panel.redo_action.trigger()
    assert lay.grids[key].center_um[0] == pytest.approx(g.center_um[0] + 30)
    lay.undo.undo()


def test_a_plan_outside_the_travel_is_refused(win):
    from dataclasses import replace

    from gui import wafer_commands as cmd
    lay = win.layout_model
    key = next(iter(lay.grids))
    cmd.push(lay, "move far", grids={key: replace(lay.grids[key], center_um=(20000.0, 0.0))})
    got = []
    win.workflow.plan_ready.connect(lambda p, d: got.append(p))
    win.workflow.build_plan()
    assert not got and "outside the setup's safety window" in win.workflow.notice.text()
    lay.undo.undo()


def test_load_an_overview_mosaic(win, tmp_path):
    import numpy as np
    from common.geometry import OverviewImage
    from wafer.mosaic import save_overview
    wf = win.workflow
    img = np.zeros((300, 400), np.uint8)
    img[100:150, 200:300] = 200
    path = save_overview(tmp_path / "ov.ome.tif", OverviewImage(img, (-800.0, -600.0), 4.0))
    wf.load_overview(str(path))
    ov = win.layout_model.overview
    assert ov.pixel_um == 4.0 and ov.origin_um == (-800.0, -600.0)
    assert np.array_equal(ov.image, img)
    assert "px at 4 µm" in wf.ov_status.text()
    wf.load_overview(str(tmp_path / "missing.ome.tif"))
    assert win.layout_model.overview is ov                       # a bad file changes nothing


def test_detect_with_a_chosen_section_model(win, qtbot, tmp_path, monkeypatch):
    """'Model …' picks other weights (e.g. from `wafer train`); a missing file disables
    detection and says why; an empty choice goes back to the shipped model."""
    import shutil

    import numpy as np
    from common.geometry import OverviewImage
    from wafer import detect
    wf = win.workflow
    missing = tmp_path / "gone.pt"
    wf.choose_section_model(missing)
    assert not wf.detect_button.isEnabled() and str(missing) in wf.detect_button.toolTip()
    assert wf.det_model_label.text() == "model: gone.pt"
    lab = tmp_path / "lab.pt"
    shutil.copy(detect.DEFAULT_MODEL, lab)
    wf.choose_section_model(lab)
    assert wf.detect_button.isEnabled()
    win.layout_model.set_overview(OverviewImage(np.zeros((256, 256), np.uint8), (0.0, 0.0), 4.0))
    used, orig = [], detect.load_model
    monkeypatch.setattr(detect, "load_model", lambda p=None: used.append(p) or orig(p))
    wf.detect()
    qtbot.waitUntil(lambda: not wf.busy, timeout=30000)
    assert used == [lab] and "sections detected" in wf.job_label.text()
    wf.choose_section_model("")
    assert wf.section_model_path is None and wf.det_model_label.text() == "model: shipped"
