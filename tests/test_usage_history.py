"""Usage history: a customer's rollup windows over a time range, on memory and a real Redis."""

from __future__ import annotations

import json
import math
import random
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from meterware.billing.accounts import Accounts, UsageHistory, UsagePoint
from meterware.billing.accounts._usage import MAX_HISTORY_POINTS, history_range
from meterware.errors import NotFoundError, UsageError
from meterware.events import OUTCOMES, UsageEvent
from meterware.rollup import RollupWorker
from meterware.rollup.aggregate import REFUSAL_REASONS
from meterware.storage import open_storage
from meterware.storage.base import Window
from tests.rollup.helpers import (
    CUSTOMERS,
    METERS,
    PERIOD,
    T0_MS,
    config,
    event,
    expected_usage,
    random_events,
    write_events,
)

HOUR, DAY = 3600, 86_400
T0 = T0_MS // 1000  # 2026-03-14 15:09:26 UTC
T0_HOUR = T0 - T0 % HOUR  # 15:00
T0_DAY = T0 - T0 % DAY  # 2026-03-14 00:00
PRICE = 2000  # micro-credits per billable call


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def accounts(request: pytest.FixtureRequest) -> Iterator[Accounts]:
    """Accounts over a fresh memory store or a real (empty) redis-server, billed from PERIOD."""
    if request.param == "memory":
        url = f"memory://history-{uuid.uuid4().hex}"
    else:
        url = request.getfixturevalue("redis_url")
    accounts = Accounts(open_storage(url, shards=4), config())
    for customer in ("acme", *CUSTOMERS):
        accounts.create_customer(customer, anchor=PERIOD)
    yield accounts
    accounts.close()


def served(accounts: Accounts, events: Sequence[UsageEvent]) -> list[tuple[UsageEvent, int]]:
    """Flush the events (each billable call costs PRICE) and roll them up with the real worker."""
    written = write_events(accounts.storage, events, batch_size=7, price=PRICE)
    RollupWorker(accounts.storage, accounts.config, owner="history-test").drain()
    return written


def point_at(history: UsageHistory, start: int) -> UsagePoint:
    (point,) = [p for p in history.points if p.start == start]
    return point


def zero_point(start: int) -> UsagePoint:
    calls: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
    return UsagePoint(start, dict.fromkeys(METERS, 0), calls, {}, 0)


def as_point(start: int, totals: dict[str, int]) -> UsagePoint:
    """The point a window's totals (as read_usage reports them) make."""
    meters = {name: totals.get(name, 0) for name in METERS}
    calls: dict[str, int] = {outcome: totals.get(f"n:{outcome}", 0) for outcome in OUTCOMES}
    refusals = {
        reason: totals[f"n:rejected:{reason}"]
        for reason in REFUSAL_REASONS
        if totals.get(f"n:rejected:{reason}", 0)
    }
    return UsagePoint(start, meters, calls, refusals, totals.get("spend", 0))


def test_calls_land_in_the_hour_and_the_day_of_their_timestamp(accounts: Accounts) -> None:
    """An event counts in the hour and the day that contain its timestamp, and nowhere else."""
    served(
        accounts,
        [
            event(ts=T0_MS, units={"calls": 1, "tokens": 30}),
            event(ts=T0_MS + 60_000, units={"calls": 1, "tokens": 12}),  # same hour
            event(ts=T0_MS + HOUR * 1000, outcome="server_error"),  # the next hour
            event(ts=T0_MS - DAY * 1000, units={"calls": 1, "tokens": 5}),  # the day before
        ],
    )
    hours = accounts.usage_history("acme", window="hour", start=T0_DAY, end=T0_DAY + DAY)
    assert (hours.customer, hours.live, hours.window) == ("acme", True, "hour")
    assert (hours.start, hours.end) == (T0_DAY, T0_DAY + DAY)
    assert [p.start for p in hours.points] == list(range(T0_DAY, T0_DAY + DAY, HOUR))
    at_t0 = point_at(hours, T0_HOUR)
    assert at_t0.meters == {"calls": 2, "tokens": 42, "peak": 0, "gauge": 0, "users": 0}
    assert at_t0.calls == {"success": 2, "client_error": 0, "server_error": 0, "aborted": 0, "rejected": 0}
    assert at_t0.spend == 2 * PRICE
    after = point_at(hours, T0_HOUR + HOUR)
    assert (after.meters["calls"], after.calls["server_error"], after.spend) == (0, 1, 0)
    others = [p for p in hours.points if p.start not in (T0_HOUR, T0_HOUR + HOUR)]
    assert others == [zero_point(p.start) for p in others]

    days = accounts.usage_history("acme", window="day", start=T0_DAY - DAY, end=T0_DAY + 2 * DAY)
    assert [(p.start, p.meters["tokens"], sum(p.calls.values())) for p in days.points] == [
        (T0_DAY - DAY, 5, 1),
        (T0_DAY, 42, 3),
        (T0_DAY + DAY, 0, 0),
    ]


def test_never_written_windows_read_as_zero(accounts: Accounts) -> None:
    """Every window of the range is a point, oldest first: zeros where nothing was written, including a
    range far older than the windows are kept, and the other mode's (test keys') usage."""
    served(accounts, [event(ts=T0_MS, live=False)])
    for start, end in [(T0_DAY, T0_DAY + DAY), (978_307_200, 978_307_200 + 10 * DAY)]:  # ... 2001
        history = accounts.usage_history("acme", window="hour", start=start, end=end)
        assert history.points == [zero_point(s) for s in range(start, end, HOUR)]
    sandbox = accounts.usage_history("acme", window="hour", start=T0_DAY, end=T0_DAY + DAY, live=False)
    assert point_at(sandbox, T0_HOUR).calls["success"] == 1


def test_the_history_equals_the_rollup_windows_exactly(accounts: Accounts) -> None:
    """Random calls of many customers over three days, live and test, out of order: every point of every
    minute, hour and day history is the rollup's window, meter by meter, outcome by outcome."""
    written = served(accounts, random_events(random.Random(16), 600))
    expected = expected_usage(written)
    first_day = T0_DAY - 3 * DAY
    ranges = {
        "day": (first_day, T0_DAY + DAY),
        "hour": (first_day, T0_DAY + DAY),
        "minute": (T0 - 900 * 60, T0 + 60),  # 901 points
    }
    for customer in CUSTOMERS:
        for live in (True, False):
            for window, (start, end) in ranges.items():
                history = accounts.usage_history(customer, window=window, start=start, end=end, live=live)
                assert history.points == [
                    as_point(point.start, expected.get(Window(live, customer, window, point.start), {}))
                    for point in history.points
                ]
    assert sum(p.calls["success"] for p in history.points) > 0  # the minutes were not all empty
    assert sum(sum(p.refusals.values()) for p in history.points) == sum(
        p.calls["rejected"] for p in history.points
    )


def test_refused_calls_count_by_reason(accounts: Accounts) -> None:
    """Rejected calls count per reason in their hour, day and billing period, only reasons that occurred;
    a reason no admission gives counts as ``other``; other outcomes' reasons are not counted."""
    served(
        accounts,
        [
            event(ts=T0_MS, outcome="rejected", reason="rate_limited"),
            event(ts=T0_MS + 1, outcome="rejected", reason="rate_limited"),
            event(ts=T0_MS + 2, outcome="rejected", reason="quota_exceeded"),
            event(ts=T0_MS + 3, outcome="success", reason="suspended"),
            event(ts=T0_MS + HOUR * 1000, outcome="rejected", reason="from-a-newer-writer"),
            event(ts=T0_MS + HOUR * 1000, outcome="rejected", reason="insufficient_credits", live=False),
        ],
    )
    window = accounts.storage.read_usage("acme", True, "hour", T0_HOUR)
    assert {name: n for name, n in window.items() if name.startswith("n:rejected")} == {
        "n:rejected": 3,
        "n:rejected:rate_limited": 2,
        "n:rejected:quota_exceeded": 1,
    }
    hours = accounts.usage_history("acme", window="hour", start=T0_DAY, end=T0_DAY + DAY)
    assert point_at(hours, T0_HOUR).refusals == {"rate_limited": 2, "quota_exceeded": 1}
    assert point_at(hours, T0_HOUR).calls["rejected"] == 3
    assert point_at(hours, T0_HOUR + HOUR).refusals == {"other": 1}
    assert [p.refusals for p in hours.points if p.start not in (T0_HOUR, T0_HOUR + HOUR)] == [{}] * 22
    (day,) = accounts.usage_history("acme", window="day", start=T0_DAY, end=T0_DAY + 1).points
    report = accounts.usage("acme", at=T0)
    assert day.refusals == report.refusals == {"rate_limited": 2, "quota_exceeded": 1, "other": 1}
    assert list(report.refusals) == ["rate_limited", "quota_exceeded", "other"]  # in REFUSAL_REASONS order
    assert accounts.usage("acme", at=T0, live=False).refusals == {"insufficient_credits": 1}
    assert report.as_dict()["refusals"] == report.refusals


def test_hours_add_up_to_the_day_and_the_period(accounts: Accounts) -> None:
    """For calls inside one day, the hours' sums, the day and the billing period report the same
    counts, units, calls per outcome and spend."""
    rng = random.Random(3)
    served(
        accounts,
        [
            event(
                ts=(T0_DAY + rng.randrange(DAY)) * 1000,
                outcome=rng.choice(OUTCOMES),
                units={"calls": 1, "tokens": rng.randrange(100)},
            )
            for _ in range(200)
        ],
    )
    hours = accounts.usage_history("acme", window="hour", start=T0_DAY, end=T0_DAY + DAY)
    (day,) = accounts.usage_history("acme", window="day", start=T0_DAY, end=T0_DAY + 1).points
    period = accounts.usage("acme", at=T0)
    for name in ("calls", "tokens"):
        assert sum(p.meters[name] for p in hours.points) == day.meters[name] == period.meters[name]
    for outcome in OUTCOMES:
        assert sum(p.calls[outcome] for p in hours.points) == day.calls[outcome] == period.calls[outcome]
    assert sum(p.spend for p in hours.points) == day.spend == period.spend == PRICE * period.meters["calls"]
    assert sum(day.calls.values()) == 200


def test_the_range_is_aligned_to_whole_windows(accounts: Accounts) -> None:
    """start is aligned down and end up, to UTC windows; a range inside one window is that window."""
    history = accounts.usage_history("acme", window="day", start=T0, end=T0 + 1)
    assert (history.start, history.end, len(history.points)) == (T0_DAY, T0_DAY + DAY, 1)
    history = accounts.usage_history("acme", window="hour", start=T0_HOUR, end=T0_HOUR + 2 * HOUR)
    assert [p.start for p in history.points] == [T0_HOUR, T0_HOUR + HOUR]


@pytest.mark.parametrize(
    ("window", "seconds", "points"),
    [
        pytest.param("minute", 60, 120, id="minute-2-hours"),
        pytest.param("hour", HOUR, 48, id="hour-48-hours"),
        pytest.param("day", DAY, 90, id="day-90-days"),
    ],
)
def test_the_default_range_ends_with_the_current_window(
    accounts: Accounts, window: str, seconds: int, points: int
) -> None:
    """Without start and end: the last 2 hours by minute, 48 hours by hour, 90 days by day, the window
    that is running now last (with the call just made in it)."""
    now = int(time.time())
    served(accounts, [event(ts=now * 1000)])
    history = accounts.usage_history("acme", window=window)
    current = history.end - seconds
    # The window of the call, unless the clock crossed into the next window in between.
    assert current in (now - now % seconds, now - now % seconds + seconds)
    assert len(history.points) == points
    assert (history.points[-1].start, history.start) == (current, history.end - points * seconds)
    assert point_at(history, now - now % seconds).calls["success"] == 1


@pytest.mark.parametrize(
    ("window", "start", "end", "now", "expected"),
    [
        pytest.param("hour", None, None, T0, (T0_HOUR - 47 * HOUR, T0_HOUR + HOUR), id="now-inside-an-hour"),
        pytest.param(
            "hour", None, None, T0_HOUR, (T0_HOUR - 47 * HOUR, T0_HOUR + HOUR), id="now-on-the-hour"
        ),
        pytest.param("day", None, T0_DAY, T0, (T0_DAY - 90 * DAY, T0_DAY), id="end-on-a-day-is-exclusive"),
        pytest.param("day", T0_DAY + 0.5, T0_DAY + 1.5, T0, (T0_DAY, T0_DAY + DAY), id="fractions"),
        pytest.param("minute", T0 - 60, None, T0, (T0 - 60 - T0 % 60, T0 - T0 % 60 + 60), id="start-alone"),
    ],
)
def test_history_range(
    window: str, start: float | None, end: float | None, now: float, expected: tuple[int, int]
) -> None:
    """The range is whole windows: start aligned down, end up; without end, the window running now is
    the last, even when now is its first second."""
    assert history_range(window, start, end, now) == expected


def test_an_end_alone_ends_the_default_range_there(accounts: Accounts) -> None:
    """With only end given, the range is the default span before it."""
    history = accounts.usage_history("acme", window="hour", end=T0)
    assert (history.start, history.end) == (T0_HOUR + HOUR - 48 * HOUR, T0_HOUR + HOUR)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param(
            {"window": "week"}, "window must be minute, hour or day, got 'week'", id="unknown-window"
        ),
        pytest.param(
            {"window": "period"}, "window must be minute, hour or day, got 'period'", id="period-window"
        ),
        pytest.param({"start": T0, "end": T0}, "start (2026-03-14T15:09:26Z) must be before end", id="empty"),
        pytest.param({"start": T0 + 1, "end": T0}, "must be before end", id="reversed"),
        pytest.param(
            {"window": "minute", "start": T0 - 2 * DAY, "end": T0},
            f"2881 minute windows asked for, at most {MAX_HISTORY_POINTS}: shorten the range or use a "
            "longer window",
            id="too-many-points",
        ),
        pytest.param({"start": math.nan}, "start must be epoch seconds from 1970 to 9999, got nan", id="nan"),
        pytest.param({"end": math.inf}, "end must be epoch seconds from 1970 to 9999, got inf", id="inf"),
        pytest.param(
            {"end": -1.0}, "end must be epoch seconds from 1970 to 9999, got -1.0", id="before-1970"
        ),
        pytest.param(
            {"start": 0, "end": 1e12}, "end must be epoch seconds from 1970 to 9999", id="after-9999"
        ),
    ],
)
def test_bad_ranges_are_refused_with_one_clear_line(
    accounts: Accounts, kwargs: dict[str, Any], message: str
) -> None:
    """A range that is empty, too long, not a time, or of an unknown window is refused, naming why."""
    with pytest.raises(UsageError) as raised:
        accounts.usage_history("acme", **kwargs)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_the_longest_range_is_allowed(accounts: Accounts) -> None:
    """Exactly MAX_HISTORY_POINTS windows are allowed."""
    history = accounts.usage_history(
        "acme", window="hour", start=T0_HOUR - (MAX_HISTORY_POINTS - 1) * HOUR, end=T0
    )
    assert len(history.points) == MAX_HISTORY_POINTS


def test_an_unknown_customer_is_not_found(accounts: Accounts) -> None:
    with pytest.raises(NotFoundError, match="no customer 'ghost'"):
        accounts.usage_history("ghost")


def test_as_dict_is_json_ready(accounts: Accounts) -> None:
    """as_dict gives the fields in order, each point with its spend in micros, and survives JSON."""
    served(accounts, [event(ts=T0_MS)])
    history = accounts.usage_history("acme", window="hour", start=T0_HOUR, end=T0_HOUR + 2 * HOUR)
    data = history.as_dict()
    assert json.loads(json.dumps(data)) == data
    assert data == {
        "customer": "acme",
        "live": True,
        "window": "hour",
        "start": T0_HOUR,
        "end": T0_HOUR + 2 * HOUR,
        "points": [
            {
                "start": T0_HOUR,
                "meters": {"calls": 1, "tokens": 0, "peak": 0, "gauge": 0, "users": 0},
                "calls": {"success": 1, "client_error": 0, "server_error": 0, "aborted": 0, "rejected": 0},
                "refusals": {},
                "spend_micros": PRICE,
            },
            {
                "start": T0_HOUR + HOUR,
                "meters": {"calls": 0, "tokens": 0, "peak": 0, "gauge": 0, "users": 0},
                "calls": dict.fromkeys(OUTCOMES, 0),
                "refusals": {},
                "spend_micros": 0,
            },
        ],
    }
