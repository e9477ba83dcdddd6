"""The journal itself: checksummed lines, torn tails, corruption never
replayed silently, repair, failed appends leaving nothing behind, snapshots
for a resume that reads only the tail, and a state that forgets done cycles."""
from __future__ import annotations

import errno
import io
import json
import os
import zlib

import pytest

from acq import journal as jm
from acq.journal import JOURNAL_NAME, SNAPSHOT_NAME, Journal, JournalCorrupt, read_records
from acq.journal_repair import repair_journal, repair_main
from devices.setup_config import ConfigError


def tile(j: Journal, cycle: int, section: int, i: int, version: int = 0, files=None, qc=None) -> str:
    key = f"c{cycle:04d}_s{section:04d}_g00_r000_c{i:03d}"
    j.append("tile_started", key=key, version=version, cycle=cycle)
    j.append("tile_done", key=key, version=version, cycle=cycle, files=files or [], qc=qc or {"flat_fraction": 0.1})
    return key


def cycle(j: Journal, c: int, sections=(1, 2), tiles=3, done=True) -> None:
    for s in sections:
        j.append("autofocus_done", key=f"af:c{c:04d}_s{s:04d}", wd_m=0.005, stig=[0.0, 0.0], ok=True)
        for i in range(tiles):
            tile(j, c, s, i)
        j.append("section_done", key=f"sec:c{c:04d}_s{s:04d}", cycle=c, section=s)
    j.append("mill_started", key=f"mill:c{c:04d}", cycle=c, duration_s=10)
    j.append("mill_beam_on", key=f"mill:c{c:04d}", done_s=0.0, azimuth=0)
    j.append("mill_beam_off", key=f"mill:c{c:04d}", done_s=10.0)
    j.append("mill_done", key=f"mill:c{c:04d}", cycle=c, seconds=10.0, interrupted=False, accepted=False)
    if done:
        j.append("cycle_done", key=f"cycle:c{c:04d}", cycle=c)


def make(tmp_path, cycles=2, **kw) -> Journal:
    j = Journal(tmp_path, **kw)
    j.open()
    j.append("run_start", run_uid="u", resumed=False, plan_source="p.yaml")
    for c in range(cycles):
        cycle(j, c)
    j.close()
    return j


def lines(j: Journal) -> list[bytes]:
    return j.path.read_bytes().splitlines(keepends=True)


def no_snapshot(tmp_path):
    (tmp_path / SNAPSHOT_NAME).unlink(missing_ok=True)


# ------------------------------------------------------------------ checksums
def test_lines_carry_a_crc_of_themselves_and_read_back(tmp_path):
    j = Journal(tmp_path)
    j.open()
    got = j.append("tile_done", key="c0000_s0001_g00_r000_c000", version=0, cycle=0,
                   files=[str(tmp_path / "tiles" / "a.tif"), "/elsewhere/b.tif", "tiles/c.tif"],
                   qc={"mean": 1.5, "ok": True})
    j.close()
    (line,) = lines(j)
    assert line.endswith(b'"}\n') and b'"crc":"' in line and b" " not in line       # compact, one object
    rec = json.loads(line)
    body = json.dumps({k: v for k, v in rec.items() if k != "crc"}, separators=(",", ":")).encode()
    assert rec["crc"] == f"{zlib.crc32(body):08x}"
    assert rec["files"] == ["tiles/a.tif", "/elsewhere/b.tif", "tiles/c.tif"]      # short: relative to OUTDIR
    assert got == {k: v for k, v in rec.items() if k != "crc"}
    (back,) = read_records(tmp_path)
    assert back["files"] == [str(tmp_path / "tiles" / "a.tif"), "/elsewhere/b.tif", str(tmp_path / "tiles" / "c.tif")]
    assert back["qc"] == {"mean": 1.5, "ok": True} and "crc" not in back


def test_a_flipped_byte_is_caught(tmp_path):
    j = make(tmp_path)
    data = bytearray(j.path.read_bytes())
    i = data.index(b'"version":0', len(data) // 3)
    data[i + 10] = ord("1")                          # still valid JSON, different content
    j.path.write_bytes(bytes(data))
    no_snapshot(tmp_path)
    with pytest.raises(JournalCorrupt):
        Journal(tmp_path).open()


# ------------------------------------------------------------------ torn tail
@pytest.mark.parametrize("tail", [b'{"rec":"tile_done","key":"x","ver', b'{"rec":"tile_done","key":"x"}\n',
                                  b"\x00" * 37, b"   "])
def test_torn_last_line_is_dropped_and_cut_before_the_next_append(tmp_path, tail):
    j = make(tmp_path, cycles=1)
    good = j.path.read_bytes()
    before = Journal(tmp_path).read()
    with open(j.path, "ab") as f:
        f.write(tail)
    j2 = Journal(tmp_path)
    assert j2.read() == before                       # reading alone changes nothing
    assert j2.path.read_bytes() == good + tail
    st = j2.open()
    assert st == before and j2.last_read.torn_line == len(good.splitlines()) + 1
    assert j2.path.read_bytes() == good              # cut
    j2.append("run_stop", status="aborted", reason="")
    j2.close()
    assert [r["rec"] for r in read_records(tmp_path)][-2:] == ["cycle_done", "run_stop"]


# ------------------------------------------------------------------ corruption
def test_corrupt_middle_line_raises_with_line_number_and_repair_command(tmp_path):
    j = make(tmp_path)
    ls = lines(j)
    ls[6] = ls[6][:20] + b"#" + ls[6][21:]
    j.path.write_bytes(b"".join(ls))
    no_snapshot(tmp_path)
    for reader in (lambda: Journal(tmp_path).open(), lambda: Journal(tmp_path).read(),
                   lambda: list(read_records(tmp_path))):
        with pytest.raises(JournalCorrupt) as e:
            reader()
        msg = str(e.value)
        assert str(j.path) in msg and "line 7 " in msg
        assert f"python main.py journal repair {tmp_path}" in msg
        assert e.value.lines == [7]
        assert isinstance(e.value, ConfigError)


def test_every_damaged_line_is_named(tmp_path):
    j = make(tmp_path)
    ls = lines(j)
    ls[3] = b"garbage\n"
    ls[9] = ls[9][:-5] + b'X"}\n'
    j.path.write_bytes(b"".join(ls))
    no_snapshot(tmp_path)
    with pytest.raises(JournalCorrupt) as e:
        Journal(tmp_path).read()
    assert e.value.lines == [4, 10] and "lines 4, 10 " in str(e.value)


def test_garbage_appended_then_more_records_is_caught(tmp_path):
    j = make(tmp_path, cycles=1)
    with open(j.path, "ab") as f:
        f.write(b"some garbage from elsewhere\n")
    j2 = Journal(tmp_path)
    j2.open()                                        # alone at the end: a torn tail, cut
    j2.close()
    with open(j.path, "ab") as f:
        f.write(b"more garbage\n")
    n = len(lines(j))
    with open(j.path, "ab") as f:                    # something else appended valid records behind it
        f.write(jm.encode_record({"rec": "incident", "t": 1.0, "severity": "info", "cause": "x", "message": ""}))
    with pytest.raises(JournalCorrupt) as e:
        Journal(tmp_path).open()
    assert e.value.lines == [n]


def test_garbage_glued_in_front_of_a_valid_last_record_is_not_a_torn_tail(tmp_path):
    j = make(tmp_path, cycles=1)
    n = len(lines(j))
    with open(j.path, "ab") as f:
        f.write(b"xx" + jm.encode_record({"rec": "run_stop", "t": 1.0, "status": "success", "reason": ""}))
    with pytest.raises(JournalCorrupt) as e:
        Journal(tmp_path).read()
    assert e.value.lines == [n + 1]
    rep = repair_journal(tmp_path)                   # the glued record is kept
    assert rep.dropped[0].salvaged == "run_stop"
    assert [r["rec"] for r in read_records(tmp_path)][-2:] == ["run_stop", "journal_repaired"]


def test_a_record_without_crc_in_a_checksummed_journal_is_damage(tmp_path):
    j = make(tmp_path, cycles=1)
    ls = lines(j)
    ls.insert(5, b'{"rec": "tile_done", "key": "zz", "version": 0, "cycle": 0}\n')
    j.path.write_bytes(b"".join(ls))
    no_snapshot(tmp_path)
    with pytest.raises(JournalCorrupt) as e:
        Journal(tmp_path).read()
    assert e.value.lines == [6]


def test_legacy_journal_without_crc_still_reads_and_continues_checksummed(tmp_path):
    recs = [{"rec": "run_start", "t": 1.0, "run_uid": "old", "resumed": False, "plan_source": "p"},
            {"rec": "tile_started", "t": 2.0, "key": "a", "version": 0, "cycle": 0},
            {"rec": "tile_done", "t": 3.0, "key": "a", "version": 0, "cycle": 0, "files": ["/x/a.tif"]},
            {"rec": "tile_started", "t": 4.0, "key": "b", "version": 0, "cycle": 0}]
    path = tmp_path / JOURNAL_NAME
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"rec": "tile_done", "key": "b", "ver')
    st = Journal(tmp_path).read()
    assert st.tiles_done == {"a": 0} and st.tiles_started == {"a": 0, "b": 0} and st.runs == 1
    assert [r["rec"] for r in read_records(tmp_path)] == [r["rec"] for r in recs]
    j = Journal(tmp_path)
    j.open()
    j.append("tile_done", key="b", version=0, cycle=0, files=[])
    j.close()
    assert [r["key"] for r in read_records(tmp_path) if r["rec"] == "tile_done"] == ["a", "b"]
    assert Journal(tmp_path).read(use_snapshot=False).tiles_done == {"a": 0, "b": 0}
    # a crc-less line after the first checksummed one is damage
    with open(path, "ab") as f:
        f.write(b'{"rec": "tile_done", "key": "c", "version": 0, "cycle": 0}\n')
        f.write(jm.encode_record({"rec": "run_stop", "t": 9.0, "status": "success", "reason": ""}))
    with pytest.raises(JournalCorrupt) as e:
        Journal(tmp_path).read(use_snapshot=False)
    assert e.value.lines == [len(recs) + 2]


def test_damaged_legacy_line_inside_is_not_skipped_silently(tmp_path):
    path = tmp_path / JOURNAL_NAME
    path.write_text('{"rec": "run_start", "t": 1}\n{"rec": "tile_do\n{"rec": "run_stop", "t": 2}\n')
    with pytest.raises(JournalCorrupt) as e:
        Journal(tmp_path).read()
    assert e.value.lines == [2]


# ------------------------------------------------------------------ repair
def test_repair_drops_the_bad_line_keeps_a_backup_and_reports_it(tmp_path):
    j = make(tmp_path, cycles=2)
    ls = lines(j)
    n = next(i for i, line in enumerate(ls) if b'"mill_beam_on"' in line and b"c0001" in line) + 1
    mill_line = ls[n]                                # mill_beam_off of cycle 1, the line after mill_beam_on
    assert b"mill_beam_off" in mill_line
    damaged = ls[:n] + [mill_line[:30] + b"\x00\x00" + mill_line[32:]] + ls[n + 1:]
    original = b"".join(damaged)
    j.path.write_bytes(original)
    assert Journal(tmp_path).read().cycles_done == {0, 1}       # the snapshot covers it: not even read ...
    with pytest.raises(JournalCorrupt):
        list(read_records(tmp_path))                             # ... but every full read sees it
    no_snapshot(tmp_path)
    expected = Journal(tmp_path / "ref")             # the same journal without that line
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / JOURNAL_NAME).write_bytes(b"".join(ls[:n] + ls[n + 1:]))
    want = expected.read()
    with pytest.raises(JournalCorrupt):
        Journal(tmp_path).open()

    out = io.StringIO()
    assert repair_main(tmp_path, out) == 0
    text = out.getvalue()
    assert f"line {n + 1}," in text and "between mill_beam_on (mill:c0001) and mill_done (mill:c0001) of cycle 1" \
        in text
    assert "mill_beam_off" in text                   # what it could have been
    backups = list(tmp_path.glob(JOURNAL_NAME + ".corrupt-*"))
    assert len(backups) == 1 and backups[0].read_bytes() == original
    assert not list(tmp_path.glob(".*.part"))
    recs = list(read_records(tmp_path))
    assert recs[-1]["rec"] == "journal_repaired" and recs[-1]["dropped"][0]["line"] == n + 1
    assert recs[-1]["dropped"][0]["head"].startswith(mill_line[:20].decode())
    assert recs[-1]["backup"] == backups[0].name

    j2 = Journal(tmp_path)
    st = j2.open()
    st.records -= 1                                  # the journal_repaired record
    assert st == want and st.mill_status("mill:c0001") == ("done", 0.0)
    j2.close()
    # a second repair finds nothing and never overwrites the backup
    out = io.StringIO()
    assert repair_main(tmp_path, out) == 0 and "nothing to repair" in out.getvalue()
    assert len(list(tmp_path.glob(JOURNAL_NAME + ".corrupt-*"))) == 1


def test_repair_guesses_a_lost_tile_done(tmp_path):
    j = make(tmp_path, cycles=1)
    ls = lines(j)
    n = next(i for i, line in enumerate(ls) if b'"tile_done"' in line)
    ls[n] = b"\xff" * 50 + b"\n"
    j.path.write_bytes(b"".join(ls))
    no_snapshot(tmp_path)
    rep = repair_journal(tmp_path, dry_run=True)
    assert not rep.repaired and rep.backup is None and len(rep.dropped) == 1
    assert rep.dropped[0].guess() == ("tile_done", "c0000_s0001_g00_r000_c000")
    assert "acquired again" in rep.text() and "journal repair" in rep.text()
    assert repair_journal(tmp_path).repaired
    st = Journal(tmp_path).read()
    assert st.tiles_done_total == 5                  # 6 tiles, one tile_done lost: acquired again on resume


def test_repair_of_a_damaged_tail_after_a_snapshot(tmp_path):
    j = make(tmp_path, cycles=3, snapshot_every=10)
    snap_offset = json.loads((tmp_path / SNAPSHOT_NAME).read_bytes())["offset"]
    with open(j.path, "ab") as f:                    # damage in the part after the snapshot
        f.write(b"garbage\n")
        f.write(jm.encode_record({"rec": "incident", "t": 1.0, "severity": "info", "cause": "x", "message": ""}))
    with pytest.raises(JournalCorrupt):
        Journal(tmp_path).open()
    rep = repair_journal(tmp_path)
    assert rep.repaired and not rep.snapshot_removed     # the snapshot covers only intact lines
    j2 = Journal(tmp_path)
    st = j2.open()
    assert j2.last_read.snapshot and j2.last_read.start_offset == snap_offset
    assert st == Journal(tmp_path).read(use_snapshot=False)


def test_repair_removes_a_snapshot_covering_a_dropped_line(tmp_path):
    j = make(tmp_path, cycles=3, snapshot_every=10)
    ls = lines(j)
    ls[4] = b"garbage\n"
    j.path.write_bytes(b"".join(ls))
    rep = repair_journal(tmp_path)
    assert rep.snapshot_removed and not (tmp_path / SNAPSHOT_NAME).exists()
    assert Journal(tmp_path).open().cycles_done == {0, 1, 2}


def test_repair_main_without_a_journal(tmp_path):
    out = io.StringIO()
    assert repair_main(tmp_path, out) == 2 and "no journal" in out.getvalue()


# ------------------------------------------------------------------ failed appends
def test_short_write_then_enospc_leaves_file_and_state_as_before(tmp_path, monkeypatch):
    j = make(tmp_path, cycles=1)
    j = Journal(tmp_path)
    j.open()
    key = tile(j, 1, 1, 0)
    before_bytes, before_state = j.path.read_bytes(), json.dumps(j.state.to_json(), sort_keys=True)
    real_write, calls = os.write, []

    def partial(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[:len(data) // 3]))      # a short write ...
        raise OSError(errno.ENOSPC, "No space left on device")       # ... then the disk is full
    monkeypatch.setattr(jm.os, "write", partial)
    with pytest.raises(OSError) as e:
        j.append("tile_done", key="c0001_s0001_g00_r000_c009", version=0, cycle=1, files=[], qc={})
    assert e.value.errno == errno.ENOSPC and len(calls) == 2
    monkeypatch.undo()
    assert j.path.read_bytes() == before_bytes
    assert json.dumps(j.state.to_json(), sort_keys=True) == before_state
    assert "c0001_s0001_g00_r000_c009" not in j.state.tiles_done
    j.append("tile_done", key="c0001_s0001_g00_r000_c009", version=0, cycle=1, files=[], qc={})    # space again
    j.close()
    st = Journal(tmp_path).read(use_snapshot=False)
    assert key in st.tiles_done and "c0001_s0001_g00_r000_c009" in st.tiles_done


def test_failed_fsync_cuts_the_record_off(tmp_path, monkeypatch):
    j = Journal(tmp_path)
    j.open()
    j.append("run_start", run_uid="u", resumed=False, plan_source="p")
    before = j.path.read_bytes()
    real_fsync, n = os.fsync, []

    def bad_fsync(fd):
        n.append(fd)
        if len(n) == 1:
            raise OSError(errno.EIO, "I/O error")
        return real_fsync(fd)
    monkeypatch.setattr(jm.os, "fsync", bad_fsync)
    with pytest.raises(OSError):
        j.append("tile_started", key="a", version=0, cycle=0)
    assert j.path.read_bytes() == before and j.state.tiles_started == {}


def test_undo_that_fails_too_stops_the_journal(tmp_path, monkeypatch):
    j = Journal(tmp_path)
    j.open()
    j.append("run_start", run_uid="u", resumed=False, plan_source="p")
    real_write = os.write
    monkeypatch.setattr(jm.os, "write", lambda fd, d: real_write(fd, bytes(d[:10])) if len(d) > 50 else
                        (_ for _ in ()).throw(OSError(errno.EIO, "gone")))
    monkeypatch.setattr(jm.os, "ftruncate", lambda fd, n: (_ for _ in ()).throw(OSError(errno.EIO, "gone")))
    with pytest.raises(OSError):
        j.append("tile_started", key="a", version=0, cycle=0)
    monkeypatch.undo()
    with pytest.raises(jm.JournalBroken):            # never a valid line behind the torn one
        j.append("tile_started", key="b", version=0, cycle=0)
    j.close()
    st = Journal(tmp_path).open()                    # the torn line is the tail: cut on resume
    assert st.runs == 1 and st.tiles_started == {}


def test_crash_points_name_each_operation(tmp_path, monkeypatch):
    seen = []
    import common.atomic
    record = lambda op, path: seen.append((op, os.path.basename(path)))  # noqa: E731
    monkeypatch.setattr(jm.crashpoints, "point", record)
    monkeypatch.setattr(common.atomic, "point", record)          # fsync_dir: the folder's entries
    j = Journal(tmp_path, snapshot_every=2)
    j.open()
    j.append("run_start", run_uid="u", resumed=False, plan_source="p")
    j.append("tile_started", key="a", version=0, cycle=0)
    assert seen == [("create", JOURNAL_NAME), ("fsync_dir", tmp_path.name),
                    ("write", JOURNAL_NAME), ("fsync", JOURNAL_NAME), ("write", JOURNAL_NAME), ("fsync", JOURNAL_NAME),
                    ("create", SNAPSHOT_NAME), ("write", SNAPSHOT_NAME), ("fsync", SNAPSHOT_NAME),
                    ("rename", SNAPSHOT_NAME), ("fsync_dir", tmp_path.name)]
    j.close()


# ------------------------------------------------------------------ snapshots
def test_snapshot_then_reopen_reads_only_the_tail(tmp_path):
    j = make(tmp_path, cycles=3, snapshot_every=25)
    size = j.path.stat().st_size
    assert (tmp_path / SNAPSHOT_NAME).exists()
    j = Journal(tmp_path, snapshot_every=10)
    j.open()
    j.append("run_start", run_uid="v", resumed=True, plan_source="p")
    cycle(j, 3, done=False)
    tile(j, 4, 1, 0)
    # a crash: no close, so the snapshot is the last periodic one
    snap = json.loads((tmp_path / SNAPSHOT_NAME).read_bytes())
    total = j.path.stat().st_size
    assert size < snap["offset"] < total
    j2 = Journal(tmp_path)
    st = j2.open()
    info = j2.last_read
    assert info.snapshot and info.start_offset == snap["offset"]
    assert info.tail_bytes == total - snap["offset"] and 0 < info.tail_records < 10
    full = Journal(tmp_path).read(use_snapshot=False)
    assert st == full and st.tiles_done_total == 3 * 6 + 6 + 1 and st.runs == 2
    assert st.mill_status("mill:c0003") == ("done", 0.0) and st.first_open_cycle() == 3
    j2.close()


def test_snapshot_that_does_not_match_the_journal_is_ignored(tmp_path):
    make(tmp_path / "a", cycles=2, snapshot_every=10)
    make(tmp_path / "b", cycles=3, snapshot_every=10)
    os.replace(tmp_path / "a" / SNAPSHOT_NAME, tmp_path / "b" / SNAPSHOT_NAME)     # another run's snapshot
    j = Journal(tmp_path / "b")
    st = j.read()
    assert not j.last_read.snapshot and j.last_read.snapshot_ignored
    assert st.cycles_done == {0, 1, 2} and st == Journal(tmp_path / "b").read(use_snapshot=False)
    # a journal cut shorter than its snapshot (copied back from elsewhere)
    make(tmp_path / "c", cycles=3, snapshot_every=10)
    p = tmp_path / "c" / JOURNAL_NAME
    p.write_bytes(p.read_bytes()[:p.stat().st_size // 2].rsplit(b"\n", 1)[0] + b"\n")
    j = Journal(tmp_path / "c")
    st = j.read()
    assert not j.last_read.snapshot and st == Journal(tmp_path / "c").read(use_snapshot=False)
    # a damaged snapshot
    s = tmp_path / "b" / SNAPSHOT_NAME
    data = bytearray((tmp_path / "c" / SNAPSHOT_NAME).read_bytes())
    data[len(data) // 2] ^= 1
    s.write_bytes(bytes(data))
    j = Journal(tmp_path / "b")
    assert j.read().cycles_done == {0, 1, 2} and not j.last_read.snapshot


def test_state_forgets_tiles_of_done_cycles(tmp_path):
    j = Journal(tmp_path)
    j.open()
    j.append("run_start", run_uid="u", resumed=False, plan_source="p")
    for c in range(5):
        cycle(j, c, tiles=4)
    cycle(j, 5, tiles=4, done=False)
    j.close()
    for st in (j.state, Journal(tmp_path).read(), Journal(tmp_path).read(use_snapshot=False)):
        assert st.tiles_done_total == 6 * 8
        assert {k[:5] for k in st.tiles_done} == {"c0005"} and len(st.tiles_done) == 8
        assert {k[:5] for k in st.tiles_started} == {"c0005"} and {k[:5] for k in st.tile_qc} == {"c0005"}
        assert set(st.autofocus) == {"af:c0005_s0001", "af:c0005_s0002"}
        assert set(st.mill_started) == {"mill:c0005"}
        assert not any(k.startswith(("af:c0000", "sec:c0000")) for k in st.done)
        assert st.cycles_done == {0, 1, 2, 3, 4} and st.first_open_cycle() == 5
        assert st.mill_status("mill:c0002") == ("done", 0.0) and st.mill_status("mill:c0005") == ("done", 0.0)
        assert list(st.open_keys) == [5]
    snap = (tmp_path / SNAPSHOT_NAME).read_bytes()
    assert b"c0000_s0001" not in snap and b"c0005_s0001" in snap


def test_open_of_a_long_journal_without_snapshot_writes_one(tmp_path):
    make(tmp_path, cycles=3, snapshot_every=10 ** 6)
    no_snapshot(tmp_path)
    j = Journal(tmp_path, snapshot_every=20)
    j.open()
    assert (tmp_path / SNAPSHOT_NAME).exists()
    j.close()
    j = Journal(tmp_path)
    j.read()
    assert j.last_read.snapshot and j.last_read.tail_records == 0


def test_tiles_done_total_counts_each_tile_once(tmp_path):
    j = Journal(tmp_path)
    j.open()
    tile(j, 0, 1, 0)
    tile(j, 0, 1, 0, version=1)                        # re-acquired: still one tile
    tile(j, 0, 1, 1)
    assert j.state.tiles_done_total == 2 and j.state.next_version("c0000_s0001_g00_r000_c000") == 2
    j.close()


def test_exposures_count_scans_per_tile_and_cycle(tmp_path):
    j = Journal(tmp_path)
    j.open()
    key = tile(j, 0, 1, 0)
    j.append("exposure", key=key, n=2, why="retry")
    j.append("exposure_granted", key=key)
    tile(j, 0, 1, 0, version=1)
    assert j.state.exposures == {key: 4} and j.state.exposures_granted == {key: 1}
    j.close()
    assert Journal(tmp_path).read(use_snapshot=False).exposures == {key: 4}
    j = Journal(tmp_path)
    j.open()
    j.append("cycle_done", key="cycle:c0000", cycle=0)
    assert j.state.exposures == {} and j.state.exposures_granted == {}
    j.close()


def test_repair_refuses_while_a_run_holds_the_folder(tmp_path):
    from acq.outdir_lock import OutdirLock
    j = make(tmp_path, cycles=1)
    ls = lines(j)
    ls[2] = b"garbage\n"
    j.path.write_bytes(b"".join(ls))
    lock = OutdirLock(tmp_path).acquire()
    try:
        out = io.StringIO()
        assert repair_main(tmp_path, out) == 2 and "in use" in out.getvalue()
        assert j.path.read_bytes() == b"".join(ls)
    finally:
        lock.release()
    assert repair_main(tmp_path, io.StringIO()) == 0


def test_records_of_the_wrong_shape_are_damage_not_a_traceback(tmp_path):
    """A (legacy, unchecksummed) journal whose records lack the fields resume
    folds, or carry a version that is no number: named, never replayed."""
    (tmp_path / JOURNAL_NAME).write_text(
        '{"rec":"run_start","t":1}\n{"rec":"tile_started","key":"a"}\n'
        '{"rec":"tile_done","key":"a","version":"x"}\n{"rec":"run_stop","t":2}\n')
    with pytest.raises(JournalCorrupt, match=r"lines 2, 3 .*wrong shape"):
        Journal(tmp_path).read()
