"""`wafer magc import|export`: MagC files <-> the workflow's sections.json / grids.json."""
import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from acq.plan import Section as PlanSection
from wafer.magc import Roi, read_magc, write_magc
from wafer.magc_cli import magc_app
from wafer.sections import Section, load_sections

# overview px -> stage µm: 4 µm/px, turned 2°, origin somewhere on the stage
ROT = math.radians(2.0)
A = 4.0 * np.array([[math.cos(ROT), -math.sin(ROT)], [math.sin(ROT), math.cos(ROT)]])
T = np.array([-7000.0, -6500.0])
LANDMARKS = {0: (300.0, 400.0), 1: (3000.0, 350.0), 2: (3100.0, 3200.0), 3: (250.0, 3000.0)}


def run(*args):
    return CliRunner().invoke(magc_app, [str(a) for a in args])


@pytest.fixture
def magc_file(tmp_path):
    rng = np.random.default_rng(3)
    sections, rois = [], []
    for i in range(9):
        c = (500.0 + 300 * (i % 3) + rng.uniform(-20, 20), 600.0 + 300 * (i // 3))
        a = float(rng.uniform(-180, 180))
        sections.append(Section(i, c, (60.0, 40.0), a))
        if i != 4:                                                # section 4 has no ROI
            r = Section(0, c, (20.0, 12.0), a)
            rois.append(Roi(i, 0, tuple(map(tuple, r.polygon_um)), r.center_um, a, template=0))
    order = [8, 7, 6, 3, 4, 5, 2, 1, 0]
    return write_magc(tmp_path / "wafer.magc", sections, rois, order, LANDMARKS)


def stage_csv(tmp_path, points, bad=None):
    rows = ["id,x_um,y_um"]
    for k, p in points.items():
        x, y = (float(v) for v in A @ np.asarray(p) + T)
        if k == bad:
            x += 30.0
        rows.append(f"{k},{x!r},{y!r}")
    path = tmp_path / "stage_landmarks.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_import_with_landmarks_places_sections_and_grids_on_the_stage(tmp_path, magc_file):
    out = tmp_path / "imported"
    res = run("import", magc_file, "--out", out, "--landmarks-stage", stage_csv(tmp_path, LANDMARKS, bad=2),
              "--tile-pixel-nm", 20, "--overlap-px", 50)
    assert res.exit_code == 0, res.output
    assert "9 sections, 8 ROIs, 9 grids, 4 landmarks" in res.output
    info = json.loads((out / "magc_import.json").read_text())
    reg = info["registration"]
    assert reg["rms_um"] > 1.0 and f"RMS {reg['rms_um']:.3f} µm" in res.output
    assert "landmark 2: residual" in res.output
    # a good set of landmarks: the sections land where the known affine puts them
    out2 = tmp_path / "imported2"
    assert run("import", magc_file, "--out", out2, "--landmarks-stage", stage_csv(tmp_path, LANDMARKS),
               "--tile-pixel-nm", 20, "--overlap-px", 50).exit_code == 0
    originals, rois, order, _ = read_magc(magc_file)
    placed = {s.id: s for s in load_sections(out2 / "sections.json")}   # the detection format's reader
    assert [s.id for s in load_sections(out2 / "sections.json")] == order
    for s in originals:
        np.testing.assert_allclose(placed[s.id].polygon_um, s.polygon_um @ A.T + T, atol=1e-6)
        assert placed[s.id].angle_deg == pytest.approx(((s.angle_deg + 2.0 + 180) % 360) - 180, abs=1e-6)
    grids = json.loads((out2 / "grids.json").read_text())
    assert grids["order"] == order
    roi_of = {r.section_id: r for r in rois}
    for entry in grids["sections"]:
        plan_section = PlanSection.model_validate(entry)               # what acq.plan accepts
        (g,) = plan_section.grids
        assert g.pixel_size_nm == 20 and g.overlap_px == 50
        geo = g.geometry
        outline = (np.asarray(roi_of[entry["id"]].polygon_um) if entry["id"] in roi_of
                   else originals[entry["id"]].polygon_um)
        local = geo.to_local(outline @ A.T + T)                        # the grid covers its ROI (or section)
        w, h = geo.extent_um
        assert (abs(local[:, 0]) <= w / 2 + 1e-6).all() and (abs(local[:, 1]) <= h / 2 + 1e-6).all()


def test_import_refuses_bad_landmarks_and_existing_files(tmp_path, magc_file):
    few = stage_csv(tmp_path, {k: LANDMARKS[k] for k in (0, 1)})
    res = run("import", magc_file, "--out", tmp_path / "a", "--landmarks-stage", few)
    assert res.exit_code == 2 and "need at least 3 landmarks" in res.output
    assert not (tmp_path / "a").exists()
    res = run("import", magc_file, "--out", tmp_path / "a", "--landmarks-stage", stage_csv(tmp_path, LANDMARKS),
              "--pixel-size-um", 4)
    assert res.exit_code == 2 and "not both" in res.output
    assert run("import", magc_file, "--out", tmp_path / "b").exit_code == 0
    before = (tmp_path / "b" / "sections.json").read_bytes()
    res = run("import", magc_file, "--out", tmp_path / "b", "--pixel-size-um", 4)
    assert res.exit_code == 2 and "refusing to overwrite" in res.output
    assert (tmp_path / "b" / "sections.json").read_bytes() == before


def test_export_goes_back_to_the_files_frame(tmp_path, magc_file):
    out = tmp_path / "imported"
    assert run("import", magc_file, "--out", out, "--landmarks-stage", stage_csv(tmp_path, LANDMARKS)).exit_code == 0
    res = run("export", out, "--out", tmp_path / "back.magc")
    assert res.exit_code == 0, res.output
    originals, _, order, landmarks = read_magc(magc_file)
    back, rois, order2, landmarks2 = read_magc(tmp_path / "back.magc")
    assert order2 == order and landmarks2 == landmarks
    for a, b in zip(originals, back):
        np.testing.assert_allclose(b.polygon_um, a.polygon_um, atol=1e-6)
        assert b.angle_deg == pytest.approx(a.angle_deg, abs=1e-6)
    assert len(rois) == 9                                            # a ROI per grid: the tiles' outline
    # in stage µm on request; more grids than one per section need the magfinder dialect
    assert run("export", out, "--out", tmp_path / "stage.magc", "--stage-um").exit_code == 0
    staged, _, _, lm = read_magc(tmp_path / "stage.magc")
    np.testing.assert_allclose(lm[1], A @ LANDMARKS[1] + T, atol=1e-6)
    np.testing.assert_allclose(staged[0].center_um, load_sections(out / "sections.json")[-1].center_um)
    assert run("export", out, "--out", tmp_path / "back.magc").exit_code == 2      # never overwritten


def test_export_a_sections_file(tmp_path):
    secs = [Section(3, (10.0, 20.0), (50.0, 30.0), 15.0), Section(1, (200.0, 20.0), (50.0, 30.0), -40.0)]
    from wafer.sections import save_sections
    src = save_sections(secs, tmp_path / "sections.json")
    res = run("export", src, "--out", tmp_path / "s.magc", "--dialect", "magfinder")
    assert res.exit_code == 0, res.output
    text = (tmp_path / "s.magc").read_text()
    assert "[section.0003]" in text and "[stage_order]\nstage_order = 3,1" in text
    got, rois, order, _ = read_magc(tmp_path / "s.magc")
    assert got == sorted(secs, key=lambda s: s.id) and rois == [] and order == [3, 1]
    res = run("export", src, "--out", tmp_path / "t.magc", "--dialect", "zeiss")
    assert res.exit_code == 2 and "sbemimage, magfinder" in res.output
