"""`wafer annotate`: napari shapes -> sparse training labels, files, CLI (headless)."""
import json

import cv2
import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from wafer import annotate as ann
from wafer.detect_data import IGNORE

H, W = 60, 100          # non-square: a row/col swap moves or clips the shapes


def _napari_layers():
    """napari-style data, vertices as (row, col)."""
    rect = np.array([[10, 20], [10, 60], [20, 60], [20, 20]], float)        # rows 10-20, cols 20-60
    tri = np.array([[30, 5], [30, 15], [50, 5]], float)                     # right angle at top-left
    bg = np.array([[40, 70], [40, 95], [55, 95], [55, 70]], float)
    tissue = ann.polygons_from_shapes([rect, tri], ["rectangle", "polygon"])
    background = ann.polygons_from_shapes([bg], "polygon")
    return tissue, background


def test_shapes_to_labels_axis_order_ring_and_ignore():
    tissue, background = _napari_layers()
    assert np.allclose(tissue[0][0], [20, 10])               # (x=col, y=row)
    lab = ann.annotation_labels((H, W), tissue, background)
    assert lab.shape == (H, W) and lab.dtype == np.uint8
    assert set(np.unique(lab)) == {0, 1, IGNORE}
    assert (lab[12:19, 22:59] == 1).all()                    # inside the rectangle
    assert lab[15, 50] == 1 and lab[50, 15] != 1             # swapped axes would give the opposite
    assert lab[33, 7] == 1 and lab[47, 13] != 1              # triangle: asymmetric, hypotenuse side
    assert (lab[43:53, 73:93] == 0).all()                    # drawn background
    assert lab[5, 40] == 0 and lab[15, 15] == 0 and lab[25, 40] == 0    # dilated ring around tissue
    assert lab[15, 75] == IGNORE and lab[2, 2] == IGNORE and lab[58, 40] == IGNORE   # far: ignore
    # the same numbers as the training-data rule, no duplicated logic
    from wafer.detect_data import labels_from_polygons
    assert np.array_equal(lab, labels_from_polygons((H, W), tissue, background))


def test_shape_types_ellipse_and_skipped():
    box = np.array([[10, 20], [10, 60], [30, 60], [30, 20]], float)          # rows 10-30, cols 20-60
    path = np.array([[0, 0], [5, 5], [9, 0]], float)
    polys = ann.polygons_from_shapes([box, path, box[:2]], ["ellipse", "path", "polygon"])
    assert len(polys) == 1
    e = polys[0]
    assert len(e) == ann.ELLIPSE_POINTS
    assert np.allclose(e.mean(0), [40, 20], atol=1e-6)
    assert np.allclose(e.min(0), [20, 10], atol=0.1) and np.allclose(e.max(0), [60, 30], atol=0.1)
    lab = ann.annotation_labels((H, W), polys, dilation=0)
    assert lab[20, 40] == 1 and lab[11, 21] == IGNORE          # centre in, box corner out
    with pytest.raises(ValueError):
        ann.polygons_from_shapes([box], ["polygon", "polygon"])
    # 3-D shapes data (a z axis in front): the last two axes are used
    z = np.c_[np.zeros(4), box]
    assert np.allclose(ann.polygons_from_shapes([z], ["polygon"])[0], box[:, ::-1])


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_save_labels_roundtrip_and_refuses_overwrite(tmp_path, suffix):
    tissue, background = _napari_layers()
    lab = ann.annotation_labels((H, W), tissue, background)
    out = tmp_path / f"ov.labels{suffix}"
    assert ann.save_labels(out, lab) == out
    back = cv2.imread(str(out), cv2.IMREAD_UNCHANGED) if suffix == ".png" else tifffile.imread(out)
    assert back.dtype == np.uint8 and np.array_equal(back, lab)
    before = out.read_bytes()
    with pytest.raises(FileExistsError):
        ann.save_labels(out, np.zeros((H, W), np.uint8))
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [out.name]          # no temp file left
    with pytest.raises(ValueError):
        ann.save_labels(tmp_path / "x.jpg", lab)


def test_save_annotation_polygons_json_roundtrip(tmp_path):
    tissue, background = _napari_layers()
    out = tmp_path / "ov.labels.png"
    lab_path, poly_path = ann.save_annotation(out, (H, W), tissue, background)
    assert poly_path == tmp_path / "ov.labels.polygons.json"
    doc = json.loads(poly_path.read_text())
    assert doc["tissue"][0][0] == [20.0, 10.0] and doc["image_shape"] == [H, W]
    t2, b2 = ann.load_polygons(poly_path)
    assert len(t2) == 2 and len(b2) == 1
    assert all(np.array_equal(a, b) for a, b in zip(t2 + b2, tissue + background))
    assert np.array_equal(ann.annotation_labels((H, W), t2, b2), cv2.imread(str(lab_path), cv2.IMREAD_UNCHANGED))
    # napari (row, col) again for reopening
    assert np.array_equal(ann.shapes_from_polygons(t2)[0], [[10, 20], [10, 60], [20, 60], [20, 20]])
    # never overwrites; the next free name is explicit
    with pytest.raises(FileExistsError):
        ann.save_annotation(out, (H, W), tissue, background)
    assert ann.next_free_path(out) == tmp_path / "ov.labels-2.png"
    lab_path.unlink()                          # only the JSON left: still refused, nothing written
    with pytest.raises(FileExistsError):
        ann.save_annotation(out, (H, W), tissue, background)
    assert not out.exists()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"tissue": [[1, 2, 3]]}))
    with pytest.raises(ValueError, match="bad.json"):
        ann.load_polygons(bad)


@pytest.fixture(scope="module")
def main_app():
    from main import app
    return app


def test_cli_missing_overview(tmp_path, main_app):
    missing = tmp_path / "no_such_overview.png"
    r = CliRunner().invoke(main_app, ["wafer", "annotate", str(missing)])
    assert r.exit_code == 2, r.output
    assert "no_such_overview.png" in r.output and "cannot read overview" in r.output


def test_cli_unreadable_existing_and_bad_options(tmp_path, main_app):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    r = CliRunner().invoke(main_app, ["wafer", "annotate", str(junk)])
    assert r.exit_code == 2 and "junk.png" in r.output
    ov = tmp_path / "ov.png"
    cv2.imwrite(str(ov), np.zeros((H, W), np.uint8))
    r = CliRunner().invoke(main_app, ["wafer", "annotate", str(ov), "--out", str(tmp_path / "l.jpg")])
    assert r.exit_code == 2 and "--out" in r.output and ".png" in r.output
    (tmp_path / "ov.labels.png").write_bytes(b"x")
    r = CliRunner().invoke(main_app, ["wafer", "annotate", str(ov)])
    assert r.exit_code == 2 and "refusing to overwrite" in r.output and "ov.labels-2.png" in r.output
    assert (tmp_path / "ov.labels.png").read_bytes() == b"x"
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    r = CliRunner().invoke(main_app, ["wafer", "annotate", str(ov), "--out", str(tmp_path / "o.tif"),
                                      "--polygons", str(bad)])
    assert r.exit_code == 2 and "--polygons" in r.output


def test_cli_prints_written(tmp_path, main_app, monkeypatch):
    ov = tmp_path / "ov.png"
    cv2.imwrite(str(ov), np.zeros((H, W), np.uint8))
    seen = {}

    def fake(overview, out, polygons, image=None):
        seen.update(overview=overview, out=out, shape=image.shape)
        return list(ann.save_annotation(out, image.shape, *_napari_layers()))

    monkeypatch.setattr(ann, "open_annotator", fake)
    r = CliRunner().invoke(main_app, ["wafer", "annotate", str(ov)])
    assert r.exit_code == 0, r.output
    assert seen == {"overview": ov, "out": tmp_path / "ov.labels.png", "shape": (H, W)}
    assert f"written  {tmp_path / 'ov.labels.png'}" in r.output and "ov.labels.polygons.json" in r.output


def _check_session(tmp_path):
    """Reopen polygons, draw, Shift-S, draw, "Save labels", edit, close: files as expected."""
    ov = tmp_path / "ov.png"
    cv2.imwrite(str(ov), np.zeros((H, W), np.uint8))
    tissue, background = _napari_layers()
    prev = tmp_path / "prev.polygons.json"
    ann.save_polygons(prev, tissue[:1], background)
    out = tmp_path / "ov.labels.png"
    s = ann.open_annotator(ov, out, prev, run=False, show=False)
    try:
        t_layer, b_layer = s.viewer.layers["tissue"], s.viewer.layers["background"]
        assert len(t_layer.data) == 1 and len(b_layer.data) == 1 and not s.dirty
        assert np.allclose(t_layer.data[0], [[10, 20], [10, 60], [20, 60], [20, 20]])   # (row, col)
        assert not out.exists()                                  # reopening writes nothing
        t_layer.add(np.array([[30, 5], [30, 15], [50, 5]], float), shape_type="polygon")
        assert s.dirty
        from napari.utils.key_bindings import KeyBinding
        s.viewer.keymap[KeyBinding.from_str("Shift-S")](s.viewer)     # Shift-S
        assert out.exists() and ann.polygons_path(out).exists() and not s.dirty
        assert np.array_equal(cv2.imread(str(out), cv2.IMREAD_UNCHANGED),
                              ann.annotation_labels((H, W), tissue, background))
        from qtpy.QtCore import QCoreApplication, QEvent
        from qtpy.QtWidgets import QLabel
        assert any("ov.labels.png" in w.text() for w in s.panel.findChildren(QLabel))     # status shown
        b_layer.add(np.array([[2, 80], [2, 95], [8, 95], [8, 80]], float), shape_type="ellipse")
        s.button.click()                                         # "Save labels": the next free name
        assert s.written[2:] == [tmp_path / "ov.labels-2.png", tmp_path / "ov.labels-2.polygons.json"]
        assert any("ov.labels-2.png" in w.text() for w in s.panel.findChildren(QLabel))
        assert len(ann.load_polygons(s.written[3])[1][-1]) == ann.ELLIPSE_POINTS
        t_layer.data = t_layer.data[:1]                          # edit: delete the triangle again
        s.panel.deleteLater()                                    # window closed with unsaved shapes
        QCoreApplication.sendPostedEvents(None, QEvent.DeferredDelete)
        written = s.finish()
        assert written[4:] == [tmp_path / "ov.labels-3.png", tmp_path / "ov.labels-3.polygons.json"]
        assert len(ann.load_polygons(written[5])[0]) == 1
        assert s.finish() == s.written == written                # nothing unsaved: nothing more
    finally:
        s.viewer.close()


def test_annotator_session_on_viewer_model(tmp_path, qapp, monkeypatch):
    """The napari code path without a GL canvas: ViewerModel stands in for the window."""
    napari = pytest.importorskip("napari")
    from napari.components import ViewerModel
    docks = []

    class _Window:
        def add_dock_widget(self, widget, **kw):
            docks.append((widget, kw))

    class FakeViewer(ViewerModel):
        def __init__(self, title="napari", show=True):
            super().__init__(title=title)

        @property
        def window(self):
            return _Window()

        def close(self):
            pass

    monkeypatch.setattr(napari, "Viewer", FakeViewer)
    _check_session(tmp_path)
    assert len(docks) == 1 and docks[0][1]["name"] == "Annotation"
