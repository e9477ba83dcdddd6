"""Autofocus panel: MAPFoSt 'run now' on the simulator converges, the plot
follows each iteration, the microscope ends nearer focus; unavailable
methods are shown disabled with the reason; no 'run now' during a run."""
from devices.interfaces import StagePosition


def _aberrated_at_first_section(win):
    """The SEM over section 0, defocused by 6 µm and astigmatic: (sem, aberration)."""
    setup = win.session.setup
    sec = setup.world.wafer.sections[0]
    setup.stage.move_to(StagePosition(x=sec.center_m[0], y=sec.center_m[1]))
    sem = setup.sem
    sem.set_working_distance(sem.working_distance() + 6e-6)
    sem.set_stig(1.0, -0.8)
    return sem, sem.inner.aberration()


def _assert_much_nearer_focus(sem, before):
    after = sem.inner.aberration()
    assert abs(after.dz_m) < 0.3 * abs(before.dz_m)
    assert abs(after.stig_x) < 0.3 * abs(before.stig_x) and abs(after.stig_y) < 0.3 * abs(before.stig_y)


def test_mapfost_run_now_converges_and_plots(win, qtbot):
    sem, before = _aberrated_at_first_section(win)
    scan = (sem.pixel_size(), tuple(sem.frame_size()), sem.dwell_time())
    p = win.autofocus
    p.method.setCurrentText("mapfost")
    p.iterations.setValue(4)
    iterations = []
    p._iter.record.connect(iterations.append)
    done = []
    p.finished.connect(done.append)
    assert p.run_now()
    assert not p.run_button.isEnabled()                                # one autofocus at a time
    qtbot.waitUntil(lambda: bool(done), timeout=60000)
    res = done[0]
    assert res["ok"], res["message"]
    _assert_much_nearer_focus(sem, before)
    assert iterations and iterations[0]["iteration"] == 1             # reported live, one by one
    xs, ys = p.wd_curve.getData()
    assert len(xs) == len(res["iterations"]) + 1                      # start + every iteration
    assert res["status"] in p.result.text() and "→" in p.result.text()
    qtbot.waitUntil(p.run_button.isEnabled, timeout=5000)      # the task's end arrives just after its result
    assert (sem.pixel_size(), tuple(sem.frame_size()), sem.dwell_time()) == scan   # scan settings restored


def test_unavailable_methods_are_disabled_with_the_reason(win):
    model = win.autofocus.method.model()
    items = {model.item(r).text(): model.item(r) for r in range(model.rowCount())}
    assert items["mapfost"].isEnabled() and items["sweep"].isEnabled()
    for name, item in items.items():
        if not item.isEnabled():
            assert item.toolTip(), name


def test_no_run_now_while_an_acquisition_runs(win):
    s = win.session
    s.set_run_active(True)
    try:
        assert not win.autofocus.run_button.isEnabled()
        assert not win.autofocus.run_now()
    finally:
        s.set_run_active(False)
    assert win.autofocus.run_button.isEnabled()


def test_deepfocus_run_now_at_the_panels_defaults(win, qtbot):
    """The shipped DeepFocus works at 20 nm; the panel's default frame and
    pixel size give it enough field to focus."""
    sem, before = _aberrated_at_first_section(win)
    p = win.autofocus
    p.method.setCurrentText("deepfocus")
    assert p.method.currentText() == "deepfocus"
    done = []
    p.finished.connect(done.append)
    assert p.run_now()
    qtbot.waitUntil(lambda: bool(done), timeout=60000)
    res = done[0]
    assert res["ok"], res["message"]
    _assert_much_nearer_focus(sem, before)
