"""Writers: synthetic runs (2 sections x 2x2 tiles x 2 cycles) through make_writers."""
import json
import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import cv2
import numpy as np
import pytest
import renderapi
import tifffile
import zarr

from acq.documents import SectionDone
from acq.writers import (WriterOptions, WrittenFile, make_writers, next_version, read_manifest,
                         read_tile_header, tile_relpath, verify_manifest)
from tests.support.writer_docs import (CYCLES, H, PX, REACQ, ROT, SECTIONS, STEP_X, STEP_Y, SUBPX, W, expected_plane,
                                       feed, origin, rot, tile_doc)
from tests.support.output_damage import damage
from tests.support.zarr_checks import centre_offset_px, ngff_levels

def latest(tiles):
    best = {}
    for (s, c, r, col, v), d in tiles.items():
        if v >= best.get((s, c, r, col), (-1, None))[0]:
            best[(s, c, r, col)] = (v, d)
    return {k: d for k, (v, d) in best.items()}


# ---------------------------------------------------------------- OME-TIFF
def test_ome_tiff_pixels_pixel_size_and_metadata(run):
    out, _docs, tiles, files = run
    for d in tiles.values():
        p = out / tile_relpath(d.section_id, d.cycle, d.tile_id, d.version)
        with tifffile.TiffFile(p) as tf:
            assert tf.is_ome
            np.testing.assert_array_equal(tf.asarray(), d.image)
            root = ET.fromstring(tf.ome_metadata)
        px = root.find(".//{*}Pixels")
        assert float(px.get("PhysicalSizeX")) == pytest.approx(PX * 1e6)
        assert float(px.get("PhysicalSizeY")) == pytest.approx(PX * 1e6)
        assert px.get("PhysicalSizeXUnit") == "µm"
        plane = root.find(".//{*}Plane")          # the centre of pixel (0, 0), not the frame's centre
        x0, y0 = rot(d.rotation_deg) @ [(0.5 - W / 2) * PX, (0.5 - H / 2) * PX] + [d.stage["x"], d.stage["y"]]
        assert float(plane.get("PositionX")) == pytest.approx(x0 * 1e6)
        assert float(plane.get("PositionY")) == pytest.approx(y0 * 1e6)
        h = read_tile_header(p)
        assert (h["tile_id"], h["version"], h["cycle"], h["section_id"]) == (d.tile_id, d.version, d.cycle,
                                                                             d.section_id)
        assert h["stage"] == pytest.approx(d.stage) and h["wd_m"] == d.wd_m
        assert h["stig"] == list(d.stig) and h["dwell_s"] == d.dwell_s and h["t_start"] == d.t_start
        assert h["qc"] == d.qc and h["metadata"] == d.metadata and h["shape"] == [H, W]
    tile_files = [f for f in files if f.kind == "tile"]
    assert len(tile_files) == len(tiles)
    assert all(isinstance(f, WrittenFile) and os.fspath(f) == str(f.path) for f in tile_files)


def test_reacquired_tile_is_a_new_file_and_both_are_listed(run):
    out, _docs, tiles, _files = run
    s, c, r, col = REACQ
    v0, v1 = tiles[(s, c, r, col, 0)], tiles[(s, c, r, col, 1)]
    p0 = out / tile_relpath(s, c, v0.tile_id, 0)
    p1 = out / tile_relpath(s, c, v1.tile_id, 1)
    assert tifffile.imread(p0).max() == 0 and np.array_equal(tifffile.imread(p1), v1.image)
    listed = {(e["path"], e["version"]) for e in read_manifest(out) if e["kind"] == "tile"}
    assert (p0.relative_to(out).as_posix(), 0) in listed and (p1.relative_to(out).as_posix(), 1) in listed
    assert next_version(out, s, c, v0.tile_id) == 2


# ---------------------------------------------------------------- MIPmaps
def test_mipmaps_at_asap_paths_halving(run):
    out, _docs, tiles, _files = run
    for d in tiles.values():
        rel = tile_relpath(d.section_id, d.cycle, d.tile_id, d.version)
        prev = d.image
        for level in (1, 2, 3):
            p = out / "mipmaps" / str(level) / (rel + ".tif")      # ASAP/Render: the level-0 name + .tif
            img = tifffile.imread(p)
            assert img.shape == (H >> level, W >> level)
            np.testing.assert_array_equal(img, cv2.resize(prev, (prev.shape[1] // 2, prev.shape[0] // 2),
                                                          interpolation=cv2.INTER_AREA))
            prev = img


# ---------------------------------------------------------------- Render tile specs
def url_path(url):
    u = urlparse(url)
    assert u.scheme == "file"
    return Path(url2pathname(u.path))


def test_tilespecs_load_with_renderapi_and_are_right(run):
    out, _docs, tiles, _files = run
    final = latest(tiles)
    for section in SECTIONS:
        for cycle in CYCLES:
            specs = json.loads((out / f"render/{section:04d}/{cycle:04d}/tilespecs.json").read_text())
            assert len(specs) == 4
            for d in specs:
                ts = renderapi.tilespec.TileSpec(json=d)
                assert ts.to_dict() == d                    # nothing renderapi does not know
                row, col = ts.layout.imageRow, ts.layout.imageCol
                src = final[(section, cycle, row, col)]
                expect_id = src.tile_id + (f"_v{src.version}" if src.version else "")
                assert ts.tileId == expect_id and ts.z == float(cycle)
                assert (ts.width, ts.height, ts.minint, ts.maxint) == (W, H, 0, 255)
                assert ts.layout.stageX == pytest.approx(src.stage["x"] * 1e6)
                assert ts.layout.stageY == pytest.approx(src.stage["y"] * 1e6)
                assert ts.layout.pixelsize == pytest.approx(PX * 1e9) and ts.layout.rotation == ROT[section]
                (tf,) = ts.tforms
                assert isinstance(tf, renderapi.transform.AffineModel)
                # tile pixels -> stage pixels: the corner where the grid put it, the centre at the stage
                x0, y0 = origin(section)
                corner = rot(ROT[section]) @ [x0 + col * STEP_X + SUBPX, y0 + row * STEP_Y + SUBPX]
                got = tf.tform(np.array([[0.0, 0.0], [W / 2, H / 2]]))
                np.testing.assert_allclose(got[0], corner, atol=1e-6)
                np.testing.assert_allclose(got[1], [src.stage["x"] / PX, src.stage["y"] / PX], atol=1e-6)
                if ROT[section] == 0:
                    assert tf.M00 == tf.M11 == 1.0 and tf.M01 == tf.M10 == 0.0
                urls = {int(k): v.imageUrl for k, v in ts.ip.items()}
                assert sorted(urls) == [0, 1, 2, 3]
                for level, url in urls.items():
                    p = url_path(url)
                    assert p.is_file()
                    assert tifffile.imread(p).shape == (H >> level, W >> level)
                np.testing.assert_array_equal(tifffile.imread(url_path(urls[0])), src.image)


# ---------------------------------------------------------------- TrakEM2
def test_trakem2_lists(run):
    out, _docs, tiles, _files = run
    final = latest(tiles)
    for section in SECTIONS:
        lines = (out / f"trakem2/{section:04d}_import.txt").read_text().splitlines()
        assert len(lines) == 4 * len(CYCLES)
        pos = {}
        for line in lines:
            path, x, y, z = line.split("\t")
            assert Path(path).is_file() and Path(path).is_absolute()
            h = read_tile_header(Path(path))
            src = final[(section, h["cycle"], h["row"], h["col"])]
            # TrakEM2 reads z in pixels: 50 nm milled per cycle (the default) at 8 nm pixels
            assert h["version"] == src.version and float(z) == pytest.approx(h["cycle"] * 50 / 8)
            pos[(h["cycle"], h["row"], h["col"])] = (float(x), float(y))
        # x/y are pixels in one frame for all cycles
        for cycle in CYCLES:
            assert pos[(cycle, 0, 1)][0] - pos[(cycle, 0, 0)][0] == pytest.approx(STEP_X)
            assert pos[(cycle, 1, 0)][1] - pos[(cycle, 0, 0)][1] == pytest.approx(STEP_Y)
            assert pos[(cycle, 1, 1)] == pytest.approx(pos[(1, 1, 1)])
        for cycle in CYCLES:
            per_cycle = (out / f"trakem2/{section:04d}/{cycle:04d}_import.txt").read_text().splitlines()
            assert len(per_cycle) == 4 and set(per_cycle) <= set(lines)


# ---------------------------------------------------------------- OME-Zarr
def check_pyramid(arrays, z):
    prev = arrays[0][z]
    for a in arrays[1:]:
        cur = a[z]
        np.testing.assert_array_equal(cur, cv2.resize(prev, (cur.shape[1], cur.shape[0]),
                                                      interpolation=cv2.INTER_AREA))
        prev = cur


def test_ome_zarr_tiles_at_stage_positions_and_pyramid(run):
    """Every tile's centre lies within 1 px of its stage position in the
    store's own metadata, sections turned by a scan rotation included; the
    pyramid is exact; NGFF 0.5 validates (ome-zarr-models) and ome-zarr-py reads it."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    out, docs, tiles, _files = run
    for section in SECTIONS:
        root = out / f"zarr/{section:04d}.ome.zarr"
        g = zarr.open_group(root, mode="r")
        a0, a1, a2 = g["0"], g["1"], g["2"]
        assert a0.dtype == np.uint8 and a0.shape[0] == max(CYCLES) + 1
        assert a1.shape == (a0.shape[0], a0.shape[1] // 2, a0.shape[2] // 2)
        assert a2.shape == (a0.shape[0], a0.shape[1] // 4, a0.shape[2] // 4)
        levels = ngff_levels(root)
        assert levels[0][0] == pytest.approx([0.05, PX * 1e6, PX * 1e6])
        assert levels[2][0] == pytest.approx([0.05, 4 * PX * 1e6, 4 * PX * 1e6])
        for cycle in CYCLES:
            plane = a0[cycle]
            for d in latest(tiles).values():
                if (d.section_id, d.cycle) == (section, cycle):
                    assert centre_offset_px(plane, *levels[0], d) <= 1.0, d.tile_id
            if ROT[section] == 0:        # unrotated: the tiles themselves, at their nearest pixel
                org = np.round(levels[0][1][1:][::-1] / (PX * 1e6)).astype(int)
                np.testing.assert_array_equal(plane, expected_plane(docs, section, cycle, org, plane.shape))
            check_pyramid([a0, a1, a2], cycle)      # each level: exact 2x2 box mean of the one below
        nodes = list(Reader(parse_url(str(root)))())
        assert len(nodes[0].data) == 3 and tuple(nodes[0].data[1].shape) == a1.shape


def test_ome_zarr_rotated_section_matches_the_specimen(run):
    """Section 3 lies turned by 30 degrees: in the stage frame the volume shows
    the specimen turned the same way (sampled independently with cv2)."""
    out, _docs, _tiles, _files = run
    root = out / "zarr/0003.ome.zarr"
    (scale, shift), *_ = ngff_levels(root)
    plane = zarr.open_group(root, mode="r")["0"][0].astype(np.float32)
    # stage pixel p = R(30) @ section-frame pixel
    x0, y0 = origin(3)
    ys, xs = np.mgrid[0:plane.shape[0], 0:plane.shape[1]]
    sx = xs + shift[2] / scale[2]
    sy = ys + shift[1] / scale[1]
    fx, fy = rot(-ROT[3]) @ np.stack([sx.ravel(), sy.ravel()])
    # world pixel k's centre lies at section-frame x0 + SUBPX + k + 1/2 (tile_doc)
    wx = (fx - x0 - SUBPX - 0.5).reshape(plane.shape).astype(np.float32)
    wy = (fy - y0 - SUBPX - 0.5).reshape(plane.shape).astype(np.float32)
    world = __import__("tests.support.writer_docs", fromlist=["world"]).world(3, 0)
    ref = cv2.remap(world, wx, wy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    inside = (wx > 2) & (wy > 2) & (wx < STEP_X + W - 3) & (wy < STEP_Y + H - 3)
    assert inside.sum() > 0.8 * (STEP_X + W) * (STEP_Y + H)
    diff = np.abs(plane[inside] - ref[inside])
    assert np.corrcoef(plane[inside], ref[inside])[0, 1] > 0.98 and np.median(diff) <= 2
    assert not plane[~((wx > -2) & (wy > -2) & (wx < STEP_X + W + 1) & (wy < STEP_Y + H + 1))].any()


def test_ome_zarr_odd_tile_size_keeps_exact_pyramid(tmp_path):
    """Tiles whose size is not a multiple of 4 need border read-back at each level."""
    out = tmp_path / "odd"
    # a cache of a few chunks: the plane is written through evictions and re-reads
    (w,) = make_writers(out, WriterOptions(ome_tiff=False, mipmaps=False, render_tilespecs=False,
                                           trakem2=False, zarr_chunk=64, zarr_cache_mb=0))
    rng = np.random.default_rng(7)
    docs = []
    # bottom-right first, so later tiles' odd borders fall on pixels already written
    for row, col, dx, dy in [(1, 1, 69, 57), (1, 0, -2, 53), (0, 1, 71, 3), (0, 0, 0, 0)]:
        d = tile_doc(0, 0, row, col, image=rng.integers(0, 256, (61, 83), dtype=np.uint8))
        x0, y0 = origin(0)
        d.stage = dict(d.stage, x=(x0 + dx + 83 / 2 + SUBPX) * PX, y=(y0 + dy + 61 / 2 + SUBPX) * PX)
        docs.append(d)
    feed([w], docs)
    feed([w], [SectionDone("run1", 0, 0, [d.tile_id for d in docs])])
    g = zarr.open_group(out / "zarr/0000.ome.zarr", mode="r")
    arrays = [g[str(i)] for i in range(3)]
    plane = arrays[0][0]
    np.testing.assert_array_equal(plane, expected_plane(docs, 0, 0, g.attrs["acq"]["origin_px"], plane.shape))
    check_pyramid(arrays, 0)
    assert arrays[0].shape[1] % 64 == 0 and arrays[0].shape[1] >= 53 + 61


# ---------------------------------------------------------------- manifest
def test_manifest_lists_every_file_and_verifies(run):
    out, _docs, _tiles, files = run
    entries = read_manifest(out)
    listed = {e["path"] for e in entries}
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    # not listed by design: the manifest itself, append-only state logs, zarr.json (rewritten as arrays grow)
    unlisted = {p for p in on_disk - listed
                if p != "manifest.jsonl" and not p.endswith(("zarr.json", ".tiles.jsonl"))}
    assert not unlisted
    assert not (listed - on_disk)
    for e in entries:
        assert set(e) == {"path", "sha256", "bytes", "kind", "tile_id", "version", "time"}
    kinds = {e["kind"] for e in entries}
    assert {"tile", "mipmap", "tilespec", "trakem2", "trakem2_index", "zarr"} <= kinds
    assert {Path(f.path).relative_to(out).as_posix() for f in files} <= listed
    assert verify_manifest(out) == []
    assert not list(out.rglob("*.part")) and not list(out.rglob("*.partial"))


def test_verify_manifest_finds_corruption_and_loss(run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(run[0], out)
    tile, chunk, spec = damage(out)
    problems = verify_manifest(out)
    assert any(tile in p and "sha256" in p for p in problems)
    assert any(chunk in p and "bytes" in p for p in problems)
    assert any(spec in p and "missing" in p for p in problems)
    assert len(problems) == 3
