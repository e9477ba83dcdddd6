"""The wafer workflow's "Load MagC …": sections and ROI grids on the stage map,
registered by landmarks, with the residuals shown; one undo step."""
import math

import numpy as np
import pytest

from wafer.magc import Roi, write_magc
from wafer.sections import Section

ROT = math.radians(-1.5)
A = 3.0 * np.array([[math.cos(ROT), -math.sin(ROT)], [math.sin(ROT), math.cos(ROT)]])
T = np.array([-2000.0, -1500.0])
LANDMARKS = {0: (100.0, 100.0), 1: (1200.0, 120.0), 2: (1150.0, 900.0), 3: (90.0, 950.0)}


def _files(tmp_path):
    sections, rois = [], []
    for i in range(6):
        c = (200.0 + 150 * (i % 3), 300.0 + 300 * (i // 3))
        sections.append(Section(10 + i, c, (40.0, 25.0), 20.0 * i))
        r = Section(0, c, (15.0, 10.0), 20.0 * i)
        rois.append(Roi(10 + i, 0, tuple(map(tuple, r.polygon_um)), r.center_um, 20.0 * i, template=0))
    magc = write_magc(tmp_path / "w.magc", sections, rois, [15, 14, 13, 12, 11, 10], LANDMARKS)
    rows = ["id,x_um,y_um"]
    for k, p in LANDMARKS.items():
        x, y = (float(v) for v in A @ np.asarray(p) + T)
        rows.append(f"{k},{x + (12.0 if k == 3 else 0.0)!r},{y!r}")     # landmark 3 measured 12 µm off
    lm = tmp_path / "stage.csv"
    lm.write_text("\n".join(rows) + "\n")
    return magc, lm, sections


def test_load_magc_with_landmarks(win, tmp_path):
    wf, lay = win.workflow, win.layout_model
    magc, lm, sections = _files(tmp_path)
    before = dict(lay.sections)
    depth = lay.undo.count()
    wf.load_magc(str(magc), str(lm))
    assert sorted(lay.sections) == [s.id for s in sections] and lay.order == [15, 14, 13, 12, 11, 10]
    assert sorted(lay.grids) == [(s.id, 0) for s in sections]
    assert wf.sec_status.text() == "6 sections" and "6 grids" in wf.grid_status.text()
    for s in sections:                             # near the affine's place (landmark 3 was off by 12 µm)
        np.testing.assert_allclose(lay.sections[s.id].center_um, A @ s.center_um + T, atol=12.0)
        g = lay.grids[(s.id, 0)]
        assert g.pixel_size_nm == wf.tile_pixel.value() and tuple(g.frame_size) == (wf.frame_w.value(),
                                                                                     wf.frame_h.value())
    text = wf.magc_status.text()
    assert wf.magc_status.isVisible() and "4 landmarks, RMS" in text and "landmark 3: residual" in text
    rms = float(text.split("RMS ")[1].split(" µm")[0])
    assert 1.0 < rms < 12.0
    m = win.stage_map                              # the stage map draws them
    m.zoom_to_rect(-2500, -2000, 2500, 2500, animate=False)
    m.grab()
    assert m.last_stats["sections"] == 6 and m.last_stats["grids"] == 6
    assert lay.undo.count() == depth + 1           # one undo step brings the old layout back
    lay.undo.undo()
    assert lay.sections == before


def test_load_magc_errors_leave_the_layout(win, tmp_path):
    wf, lay = win.workflow, win.layout_model
    magc, _, _ = _files(tmp_path)
    bad = tmp_path / "two.csv"
    bad.write_text("id,x_um,y_um\n0,1,2\n1,5,9\n")
    before = dict(lay.sections)
    wf.load_magc(str(magc), str(bad))
    assert "need at least 3 landmarks" in wf.notice.text() and lay.sections == before
    wf.load_magc(str(magc))                        # no landmark file: file coordinates as stage µm
    assert lay.sections[10].center_um == pytest.approx((200.0, 300.0))
    assert "no landmark file" in wf.magc_status.text()
    lay.undo.undo()
