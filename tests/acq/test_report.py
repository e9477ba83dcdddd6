"""The run report (acq/report/, `report OUTDIR`) on a real tiny simulated run:
one page with no outside references whose tables say what the journal says,
also for a run cut off mid-way (no run_stop, a torn last journal line)."""
from __future__ import annotations

import math
import re
import shutil
import xml.etree.ElementTree as ET
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from acq.journal import JOURNAL_NAME, read_records
from acq.report import report_path, write_report
from acq.report_cli import report_cmd
from tests.support.engine_runs import make_engine

# a retry on a grabbed tile (re-exposure) and one in an autofocus: incidents and extra scans to report
FAULTS = [{"device": "sem", "operation": "acquire_frame", "kind": "timeout", "at_calls": [3]},
          {"device": "sem", "operation": "acquire_frame", "kind": "incomplete_frame", "at_calls": [21, 22]}]


class Page(HTMLParser):
    """The tables of a page by id (cell texts), its svg fragments, and every
    tag with its attributes."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[list[str]]] = {}
        self.tags: list[tuple[str, dict]] = []
        self._table = self._cell = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "table":
            self._table = self.tables.setdefault(a.get("id", f"t{len(self.tables)}"), [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._table[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def rows(self, name: str) -> list[dict]:
        head, *body = self.tables[name]
        return [dict(zip(head, r)) for r in body]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run with tiles on disk (OME-TIFF + manifest), sweep
    autofocus, irradiation, two mills and injected grab faults."""
    from acq.plan import writer_options
    from acq.writers import make_writers
    tmp = tmp_path_factory.mktemp("report")
    engine, setup, _ = make_engine(tmp, {"autofocus": {"method": "sweep", "sweep_range_um": 30}},
                                   {"faults": FAULTS}, on_pause="stop", max_exposures=10)
    try:
        for w in make_writers(engine.out_dir, writer_options(engine.plan)):
            engine.add_writer(w)
        res = engine.run()
    finally:
        setup.close()
    assert res.status == "success", res.reason
    return engine.out_dir


def _records(out: Path, kind: str) -> list[dict]:
    return [r for r in read_records(out) if r["rec"] == kind]


def _self_contained(text: str, page: Page) -> None:
    assert "<script" not in text.lower() and "<link" not in text.lower() and "url(" not in text
    for tag, attrs in page.tags:
        for k in ("src", "href", "xlink:href", "data"):
            assert not re.match(r"\s*(https?:)?//", attrs.get(k) or ""), (tag, attrs)
    assert "http://" not in text and "https://" not in text
    svgs = re.findall(r"<svg\b.*?</svg>", text, re.S)
    assert len(svgs) >= 6
    for s in svgs:                       # every chart is well-formed XML (what an SVG reader needs)
        ET.fromstring(s)


def test_report_of_a_finished_run_matches_its_journal(finished):
    page_path = write_report(finished)
    assert page_path == finished / "report" / "report.html"
    text = page_path.read_text(encoding="utf-8")
    page = Page(text)
    _self_contained(text, page)
    done = _records(finished, "tile_done")
    facts = {r[""]: r["so far"] for r in page.rows("throughput")}
    assert facts["tiles done"] == str(len(done)) == "8" and facts["planned tiles"] == "8"
    assert facts["ETA"] == "finished"
    # incidents: every journaled one, in order, with its severity, cause and message
    incidents = _records(finished, "incident")
    shown = page.rows("incidents")
    assert [(r["severity"], r["cause"], r["message"]) for r in shown] == \
        [(i["severity"], i["cause"], i["message"]) for i in incidents]
    assert any(i["cause"] == "retry" for i in incidents)
    # QC per tile: one row per done tile, with its recorded focus score
    qc = {r["tile"]: r for r in page.rows("qc")}
    assert set(qc) == {r["key"] for r in done}
    for r in done:
        assert qc[r["key"]]["focus"] == f'{r["qc"]["focus"]:.2f}'
    # autofocus: every run with the wd it set, and the correction from the one before
    afs = _records(finished, "autofocus_done")
    shown = page.rows("autofocus")
    assert len(shown) == len(afs) == 4
    assert [r["wd (mm)"] for r in shown] == [f'{a["wd_m"] * 1e3:.4f}' for a in afs]
    assert shown[0]["Δwd (µm)"] == "–"
    assert float(shown[1]["Δwd (µm)"]) == pytest.approx((afs[1]["wd_m"] - afs[0]["wd_m"]) * 1e6, abs=1e-3)
    # dose and mill per cycle
    cycles = {r["cycle"]: r for r in page.rows("cycles")}
    mills = {m["cycle"]: m for m in _records(finished, "mill_done")}
    assert set(cycles) == {"0", "1"}
    for c, m in mills.items():
        assert cycles[str(c)]["mill time (s)"] == f'{m["seconds"]:.1f}'
        assert cycles[str(c)]["depth milled (measured)"] == "not recorded"
        assert float(cycles[str(c)]["SEM dose per tile (e/nm², mean)"]) > 0     # from the tile headers
    irr = page.rows("irradiation")
    assert [r["dose (1e27 eV/cm³)"] for r in irr] == [f'{r["dose_1e27_ev_cm3"]:.4f}' for r in
                                                      _records(finished, "irr_done")]


def test_exposures_count_every_grab_of_a_tile(finished):
    page = Page(write_report(finished).read_text(encoding="utf-8"))
    grabs = Counter()
    for r in read_records(finished):
        if r["rec"] == "tile_started":
            grabs[r["key"]] += 1
        elif r["rec"] == "exposure":
            grabs[r["key"]] += r.get("n", 1)
    more = {k: n for k, n in grabs.items() if n > 1}
    assert more, "the injected fault should have made a tile be grabbed twice"
    shown = {r["tile"]: r for r in page.rows("exposures")}
    assert set(shown) == set(more)
    for k, n in more.items():
        assert shown[k]["times grabbed"] == str(n)
        assert shown[k]["versions on disk"] == str(len(list(finished.glob(f"tiles/*/*/{k}_v*.ome.tif"))))


def test_a_run_cut_off_midway_is_reported_as_going_with_an_eta(finished, tmp_path):
    """What a kill leaves: the journal ends after some tiles, no run_stop, its
    last line half written."""
    out = tmp_path / "cut"
    shutil.copytree(finished, out, ignore=shutil.ignore_patterns("report", "journal.snapshot.json"))
    lines = (out / JOURNAL_NAME).read_bytes().splitlines(keepends=True)
    done_at = [i for i, ln in enumerate(lines) if b'"rec":"tile_done"' in ln]
    keep = lines[:done_at[2] + 1]                                 # three tiles done
    (out / JOURNAL_NAME).write_bytes(b"".join(keep) + lines[done_at[2] + 1][:40])     # torn write
    text = write_report(out).read_text(encoding="utf-8")
    page = Page(text)
    _self_contained(text, page)
    assert "No run_stop after the last start" in text and "last journal line is incomplete" in text
    facts = {r[""]: r["so far"] for r in page.rows("throughput")}
    assert facts["tiles done"] == "3" and len(page.rows("qc")) == 3
    recs = list(read_records(out))
    assert not [r for r in recs if r["rec"] == "run_stop"]
    start = next(r["t"] for r in recs if r["rec"] == "run_start")
    per_tile = (recs[-1]["t"] - start) / 3
    eta = round((8 - 3) * per_tile)
    assert facts["ETA"].startswith(f"{eta // 60}:{eta % 60:02d}") and "this session" in facts["ETA"]
    assert len(page.rows("incidents")) == sum(r["rec"] == "incident" for r in recs)


def test_the_report_replaces_the_previous_one(finished, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(finished, out, ignore=shutil.ignore_patterns("report"))
    first = write_report(out, now=1_800_000_000.0).read_text(encoding="utf-8")
    second = write_report(out, now=1_800_000_060.0).read_text(encoding="utf-8")
    assert first != second                                    # the generation time differs
    assert [p.name for p in (out / "report").iterdir()] == ["report.html"]     # no versions, no leftovers
    assert report_path(out).read_text(encoding="utf-8") == second
    from acq.verify import verify_outdir
    rep = verify_outdir(out)                       # the report is not data: the run still verifies
    assert rep.clean, rep.problems()


def test_damage_inside_the_journal_is_shown_not_fatal(finished, tmp_path):
    out = tmp_path / "damaged"
    shutil.copytree(finished, out, ignore=shutil.ignore_patterns("report", "journal.snapshot.json"))
    lines = (out / JOURNAL_NAME).read_bytes().splitlines(keepends=True)
    lines[12] = b'{"rec":"garbage"' + lines[12][16:].replace(b"crc", b"crx")
    (out / JOURNAL_NAME).write_bytes(b"".join(lines))
    text = write_report(out).read_text(encoding="utf-8")
    assert "Journal damaged" in text and "journal repair" in text


def test_a_resumed_run_reports_both_sessions_and_each_tile_once(tmp_path):
    """Stopped after three tiles, then resumed: two sessions, every tile counted once."""
    engine, setup, _ = make_engine(tmp_path, {"mill": None, "irradiation": None}, on_pause="stop")
    engine.subscribe(lambda d: d.kind == "tile" and len(_records(engine.out_dir, "tile_done")) >= 3
                     and engine.abort())
    try:
        assert engine.run().status == "aborted"
    finally:
        setup.close()
    engine, setup, _ = make_engine(tmp_path, {"mill": None, "irradiation": None}, on_pause="stop", resume=True)
    try:
        assert engine.run().status == "success"
    finally:
        setup.close()
    text = write_report(engine.out_dir).read_text(encoding="utf-8")
    page = Page(text)
    sessions = page.rows("sessions")
    starts = _records(engine.out_dir, "run_start")
    assert [(r["resumed"], r["status"]) for r in sessions] == [("no", "aborted"), ("yes", "success")]
    assert [r["run"] for r in sessions] == [s["run_uid"][:12] for s in starts]
    per_session = [0, 0]
    session = -1
    for r in read_records(engine.out_dir):
        session += r["rec"] == "run_start"
        per_session[session] += r["rec"] == "tile_done"
    assert [int(r["tiles done"]) for r in sessions] == per_session and sum(per_session) == 8
    facts = {r[""]: r["so far"] for r in page.rows("throughput")}
    assert facts["tiles done"] == "8" and facts["ETA"] == "finished"
    cycles = {r["cycle"]: r for r in page.rows("cycles")}
    assert {c: r["mill"] for c, r in cycles.items()} == {"0": "none planned", "1": "none planned"}
    assert "the plan has no mill" in text


# ------------------------------------------------------------------ command line
def _cli() -> typer.Typer:
    app = typer.Typer(add_completion=False)
    app.command("report")(report_cmd)

    @app.command("other")                 # two commands: "report" stays a subcommand, as in main.py
    def _other() -> None:
        pass
    return app


def test_cli_writes_the_report_and_refuses_what_is_not_a_run(finished, tmp_path):
    out = tmp_path / "cli"
    shutil.copytree(finished, out, ignore=shutil.ignore_patterns("report"))
    runner = CliRunner()
    res = runner.invoke(_cli(), ["report", str(out)])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == str(out / "report" / "report.html") and report_path(out).is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(_cli(), ["report", str(empty)])
    assert res.exit_code == 2 and "OUTDIR" in res.output and "journal.jsonl" in res.output
    assert not (empty / "report").exists()                    # nothing written into a folder that holds no run
    res = runner.invoke(_cli(), ["report", str(out), "--max-headers", "-1"])
    assert res.exit_code == 2 and "--max-headers -1: allowed 0..1000000" in res.output


@pytest.mark.parametrize("lo,hi,integer", [(4.998, 5.0034, False), (0.0, 1e-7, False), (-3.2, 17.0, False),
                                           (0.0, 12.0, True), (0.0, 3.0, True), (2.0, 2.0, True)])
def test_chart_ticks_cover_the_data_in_round_steps(lo, hi, integer):
    from acq.report.svg import nice_ticks
    t = nice_ticks(lo, hi, integer=integer)
    assert t[0] <= lo and t[-1] >= hi and 2 <= len(t) <= 12
    steps = {round(b - a, 12) for a, b in zip(t, t[1:])}
    assert len(steps) == 1
    step = steps.pop()
    assert round(step / 10 ** math.floor(math.log10(step)), 9) in (1, 2, 2.5, 5)
    if integer:
        assert all(float(v).is_integer() for v in t)
