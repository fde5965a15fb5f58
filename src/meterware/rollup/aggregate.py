"""The pure core of the rollup worker: validate stream entries and fold their events into window totals.

Nothing here does I/O, so the worker's arithmetic is tested with plain tables and every backend receives
exactly the same aggregates for the same events.

Each event adds to four windows of its customer, kept apart for live and test keys: the UTC ``minute``,
``hour`` and ``day`` that contain its timestamp, and its billing ``period`` (as recorded in the event). A
late event lands in the windows of its own timestamp, however late it arrives. Fields of a window:

* ``n:<outcome>``: calls with that outcome (every event, billable or not);
* ``n:rejected:<reason>``: rejected calls refused for that reason, one field per
  :data:`~meterware.metering.admission.Reason` and ``n:rejected:other`` for any other reason an event
  holds (empty, garbled, a newer writer's), so a window holds a bounded set of fields whatever the stream
  says; they add up to ``n:rejected``;
* ``spend``: micro-credits charged for the calls (the per-event costs recorded when the batch was flushed);
* one field per meter, for billable events only, by the meter's aggregation: ``count`` adds one per
  call, ``sum`` adds the units, ``max`` keeps the largest value, ``last`` the newest one (by event
  timestamp; on a tie the later event in the stream), ``unique`` the distinct values. A meter the
  configuration does not know is summed (or, for text values, counted as distinct values): usage is never
  dropped because the configuration changed.

A correction (:mod:`meterware.billing.corrections`) is an entry with a field ``n``: one sign per event, ``-1``
for an event it subtracts (the voided or amended original: its call, its ``count`` and ``sum`` units and
its cost) and ``1`` for one it adds (the amended version). ``max``, ``last`` and ``unique`` values cannot
be taken back: corrections refuse events that hold them, and the fold skips them on a subtracted event.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, compress, count, repeat, starmap
from operator import attrgetter, floordiv
from typing import Final, get_args

from meterware.config import Meter
from meterware.events import (
    COLUMN,
    OUTCOMES,
    EventColumns,
    EventDecodeError,
    UsageEvent,
    decode_columns,
)
from meterware.metering.admission import Reason
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
_COSTS_RE: Final = re.compile(rb"\d{1,15}(?:,\d{1,15})*")
_INTEGER_AGGREGATIONS: Final = frozenset({"sum", "max", "last"})
_TIMESTAMP, _CUSTOMER, _PERIOD = COLUMN["timestamp_ms"], COLUMN["customer"], COLUMN["period_start"]
_OUTCOME, _UNITS, _BILLABLE, _LIVE = COLUMN["outcome"], COLUMN["units"], COLUMN["billable"], COLUMN["live"]
_REASON, _KEY_ID = COLUMN["reason"], COLUMN["key_id"]
#: The reasons rejected calls are counted by: every admission ``Reason``, then ``other`` for the rest.
REFUSAL_REASONS: Final[tuple[str, ...]] = (*get_args(Reason), "other")


def outcome_field(outcome: str) -> str:
    """The window field counting calls with ``outcome``."""
    return f"n:{outcome}"


def refusal_field(reason: str) -> str:
    """The window field counting rejected calls refused for ``reason`` (one of ``REFUSAL_REASONS``)."""
    return f"n:rejected:{reason}"


_OUTCOME_FIELDS: Final = {outcome: outcome_field(outcome) for outcome in OUTCOMES}
_REFUSAL_FIELDS: Final = {reason: refusal_field(reason) for reason in REFUSAL_REASONS}
_OTHER_REFUSALS: Final = refusal_field("other")


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


def parse_columns(
    fields: Mapping[bytes, bytes], meters: Mapping[str, Meter]
) -> tuple[EventColumns, list[int], list[int] | None] | str:
    """Decode one stream entry into its events' columns, their costs and their signs (``None``: all 1), or
    say in one line why it is garbage.

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
        columns = decode_columns(payload)
    except EventDecodeError as error:
        return _one_line(f"field 'b': {error}")
    events = len(columns[_UNITS])
    parts = raw_costs.split(b",") if raw_costs else []
    if len(parts) != events:
        return f"field 'c': {len(parts)} costs for {events} events"
    signs = None
    raw_signs = fields.get(b"n")
    if raw_signs is not None:
        split = raw_signs.split(b",") if raw_signs else []
        if len(split) != events or any(sign not in (b"1", b"-1") for sign in split):
            return f"field 'n': {len(split)} signs (1 or -1) for {events} events"
        signs = list(map(int, split))
    if raw_costs and not _COSTS_RE.fullmatch(raw_costs):
        for index, part in enumerate(parts):
            if not _COST_RE.fullmatch(part):
                return _one_line(f"field 'c': cost {index} is not a non-negative integer: {part[:20]!r}")
    costs = list(map(int, parts))
    values = list(chain.from_iterable(map(dict.values, columns[_UNITS])))
    try:
        # min() and max() compare ints only: text among them raises, and so does a bound too far.
        checked = not values or (min(values) >= -MAX_VALUE and max(values) <= MAX_VALUE)
    except TypeError:
        checked = False
    if not checked:
        billed = compress(enumerate(columns[_UNITS]), columns[_BILLABLE])
        for index, units in billed:
            for name, value in units.items():
                meter = meters.get(name)
                if type(value) is int:
                    if not -MAX_VALUE <= value <= MAX_VALUE:
                        return _one_line(f"event {index}: meter {name!r} has a value out of range")
                elif meter is not None and meter.aggregation in _INTEGER_AGGREGATIONS:
                    return _one_line(
                        f"event {index}: meter {name!r} ({meter.aggregation}) needs an integer value"
                    )
    return columns, costs, signs


def parse_entry(
    fields: Mapping[bytes, bytes], meters: Mapping[str, Meter]
) -> tuple[list[UsageEvent], list[int]] | str:
    """:func:`parse_columns` with an event per call (each with its sign): what the worker folds, as
    events."""
    parsed = parse_columns(fields, meters)
    if isinstance(parsed, str):
        return parsed
    columns, costs, signs = parsed
    events = list(starmap(UsageEvent, zip(*columns, strict=True)))
    for event, sign in zip(events, signs or (), strict=False):
        event.sign = sign
    return events, costs


# Compared and hashed by identity: each event's group is looked up once, then counted by object.
@dataclass(slots=True, eq=False)
class _Group:
    """Events of one customer in one minute and one billing period: they add to the same four windows."""

    sums: dict[str, int] = field(default_factory=dict)
    maxes: dict[str, int] = field(default_factory=dict)
    #: field -> (timestamp_ms, position in the fold, value): the position breaks timestamp ties.
    lasts: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    uniques: dict[str, set[str]] = field(default_factory=dict)


_GroupKey = tuple[bool, str, int, int]
_fields_of: Final = attrgetter(*COLUMN)


class Fold:
    """Events folded, batch after batch in stream order, into the totals of their windows.

    Each event goes once into its group (customer, minute, billing period), straight from the decoded
    columns; :meth:`totals` then adds each group to its four windows. :attr:`key_uses` keeps the newest
    event of each key on the side (one entry per key id folded).
    """

    def __init__(self, meters: Mapping[str, Meter]) -> None:
        self._aggregations = {name: meter.aggregation for name, meter in meters.items()}
        self._groups: defaultdict[_GroupKey, _Group] = defaultdict(_Group)
        #: Events folded so far (the next one's position in the stream, which breaks ``last`` ties).
        self.events = 0
        #: key id -> timestamp (ms) of its newest event folded, whatever the outcome: a refused call used
        #: its key too. Calls refused before their key was known carry none.
        self.key_uses: dict[str, int] = {}

    def add(self, columns: EventColumns, costs: Sequence[int], signs: Sequence[int] | None = None) -> None:
        """Fold one batch (as :func:`~meterware.events.decode_columns` gives it), with a cost and a sign
        (-1: a correction takes the event back) per event."""
        stamps = columns[_TIMESTAMP]
        if len(costs) != len(stamps) or (signs is not None and len(signs) != len(stamps)):
            raise ValueError("one cost and one sign per event")
        minutes = map(floordiv, stamps, repeat(60_000))
        keys = zip(columns[_LIVE], columns[_CUSTOMER], minutes, columns[_PERIOD], strict=True)
        groups, aggregations = self._groups, self._aggregations
        of_events = list(map(groups.__getitem__, keys))  # a defaultdict: new groups on the way
        # Calls by outcome and spend per group: counted in C, unless a correction takes events back.
        if signs is None:
            calls = Counter(zip(of_events, columns[_OUTCOME], costs, strict=True))
        else:
            calls = Counter()
            for event in zip(of_events, columns[_OUTCOME], costs, signs, strict=True):
                calls[event[:3]] += event[3]
        for (group, outcome, cost), number in calls.items():
            sums = group.sums
            counted = _OUTCOME_FIELDS.get(outcome) or outcome_field(outcome)
            sums[counted] = sums.get(counted, 0) + number
            sums[SPEND] = sums.get(SPEND, 0) + number * cost
        if "rejected" in columns[_OUTCOME]:
            self._add_refusals(of_events, columns, signs)
        # Units of billable events, each at its position in the stream (later events win ``last`` ties).
        billed = compress(
            zip(
                of_events,
                columns[_UNITS],
                stamps,
                repeat(1) if signs is None else signs,
                count(self.events + 1),
                strict=False,  # lengths checked above; repeat() and count() never end
            ),
            columns[_BILLABLE],
        )
        for group, units, stamp, sign, position in billed:
            sums = group.sums
            for name, value in units.items():
                aggregation = aggregations.get(name) or ("sum" if type(value) is int else "unique")
                if aggregation == "count":
                    sums[name] = sums.get(name, 0) + sign
                elif aggregation == "unique":
                    if sign > 0:
                        group.uniques.setdefault(name, set()).add(str(value))
                elif type(value) is not int:
                    # parse_columns refuses these; a caller that skipped it gets no silent coercion.
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
                    if previous is None or previous[0] <= stamp:
                        group.lasts[name] = (stamp, position, value)
        self._add_key_uses(columns[_KEY_ID], stamps)
        self.events += len(stamps)

    def _add_key_uses(self, key_ids: Sequence[str], stamps: Sequence[int]) -> None:
        uses = self.key_uses
        newest = uses.get
        for key_id, stamp in zip(key_ids, stamps, strict=True):
            if stamp > newest(key_id, -1):
                uses[key_id] = stamp
        uses.pop("", None)

    @staticmethod
    def _add_refusals(of_events: list[_Group], columns: EventColumns, signs: Sequence[int] | None) -> None:
        """Count the rejected events of a batch per reason (a reason not known counts as ``other``)."""
        rejected = list(map("rejected".__eq__, columns[_OUTCOME]))
        refused = compress(zip(of_events, columns[_REASON], strict=True), rejected)
        if signs is None:
            refusals = Counter(refused)
        else:
            refusals = Counter()
            for pair, sign in zip(refused, compress(signs, rejected), strict=True):
                refusals[pair] += sign
        for (group, reason), number in refusals.items():
            counted = _REFUSAL_FIELDS.get(reason, _OTHER_REFUSALS)
            group.sums[counted] = group.sums.get(counted, 0) + number

    def totals(self, into: dict[Window, WindowTotals] | None = None) -> dict[Window, WindowTotals]:
        """The window totals of everything folded, added to ``into`` (extended in place) if given."""
        return _merge_groups(self._groups, {} if into is None else into)


def fold(
    events: Iterable[UsageEvent],
    costs: Iterable[int],
    meters: Mapping[str, Meter],
    into: dict[Window, WindowTotals] | None = None,
) -> dict[Window, WindowTotals]:
    """Add events (in stream order, each with its cost) to the totals of their windows.

    ``into`` is extended in place and returned, so the entries of one commit fold into one mapping.
    """
    events = list(events)
    folding = Fold(meters)
    columns = tuple(zip(*map(_fields_of, events), strict=True)) or ((),) * len(COLUMN)
    signs = [event.sign for event in events]
    folding.add(columns, list(costs), None if signs.count(1) == len(signs) else signs)
    return folding.totals(into)


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
