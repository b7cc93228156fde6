"""Charts drawn on the server as inline SVG: no script, no CDN, works offline.

Colours are CSS classes (``s-<series>``) that the page maps to its light or dark palette,
so a chart follows the page's theme. Every chart has a title, a y axis with its top value,
time labels at both ends and the middle, a legend, and a tooltip (``<title>``) on each bar
and point: readable at a glance, exact on hover.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from markupsafe import Markup, escape

# About the size a chart is shown at (three to a row at 1280 px), so text stays legible.
WIDTH = 380
HEIGHT = 150
LEFT, RIGHT, TOP, BOTTOM = 40, 8, 8, 20


def _nice(top: float, unit: str = "") -> float:
    """A round axis maximum at or above ``top`` (for seconds, in the unit it is shown in)."""
    if top <= 0:
        return 1.0
    if unit == "s":
        for scale in (86400, 3600, 60):
            if top >= 2 * scale:
                return _nice(top / scale) * scale
    magnitude = 10 ** len(str(int(top))) / 10
    for step in (1, 2, 2.5, 5, 10):
        if top <= step * magnitude:
            return step * magnitude
    return top


def _label(value: float, unit: str) -> str:
    if unit == "s":
        if value >= 7200:
            return f"{value / 3600:.3g}h"
        if value >= 120:
            return f"{value / 60:.3g}m"
        return f"{value:.3g}s"
    return f"{value:.4g}"


def _when(edge: datetime, span_hours: float) -> str:
    return edge.strftime("%H:%M" if span_hours <= 48 else "%b %d")


def _frame(
    title: str, top: float, unit: str, edges: Sequence[datetime], span_hours: float
) -> list[str]:
    plot_h = HEIGHT - TOP - BOTTOM
    parts = [
        f'<line class="axis" x1="{LEFT}" y1="{TOP + plot_h}" x2="{WIDTH - RIGHT}" y2="{TOP + plot_h}"/>',
        f'<line class="grid" x1="{LEFT}" y1="{TOP}" x2="{WIDTH - RIGHT}" y2="{TOP}"/>',
        f'<line class="grid" x1="{LEFT}" y1="{TOP + plot_h / 2}" x2="{WIDTH - RIGHT}" y2="{TOP + plot_h / 2}"/>',
        f'<text class="tick" x="{LEFT - 4}" y="{TOP + 4}" text-anchor="end">{escape(_label(top, unit))}</text>',
        f'<text class="tick" x="{LEFT - 4}" y="{TOP + plot_h / 2 + 4}" text-anchor="end">{escape(_label(top / 2, unit))}</text>',
        f'<text class="tick" x="{LEFT - 4}" y="{TOP + plot_h + 4}" text-anchor="end">0</text>',
    ]
    if edges:
        n = len(edges)
        slot = (WIDTH - LEFT - RIGHT) / n
        for i, anchor in ((0, "start"), (n // 2, "middle"), (n - 1, "end")):
            x = (
                LEFT
                + slot * i
                + (slot if anchor == "end" else slot / 2 if anchor == "middle" else 0)
            )
            parts.append(
                f'<text class="tick" x="{x:.1f}" y="{HEIGHT - 6}" text-anchor="{anchor}">'
                f"{escape(_when(edges[i], span_hours))}</text>"
            )
    return parts


def _wrap(chart_id: str, title: str, legend: Sequence[tuple[str, str]], body: list[str]) -> Markup:
    keys = "".join(
        f'<span class="key"><i class="k-{escape(cls)}"></i>{escape(name)}</span>'
        for name, cls in legend
    )
    svg = (
        f'<svg class="chart" id="{escape(chart_id)}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{escape(title)}"><title>{escape(title)}</title>' + "".join(body) + "</svg>"
    )
    return Markup(
        f'<figure class="chart-box"><figcaption>{escape(title)}'
        f'<span class="legend">{keys}</span></figcaption>{svg}</figure>'
    )


def bars(
    chart_id: str,
    title: str,
    edges: Sequence[datetime],
    series: dict[str, Sequence[float]],
    *,
    span_hours: float,
    classes: dict[str, str] | None = None,
    unit: str = "",
) -> Markup:
    """Stacked bars, one per span of time; ``series`` stack in the order given."""
    classes = classes or {name: name for name in series}
    n = len(edges)
    totals = [sum(values[i] or 0 for values in series.values()) for i in range(n)]
    top = _nice(max(totals, default=0), unit)
    plot_h = HEIGHT - TOP - BOTTOM
    slot = (WIDTH - LEFT - RIGHT) / max(n, 1)
    body = _frame(title, top, unit, edges, span_hours)
    for i in range(n):
        y = float(TOP + plot_h)
        for name, values in series.items():
            value = values[i] or 0
            if value <= 0:
                continue
            h = plot_h * value / top
            y -= h
            body.append(
                f'<rect class="s-{escape(classes[name])}" x="{LEFT + slot * i + 1:.1f}" '
                f'y="{y:.1f}" width="{max(slot - 2, 1):.1f}" height="{h:.1f}">'
                f"<title>{escape(_when(edges[i], span_hours))} {escape(name)}: "
                f"{escape(_label(value, unit))}</title></rect>"
            )
    legend = [(name, classes[name]) for name in series]
    return _wrap(chart_id, title, legend, body)


def lines(
    chart_id: str,
    title: str,
    edges: Sequence[datetime],
    series: dict[str, Sequence[float | None]],
    *,
    span_hours: float,
    classes: dict[str, str] | None = None,
    unit: str = "s",
) -> Markup:
    """Lines through each span's value (a gap where a span has none), with points."""
    classes = classes or {name: name for name in series}
    n = len(edges)
    found = [v for values in series.values() for v in values if v is not None]
    top = _nice(max(found, default=0), unit)
    plot_h = HEIGHT - TOP - BOTTOM
    slot = (WIDTH - LEFT - RIGHT) / max(n, 1)
    body = _frame(title, top, unit, edges, span_hours)
    for name, values in series.items():
        cls = escape(classes[name])
        path: list[str] = []
        for i, value in enumerate(values):
            if value is None:
                if len(path) > 1:
                    body.append(f'<polyline class="l-{cls}" points="{" ".join(path)}"/>')
                path = []
                continue
            x = LEFT + slot * i + slot / 2
            y = TOP + plot_h - plot_h * value / top
            path.append(f"{x:.1f},{y:.1f}")
            body.append(
                f'<circle class="s-{cls}" cx="{x:.1f}" cy="{y:.1f}" r="2.5">'
                f"<title>{escape(_when(edges[i], span_hours))} {escape(name)}: "
                f"{escape(_label(value, unit))}</title></circle>"
            )
        if len(path) > 1:
            body.append(f'<polyline class="l-{cls}" points="{" ".join(path)}"/>')
    if not found:
        body.append(
            f'<text class="tick" x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle">no data</text>'
        )
    legend = [(name, classes[name]) for name in series]
    return _wrap(chart_id, title, legend, body)


def burn_bar(burn: float | None, state: str) -> Markup:
    """A small bar of an error budget's burn (full at 100%; beyond, it says so)."""
    if burn is None:
        return Markup('<span class="muted">no data</span>')
    shown = min(burn, 1.0)
    text = "∞" if burn == float("inf") else f"{burn * 100:.0f}%"
    return Markup(
        f'<svg class="burn" viewBox="0 0 100 10" width="100" height="10" role="img" '
        f'aria-label="budget burn {escape(text)}"><rect class="burn-bg" width="100" height="10"/>'
        f'<rect class="s-{escape(state)}" width="{shown * 100:.1f}" height="10"/></svg> '
        f"{escape(text)}"
    )


CSS = """
.tiles{display:grid;grid-template-columns:repeat(auto-fill,minmax(9.5rem,1fr));gap:.5rem;margin:.4rem 0 .8rem}
.tile{background:var(--panel);border:1px solid var(--line);padding:.4rem .6rem}
.tile b{display:block;font-size:1.15rem}.tile span{font-size:.78rem;color:var(--label)}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(24rem,1fr));gap:.6rem}
figure.chart-box{margin:0;background:var(--panel);border:1px solid var(--line);padding:.4rem .5rem}
figure.chart-box figcaption{font-size:.85rem;font-weight:600;display:flex;flex-wrap:wrap;gap:.2rem .8rem}
.legend{font-weight:400;color:var(--label);display:flex;flex-wrap:wrap;gap:.6rem}
.key i{display:inline-block;width:.7rem;height:.7rem;margin-right:.25rem;vertical-align:-1px}
svg.chart{width:100%;height:auto;display:block}
svg .axis{stroke:var(--muted);stroke-width:1}svg .grid{stroke:var(--line);stroke-width:1}
svg .tick{font-size:11px;fill:var(--label)}
svg polyline{fill:none;stroke-width:2}
.s-succeeded,.k-succeeded,.s-ok,.k-ok{fill:var(--good);background:var(--good)}
.s-failed,.k-failed,.s-breached{fill:var(--bad);background:var(--bad)}
.s-compensated,.k-compensated{fill:var(--c-comp);background:var(--c-comp)}
.s-compensation_failed,.k-compensation_failed{fill:var(--c-compfail);background:var(--c-compfail)}
.s-running,.k-running,.s-burning{fill:var(--wait);background:var(--wait)}
.s-p50,.k-p50{fill:var(--c-a);background:var(--c-a)}.l-p50{stroke:var(--c-a)}
.s-p95,.k-p95{fill:var(--c-b);background:var(--c-b)}.l-p95{stroke:var(--c-b)}
.s-count,.k-count{fill:var(--c-a);background:var(--c-a)}
.burn-bg{fill:var(--line)}
:root{--c-a:#2563eb;--c-b:#c2410c;--c-comp:#7c3aed;--c-compfail:#9f1239}
:root[data-theme=dark]{--c-a:#7fb0ff;--c-b:#ffab70;--c-comp:#c4a5ff;--c-compfail:#ff8fab}
@media (prefers-color-scheme:dark){:root:not([data-theme=light]){--c-a:#7fb0ff;--c-b:#ffab70;--c-comp:#c4a5ff;--c-compfail:#ff8fab}}
.state-ok{color:var(--good);font-weight:600}.state-burning{color:var(--wait);font-weight:600}
.state-breached{color:var(--bad);font-weight:600}.state-no_data{color:var(--muted)}
section.workflow{margin:1.2rem 0 1.6rem}
"""
