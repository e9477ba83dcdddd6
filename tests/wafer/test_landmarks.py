"""Landmark registration: overview -> stage affine, residuals, refusals, landmark files."""
import math

import numpy as np
import pytest

from wafer.landmarks import (LandmarkError, fit_affine, load_stage_landmarks, map_angle, map_section,
                             parse_stage_landmarks)
from wafer.sections import Section

# 2.5 µm/px, turned 3°, a little shear, y flipped (the overview's rows run against the stage's y)
A = np.array([[2.5 * math.cos(0.05236), -2.52 * math.sin(0.05236) + 0.01],
              [2.5 * math.sin(0.05236), 2.52 * math.cos(0.05236)]]) @ np.diag([1.0, -1.0])
T = np.array([-6200.0, 4100.0])
OVERVIEW = {0: (1128.25, 2709.5), 1: (2708.417, 1013.833), 2: (4299.0, 2747.167), 3: (2337.0, 4050.75),
            7: (900.0, 900.0)}


def stage_of(points):
    return {k: tuple((A @ np.asarray(p) + T).tolist()) for k, p in points.items()}


def test_a_known_affine_is_recovered():
    reg = fit_affine(OVERVIEW, stage_of(OVERVIEW))
    np.testing.assert_allclose(reg.matrix, A, atol=1e-9)
    np.testing.assert_allclose(reg.offset, T, atol=1e-6)
    assert reg.ids == (0, 1, 2, 3, 7) and reg.rms_um < 1e-6 and not reg.exact
    sx, sy, rot, flipped = reg.scale_rotation()
    assert sx == pytest.approx(2.5) and rot == pytest.approx(3.0, abs=1e-3) and flipped
    np.testing.assert_allclose(reg.inverse().apply(reg.apply([[10.0, 20.0]])), [[10.0, 20.0]], atol=1e-9)


def test_residuals_point_at_the_badly_measured_landmark():
    # with 9 landmarks (few more than the affine's 6 unknowns would hide it) one bad measurement stands out
    overview = {3 * i + j: (1000.0 + 1500 * i, 1000.0 + 1400 * j) for i in range(3) for j in range(3)}
    stage = stage_of(overview)
    stage[2] = (stage[2][0] + 40.0, stage[2][1])                 # the operator missed landmark 2 by 40 µm in x
    reg = fit_affine(overview, stage)
    norms = dict(zip(reg.ids, reg.residual_norms_um))
    assert max(norms, key=norms.get) == 2
    assert 10.0 < norms[2] < 40.0                                # least squares spreads the error
    fitted = reg.apply([overview[i] for i in reg.ids])
    measured = np.array([stage[i] for i in reg.ids])
    np.testing.assert_allclose(reg.residuals_um, fitted - measured, atol=1e-9)
    assert reg.rms_um == pytest.approx(math.sqrt(np.mean(np.sum((fitted - measured) ** 2, axis=1))))
    text = reg.summary()
    assert "landmark 2: residual" in text and f"RMS {reg.rms_um:.3f} µm" in text


def test_three_landmarks_fit_exactly_and_say_so():
    three = {k: OVERVIEW[k] for k in (0, 1, 2)}
    stage = stage_of(three)
    stage[1] = (stage[1][0] + 25.0, stage[1][1])                 # an error 3 landmarks cannot reveal
    reg = fit_affine(OVERVIEW, stage)
    assert reg.exact and reg.rms_um < 1e-6 and reg.unmatched == (3, 7)
    assert "measure a 4th" in reg.summary() and "not used (no stage position): [3, 7]" in reg.summary()


def test_refusals():
    with pytest.raises(LandmarkError, match="at least 3 landmarks .* got 2"):
        fit_affine(OVERVIEW, {k: v for k, v in stage_of(OVERVIEW).items() if k < 2})
    line = {0: (0.0, 0.0), 1: (10.0, 10.0), 2: (20.0, 20.0 + 1e-9), 3: (35.0, 35.0)}
    with pytest.raises(LandmarkError, match="lie on one line in overview coordinates"):
        fit_affine(line, stage_of(line))
    with pytest.raises(LandmarkError, match="lie on one line in stage coordinates"):
        fit_affine(OVERVIEW, {k: (float(k), 2.0 * k) for k in OVERVIEW})
    with pytest.raises(LandmarkError, match=r"stage landmarks \[9\] are not in the MagC file"):
        fit_affine(OVERVIEW, {**stage_of(OVERVIEW), 9: (0.0, 0.0)})


def test_mapped_section_keeps_its_outline_and_axis():
    s = Section(4, (2000.0, 1500.0), (66.0, 60.0), 30.0)
    reg = fit_affine(OVERVIEW, stage_of(OVERVIEW))
    m = map_section(reg, s)
    np.testing.assert_allclose(m.polygon_um, s.polygon_um @ A.T + T, atol=1e-6)
    np.testing.assert_allclose(m.center_um, A @ s.center_um + T, atol=1e-6)
    edge = m.polygon_um[1] - m.polygon_um[0]                     # the width axis, mapped
    assert m.angle_deg == pytest.approx(math.degrees(math.atan2(edge[1], edge[0])), abs=1e-6)
    assert m.size_um[0] == pytest.approx(np.linalg.norm(edge), rel=1e-9)
    assert map_angle(np.eye(2) * 3, 170.0) == pytest.approx(170.0)


def test_stage_landmark_files(tmp_path):
    csv = tmp_path / "lm.csv"
    csv.write_text("# measured 2026-12-05\nid,x_um,y_um,note\n0,-4512.5,3120,cross\n3,10,20.5,\n")
    assert load_stage_landmarks(csv) == {0: (-4512.5, 3120.0), 3: (10.0, 20.5)}
    js = tmp_path / "lm.json"
    js.write_text('{"landmarks": [{"id": 1, "x_um": 5, "y_um": 6}]}')
    assert load_stage_landmarks(js) == {1: (5.0, 6.0)}
    assert parse_stage_landmarks('{"2": [1.5, -2]}') == {2: (1.5, -2.0)}
    with pytest.raises(LandmarkError, match="line 3 y_um: expected a number, got 'abc'"):
        parse_stage_landmarks("id,x_um,y_um\n0,1,2\n1,3,abc\n", "lm.csv")
    with pytest.raises(LandmarkError, match=r"missing \['y_um'\]"):
        parse_stage_landmarks("id,x_um,y\n0,1,2\n")
    with pytest.raises(LandmarkError, match="landmark id 0 given twice"):
        parse_stage_landmarks("id,x_um,y_um\n0,1,2\n0,3,4\n")
    with pytest.raises(LandmarkError, match=r"lm\[0\]: expected an object with id, x_um, y_um"):
        parse_stage_landmarks('[{"id": 0, "x": 1}]', "lm")
    with pytest.raises(LandmarkError, match="not found"):
        load_stage_landmarks(tmp_path / "missing.csv")
