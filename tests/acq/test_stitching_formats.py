"""The stitching formats as their consumers read them: TrakEM2's text import
(layer z in pixels), ASAP's / Render's MIPmap paths and sectionId, and the
Render push against a local stand-in of render-ws's API
(tests/support/render_ws.py), read back with render-python's own client."""
import json
import re
from urllib.parse import unquote, urlparse

import pytest
import renderapi
import requests

from acq.documents import RunStart, RunStop, SectionDone
from acq.writers import WriterOptions, make_writers
from acq.writers.manifest import Manifest
from acq.writers.trakem2 import TrakEM2Writer
from tests.support.render_ws import RenderWS
from tests.support.writer_docs import CYCLES, PX, SECTIONS, feed, run_docs, tile_doc

URL_ROOT = "file:///nrs/em/run%2042"        # where the Render server sees OUTDIR ('run 42': quoting)


@pytest.fixture
def render_ws():
    with RenderWS() as server:
        yield server


# ---------------------------------------------------------------- TrakEM2
def trakem2_layers(text: str, layer_thickness_nm: float, pixel_width_nm: float, calibration: float = 1.0):
    """What TrakEM2's Loader.importImages does with an import list (its
    documented rules): '#' starts a comment, columns path, x, y, z split on
    the separator; x, y and z are multiplied by the calibration, z is the
    layer's z in pixels (plus the base layer's, 0 here); the dialog's layer
    thickness is divided by the pixel width; a tile joins the layer whose z
    and thickness match within 1e-7, else a new layer is made.
    Returns {layer z: [paths]} and the thickness in pixels."""
    thickness = layer_thickness_nm / pixel_width_nm
    layers: list[tuple[float, float, list]] = []
    for line in text.splitlines():
        line = line.replace("\\", "/").split("#", 1)[0].strip()
        if not line:
            continue
        col = line.split("\t")
        assert len(col) >= 4 and col[0].startswith("/")
        x, y, z = (float(c) * calibration for c in col[1:4])
        for lz, lt, paths in layers:
            if abs(lz - z) < 1e-7 and abs(lt - thickness) < 1e-7:
                paths.append(col[0])
                break
        else:
            layers.append((z, thickness, [col[0]]))
    return {z: paths for z, _t, paths in sorted(layers)}, thickness


@pytest.mark.parametrize("slice_um", [0.05, 0.03])
def test_trakem2_layers_are_one_slice_thickness_apart(tmp_path, slice_um):
    out = tmp_path / "o"
    feed(make_writers(out, WriterOptions(ome_zarr=False, render_tilespecs=False, mipmaps=False,
                                         zarr_slice_um=slice_um)), run_docs())
    px_nm = PX * 1e9
    for section in SECTIONS:
        text = (out / f"trakem2/{section:04d}_import.txt").read_text()
        # the numbers the README tells a user to type: pixel width 8 nm, layer thickness = slice in nm
        layers, thickness = trakem2_layers(text, slice_um * 1e3, px_nm)
        assert len(layers) == len(CYCLES) and all(len(p) == 4 for p in layers.values())
        zs = sorted(layers)
        # layers touch: each one thickness above the last, i.e. slice_um apart in the specimen
        assert zs[0] == 0.0
        assert zs[1] - zs[0] == pytest.approx(thickness, abs=1e-6)
        assert (zs[1] - zs[0]) * px_nm == pytest.approx(slice_um * 1e3, abs=1e-4)
        for z, paths in layers.items():
            assert all(f"/tiles/{section:04d}/{round(z / thickness):04d}/" in p for p in paths)


def test_trakem2_section_started_before_z_in_pixels_keeps_its_z(tmp_path):
    """A resumed run whose section origin predates the rule keeps z = cycle for
    that section (one rule per section, not a mix)."""
    out = tmp_path / "o"
    docs = [d for d in run_docs() if getattr(d, "section_id", 0) == 0]
    cycle0 = [d for d in docs if getattr(d, "cycle", None) == 0]
    feed(make_writers(out, WriterOptions(ome_zarr=False, render_tilespecs=False, mipmaps=False)), cycle0)
    origin = out / "trakem2/0000_origin.json"
    d = json.loads(origin.read_text())
    for k in ("slice_m", "z_px_per_cycle"):
        del d[k]
    origin.chmod(0o644)
    origin.write_text(json.dumps(d))                 # as an older version wrote it
    # the per-cycle list of cycle 0 too (it had z = 0 either way); now cycle 1 after a restart
    w = TrakEM2Writer(out, Manifest(out), slice_um=0.05)
    for doc in [x for x in docs if getattr(x, "cycle", None) == 1]:
        w.handle(doc)
    zs = {float(line.split("\t")[3]) for line in (out / "trakem2/0000/0001_import.txt").read_text().splitlines()}
    assert zs == {1.0}


@pytest.mark.parametrize("bad", [0, -0.05, float("nan"), "50nm"])
def test_trakem2_refuses_a_slice_thickness_that_is_no_length(tmp_path, bad):
    with pytest.raises(ValueError, match="slice_um"):
        TrakEM2Writer(tmp_path, Manifest(tmp_path), slice_um=bad)


# ---------------------------------------------------------------- ASAP / Render MIPmaps and sectionId
def asap_mipmap_url(mipmap_prefix: str, level: int, level0_url: str) -> str:
    """asap.dataimport.apply_mipmaps_to_render.addMipMapsToRender (imgformat tif)."""
    return f"{mipmap_prefix.rstrip('/')}/{level}/{urlparse(level0_url).path.lstrip('/')}.tif"


def render_mipmap_path(root_path: str, level: int, level0_url: str, extension: str = "tif") -> str:
    """render-app MipmapPathBuilder.deriveMipmapUrl: root + level + what follows the scheme's ':'."""
    root = root_path if root_path.endswith("/") else root_path + "/"
    return f"{root}{level}{level0_url[level0_url.index(':') + 1:]}.{extension}"


def served_to_local(url: str, out):
    """The file in OUTDIR that the server's URL (under URL_ROOT) names."""
    rel = unquote(urlparse(url).path)[len(unquote(urlparse(URL_ROOT).path)):].lstrip("/")
    return out / rel


def test_mipmaps_are_where_asap_and_render_derive_them(tmp_path):
    out = tmp_path / "o"
    feed(make_writers(out, WriterOptions(ome_zarr=False, trakem2=False, image_url_root=URL_ROOT)), run_docs())
    specs = json.loads((out / "render/0003/0001/tilespecs.json").read_text())
    assert len(specs) == 4
    for d in specs:
        ts = renderapi.tilespec.TileSpec(json=d)
        url0 = ts.ip[0].imageUrl
        assert url0.startswith("file:///nrs/em/run%2042/tiles/0003/0001/")
        assert served_to_local(url0, out).is_file()
        for level in (1, 2, 3):
            url = ts.ip[level].imageUrl
            assert url == asap_mipmap_url(URL_ROOT + "/mipmaps", level, url0)
            # Render's builder with the server's path of OUTDIR/mipmaps finds the same file
            derived = render_mipmap_path("/nrs/em/run 42/mipmaps", level, unquote(url0))
            assert re.sub("/+", "/", derived) == unquote(urlparse(url).path)     # '//' is '/' to a file system
            assert served_to_local(url, out).is_file()


def test_local_mipmap_layout_does_not_name_the_output_folder(tmp_path):
    """Without image_url_root the layout is ASAP's minus the absolute part, so
    two runs (or a moved OUTDIR) lay out the same relative files."""
    rels = []
    for name in ("a", "b"):
        out = tmp_path / name
        feed(make_writers(out, WriterOptions(ome_zarr=False, trakem2=False, render_tilespecs=False)),
             [d for d in run_docs() if getattr(d, "section_id", 0) == 0])
        rels.append(sorted(p.relative_to(out).as_posix() for p in (out / "mipmaps").rglob("*.tif")))
    assert rels[0] == rels[1] and len(rels[0]) == 3 * 8
    assert all(r.endswith(".ome.tif.tif") and "/tiles/0000/" in r for r in rels[0])


def test_section_id_is_z_as_asap_writes_it_and_scope_is_carried(tmp_path):
    out = tmp_path / "o"
    feed(make_writers(out, WriterOptions(mipmaps=False, trakem2=False, ome_zarr=False, scope_id="merlin-1")),
         run_docs())
    for cycle in CYCLES:
        for d in json.loads((out / f"render/0000/{cycle:04d}/tilespecs.json").read_text()):
            ts = renderapi.tilespec.TileSpec(json=d)
            assert ts.layout.sectionId == str(float(ts.z)) == f"{cycle}.0"
            assert ts.layout.scopeId == "merlin-1"
            assert ts.layout.cameraId == "SE2"           # the detector the SEM reported (writer_docs metadata)


# ---------------------------------------------------------------- Render push, end to end
def push_options(server, **kw):
    return WriterOptions(render_push={"host": "127.0.0.1", "port": server.port, "owner": "lab",
                                      "project": "gcib", "stack": "raw", "retries": 2, "backoff_s": 0.0},
                         image_url_root=URL_ROOT, **kw)


def client(server):
    return renderapi.render.Render(host="http://127.0.0.1", port=server.port, owner="lab", project="gcib")


def test_a_runs_push_leaves_complete_stacks_with_its_tiles(tmp_path, render_ws):
    out = tmp_path / "o"
    docs = run_docs()
    writers = make_writers(out, push_options(render_ws, ome_zarr=False, trakem2=False))
    feed(writers, docs)
    for w in writers:
        w.close()
    r = client(render_ws)
    tiles = [d for d in docs if d.kind == "tile"]
    for section in SECTIONS:
        stack = f"raw_s{section:04d}"
        meta = renderapi.stack.get_full_stack_metadata(stack, render=r)
        assert meta["state"] == "COMPLETE"
        assert meta["currentVersion"]["stackResolutionZ"] == pytest.approx(50.0)
        assert meta["stats"]["tileCount"] == 8 and meta["stats"]["sectionCount"] == 2
        assert renderapi.stack.get_z_values_for_stack(stack, render=r) == [0.0, 1.0]
        # the latest version of every tile: the re-acquired one as _v1 only
        expect = {}
        for d in tiles:
            if d.section_id == section:
                expect[(d.cycle, d.tile_id)] = d.tile_id + (f"_v{d.version}" if d.version else "")
        assert sorted(renderapi.stack.get_stack_tileIds(stack, render=r)) == sorted(expect.values())
        for cycle in CYCLES:
            got = renderapi.tilespec.get_tile_specs_from_z(stack, float(cycle), render=r)
            assert sorted(t.tileId for t in got) == sorted(v for (c, _t), v in expect.items() if c == cycle)
            assert renderapi.stack.get_section_z_value(stack, f"{cycle}.0", render=r) == cycle
            for ts in got:
                url0 = ts.ip[0].imageUrl
                assert url0.startswith(f"file:///nrs/em/run%2042/tiles/{section:04d}/{cycle:04d}/{ts.tileId}")
                assert served_to_local(url0, out).is_file()
                assert sorted(int(k) for k in ts.ip) == [0, 1, 2, 3]
                assert all(served_to_local(ts.ip[lv].imageUrl, out).is_file() for lv in (1, 2, 3))
    assert render_ws.stack_names() == {f"raw_s{s:04d}" for s in SECTIONS}


def test_a_tile_reacquired_after_the_stack_was_completed_replaces_the_old_one(tmp_path, render_ws):
    """render-ws takes tiles and deletions only while a stack is LOADING: the
    push reopens a COMPLETE stack (new stack version) and completes it again."""
    out = tmp_path / "o"
    opts = push_options(render_ws, ome_zarr=False, trakem2=False, mipmaps=False)
    section0 = [d for d in run_docs() if getattr(d, "section_id", 0) == 0 and getattr(d, "cycle", 0) == 0]
    first = make_writers(out, opts)
    feed(first, section0 + [RunStop("run1", "success")])
    st = render_ws.stack("raw_s0000")
    assert st.state == "COMPLETE" and st.version_number == 0
    late = tile_doc(0, 0, 1, 1, version=1)
    again = make_writers(out, opts)
    feed(again, [RunStart("run1", plan={}, setup={}, software_version="t", out_dir=str(out), resumed=True),
                 late, SectionDone("run1", 0, 0, [late.tile_id]), RunStop("run1", "success")])
    assert st.state == "COMPLETE" and st.version_number == 1
    assert late.tile_id + "_v1" in st.tiles and late.tile_id not in st.tiles and len(st.tiles) == 4


# ---------------------------------------------------------------- the stand-in refuses what render-ws refuses
def test_render_ws_stand_in_refuses_like_render_ws(render_ws):
    base = f"http://127.0.0.1:{render_ws.port}/render-ws/v1/owner/lab/project/gcib/stack"
    r = client(render_ws)
    assert requests.get(f"{base}/nope").status_code == 404
    assert requests.put(f"{base}/nope/state/COMPLETE").status_code == 404
    assert requests.post(f"{base}/s", data="{not json", headers={"content-type": "application/json"}
                         ).status_code == 400
    renderapi.stack.create_stack("s", stackResolutionZ=50.0, render=r)
    assert requests.put(f"{base}/s/state/READ_ONLY").status_code == 400      # LOADING -> COMPLETE only
    spec = {"tileId": "t", "z": 0.0, "width": 10, "height": 10,
            "mipmapLevels": {"0": {"imageUrl": "file:///x.tif"}},
            "transforms": {"type": "list", "specList": [
                {"type": "leaf", "className": "mpicbg.trakem2.transform.AffineModel2D",
                 "dataString": "1 0 0 1 5 7"}]}}
    body = {"transformIdToSpecMap": {}, "tileIdToSpecMap": {"t": spec}}
    assert requests.put(f"{base}/s/resolvedTiles", json=body).status_code == 400     # no bounding box
    assert requests.put(f"{base}/s/resolvedTiles?deriveData=true", json=body).status_code == 201
    assert render_ws.stack("s").tiles["t"]["minX"] == 5 and render_ws.stack("s").tiles["t"]["maxY"] == 17
    assert requests.put(f"{base}/s/z/1.0/resolvedTiles?deriveData=true", json=body).status_code == 400
    renderapi.stack.set_stack_state("s", "COMPLETE", render=r)
    # a COMPLETE stack takes no tiles and no deletions
    assert requests.put(f"{base}/s/resolvedTiles?deriveData=true", json=body).status_code == 500
    with pytest.raises(renderapi.errors.RenderError):
        renderapi.stack.delete_tile("s", "t", render=r)
    assert requests.delete(f"{base}/s/z/0.0").status_code == 400
    assert renderapi.tilespec.get_tile_specs_from_z("s", 0.0, render=r)[0].tileId == "t"
    renderapi.stack.delete_stack("s", render=r)
    assert requests.get(f"{base}/s").status_code == 404
