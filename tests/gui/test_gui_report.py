"""The acquisition panel's "Open run report" button: it writes the report of
the run in the output folder off the GUI thread and hands it to the browser."""
from pathlib import Path

from PyQt5.QtCore import QUrl

import gui.acquisition_panel as panel_module
from tests.support.gui import small_plan


class FakeDesktop:
    """Stands in for QDesktopServices: records what would open in the browser."""
    opened: list[QUrl] = []

    @classmethod
    def openUrl(cls, url: QUrl) -> bool:
        cls.opened.append(url)
        return True


def test_open_run_report_writes_the_page_and_opens_it(win, qtbot, tmp_path, monkeypatch):
    monkeypatch.setattr(panel_module, "QDesktopServices", FakeDesktop)
    FakeDesktop.opened = []
    acq, ctl = win.acquisition, win.controller
    small_plan(win, rows=1, cols=2, cycles=1)
    out = tmp_path / "run"
    acq.out_dir.setText(str(out))
    assert acq.start()
    qtbot.waitUntil(lambda: ctl.finished() and ctl.state == "idle", timeout=60000)
    tiles = ctl.engine.result.tiles_done
    qtbot.mouseClick(acq.report_button, 1)
    qtbot.waitUntil(lambda: bool(FakeDesktop.opened) and acq.report_button.isEnabled(), timeout=30000)
    page = out / "report" / "report.html"
    assert [Path(u.toLocalFile()) for u in FakeDesktop.opened] == [page]
    text = page.read_text(encoding="utf-8")
    assert "<td>tiles done</td><td>" + str(tiles) + "</td>" in text
    assert acq.report_button.text() == "Open run report" and not acq.notice.isVisible()


def test_open_run_report_without_a_run_says_so(win, qtbot, tmp_path, monkeypatch):
    monkeypatch.setattr(panel_module, "QDesktopServices", FakeDesktop)
    FakeDesktop.opened = []
    acq = win.acquisition
    empty = tmp_path / "nothing"
    empty.mkdir()
    assert acq.open_report(empty) is False
    assert "no journal.jsonl" in acq.notice.text() and not (empty / "report").exists()
    assert FakeDesktop.opened == []
