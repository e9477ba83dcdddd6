"""Fixtures of the acquisition tests."""
import pytest

from acq.writers import WriterOptions, make_writers
from tests.support.writer_docs import feed, run_docs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    writers = make_writers(out, WriterOptions(zarr_chunk=64))      # small shards: small planes
    docs = run_docs()
    files = feed(writers, docs)
    for w in writers:
        w.flush()
        w.close()
    tiles = {(d.section_id, d.cycle, d.row, d.col, d.version): d for d in docs if d.kind == "tile"}
    return out, docs, tiles, files
