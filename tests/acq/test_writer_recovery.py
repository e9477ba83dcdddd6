"""Writers after a crash: half-made OME-Zarr stores rebuilt (never a KeyError),
lost chunks re-pasted, shapes cut short by a crash mid-resize repaired, the
manifest's torn tail cut and lost lines re-recorded, leftover temporaries
removed, derived writers caught up from the OME-TIFFs on disk after a
failure, every filesystem operation behind a crash point."""
import asyncio
import json
import shutil

import numpy as np
import pytest
import zarr

import common.crashpoints as crashpoints
from acq.documents import RunStart, RunStop, SectionDone
from acq.verify import verify_outdir
from acq.documents import CatchUp
from acq.writers import WriterOptions, make_writers, read_manifest, tile_relpath
from acq.writers.manifest import Manifest, latest_entries
from acq.writers.mipmaps import MipmapWriter
from acq.writers.ome_tiff import OmeTiffWriter
from acq.writers.ome_zarr import OmeZarrWriter
from acq.writers.render_push import RenderPushWriter
from acq.writers.tilespecs import TileSpecWriter
from acq.writers.trakem2 import TrakEM2Writer
from tests.support.writer_docs import feed, run_docs, tile_doc

ZARR_ONLY = WriterOptions(mipmaps=False, render_tilespecs=False, trakem2=False)


def section0():
    """Section 0, both cycles, 2x2 tiles each, with their SectionDone."""
    return [d for d in run_docs() if getattr(d, "section_id", None) == 0]


def resumed(out):
    return RunStart("run1", plan={}, setup={}, software_version="t", out_dir=str(out), resumed=True)


def finish(writers, docs=()):
    feed(writers, list(docs) + [RunStop("run1", "success")])
    for w in writers:
        w.flush()
        w.close()


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A run without a crash: what every recovery must reproduce."""
    out = tmp_path_factory.mktemp("clean")
    finish(make_writers(out, WriterOptions()), section0())
    return out


def zarr_levels(out, section=0):
    g = zarr.open_group(out / f"zarr/{section:04d}.ome.zarr", mode="r")
    return g.attrs["acq"], [g[str(l)][:] for l in range(3)]


def assert_same_zarr(out, ref):
    attrs, arrays = zarr_levels(out)
    ref_attrs, ref_arrays = zarr_levels(ref)
    assert attrs["origin_px"] == ref_attrs["origin_px"]
    for a, b in zip(arrays, ref_arrays):
        assert a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def assert_verified(out):
    rep = verify_outdir(out)
    assert rep.clean, rep.problems()
    assert not rep.leftover_temporaries


# ---------------------------------------------------------------- OME-Zarr: half-made stores
def break_store(root, how):
    if how == "no_acq_attributes":
        # what kill -9 during the old store creation left: group, arrays, NGFF, no "acq"
        g = json.loads((root / "zarr.json").read_text())
        del g["attributes"]["acq"]
        (root / "zarr.json").write_text(json.dumps(g))
    elif how == "bare_group":
        shutil.rmtree(root)
        zarr.open_group(root, mode="w-", zarr_format=3)
    elif how == "group_truncated":
        data = (root / "zarr.json").read_bytes()
        (root / "zarr.json").write_bytes(data[:len(data) // 2])
    elif how == "group_empty":
        (root / "zarr.json").write_bytes(b"")
    elif how == "array_truncated":
        data = (root / "1" / "zarr.json").read_bytes()
        (root / "1" / "zarr.json").write_bytes(data[:40])
    elif how == "array_missing":
        (root / "2" / "zarr.json").unlink()
    else:
        raise ValueError(how)


@pytest.mark.parametrize("how", ["no_acq_attributes", "bare_group", "group_truncated", "group_empty",
                                 "array_truncated", "array_missing"])
def test_half_made_zarr_store_is_rebuilt_from_the_tiles(tmp_path, clean, how):
    out = tmp_path / "o"
    docs = section0()
    first, rest = docs[:3], docs[3:]           # two tiles of cycle 0 were written, then the crash
    w = make_writers(out, WriterOptions())
    feed(w, first)
    w[-1].flush()                              # the store exists (a plane flushed by eviction, say)
    break_store(out / "zarr/0000.ome.zarr", how)
    # restart: no KeyError, on construction or for any tile of the section
    again = make_writers(out, WriterOptions())
    feed(again, [resumed(out)])
    finish(again, rest)
    assert_same_zarr(out, clean)
    assert_verified(out)


def test_broken_store_without_a_resumed_start_is_rebuilt_on_the_next_tile(tmp_path, clean):
    out = tmp_path / "o"
    docs = section0()
    feed(make_writers(out, WriterOptions()), docs[:5])          # cycle 0 complete (its SectionDone too)
    break_store(out / "zarr/0000.ome.zarr", "no_acq_attributes")
    ws = make_writers(out, ZARR_ONLY)
    feed(ws, docs[5:])                                          # no RunStart: never a KeyError all the same
    for w in ws:
        w.flush()
        w.close()
    assert_same_zarr(out, clean)
    assert_verified(out)


def test_a_store_found_unusable_when_a_section_is_opened_is_discarded(tmp_path, monkeypatch):
    """A store that appears after the writer started (or that it could not list then) is
    checked when its section is opened; an unusable one is discarded, not raised."""
    from acq.writers.ome_zarr_repair import _Broken
    w = OmeZarrWriter(tmp_path, Manifest(tmp_path))
    discarded = []
    monkeypatch.setattr(w.volumes, "exists", lambda section: True)
    monkeypatch.setattr(w, "_load", lambda section: (_ for _ in ()).throw(_Broken("no 'acq' attributes")))
    monkeypatch.setattr(w, "_discard", lambda section, reason, latest=None: discarded.append((section, reason)))
    assert w._open(3) is None
    assert discarded == [(3, "no 'acq' attributes")]
    w.close()


def test_lost_chunk_file_is_pasted_again(tmp_path, clean):
    out = tmp_path / "o"
    shutil.copytree(clean, out)
    chunks = [e["path"] for e in read_manifest(out) if e["kind"] == "zarr" and "/0/c/1/" in e["path"]]
    (out / chunks[0]).unlink()                  # level 0, cycle 1
    (out / chunks[-1]).write_bytes(b"\0" * 10)  # truncated
    assert not verify_outdir(out).clean
    w = make_writers(out, ZARR_ONLY)
    feed(w, [resumed(out)])
    finish(w)
    assert_same_zarr(out, clean)
    assert_verified(out)


def test_resize_cut_short_is_repaired(tmp_path, clean):
    out = tmp_path / "o"
    shutil.copytree(clean, out)
    p = out / "zarr/0000.ome.zarr/2/zarr.json"
    meta = json.loads(p.read_text())
    meta["shape"] = [1, meta["shape"][1] // 2, meta["shape"][2]]     # the old shape: level 2 not resized yet
    p.write_text(json.dumps(meta))
    w = make_writers(out, ZARR_ONLY)
    assert json.loads(p.read_text())["shape"] == json.loads(
        (clean / "zarr/0000.ome.zarr/2/zarr.json").read_text())["shape"]
    finish(w, [resumed(out)])
    assert_same_zarr(out, clean)
    assert_verified(out)


def test_crash_before_the_plane_was_flushed_and_after_an_eviction(tmp_path):
    """Chunks written by an eviction hold later tiles; the tiles before them
    must not be pasted over them on recovery (the whole plane goes in again,
    in acquisition order)."""
    opts = WriterOptions(mipmaps=False, render_tilespecs=False, trakem2=False, zarr_chunk=64, zarr_cache_mb=0)
    ref, out = tmp_path / "ref", tmp_path / "o"
    docs = section0()
    finish(make_writers(ref, opts), docs)
    w = make_writers(out, opts)
    feed(w, docs[:4])                           # cycle 0's tiles, evicted chunk by chunk; no SectionDone
    again = make_writers(out, opts)
    feed(again, [resumed(out)])
    finish(again, docs[4:])
    assert_same_zarr(out, ref)
    assert_verified(out)


def test_stale_tiles_log_of_a_vanished_store_is_dropped(tmp_path, clean):
    out = tmp_path / "o"
    shutil.copytree(clean, out)
    shutil.rmtree(out / "zarr/0000.ome.zarr")
    w = make_writers(out, ZARR_ONLY)
    assert not (out / "zarr/0000.tiles.jsonl").exists()
    finish(w, [resumed(out)])
    assert_same_zarr(out, clean)
    assert_verified(out)


# ---------------------------------------------------------------- manifest
def test_torn_manifest_tail_is_cut_and_lost_lines_rerecorded(tmp_path, clean):
    out = tmp_path / "o"
    shutil.copytree(clean, out)
    lines = (out / "manifest.jsonl").read_bytes().splitlines(keepends=True)
    tile_line = next(i for i, l in enumerate(lines) if b'"kind":"tile"' in l)
    lost = json.loads(lines[tile_line])["path"]
    keep = lines[:tile_line] + lines[tile_line + 1:]
    # the crash: the tile's line never made it, the next append was torn
    (out / "manifest.jsonl").write_bytes(b"".join(keep) + keep[-1][:37])
    rep = verify_outdir(out)
    assert lost in rep.extra and rep.unreadable_lines and "torn" in rep.unreadable_lines[-1][1]
    rec = Manifest(out).recover()
    assert rec.tail and rec.recorded == [lost]
    data = (out / "manifest.jsonl").read_bytes()
    assert data.startswith(b"".join(keep)) and data.endswith(b"\n")
    assert_verified(out)
    # appends after the repair start lines of their own
    m = Manifest(out)
    m.append([m.entry("x", "0" * 64, 0, "tile")])
    assert all(json.loads(l) for l in (out / "manifest.jsonl").read_bytes().splitlines())


def test_torn_tail_is_cut_by_the_next_append_too(tmp_path):
    m = Manifest(tmp_path)
    m.append([m.entry("a", "1" * 64, 1, "tile")])
    with open(m.path, "ab") as f:
        f.write(b'{"path":"b","sha')                       # killed mid-append
    Manifest(tmp_path).append([m.entry("c", "2" * 64, 2, "tile")])
    assert [e["path"] for e in read_manifest(tmp_path)] == ["a", "c"]


def test_whole_last_record_without_newline_is_kept(tmp_path):
    m = Manifest(tmp_path)
    m.append([m.entry("a", "1" * 64, 1, "tile")])
    with open(m.path, "ab") as f:
        f.write(json.dumps(m.entry("b", "2" * 64, 2, "tile")).encode())    # the newline was lost
    m.recover()
    m.append([m.entry("c", "3" * 64, 3, "tile")])
    assert [e["path"] for e in read_manifest(tmp_path)] == ["a", "b", "c"]


def test_leftover_temporaries_are_reported_then_removed_on_restart(tmp_path, clean):
    out = tmp_path / "o"
    shutil.copytree(clean, out)
    tile = next(out.glob("tiles/0000/0000/*.ome.tif"))
    (tile.parent / f".{tile.name}.k3j9x2ab.part").write_bytes(b"half a tile")
    (out / "zarr/.0000.ome.zarr.new.part/0").mkdir(parents=True)
    (out / "zarr/.0000.ome.zarr.new.part/zarr.json").write_text("{}")
    (out / "zarr/0000.ome.zarr/0/c/0/zarr.1234abcd.partial").write_bytes(b"x")
    rep = verify_outdir(out)
    assert len(rep.leftover_temporaries) == 3 and not rep.extra
    make_writers(out, WriterOptions())
    assert not verify_outdir(out).leftover_temporaries
    assert_verified(out)


def test_replay_after_recovery_is_harmless(tmp_path, clean):
    out = tmp_path / "o"
    shutil.copytree(clean, out)
    w = make_writers(out, WriterOptions())
    finish(w, [resumed(out)] + section0())        # the engine sends everything once more
    assert_same_zarr(out, clean)
    assert_verified(out)


# ---------------------------------------------------------------- derived writers catch up
def test_primary_flags(tmp_path):
    ws = make_writers(tmp_path, WriterOptions())
    assert [w.primary for w in ws] == [True, False, False, False, False]
    assert OmeTiffWriter.primary
    assert not any(c.primary for c in (MipmapWriter, TileSpecWriter, TrakEM2Writer, OmeZarrWriter, RenderPushWriter))
    for w in ws[1:]:
        assert callable(w.catch_up) and callable(w.rebuild)


class Flaky:
    """Make ``obj.name`` raise for the first ``times`` calls."""

    def __init__(self, monkeypatch, obj, name, times=1):
        real = getattr(obj, name)
        self.calls = 0

        def flaky(*a, **k):
            self.calls += 1
            if self.calls <= times:
                raise OSError("disk hiccup")
            return real(*a, **k)
        monkeypatch.setattr(obj, name, flaky)


def test_derived_writers_that_failed_on_a_tile_catch_up_from_disk(tmp_path, clean, monkeypatch):
    out = tmp_path / "o"
    ws = make_writers(out, WriterOptions())
    _tiff, mip, _specs, _trak, zw = ws
    docs = section0()
    Flaky(monkeypatch, mip, "_write_levels")
    Flaky(monkeypatch, zw, "_paste")
    errors = {}
    for d in docs:
        for w in ws:
            try:
                w.handle(d)
            except OSError:
                errors.setdefault(type(w).__name__, []).append((d.kind, getattr(d, "tile_id", None)))
    # each derived writer failed once, on the first tile it had to write
    assert errors == {"MipmapWriter": [("tile", docs[0].tile_id)], "OmeZarrWriter": [("tile", docs[0].tile_id)]}
    monkeypatch.undo()
    # both caught up at the plane's SectionDone, from the OME-TIFF on disk
    finish(ws)
    assert_same_zarr(out, clean)
    for p in clean.rglob("mipmaps/**/*.tif"):
        assert (out / p.relative_to(clean)).read_bytes() == p.read_bytes()
    assert_verified(out)


def test_plane_writers_retry_a_failed_section_done(tmp_path, clean, monkeypatch):
    out = tmp_path / "o"
    ws = make_writers(out, WriterOptions())
    specs, trak = ws[2], ws[3]
    Flaky(monkeypatch, specs, "_write_plane")
    Flaky(monkeypatch, trak, "_write_plane")
    docs = section0()
    failed = []
    for d in docs:
        for w in ws:
            try:
                w.handle(d)
            except OSError:
                failed.append(type(w).__name__)
    assert failed == ["TileSpecWriter", "TrakEM2Writer"]
    assert (out / "render/0000/0000/tilespecs.json").exists()      # retried at the next SectionDone
    monkeypatch.undo()
    finish(ws)
    for rel in ("render/0000/0000/tilespecs.json", "render/0000/0001/tilespecs.json"):
        assert (out / rel).read_text().replace(str(out.resolve()), "") == \
            (clean / rel).read_text().replace(str(clean.resolve()), "")
    assert (out / "trakem2/0000_import.txt").read_text().replace(str(out.resolve()), "") == \
        (clean / "trakem2/0000_import.txt").read_text().replace(str(clean.resolve()), "")
    assert_verified(out)


def test_resumed_start_rebuilds_lost_derived_outputs(tmp_path, clean):
    """The primary's files survived, derived ones were lost (a crash between
    the OME-TIFF and the rest): the resumed start makes them from disk."""
    out = tmp_path / "o"
    finish(make_writers(out, WriterOptions()), section0())
    for p in ["mipmaps", "render", "trakem2", "zarr"]:
        shutil.rmtree(out / p)
    # the manifest still lists them: no cheating by deleting the lines
    ws = make_writers(out, WriterOptions())
    feed(ws, [resumed(out)])
    finish(ws)
    assert_same_zarr(out, clean)
    assert sorted(p.relative_to(out) for p in out.rglob("mipmaps/**/*.tif")) == \
        sorted(p.relative_to(clean) for p in clean.rglob("mipmaps/**/*.tif"))
    assert (out / "render/0000/0001/tilespecs.json").exists()
    assert (out / "trakem2/0000_import.txt").read_text().count("\n") == 8
    assert_verified(out)


def test_catch_up_document_and_rebuild(tmp_path, clean):
    out = tmp_path / "o"
    finish(make_writers(out, WriterOptions()), section0())    # not a copy: tile specs name absolute paths
    victim = next((out / "mipmaps/2/tiles/0000/0001").glob("*.ome.tif.tif"))
    victim.unlink()
    (out / "render/0000/0001/tilespecs.json").unlink()
    ws = make_writers(out, WriterOptions())
    files = feed(ws, [CatchUp(section_id=0, cycle=1)])
    assert victim.exists() and (out / "render/0000/0001/tilespecs.json").exists()
    assert {f.kind for f in files} >= {"mipmap", "tilespec"}
    tile = next((out / "tiles/0000/0000").glob("*.ome.tif"))
    mip = ws[1]
    lv1 = out / "mipmaps/1" / (tile.relative_to(out).as_posix() + ".tif")
    lv1.unlink()
    assert mip.missing_levels(tile) == [1]
    mip.rebuild(tile)
    assert lv1.read_bytes() == (clean / lv1.relative_to(out)).read_bytes()
    assert_verified(out)


def test_trakem2_index_out_of_date_is_rebuilt_on_start(tmp_path, clean):
    out = tmp_path / "o"
    shutil.copytree(clean, out)
    index = out / "trakem2/0000_import.txt"
    full = index.read_bytes()
    index.write_bytes((out / "trakem2/0000/0000_import.txt").read_bytes())   # cycle 1 never added
    TrakEM2Writer(out, Manifest(out))
    assert index.read_bytes() == full
    assert_verified(out)


# ---------------------------------------------------------------- crash points
def logged_points(tmp_path, monkeypatch, out, docs, opts=None):
    log = tmp_path / f"{out.name}.ops"
    monkeypatch.setattr(crashpoints, "_LOG", str(log))
    monkeypatch.setattr(crashpoints, "_ROOT", str(out))
    monkeypatch.setattr(crashpoints, "_counts", {})
    try:
        finish(make_writers(out, opts or WriterOptions()), docs)
    finally:
        monkeypatch.setattr(crashpoints, "_LOG", None)
    return [tuple(line.split("\t")) for line in log.read_text().splitlines()]


def test_every_filesystem_operation_has_a_crash_point(tmp_path, monkeypatch):
    seen = set(logged_points(tmp_path, monkeypatch, tmp_path / "o", section0()))
    tif = "tiles/#/#/c#_s#_g#_r#_c#_v#.ome.tif"
    expected = {
        ("create", tif + ".part"), ("write", tif + ".part"), ("fsync", tif + ".part"), ("rename", tif),
        ("unlink", tif + ".part"), ("fsync_dir", "tiles/#/#"), ("mkdir", "tiles/#/#"),
        ("rename", "mipmaps/#/" + tif + ".tif"), ("rename", "render/#/#/tilespecs.json"),
        ("rename", "trakem#/#_import.txt"), ("rename", "trakem#/#/#_import.txt"),
        ("create", "manifest.jsonl"), ("append", "manifest.jsonl"), ("fsync", "manifest.jsonl"),
        ("mkdir", "zarr/#.ome.zarr.part"), ("metadata", "zarr/.#.ome.zarr.new.part/zarr.json"),
        ("metadata", "zarr/.#.ome.zarr.new.part/#/zarr.json"), ("rename", "zarr/#.ome.zarr"),
        ("metadata", "zarr/#.ome.zarr/#/zarr.json"), ("rename", "zarr/#.ome.zarr/#/zarr.json"),
        ("create", "zarr/#.ome.zarr/#/c/#/#/#.part"), ("rename", "zarr/#.ome.zarr/#/c/#/#/#"),
        ("fsync_dir", "zarr/#.ome.zarr/#/c/#/#"), ("append", "zarr/#.tiles.jsonl"),
    }
    assert expected <= seen, sorted(expected - seen)
    assert {op for op, _ in seen} <= {"create", "write", "fsync", "rename", "unlink", "mkdir", "fsync_dir",
                                     "append", "truncate", "metadata"}
    # sites name no random temporary names: another run gives the very same list
    assert set(logged_points(tmp_path, monkeypatch, tmp_path / "p", section0())) == seen


class Crash(BaseException):
    pass


def settle_zarr_io():
    """A real crash kills every thread; here, chunk writes zarr had started beside the
    one that crashed run on in its IO loop. Wait for them, or recovery races them."""
    from zarr.core import sync as zarr_sync
    loop = getattr(zarr_sync, "loop", [None])[0]           # zarr 3's IO loop; absent: nothing to wait for
    if loop is None or not loop.is_running():
        return

    async def others_done():
        me = asyncio.current_task()
        while pending := [t for t in asyncio.all_tasks() if t is not me and not t.done()]:
            await asyncio.wait(pending)
    waiting = asyncio.run_coroutine_threadsafe(others_done(), loop)
    try:
        waiting.result(timeout=60)
    except TimeoutError:
        waiting.cancel()
        raise AssertionError(f"zarr IO still busy after 60 s: {asyncio.all_tasks(loop)!r}") from None


@pytest.mark.slow
def test_crash_at_every_point_of_one_tile_recovers(tmp_path, monkeypatch):
    """In process (the crash test proper runs a subprocess per point): stop at
    every operation the writers do for the first tile of a plane and its
    SectionDone, restart, and end up as without the crash."""
    opts = WriterOptions(zarr_chunk=64, zarr_cache_mb=0, mipmap_levels=2)
    tiles = [tile_doc(0, 0, 0, 0), tile_doc(0, 0, 0, 1)]       # two overlapping tiles of one plane
    docs = tiles + [SectionDone("run1", 0, 0, [d.tile_id for d in tiles])]
    ref = tmp_path / "ref"
    points = sorted(set(logged_points(tmp_path, monkeypatch, ref, docs, opts)))

    def boom(code):
        raise Crash(code)
    monkeypatch.setattr(crashpoints.os, "_exit", boom)
    for i, (op, site) in enumerate(points):
        out = tmp_path / f"c{i}"
        monkeypatch.setattr(crashpoints, "_ROOT", str(out))
        monkeypatch.setattr(crashpoints, "_counts", {})
        monkeypatch.setattr(crashpoints, "_target", (op, site, 1))
        ws = []
        try:
            ws = make_writers(out, opts)
            feed(ws, docs)
        except Crash:
            pass
        else:
            raise AssertionError(f"no crash at {op} {site}")
        finally:
            monkeypatch.setattr(crashpoints, "_target", None)
            for w in ws:
                for name in ("_pool", "_io"):
                    pool = getattr(w, name, None)
                    if pool is not None:
                        pool.shutdown(wait=True)
            settle_zarr_io()
        again = make_writers(out, opts)
        todo = [resumed(out)] + [d for d in docs if d.kind != "tile" or not (
            out / tile_relpath(d.section_id, d.cycle, d.tile_id, d.version)).exists()]
        finish(again, todo)
        rep = verify_outdir(out)
        assert rep.clean and not rep.leftover_temporaries, (op, site, rep.problems())
        assert_same_zarr(out, ref)
        assert latest_entries(out).keys() >= latest_entries(ref).keys(), (op, site)


def test_tile_on_disk_tells_a_resumed_engine_the_frame_is_safe(tmp_path):
    from acq.writers import tile_on_disk
    d = tile_doc(0, 0, 0, 0)
    (w,) = make_writers(tmp_path, WriterOptions(mipmaps=False, render_tilespecs=False, trakem2=False,
                                               ome_zarr=False))
    assert tile_on_disk(tmp_path, 0, 0, d.tile_id, 0) is None
    (wf,) = w.handle(d)
    assert tile_on_disk(tmp_path, 0, 0, d.tile_id, 0) == wf.path
    assert tile_on_disk(tmp_path, 0, 0, d.tile_id, 1) is None
