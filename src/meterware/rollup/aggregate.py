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

A correction (:mod:`meterware.corrections`) is an entry with a field ``n``: one sign per event, ``-1``
for an event it subtracts (the voided or amended original: its call, its ``count`` and ``sum`` units and
its cost) and ``1`` for one it adds (the amended version). ``max``, ``last`` and ``unique`` values cannot
be taken back: corrections refuse events that hold them, and the fold skips them on a subtracted event.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from meterware.config import Meter
from meterware.events import OUTCOMES, EventDecodeError, UsageEvent, decode_batch
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

# Costs and units stay far inside 64-bit integers (Redis counters) and exact doubles (Lua numbers), so
# no single event can make a commit fail forever.
MAX_VALUE: Final = 2**53
_COST_RE: Final = re.compile(rb"\d{1,15}")
_INTEGER_AGGREGATIONS: Final = frozenset({"sum", "max", "last"})


def outcome_field(outcome: str) -> str:
    """The window field counting calls with ``outcome``."""
    return f"n:{outcome}"


_OUTCOME_FIELDS: Final = {outcome: outcome_field(outcome) for outcome in OUTCOMES}


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
    integer cost per event, comma-separated, below 10**15); a billable event must carry an integer for
    every meter that is summed, maxed or kept as the last value, and no integer beyond ``MAX_VALUE``.
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
    raw_signs = fields.get(b"n")
    if raw_signs is not None:
        signs = raw_signs.split(b",") if raw_signs else []
        if len(signs) != len(events) or any(sign not in (b"1", b"-1") for sign in signs):
            return f"field 'n': {len(signs)} signs (1 or -1) for {len(events)} events"
        for event, sign in zip(events, signs, strict=True):
            event.sign = int(sign)
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
            if type(value) is int:
                if not -MAX_VALUE <= value <= MAX_VALUE:
                    return _one_line(f"event {index}: meter {name!r} has a value out of range")
            elif meter is not None and meter.aggregation in _INTEGER_AGGREGATIONS:
                return _one_line(
                    f"event {index}: meter {name!r} ({meter.aggregation}) needs an integer value"
                )
    return events, costs


@dataclass(slots=True)
class _Group:
    """Events of one customer in one minute and one billing period: they add to the same four windows."""

    sums: dict[str, int] = field(default_factory=dict)
    maxes: dict[str, int] = field(default_factory=dict)
    #: field -> (timestamp_ms, position in the fold, value): the position breaks timestamp ties.
    lasts: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    uniques: dict[str, set[str]] = field(default_factory=dict)


def fold(
    events: Iterable[UsageEvent],
    costs: Iterable[int],
    meters: Mapping[str, Meter],
    into: dict[Window, WindowTotals] | None = None,
) -> dict[Window, WindowTotals]:
    """Add events (in stream order, each with its cost) to the totals of their windows.

    ``into`` is extended in place and returned, so the entries of one commit fold into one mapping.
    """
    aggregations = {name: meter.aggregation for name, meter in meters.items()}
    # Fold each event once into its group, then each group into its four windows.
    groups: dict[tuple[bool, str, int, int], _Group] = {}
    for position, (event, cost) in enumerate(zip(events, costs, strict=True)):
        key = (event.live, event.customer, event.timestamp_ms // 60_000, event.period_start)
        group = groups.get(key)
        if group is None:
            group = groups[key] = _Group()
        sums = group.sums
        sign = event.sign  # -1: a correction takes the event back
        counted = _OUTCOME_FIELDS.get(event.outcome) or outcome_field(event.outcome)
        sums[counted] = sums.get(counted, 0) + sign
        sums[SPEND] = sums.get(SPEND, 0) + sign * cost
        if not event.billable:
            continue
        for name, value in event.units.items():
            aggregation = aggregations.get(name) or ("sum" if type(value) is int else "unique")
            if aggregation == "count":
                sums[name] = sums.get(name, 0) + sign
            elif aggregation == "unique":
                if sign > 0:
                    group.uniques.setdefault(name, set()).add(str(value))
            elif type(value) is not int:
                # parse_entry refuses these; a caller that skipped it gets no silent coercion.
                raise TypeError(f"meter {name!r} ({aggregation}) needs an integer value")
            elif aggregation == "sum":
                sums[name] = sums.get(name, 0) + sign * value
            elif sign < 0:
                continue  # a max or a last value cannot be taken back
            elif aggregation == "max":
                current = group.maxes.get(name)
                group.maxes[name] = value if current is None or value > current else current
            else:  # last; later events of a group win timestamp ties, being later in the stream
                previous = group.lasts.get(name)
                if previous is None or previous[0] <= event.timestamp_ms:
                    group.lasts[name] = (event.timestamp_ms, position, value)
    return _merge_groups(groups, {} if into is None else into)


def _merge_groups(
    groups: Mapping[tuple[bool, str, int, int], _Group], totals: dict[Window, WindowTotals]
) -> dict[Window, WindowTotals]:
    # Position of the ``last`` values taken in this fold; values already in ``totals`` came earlier.
    last_positions: dict[tuple[Window, str], int] = {}
    for (live, customer, minute, period_start), group in groups.items():
        seconds = minute * 60
        for window in (
            Window(live, customer, "minute", seconds),
            Window(live, customer, "hour", seconds - seconds % 3600),
            Window(live, customer, "day", seconds - seconds % _DAY),
            Window(live, customer, "period", period_start),
        ):
            target = totals.get(window)
            if target is None:
                target = totals[window] = WindowTotals(ttl=WINDOW_TTLS[window.window])
            sums = target.sums
            for name, amount in group.sums.items():
                sums[name] = sums.get(name, 0) + amount
            for name, value in group.maxes.items():
                current = target.maxes.get(name)
                target.maxes[name] = value if current is None or value > current else current
            for name, (stamp, position, value) in group.lasts.items():
                previous = target.lasts.get(name)
                held = None if previous is None else (previous[0], last_positions.get((window, name), -1))
                if held is None or held <= (stamp, position):
                    target.lasts[name] = (stamp, value)
                    last_positions[(window, name)] = position
            for name, values in group.uniques.items():
                target.uniques.setdefault(name, set()).update(values)
    return totals
