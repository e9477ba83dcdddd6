"""acq.verify: an output folder checked file by file against the LAST
manifest line of each path; missing, changed, extra (every data file when
the manifest is gone), rewritten, unreadable lines, leftover temporaries."""
import io
import json
import shutil

import pytest

from acq.verify import verify_main, verify_outdir
from acq.writers import WriterOptions, make_writers, read_manifest, verify_manifest
from acq.writers.manifest import Manifest
from tests.support.writer_docs import feed, run_docs
from tests.support.output_damage import damage


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    out = tmp_path_factory.mktemp("done")
    writers = make_writers(out, WriterOptions())
    feed(writers, run_docs())
    for w in writers:
        w.close()
    # what else lives in a run's folder and is not data
    (out / "journal.jsonl").write_text('{"rec": "run_start"}\n')
    (out / "journal.snapshot.json").write_text("{}")
    (out / "plan.json").write_text("{}")
    (out / ".lock").write_text("123")
    return out


@pytest.fixture
def out(done, tmp_path):
    o = tmp_path / "o"
    shutil.copytree(done, o)
    return o


def data_files(out):
    return sorted(e["path"] for e in read_manifest(out))


def report(out, **kw):
    s = io.StringIO()
    rc = verify_main(out, s, **kw)
    return rc, s.getvalue()


def test_a_complete_run_verifies(out):
    rep = verify_outdir(out)
    assert rep.clean and rep.problems() == [] and verify_manifest(out) == []
    n = len(set(data_files(out)))
    assert rep.ok and rep.ok_files == rep.checked == n
    assert not rep.extra and not rep.leftover_temporaries       # journal, snapshot, plan, lock, logs: not data
    rc, text = report(out)
    assert rc == 0 and text.splitlines()[-1] == f"verified: {n} files OK"


def test_manifest_deleted_every_data_file_is_extra(out):
    n = len(set(data_files(out)))
    (out / "manifest.jsonl").unlink()
    rep = verify_outdir(out)
    assert not rep.clean and not rep.manifest_exists
    assert len(rep.extra) == n and rep.ok_files == 0 and not rep.ok
    assert verify_manifest(out)                                   # no longer 'clean' with nothing to check
    rc, text = report(out)
    assert rc == 1 and "manifest.jsonl is missing" in text
    assert text.splitlines()[-1].startswith(f"NOT verified: manifest.jsonl missing, {n} extra")


def test_changed_and_missing_files(out):
    listed = {e["path"]: e["bytes"] for e in read_manifest(out)}
    tile, chunk, spec = damage(out)
    rep = verify_outdir(out)
    assert rep.missing == [spec]
    size = listed[chunk]
    assert dict(rep.changed) == {tile: "sha256 mismatch", chunk: f"{size + 1} bytes, manifest says {size}"}
    assert not rep.clean
    fast = verify_outdir(out, check_hash=False)         # size only: the flipped byte goes unseen
    assert [r for r, _ in fast.changed] == [chunk]
    rc, text = report(out)
    assert rc == 1 and "missing (in the manifest, not on disk): 1" in text and spec in text
    assert text.splitlines()[-1].startswith("NOT verified: 1 missing, 2 changed")


def test_the_last_line_of_a_path_is_current(out):
    m = Manifest(out)
    chunk = next(e for e in read_manifest(out) if e["kind"] == "zarr")
    m.append([dict(chunk, sha256="0" * 64)])                      # a later, wrong line wins
    assert [r for r, _ in verify_outdir(out).changed] == [chunk["path"]]
    m.append([m.entry_from_disk(chunk["path"])])                  # and a later right one again
    assert verify_outdir(out).clean
    (out / chunk["path"]).unlink()
    m.append([m.deletion(chunk["path"], "zarr")])                 # removed on purpose: not missing
    assert verify_outdir(out).clean


def test_write_once_file_recorded_with_two_hashes_is_reported(out):
    m = Manifest(out)
    tile = next(e for e in read_manifest(out) if e["kind"] == "tile")
    m.append([dict(tile, sha256="0" * 64), m.entry_from_disk(tile["path"])])
    rep = verify_outdir(out)
    assert rep.rewritten == [tile["path"]] and not rep.changed and not rep.clean


def test_extra_data_files_and_unreadable_lines(out):
    (out / "notes.txt").write_text("not from a writer")
    (out / "tiles/0000/0000/stray.ome.tif").write_bytes(b"II*\0")
    lines = (out / "manifest.jsonl").read_bytes().splitlines(keepends=True)
    lines.insert(3, b"\x00\x00garbage\n")
    (out / "manifest.jsonl").write_bytes(b"".join(lines))
    rep = verify_outdir(out)
    assert sorted(rep.extra) == ["notes.txt", "tiles/0000/0000/stray.ome.tif"]
    assert [n for n, _ in rep.unreadable_lines] == [4]
    rc, text = report(out)
    assert rc == 1 and "unreadable manifest lines: 1" in text and "line 4" in text


def test_leftover_temporaries_are_reported_separately(out):
    tile = next((out / "tiles/0000/0000").glob("*.ome.tif"))
    (tile.parent / f".{tile.name}.x1y2z3w4.part").write_bytes(b"half")
    (out / "zarr/.0003.ome.zarr.new.part").mkdir()
    (out / "zarr/.0003.ome.zarr.new.part/zarr.json").write_text("{}")
    rep = verify_outdir(out)
    assert sorted(rep.leftover_temporaries) == [f"tiles/0000/0000/.{tile.name}.x1y2z3w4.part",
                                                "zarr/.0003.ome.zarr.new.part/"]
    assert not rep.extra and rep.clean                  # the data itself verifies
    rc, text = report(out)
    assert rc == 0 and "leftover temporary files (a crash mid-write; removed by the next start): 2" in text


def test_examples_are_limited(out):
    (out / "manifest.jsonl").unlink()
    rc, text = report(out, examples=3)
    assert rc == 1 and "    ... and" in text
    extra_block = text.split("extra (data files not in the manifest): ")[1]
    assert len([l for l in extra_block.splitlines()[1:] if l.startswith("    ") and "..." not in l]) == 3


def test_not_a_folder(tmp_path):
    rc, text = report(tmp_path / "nowhere")
    assert rc == 1 and text.startswith("NOT verified")


def test_lines_are_json_objects_with_a_path(out):
    for line in (out / "manifest.jsonl").read_text().splitlines():
        assert isinstance(json.loads(line)["path"], str)
