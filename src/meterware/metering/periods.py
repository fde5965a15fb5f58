"""Billing periods: the ``[start, end)`` of the period a moment falls in, from a customer's anchor."""

from __future__ import annotations

import calendar
from datetime import UTC, datetime
from typing import Final

_DAY: Final = 86_400


def _add_months(anchor: datetime, months: int) -> datetime:
    month_index = anchor.month - 1 + months
    year, month = anchor.year + month_index // 12, month_index % 12 + 1
    # A period anchored on the 31st starts on the last day of shorter months (as Stripe does).
    day = min(anchor.day, calendar.monthrange(year, month)[1])
    return anchor.replace(year=year, month=month, day=day)


def period_bounds(anchor: int, period: str, now: float) -> tuple[int, int]:
    """The billing period ``[start, end)`` (epoch seconds) that contains ``now``."""
    if period in ("day", "week"):
        length = _DAY if period == "day" else 7 * _DAY
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
