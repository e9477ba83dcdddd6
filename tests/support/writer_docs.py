"""A synthetic run's documents (2 sections x 2x2 tiles x 2 cycles, one tile
acquired twice, section 3 turned by 30 degrees) fed through make_writers."""
from __future__ import annotations

import numpy as np

from acq.documents import RunStart, RunStop, SectionDone, TileEvent, tile_id

PX = 8e-9                        # 8 nm pixels
H, W = 96, 128
STEP_X, STEP_Y = 113, 83         # odd steps (tiles overlap on odd pixels), no rounding ties
SECTIONS, CYCLES = (0, 3), (0, 1)
REACQ = (3, 1, 0, 1)             # (section, cycle, row, col) acquired twice
ROT = {0: 0.0, 3: 30.0}          # scan rotation per section: section 3 lies turned on the wafer
SUBPX = 0.25                     # the stage reports tiles a quarter pixel off the pixel grid: no rounding ties


def rot(deg):
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[c, -s], [s, c]])


def world(section, cycle):
    """The specimen as the stage sees it: tiles are cut from here, so overlaps agree."""
    rng = np.random.default_rng([section, cycle])
    return rng.integers(0, 256, (400, 400), dtype=np.uint8)


def origin(section):
    return 1001 + 5000 * section, 2003          # stage pixels of tile (0, 0)'s top-left


def tile_doc(section, cycle, row, col, version=0, image=None):
    """The tile's top-left corner is (x0 + col * STEP_X, y0 + row * STEP_Y) + SUBPX in
    the section frame (its pixel (0, 0) centre half a pixel further); the stage
    sees that frame turned by the section's rotation."""
    x0, y0 = origin(section)
    tx, ty = x0 + col * STEP_X, y0 + row * STEP_Y
    if image is None:
        wx, wy = col * STEP_X, row * STEP_Y
        image = world(section, cycle)[wy:wy + H, wx:wx + W].copy()
    cx, cy = rot(ROT[section]) @ [tx + W / 2 + SUBPX, ty + H / 2 + SUBPX] * PX
    t = 1.7e9 + cycle * 100 + row * 10 + col
    return TileEvent(
        run_uid="run1", tile_id=tile_id(cycle, section, 0, row, col), version=version, cycle=cycle,
        section_id=section, grid_id=0, row=row, col=col, image=image, pixel_size_m=PX, dwell_s=2e-7,
        stage={"x": cx, "y": cy, "z": 1e-4, "r": 0.0, "t": 0.0}, target_um=(cx * 1e6, cy * 1e6),
        rotation_deg=ROT[section], wd_m=5.01e-3, stig=(0.1, -0.2), t_start=t, t_end=t + 0.5,
        qc={"ok": True, "focus": 9.5}, metadata={"detector": "SE2", "hv_kv": 1.5})


def run_docs():
    docs = [RunStart("run1", plan={}, setup={}, software_version="t", out_dir="x")]
    for cycle in CYCLES:
        for section in SECTIONS:
            ids = []
            for row in (0, 1):
                for col in (0, 1):
                    if (section, cycle, row, col) == REACQ:      # v0 failed QC (dark), v1 is good
                        bad = np.zeros((H, W), np.uint8)
                        docs.append(tile_doc(section, cycle, row, col, 0, image=bad))
                        docs.append(tile_doc(section, cycle, row, col, 1))
                    else:
                        docs.append(tile_doc(section, cycle, row, col))
                    ids.append(docs[-1].tile_id)
            docs.append(SectionDone("run1", cycle, section, ids))
    docs.append(RunStop("run1", "success", tiles=17))
    return docs


def feed(writers, docs):
    files = []
    for d in docs:
        for w in writers:
            files += w.handle(d)
    return files


def expected_plane(docs, section, cycle, origin_px, shape):
    """Independent model of an unrotated section's mosaic in the stage frame:
    tiles pasted in arrival order at their nearest pixel, last wins."""
    plane = np.zeros(shape, np.uint8)
    for d in docs:
        if d.kind != "tile" or (d.section_id, d.cycle) != (section, cycle):
            continue
        assert d.rotation_deg == 0
        # the centre of pixel (0, 0): half a pixel in from the frame's corner
        tx = d.stage["x"] / d.pixel_size_m - d.image.shape[1] / 2 + 0.5 - origin_px[0]
        ty = d.stage["y"] / d.pixel_size_m - d.image.shape[0] / 2 + 0.5 - origin_px[1]
        x, y = round(tx), round(ty)
        assert x >= 0 and y >= 0
        plane[y:y + d.image.shape[0], x:x + d.image.shape[1]] = d.image
    return plane
