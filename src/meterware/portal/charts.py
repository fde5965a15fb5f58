"""Server-side SVG plots for the customer portal: bars per time window.

The SVG needs no script and no style sheet: it fills its container's width at a fixed aspect (``viewBox``),
names its unit, and carries a text alternative (``<title>`` and ``<desc>``). Every data point is one element
with ``class="point"``, ``data-start``, ``data-series`` and ``data-value`` and a ``<title>`` tooltip, so a
browser test or a script can count points and read values. Every text passed in is escaped.

The plots show usage, which is never negative: a negative (or non-finite) value is drawn, and reported in
``data-value``, as zero.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Final

from markupsafe import Markup, escape

#: Okabe-Ito colours that keep >= 3:1 contrast against white (WCAG 1.4.11 for graphics); check each.
PALETTE: Final[tuple[str, ...]] = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#000000")

# Text and axes: 14.7:1 on white (WCAG asks 4.5:1 for text). Grid lines only guide the eye.
_TEXT: Final = "#1f2933"
_GRID: Final = "#d5dbe1"
_FONT: Final = "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif"
_FONT_SIZE: Final = 12
# A generous width of one character of _FONT at _FONT_SIZE, to keep labels apart without measuring text.
_CHAR_WIDTH: Final = 0.62 * _FONT_SIZE

_WIDTH: Final = 720
_HEIGHT: Final = 300
_LEFT: Final = 60
_RIGHT: Final = 28
_BOTTOM: Final = 44
_CAPTION_ROW: Final = 22
_LEGEND_ROW: Final = 18
# Room above the plot for a reference line's label when the line is the top of the axis.
_HEADROOM: Final = 16

# The most labels on the x axis, whatever the number of points.
_MAX_X_LABELS: Final = 10

_WINDOW_SECONDS: Final = {"minute": 60, "hour": 3600, "day": 86400}
_DAY: Final = 86400
_WEEK: Final = 7 * _DAY
# Week-long label steps start on Mondays; the epoch was a Thursday.
_FIRST_MONDAY: Final = 4 * _DAY
# Label steps in seconds: the smallest that keeps at most _MAX_X_LABELS labels wins.
_X_STEPS: Final = (
    *(minutes * 60 for minutes in (1, 2, 5, 10, 15, 30)),
    *(hours * 3600 for hours in (1, 2, 3, 6, 12)),
    *(days * _DAY for days in (1, 2, 7, 14, 28, 91, 182, 364)),
)
_MONTHS: Final = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

# Stacked series past the first also differ in texture, so they stay apart without colour: each mask
# cuts a thin pattern (black in the mask) out of the series' bars and its legend swatch.
_TEXTURES: Final = (
    '<path d="M-1,1 l2,-2 M0,6 l6,-6 M5,7 l2,-2" stroke="#000" stroke-width="1.5"/>',
    '<circle cx="3" cy="3" r="1.3" fill="#000"/>',
    '<path d="M0,3 h6" stroke="#000" stroke-width="1.5"/>',
    '<path d="M0,0 l6,6 M6,0 l-6,6" stroke="#000" stroke-width="1"/>',
    '<path d="M3,0 v6" stroke="#000" stroke-width="1.5"/>',
)
_DASHES: Final = ("6 4", "2 3", "10 3 2 3")
# A lone bar as wide as the plot reads as a box, not as a bar.
_MAX_BAR: Final = 48
_CHART_ID: Final = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")

_Number = int | float


def bar_chart(
    *,
    title: str,
    unit: str,
    window: str,
    starts: Sequence[int],
    series: Mapping[str, Sequence[int | float]],
    lines: Sequence[tuple[str, float]] = (),
    chart_id: str,
    per: str | None = None,
) -> Markup:
    """Bars per window start (epoch seconds, UTC; window "minute"|"hour"|"day" decides the tick labels:
    "14:00" for hours with the date at day changes, "Mar 03" for days). One series: plain bars; several:
    stacked bars, with a legend. ``lines``: labelled horizontal reference lines (e.g. ("quota", 1000),
    ("included", 500)), drawn dashed with a label, the y axis scaled to include them.

    ``starts`` are ascending, one per bar (pass every window, zeros included: bars sit side by side);
    each series holds one value per start, and the first series is the bottom of the stack. ``chart_id``
    is the prefix of the ids inside the SVG (``{chart_id}-title``, ``{chart_id}-desc``): a letter, then
    letters, digits, ``-`` or ``_``, unique on the page. ``per``: what a bar covers, for the axis
    caption, when it is not the window (``billing period``).
    """
    if not _CHART_ID.fullmatch(chart_id):
        raise ValueError(f"chart_id must be a letter then letters, digits, '-' or '_': {chart_id!r}")
    if window not in _WINDOW_SECONDS:
        raise ValueError(f"window must be one of {sorted(_WINDOW_SECONDS)}: {window!r}")
    names = list(series)
    columns = [[_clamp(value) for value in series[name]] for name in names]
    for name, column in zip(names, columns, strict=True):
        if len(column) != len(starts):
            raise ValueError(f"series {name!r} has {len(column)} values for {len(starts)} starts")
    totals = [math.fsum(stack) for stack in zip(*columns, strict=True)] if columns else []
    references = [(label, _clamp(value)) for label, value in lines]
    ticks = _nice_ticks(max([*totals, *(value for _, value in references)], default=0))
    stacked = len(names) > 1
    legend_rows = _legend_rows(names) if stacked else []
    top = _CAPTION_ROW + _LEGEND_ROW * len(legend_rows) + _HEADROOM
    plot = _Plot(top=top, ticks=ticks, points=len(totals))

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" '
        f'aria-labelledby="{chart_id}-title {chart_id}-desc" viewBox="0 0 {_WIDTH} {_HEIGHT}" '
        f'width="100%" preserveAspectRatio="xMidYMid meet" font-family="{_FONT}" '
        f'font-size="{_FONT_SIZE}" fill="{_TEXT}">',
        f'<title id="{chart_id}-title">{escape(title)}</title>',
        f'<desc id="{chart_id}-desc">'
        f"{escape(_summary(unit, window, starts, names, columns, totals, references))}</desc>",
    ]
    if stacked:
        parts.append(_textures(chart_id, len(names)))
    caption = f"{unit} per {per or window} (UTC)"
    parts.append(f'<text class="unit" x="{_LEFT}" y="15">{escape(caption)}</text>')
    parts.extend(_legend(chart_id, legend_rows))
    parts.extend(plot.y_axis())
    if totals:
        parts.extend(plot.bars(chart_id, unit, window, starts, names, columns))
    else:
        middle = (plot.top + plot.bottom) / 2
        parts.append(f'<text x="{_WIDTH / 2:.1f}" y="{middle:.1f}" text-anchor="middle">No data</text>')
    parts.extend(plot.x_axis(starts, window))
    parts.extend(plot.references(references, unit))
    parts.append("</svg>")
    return Markup("".join(parts))


class _Plot:
    """The plot area: maps values and bar indexes to coordinates and draws axes, bars and lines."""

    def __init__(self, *, top: float, ticks: list[float], points: int) -> None:
        self.top = top
        self.bottom = _HEIGHT - _BOTTOM
        self.left = _LEFT
        self.right = _WIDTH - _RIGHT
        self.ticks = ticks
        self.band = (self.right - self.left) / max(points, 1)

    def y(self, value: float) -> float:
        return self.bottom - value / self.ticks[-1] * (self.bottom - self.top)

    def y_axis(self) -> list[str]:
        step = self.ticks[1] - self.ticks[0]
        parts = []
        for tick in self.ticks:
            y = self.y(tick)
            parts.append(
                f'<line x1="{self.left}" x2="{self.right}" y1="{y:.2f}" y2="{y:.2f}" stroke="{_GRID}"/>'
                f'<text class="tick-y" data-value="{_raw(tick)}" x="{self.left - 8}" y="{y:.2f}" '
                f'dy=".32em" text-anchor="end">{_compact(tick, step)}</text>'
            )
        return parts

    def bars(
        self,
        chart_id: str,
        unit: str,
        window: str,
        starts: Sequence[int],
        names: list[str],
        columns: list[list[_Number]],
    ) -> list[str]:
        # Narrow bands lose their gaps, and bars narrower than a pixel overlap by one: else antialiasing
        # blends them with the white between them and the bars fade below the palette's contrast.
        width = min(self.band * 0.8, _MAX_BAR) if self.band >= 4 else self.band + (self.band < 2)
        offset = (self.band - width) / 2
        stacked = len(names) > 1
        times = [_moment(start, window) for start in starts]
        unit_text = escape(unit)
        bases = [0.0] * len(starts)
        parts = []
        for index, (name, column) in enumerate(zip(names, columns, strict=True)):
            series = escape(name)
            mask = f' mask="url(#{chart_id}-texture-{index})"' if stacked and index else ""
            parts.append(
                f'<g class="series" data-series="{series}" fill="{PALETTE[index % len(PALETTE)]}"{mask}>'
            )
            about = f", {series}" if stacked else ""
            for position, (start, value) in enumerate(zip(starts, column, strict=True)):
                base = bases[position]
                y_base, y_top = round(self.y(base), 2), round(self.y(base + value), 2)
                bases[position] = base + value
                parts.append(
                    f'<rect class="point" data-start="{int(start)}" data-series="{series}" '
                    f'data-value="{_raw(value)}" x="{self.left + position * self.band + offset:.2f}" '
                    f'y="{y_top:.2f}" width="{width:.2f}" height="{y_base - y_top:.2f}">'
                    f"<title>{times[position]}{about}: {_number(value)} {unit_text}</title></rect>"
                )
            parts.append("</g>")
        return parts

    def x_axis(self, starts: Sequence[int], window: str) -> list[str]:
        parts = [
            f'<line x1="{self.left}" x2="{self.right}" y1="{self.bottom}" y2="{self.bottom}" '
            f'stroke="{_TEXT}"/>'
        ]
        shown_context = None
        indexes, step = _x_label_indexes(starts, _WINDOW_SECONDS[window])
        for index in indexes:
            x = self.left + (index + 0.5) * self.band
            text, context = _x_label(starts[index], window, step)
            extra = ""
            if context != shown_context:
                extra = f'<tspan x="{x:.2f}" dy="1.25em">{context}</tspan>'
                shown_context = context
            parts.append(
                f'<line x1="{x:.2f}" x2="{x:.2f}" y1="{self.bottom}" y2="{self.bottom + 4}" '
                f'stroke="{_TEXT}"/><text class="tick-x" data-start="{int(starts[index])}" x="{x:.2f}" '
                f'y="{self.bottom + 17}" text-anchor="middle">{text}{extra}</text>'
            )
        return parts

    def references(self, references: list[tuple[str, _Number]], unit: str) -> list[str]:
        parts = []
        placed: list[tuple[str, float]] = []
        for index, (label, value) in enumerate(references):
            y = self.y(value)
            text = f"{label}: {_number(value)} {unit}"
            anchor, x, text_y = self._free_spot(placed, y)
            placed.append((anchor, text_y))
            parts.append(
                f'<g class="reference" data-label="{escape(label)}" data-value="{_raw(value)}">'
                f'<line x1="{self.left}" x2="{self.right}" y1="{y:.2f}" y2="{y:.2f}" stroke="{_TEXT}" '
                f'stroke-width="1.5" stroke-dasharray="{_DASHES[index % len(_DASHES)]}"/>'
                f'<text x="{x}" y="{text_y:.2f}" text-anchor="{anchor}" stroke="#fff" stroke-width="3" '
                f'paint-order="stroke">{escape(text)}</text></g>'
            )
        return parts

    def _free_spot(self, placed: list[tuple[str, float]], y: float) -> tuple[str, float, float]:
        """Where a line's label goes: above its right end unless another label is there, then below it,
        then at its left end."""
        candidates = [("end", y - 5), ("end", y + 15), ("start", y - 5), ("start", y + 15)]
        for anchor, text_y in candidates:
            if text_y <= self.bottom and all(
                side != anchor or abs(text_y - other) >= _FONT_SIZE + 2 for side, other in placed
            ):
                return anchor, self.right - 4 if anchor == "end" else self.left + 4, text_y
        return "end", self.right - 4, y - 5


def _textures(chart_id: str, count: int) -> str:
    """The masks that give stacked series past the first their texture (in <defs>)."""
    parts = ["<defs>"]
    for index in range(1, count):
        pattern = f"{chart_id}-pattern-{index}"
        parts.append(
            f'<pattern id="{pattern}" width="6" height="6" patternUnits="userSpaceOnUse">'
            f'<rect width="6" height="6" fill="#fff"/>{_TEXTURES[(index - 1) % len(_TEXTURES)]}</pattern>'
            f'<mask id="{chart_id}-texture-{index}" maskUnits="userSpaceOnUse" x="0" y="0" '
            f'width="{_WIDTH}" height="{_HEIGHT}">'
            f'<rect width="{_WIDTH}" height="{_HEIGHT}" fill="url(#{pattern})"/></mask>'
        )
    parts.append("</defs>")
    return "".join(parts)


def _legend_rows(names: list[str]) -> list[list[tuple[int, str, float]]]:
    """Lay the legend out in rows left to right, in stacking order: (series index, name, x) per entry."""
    rows: list[list[tuple[int, str, float]]] = [[]]
    x = float(_LEFT)
    for index, name in enumerate(names):
        width = 16 + len(name) * _CHAR_WIDTH + 14
        if rows[-1] and x + width > _WIDTH - _RIGHT:
            rows.append([])
            x = _LEFT
        rows[-1].append((index, name, x))
        x += width
    return rows


def _legend(chart_id: str, rows: list[list[tuple[int, str, float]]]) -> list[str]:
    parts = []
    for row_index, row in enumerate(rows):
        y = _CAPTION_ROW + row_index * _LEGEND_ROW
        for index, name, x in row:
            mask = f' mask="url(#{chart_id}-texture-{index})"' if index else ""
            parts.append(
                f'<g class="legend-entry" data-series="{escape(name)}">'
                f'<rect x="{x:.1f}" y="{y + 2}" width="12" height="12" '
                f'fill="{PALETTE[index % len(PALETTE)]}"{mask}/>'
                f'<text x="{x + 16:.1f}" y="{y + 12}">{escape(name)}</text></g>'
            )
    return parts


def _summary(
    unit: str,
    window: str,
    starts: Sequence[int],
    names: list[str],
    columns: list[list[_Number]],
    totals: list[float],
    references: list[tuple[str, _Number]],
) -> str:
    """The chart as text: number of points and their span, total, peak with its time, series, lines."""
    if not totals:
        sentences = ["No data."]
    else:
        peak = max(range(len(totals)), key=totals.__getitem__)
        span = f"from {_moment(starts[0], window)} to {_moment(starts[-1], window)}"
        if len(totals) == 1:
            span = f"at {_moment(starts[0], window)}"
        sentences = [
            f"{len(totals):,} {window}{'s' if len(totals) > 1 else ''} {span}.",
            f"Total {_number(math.fsum(totals))} {unit}; peak {_number(totals[peak])} {unit} "
            f"at {_moment(starts[peak], window)}.",
        ]
        if len(names) > 1:
            shares = ", ".join(
                f"{name} {_number(math.fsum(column))}" for name, column in zip(names, columns, strict=True)
            )
            sentences.append(f"Stacked bars, bottom to top: {shares}.")
    if references:
        marks = ", ".join(f"{label} {_number(value)} {unit}" for label, value in references)
        sentences.append(f"Reference lines: {marks}.")
    return " ".join(sentences)


def _nice_ticks(highest: float) -> list[float]:
    """4 to 6 ticks from 0, a step of 1, 2 or 5 x 10^n, the last at or above ``highest`` (1 if 0)."""
    highest = highest if highest > 0 else 1
    exponent = math.floor(math.log10(highest)) - 2
    while True:
        for mantissa in (1, 2, 5):
            step = mantissa * 10.0**exponent
            # A step below 1/5 of the highest value would need more than 6 ticks; the first that does
            # not needs at least 4, since the steps grow by at most 2.5 times.
            count = math.ceil(highest / step - 1e-9)
            if count <= 5:
                return [_tidy(index * step) for index in range(count + 1)]
        exponent += 1


def _tidy(value: float) -> float:
    """``value`` without float noise (3 * 0.1 is 0.30000000000000004)."""
    return float(f"{value:.12g}")


def _compact(value: float, step: float) -> str:
    """A tick label: 1.5k, 2M, 0.25, with the decimals the tick step needs."""
    scale, suffix = 1.0, ""
    for threshold, name in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            scale, suffix = threshold, name
            break
    decimals = max(0, -math.floor(math.log10(step / scale) + 1e-9))
    text = f"{value / scale:.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text + suffix


def _number(value: float) -> str:
    """A value in full, for text: 1,234 or 0.0015 (at most micro-units, as credits are kept)."""
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.6f}".rstrip("0").rstrip(".")


def _raw(value: float) -> str:
    """A value as data: integers without a fraction, floats in Python's (and JSON's) shortest form."""
    return str(int(value)) if isinstance(value, int) or value.is_integer() else repr(value)


def _clamp(value: int | float) -> _Number:
    """Usage is never negative: a negative, NaN or infinite value counts as zero."""
    if isinstance(value, int):
        return max(value, 0)
    value = float(value)  # a Decimal too, so that it adds up with the floats of the layout
    return value if math.isfinite(value) and value > 0 else 0


def _moment(start: int, window: str) -> str:
    """A window's start as text: "2026-12-07 14:00 UTC", or "2026-12-07 UTC" for a day."""
    moment = datetime.fromtimestamp(start, UTC)
    return f"{moment:%Y-%m-%d} UTC" if window == "day" else f"{moment:%Y-%m-%d %H:%M} UTC"


def _x_label_indexes(starts: Sequence[int], window_seconds: int) -> tuple[list[int], int]:
    """Which bars get a label, and the step between labels in seconds: the smallest round step (on the
    hour, on Mondays ...) that labels at most _MAX_X_LABELS bars, else every n-th bar."""
    for step in _X_STEPS:
        if step < window_seconds:
            continue
        origin = _FIRST_MONDAY if step % _WEEK == 0 else 0
        chosen = [index for index, start in enumerate(starts) if (start - origin) % step == 0]
        if 0 < len(chosen) <= _MAX_X_LABELS:
            return chosen, step
    stride = max(1, -(-len(starts) // _MAX_X_LABELS))
    return list(range(0, len(starts), stride)), stride * window_seconds


def _x_label(start: int, window: str, step: int) -> tuple[str, str]:
    """A label and its context, shown below the first label and where it changes: "14:00" over
    "Dec 07", or "Mar 03" over "2026" when labels are whole days apart."""
    moment = datetime.fromtimestamp(start, UTC)
    day = f"{_MONTHS[moment.month - 1]} {moment.day:02d}"
    if window == "day" or (step % _DAY == 0 and moment.hour == moment.minute == 0):
        return day, str(moment.year)
    return f"{moment:%H:%M}", day
