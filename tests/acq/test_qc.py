"""Per-tile QC: the inspector flags what it should, and only that."""
import cv2
import numpy as np
import pytest

from acq.qc import ImageInspector, QCConfig, QCPolicy, QCResult, focus_score


def em_like(h=384, w=512, seed=0):
    """Cell-like texture with membranes plus shot-like noise (mean ~120)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((h // 8, w // 8)).astype(np.float32)
    base = cv2.resize(base, (w, h), interpolation=cv2.INTER_CUBIC)
    edges = np.abs(cv2.Laplacian(cv2.GaussianBlur(base, (0, 0), 2), cv2.CV_32F))
    img = 120 + 25 * base - 300 * edges + rng.normal(0, 6, (h, w)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture
def inspector():
    return ImageInspector()


def test_good_tile_passes_and_reports_values(inspector):
    r = inspector.inspect(em_like())
    assert r.ok, r.reasons
    for k in ("mean", "sd", "focus", "sd_top", "sd_bottom", "sd_middle"):
        assert k in r.values
    d = r.to_dict()
    assert d["ok"] is True and d["reasons"] == [] and d["focus"] == r.values["focus"]


def test_frozen_frame_is_detected_only_when_identical(inspector):
    img = em_like()
    assert "frozen" in inspector.inspect(img, previous=img.copy()).reasons
    other = em_like(seed=1)
    r = inspector.inspect(img, previous=other)
    assert "frozen" not in r.reasons and r.values["max_diff_previous"] > 0
    one_px = img.copy()
    one_px[10, 10] ^= 1
    assert "frozen" not in inspector.inspect(img, previous=one_px).reasons
    assert "frozen" in ImageInspector({"frozen_max_diff": 1}).inspect(img, previous=one_px).reasons


def test_incomplete_grab_bottom_and_top(inspector):
    img = em_like()
    cut = img.copy()
    cut[-40:] = 0                       # last 10 % of lines never scanned
    r = inspector.inspect(cut)
    assert "incomplete_bottom" in r.reasons and "incomplete_top" not in r.reasons
    top = img.copy()
    top[:8] = 77                        # 8 flat leading lines: fewer than the 5 % block (19)
    r = inspector.inspect(top)
    assert "incomplete_top" in r.reasons and r.values["flat_rows_top"] == 8
    assert not ({"incomplete_top", "incomplete_bottom"} & set(inspector.inspect(img).reasons))


def test_blank_frame_is_low_contrast_not_incomplete(inspector):
    r = inspector.inspect(np.full((200, 300), 100, np.uint8))
    assert "low_contrast" in r.reasons
    assert "incomplete_top" not in r.reasons        # the middle is flat too: a blank, not a partial grab


def test_too_dark_and_too_bright(inspector):
    img = em_like()
    assert "too_dark" in inspector.inspect((img // 20).astype(np.uint8)).reasons
    assert "too_bright" in inspector.inspect((255 - img // 20).astype(np.uint8)).reasons
    sat = np.where(img > 120, 255, 0).astype(np.uint8)
    assert "high_contrast" in inspector.inspect(sat).reasons


def test_focus_score_drops_with_blur_and_gates_when_configured():
    img = em_like(768, 1024)
    sharp = focus_score(img)
    blurred = cv2.GaussianBlur(img, (0, 0), 3)
    soft = focus_score(blurred)
    assert soft < 0.5 * sharp
    # contrast-normalised: halving the contrast keeps the score
    low = (img.astype(np.float32) * 0.5 + 64).astype(np.uint8)
    assert focus_score(low) == pytest.approx(sharp, rel=0.15)
    gate = ImageInspector(QCConfig(min_focus=(sharp * soft) ** 0.5))
    assert gate.inspect(img).ok
    r = gate.inspect(blurred)
    assert r.reasons == ["out_of_focus"] and not r.ok


def test_focus_large_frame_is_shrunk_and_fast():
    import time
    img = cv2.resize(em_like(), (6144, 4608), interpolation=cv2.INTER_NEAREST)
    t = time.perf_counter()
    r = ImageInspector().inspect(img)
    assert time.perf_counter() - t < 1.5
    assert r.values["focus"] > 0


def test_wrong_input_is_a_failure_not_a_crash(inspector):
    assert inspector.inspect(np.zeros((4, 4), np.uint16)).reasons == ["bad_dtype"]
    assert inspector.inspect(np.zeros((4, 4, 3), np.uint8)).reasons == ["bad_shape"]


def test_policy_decisions():
    bad_focus = QCResult(False, ["out_of_focus"], {})
    frozen = QCResult(False, ["frozen"], {})
    good = QCResult(True, [], {})
    p = QCPolicy(action_on_fail="refocus_retry", max_retries=2)
    assert p.decide(good, 1).action == "accept"
    assert p.decide(bad_focus, 1).action == "refocus_retry"
    assert p.decide(bad_focus, 2).reacquire
    assert p.decide(bad_focus, 3).action == "give_up"
    assert p.decide(frozen, 1).action == "retry"          # refocusing cannot fix a stale frame
    assert QCPolicy().decide(bad_focus, 1).action == "retry"
    assert QCPolicy(max_retries=0).decide(bad_focus, 1).action == "give_up"
    with pytest.raises(Exception):
        QCPolicy(action_on_fail="pray")
    with pytest.raises(Exception):
        QCConfig(typo=1)
