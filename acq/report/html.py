"""The run report as one self-contained HTML page (inline CSS and SVG, no
scripts, no external references) from the data of acq/report/data.py."""
from __future__ import annotations

import time
from collections import Counter
from html import escape
from typing import Iterable, Optional, Sequence

from acq.report.data import RunData, Tile
from acq.report.svg import Series, bar_chart, line_chart

ROWS = 300                    # rows a long table shows (the latest); the page says how many were left out
NOT_RECORDED = '<span class="nr">not recorded</span>'

CSS = """
body{font-family:sans-serif;margin:18px 28px;color:#222;background:#fafafa;font-size:14px}
h1{font-size:22px;margin-bottom:2px} h2{font-size:17px;border-bottom:2px solid #1f77b4;padding-bottom:3px;
margin-top:28px} .sub{color:#666} table{border-collapse:collapse;margin:8px 0;background:#fff}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top;white-space:nowrap}
td.wrap{white-space:normal;min-width:240px;max-width:640px}
th{background:#eef3f8;white-space:normal} td.num{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0} .card{background:#fff;border:1px solid #ccc;
border-radius:6px;padding:8px 12px;min-width:120px} .card b{display:block;font-size:20px}
.card span{color:#666;font-size:12px} .plots{display:flex;flex-wrap:wrap;gap:12px}
.plots svg{border:1px solid #ddd} .nr{color:#a0522d;font-style:italic}
.banner{padding:8px 12px;border-radius:4px;margin:8px 0} .warn{background:#fff3cd;border:1px solid #e0b100}
.bad{background:#fde2e1;border:1px solid #d62728} .ok{color:#2e7d32} .fail{color:#d62728;font-weight:bold}
.sev-error{color:#d62728;font-weight:bold} .sev-warning{color:#b26a00;font-weight:bold} .sev-info{color:#555}
.note{color:#555;font-size:12px}
"""


def when(t: Optional[float]) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "–"


def duration(s: Optional[float]) -> str:
    if s is None:
        return "–"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def num(v, spec: str = ".4g") -> str:
    return "–" if v is None else format(v, spec)


def table(name: str, head: Sequence[str], rows: Iterable[Sequence], *, numeric: Sequence[int] = (),
          raw: Sequence[int] = (), wrap: Sequence[int] = ()) -> str:
    """A table with id ``name``; cells are escaped except the columns in ``raw``
    (already HTML); only the columns in ``wrap`` (messages) break lines."""
    out = [f'<table id="{name}"><tr>' + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        cells = []
        for i, c in enumerate(r):
            text = str(c) if i in raw else escape("–" if c is None else str(c))
            cls = "num" if i in numeric else "wrap" if i in wrap else ""
            cells.append(f'<td class="{cls}">{text}</td>' if cls else f"<td>{text}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _latest(rows: list, what: str) -> tuple[list, str]:
    if len(rows) <= ROWS:
        return rows, ""
    return rows[-ROWS:], f'<p class="note">The latest {ROWS} of {len(rows)} {what} are listed.</p>'


def time_axis(ts: Sequence[float], t0: float) -> tuple[list[float], str]:
    """Times as offsets from ``t0`` in a unit that suits their span, and the axis label."""
    span = max((t - t0 for t in ts), default=0.0)
    unit, div = ("seconds", 1.0) if span < 120 else ("minutes", 60.0) if span < 7200 else ("hours", 3600.0)
    return [(t - t0) / div for t in ts], f"{unit} since the first start"


def _card(value: str, label: str) -> str:
    return f'<div class="card"><b>{value}</b><span>{escape(label)}</span></div>'


# ------------------------------------------------------------------ sections
def _summary(run: RunData) -> str:
    tp = run.throughput
    sev = Counter(i["severity"] for i in run.incidents)
    planned = f"{tp.planned}" + (" at most" if tp.planned_is_bound else "") if tp.planned is not None else "?"
    cycles = f"{len(run.cycles_done)} / {run.n_cycles if run.n_cycles is not None else '?'}"
    cards = [_card(escape(run.status), "status"),
             _card(f"{tp.tiles_done} / {escape(planned)}", "tiles done / planned"),
             _card(cycles, "cycles done / planned"),
             _card(num(tp.tiles_per_h, ".1f"), "tiles per hour"),
             _card(num(tp.mb_per_h, ".1f") if tp.bytes_written is not None else NOT_RECORDED, "MB per hour"),
             _card(duration(tp.eta_s) if tp.eta_s is not None else "–" if run.running else
                   "done" if run.status == "success" else "stopped", "ETA (h:mm:ss)"),
             _card(f'{sev.get("error", 0)} / {sev.get("warning", 0)} / {sev.get("info", 0)}',
                   "incidents error / warning / info")]
    notes = []
    if run.damage:
        notes.append(f'<div class="banner bad"><b>Journal damaged:</b> {escape(run.damage)} The report shows the '
                     "records before the damage.</div>")
    if run.running:
        ago = run.generated - run.last_record_t if run.last_record_t else None
        notes.append('<div class="banner warn">No run_stop after the last start: the run is going, or it was '
                     f"stopped without closing (killed, power cut). Last record {when(run.last_record_t)} "
                     f"({duration(ago)} before this report)."
                     + (" Its last journal line is incomplete (being written or torn) and is left out."
                        if run.torn_tail else "") + "</div>")
    return '<div class="cards">' + "".join(cards) + "</div>" + "".join(notes)


def _throughput(run: RunData) -> str:
    tp = run.throughput
    t0 = run.sessions[0].t_start if run.sessions else 0.0
    xs, xlabel = time_axis(run.tile_times, t0)
    plots = [line_chart([Series("tiles done", xs, list(range(1, len(xs) + 1)))], title="Tiles done over time",
                        xlabel=xlabel, ylabel="tiles")]
    if run.bytes_log:
        log = sorted(run.bytes_log)
        acc, ys = 0, []
        for _, b in log:
            acc += b
            ys.append(acc / 1e6)
        bx, blabel = time_axis([t for t, _ in log], t0)
        plots.append(line_chart([Series("MB written", bx, ys)], title="Data written over time", xlabel=blabel,
                                ylabel="MB"))
    rows = [(s.run_uid[:12], "yes" if s.resumed else "no", when(s.t_start), when(s.t_last),
             duration(s.t_last - s.t_start), s.tiles_done, s.status or "no run_stop", s.reason) for s in run.sessions]
    facts = table("throughput", ["", "so far"], [
        ("tiles done", tp.tiles_done),
        ("acquisition time (sum of sessions)", duration(tp.active_s)),
        ("tiles per hour", num(tp.tiles_per_h, ".1f")),
        ("data written", f"{tp.bytes_written / 1e6:.1f} MB" if tp.bytes_written is not None else NOT_RECORDED),
        ("MB per hour", num(tp.mb_per_h, ".1f") if tp.bytes_written is not None else NOT_RECORDED),
        ("planned tiles", "?" if tp.planned is None else f"{tp.planned}" + (" (upper bound: sections may be "
                                                                            "milled through)" if tp.planned_is_bound
                                                                            else "")),
        ("ETA", (duration(tp.eta_s) + f" at the tile rate of {tp.rate_from}") if tp.eta_s is not None
         else "– (needs two tiles and the planned total)" if run.running
         else "finished" if run.status == "success" else f"– (stopped: {escape(run.status)}; resume to continue)")],
        raw=(1,))
    return ("<h2>Throughput and ETA</h2>" + facts + '<div class="plots">' + "".join(plots) + "</div>"
            + "<h3>Sessions (each start or resume)</h3>"
            + table("sessions", ["run", "resumed", "started", "last record", "duration", "tiles done", "status",
                                "reason"],
                    rows, numeric=(5,), wrap=(7,)))


def _group(items, key):
    out: dict = {}
    for it in items:
        out.setdefault(key(it), []).append(it)
    return out


def _autofocus(run: RunData) -> str:
    afs = run.autofocus
    head = "<h2>Autofocus</h2>"
    if not afs:
        method = (run.plan.get("autofocus") or {}).get("method", "?")
        return head + f"<p>No autofocus recorded (plan method: {escape(str(method))}).</p>"
    secs = _group(afs, lambda a: a.section)
    wd = [Series(f"section {s}", [a.cycle for a in v], [a.wd_m * 1e3 for a in v], "both", bad=[not a.ok for a in v])
          for s, v in sorted(secs.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))]
    dwd = [Series(f"section {s}", [a.cycle for a in v if a.d_wd_m is not None],
                  [a.d_wd_m * 1e6 for a in v if a.d_wd_m is not None], "points")
           for s, v in sorted(secs.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))]
    stig = [Series("stig x", [a.cycle for a in afs], [a.stig[0] for a in afs], "points"),
            Series("stig y", [a.cycle for a in afs], [a.stig[1] for a in afs], "points")]
    plots = [line_chart(wd, title="Working distance after autofocus", xlabel="cycle", ylabel="wd (mm)",
                        integer_x=True),
             line_chart(dwd, title="Correction (change from the previous wd)", xlabel="cycle",
                        ylabel="Δwd (µm)", integer_x=True),
             line_chart(stig, title="Stigmator after autofocus", xlabel="cycle", ylabel="stig (a.u.)",
                        integer_x=True)]
    # convergence: per section, the correction of each cycle (should shrink) and whether it succeeded
    conv = []
    for s, v in sorted(secs.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        fails = sum(1 for a in v if not a.ok)
        d = [abs(a.d_wd_m) * 1e6 for a in v if a.d_wd_m is not None]
        conv.append((s, len(v), fails, num(d[0] if d else None, ".3g"), num(d[-1] if d else None, ".3g"),
                     num(max(d) if d else None, ".3g"), sum(a.frames for a in v)))
    rows = [(a.cycle, a.section, when(a.t), a.method, '<span class="ok">ok</span>' if a.ok else
             '<span class="fail">failed</span>', a.frames, f"{a.wd_m * 1e3:.4f}",
             num(a.d_wd_m * 1e6 if a.d_wd_m is not None else None, "+.3f"), f"{a.stig[0]:+.4f}",
             f"{a.stig[1]:+.4f}", "–" if a.d_stig is None else f"{a.d_stig[0]:+.4f}, {a.d_stig[1]:+.4f}",
             escape(a.message)) for a in afs]
    rows, note = _latest(rows, "autofocus runs")
    return (head + '<div class="plots">' + "".join(plots) + "</div>"
            + "<h3>Convergence per section</h3>"
            + table("convergence", ["section", "runs", "failed", "|Δwd| first (µm)", "|Δwd| last (µm)",
                                   "|Δwd| max (µm)",
                     "frames"], conv, numeric=(1, 2, 3, 4, 5, 6))
            + '<p class="note">Δ = change from the working distance (stigmator) the previous autofocus set, which '
              "is what the SEM had before it; the first autofocus of each session has none recorded before it. "
              "A QC refocus between two autofocus runs is not journaled.</p>"
            + "<h3>Autofocus runs</h3>" + note
            + table("autofocus", ["cycle", "section", "time", "method", "result", "frames", "wd (mm)", "Δwd (µm)",
                                 "stig x",
                     "stig y", "Δstig", "message"], rows, numeric=(0, 1, 5, 6, 7, 8, 9), raw=(4, 11), wrap=(11,)))


def _qc(run: RunData) -> str:
    tiles = [t for t in run.done_tiles() if t.qc]
    head = "<h2>QC per tile over time</h2>"
    if not tiles:
        return head + "<p>No tile with QC values recorded yet.</p>"
    t0 = run.sessions[0].t_start if run.sessions else tiles[0].t_done
    xs, xlabel = time_axis([t.t_done for t in tiles], t0)
    bad = [t.qc.get("ok") is False for t in tiles]

    def series(name, k):
        return Series(name, xs, [t.qc.get(k, float("nan")) for t in tiles], "points", bad=bad)
    plots = [line_chart([series("focus", "focus")], title="Focus score per tile", xlabel=xlabel,
                        ylabel="focus score"),
             line_chart([series("mean", "mean"), series("s.d.", "sd")], title="Mean and s.d. per tile",
                        xlabel=xlabel, ylabel="grey level")]
    failed = [t for t in tiles if t.qc.get("ok") is False]
    rows = [(when(t.t_done), t.key, t.done_version, '<span class="ok">ok</span>' if t.qc.get("ok", True) else
             '<span class="fail">failed</span>', ", ".join(t.qc.get("reasons") or []) or "–",
             num(t.qc.get("mean"), ".1f"), num(t.qc.get("sd"), ".1f"), num(t.qc.get("focus"), ".2f"),
             t.qc.get("attempts", "–")) for t in tiles]
    rows, note = _latest(rows, "tiles")
    return (head + f"<p>{len(tiles)} tiles with QC values; {len(failed)} kept after failing QC "
            "(red crosses).</p>" + '<div class="plots">' + "".join(plots) + "</div>" + note
            + table("qc", ["done", "tile", "version", "QC", "reasons", "mean", "s.d.", "focus", "acquisitions"], rows,
                    numeric=(2, 5, 6, 7, 8), raw=(3,)))


def _dose(run: RunData) -> str:
    cycles = sorted(set(run.mills) | set(run.cycles_done) | {t.cycle for t in run.tiles.values()})
    per_cycle: dict[int, list[Tile]] = _group((t for t in run.tiles.values() if t.done_version is not None),
                                              lambda t: t.cycle)
    rows, mill_s, sem_dose = [], [], []
    depth, cum = run.depth_per_cycle_nm, 0.0
    for c in cycles:
        m = run.mills.get(c)
        tiles = per_cycle.get(c, [])
        doses = [t.electrons_per_nm2 * t.scans for t in tiles if t.electrons_per_nm2 is not None]
        mean_dose = sum(doses) / len(doses) if doses else None
        sem_dose.append(mean_dose)
        if m is None:
            status, secs, planned = ("not started" if run.plan.get("mill") else "none planned"), None, None
        else:
            secs, planned = m.get("done_s"), m.get("planned_s")
            status = {"mill_done": "done" + (" (interrupted, accepted)" if m.get("interrupted") else ""),
                      "mill_beam_on": "beam on (in progress or interrupted)",
                      "mill_beam_off": "beam off between azimuths", "mill_started": "started"}.get(m["last"], m["last"])
        mill_s.append(secs)
        done_mill = m is not None and m.get("last") == "mill_done"
        if done_mill and depth is not None:
            cum += depth
        rows.append((c, len(tiles), status, num(secs, ".1f"), num(planned, ".1f"), NOT_RECORDED,
                     num(depth, ".1f") if done_mill else "–", num(cum, ".1f") if done_mill and depth else "–",
                     num(mean_dose, ".3g"), len(doses)))
    plan_note = ("the plan has no mill" if not run.plan.get("mill") else
                 f'the "plan" columns are the {escape(run.depth_note)}' if depth is not None else
                 "the plan's estimate is not available either (it needs the plan's setup file)")
    labels = [str(c) for c in cycles]
    plots = [bar_chart(labels, [("mill time (s)", mill_s)], title="Mill time per cycle", xlabel="cycle",
                       ylabel="seconds"),
             bar_chart(labels, [("SEM dose", sem_dose)], title="SEM dose per tile area (mean)", xlabel="cycle",
                       ylabel="electrons / nm²")]
    irr = [(r.get("section"), when(r.get("t")), num(r.get("dose_1e27_ev_cm3"), ".4f"),
            num(r.get("target_1e27_ev_cm3"), ".4f"), "yes" if r.get("reached") else "no",
            num(r.get("charge_c"), ".3e"), num(r.get("seconds"), ".1f"), num((r.get("eht_v") or 0) / 1e3, ".3g"))
           for r in run.irradiation]
    irr_plot = bar_chart([str(r.get("section")) for r in run.irradiation],
                         [("dose", [r.get("dose_1e27_ev_cm3") for r in run.irradiation]),
                          ("target", [r.get("target_1e27_ev_cm3") for r in run.irradiation])],
                         title="Irradiation dose per section", xlabel="section", ylabel="1e27 eV/cm³")
    irr_html = ("<p>No irradiation recorded" + (" (the plan has none)." if not run.plan.get("irradiation") else
                                                " yet.") + "</p>") if not irr else (
        '<div class="plots">' + irr_plot + "</div>"
        + table("irradiation", ["section", "time", "dose (1e27 eV/cm³)", "target", "reached", "charge (C)", "seconds",
                                "EHT (kV)"],
                irr, numeric=(0, 2, 3, 5, 6, 7)))
    return ("<h2>Dose and mill depth per cycle</h2>"
            + '<div class="plots">' + "".join(plots) + "</div>"
            + table("cycles", ["cycle", "tiles done", "mill", "mill time (s)", "planned (s)",
                               "depth milled (measured)", "depth (plan, nm)", "cumulative (plan, nm)",
                               "SEM dose per tile (e/nm², mean)", "tiles with dose"],
                    rows, numeric=(0, 1, 3, 4, 6, 7, 8, 9), raw=(5,))
            + f'<p class="note">Depth milled per cycle: {NOT_RECORDED} (nothing measures it); {plan_note}. '
              f"Ion dose of a mill: {NOT_RECORDED} (its time is; the current is only "
              "checked against the plan's tolerance). SEM dose per tile = electrons per nm² of the frame (its "
              "OME-TIFF header) × the times it was grabbed (journal); autofocus frames over a tile are not included. "
              + (escape(run.headers_note) if run.headers_note else "") + "</p>"
            + "<h3>Irradiation (GCIB dose, before the first cycle)</h3>" + irr_html)


def _exposures(run: RunData) -> str:
    tiles = sorted(run.tiles.values(), key=lambda t: (t.cycle, t.section, t.grid, t.row, t.col))
    head = "<h2>Exposures per tile</h2>"
    if not tiles:
        return head + "<p>No tile started yet.</p>"
    hist = Counter(t.scans for t in tiles)
    keys = sorted(hist)
    plot = bar_chart([str(k) for k in keys], [("tiles", [hist[k] for k in keys])],
                     title="Tiles by number of exposures", xlabel="times grabbed", ylabel="tiles")
    more = [t for t in tiles if t.scans > 1 or t.started > 1 or t.on_disk > 1 or t.granted]
    rows = [(t.key, t.cycle, t.section, t.scans, t.started, t.extra_scans, t.on_disk, t.granted,
             t.qc.get("exposures", "–"), "done" if t.done_version is not None else "not done") for t in more]
    rows, note = _latest(rows, "tiles exposed more than once")
    return (head + f"<p>{len(tiles)} tiles started; {len(more)} exposed more than once "
            "(re-acquisitions, retries, refocus).</p>" + '<div class="plots">' + plot + "</div>" + note
            + (table("exposures", ["tile", "cycle", "section", "times grabbed", "versions started",
                                  "retry/refocus scans",
                      "versions on disk", "extra granted", "scans incl. autofocus (at acceptance)", "state"], rows,
                     numeric=(1, 2, 3, 4, 5, 6, 7, 8)) if rows else "<p>Every tile was grabbed once.</p>")
            + '<p class="note">times grabbed = tile_started + exposure records of the journal (every re-acquisition '
              "and retry counts); versions on disk = OME-TIFFs of the tile under tiles/; scans incl. autofocus is the "
              "engine's dose count when the tile was accepted.</p>")


def _incidents(run: RunData) -> str:
    rows = [(when(i["t"]), f'<span class="sev-{escape(str(i["severity"]))}">{escape(str(i["severity"]))}</span>',
             i["cause"], i["message"]) for i in run.incidents]
    rows, note = _latest(rows, "incidents")
    return ("<h2>Incidents</h2>" + (note + table("incidents", ["time", "severity", "cause", "message"], rows,
                                                  raw=(1,), wrap=(3,)) if rows else "<p>No incidents.</p>"))


def render(run: RunData) -> str:
    plan_src = ""
    if run.sessions:
        plan_src = escape(str(run.plan.get("setup", "")))
    body = [f"<h1>Run report</h1><div class=\"sub\">{escape(str(run.out_dir))} — generated {when(run.generated)}"
            f" from {run.records} journal records" + (f"; setup {plan_src}" if plan_src else "") + "</div>",
            _summary(run), _throughput(run), _autofocus(run), _qc(run), _dose(run), _exposures(run), _incidents(run)]
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>Run report — {escape(run.out_dir.name)}</title><style>{CSS}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")
