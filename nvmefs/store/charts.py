"""The two charts of a summary (summary.py), per namespace: the LBA map (where on the namespace
the errors are, by status) and errors over time (by status), drawn for a terminal (`text`) or
as one standalone SVG document (`svg`).

Why a writer of our own rather than a library: both charts are stacked bars over at most a few
hundred columns, which is a few dozen lines of SVG elements and of block characters; a plotting
library (matplotlib, plotext) would add megabytes and a dependency to the core install for it,
and neither gives a terminal drawing that is guaranteed to fit a width and be free of escape
codes when asked. Every string that comes from records is escaped by summary (render.escape,
no control characters) before it gets here, and XML-quoted here.

Bounds: at most TOP_STATUSES statuses per chart (the rest is one "other" series), at most
SVG_COLUMNS columns and SVG_NAMESPACES namespaces in the SVG, so a document's size is bounded
whatever the summary holds (the FUSE mount renders it on open).
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable, Sequence
from typing import Any
from xml.sax.saxutils import escape as xml_escape
from xml.sax.saxutils import quoteattr

from nvmefs.store.summary import Histogram, Namespace, NsKey, Summary

TOP_STATUSES = 8
OTHER = "other"
SVG_COLUMNS = 96
SVG_NAMESPACES = 16
MIN_WIDTH = 40

# Terminal: block characters by level (one eighth each), or ASCII when the output is not UTF-8.
BLOCKS = " ▁▂▃▄▅▆▇█"
ASCII_LEVELS = " .:-=+*#@"
# ANSI colours of the series (the last one for "other").
ANSI = ("31", "33", "35", "36", "32", "34", "91", "95", "90")
RESET = "\033[0m"
# SVG colours of the series, distinguishable and readable on white (the last one for "other").
SVG_COLOURS = (
    "#d62728",
    "#ff7f0e",
    "#9467bd",
    "#17becf",
    "#2ca02c",
    "#1f77b4",
    "#e377c2",
    "#bcbd22",
    "#7f7f7f",
)

Series = list[tuple[str, list[int]]]


def clock(ns: int) -> str:
    """Wall-clock nanoseconds as 'YYYY-MM-DD HH:MM:SS' (UTC)."""
    dt = datetime.datetime.fromtimestamp(ns // 1_000_000_000, tz=datetime.UTC)
    return dt.strftime("%Y-%m-%d %H:%M:%S")


def duration(ns: int) -> str:
    """A span of nanoseconds, short: 45s, 12m, 3.5h, 2d."""
    s = ns / 1e9
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.3g}{unit}"
    return f"{s:.3g}s"


def _series(
    ns: Namespace, hist: Histogram, columns: int, keys: list[tuple[str, Any]], start: int | None
) -> tuple[int, int, Series]:
    """The chart series of a namespace over a histogram: (first value, values per column,
    [(label, counts per column)]), the TOP_STATUSES statuses with most errors, then OTHER
    summing the rest (if any). `keys` pairs each status, most errors first, with its key in
    the histogram."""
    first, per, cols = hist.view(columns, [k for _, k in keys], start=start)
    out: Series = [(label, cols[k]) for label, k in keys[:TOP_STATUSES]]
    rest = [cols[k] for _, k in keys[TOP_STATUSES:]]
    if rest:
        out.append((OTHER, [sum(c) for c in zip(*rest, strict=True)]))
    return first, per, out


def lba_series(ns: Namespace, columns: int) -> tuple[int, int, Series]:
    """The LBA map of a namespace from LBA 0 to the highest bucket with errors."""
    keys: list[tuple[str, Any]] = [(r.status, r.status) for r in ns.sorted_rows()]
    return _series(ns, ns.lba, columns, keys, 0)


def time_series(summary: Summary, ns: Namespace, columns: int) -> tuple[int, int, Series]:
    """Errors over time of a namespace, over the time of the whole summary (so the charts of
    several namespaces line up)."""
    keys: list[tuple[str, Any]] = [(r.status, (ns.key, r.status)) for r in ns.sorted_rows()]
    return _series(ns, summary.time, columns, keys, None)


# -- terminal ------------------------------------------------------------------------------------


def _fit(line: str, width: int) -> str:
    return line if len(line) <= width else line[: width - 1] + "~"


def _colour(text: str, i: int, on: bool) -> str:
    return f"\033[{ANSI[min(i, len(ANSI) - 1)]}m{text}{RESET}" if on else text


def _bars(
    title: str, series: Series, width: int, colour: bool, levels: str, axis: tuple[str, str]
) -> list[str]:
    """A chart as text: one row of level characters per series, scaled to the chart's
    largest column; then the axis' two ends under the bars."""
    label_w = max([len(s) for s, _ in series] + [6]) + 4
    lines = [_fit(f"  {title}", width)]
    peak = max([max(c, default=0) for _, c in series] + [1])
    top = len(levels) - 1
    for i, (label, counts) in enumerate(series):
        cells = "".join(levels[math.ceil(c * top / peak)] if c else " " for c in counts)
        total = f"{sum(counts):>7}"
        head = f"  {label:<{label_w - 2}}"
        lines.append(
            _colour(head, i if label != OTHER else len(ANSI), colour)
            + "|"
            + _colour(cells, i if label != OTHER else len(ANSI), colour)
            + "|"
            + total
        )
    ncols = len(series[0][1]) if series else 0
    left, right = axis
    gap = ncols + 2 - len(left) - len(right)
    # The ends under the bars' ends where they fit, else one after the other.
    ends = left + " " * gap + right if gap >= 2 else f"{left} .. {right}"
    lines.append(_fit(" " * label_w + ends, width))
    return lines


def chart_columns(width: int, summary: Summary) -> int:
    """Columns of bars that fit `width` characters with the row labels and totals."""
    label_w = max([len(s) for ns in summary.namespaces.values() for s in ns.rows] + [6]) + 4
    return max(8, max(width, MIN_WIDTH) - label_w - 2 - 7)


def text(summary: Summary, width: int = 80, colour: bool = False, unicode: bool = True) -> str:
    """The report as text lines of at most `width` (at least MIN_WIDTH) characters, not
    counting colour codes, which appear only with `colour`; without `unicode`, plain ASCII."""
    width = max(width, MIN_WIDTH)
    levels = BLOCKS if unicode else ASCII_LEVELS
    t = summary.time
    out: list[str] = []
    n = len(summary.namespaces)
    head = f"nvmefs report: {summary.errors} NVMe errors on {n} namespace{'s' * (n != 1)}"
    out.append(_fit(head, width))
    if t.lo is not None and t.hi is not None:
        out.append(_fit(f"  {clock(t.lo)} .. {clock(t.hi)} UTC", width))
    notes = [f"{summary.records} records read", f"{summary.skipped} not NVMe errors"]
    if summary.folded:
        notes.append(f"{summary.folded} errors folded into like entries")
    if summary.bad:
        notes.append(f"{summary.bad} unreadable")
    if summary.before_since:
        notes.append(f"{summary.before_since} before --since")
    if summary.missed:
        notes.append(f"{summary.missed} entries missed by this reader (not counted)")
    if summary.overflow:
        notes.append(f"{summary.overflow} over the report's bounds (not counted)")
    out.append(_fit("  " + ", ".join(notes), width))
    columns = chart_columns(width, summary)
    for ns in summary.sorted_namespaces():
        out.append("")
        ident = ns.label()
        if ns.serial:
            ident += f"  serial {ns.serial}"
        if ns.model:
            ident += f"  model {ns.model}"
        out.append(_fit(ident, width))
        name_w = max(10, width - 2 - 8 - 10 - 14)
        for i, r in enumerate(ns.sorted_rows()):
            top = (
                f"  {r.status:<8}{r.name[:name_w]:<{name_w}}{r.count:>10} "
                f"{r.rate_per_day():>9.1f}/day"
            )
            lbas = "no LBA" if r.lba_min is None else f"LBA {r.lba_min}..{r.lba_max}"
            second = f"{' ' * 10}{clock(r.first_ns)} .. {clock(r.last_ns)}  {lbas}"
            colour_i = i if i < TOP_STATUSES else len(ANSI)
            fitted = _fit(top, width)
            out.append(_colour(fitted[:10], colour_i, colour) + fitted[10:])
            out.append(_fit(second, width))
        if ns.no_lba:
            noun = "error" if ns.no_lba == 1 else "errors"
            out.append(_fit(f"  {ns.no_lba} {noun} without an LBA (not in the map)", width))
        first, per, series = lba_series(ns, columns)
        if any(any(c) for _, c in series):
            last = first + per * len(series[0][1]) - 1
            out += _bars(
                f"LBA map: {per} LBA{'s' * (per != 1)} per column",
                series,
                width,
                colour,
                levels,
                (str(first), str(last)),
            )
        first, per, series = time_series(summary, ns, columns)
        end = first + per * len(series[0][1]) if series else first
        out += _bars(
            f"errors over time (UTC): {duration(per)} per column",
            series,
            width,
            colour,
            levels,
            (clock(first), clock(end)),
        )
    return "\n".join(out) + "\n"


# -- SVG -----------------------------------------------------------------------------------------

SVG_WIDTH = 960
PLOT_LEFT = 70
PLOT_RIGHT = 20
PLOT_HEIGHT = 140
CHART_HEIGHT = PLOT_HEIGHT + 60  # title above, axis labels below


def _svg_colour(i: int, label: str) -> str:
    return SVG_COLOURS[-1] if label == OTHER else SVG_COLOURS[min(i, len(SVG_COLOURS) - 2)]


def _svg_chart(
    ident: str,
    cls: str,
    title: str,
    y: int,
    series: Series,
    first: int,
    per: int,
    label_of: Callable[[int], str],
    empty: str = "no errors",
) -> list[str]:
    """One chart as a <g>: stacked bars of the series, a frame, the largest column's count on
    the y axis and the values at both ends of the x axis (label_of turns a value into text);
    `empty` says why there are no bars, if there are none."""
    plot_w = SVG_WIDTH - PLOT_LEFT - PLOT_RIGHT
    ncols = len(series[0][1]) if series else 0
    totals = [sum(c[j] for _, c in series) for j in range(ncols)]
    peak = max([*totals, 1])
    top = y + 24
    el = [
        f"<g id={quoteattr(ident)} class={quoteattr('chart ' + cls)}>",
        f'<text class="chart-title" x="{PLOT_LEFT}" y="{y + 14}">{xml_escape(title)}</text>',
        f'<rect class="frame" x="{PLOT_LEFT}" y="{top}" width="{plot_w}" '
        f'height="{PLOT_HEIGHT}" fill="none" stroke="#999"/>',
        f'<text class="y-label" x="{PLOT_LEFT - 6}" y="{top + 10}" text-anchor="end">{peak}</text>',
        f'<text class="y-label" x="{PLOT_LEFT - 6}" y="{top + PLOT_HEIGHT}" '
        'text-anchor="end">0</text>',
    ]
    if not any(totals):
        el.append(
            f'<text class="no-data" x="{PLOT_LEFT + plot_w // 2}" y="{top + PLOT_HEIGHT // 2}" '
            f'text-anchor="middle" fill="#999">{xml_escape(empty)}</text>'
        )
    else:
        bar_w = plot_w / ncols
        for j in range(ncols):
            base = float(top + PLOT_HEIGHT)
            for i, (label, counts) in enumerate(series):
                c = counts[j]
                if not c:
                    continue
                h = max(1.0, c * PLOT_HEIGHT / peak)
                base -= h
                lo = first + j * per
                where = f"{label_of(lo)} .. {label_of(lo + per - 1)}"
                tip = f"{label}: {c} error{'s' * (c != 1)}, {where}"
                el.append(
                    f'<rect class="bar" data-status={quoteattr(label)} '
                    f'x="{PLOT_LEFT + j * bar_w:.2f}" y="{base:.2f}" '
                    f'width="{max(bar_w - 1, 1):.2f}" '
                    f'height="{h:.2f}" fill="{_svg_colour(i, label)}">'
                    f"<title>{xml_escape(tip)}</title></rect>"
                )
        last = first + per * ncols - 1
        ly = top + PLOT_HEIGHT + 16
        el.append(
            f'<text class="x-label" x="{PLOT_LEFT}" y="{ly}">{xml_escape(label_of(first))}</text>'
        )
        el.append(
            f'<text class="x-label" x="{SVG_WIDTH - PLOT_RIGHT}" y="{ly}" text-anchor="end">'
            f"{xml_escape(label_of(last))}</text>"
        )
    el.append("</g>")
    return el


def svg(summary: Summary) -> str:
    """The summary as one standalone SVG document (UTF-8 text, no external references): per
    namespace (at most SVG_NAMESPACES) a heading, a legend, the LBA map (<g id="lba-map-N"
    class="chart lba-map">) and errors over time (<g id="errors-over-time-N" class="chart
    errors-over-time">), N counting namespaces from 1. Its size is bounded (module docstring)."""
    body: list[str] = []
    y = 10
    t = summary.time
    n = len(summary.namespaces)
    head = f"nvmefs: {summary.errors} NVMe errors on {n} namespace{'s' * (n != 1)}"
    if t.lo is not None and t.hi is not None:
        head += f", {clock(t.lo)} .. {clock(t.hi)} UTC"
    body.append(f'<text class="heading" x="10" y="{y + 16}">{xml_escape(head)}</text>')
    y += 30
    if not summary.namespaces:
        body.append(f'<text class="empty" x="10" y="{y + 16}">no NVMe errors</text>')
        y += 30
    shown = summary.sorted_namespaces()[:SVG_NAMESPACES]
    for k, ns in enumerate(shown, 1):
        ident = ns.label()
        if ns.serial:
            ident += f"  serial {ns.serial}"
        if ns.model:
            ident += f"  model {ns.model}"
        body.append(f'<g id="ns-{k}" class="namespace">')
        body.append(f'<text class="ns-title" x="10" y="{y + 16}">{xml_escape(ident)}</text>')
        y += 24
        rows = ns.sorted_rows()
        legend = [(r.status, r.name, r.count) for r in rows[:TOP_STATUSES]]
        if len(rows) > TOP_STATUSES:
            legend.append((OTHER, "other statuses", sum(r.count for r in rows[TOP_STATUSES:])))
        for i, (status, name, count) in enumerate(legend):
            body.append(
                f'<rect class="swatch" x="20" y="{y + 4}" width="10" height="10" '
                f'fill="{_svg_colour(i, status)}"/>'
                f'<text class="legend" x="36" y="{y + 13}">'
                f"{xml_escape(f'{status} {name}: {count}')}</text>"
            )
            y += 16
        y += 6
        first, per, series = lba_series(ns, SVG_COLUMNS)
        body += _svg_chart(
            f"lba-map-{k}",
            "lba-map",
            f"LBA map ({per} LBA{'s' * (per != 1)} per bar)",
            y,
            series,
            first,
            per,
            str,
            "no errors with an LBA",
        )
        y += CHART_HEIGHT
        first, per, series = time_series(summary, ns, SVG_COLUMNS)
        body += _svg_chart(
            f"errors-over-time-{k}",
            "errors-over-time",
            f"Errors over time, UTC ({duration(per)} per bar)",
            y,
            series,
            first,
            per,
            clock,
        )
        y += CHART_HEIGHT
        body.append("</g>")
    if len(summary.namespaces) > len(shown):
        more = len(summary.namespaces) - len(shown)
        body.append(
            f'<text class="more" x="10" y="{y + 16}">{more} more namespaces not drawn</text>'
        )
        y += 30
    return "\n".join(
        [
            '<?xml version="1.0" encoding="UTF-8"?>',
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{SVG_WIDTH}" height="{y}" '
            f'viewBox="0 0 {SVG_WIDTH} {y}" font-family="sans-serif" font-size="12">',
            "<title>nvmefs: NVMe errors</title>",
            f'<rect class="background" width="{SVG_WIDTH}" height="{y}" fill="#fff"/>',
            *body,
            "</svg>",
            "",
        ]
    )


def keys_of(summary: Summary) -> Sequence[NsKey]:
    """The namespaces' keys in the order the charts show them (N - 1 in the SVG's ids)."""
    return [ns.key for ns in summary.sorted_namespaces()]
