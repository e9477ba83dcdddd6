"""OME-Zarr storage: any fsspec file system, origin moves, sharded zstd objects."""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, MemoryStore

from acq.documents import SectionDone
from acq.verify import verify_outdir
from acq.writers import WriterOptions, make_writers
from acq.writers.zarr_shard import encode_shard
from tests.support.writer_docs import PX, feed, run_docs, tile_doc
from tests.support.zarr_checks import centre_offset_px, ngff_levels

ZARR_ONLY = dict(ome_tiff=True, mipmaps=False, render_tilespecs=False, trakem2=False, zarr_chunk=64)


def finish(writers, docs):
    feed(writers, docs)
    for w in writers:
        w.flush()
        w.close()


def test_volumes_on_an_fsspec_file_system(tmp_path):
    """zarr_url puts the volumes on another file system (here fsspec's memory
    one): read back through zarr's FsspecStore, every tile at its stage position."""
    url = "memory://gcib-test/run1"
    docs = run_docs()
    finish(make_writers(tmp_path / "o", WriterOptions(zarr_url=url, **ZARR_ONLY)), docs)
    assert not (tmp_path / "o/zarr/0000.ome.zarr").exists()          # nothing local but the tiles log
    for section in (0, 3):
        g = zarr.open_group(store=FsspecStore.from_url(f"{url}/{section:04d}.ome.zarr", read_only=True), mode="r")
        levels = ngff_levels(g)
        for d in docs:
            if d.kind == "tile" and d.section_id == section and not (d.image == 0).all():
                assert centre_offset_px(g["0"][d.cycle], *levels[0], d) <= 1.0
    assert verify_outdir(tmp_path / "o").clean


def test_a_tile_left_of_and_above_the_origin_moves_it(tmp_path):
    """A grid that grows to the top-left of its first tile (an unknown number of
    rows on a turned section): shards already written move with the origin,
    nothing is clipped, and the manifest follows the moved objects."""
    out = tmp_path / "o"
    opts = WriterOptions(zarr_cache_mb=0, **ZARR_ONLY)          # every shard on disk before the move
    first = tile_doc(0, 0, 0, 0)
    far = tile_doc(0, 0, 0, 1)
    far.stage = dict(far.stage, x=first.stage["x"] - 3000 * PX, y=first.stage["y"] - 2500 * PX)
    docs = [first, far, SectionDone("run1", 0, 0, [first.tile_id, far.tile_id])]
    finish(make_writers(out, opts), docs)
    g = zarr.open_group(out / "zarr/0000.ome.zarr", mode="r")
    assert not g.attrs["acq"]["moving"]
    levels = ngff_levels(out / "zarr/0000.ome.zarr")
    plane = g["0"][0]
    for d in (first, far):
        assert centre_offset_px(plane, *levels[0], d) <= 1.0
    assert plane.astype(bool).sum() == 2 * first.image.size - np.count_nonzero(first.image == 0) - np.count_nonzero(
        far.image == 0)
    assert verify_outdir(out).clean


def test_store_is_sharded_and_compressed(tmp_path):
    """Few objects on disk (shards of inner chunks), zstd, empty chunks not stored."""
    out = tmp_path / "o"
    finish(make_writers(out, WriterOptions(**ZARR_ONLY)), run_docs())
    a = zarr.open_group(out / "zarr/0000.ome.zarr", mode="r")["0"]
    assert a.shards == (1, 512, 512) and a.chunks == (1, 64, 64)
    codecs = a.metadata.to_dict()["codecs"][0]["configuration"]["codecs"]
    assert [c["name"] for c in codecs] == ["bytes", "zstd"]
    objects = [p for p in (out / "zarr/0000.ome.zarr").rglob("*") if p.is_file() and p.name != "zarr.json"]
    data = a[:]
    filled = data.reshape(a.shape[0], a.shape[1] // 64, 64, a.shape[2] // 64, 64).any(axis=(2, 4))
    assert len(objects) < filled.sum()                    # fewer files than unsharded chunks at level 0 alone
    stored = sum(p.stat().st_size for p in objects)
    assert stored < filled.sum() * 64 * 64                # random test tiles barely compress: empty chunks do


def test_shards_encoded_here_read_back_through_zarr_as_zarrs_own():
    """The writer encodes shards itself (parallel zstd); zarr decodes them to
    the same pixels as a shard zarr wrote, empty chunks included, and reads
    an all-zero shard as absent."""
    rng = np.random.default_rng(3)
    plane = rng.integers(0, 256, (256, 256), dtype=np.uint8)
    plane[:64, :] = 0                                  # whole empty chunks: not stored
    plane[100:110, 200:210] = 0                        # a partly empty chunk: stored
    group = zarr.open_group(store=MemoryStore(), mode="w-", zarr_format=3)
    ours, theirs = [group.create_array(n, shape=(1, 512, 256), chunks=(1, 64, 64), shards=(1, 256, 256),
                                       dtype="uint8", fill_value=0, compressors=ZstdCodec(level=1),
                                       config={"write_empty_chunks": False}) for n in ("ours", "theirs")]
    theirs[0, :256] = plane
    with ThreadPoolExecutor(2) as pool:
        data = encode_shard(plane, 64, 1, pool)
        assert encode_shard(np.zeros_like(plane), 64, 1, pool) is None
    sync(group.store.set("ours/c/0/0/0", default_buffer_prototype().buffer.from_bytes(data)))
    np.testing.assert_array_equal(ours[0, :256], plane)
    np.testing.assert_array_equal(ours[:], theirs[:])
    assert not ours[0, 256:].any()                      # the shard never written reads as fill value
    assert len(data) < plane.nbytes                     # 4 empty chunks of 16 left out
