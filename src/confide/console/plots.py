"""Bar charts as inline SVG, drawn here on the console's side: no script, no charting library, nothing
from another site. Colours come from console.css classes (the CSP allows no inline style), and each
chart is an image with a title and a description for screen readers, the exact figures in a table
beside it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from confide.console.html import esc, table

WIDTH = 720
LABEL_W = 190  # the left column: bar labels (longer ones are cut, the table has them whole)
VALUE_W = 110  # the right column: the value written after the bar
ROW_H = 22
BAR_H = 14
MAX_LABEL_CHARS = 26
MAX_BARS = 60


@dataclass(frozen=True)
class Bars:
    """What one chart shows: a title, labelled non-negative finite values, and how to write them."""

    title: str
    items: tuple[tuple[str, float], ...]
    note: str = ""  # said under the chart (what the figures are, what was left out)
    share: bool = False  # also write each value's share of the total

    def __post_init__(self) -> None:
        if not all(math.isfinite(v) and v >= 0 for _, v in self.items):
            raise ValueError("bars need finite non-negative values")


def _fmt(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return f"{int(value):,}"
    return f"{value:.4g}"


def _cut(label: str) -> str:
    return label if len(label) <= MAX_LABEL_CHARS else label[: MAX_LABEL_CHARS - 1] + "…"


def bar_chart(bars: Bars, ident: str) -> str:
    """A <figure>: the SVG bars (at most MAX_BARS, the note says so when more), and a table of every
    value. `ident` makes the element ids unique on the page."""
    shown = bars.items[:MAX_BARS]
    top = max((v for _, v in shown), default=0.0) or 1.0
    total = sum(v for _, v in bars.items)
    span = WIDTH - LABEL_W - VALUE_W

    def written(value: float) -> str:
        if bars.share and total > 0:
            return f"{_fmt(value)} ({100 * value / total:.1f}%)"
        return _fmt(value)

    rows = []
    for i, (label, value) in enumerate(shown):
        y = i * ROW_H
        w = max(span * value / top, 1.0 if value > 0 else 0.0)
        rows.append(
            f'<g class="bar-row"><text class="bar-label" x="{LABEL_W - 8}" y="{y + ROW_H - 7}" '
            f'text-anchor="end">{esc(_cut(label))}</text>'
            f'<rect class="bar" x="{LABEL_W}" y="{y + (ROW_H - BAR_H) / 2:g}" width="{w:.1f}" '
            f'height="{BAR_H}"><title>{esc(label)}: {esc(written(value))}</title></rect>'
            f'<text class="bar-value" x="{LABEL_W + w + 6:.1f}" y="{y + ROW_H - 7}">'
            f"{esc(written(value))}</text></g>"
        )
    height = max(len(shown), 1) * ROW_H + 4
    title_id, desc_id = f"{ident}-title", f"{ident}-desc"
    more = f"; the first {MAX_BARS} of {len(bars.items)} are drawn" if len(bars.items) > MAX_BARS else ""
    desc = f"{len(bars.items)} bar(s), the longest {_fmt(top)}{more}"
    svg = (
        f'<svg class="plot" role="img" aria-labelledby="{title_id} {desc_id}" '
        f'viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}">'
        f'<title id="{title_id}">{esc(bars.title)}</title><desc id="{desc_id}">{esc(desc)}</desc>'
        f'<line class="axis" x1="{LABEL_W}" y1="0" x2="{LABEL_W}" y2="{height}"/>' + "".join(rows) + "</svg>"
    )
    note = f'<p class="plot-note">{esc(bars.note)}</p>' if bars.note else ""
    figures = table(
        ("", "Value"),
        ([esc(label), esc(written(value))] for label, value in bars.items),
        caption=f"{bars.title}: the figures",
        empty="",
    )
    return (
        f'<figure class="chart"><figcaption>{esc(bars.title)}</figcaption>{svg}{note}'
        f"<details><summary>The figures</summary>{figures}</details></figure>"
    )


def charts_html(charts: Sequence[Bars], ident: str) -> str:
    return "".join(bar_chart(c, f"{ident}-{i}") for i, c in enumerate(charts))
