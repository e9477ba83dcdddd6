"""Our .magc files as SBEMimage reads them, and SBEMimage-style files through our reader.

``sbemimage_read`` below applies the rules of SBEMimage's MagC reader
(src/ArrayData.py, ``read_data_magc``; written here from those rules, not copied):

* configparser with its defaults: '%' interpolation on, keys lower-cased;
* every header containing '.' ends in integer ids (``int()`` of each part);
* headers are matched by prefix: ``section.``/``sections.`` -> a section,
  ``roi.``/``rois.`` -> ROI (second id, else 0) of a section read *before* it,
  ``landmarks.``/``landmark.`` -> a landmark's ``location``;
  ``tsporder``/``stage_order`` (exact names) -> the order, ``[]`` = none;
* polygon = flat x,y list, center = x,y, area = float,
  angle -> ``((angle + 90) % 360) - 180``.
"""
import configparser
import math
import os
from pathlib import Path

import numpy as np
import pytest

from wafer.magc import MagcFormatError, Roi, magc_text, read_magc, write_magc
from wafer.sections import Section


def _floats(text):
    return [float(v) for v in text.split(",")]


def _shape(cp, header):
    out = {}
    for key, val in cp.items(header):           # interpolation happens here, as in SBEMimage
        if key == "polygon":
            out["polygon"] = np.reshape(_floats(val), (-1, 2))
        elif key == "center":
            out["center"] = _floats(val)
        elif key == "area":
            out["area"] = float(val)
        elif key == "angle":
            out["angle"] = ((float(val) + 90) % 360) - 180
    return out


def sbemimage_read(text):
    cp = configparser.ConfigParser()
    cp.read_string(text)
    got = {"sections": {}, "rois": {}, "landmarks": {}, "order": None}
    for header in cp.sections():
        ids = [int(part) for part in header.split(".")[1:]]
        if header.startswith(("section.", "sections.")):
            got["sections"][ids[0]] = _shape(cp, header)
        elif header.startswith(("roi.", "rois.")):
            if ids[0] not in got["sections"]:
                raise KeyError(f"[{header}]: ROI before (or without) its section")
            got["rois"][(ids[0], ids[1] if len(ids) > 1 else 0)] = _shape(cp, header)
        elif header.startswith(("landmarks.", "landmark.")):
            got["landmarks"][ids[0]] = _floats(cp.get(header, "location"))
        elif header in ("tsporder", "stage_order"):
            val = cp.get(header, header)
            got["order"] = [] if val == "[]" else [int(v) for v in val.split(",")]
    return got


def _edge_angle(poly):
    """Direction of a polygon's first edge, degrees."""
    d = np.asarray(poly[1]) - np.asarray(poly[0])
    return math.degrees(math.atan2(d[1], d[0]))


def _same_angle(a, b, tol=1e-6):
    d = (a - b) % 360.0
    return min(d, 360.0 - d) <= tol


def _content(n=12, multi_roi=False, seed=1):
    rng = np.random.default_rng(seed)
    sections, rois = [], []
    for i in range(n):
        sid = int(5 * i + 2)
        c = tuple(rng.uniform(500, 4500, 2))
        a = float(rng.uniform(-180, 180))
        sections.append(Section(sid, c, tuple(rng.uniform(50, 70, 2)), a))   # outline = its rectangle
        for r in range(2 if multi_roi and i % 3 == 0 else 1):
            rr = Section(0, (c[0] + 3 * r, c[1]), (12.0, 10.0), a)
            rois.append(Roi(sid, r, tuple(map(tuple, rr.polygon_um)), rr.center_um, a, template=0))
    order = [s.id for s in sections]
    rng.shuffle(order)
    landmarks = {i: tuple(rng.uniform(0, 5000, 2)) for i in range(4)}
    return sections, rois, [int(i) for i in order], landmarks


@pytest.mark.parametrize("dialect,multi", [("sbemimage", False), ("magfinder", True)])
def test_sbemimage_reads_everything_we_export(tmp_path, dialect, multi):
    sections, rois, order, landmarks = _content(multi_roi=multi)
    path = write_magc(tmp_path / "ours.magc", sections, rois, order, landmarks, dialect=dialect)
    got = sbemimage_read(path.read_text())
    assert sorted(got["sections"]) == sorted(s.id for s in sections)
    for s in sections:
        g = got["sections"][s.id]
        np.testing.assert_array_equal(g["polygon"], s.polygon_um)
        assert g["center"] == list(s.center_um)
        assert g["area"] == pytest.approx(s.size_um[0] * s.size_um[1], rel=1e-9)
        # SBEMimage's angle is the negative of ours; ours is where the outline's first edge points
        assert _same_angle(g["angle"], -s.angle_deg)
        assert _same_angle(_edge_angle(g["polygon"]), s.angle_deg)
    assert sorted(got["rois"]) == sorted((r.section_id, r.roi_id) for r in rois)
    for r in rois:
        g = got["rois"][(r.section_id, r.roi_id)]
        np.testing.assert_array_equal(g["polygon"], r.polygon_um)
        assert _same_angle(g["angle"], -r.angle_deg)
    assert {k: tuple(v) for k, v in got["landmarks"].items()} == landmarks
    assert got["order"] == order


def test_the_old_landmark_header_was_invisible_to_sbemimage(tmp_path):
    sections, rois, order, landmarks = _content(n=3)
    old = magc_text(sections, rois, order, landmarks).replace("[landmarks.", "[landmarksEM.")
    assert sbemimage_read(old)["landmarks"] == {}          # why the header changed
    p = tmp_path / "old.magc"
    p.write_text(old)
    assert read_magc(p)[3] == landmarks                    # and we still read such files


def test_what_sbemimage_could_not_read_is_refused():
    sections, rois, order, _ = _content(n=2)
    orphan = Roi(999, 0, ((0, 0), (1, 0), (1, 1)), (0.5, 0.5), 0.0)
    with pytest.raises(MagcFormatError, match=r"rois: section ids without a section: \[999\]"):
        magc_text(sections, rois + [orphan])
    pct = [Roi(r.section_id, r.roi_id, r.polygon_um, r.center_um, r.angle_deg, extra={"note": "50% cut"})
           for r in rois]
    with pytest.raises(MagcFormatError, match=r"\[rois\.0002\]\.note: '%'"):
        magc_text(sections, pct)
    assert "50% cut" in magc_text(sections, pct, dialect="magfinder")   # MagFinder does not interpolate


# ------------------------------------------------------------ a file shaped like SBEMimage's example
def _fmt3(x):
    return repr(round(float(x), 3))


def _rect(c, w, h, a):
    ca, sa = math.cos(math.radians(a)), math.sin(math.radians(a))
    local = np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])
    return local @ np.array([[ca, sa], [-sa, ca]]) + np.asarray(c)


def example_like(n=433, n_landmarks=4, seed=7):
    """Text with the structure of array/example/wafer_example1.magc (blocks, keys,
    3-decimal numbers, integer areas, file angle = 90 - edge direction), and the truth."""
    rng = np.random.default_rng(seed)
    blocks = {"sections": [], "rois": [], "focus": [], "magnets": []}
    truth = []
    for i in range(n):
        c = rng.uniform(1000, 4500, 2)
        a = float(rng.uniform(-180, 180))
        poly = _rect(c, rng.uniform(60, 68), rng.uniform(58, 64), a)
        roi = _rect(c, 12, 10, a)
        file_angle = ((90 - a + 180) % 360) - 180
        flat = lambda p: ",".join(_fmt3(v) for v in np.ravel(p))
        blocks["sections"].append(f"[sections.{i:04d}]\npolygon = {flat(poly)}\ncenter = {flat(c)}\n"
                                  f"area = {int(rng.integers(3900, 4300))}\nangle = {_fmt3(file_angle)}\n"
                                  "compression = 1\n")
        blocks["rois"].append(f"[rois.{i:04d}]\ntemplate = 0\npolygon = {flat(roi)}\ncenter = {flat(c)}\n"
                              f"area = 120\nangle = {_fmt3(file_angle)}\n")
        blocks["focus"].append(f"[focus.{i:04d}]\ntemplate = 0\npolygon = {flat(_rect(c, 30, 20, a + 45))}\n")
        blocks["magnets"].append(f"[magnets.{i:04d}]\ntemplate = 0\nlocation = {flat(c + 20)}\n")
        truth.append((i, a))
    parts = []
    for name, items in blocks.items():
        parts.append(f"[{name}]\nnumber = {n}\n")
        parts += items
    lms = rng.uniform(1000, 4500, (n_landmarks, 2))
    parts.append(f"[landmarks]\nnumber = {n_landmarks}\n")
    parts += [f"[landmarks.{i:04d}]\nlocation = {_fmt3(x)},{_fmt3(y)}\n" for i, (x, y) in enumerate(lms)]
    order = [int(i) for i in rng.permutation(n)]
    parts.append("[serialorder]\nserialorder = []\n")
    parts.append(f"[tsporder]\ntsporder = {','.join(map(str, order))}\n")
    return "\n".join(parts), truth, order


def test_a_file_shaped_like_sbemimages_example_round_trips(tmp_path):
    text, truth, order = example_like()
    src = tmp_path / "example_like.magc"
    src.write_text(text)
    sections, rois, tsporder, landmarks = read_magc(src)
    assert len(sections) == 433 and len(rois) == 433 and len(landmarks) == 4 and tsporder == order
    for s, (sid, a) in zip(sections, truth):
        assert s.id == sid
        assert _same_angle(s.angle_deg, a, tol=2e-3)                  # 3-decimal file angles
        assert _same_angle(_edge_angle(s.polygon_um), s.angle_deg, tol=0.05)
    assert {r.template for r in rois} == {0} and [r.section_id for r in rois] == list(range(433))

    out = write_magc(tmp_path / "again.magc", sections, rois, tsporder, landmarks)
    s2, r2, o2, l2 = read_magc(out)
    assert s2 == sections and r2 == rois and o2 == tsporder and l2 == landmarks

    # what SBEMimage takes from the original and from our copy is the same
    a, b = sbemimage_read(text), sbemimage_read(out.read_text())
    assert sorted(a["sections"]) == sorted(b["sections"]) and sorted(a["rois"]) == sorted(b["rois"])
    for kind in ("sections", "rois"):
        for k in a[kind]:
            np.testing.assert_array_equal(a[kind][k]["polygon"], b[kind][k]["polygon"])
            assert a[kind][k]["center"] == b[kind][k]["center"]
            assert _same_angle(a[kind][k]["angle"], b[kind][k]["angle"], tol=1e-9)
    assert a["landmarks"] == b["landmarks"] and a["order"] == b["order"]


@pytest.mark.skipif(not os.environ.get("SBEMIMAGE_MAGC_EXAMPLE"),
                    reason="set SBEMIMAGE_MAGC_EXAMPLE to SBEMimage's array/example/wafer_example1.magc")
def test_sbemimages_own_example(tmp_path):
    src = Path(os.environ["SBEMIMAGE_MAGC_EXAMPLE"])
    sections, rois, order, landmarks = read_magc(src)
    assert (len(sections), len(rois), len(landmarks), len(order)) == (433, 433, 4, 433)
    for s in sections:
        assert _same_angle(_edge_angle(s.polygon_um), s.angle_deg, tol=0.01)
    out = write_magc(tmp_path / "again.magc", sections, rois, order, landmarks)
    got = sbemimage_read(out.read_text())
    assert len(got["sections"]) == 433 and len(got["rois"]) == 433 and len(got["landmarks"]) == 4
    assert got["order"] == order
