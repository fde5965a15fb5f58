"""The pure core of the rollup worker: validate stream entries and fold their events into window totals.

Nothing here does I/O, so the worker's arithmetic is tested with plain tables and every backend receives
exactly the same aggregates for the same events.

Each event adds to four windows of its customer, kept apart for live and test keys: the UTC ``minute``,
``hour`` and ``day`` that contain its timestamp, and its billing ``period`` (as recorded in the event). A
late event lands in the windows of its own timestamp, however late it arrives. Fields of a window:

* ``n:<outcome>``: calls with that outcome (every event, billable or not);
* ``spend``: micro-credits charged for the calls (the per-event costs recorded when the batch was flushed);
* one field per meter, for billable events only, by the meter's aggregation: ``count`` adds one per
  call, ``sum`` adds the units, ``max`` keeps the largest value, ``last`` the newest one (by event
  timestamp; on a tie the later event in the stream), ``unique`` the distinct values. A meter the
  configuration does not know is summed (or, for text values, counted as distinct values): usage is never
  dropped because the configuration changed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Final

from meterware.config import Meter
from meterware.events import EventDecodeError, UsageEvent, decode_batch
from meterware.storage.base import Window, WindowTotals

_DAY: Final = 86_400
#: Seconds each kind of window is kept after its last update (0: kept for good).
WINDOW_TTLS: Final[Mapping[str, int]] = {
    "minute": 2 * _DAY,
    "hour": 35 * _DAY,
    "day": 400 * _DAY,
    "period": 0,
}
WINDOWS: Final = ("minute", "hour", "day", "period")
SPEND: Final = "spend"
#: Longest dead-letter reason kept; reasons are one line.
MAX_REASON: Final = 200

_COST_RE: Final = re.compile(rb"\d{1,19}")
_INTEGER_AGGREGATIONS: Final = frozenset({"sum", "max", "last"})


def outcome_field(outcome: str) -> str:
    """The window field counting calls with ``outcome``."""
    return f"n:{outcome}"


def windows_of(event: UsageEvent) -> tuple[Window, Window, Window, Window]:
    """The minute, hour, day and billing-period windows an event adds to."""
    seconds = event.timestamp_ms // 1000
    live, customer = event.live, event.customer
    return (
        Window(live, customer, "minute", seconds - seconds % 60),
        Window(live, customer, "hour", seconds - seconds % 3600),
        Window(live, customer, "day", seconds - seconds % _DAY),
        Window(live, customer, "period", event.period_start),
    )


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= MAX_REASON else line[: MAX_REASON - 3] + "..."


def parse_entry(
    fields: Mapping[bytes, bytes], meters: Mapping[str, Meter]
) -> tuple[list[UsageEvent], list[int]] | str:
    """Decode one stream entry into its events and their costs, or say in one line why it is garbage.

    The entry must hold ``b`` (a batch of events of a known schema version) and ``c`` (one non-negative
    integer cost per event, comma-separated); a billable event must carry an integer for every meter that
    is summed, maxed or kept as the last value.
    """
    payload = fields.get(b"b")
    if payload is None:
        return "missing field 'b' (the batch of events)"
    raw_costs = fields.get(b"c")
    if raw_costs is None:
        return "missing field 'c' (the costs)"
    try:
        events = decode_batch(payload)
    except EventDecodeError as error:
        return _one_line(f"field 'b': {error}")
    parts = raw_costs.split(b",") if raw_costs else []
    if len(parts) != len(events):
        return f"field 'c': {len(parts)} costs for {len(events)} events"
    costs = []
    for index, part in enumerate(parts):
        if not _COST_RE.fullmatch(part):
            return _one_line(f"field 'c': cost {index} is not a non-negative integer: {part[:20]!r}")
        costs.append(int(part))
    for index, event in enumerate(events):
        if not event.billable:
            continue
        for name, value in event.units.items():
            meter = meters.get(name)
            if meter is not None and meter.aggregation in _INTEGER_AGGREGATIONS and type(value) is not int:
                return _one_line(
                    f"event {index}: meter {name!r} ({meter.aggregation}) needs an integer value"
                )
    return events, costs


def fold(
    events: Iterable[UsageEvent],
    costs: Iterable[int],
    meters: Mapping[str, Meter],
    into: dict[Window, WindowTotals] | None = None,
) -> dict[Window, WindowTotals]:
    """Add events (in stream order, each with its cost) to the totals of their windows.

    ``into`` is extended in place and returned, so the entries of one commit fold into one mapping.
    """
    totals: dict[Window, WindowTotals] = {} if into is None else into
    # Every event of one customer in one minute and period adds to the same four windows.
    targets: dict[tuple[bool, str, int, int], tuple[WindowTotals, ...]] = {}
    for event, cost in zip(events, costs, strict=True):
        minute = event.timestamp_ms // 60_000
        key = (event.live, event.customer, minute, event.period_start)
        group = targets.get(key)
        if group is None:
            group = tuple(_totals_for(totals, window) for window in windows_of(event))
            targets[key] = group
        counted = outcome_field(event.outcome)
        for window_totals in group:
            sums = window_totals.sums
            sums[counted] = sums.get(counted, 0) + 1
            sums[SPEND] = sums.get(SPEND, 0) + cost
            if event.billable:
                for name, value in event.units.items():
                    _add_units(window_totals, meters.get(name), name, value, event.timestamp_ms)
    return totals


def _totals_for(totals: dict[Window, WindowTotals], window: Window) -> WindowTotals:
    found = totals.get(window)
    if found is None:
        found = totals[window] = WindowTotals(ttl=WINDOW_TTLS[window.window])
    return found


def _add_units(totals: WindowTotals, meter: Meter | None, name: str, value: int | str, stamp: int) -> None:
    aggregation = meter.aggregation if meter is not None else ("sum" if type(value) is int else "unique")
    if aggregation == "count":
        totals.sums[name] = totals.sums.get(name, 0) + 1
    elif aggregation == "unique":
        totals.uniques.setdefault(name, set()).add(str(value))
    elif type(value) is not int:
        # parse_entry refuses these; a caller that skipped it gets no silent coercion.
        raise TypeError(f"meter {name!r} ({aggregation}) needs an integer value")
    elif aggregation == "sum":
        totals.sums[name] = totals.sums.get(name, 0) + value
    elif aggregation == "max":
        current = totals.maxes.get(name)
        totals.maxes[name] = value if current is None else max(current, value)
    else:  # last
        previous = totals.lasts.get(name)
        if previous is None or previous[0] <= stamp:
            totals.lasts[name] = (stamp, value)
