"""OME metadata of the tile and overview OME-TIFFs, judged by readers that are
not ours: ome-types validates the OME-XML against the 2016-06 schema and
parses it, tifffile parses the OME series. Checked: acquisition date,
instrument, detector, channel name, the acquisition parameters as typed
key-value pairs, and the declared stage-position convention (the centre of
pixel (0, 0)) for tiles and overviews alike."""
from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import ome_types            # the independent reader (schema validation): not ours
import pytest
import tifffile

from acq.documents import RunStart, TileEvent, tile_id
from acq.plan import OVERVIEW_SECTION
from acq.writers.layout import TileRecord, read_tile_header, tile_relpath
from acq.writers.manifest import Manifest
from acq.writers.ome_tiff import OmeTiffWriter
from wafer.mosaic import build_overview, load_overview, save_overview, tiles_from_run

PX = 8e-9
H, W = 48, 64
T0 = 1.7e9 + 0.25
ZEISS = {"name": "Setup B", "devices": {"sem": {"driver": "zeiss_smartsem", "options": {
    "manufacturer": "Carl Zeiss Microscopy", "model": "Merlin Compact", "serial_number": "4711"}}}}
SIM = {"name": "Sim setup", "devices": {"sem": {"driver": "sim", "options": {}}}}


def turn(deg, v):
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def doc(tx_px, ty_px, rotation=0.0, *, section=2, row=0, col=0, px=PX, shape=(H, W), metadata=None, seed=0):
    """A frame whose top-left corner lies at (tx, ty) pixels in the section
    frame, which the stage sees turned by ``rotation``: the stage position is
    the frame's geometric centre."""
    h, w = shape
    cx, cy = turn(rotation, [(tx_px + w / 2) * px, (ty_px + h / 2) * px])
    img = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    md = {"eht_v": 1500.0, "probe_current_a": 2e-10, "detector": "InLens"} if metadata is None else metadata
    return TileEvent(
        run_uid="r1", tile_id=tile_id(0, section, 0, row, col), version=0, cycle=0, section_id=section, grid_id=0,
        row=row, col=col, image=img, pixel_size_m=px, dwell_s=2e-7,
        stage={"x": cx, "y": cy, "z": 1e-4, "r": math.radians(90.0), "t": 0.0}, target_um=(cx * 1e6, cy * 1e6),
        rotation_deg=rotation, wd_m=5.01e-3, stig=(0.1, -0.2), t_start=T0 + row * 10 + col, t_end=T0 + 0.5,
        qc={"ok": True, "focus": 9.5}, metadata=md, overview=section == OVERVIEW_SECTION)


def write(out: Path, docs, setup=ZEISS) -> list[Path]:
    w = OmeTiffWriter(out, Manifest(out))
    w.handle(RunStart("r1", plan={}, setup=setup, software_version="t", out_dir=str(out)))
    for d in docs:
        w.handle(d)
    return [out / tile_relpath(d.section_id, d.cycle, d.tile_id, d.version) for d in docs]


def kv(ome) -> dict[str, str]:
    """The image's key-value pairs, through ome-types (all MapAnnotations it links)."""
    ann = {a.id: a for a in ome.structured_annotations.map_annotations}
    out = {}
    for ref in ome.images[0].annotation_refs:
        out.update({m.k: m.value for m in ann[ref.id].value.ms})
    return out


def parse(path: Path):
    """ome-types' model of the file, validated against the OME schema."""
    return ome_types.from_tiff(path, validate=True)


def test_tile_date_instrument_detector_channel_and_parameters(tmp_path):
    d = doc(1000, 2000, 30.0)
    [p] = write(tmp_path, [d])
    ome = parse(p)
    img = ome.images[0]
    assert img.acquisition_date == datetime.fromtimestamp(d.t_start, timezone.utc).replace(microsecond=250000)
    [ins] = ome.instruments
    assert img.instrument_ref.id == ins.id
    assert (ins.microscope.manufacturer, ins.microscope.model, ins.microscope.serial_number) == \
        ("Carl Zeiss Microscopy", "Merlin Compact", "4711")
    [det] = ins.detectors
    assert det.model == "InLens"                       # the frame's detector, as the SEM reported it
    [ch] = img.pixels.channels
    assert ch.name == "InLens" and ch.detector_settings.id == det.id
    assert img.pixels.physical_size_x == pytest.approx(PX * 1e6) and img.pixels.physical_size_x_unit.value == "µm"
    pairs = kv(ome)
    assert float(pairs["eht_kv"]) == pytest.approx(1.5)
    assert float(pairs["probe_current_na"]) == pytest.approx(0.2)
    assert float(pairs["dwell_time_ns"]) == pytest.approx(200.0)
    assert float(pairs["working_distance_mm"]) == pytest.approx(5.01)
    assert (float(pairs["stigmator_x"]), float(pairs["stigmator_y"])) == pytest.approx((0.1, -0.2))
    assert float(pairs["scan_rotation_deg"]) == pytest.approx(30.0)
    assert float(pairs["pixel_size_nm"]) == pytest.approx(8.0)
    assert float(pairs["stage_rotation_deg"]) == pytest.approx(90.0)
    assert float(pairs["frame_centre_stage_x_um"]) == pytest.approx(d.stage["x"] * 1e6)
    assert (int(pairs["frame_width_px"]), int(pairs["frame_height_px"]), int(pairs["section_id"])) == (W, H, 2)
    assert pairs["overview"] == "false" and pairs["qc.ok"] == "true" and float(pairs["qc.focus"]) == 9.5
    assert datetime.fromisoformat(pairs["acquisition_start_utc"]).timestamp() == pytest.approx(d.t_start)
    assert pairs["stage_position_refers_to"] == "centre of pixel (0, 0)"
    assert pairs["setup_name"] == "Setup B"
    # our own reader still finds its header (and nothing else in it is needed)
    h = read_tile_header(p)
    assert h["stage"] == pytest.approx(d.stage) and h["metadata"] == d.metadata


def test_simulated_setup_gets_the_drivers_defaults(tmp_path):
    [p] = write(tmp_path, [doc(0, 0, metadata={"eht_v": 1500.0})], setup=SIM)
    ome = parse(p)
    ins = ome.instruments[0]
    assert ins.microscope.manufacturer == "simulated"
    assert ins.detectors[0].model == "SE" and ome.images[0].pixels.channels[0].name == "SE"
    assert "probe_current_na" not in kv(ome)         # not reported: left out, not invented


def test_a_bad_instrument_option_is_refused_with_its_name(tmp_path):
    setup = {"name": "x", "devices": {"sem": {"driver": "sim", "options": {"model": ["a", "b"]}}}}
    with pytest.raises(ValueError, match=r"devices\.sem\.options\.model"):
        write(tmp_path, [], setup=setup)


@pytest.mark.parametrize("rotation", [0.0, 30.0])
def test_tile_position_is_the_centre_of_pixel_0_0(tmp_path, rotation):
    tx, ty = 1000, 2000
    d = doc(tx, ty, rotation)
    [p] = write(tmp_path, [d])
    plane = parse(p).images[0].pixels.planes[0]
    assert plane.position_x_unit.value == "µm" and plane.position_y_unit.value == "µm"
    # pixel (0, 0) spans [tx, tx+1) x [ty, ty+1) of the section frame: its centre, turned onto the stage
    want = turn(rotation, [(tx + 0.5) * PX, (ty + 0.5) * PX]) * 1e6
    assert (plane.position_x, plane.position_y) == pytest.approx(tuple(want), abs=1e-9)
    assert plane.position_z == pytest.approx(100.0)
    # tifffile's own OME parsing: one YX series, the same position
    with tifffile.TiffFile(p) as tf:
        s = tf.series[0]
        assert (s.kind, s.axes, s.shape) == ("ome", "YX", (H, W))
        px = tifffile.xml2dict(tf.ome_metadata)["OME"]["Image"]["Pixels"]
        assert (px["Plane"]["PositionX"], px["Plane"]["PositionY"]) == pytest.approx(tuple(want), abs=1e-9)
        assert px["Channel"]["Name"] == "InLens"
    # our readers place the tile as before (frame centre) and agree with the declared position
    rec = TileRecord.from_header(read_tile_header(p))
    assert rec.center_px == pytest.approx((d.stage["x"] / PX, d.stage["y"] / PX))
    assert np.array(rec.pixel_stage_m()) * 1e6 == pytest.approx(want, abs=1e-9)


def test_overview_declares_the_same_convention_and_agrees_with_its_tiles(tmp_path):
    """Overview tiles at 1 µm through the tile writer, `wafer mosaic`'s path
    (tiles_from_run, assembly at the tiles' pixel size), save: the overview's
    pixel (0, 0) shows the top-left tile's pixel (0, 0), and both files give
    the same stage position for it."""
    run = tmp_path / "run"
    step_x, step_y, origin = W - 16, H - 16, (1000.25, -500.5)          # µm = px at 1 µm
    docs = [doc(origin[0] + c * step_x, origin[1] + r * step_y, section=OVERVIEW_SECTION, row=r, col=c,
                px=1e-6, seed=r * 2 + c) for r in range(2) for c in range(2)]
    paths = write(run, docs)
    ov = build_overview(tiles_from_run(run), 1.0, refine=False)
    out = save_overview(tmp_path / "ov.ome.tif", ov)
    assert np.array_equal(ov.image[:8, :8], docs[0].image[:8, :8])

    ome = parse(out)
    img = ome.images[0]
    plane = img.pixels.planes[0]
    tile_plane = parse(paths[0]).images[0].pixels.planes[0]
    want = (origin[0] + 0.5, origin[1] + 0.5)                  # centre of the top-left tile's pixel (0, 0)
    assert (plane.position_x, plane.position_y) == pytest.approx(want, abs=1e-9)
    assert (tile_plane.position_x, tile_plane.position_y) == pytest.approx(want, abs=1e-9)
    pairs = kv(ome)
    assert pairs["stage_position_refers_to"] == "centre of pixel (0, 0)"
    assert float(pairs["pixel_size_um"]) == 1.0 and int(pairs["tiles"]) == 4
    assert img.acquisition_date.timestamp() == pytest.approx(T0, abs=1e-3)     # the first tile's start
    assert ome.instruments[0].microscope.model == "Merlin Compact"
    assert img.pixels.channels[0].name == "InLens"
    back = load_overview(out)                                  # our own reader: same origin as before
    assert back.origin_um == pytest.approx(want)
