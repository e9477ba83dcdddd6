"""Small inline-SVG charts for the run report: line/point charts and grouped
bars with axes, ticks and a legend. Hand-made so the report needs no
plotting library and embeds in the HTML as text (no files, no scripts)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape
from typing import Optional, Sequence

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
BAD = "#d62728"


@dataclass
class Series:
    name: str
    xs: Sequence[float]
    ys: Sequence[float]
    style: str = "line"                  # line | points | both
    color: Optional[str] = None
    bad: Sequence[bool] = field(default_factory=list)     # points drawn as red crosses (failed QC, autofocus)


def nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    """Round tick values covering [lo, hi] (1, 2, 2.5, 5 x 10^k steps; whole
    numbers only with ``integer``, for cycles)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi <= lo:
        hi = lo + (abs(lo) * 0.1 or 1.0)
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in ((1, 2, 5, 10) if integer else (1, 2, 2.5, 5, 10)) if m * mag >= raw)
    if integer:
        step = max(1.0, round(step))
    first = math.floor(lo / step) * step
    ticks, v = [], first
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 12))
        v += step
    if ticks[-1] < hi:
        ticks.append(round(ticks[-1] + step, 12))
    return ticks


def fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
        return f"{v:.2g}"
    return f"{v:.4g}"


def _frame(width: int, height: int, title: str) -> list[str]:
    return [f'<svg width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}" '
            'font-family="sans-serif" font-size="11">',
            f'<rect width="{width}" height="{height}" fill="#fff"/>',
            f'<text x="{width / 2:.0f}" y="16" text-anchor="middle" font-size="13" font-weight="bold">'
            f'{escape(title)}</text>']


def _axes(out: list[str], box, xt, yt, xmap, ymap, xlabel, ylabel, xfmt) -> None:
    x0, y0, x1, y1 = box
    for v in yt:
        y = ymap(v)
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{x0 - 4}" y="{y + 4:.1f}" text-anchor="end">{escape(fmt(v))}</text>')
    for v in xt:
        x = xmap(v)
        out.append(f'<line x1="{x:.1f}" y1="{y1}" x2="{x:.1f}" y2="{y1 + 4}" stroke="#444"/>')
        out.append(f'<text x="{x:.1f}" y="{y1 + 16}" text-anchor="middle">{escape(xfmt(v))}</text>')
    out.append(f'<rect x="{x0}" y="{y0}" width="{x1 - x0}" height="{y1 - y0}" fill="none" stroke="#444"/>')
    out.append(f'<text x="{(x0 + x1) / 2:.0f}" y="{y1 + 32}" text-anchor="middle">{escape(xlabel)}</text>')
    out.append(f'<text transform="translate(14,{(y0 + y1) / 2:.0f}) rotate(-90)" text-anchor="middle">'
               f'{escape(ylabel)}</text>')


def _legend(out: list[str], names: list[tuple[str, str]], x: float, y: float) -> None:
    for i, (name, color) in enumerate(names):
        yy = y + 14 * i
        out.append(f'<rect x="{x}" y="{yy - 8}" width="10" height="10" fill="{color}"/>')
        out.append(f'<text x="{x + 14}" y="{yy + 1}">{escape(name)}</text>')


def line_chart(series: Sequence[Series], *, title: str, xlabel: str, ylabel: str, width: int = 560,
               height: int = 260, xfmt=fmt, integer_x: bool = False) -> str:
    """Lines and/or points of several series on shared axes."""
    pts = [(x, y) for s in series for x, y in zip(s.xs, s.ys) if _finite(x) and _finite(y)]
    out = _frame(width, height, title)
    legend_w = max((len(s.name) for s in series), default=0) * 6 + 24 if len(series) > 1 else 0
    box = (62, 28, width - 22 - legend_w, height - 40)
    if not pts:
        out.append(f'<text x="{width / 2:.0f}" y="{height / 2:.0f}" text-anchor="middle" fill="#777">'
                   'no data yet</text></svg>')
        return "".join(out)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    xlo, xhi = min(xs), max(xs)
    if integer_x:
        xlo, xhi = math.floor(xlo), math.ceil(xhi)
    xt = nice_ticks(xlo, xhi, integer=True) if integer_x else nice_ticks(xlo, xhi)
    yt = nice_ticks(min(ys), max(ys))
    x0, y0, x1, y1 = box
    xa, xb = (xt[0], xt[-1]) if xt[-1] > xt[0] else (xt[0] - 1, xt[0] + 1)
    ya, yb = (yt[0], yt[-1]) if yt[-1] > yt[0] else (yt[0] - 1, yt[0] + 1)
    pad = 8 if integer_x else 0

    def xmap(v):
        return x0 + pad + (v - xa) / (xb - xa) * (x1 - x0 - 2 * pad)

    def ymap(v):
        return y1 - (v - ya) / (yb - ya) * (y1 - y0)
    _axes(out, box, xt, yt, xmap, ymap, xlabel, ylabel, xfmt)
    names = []
    for i, s in enumerate(series):
        color = s.color or PALETTE[i % len(PALETTE)]
        names.append((s.name, color))
        p = [(xmap(x), ymap(y)) for x, y in zip(s.xs, s.ys) if _finite(x) and _finite(y)]
        if s.style in ("line", "both") and len(p) > 1:
            d = " ".join(f"{x:.1f},{y:.1f}" for x, y in p)
            out.append(f'<polyline points="{d}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        bad = list(s.bad) + [False] * (len(s.xs) - len(s.bad))
        for (x, y), b in zip(((xmap(x), ymap(y)) for x, y in zip(s.xs, s.ys) if _finite(x) and _finite(y)), bad):
            if b:
                out.append(f'<path d="M{x - 4:.1f},{y - 4:.1f}L{x + 4:.1f},{y + 4:.1f}M{x - 4:.1f},{y + 4:.1f}'
                           f'L{x + 4:.1f},{y - 4:.1f}" stroke="{BAD}" stroke-width="2"/>')
            elif s.style in ("points", "both") or len(p) == 1:
                out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{color}"/>')
    if legend_w:
        _legend(out, names, width - legend_w - 4, 40)
    out.append("</svg>")
    return "".join(out)


def bar_chart(categories: Sequence[str], groups: Sequence[tuple[str, Sequence[Optional[float]]]], *, title: str,
              xlabel: str, ylabel: str, width: int = 560, height: int = 260) -> str:
    """Grouped bars: one group per category, one bar per (name, values) entry."""
    vals = [v for _, vs in groups for v in vs if v is not None and _finite(v)]
    out = _frame(width, height, title)
    legend_w = max((len(n) for n, _ in groups), default=0) * 6 + 24 if len(groups) > 1 else 0
    box = (62, 28, width - 22 - legend_w, height - 40)
    if not vals or not categories:
        out.append(f'<text x="{width / 2:.0f}" y="{height / 2:.0f}" text-anchor="middle" fill="#777">'
                   'no data yet</text></svg>')
        return "".join(out)
    yt = nice_ticks(min(0.0, min(vals)), max(vals))
    x0, y0, x1, y1 = box
    ya, yb = yt[0], yt[-1] if yt[-1] > yt[0] else yt[0] + 1
    slot = (x1 - x0) / len(categories)
    bw = slot * 0.8 / max(len(groups), 1)

    def ymap(v):
        return y1 - (v - ya) / (yb - ya) * (y1 - y0)
    step = max(1, math.ceil(len(categories) / 20))            # label at most ~20 categories
    xt = list(range(0, len(categories), step))
    _axes(out, box, xt, yt, lambda i: x0 + slot * (i + 0.5), ymap, xlabel, ylabel,
          lambda i: categories[int(i)])
    for g, (name, values) in enumerate(groups):
        color = PALETTE[g % len(PALETTE)]
        for i, v in enumerate(values):
            if v is None or not _finite(v):
                continue
            x = x0 + slot * i + slot * 0.1 + bw * g
            top, base = ymap(max(v, 0.0)), ymap(min(v, 0.0))
            out.append(f'<rect x="{x:.1f}" y="{top:.1f}" width="{max(bw - 1, 1):.1f}" '
                       f'height="{max(base - top, 0.5):.1f}" fill="{color}"><title>{escape(name)} '
                       f'{escape(categories[i])}: {escape(fmt(v))}</title></rect>')
    if legend_w:
        _legend(out, [(n, PALETTE[i % len(PALETTE)]) for i, (n, _) in enumerate(groups)], width - legend_w - 4, 40)
    out.append("</svg>")
    return "".join(out)


def _finite(v) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False
