"""Worked example (docs/architecture.md): adding a writer.

A writer is a DocumentRouter with the ``on_<kind>`` methods it needs, plus
``flush()``; ``Engine.add_writer`` (or acq/writers make_writers for the
built-in ones) connects it. It returns the files it wrote for a tile: the
engine journals a tile done only once every writer has returned, so what
this writer lists is on disk for every tile the journal calls done."""
from __future__ import annotations

import json
from pathlib import Path

from acq.documents import DocumentRouter, RunStop, TileEvent
from acq.writers.manifest import append_durably
from tests.support.engine_runs import done_counts, make_engine


class StagePositionsWriter(DocumentRouter):
    """One JSON line per tile: where the stage really was (a quick check of
    the stage's repeatability, beside the tiles)."""
    primary = False                      # derived: needs the OME-TIFF on disk first (acq/stream.py)

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / "stage_positions.jsonl"
        self.stopped = False

    def on_tile(self, doc: TileEvent) -> list[Path]:
        line = {"tile_id": doc.tile_id, "version": doc.version, "x_m": doc.stage["x"], "y_m": doc.stage["y"],
                "target_um": list(doc.target_um)}
        append_durably(self.path, (json.dumps(line) + "\n").encode())
        return [self.path]

    def on_stop(self, doc: RunStop) -> None:
        self.stopped = True

    def flush(self) -> None:
        pass


def test_a_new_writer_sees_every_tile_before_it_counts_as_done(tmp_path):
    engine, setup, _docs = make_engine(tmp_path, plan_over={"mill": None, "irradiation": None, "cycles": 1})
    writer = StagePositionsWriter(tmp_path / "out")
    engine.add_writer(writer)
    try:
        assert engine.run().status == "success"
    finally:
        setup.close()
    lines = [json.loads(s) for s in writer.path.read_text().splitlines()]
    assert sorted(d["tile_id"] for d in lines) == sorted(done_counts(engine.out_dir))
    for d in lines:                      # the stage went where the plan said, within its repeatability
        assert abs(d["x_m"] * 1e6 - d["target_um"][0]) < 5 and abs(d["y_m"] * 1e6 - d["target_um"][1]) < 5
    assert writer.stopped
