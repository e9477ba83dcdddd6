"""A run's output, loaded by the tools downstream of the microscope:
tifffile (OME-TIFF), render-python (tile specs), zarr (OME-Zarr), TrakEM2
import files, and the manifest's checksums."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from tests.support.engine_runs import write_plan, write_setup


ALL_WRITERS = {"output": {"writers": ["ome_tiff", "mipmaps", "render_tilespecs", "trakem2", "ome_zarr"],
                          "queue_maxsize": 4}}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from acq.cli import run_plan
    tmp = tmp_path_factory.mktemp("run")
    plan = write_plan(tmp, write_setup(tmp), **ALL_WRITERS)
    out = tmp / "out"
    assert run_plan(plan, out=out) == 0
    return out


def test_tiles_are_ome_tiff_with_physical_pixel_size(run_dir):
    tiles = sorted((run_dir / "tiles").rglob("*.ome.tif"))
    assert len(tiles) == 8
    with tifffile.TiffFile(tiles[0]) as t:
        assert t.is_ome
        img = t.asarray()
        ome = t.ome_metadata
    assert img.shape == (192, 256) and img.dtype == np.uint8
    assert 'PhysicalSizeX="0.01"' in ome and 'PhysicalSizeXUnit="µm"' in ome


def test_tilespecs_load_in_render_python_and_point_at_files(run_dir):
    import renderapi
    specs = sorted((run_dir / "render").rglob("tilespecs*.json"))
    assert specs
    for path in specs:
        for d in json.loads(path.read_text()):
            ts = renderapi.tilespec.TileSpec(json=d)
            assert ts.width == 256 and ts.height == 192
            url = ts.ip[0].imageUrl if hasattr(ts.ip, "__getitem__") else ts.ip.get(0)["imageUrl"]
            assert Path(url.removeprefix("file://")).is_file()
            assert ts.layout.sectionId is not None and ts.tforms


def test_ome_zarr_opens_with_a_multiscale_pyramid(run_dir):
    import zarr
    groups = sorted((run_dir / "zarr").glob("*.ome.zarr"))
    assert len(groups) == 2
    g = zarr.open_group(str(groups[0]), mode="r")
    ms = g.attrs.asdict().get("ome", g.attrs.asdict()).get("multiscales")
    assert ms and len(ms[0]["datasets"]) >= 2
    full, half = g[ms[0]["datasets"][0]["path"]], g[ms[0]["datasets"][1]["path"]]
    assert full.shape[0] == 2                                  # z = two cycles
    assert half.shape[-1] in (full.shape[-1] // 2, (full.shape[-1] + 1) // 2)
    assert np.asarray(full[0]).std() > 1                       # tiles were pasted


def test_trakem2_import_files_list_existing_tiles(run_dir):
    files = sorted((run_dir / "trakem2").glob("*_import.txt"))
    assert len(files) == 2
    for f in files:
        for line in f.read_text().splitlines():
            path, x, y, z = line.split("\t")
            assert Path(path).is_file()
            float(x), float(y), float(z)


def test_manifest_lists_every_file_with_its_checksum(run_dir):
    from acq.writers.manifest import verify_manifest
    lines = [json.loads(l) for l in (run_dir / "manifest.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in lines}
    assert {"tile", "mipmap", "tilespec", "trakem2", "zarr"} <= kinds
    tile = next(r for r in lines if r["kind"] == "tile")
    data = (run_dir / tile["path"]).read_bytes()
    assert tile["sha256"] == hashlib.sha256(data).hexdigest() and tile["bytes"] == len(data)
    assert tile["tile_id"].startswith("c0000_s")
    assert verify_manifest(run_dir) == []
