"""`view OUTDIR`: the napari layers (real napari Image layers, no window) put
every tile, section volume and the overview where the stage had them; the
neuroglancer state parses in neuroglancer's own ViewerState and lands each
section's store at its NGFF translation."""
import json
import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import tifffile
import typer
import zarr
from typer.testing import CliRunner

from acq.view_layers import OVERVIEW_KEY, ViewError, neuroglancer_state, ngff_placement, run_layers
from acq.writers.layout import TileRecord, read_tile_header
from tests.support.engine_runs import write_plan, write_setup

ROT = 12.0                                  # scan rotation of the grids: tiles are not axis-aligned
OV_ORIGIN, OV_PX = (-700.0, -300.0), 4.0


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from acq.cli import run_plan
    from common.geometry import OverviewImage
    from wafer.mosaic import save_overview
    tmp = tmp_path_factory.mktemp("view")
    plan = write_plan(tmp, write_setup(tmp), output={"writers": ["ome_tiff", "ome_zarr"], "queue_maxsize": 4},
                      grid_template={"rotation_deg": ROT})
    out = tmp / "out"
    assert run_plan(plan, out=out) == 0
    img = np.random.default_rng(1).integers(0, 255, (150, 300), dtype=np.uint8)
    save_overview(out / "overview.ome.tif", OverviewImage(img, OV_ORIGIN, OV_PX))
    return out


@pytest.fixture(scope="module")
def layers(run_dir):
    from gui.view import napari_layers
    specs = run_layers(run_dir, tiles=True)
    return specs, napari_layers(specs)


def ome_plane_position_um(path):
    """Plane PositionX/Y of an OME-TIFF, read from its OME-XML (the OME consumer's view)."""
    with tifffile.TiffFile(path) as tf:
        root = ET.fromstring(tf.ome_metadata)
    plane = next(e for e in root.iter() if e.tag.endswith("}Plane"))
    return float(plane.get("PositionX")), float(plane.get("PositionY"))


def test_layers_bottom_to_top_overview_sections_tiles(layers):
    specs, lays = layers
    kinds = [s.kind for s in specs]
    assert kinds[0] == "overview" and set(kinds[1:3]) == {"section"} and set(kinds[3:]) == {"tile"}
    assert len(kinds) == 1 + 2 + 8                    # 2 sections x 2 cycles x 2 tiles
    assert [l.name for l in lays] == [s.name for s in specs]
    sec = lays[1]
    assert sec.multiscale and len(sec.data) == 3      # the store's levels, opened with zarr


def test_tile_layers_sit_at_their_stage_positions(layers):
    specs, lays = layers
    for spec, layer in zip(specs, lays):
        if spec.kind != "tile":
            continue
        rec = TileRecord.from_header(read_tile_header(spec.path))
        px_um = rec.pixel_size_m * 1e6
        h, w = rec.height, rec.width
        # the frame's centre is the recorded stage position
        zc, yc, xc = layer.data_to_world((0, (h - 1) / 2, (w - 1) / 2))
        assert math.hypot(xc - rec.stage_x_m * 1e6, yc - rec.stage_y_m * 1e6) < 0.01 * px_um
        # pixel (0, 0) is where the OME-TIFF's plane position says (it includes the scan rotation)
        z0, y0, x0 = layer.data_to_world((0, 0, 0))
        px, py = ome_plane_position_um(spec.path)
        assert math.hypot(x0 - px, y0 - py) < 0.01 * px_um
        # one step along a row goes along the scan direction: turned by the scan rotation
        _, y1, x1 = layer.data_to_world((0, 0, 1))
        assert math.degrees(math.atan2(y1 - y0, x1 - x0)) == pytest.approx(ROT, abs=1e-6)
        assert math.hypot(x1 - x0, y1 - y0) == pytest.approx(px_um)


def test_section_volume_holds_each_tile_where_the_tile_layer_puts_it(layers):
    """The store's NGFF placement agrees with the tiles: the middle of each
    tile, looked up (bilinear) in its section's volume at the world positions
    of the tile's pixels, matches the tile best within 1 px of no shift."""
    from scipy.ndimage import map_coordinates
    specs, _ = layers
    secs = {s.meta["section_id"]: s for s in specs if s.kind == "section"}
    for t in (s for s in specs if s.kind == "tile"):
        sec = secs[t.meta["section_id"]]
        vol = zarr.open_array(str(sec.path / sec.levels[0]), mode="r")
        img = tifffile.imread(t.path).astype(float)
        h, w = img.shape
        ii, jj = np.mgrid[h // 4:3 * h // 4:2, w // 4:3 * w // 4:2]
        pts = np.stack([np.zeros(ii.size), ii.ravel(), jj.ravel(), np.ones(ii.size)])
        world = (t.affine @ pts)[:3]                                   # (z, y, x) µm
        idx = (world - np.asarray(sec.translate)[:, None]) / np.asarray(sec.scale)[:, None]
        z = int(round(idx[0, 0]))
        assert z == t.meta["cycle"] and np.allclose(idx[0], z)         # the cycle's plane
        y0, x0 = int(np.floor(idx[1].min())) - 4, int(np.floor(idx[2].min())) - 4
        plane = np.asarray(vol[z, y0:int(idx[1].max()) + 6, x0:int(idx[2].max()) + 6], float)
        ref = img[ii, jj].ravel()
        shifts = np.arange(-2, 2.01, 0.25)
        best = {(dy, dx): np.corrcoef(ref, map_coordinates(plane, [idx[1] - y0 + dy, idx[2] - x0 + dx],
                                                           order=1))[0, 1]
                for dy in shifts for dx in shifts}
        (dy, dx), r = max(best.items(), key=lambda kv: kv[1])
        assert r > 0.8, (t.name, r)
        assert math.hypot(dy, dx) <= 1.0, (t.name, dy, dx, r)


def test_overview_layer_pixel_centres_where_the_mosaic_says(layers):
    from wafer.mosaic import TRANSFORM_KEY
    assert OVERVIEW_KEY == TRANSFORM_KEY                       # acq cannot import wafer: kept equal here
    _, lays = layers
    ov = lays[0]
    assert ov.ndim == 2
    np.testing.assert_allclose(ov.data_to_world((0, 0)), (OV_ORIGIN[1], OV_ORIGIN[0]))
    np.testing.assert_allclose(ov.data_to_world((10, 20)), (OV_ORIGIN[1] + 10 * OV_PX, OV_ORIGIN[0] + 20 * OV_PX))


def test_section_layers_placed_by_ngff_metadata_only(layers):
    specs, lays = layers
    for spec, layer in zip(specs, lays):
        if spec.kind != "section":
            continue
        g = json.loads((spec.path / "zarr.json").read_text())["attributes"]["ome"]["multiscales"][0]
        tr = {t["type"]: t[t["type"]] for t in g["datasets"][0]["coordinateTransformations"]}
        np.testing.assert_allclose(layer.data_to_world((0, 0, 0)), tr.get("translation", [0, 0, 0]))
        np.testing.assert_allclose(layer.data_to_world((1, 1, 1)), np.add(tr.get("translation", [0, 0, 0]),
                                                                           tr["scale"]))


# ------------------------------------------------------------ NGFF reading
def make_store(path, axes, datasets, ms_transforms=None):
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    for d in datasets:
        g.create_array(d["path"], shape=(4, 4), dtype="uint8", fill_value=0)
    ms = {"axes": axes, "datasets": datasets}
    if ms_transforms:
        ms["coordinateTransformations"] = ms_transforms
    g.attrs["ome"] = {"version": "0.5", "multiscales": [ms]}
    return path


def test_ngff_units_and_multiscale_transforms_become_micrometres(tmp_path):
    axes = [{"name": "y", "type": "space", "unit": "nanometer"}, {"name": "x", "type": "space", "unit": "millimeter"}]
    ds = [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [10.0, 0.001]},
                                                      {"type": "translation", "translation": [500.0, 2.0]}]}]
    store = make_store(tmp_path / "a.ome.zarr", axes, ds, [{"type": "scale", "scale": [2.0, 1.0]}])
    d0 = ngff_placement(store)["datasets"][0]
    np.testing.assert_allclose(d0["scale"], [0.02, 1.0])           # 20 nm, 1 µm
    np.testing.assert_allclose(d0["translation"], [1.0, 2000.0])   # 1000 nm, 2 mm


def test_ngff_unsupported_transform_or_unit_is_named(tmp_path):
    axes = [{"name": "y", "type": "space", "unit": "micrometer"}, {"name": "x", "type": "space", "unit": "parsec"}]
    store = make_store(tmp_path / "b.ome.zarr", axes, [{"path": "0", "coordinateTransformations": [
        {"type": "scale", "scale": [1.0, 1.0]}]}])
    with pytest.raises(ViewError, match=r"axes\[1\]\.unit 'parsec'"):
        ngff_placement(store)
    axes[1]["unit"] = "micrometer"
    store = make_store(tmp_path / "c.ome.zarr", axes, [{"path": "0", "coordinateTransformations": [
        {"type": "affine", "affine": [[1, 0, 0], [0, 1, 0]]}]}])
    with pytest.raises(ViewError, match=r"datasets\[0\]\.coordinateTransformations\[0\]\.type: 'affine'"):
        ngff_placement(store)


# ------------------------------------------------------------ CLI and neuroglancer
def cli():
    from gui.view_cli import view_cmd
    app = typer.Typer()
    app.command()(view_cmd)
    return app


def test_cli_writes_a_neuroglancer_state_that_neuroglancer_parses(run_dir, tmp_path):
    ng = pytest.importorskip("neuroglancer")
    state_path = tmp_path / "ng.json"
    res = CliRunner().invoke(cli(), [str(run_dir), "--no-window", "--neuroglancer-state", str(state_path),
                                     "--url-root", "http://localhost:8000"])
    assert res.exit_code == 0, res.output
    assert "section 0000" in res.output and "overview" in res.output
    state = ng.ViewerState(json.loads(state_path.read_text()))
    dims = state.dimensions
    assert dims.names == ("x", "y", "z") and dims.units == ("m", "m", "m")
    assert len(state.layers) == 2
    for layer in state.layers:
        assert layer.type == "image"
        sid = int(layer.name.split()[-1])
        src = layer.source[0]
        assert src.url == f"zarr3://http://localhost:8000/zarr/{sid:04d}.ome.zarr/"
        tf = src.transform
        out = tf.output_dimensions
        assert out.names == ("z", "y", "x") and out.units == ("m", "m", "m")
        m = np.asarray(tf.matrix)
        # the voxel at index 0 (its centre) in metres, as neuroglancer computes it
        at0 = (m @ np.array([0, 0, 0, 1.0])) * out.scales
        ngff = json.loads((run_dir / f"zarr/{sid:04d}.ome.zarr/zarr.json").read_text())
        tr = {t["type"]: t[t["type"]] for t in
              ngff["attributes"]["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"]}
        np.testing.assert_allclose(at0, np.asarray(tr.get("translation", [0, 0, 0])) * 1e-6, atol=1e-12)
        step = (m @ np.array([1, 1, 1, 1.0]) - m @ np.array([0, 0, 0, 1.0])) * out.scales
        np.testing.assert_allclose(step, np.asarray(tr["scale"]) * 1e-6, rtol=1e-9)
    again = ng.ViewerState(state.to_json())                                  # round-trips
    np.testing.assert_allclose(again.layers[0].source[0].transform.matrix, state.layers[0].source[0].transform.matrix)


def test_neuroglancer_state_needs_sections_and_a_url(run_dir):
    specs = run_layers(run_dir)
    with pytest.raises(ViewError, match="--url-root 'localhost:8000'"):
        neuroglancer_state(run_dir, specs, "localhost:8000")
    with pytest.raises(ViewError, match="no section volumes"):
        neuroglancer_state(run_dir, [s for s in specs if s.kind != "section"], "http://h:1/")


def test_cli_refuses_bad_input_with_the_option_named(run_dir, tmp_path):
    app, runner = cli(), CliRunner()
    res = runner.invoke(app, [str(run_dir), "--no-window", "--neuroglancer-state", str(tmp_path / "a.json")])
    assert res.exit_code == 2 and "--url-root" in res.output
    taken = tmp_path / "taken.json"
    taken.write_text("{}")
    res = runner.invoke(app, [str(run_dir), "--no-window", "--neuroglancer-state", str(taken),
                              "--url-root", "http://localhost:8000/"])
    assert res.exit_code == 2 and "refusing to overwrite" in res.output and taken.read_text() == "{}"
    res = runner.invoke(app, [str(tmp_path / "nothing"), "--no-window"])
    assert res.exit_code == 2 and "not a folder" in res.output
    res = runner.invoke(app, [str(tmp_path), "--no-window"])
    assert res.exit_code == 2 and "nothing to show" in res.output
