"""One zarr v3 shard, encoded here so that its chunks compress in parallel.

zarr-python encodes a shard's inner chunks one after another (about 180 MB/s
on this 2-core machine, which made the OME-Zarr writer the pipeline's
bottleneck); zstd releases the GIL, so the writer compresses a shard's chunks
on its thread pool and hands the finished object to the store (Store.set).
The bytes follow the zarr v3 sharding codec ("sharding_indexed", index at the
end) as the arrays' metadata declares it: the non-empty inner chunks, each
"bytes" + "zstd" (numcodecs' Zstd, as zarr's ZstdCodec) encoded, back to
back; then for every inner chunk in C order its (offset, nbytes) as
little-endian uint64, both 2**64-1 for a chunk that is all fill value (not
stored, as zarr's write_empty_chunks=False); then the crc32c of that index
(little-endian uint32). zarr reads these shards like its own
(tests/acq/test_ome_zarr_store.py).
"""
from __future__ import annotations

from concurrent.futures import Executor
from typing import Optional

import google_crc32c
import numpy as np
from numcodecs import Zstd

EMPTY = np.uint64(2 ** 64 - 1)


def encode_shard(shard: np.ndarray, chunk: int, level: int, pool: Executor) -> Optional[bytes]:
    """The shard object for a 2-D uint8 ``shard`` (one z plane; its sides a
    multiple of ``chunk``); None when every chunk is zero (nothing to store)."""
    rows, cols = shard.shape[0] // chunk, shard.shape[1] // chunk
    codec = Zstd(level=level)

    def encode(k: int) -> Optional[bytes]:
        y, x = divmod(k, cols)
        block = shard[y * chunk:(y + 1) * chunk, x * chunk:(x + 1) * chunk]
        return codec.encode(np.ascontiguousarray(block)) if block.any() else None
    blobs = list(pool.map(encode, range(rows * cols)))
    if not any(b is not None for b in blobs):
        return None
    index = np.full((rows * cols, 2), EMPTY, dtype="<u8")
    offset = 0
    for k, blob in enumerate(blobs):
        if blob is not None:
            index[k] = (offset, len(blob))
            offset += len(blob)
    index_bytes = index.tobytes()
    crc = np.array([google_crc32c.value(index_bytes)], dtype="<u4").tobytes()
    return b"".join(b for b in blobs if b is not None) + index_bytes + crc
