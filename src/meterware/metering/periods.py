"""Billing periods: the ``[start, end)`` of the period a moment falls in, from a customer's anchor, and
the periods from the anchor's to a given one (counted, listed newest first), without reading anything."""

from __future__ import annotations

import calendar
from datetime import UTC, datetime
from typing import Final

_DAY: Final = 86_400
#: The length of the billing periods that have one (months do not).
PERIOD_SECONDS: Final = {"day": _DAY, "week": 7 * _DAY}


def _add_months(anchor: datetime, months: int) -> datetime:
    month_index = anchor.month - 1 + months
    year, month = anchor.year + month_index // 12, month_index % 12 + 1
    # A period anchored on the 31st starts on the last day of shorter months (as Stripe does).
    day = min(anchor.day, calendar.monthrange(year, month)[1])
    return anchor.replace(year=year, month=month, day=day)


def period_bounds(anchor: int, period: str, now: float) -> tuple[int, int]:
    """The billing period ``[start, end)`` (epoch seconds) that contains ``now``."""
    if period in PERIOD_SECONDS:
        length = PERIOD_SECONDS[period]
        start = anchor + ((int(now) - anchor) // length) * length
        return start, start + length
    origin = datetime.fromtimestamp(anchor, UTC)
    current = datetime.fromtimestamp(now, UTC)
    months = (current.year - origin.year) * 12 + current.month - origin.month
    month_start = _add_months(origin, months)
    if month_start > current:
        months -= 1
        month_start = _add_months(origin, months)
    return int(month_start.timestamp()), int(_add_months(origin, months + 1).timestamp())


def period_count(anchor: int, period: str, current_start: int) -> int:
    """How many billing periods there are from the anchor's to the one starting at ``current_start``."""
    if period in PERIOD_SECONDS:
        return (current_start - anchor) // PERIOD_SECONDS[period] + 1
    # Every monthly period starts in the calendar month after the previous one's (the 31st: the last day).
    first, last = datetime.fromtimestamp(anchor, UTC), datetime.fromtimestamp(current_start, UTC)
    return (last.year - first.year) * 12 + last.month - first.month + 1


def period_starts(anchor: int, period: str, current_start: int, skip: int, count: int) -> list[int]:
    """The starts of at most ``count`` periods, newest first, past the ``skip`` newest (none before the
    anchor's)."""
    if period in PERIOD_SECONDS:
        length = PERIOD_SECONDS[period]
        starts = (current_start - (skip + n) * length for n in range(count))
        return [start for start in starts if start >= anchor]
    start = current_start
    for _ in range(skip):
        start = period_bounds(anchor, period, start - 1)[0]
    found: list[int] = []
    while start >= anchor and len(found) < count:
        found.append(start)
        start = period_bounds(anchor, period, start - 1)[0]
    return found
