"""The portal's SVG plots: one element per point with its value, nice axes, reference lines, legible labels,
accessible colours and text, escaped input, and well-formed SVG for every shape of data."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from itertools import pairwise

import pytest
from markupsafe import Markup

from meterware.portal.charts import PALETTE, bar_chart

SVG = "{http://www.w3.org/2000/svg}"
HOUR = 3600
DAY = 86400
#: 2026-12-07 14:00 UTC
T0 = int(datetime(2026, 12, 7, 14, tzinfo=UTC).timestamp())
OKABE_ITO = {"#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000"}
HOSTILE = "<script>alert('x')</script> & \"quoted\""


def chart(
    values: Mapping[str, Sequence[int | float]] | Sequence[int | float],
    *,
    window: str = "hour",
    first: int = T0,
    lines: Sequence[tuple[str, float]] = (),
    unit: str = "calls",
    title: str = "Calls",
) -> ET.Element:
    """Render a chart of ``values`` (one series, or several by name) from ``first`` and parse it as XML."""
    series = values if isinstance(values, Mapping) else {"calls": values}
    count = len(next(iter(series.values()), []))
    step = {"minute": 60, "hour": HOUR, "day": DAY}[window]
    starts = [first + index * step for index in range(count)]
    svg = bar_chart(
        title=title, unit=unit, window=window, starts=starts, series=series, lines=lines, chart_id="usage"
    )
    assert isinstance(svg, Markup)
    return ET.fromstring(str(svg))


def points(root: ET.Element) -> list[ET.Element]:
    return [element for element in root.iter() if element.get("class") == "point"]


def by_class(root: ET.Element, name: str) -> list[ET.Element]:
    return [element for element in root.iter() if element.get("class") == name]


def y_ticks(root: ET.Element) -> list[float]:
    return [float(tick.get("data-value", "nan")) for tick in by_class(root, "tick-y")]


def tooltip(element: ET.Element) -> str:
    title = element.find(f"{SVG}title")
    assert title is not None
    return title.text or ""


def luminance(colour: str) -> float:
    """WCAG 2 relative luminance of ``#rrggbb``."""
    channels = [int(colour[index : index + 2], 16) / 255 for index in (1, 3, 5)]
    red, green, blue = (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
    return 0.2126 * red + 0.7152 * green + 0.0722 * blue


def contrast_on_white(colour: str) -> float:
    return 1.05 / (luminance(colour) + 0.05)


def test_one_series_draws_one_point_per_start_carrying_its_value() -> None:
    """Each bar is one element with its start, series and value; a zero is a zero-height bar, not a gap."""
    root = chart([5, 0, 1234, 7.5])
    drawn = points(root)
    assert [p.get("data-start") for p in drawn] == [str(T0 + index * HOUR) for index in range(4)]
    assert [p.get("data-series") for p in drawn] == ["calls"] * 4
    assert [p.get("data-value") for p in drawn] == ["5", "0", "1234", "7.5"]
    assert float(drawn[1].get("height", "nan")) == 0
    assert float(drawn[2].get("height", "nan")) > 0
    assert tooltip(drawn[2]) == "2026-12-07 16:00 UTC: 1,234 calls"
    assert not by_class(root, "legend-entry"), "one series needs no legend"


def test_a_day_tooltip_names_the_day() -> None:
    (point,) = points(chart([42], window="day", unit="tokens"))
    assert tooltip(point) == "2026-12-07 UTC: 42 tokens"


def test_several_series_stack_bottom_up_in_legend_order() -> None:
    """One element per series per start; the first series sits on the axis, each next one on top of it,
    and the legend lists them in that order, with their name in every tooltip."""
    series = {"success": [10, 0, 3], "client error": [2, 4, 0], "refused": [1, 1, 1]}
    root = chart(series)
    drawn = points(root)
    assert len(drawn) == 9
    assert [e.get("data-series") for e in by_class(root, "legend-entry")] == list(series)
    for index in range(3):
        column = [p for p in drawn if p.get("data-start") == str(T0 + index * HOUR)]
        assert [p.get("data-series") for p in column] == list(series)
        assert [float(p.get("data-value", "nan")) for p in column] == [v[index] for v in series.values()]
        for lower, upper in pairwise(column):
            upper_bottom = float(upper.get("y", "nan")) + float(upper.get("height", "nan"))
            assert upper_bottom == pytest.approx(float(lower.get("y", "nan")), abs=0.011)
    assert tooltip(drawn[3]) == "2026-12-07 14:00 UTC, client error: 2 calls"


def test_stacked_series_differ_without_colour() -> None:
    """Past the first, each stacked series and its legend swatch carry a texture (a mask defined in the
    chart), and no two series share both colour and texture."""
    names = [f"s{index}" for index in range(7)]
    root = chart({name: [1, 2] for name in names})
    groups = by_class(root, "series")
    looks = [(g.get("fill"), g.get("mask")) for g in groups]
    assert len(set(looks)) == len(names)
    assert looks[0][1] is None
    defined = {element.get("id") for element in root.iter(f"{SVG}mask")}
    for _, mask in looks[1:]:
        assert mask is not None
        assert mask.removeprefix("url(#").removesuffix(")") in defined
    for group, entry in zip(groups, by_class(root, "legend-entry"), strict=True):
        swatch = entry.find(f"{SVG}rect")
        assert swatch is not None
        assert (swatch.get("fill"), swatch.get("mask")) == (group.get("fill"), group.get("mask"))


def test_reference_lines_are_labelled_and_the_axis_reaches_them() -> None:
    """Quota and included lines are drawn dashed with their label and value, inside the y axis."""
    root = chart([100, 300], lines=[("quota", 1000), ("included", 500)])
    references = by_class(root, "reference")
    assert [(r.get("data-label"), r.get("data-value")) for r in references] == [
        ("quota", "1000"),
        ("included", "500"),
    ]
    for reference in references:
        line = reference.find(f"{SVG}line")
        assert line is not None
        assert line.get("stroke-dasharray")
    labels = ["".join(r.itertext()) for r in references]
    assert labels == ["quota: 1,000 calls", "included: 500 calls"]
    assert y_ticks(root)[-1] >= 1000
    quota_y = float(references[0].find(f"{SVG}line").get("y1", "nan"))  # type: ignore[union-attr]
    top_tick = by_class(root, "tick-y")[-1]
    assert quota_y >= float(top_tick.get("y", "nan")) - 0.01


def test_close_reference_labels_do_not_overlap() -> None:
    """Two lines a hair apart keep their labels apart."""
    root = chart([1], lines=[("quota", 1000), ("soft limit", 990)])
    spots = []
    for reference in by_class(root, "reference"):
        text = reference.find(f"{SVG}text")
        assert text is not None
        spots.append((text.get("text-anchor"), float(text.get("y", "nan"))))
    (anchor_a, y_a), (anchor_b, y_b) = spots
    assert anchor_a != anchor_b or abs(y_a - y_b) >= 12


@pytest.mark.parametrize(
    "highest", [0, 0.0004, 0.003, 1, 7, 10, 99, 101, 1000, 1001, 12_345, 2_500_000, 7.3e10]
)
def test_the_y_axis_has_four_to_six_nice_ticks_that_just_cover_the_data(highest: float) -> None:
    """Ticks start at 0 and step by 1, 2 or 5 x 10^n, and the top tick is the first at or above the
    largest value (1 when all is zero)."""
    ticks = y_ticks(chart([highest / 2, highest]))
    assert 4 <= len(ticks) <= 6
    assert ticks[0] == 0
    step = ticks[1]
    steps = [b - a for a, b in pairwise(ticks)]
    assert steps == pytest.approx([step] * len(steps))
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert round(mantissa, 9) in {1, 2, 5}
    assert ticks[-1] >= highest
    assert ticks[-2] < max(highest, 1e-300) or highest == 0
    if highest == 0:
        assert ticks[-1] == 1


@pytest.mark.parametrize(
    ("highest", "labels"),
    [
        pytest.param(0, ["0", "0.2", "0.4", "0.6", "0.8", "1"], id="all-zero"),
        pytest.param(0.003, ["0", "0.001", "0.002", "0.003"], id="small-decimals"),
        pytest.param(80, ["0", "20", "40", "60", "80"], id="units"),
        pytest.param(1500, ["0", "500", "1k", "1.5k"], id="thousands"),
        pytest.param(2_000_000, ["0", "500k", "1M", "1.5M", "2M"], id="millions"),
        pytest.param(3e9, ["0", "1B", "2B", "3B"], id="billions"),
    ],
)
def test_y_tick_labels_are_compact(highest: float, labels: list[str]) -> None:
    root = chart([highest])
    assert [tick.text for tick in by_class(root, "tick-y")] == labels


def test_the_unit_is_named_on_the_axis() -> None:
    (caption,) = by_class(chart([1], unit="tokens", window="day"), "unit")
    assert caption.text == "tokens per day (UTC)"


def x_labels(root: ET.Element) -> list[tuple[float, str, str | None]]:
    """(x, main text, context line or None) of each x axis label."""
    found = []
    for label in by_class(root, "tick-x"):
        context = label.find(f"{SVG}tspan")
        found.append(
            (float(label.get("x", "nan")), label.text or "", None if context is None else context.text)
        )
    return found


@pytest.mark.parametrize(
    ("window", "count"),
    [
        ("minute", 1),
        ("minute", 60),
        ("minute", 1440),
        ("hour", 1),
        ("hour", 7),
        ("hour", 24),
        ("hour", 48),
        ("hour", 2160),
        ("day", 1),
        ("day", 31),
        ("day", 90),
        ("day", 365),
    ],
)
def test_x_labels_are_few_and_never_overlap(window: str, count: int) -> None:
    """At most 10 labels whatever the number of points, each at least its own width (0.6 em a character,
    wider than system-ui's digits) from the next, and all inside the drawing."""
    root = chart([1] * count, window=window, first=T0 - T0 % DAY)
    labels = x_labels(root)
    assert 1 <= len(labels) <= 10
    width = [max(len(text), len(context or "")) * 0.6 * 12 for _, text, context in labels]
    for (x, _, _), w in zip(labels, width, strict=True):
        assert x - w / 2 >= 0
        assert x + w / 2 <= 720
    for (x_a, _, _), (x_b, _, _), w_a, w_b in zip(labels, labels[1:], width, width[1:], strict=False):
        assert x_b - x_a >= (w_a + w_b) / 2 + 4


def test_hour_labels_read_as_times_with_the_date_where_the_day_changes() -> None:
    """48 hours from 18:00: a label every 6 hours on the clock, the date under the first and each midnight."""
    first = int(datetime(2026, 12, 5, 18, tzinfo=UTC).timestamp())
    labels = x_labels(chart([1] * 48, first=first))
    assert [(text, context) for _, text, context in labels] == [
        ("18:00", "Dec 05"),
        ("00:00", "Dec 06"),
        ("06:00", None),
        ("12:00", None),
        ("18:00", None),
        ("00:00", "Dec 07"),
        ("06:00", None),
        ("12:00", None),
    ]


def test_day_labels_read_as_dates_with_the_year_once() -> None:
    first = int(datetime(2026, 3, 3, tzinfo=UTC).timestamp())
    labels = x_labels(chart([1] * 5, window="day", first=first))
    assert [(text, context) for _, text, context in labels] == [
        ("Mar 03", "2026"),
        ("Mar 04", None),
        ("Mar 05", None),
        ("Mar 06", None),
        ("Mar 07", None),
    ]


def test_ninety_days_of_hours_label_dates_on_mondays() -> None:
    """2,160 points: one element each, and labels a fixed number of whole weeks apart, on Mondays."""
    first = int(datetime(2026, 9, 8, tzinfo=UTC).timestamp())
    root = chart([index % 24 for index in range(2160)], first=first)
    assert len(points(root)) == 2160
    starts = [int(label.get("data-start", "0")) for label in by_class(root, "tick-x")]
    assert all(datetime.fromtimestamp(start, UTC).weekday() == 0 for start in starts)
    gaps = {b - a for a, b in pairwise(starts)}
    assert len(gaps) == 1
    assert gaps.pop() % (7 * DAY) == 0


def test_the_text_alternative_summarises_the_data() -> None:
    """role="img" labelled by the chart's own title and a description: points, span, total, peak and time."""
    root = chart({"success": [10, 50, 5], "server error": [0, 2, 1]}, lines=[("quota", 100)], title="Calls")
    assert root.get("role") == "img"
    title_id, desc_id = (root.get("aria-labelledby") or "").split()
    ids = {element.get("id"): element for element in root.iter()}
    assert ids[title_id].tag == f"{SVG}title"
    assert ids[title_id].text == "Calls"
    assert ids[desc_id].tag == f"{SVG}desc"
    assert ids[desc_id].text == (
        "3 hours from 2026-12-07 14:00 UTC to 2026-12-07 16:00 UTC. "
        "Total 68 calls; peak 52 calls at 2026-12-07 15:00 UTC. "
        "Stacked bars, bottom to top: success 65, server error 3. "
        "Reference lines: quota 100 calls."
    )


def test_the_chart_scales_with_its_container_at_a_fixed_aspect() -> None:
    root = chart([1])
    assert root.get("viewBox") == "0 0 720 300"
    assert root.get("width") == "100%"
    assert root.get("height") is None
    assert root.get("preserveAspectRatio") == "xMidYMid meet"
    assert (root.get("font-family") or "").startswith("system-ui")


def test_every_palette_colour_is_okabe_ito_with_three_to_one_contrast_on_white() -> None:
    """WCAG 1.4.11: graphics need 3:1 against their background."""
    assert len(PALETTE) >= 4
    for colour in PALETTE:
        assert colour.upper() in OKABE_ITO
        assert contrast_on_white(colour) >= 3, colour


def test_the_contrast_check_knows_the_failing_okabe_ito_colours() -> None:
    """The formula is WCAG's: orange, sky blue and yellow fail 3:1 on white, which is why they are out."""
    assert contrast_on_white("#000000") == pytest.approx(21)
    assert contrast_on_white("#FFFFFF") == pytest.approx(1)
    for colour in ("#E69F00", "#56B4E9", "#F0E442"):
        assert contrast_on_white(colour) < 3


def test_bars_use_the_palette_and_text_has_four_and_a_half_to_one_contrast() -> None:
    root = chart({"a": [1, 2], "b": [3, 4]}, lines=[("quota", 10)])
    parents = {child: parent for parent in root.iter() for child in parent}

    def fill(element: ET.Element) -> str:
        while element.get("fill") is None:
            element = parents[element]
        return element.get("fill", "")

    assert {fill(point) for point in points(root)} <= set(PALETTE)
    texts = list(root.iter(f"{SVG}text"))
    assert len(texts) > 10
    for text in texts:
        assert contrast_on_white(fill(text)) >= 4.5, "".join(text.itertext())


def test_every_text_passed_in_is_escaped() -> None:
    """Title, unit, series names and line labels come out as text: the SVG parses and holds no markup."""
    svg = bar_chart(
        title=HOSTILE,
        unit=HOSTILE,
        window="hour",
        starts=[T0, T0 + HOUR],
        series={HOSTILE: [1, 2], "b": [0, 1]},
        lines=[(HOSTILE, 5)],
        chart_id="hostile",
    )
    assert "<script" not in svg
    root = ET.fromstring(str(svg))
    assert root.findtext(f"{SVG}title") == HOSTILE
    assert {p.get("data-series") for p in points(root)} == {HOSTILE, "b"}
    (reference,) = by_class(root, "reference")
    assert reference.get("data-label") == HOSTILE
    assert tooltip(points(root)[0]) == f"2026-12-07 14:00 UTC, {HOSTILE}: 1 {HOSTILE}"


@pytest.mark.parametrize("chart_id", ["", "two words", '"><script>', "1st"])
def test_a_chart_id_that_is_not_a_plain_id_is_refused(chart_id: str) -> None:
    with pytest.raises(ValueError, match="chart_id"):
        bar_chart(title="t", unit="u", window="hour", starts=[T0], series={"a": [1]}, chart_id=chart_id)


def test_a_series_of_the_wrong_length_or_an_unknown_window_is_refused() -> None:
    with pytest.raises(ValueError, match="2 values for 3 starts"):
        bar_chart(title="t", unit="u", window="hour", starts=[1, 2, 3], series={"a": [1, 2]}, chart_id="c")
    with pytest.raises(ValueError, match="window"):
        bar_chart(title="t", unit="u", window="week", starts=[1], series={"a": [1]}, chart_id="c")


def test_all_zero_data_draws_flat_bars_on_a_zero_to_one_axis() -> None:
    root = chart([0, 0, 0])
    assert [float(p.get("height", "nan")) for p in points(root)] == [0, 0, 0]
    assert y_ticks(root) == [0, 0.2, 0.4, 0.6, 0.8, 1]
    assert "Total 0 calls" in (root.findtext(f"{SVG}desc") or "")


def test_one_point_draws_one_bar_of_modest_width() -> None:
    root = chart([3])
    (point,) = points(root)
    assert 0 < float(point.get("width", "nan")) <= 48
    assert (root.findtext(f"{SVG}desc") or "").startswith("1 hour at 2026-12-07 14:00 UTC.")


def test_no_points_say_so() -> None:
    root = chart({})
    assert points(root) == []
    assert "No data" in "".join(root.itertext())


def test_negative_and_non_finite_values_count_as_zero() -> None:
    """Usage cannot be negative: such a value is drawn, and reported, as zero."""
    root = chart([-5, math.nan, math.inf, 2])
    assert [p.get("data-value") for p in points(root)] == ["0", "0", "0", "2"]
    assert [float(p.get("height", "nan")) for p in points(root)][:3] == [0, 0, 0]


def test_decimal_amounts_are_drawn_as_numbers() -> None:
    """Billing keeps credits as Decimal; a chart of them draws like one of floats."""
    root = chart([Decimal("0.0015"), Decimal("0.5")], unit="credits")  # type: ignore[list-item]
    assert [p.get("data-value") for p in points(root)] == ["0.0015", "0.5"]
    assert tooltip(points(root)[0]) == "2026-12-07 14:00 UTC: 0.0015 credits"
