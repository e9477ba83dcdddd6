"""Writers, resilience: no overwrite, atomicity, late re-acquisition, crash
recovery, restart of the tile-spec writer, options, and the Render push
against a local stand-in of render-ws's API on 127.0.0.1 (tests/support/render_ws.py)."""
import json
import os
import shutil

import numpy as np
import pytest
import tifffile
import zarr

from common.atomic import FileExists
from acq.documents import RunStart, RunStop, SectionDone
from acq.writers import (WriterOptions, make_writers, options_from_plan, read_manifest, tile_relpath,
                         verify_manifest)
from acq.writers.manifest import Manifest
from acq.writers.tilespecs import TileSpecWriter
from tests.support.render_ws import RenderWS
from tests.support.writer_docs import H, W, expected_plane, feed, run_docs, tile_doc


def test_tilespecs_rebuilt_from_disk_after_restart(run, tmp_path):
    out, docs, _tiles, _files = run
    # a fresh writer (resumed run) has no tiles in memory: it reads the TIFF headers
    work = tmp_path / "copy"
    shutil.copytree(out, work)
    w = TileSpecWriter(work, Manifest(work), mipmap_levels=3)
    done = [d for d in docs if d.kind == "section_done"][0]
    before = (work / f"render/{done.section_id:04d}/{done.cycle:04d}/tilespecs.json").read_text()
    (wf,) = w.handle(done)
    # the same content references the copy's paths, so it is a new revision, not an overwrite
    new = json.loads(wf.path.read_text())
    old = json.loads(before)
    assert [s["tileId"] for s in new] == [s["tileId"] for s in old]
    assert [s["transforms"] for s in new] == [s["transforms"] for s in old]
    assert (work / f"render/{done.section_id:04d}/{done.cycle:04d}/tilespecs.json").read_text() == before


def test_ome_zarr_holds_plane_in_memory_and_recovers_after_a_crash(tmp_path):
    out = tmp_path / "crash"
    opts = WriterOptions(mipmaps=False, render_tilespecs=False, trakem2=False)
    docs = [d for d in run_docs() if getattr(d, "section_id", None) == 0 and getattr(d, "cycle", None) == 0]
    tiles, done = docs[:-1], docs[-1]
    first = make_writers(out, opts)
    feed(first, tiles)
    assert not (out / "zarr/0000.ome.zarr/0/c").exists()      # written when the plane is done
    # crash: the first writers vanish without SectionDone or close; the run resumes
    second = make_writers(out, opts)
    feed(second, [RunStart("run1", plan={}, setup={}, software_version="t", out_dir=str(out), resumed=True)])
    g = zarr.open_group(out / "zarr/0000.ome.zarr", mode="r")
    plane = g["0"][0]
    np.testing.assert_array_equal(plane, expected_plane(tiles, 0, 0, g.attrs["acq"]["origin_px"], plane.shape))
    journal = (out / "zarr/0000.tiles.jsonl").read_text().splitlines()
    assert len(journal) == 4
    feed(second, [done])                                       # nothing left to recover: no re-read
    assert len((out / "zarr/0000.tiles.jsonl").read_text().splitlines()) == 4
    assert verify_manifest(out) == []


# ---------------------------------------------------------------- never overwrite, atomic
def test_existing_file_is_never_overwritten_but_replay_is_harmless(run, tmp_path):
    out = tmp_path / "o"
    writers = make_writers(out, WriterOptions(ome_zarr=False))
    d = tile_doc(0, 0, 0, 0)
    feed(writers, [d])
    p = out / tile_relpath(0, 0, d.tile_id, 0)
    before = p.read_bytes()
    n = len(read_manifest(out))
    feed(writers, [d])                                 # the engine re-sends the same document
    assert p.read_bytes() == before and verify_manifest(out) == []
    other = tile_doc(0, 0, 0, 0, image=np.full((H, W), 9, np.uint8))
    for w in writers[:2]:                              # OME-TIFF and MIPmap writers
        with pytest.raises(FileExists):
            w.handle(other)
    assert p.read_bytes() == before
    assert len(read_manifest(out)) == 2 * n            # replay lines only, nothing for the refused one


@pytest.mark.parametrize("fail_at", ["write", "fsync", "link"])
def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch, fail_at):
    import common.atomic as atomic
    out = tmp_path / "o"
    (w,) = make_writers(out, WriterOptions(mipmaps=False, render_tilespecs=False, trakem2=False,
                                           ome_zarr=False))
    d = tile_doc(0, 0, 1, 1)

    class Boom(OSError):
        pass

    def boom(*a, **k):
        raise Boom("disk full")
    if fail_at == "write":                            # the temp file gets half the bytes, then fails
        import acq.writers.ome_tiff as ot
        real = ot.tifffile.imwrite

        def half(target, *a, **k):
            real(target, *a, **k)
            os.truncate(target, os.path.getsize(target) // 2)
            raise Boom("disk full")
        monkeypatch.setattr(ot.tifffile, "imwrite", half)
    else:
        monkeypatch.setattr(atomic.os, fail_at, boom)
    with pytest.raises(Boom):
        w.handle(d)
    monkeypatch.undo()
    left = [p for p in out.rglob("*") if p.is_file()]
    assert left == [] or [p.name for p in left] == []
    assert read_manifest(out) == []
    (wf,) = w.handle(d)                               # after the fault the tile goes through
    assert np.array_equal(tifffile.imread(wf.path), d.image)


# ---------------------------------------------------------------- late re-acquisition
def test_late_reacquisition_after_section_done(tmp_path):
    out = tmp_path / "late"
    writers = make_writers(out, WriterOptions())
    docs = [d for d in run_docs() if getattr(d, "section_id", 0) == 0 and getattr(d, "cycle", 0) == 0]
    feed(writers, docs)
    spec0 = (out / "render/0000/0000/tilespecs.json").read_bytes()
    v0 = tile_doc(0, 0, 1, 1)
    late = tile_doc(0, 0, 1, 1, version=1, image=255 - v0.image)   # changes zarr chunks already recorded
    chunks = {e["path"]: e["sha256"] for e in read_manifest(out) if e["kind"] == "zarr"}
    feed(writers, [late, SectionDone("run1", 0, 0, [late.tile_id])])
    rechunks = {e["path"]: e["sha256"] for e in read_manifest(out) if e["kind"] == "zarr"}
    assert rechunks.keys() == chunks.keys() and rechunks != chunks
    assert (out / "render/0000/0000/tilespecs.json").read_bytes() == spec0
    rev = json.loads((out / "render/0000/0000/tilespecs.1.json").read_text())
    assert len(rev) == 4 and late.tile_id + "_v1" in {s["tileId"] for s in rev}
    index = (out / "trakem2/0000_import.txt").read_text()
    assert f"{late.tile_id}_v1.ome.tif" in index and f"{late.tile_id}_v0.ome.tif" not in index
    assert verify_manifest(out) == []
    # once more, and this time the engine sends no SectionDone: RunStop still settles the plane
    later = tile_doc(0, 0, 1, 1, version=2)
    feed(writers, [later, RunStop("run1", "aborted")])
    rev2 = json.loads((out / "render/0000/0000/tilespecs.2.json").read_text())
    assert len(rev2) == 4 and later.tile_id + "_v2" in {s["tileId"] for s in rev2}
    assert f"{late.tile_id}_v2.ome.tif" in (out / "trakem2/0000_import.txt").read_text()
    g = zarr.open_group(out / "zarr/0000.ome.zarr", mode="r")
    plane = g["0"][0]
    np.testing.assert_array_equal(plane, expected_plane(docs + [late, later], 0, 0, g.attrs["acq"]["origin_px"],
                                                        plane.shape))
    assert verify_manifest(out) == []


# ---------------------------------------------------------------- options
def test_options_validation(tmp_path):
    with pytest.raises(Exception):
        WriterOptions(bogus=True)
    with pytest.raises(Exception):
        WriterOptions(ome_tiff=False)                       # MIPmaps/specs would point at nothing
    assert WriterOptions(ome_tiff=False, mipmaps=False, render_tilespecs=False, trakem2=False)
    with pytest.raises(Exception, match="zarr_shard"):
        WriterOptions(zarr_levels=4, zarr_chunk=100, zarr_shard=300)      # 300: not a multiple of 2**3
    with pytest.raises(Exception, match="zarr_shard"):
        WriterOptions(zarr_chunk=64, zarr_shard=96)
    o = options_from_plan(["ome_tiff", "ome_zarr"], {"ome_zarr": {"zarr_levels": 4}})
    assert o.ome_zarr and not o.mipmaps and o.zarr_levels == 4 and o.render_push is None
    with pytest.raises(ValueError):
        options_from_plan(["ome_tiff", "hdf5"])
    kinds = [type(w).__name__ for w in make_writers(tmp_path, WriterOptions(trakem2=False))]
    assert kinds == ["OmeTiffWriter", "MipmapWriter", "TileSpecWriter", "OmeZarrWriter"]


# ---------------------------------------------------------------- Render push (tests/support/render_ws.py)
@pytest.fixture
def render_ws():
    with RenderWS() as server:
        yield server


def push_options(fake, **kw):
    return WriterOptions(render_push={"host": "127.0.0.1", "port": fake.port, "owner": "lab", "project": "gcib",
                                      "stack": "raw", "retries": 3, "backoff_s": 0.0}, **kw)


def test_render_push_imports_sections_and_completes_stacks(tmp_path, render_ws):
    out = tmp_path / "push"
    writers = make_writers(out, push_options(render_ws, ome_zarr=False))
    render_ws.fail_next = 2                   # the first requests fail: retried with backoff
    docs = run_docs()
    feed(writers, docs)
    assert sum(1 for c in render_ws.calls if c[0] == "POST") >= 2
    assert render_ws.stack_names() == {"raw_s0000", "raw_s0003"}
    for name in ("raw_s0000", "raw_s0003"):
        st = render_ws.stack(name, owner="lab", project="gcib")
        assert st.state == "COMPLETE"
        assert st.version["stackResolutionX"] == pytest.approx(8.0)
        assert st.version["stackResolutionZ"] == pytest.approx(50.0)
        section = int(name[-4:])
        local = []
        for cycle in (0, 1):
            local += json.loads((out / f"render/{section:04d}/{cycle:04d}/tilespecs.json").read_text())
        assert len(local) == 8
        # what was written locally, plus the bounding box the server derives
        stored = {i: {k: v for k, v in t.items() if k not in ("minX", "minY", "maxX", "maxY")}
                  for i, t in st.tiles.items()}
        assert stored == {d["tileId"]: d for d in local}
        assert {d["z"] for d in st.tiles.values()} == {0.0, 1.0}
    state = [json.loads(x) for x in (out / "render/push_state.jsonl").read_text().splitlines()]
    assert sorted((d["section"], d["cycle"]) for d in state if "cycle" in d) == [(0, 0), (0, 1), (3, 0), (3, 1)]
    assert sorted(d["stack"] for d in state if d.get("complete")) == ["raw_s0000", "raw_s0003"]
    for w in writers:
        w.close()

    # a resumed run pushes nothing twice
    render_ws.calls.clear()
    again = make_writers(out, push_options(render_ws, ome_zarr=False))
    feed(again, [RunStart("run1", plan={}, setup={}, software_version="t", out_dir=str(out), resumed=True),
                 RunStop("run1", "success")])
    assert not any(path.endswith("resolvedTiles") for _m, path in render_ws.calls)


def test_render_push_survives_an_outage_and_catches_up(tmp_path, render_ws):
    out = tmp_path / "outage"
    docs = run_docs()
    plane = {k: [d for d in docs if (getattr(d, "section_id", None), getattr(d, "cycle", None)) == k]
             for k in [(0, 0), (3, 0)]}
    writers = make_writers(out, push_options(render_ws, ome_zarr=False, trakem2=False))
    render_ws.down = True
    feed(writers, docs[:1] + plane[(0, 0)])   # the push fails after its retries: acquisition goes on
    assert render_ws.stacks == {} and not (out / "render/push_state.jsonl").exists()
    tried = len(render_ws.calls)
    assert tried == 3                          # create_stack, 3 tries
    feed(writers, plane[(3, 0)])               # holding off: this SectionDone sends nothing
    assert len(render_ws.calls) == tried
    feed(writers, [RunStop("run1", "aborted")])   # one last try at the end, still down
    assert len(render_ws.calls) == tried + 3 and render_ws.stacks == {}
    for w in writers:
        w.close()
    render_ws.down = False
    # next start: the pending sections are found on disk and pushed
    again = make_writers(out, push_options(render_ws, ome_zarr=False, trakem2=False))
    feed(again, [RunStart("run1", plan={}, setup={}, software_version="t", out_dir=str(out), resumed=True)])
    feed(again, [RunStop("run1", "success")])
    for name in ("raw_s0000", "raw_s0003"):
        st = render_ws.stack(name)
        assert len(st.tiles) == 4 and st.state == "COMPLETE"


def test_render_push_replaces_a_superseded_tile(tmp_path, render_ws):
    out = tmp_path / "late"
    writers = make_writers(out, push_options(render_ws, ome_zarr=False, trakem2=False, mipmaps=False))
    docs = [d for d in run_docs() if getattr(d, "section_id", None) == 0 and getattr(d, "cycle", None) == 0]
    feed(writers, docs)
    late = tile_doc(0, 0, 1, 1, version=1)
    feed(writers, [late, SectionDone("run1", 0, 0, [late.tile_id]), RunStop("run1", "success")])
    tiles = render_ws.stack("raw_s0000").tiles
    assert late.tile_id + "_v1" in tiles and late.tile_id not in tiles and len(tiles) == 4
