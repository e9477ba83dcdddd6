"""MagC .magc import/export."""

import numpy as np
import pytest

from wafer.magc import MagcFormatError, Roi, magc_text, read_magc, write_magc
from wafer.sections import Section


def make_content(n=15, seed=0, multi_roi=False):
    rng = np.random.default_rng(seed)
    sections, rois = [], []
    for i in range(n):
        sid = int(3 * i + 1)
        centre = rng.uniform(-12000, 12000, 2)
        poly = centre + rng.uniform(-300, 300, (int(rng.integers(4, 9)), 2))
        sections.append(Section(id=sid, center_um=tuple(centre), size_um=tuple(rng.uniform(100, 600, 2)),
                                angle_deg=float(rng.uniform(-180, 180)), polygon_um=poly.tolist(),
                                confidence=float(rng.random())))
        for r in range(2 if multi_roi and i % 2 else 1):
            rp = centre + rng.uniform(-50, 50, (4, 2))
            rois.append(Roi(section_id=sid, roi_id=r, polygon_um=tuple(map(tuple, rp)),
                            center_um=tuple(rp.mean(axis=0)), angle_deg=float(rng.uniform(-180, 180)),
                            template=int(rng.integers(0, 5))))
    order = [s.id for s in sections]
    rng.shuffle(order)
    landmarks = {i: (float(x), float(y)) for i, (x, y) in enumerate(rng.uniform(-12500, 12500, (4, 2)))}
    return sections, rois, [int(i) for i in order], landmarks


@pytest.mark.parametrize("dialect,multi", [("sbemimage", False), ("magfinder", True)])
def test_round_trip_is_lossless(tmp_path, dialect, multi):
    sections, rois, order, landmarks = make_content(multi_roi=multi)
    path = write_magc(tmp_path / "wafer.magc", sections, rois, order, landmarks, dialect=dialect)
    s2, r2, o2, l2 = read_magc(path)
    assert s2 == sorted(sections, key=lambda s: s.id)  # exact float equality
    assert r2 == rois
    assert o2 == order
    assert l2 == landmarks
    # and writing what we read gives the same file again
    assert magc_text(s2, r2, o2, l2, dialect=dialect) == path.read_text()


def test_file_layout_matches_the_tools(tmp_path):
    sections, rois, order, landmarks = make_content(n=2)
    text = magc_text(sections, rois, order, landmarks)
    for header in ("[sections]", "[sections.0001]", "[sections.0004]", "[rois.0001]", "[landmarks]",
                   "[landmarks.0000]", "[tsporder]"):
        assert header in text
    assert "landmarksEM" not in text  # SBEMimage matches only landmarks./landmark. headers
    mf = magc_text(sections, rois, order, landmarks, dialect="magfinder")
    for header in ("[section.0001]", "[roi.0001.0]", "[landmark.0000]", "[stage_order]", "[serial_order]"):
        assert header in mf


def test_reads_a_file_written_by_the_tools(tmp_path):
    # No extra keys: angle from the file convention, size from the polygon.
    p = tmp_path / "magfinder.magc"
    p.write_text(
        "[sections]\nnumber = 2\n\n"
        "[sections.0000]\npolygon = 0,0,100,0,100,50,0,50\ncenter = 50,25\narea = 5000\nangle = 90\n"
        "compression = 1.0\n\n"
        "[sections.0001]\npolygon = 200,0,300,0,300,50,200,50\ncenter = 250,25\narea = 5000\nangle = -90\n\n"
        "[rois]\nnumber = 1\n\n[rois.0001]\ntemplate = 0\npolygon = 210,10,220,10,220,20\ncenter = 215,15\n"
        "area = 50\nangle = 180\n\n"
        "[magnets.0000]\ntemplate = 0\nlocation = 1,2\n\n"
        "[landmarksEM]\nnumber = 1\n\n[landmarksEM.0000]\nlocation = 5.5,6.5\n\n"
        "[serialorder]\nserialorder = 0,1\n\n[tsporder]\ntsporder = []\n"
    )
    sections, rois, order, landmarks = read_magc(p)
    assert [s.id for s in sections] == [0, 1]
    assert sections[0].angle_deg == pytest.approx(0.0)  # 90 - FILE_ANGLE: the first edge runs along +x
    assert sections[1].angle_deg == pytest.approx(-180.0)
    assert sections[0].size_um == pytest.approx((100.0, 50.0))
    assert sections[0].confidence == 1.0
    assert rois[0].section_id == 1 and rois[0].roi_id == 0 and rois[0].template == 0
    assert rois[0].angle_deg == pytest.approx(-90.0)
    assert order == [] and landmarks == {0: (5.5, 6.5)}  # the old [landmarksEM.N] spelling is still read


def test_external_angle_edit_wins_over_our_exact_copy(tmp_path):
    sections, _, _, _ = make_content(n=1)
    text = magc_text(sections).replace("angle = ", "angle = 12.5\nold_angle = ", 1)
    p = tmp_path / "edited.magc"
    p.write_text(text)
    (s,), _, _, _ = read_magc(p)
    assert s.angle_deg == pytest.approx(90.0 - 12.5)


def test_scaling_from_overview_pixels(tmp_path):
    sections, _, order, landmarks = make_content(n=3)
    p = write_magc(tmp_path / "px.magc", sections, tsporder=order, landmarks=landmarks, um_per_unit=4.0)
    s2, _, _, l2 = read_magc(p, um_per_unit=4.0)
    for a, b in zip(sorted(sections, key=lambda s: s.id), s2):
        np.testing.assert_allclose(a.polygon_um, b.polygon_um, rtol=1e-12)
        assert b.angle_deg == a.angle_deg
    s_raw, _, _, _ = read_magc(p)  # read as-is: coordinates in file units
    np.testing.assert_allclose(np.array(s_raw[0].center_um) * 4.0, s2[0].center_um, rtol=1e-12)


def test_errors_name_the_place(tmp_path):
    p = tmp_path / "bad.magc"
    p.write_text("[sections.0003]\npolygon = 0,0,1,x,2,2\ncenter = 1,1\nangle = 0\n")
    with pytest.raises(MagcFormatError, match=r"\[sections\.0003\]\.polygon"):
        read_magc(p)
    p.write_text("[sections.0003]\npolygon = 0,0,1,0,1,1\nangle = 0\n[tsporder]\ntsporder = 3,4\n")
    with pytest.raises(MagcFormatError, match="tsporder"):
        read_magc(p)
    sections, rois, order, _ = make_content(n=2, multi_roi=True)
    with pytest.raises(MagcFormatError, match="one ROI per section"):
        magc_text(sections, rois + [Roi(1, 7, ((0, 0), (1, 0), (1, 1)), (0.5, 0.5), 0.0)])


def test_no_clobber(tmp_path):
    sections, _, _, _ = make_content(n=2)
    p = write_magc(tmp_path / "w.magc", sections)
    with pytest.raises(FileExistsError):
        write_magc(p, sections[:1])
    write_magc(p, sections[:1], overwrite=True)
    assert len(read_magc(p)[0]) == 1
