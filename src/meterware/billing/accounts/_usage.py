"""The usage record: a period's report, its history window by window, the events still waiting for the
rollup, corrections and backfills."""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from meterware.billing._asdict import fields_dict
from meterware.billing.accounts._base import LATEST_ANCHOR, AccountsBase
from meterware.billing.corrections import (
    CorrectionResult,
    ImportResult,
    correct_event,
    import_events,
    parse_import,
)
from meterware.config import format_credits
from meterware.errors import UsageError
from meterware.events import OUTCOMES
from meterware.metering.periods import period_bounds
from meterware.rollup.aggregate import REFUSAL_REASONS, outcome_field, parse_columns, refusal_field
from meterware.storage._keyspace import shard_of

#: Windows one history may hold at most (the longest default, 90 days, holds 90).
MAX_HISTORY_POINTS: Final = 1000
#: Seconds in each window a history can be read by (the rollup's UTC-aligned windows).
HISTORY_WINDOWS: Final = {"minute": 60, "hour": 3600, "day": 86_400}
#: The span of a history whose start is not given, per window.
DEFAULT_SPANS: Final = {"minute": 2 * 3600, "hour": 48 * 3600, "day": 90 * 86_400}
#: Stream entries read at most to count the events waiting for the rollup (about batch_size events each).
PENDING_SCAN: Final = 10_000


@dataclass(frozen=True, slots=True)
class UsageReport:
    """A customer's usage in one billing period, from the rollups."""

    customer: str
    live: bool
    period_start: int
    period_end: int
    #: Totals per meter (billable calls only).
    meters: dict[str, int]
    #: Calls per outcome: success, client_error, server_error, aborted, rejected.
    calls: dict[str, int]
    #: Rejected calls per reason (``REFUSAL_REASONS`` order), only the reasons that occurred.
    refusals: dict[str, int]
    #: Micro-credits charged (prepaid) or accrued (invoiced) in the period.
    spend: int

    def as_dict(self) -> dict[str, Any]:
        return fields_dict(self, spend="spend_micros")


@dataclass(frozen=True, slots=True)
class UsagePoint:
    """A customer's usage in one window of a :class:`UsageHistory`."""

    #: The window's start, epoch seconds (UTC-aligned).
    start: int
    #: Totals per configured meter (billable calls only; 0 when never written), then per sub-meter of
    #: dimension values written (``tokens{model=large}``).
    meters: dict[str, int]
    #: Calls per outcome, in ``OUTCOMES`` order.
    calls: dict[str, int]
    #: Rejected calls per reason (``REFUSAL_REASONS`` order), only the reasons that occurred.
    refusals: dict[str, int]
    #: Micro-credits charged (prepaid) or accrued (invoiced) in the window.
    spend: int


@dataclass(frozen=True, slots=True)
class UsageHistory:
    """A customer's usage window by window over a time range, from the rollups."""

    customer: str
    live: bool
    #: ``minute``, ``hour`` or ``day``.
    window: str
    #: The first window's start (epoch seconds).
    start: int
    #: The end of the last window (exclusive).
    end: int
    #: One point per window, oldest first, every window of the range present.
    points: list[UsagePoint]

    def as_dict(self) -> dict[str, Any]:
        return fields_dict(self) | {"points": [fields_dict(p, spend="spend_micros") for p in self.points]}

    def to_csv(self) -> str:
        """A header (start_iso, start, each meter, ``n:<outcome>``..., spend), then one row per window; the
        spend in credits."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        meters = list(self.points[0].meters) if self.points else []
        writer.writerow(["start_iso", "start", *meters, *map(outcome_field, OUTCOMES), "spend"])
        for point in self.points:
            counts = [*point.meters.values(), *point.calls.values()]
            writer.writerow([_iso(point.start), point.start, *counts, format_credits(point.spend)])
        return out.getvalue()


def _epoch(value: float, name: str) -> float:
    if not 0 <= value <= LATEST_ANCHOR:  # also false for NaN
        raise UsageError(f"{name} must be epoch seconds from 1970 to 9999, got {value!r}")
    return value


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def history_range(window: str, start: float | None, end: float | None, now: float) -> tuple[int, int]:
    """The aligned ``[start, end)`` of a history (see :meth:`Usage.usage_history`), or UsageError."""
    seconds = HISTORY_WINDOWS.get(window)
    if seconds is None:
        raise UsageError(f"window must be minute, hour or day, got {window!r}")
    if end is None:
        until = now
        aligned_end = int(now) // seconds * seconds + seconds  # the window running now included
    else:
        until = _epoch(end, "end")
        aligned_end = math.ceil(until / seconds) * seconds
    if start is None:
        aligned_start = aligned_end - DEFAULT_SPANS[window]
    elif _epoch(start, "start") >= until:
        raise UsageError(f"start ({_iso(start)}) must be before end ({_iso(until)})")
    else:
        aligned_start = int(start) // seconds * seconds
    points = (aligned_end - aligned_start) // seconds
    if points > MAX_HISTORY_POINTS:
        raise UsageError(
            f"{points} {window} windows asked for, at most {MAX_HISTORY_POINTS}: "
            "shorten the range or use a longer window"
        )
    return aligned_start, aligned_end


class Usage(AccountsBase):
    """Read a customer's usage, and correct or backfill the events it is made of."""

    def usage(self, customer_id: str, *, live: bool = True, at: float | None = None) -> UsageReport:
        """Usage of the billing period containing ``at`` (default: now)."""
        customer = self.customer(customer_id)
        plan = self.config.plan(customer.plan)
        start, end = period_bounds(customer.anchor, plan.period, time.time() if at is None else at)
        totals = self.storage.read_usage(customer_id, live, "period", start)
        point = self._point(start, totals)
        return UsageReport(
            customer_id, live, start, end, point.meters, point.calls, point.refusals, point.spend
        )

    def usage_history(
        self,
        customer_id: str,
        *,
        window: str = "hour",
        start: float | None = None,
        end: float | None = None,
        live: bool = True,
    ) -> UsageHistory:
        """Usage window by window from ``start`` to ``end`` (epoch seconds), read in one round trip.

        ``window`` is ``minute``, ``hour`` or ``day`` (UTC); ``start`` is aligned down to a window and
        ``end`` up. By default the range ends with the window running now and spans 2 hours of minutes,
        48 hours of hours or 90 days of days. At most ``MAX_HISTORY_POINTS`` windows. Every window is a
        point: one never written reads as zeros, and so does one older than the rollup keeps its kind
        (``rollup.aggregate.WINDOW_TTLS``: minutes 2 days, hours 35 days, days 400 days).
        """
        first, last = history_range(window, start, end, time.time())
        self.customer(customer_id)
        seconds = HISTORY_WINDOWS[window]
        starts = range(first, last, seconds)
        windows = self.storage.read_usage_windows(customer_id, live, window, starts)
        points = [self._point(at, totals) for at, totals in zip(starts, windows, strict=True)]
        return UsageHistory(customer_id, live, window, first, last, points)

    def _point(self, start: int, totals: dict[str, int]) -> UsagePoint:
        calls: dict[str, int] = {outcome: totals.get(outcome_field(outcome), 0) for outcome in OUTCOMES}
        refused = ((reason, totals.get(refusal_field(reason), 0)) for reason in REFUSAL_REASONS)
        refusals = {reason: number for reason, number in refused if number}
        meters = {name: totals.get(name, 0) for name in self.config.meters}
        # Per dimension value too: the sub-meters the window holds (declared values only, so bounded).
        meters.update(sorted((name, value) for name, value in totals.items() if "{" in name))
        return UsagePoint(start, meters, calls, refusals, totals.get("spend", 0))

    def pending_events(self, customer_id: str) -> tuple[int, bool]:
        """Events on the customer's shard flushed but not rolled up yet, and whether that is all of them.

        Usage reports lag by these. At most ``PENDING_SCAN`` stream entries are read (the count is then a
        lower bound: False).
        """
        storage = self.storage
        shard = shard_of(self.customer(customer_id).id, storage.shards)
        after = storage.committed_offset(shard)
        events = read = 0
        while read < PENDING_SCAN:
            entries = storage.read_stream(shard, after, min(1000, PENDING_SCAN - read))
            if not entries:
                return events, True
            read += len(entries)
            after = entries[-1].entry_id
            for entry in entries:
                parsed = parse_columns(entry.fields, self.config.meters)
                events += 0 if isinstance(parsed, str) else len(parsed[1])  # a dead letter holds none
        return events, not storage.read_stream(shard, after, 1)

    def void_event(
        self, event_id: str, *, reason: str, actor: str = "api", customer_id: str | None = None
    ) -> CorrectionResult:
        """Take an event back: the rollup subtracts it and the credits it was charged are refunded, once."""
        self.refresh_plans()
        return correct_event(
            self.storage, self.config, event_id, units=None, reason=reason, actor=actor, customer=customer_id
        )

    def amend_event(
        self,
        event_id: str,
        *,
        units: dict[str, int],
        reason: str,
        actor: str = "api",
        customer_id: str | None = None,
    ) -> CorrectionResult:
        """Change an event's ``sum`` units: the rollup and the credits follow the difference, once."""
        self.refresh_plans()
        return correct_event(
            self.storage, self.config, event_id, units=units, reason=reason, actor=actor, customer=customer_id
        )

    def import_events(self, path: str, *, fmt: str | None = None) -> ImportResult:
        """Backfill events from a JSONL or CSV file: all lines valid or nothing written; each event once."""
        self.refresh_plans()
        events = parse_import(path, self.config, self.storage.get_customer, fmt=fmt)
        return import_events(self.storage, events)
