"""Find-similar step: sections the network is unsure of are found by their likeness
to the confident ones on the same overview, never on bare resin, and fragments
give way to the whole section."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from wafer.detect import postprocess, rect_iou
from wafer import detect_similar
from wafer.detect_similar import find_similar

PX = 4.0
SIZE = (120, 48)                       # px: 480 x 192 um sections
CENTRES = [(120, 100), (300, 100), (480, 100), (120, 260), (300, 260), (480, 260)]
ANGLE = 8.0


def _box(c, size=SIZE, angle=ANGLE):
    return cv2.boxPoints(((float(c[0]), float(c[1])), (float(size[0]), float(size[1])), angle))


@pytest.fixture(scope="module")
def overview():
    """Six textured sections in resin frames on a wafer, with noise (uint8, 4 µm pixels)."""
    rng = np.random.default_rng(3)
    img = np.full((360, 600), 60.0, np.float32)
    for c in CENTRES:
        cv2.fillPoly(img, [np.round(_box(c, (SIZE[0] + 16, SIZE[1] + 16))).astype(np.int32)], 100.0)
        cv2.fillPoly(img, [np.round(_box(c)).astype(np.int32)], 150.0)
    img += cv2.GaussianBlur(rng.normal(0, 25, img.shape).astype(np.float32), (0, 0), 2.0)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8) / np.float32(255)


def _prob(levels: dict[int, float], cut: dict[int, float] | None = None) -> np.ndarray:
    """A probability map as a network would give it: section k at levels[k] (0.95 by
    default); cut[k] keeps only that fraction of section k's length (a fragment)."""
    prob = np.full((360, 600), 0.02, np.float32)
    for k, c in enumerate(CENTRES):
        length = SIZE[0] * (cut or {}).get(k, 1.0)
        shift = (SIZE[0] - length) / 2 * np.array([np.cos(np.radians(ANGLE)), np.sin(np.radians(ANGLE))])
        poly = _box(np.asarray(c) - shift, (length, SIZE[1]))
        cv2.fillPoly(prob, [np.round(poly).astype(np.int32)], levels.get(k, 0.95))
    return prob


def _truth_hits(dets):
    truth = [((c[0] * PX, c[1] * PX), (SIZE[0] * PX, SIZE[1] * PX), ANGLE) for c in CENTRES]
    return [max(rect_iou((d["center_um"], d["size_um"], d["angle_deg"]), t) for d in dets) for t in truth]


def test_a_section_the_network_is_unsure_of_is_found_by_its_likeness(overview):
    prob = _prob({5: 0.45})                           # below the 0.5 threshold: the network misses it
    dets = postprocess(prob, PX)
    assert len(dets) == 5 and _truth_hits(dets)[5] == 0.0
    found = find_similar(overview, prob, dets, PX, (0.0, 0.0))
    assert len(found) == 6
    assert min(_truth_hits(found)) > 0.85
    assert [d["id"] for d in found] == list(range(6))
    assert all(abs(d["angle_deg"] - ANGLE) < 3 for d in found)


def test_no_section_is_invented_where_the_network_sees_only_resin(overview):
    prob = _prob({5: 0.02})                           # the network sees nothing at section 5
    dets = postprocess(prob, PX)
    assert len(find_similar(overview, prob, dets, PX, (0.0, 0.0))) == 5
    blank = np.full_like(overview, float(overview.mean()))        # and no likeness: bare image
    faint_everywhere = np.full_like(prob, 0.45)
    np.maximum(faint_everywhere, prob, out=faint_everywhere)
    assert len(find_similar(blank, faint_everywhere, dets, PX, (0.0, 0.0))) == 5


def _stained(img: np.ndarray, k: int, level: float) -> np.ndarray:
    """`img` with a stain of grey `level` over the middle of section k, its edges untouched."""
    out = np.asarray(img * 255, np.float32)
    cv2.ellipse(out, CENTRES[k], (45, 14), ANGLE, 0, 360, level, -1)
    return out / np.float32(255)


def test_a_stained_section_is_found_by_its_edges(overview, monkeypatch):
    """A stain over a section lowers its likeness below MIN_NCC; its four edges are still
    as strong as its neighbours', so it is found all the same."""
    img = _stained(overview, 5, 0.0)
    prob = _prob({5: 0.45})
    dets = postprocess(prob, PX)
    found = find_similar(img, prob, dets, PX, (0.0, 0.0))
    assert len(found) == 6 and _truth_hits(found)[5] > 0.85
    monkeypatch.setattr(detect_similar, "WEAK_NCC", detect_similar.MIN_NCC)      # the likeness alone
    assert len(find_similar(img, prob, dets, PX, (0.0, 0.0))) == 5


def test_a_weak_match_needs_edges_like_the_sections_at_their_size(overview):
    """The image confirms a weak match only where it shows the sections' size and edges
    about as strong as theirs: not on a patch a little brighter than the wafer between
    the rows (a tile seam, a stain), nor on a box of another size."""
    img = np.asarray(overview * 255, np.float32)
    ghost = (300, 180)
    cv2.fillPoly(img, [np.round(_box(ghost)).astype(np.int32)], 75.0)
    img = img / np.float32(255)
    prob = _prob({})
    dets = postprocess(prob, PX)
    edges = detect_similar._source_edges(img, prob, dets, PX, np.zeros(2), 0.0)
    assert edges is not None and edges[0] == 1.0                 # the sections are the brighter
    size = (SIZE[0] * PX, SIZE[1] * PX)

    def at(c, size=size):
        return {"center_um": [c[0] * PX, c[1] * PX], "size_um": list(size), "angle_deg": ANGLE}
    assert detect_similar._shows_edges(img, at(CENTRES[4]), size, edges, PX, np.zeros(2))
    assert not detect_similar._shows_edges(img, at(ghost), size, edges, PX, np.zeros(2))
    assert not detect_similar._shows_edges(img, at(CENTRES[4], (size[0] * 1.2, size[1])), size, edges, PX,
                                           np.zeros(2))
    # where the image's step lies 3 px outside the network's edges, matches are moved in by
    # 3 px (_edge_bias): their edges are measured where the image put them
    inner = (size[0] - 6 * PX, size[1] - 6 * PX)
    moved = detect_similar._source_edges(img, prob, dets, PX, np.zeros(2), 3.0)
    assert detect_similar._shows_edges(img, at(CENTRES[4], inner), inner, moved, PX, np.zeros(2))


def test_a_fragment_gives_way_to_the_whole_section(overview):
    prob = _prob({}, cut={2: 0.45})                    # the network saw under half of section 2
    dets = postprocess(prob, PX, min_confidence=0.5)
    assert len(dets) == 6 and _truth_hits(dets)[2] < 0.5
    found = find_similar(overview, prob, dets, PX, (0.0, 0.0))
    assert len(found) == 6 and min(_truth_hits(found)) > 0.85


def test_a_tight_section_is_not_widened_to_the_frames_the_network_took_for_tissue(overview):
    """On five sections the network took the resin frame for tissue, on the sixth it
    outlined the tissue alone: the template (section and frame) must not replace it,
    for the network sees no tissue in the frame around it."""
    prob = np.full((360, 600), 0.02, np.float32)
    for c in CENTRES[:5]:
        cv2.fillPoly(prob, [np.round(_box(c, (SIZE[0] + 16, SIZE[1] + 16))).astype(np.int32)], 0.95)
    cv2.fillPoly(prob, [np.round(_box(CENTRES[5])).astype(np.int32)], 0.95)
    dets = postprocess(prob, PX)
    assert len(dets) == 6 and _truth_hits(dets)[5] > 0.9
    found = find_similar(overview, prob, dets, PX, (0.0, 0.0))
    assert len(found) == 6 and _truth_hits(found)[5] > 0.9


def test_two_confident_sections_are_enough_for_a_template(overview):
    prob = _prob({k: 0.45 for k in range(2, 6)})       # the network is sure of two sections only
    dets = postprocess(prob, PX)
    assert len(dets) == 2
    found = find_similar(overview, prob, dets, PX, (0.0, 0.0))
    assert len(found) == 6 and min(_truth_hits(found)) > 0.85


def test_too_few_confident_sections_change_nothing(overview):
    prob = _prob({k: 0.45 for k in range(1, 6)})       # one confident section: no template
    dets = postprocess(prob, PX, min_confidence=0.4, threshold=0.4)
    dets = [d for d in dets if d["confidence"] > 0.9]
    assert len(dets) == 1
    assert find_similar(overview, prob, dets, PX, (0.0, 0.0)) == dets


def _merged_pair(gap: int, first_y: float, wafer: float, rim: float, rim_px: int, noise: float, seed: int):
    """(image, probability, section centres): four sections the network is sure of and
    two more `gap` px apart (the first at x 330, y `first_y`) that its probability joins
    into one blob with the gap.
    Each section of grey 150 lies in a rim `rim_px` px wide of grey `rim` on a wafer
    of grey `wafer`; tissue texture and detector noise of s.d. `noise`."""
    rng = np.random.default_rng(seed)
    v = np.array([-np.sin(np.radians(ANGLE)), np.cos(np.radians(ANGLE))]) * (SIZE[1] + gap)
    first = np.array((330.0, first_y))
    centres = CENTRES[:4] + [first, first + v]
    img = np.full((360, 600), wafer, np.float32)
    for c in centres:
        cv2.fillPoly(img, [np.round(_box(c, (SIZE[0] + 2 * rim_px, SIZE[1] + 2 * rim_px))).astype(np.int32)], rim)
    for c in centres:
        cv2.fillPoly(img, [np.round(_box(c)).astype(np.int32)], 150.0)
    img += cv2.GaussianBlur(rng.normal(0, 25, img.shape).astype(np.float32), (0, 0), 2.0)
    image = np.clip(img + rng.normal(0, noise, img.shape), 0, 255).astype(np.uint8) / np.float32(255)
    prob = np.full((360, 600), 0.02, np.float32)
    for c in centres[:4]:
        cv2.fillPoly(prob, [np.round(_box(c)).astype(np.int32)], 0.95)
    cv2.fillPoly(prob, [np.round(_box(first + v / 2, (SIZE[0], 2 * SIZE[1] + gap))).astype(np.int32)], 0.95)
    return image, prob, centres


def _all_found(found, centres) -> bool:
    truth = [((c[0] * PX, c[1] * PX), (SIZE[0] * PX, SIZE[1] * PX), ANGLE) for c in centres]
    return min(max(rect_iou((d["center_um"], d["size_um"], d["angle_deg"]), t) for d in found) for t in truth) > 0.8


def test_neighbours_merged_into_one_blob_are_split():
    """Two sections side by side, 4 px of resin apart: the network's blob covers both."""
    image, prob, centres = _merged_pair(gap=4, first_y=250.0, wafer=60.0, rim=100.0, rim_px=4, noise=6, seed=5)
    dets = postprocess(prob, PX)
    assert len(dets) == 5                              # the two neighbours as one
    found = find_similar(image, prob, dets, PX, (0.0, 0.0))
    assert len(found) == 6
    assert _all_found(found, centres)


def test_neighbours_merged_across_a_gap_of_their_own_grey_are_split_by_their_edges(monkeypatch):
    """Two sections 24 px apart on a wafer whose grey is near the tissue's, each in a
    thin, faint resin rim, under strong noise: the network's blob covers both and the
    gap. The profile from one to the other shows no clear seam (5 robust s.d.), but each
    part has the sections' four edges, as strong as theirs: two sections."""
    image, prob, centres = _merged_pair(gap=24, first_y=230.0, wafer=140.0, rim=120.0, rim_px=3, noise=25, seed=6)
    dets = postprocess(prob, PX)
    assert len(dets) == 5
    found = find_similar(image, prob, dets, PX, (0.0, 0.0))
    assert len(found) == 6
    assert _all_found(found, centres)
    monkeypatch.setattr(detect_similar, "_shows_edges", lambda *a: False)       # the seam alone: no split
    assert len(find_similar(image, prob, dets, PX, (0.0, 0.0))) == 5


def test_a_section_twice_the_size_of_the_others_is_not_split():
    """One section as long as two of its neighbours are wide, in one piece (no resin
    between halves): the network's blob is that section, not two joined neighbours."""
    rng = np.random.default_rng(5)
    v = np.array([-np.sin(np.radians(ANGLE)), np.cos(np.radians(ANGLE))]) * (SIZE[1] + 4)
    big_c, big_size = np.array((330.0, 250.0)) + v / 2, (SIZE[0], 2 * SIZE[1] + 4)
    img = np.full((360, 600), 60.0, np.float32)
    for c, size in [(c, SIZE) for c in CENTRES[:4]] + [(big_c, big_size)]:
        cv2.fillPoly(img, [np.round(_box(c, (size[0] + 8, size[1] + 8))).astype(np.int32)], 100.0)
        cv2.fillPoly(img, [np.round(_box(c, size)).astype(np.int32)], 150.0)
    img += cv2.GaussianBlur(rng.normal(0, 25, img.shape).astype(np.float32), (0, 0), 2.0)
    image = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8) / np.float32(255)
    prob = np.full((360, 600), 0.02, np.float32)
    for c, size in [(c, SIZE) for c in CENTRES[:4]] + [(big_c, big_size)]:
        cv2.fillPoly(prob, [np.round(_box(c, size)).astype(np.int32)], 0.95)
    dets = postprocess(prob, PX)
    assert len(dets) == 5
    found = find_similar(image, prob, dets, PX, (0.0, 0.0))
    big = ((big_c[0] * PX, big_c[1] * PX), (big_size[0] * PX, big_size[1] * PX), ANGLE)
    assert len(found) == 5
    assert max(rect_iou((d["center_um"], d["size_um"], d["angle_deg"]), big) for d in found) > 0.9


def _draw(centres, angles, seed, size=SIZE):
    """Sections in resin frames on a wafer, with tissue texture and noise."""
    rng = np.random.default_rng(seed)
    img = np.full((360, 600), 60.0, np.float32)
    for c, a in zip(centres, angles):
        cv2.fillPoly(img, [np.round(_box(c, (size[0] + 16, size[1] + 16), a)).astype(np.int32)], 100.0)
        cv2.fillPoly(img, [np.round(_box(c, size, a)).astype(np.int32)], 150.0)
    img += cv2.GaussianBlur(rng.normal(0, 25, img.shape).astype(np.float32), (0, 0), 2.0)
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8) / np.float32(255)


def test_a_section_laid_askew_is_found_at_its_own_angle():
    """Section 5 lies 1.5 deg off its neighbours: the likeness finds it near their angle,
    the edge fit turns it to its own, so the rectangle does not stick out at the corners."""
    angles = [ANGLE] * 5 + [ANGLE + 1.5]
    image = _draw(CENTRES, angles, 7)
    prob = _prob({5: 0.45})
    found = find_similar(image, prob, postprocess(prob, PX), PX, (0.0, 0.0))
    truth = ((CENTRES[5][0] * PX, CENTRES[5][1] * PX), (SIZE[0] * PX, SIZE[1] * PX), ANGLE + 1.5)
    best = max(found, key=lambda d: rect_iou((d["center_um"], d["size_um"], d["angle_deg"]), truth))
    assert abs(best["angle_deg"] - (ANGLE + 1.5)) < 0.5
    assert rect_iou((best["center_um"], best["size_um"], best["angle_deg"]), truth) > 0.9


def test_found_sections_have_their_edges_where_the_network_puts_the_sure_ones():
    """The image's step lies 2 px outside the edge the network draws (a bright rim, blur):
    the sections found by likeness are measured like the network's own, not 2 px wider
    on every side, so that all sections of a wafer get grids of one size."""
    image = _draw(CENTRES, [ANGLE] * 6, 11, size=(SIZE[0] + 4, SIZE[1] + 4))
    prob = _prob({4: 0.45, 5: 0.45})
    found = find_similar(image, prob, postprocess(prob, PX), PX, (0.0, 0.0))
    assert len(found) == 6
    sure = [d["size_um"] for d in found if d["confidence"] > 0.9]
    added = [d["size_um"] for d in found if d["confidence"] < 0.9]
    assert len(sure) == 4 and len(added) == 2
    for w, h in added:
        assert abs(w - np.median([s[0] for s in sure])) < 1.5 * PX
        assert abs(h - np.median([s[1] for s in sure])) < 1.5 * PX


def test_fragments_as_references_do_not_make_the_found_sections_short():
    """The network saw only 80 % of the length of the sections it is sure of and missed
    the other three: the sections found by likeness still have their full length."""
    image = _draw(CENTRES, [ANGLE] * 6, 9)
    prob = _prob({3: 0.45, 4: 0.45, 5: 0.45}, cut={0: 0.8, 1: 0.8, 2: 0.8})
    dets = postprocess(prob, PX)
    assert len(dets) == 3 and all(d["size_um"][0] < 0.85 * SIZE[0] * PX for d in dets)
    found = find_similar(image, prob, dets, PX, (0.0, 0.0))
    assert len(found) == 6
    assert min(_truth_hits(found)[3:]) > 0.9


def test_a_first_pass_section_stays_where_the_relearnt_template_finds_nothing(overview, monkeypatch):
    """The template is learnt again when the confirmed matches have another size; where
    the second pass then finds nothing, the whole section the first pass put in place
    of a fragment stays, and the fragment does not come back."""
    import wafer.detect_similar as ds
    prob = _prob({}, cut={2: 0.45})
    dets = postprocess(prob, PX, min_confidence=0.5)
    fragment = min(range(len(dets)), key=lambda k: dets[k]["size_um"][0])
    whole = {**dets[0], "center_um": [CENTRES[2][0] * PX, CENTRES[2][1] * PX],
             "size_um": [SIZE[0] * PX, SIZE[1] * PX], "angle_deg": ANGLE, "confidence": 0.9}
    longer = [{**d, "size_um": [d["size_um"][0] * 1.2, d["size_um"][1]]} for d in dets[:3]]
    passes = iter([([(whole, {fragment})], longer), ([], [])])
    monkeypatch.setattr(ds, "_match", lambda *a: next(passes))
    found = find_similar(overview, prob, dets, PX, (0.0, 0.0))
    assert next(passes, None) is None                     # both passes ran
    assert len(found) == len(dets)
    assert any(d["center_um"] == whole["center_um"] for d in found)
    assert not any(d["center_um"] == dets[fragment]["center_um"] for d in found)
