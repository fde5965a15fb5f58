"""The pure core of the rollup: entry validation and folding events into windows."""

from __future__ import annotations

import itertools
from typing import get_args

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterware.events import UsageEvent, decode_columns, encode_batch
from meterware.metering.admission import Reason
from meterware.rollup.aggregate import (
    MAX_VALUE,
    REFUSAL_REASONS,
    WINDOW_TTLS,
    Fold,
    fold,
    parse_entry,
    windows_of,
)
from meterware.storage.base import Window, WindowTotals
from tests.rollup.helpers import METERS, PERIOD, T0_MS, event, flat

MINUTE_MS, HOUR_MS, DAY_MS = 60_000, 3_600_000, 86_400_000
T0 = T0_MS // 1000
MINUTE0, HOUR0, DAY0 = T0 - T0 % 60, T0 - T0 % 3600, T0 - T0 % 86_400


def window_totals(events: list[UsageEvent], costs: list[int] | None = None) -> dict[Window, dict[str, int]]:
    costs = [0] * len(events) if costs is None else costs
    return {window: flat(totals) for window, totals in fold(events, costs, METERS).items()}


def at(window: str, start: int, *, live: bool = True, customer: str = "acme") -> Window:
    return Window(live, customer, window, start)


@pytest.mark.parametrize(
    ("units", "expected"),
    [
        pytest.param([{"calls": 1}, {"calls": 1}, {"calls": 5}], {"calls": 3}, id="count-adds-one-per-call"),
        pytest.param([{"tokens": 10}, {"tokens": 32}, {"tokens": 0}], {"tokens": 42}, id="sum-adds-units"),
        pytest.param([{"peak": 7}, {"peak": 90}, {"peak": 12}], {"peak": 90}, id="max-keeps-largest"),
        pytest.param([{"peak": -7}, {"peak": -3}], {"peak": -3}, id="max-of-negatives"),
        pytest.param([{"gauge": 3}, {"gauge": 9}, {"gauge": 4}], {"gauge": 4}, id="last-keeps-newest"),
        pytest.param(
            [{"users": "u1"}, {"users": "u2"}, {"users": "u1"}, {"users": 5}, {"users": "5"}],
            {"users": 3},
            id="unique-counts-distinct-text",
        ),
        pytest.param([{"mystery": 4}, {"mystery": 6}], {"mystery": 10}, id="unknown-meter-summed"),
        pytest.param(
            [{"shade": "a"}, {"shade": "b"}, {"shade": "a"}], {"shade": 2}, id="unknown-text-meter-unique"
        ),
        pytest.param([{}, {}], {}, id="no-units"),
    ],
)
def test_aggregation(units: list[dict[str, int | str]], expected: dict[str, int]) -> None:
    """Each meter is folded by its configured aggregation, in every window of the event."""
    events = [event(ts=T0_MS + i, units=u) for i, u in enumerate(units)]
    totals = window_totals(events)
    assert set(totals) == {at("minute", MINUTE0), at("hour", HOUR0), at("day", DAY0), at("period", PERIOD)}
    for values in totals.values():
        assert values == {"n:success": len(units), "spend": 0, **expected}


@pytest.mark.parametrize(
    ("stamps", "values", "expected"),
    [
        pytest.param([3, 1, 2], [30, 10, 20], 30, id="newest-timestamp-wins-not-arrival"),
        pytest.param([1, 1], [10, 20], 20, id="tie-later-in-stream-wins"),
        pytest.param([5], [0], 0, id="zero-is-a-value"),
    ],
)
def test_last_by_timestamp(stamps: list[int], values: list[int], expected: int) -> None:
    """A ``last`` meter keeps the value of the newest event, whatever the order of arrival."""
    events = [event(ts=T0_MS + s, units={"gauge": v}) for s, v in zip(stamps, values, strict=True)]
    totals = fold(events, [0] * len(events), METERS)
    lasts = totals[at("minute", MINUTE0)].lasts
    assert lasts == {"gauge": (T0_MS + max(stamps), expected)}


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        pytest.param(0, (0, 0, 0), id="epoch"),
        pytest.param(59_999, (0, 0, 0), id="last-ms-of-minute"),
        pytest.param(60_000, (60, 0, 0), id="first-ms-of-next-minute"),
        pytest.param(HOUR_MS - 1, (3540, 0, 0), id="last-ms-of-hour"),
        pytest.param(HOUR_MS, (3600, 3600, 0), id="first-ms-of-next-hour"),
        pytest.param(DAY_MS - 1, (86_340, 82_800, 0), id="last-ms-of-day"),
        pytest.param(DAY_MS, (86_400, 86_400, 86_400), id="first-ms-of-next-day"),
        pytest.param(T0_MS, (MINUTE0, HOUR0, DAY0), id="mid-day-utc"),
    ],
)
def test_window_boundaries(ts: int, expected: tuple[int, int, int]) -> None:
    """Minute, hour and day windows start on UTC boundaries, in epoch seconds; the period is the event's."""
    windows = windows_of(event(ts=ts, period_start=12345))
    assert [(w.window, w.start) for w in windows] == [
        ("minute", expected[0]),
        ("hour", expected[1]),
        ("day", expected[2]),
        ("period", 12345),
    ]


def test_window_ttls() -> None:
    """Minute windows are kept 2 days, hours 35 days, days 400 days, periods for good."""
    totals = fold([event()], [0], METERS)
    assert {w.window: t.ttl for w, t in totals.items()} == {
        "minute": 2 * 86_400,
        "hour": 35 * 86_400,
        "day": 400 * 86_400,
        "period": 0,
    }
    assert dict(WINDOW_TTLS) == {w.window: t.ttl for w, t in totals.items()}


def test_live_and_test_apart() -> None:
    """Live and test events of one customer add to separate windows."""
    totals = window_totals([event(live=True), event(live=False), event(live=False)])
    assert totals[at("period", PERIOD, live=True)] == {"n:success": 1, "spend": 0, "calls": 1}
    assert totals[at("period", PERIOD, live=False)] == {"n:success": 2, "spend": 0, "calls": 2}
    assert len(totals) == 8


def test_customers_apart() -> None:
    """Each customer has its own windows."""
    totals = window_totals([event("acme"), event("globex"), event("globex")])
    assert totals[at("day", DAY0, customer="acme")]["calls"] == 1
    assert totals[at("day", DAY0, customer="globex")]["calls"] == 2


@pytest.mark.parametrize(
    ("outcome", "billable", "expected"),
    [
        pytest.param("success", True, {"n:success": 1, "spend": 5, "calls": 1, "tokens": 9}, id="success"),
        pytest.param("client_error", False, {"n:client_error": 1, "spend": 0}, id="client-error"),
        pytest.param(
            "client_error", True, {"n:client_error": 1, "spend": 5, "calls": 1, "tokens": 9}, id="billed-4xx"
        ),
        pytest.param("server_error", False, {"n:server_error": 1, "spend": 0}, id="server-error"),
        pytest.param("aborted", False, {"n:aborted": 1, "spend": 0}, id="aborted"),
        pytest.param(
            "rejected", False, {"n:rejected": 1, "n:rejected:rate_limited": 1, "spend": 0}, id="rejected"
        ),
    ],
)
def test_outcomes(outcome: str, billable: bool, expected: dict[str, int]) -> None:
    """Every event counts by outcome; only billable ones add meter units."""
    cost = 5 if billable else 0
    e = event(outcome=outcome, billable=billable, units={"calls": 1, "tokens": 9})
    for values in window_totals([e], [cost]).values():
        assert values == expected


@pytest.mark.parametrize(
    ("calls", "expected"),
    [
        pytest.param(
            [("rejected", "quota_exceeded", 1)],
            {"n:rejected": 1, "n:rejected:quota_exceeded": 1},
            id="one-reason",
        ),
        pytest.param(
            [("rejected", "rate_limited", 1)] * 3 + [("rejected", "insufficient_credits", 1)],
            {"n:rejected": 4, "n:rejected:rate_limited": 3, "n:rejected:insufficient_credits": 1},
            id="reasons-apart",
        ),
        pytest.param(
            [("rejected", "backend_unavailable", 1), ("rejected", "test_key_not_allowed", 1)],
            {"n:rejected": 2, "n:rejected:backend_unavailable": 1, "n:rejected:test_key_not_allowed": 1},
            id="every-known-reason-its-field",
        ),
        pytest.param(
            [("rejected", "from-a-newer-writer", 1), ("rejected", "x" * 10_000, 1), ("rejected", "", 1)],
            {"n:rejected": 3, "n:rejected:other": 3},
            id="unknown-long-and-empty-are-other",
        ),
        pytest.param(
            [("rejected", "Rate_Limited", 1), ("rejected", "n:rejected:rate_limited", 1)],
            {"n:rejected": 2, "n:rejected:other": 2},
            id="near-misses-are-other",
        ),
        pytest.param(
            [("success", "rate_limited", 1), ("server_error", "suspended", 1)],
            {"n:success": 1, "n:server_error": 1, "calls": 1},
            id="only-rejected-calls-count",
        ),
        pytest.param(
            [("rejected", "suspended", 1), ("rejected", "suspended", 1), ("rejected", "suspended", -1)],
            {"n:rejected": 1, "n:rejected:suspended": 1},
            id="correction-subtracts",
        ),
        pytest.param(
            [("rejected", "garbage", 1), ("rejected", "garbage", -1), ("rejected", "rate_limited", -1)],
            {"n:rejected": -1, "n:rejected:other": 0, "n:rejected:rate_limited": -1},
            id="correction-of-other",
        ),
    ],
)
def test_refusals_by_reason(calls: list[tuple[str, str, int]], expected: dict[str, int]) -> None:
    """Rejected calls also count per reason, one field per known reason and ``other`` for any other
    reason; corrections subtract them."""
    events = []
    for outcome, reason, sign in calls:
        e = event(outcome=outcome, reason=reason)
        e.sign = sign
        events.append(e)
    for values in window_totals(events).values():
        assert values == {"spend": 0, **expected}


def test_refusal_fields_are_bounded() -> None:
    """However many reasons a stream holds, a window has one field per known reason and ``other``."""
    reasons = [*REFUSAL_REASONS, *(f"reason-{i}" for i in range(500))]
    events = [event(outcome="rejected", reason=reason) for reason in reasons]
    totals = window_totals(events)[at("period", PERIOD)]
    assert set(totals) == {"spend", "n:rejected", *(f"n:rejected:{reason}" for reason in REFUSAL_REASONS)}
    assert totals["n:rejected:other"] == 501
    assert (*get_args(Reason), "other") == REFUSAL_REASONS


def test_spend_adds_costs() -> None:
    """``spend`` adds up the recorded cost of each event."""
    totals = window_totals([event(), event(), event()], [1_000, 0, 250])
    assert totals[at("period", PERIOD)]["spend"] == 1_250


def test_late_event_lands_in_its_own_window() -> None:
    """An event that arrives late adds to the (older) windows of its timestamp, not to the current ones."""
    late_ts = T0_MS - 2 * DAY_MS - 3 * HOUR_MS
    late = late_ts // 1000
    totals = window_totals([event(ts=T0_MS), event(ts=late_ts, units={"calls": 1, "tokens": 4})])
    assert totals[at("day", DAY0)] == {"n:success": 1, "spend": 0, "calls": 1}
    assert totals[at("day", late - late % 86_400)] == {"n:success": 1, "spend": 0, "calls": 1, "tokens": 4}
    assert totals[at("minute", late - late % 60)]["tokens"] == 4
    assert totals[at("period", PERIOD)] == {"n:success": 2, "spend": 0, "calls": 2, "tokens": 4}


def test_events_of_another_period() -> None:
    """Events of one day that belong to different billing periods split only in the period window."""
    totals = window_totals([event(period_start=PERIOD), event(period_start=PERIOD + 1)])
    assert totals[at("period", PERIOD)]["calls"] == 1
    assert totals[at("period", PERIOD + 1)]["calls"] == 1
    assert totals[at("day", DAY0)]["calls"] == 2


def test_fold_into_existing_totals() -> None:
    """Folding batch after batch into one mapping equals folding them all at once."""
    events = [event(ts=T0_MS + i * 7_000, units={"calls": 1, "gauge": i, "peak": i % 5}) for i in range(40)]
    stepwise = fold(events[:13], [1] * 13, METERS)
    fold(events[13:], [1] * 27, METERS, stepwise)
    assert stepwise == fold(events, [1] * 40, METERS)


def fields(events: list[UsageEvent] | bytes, costs: bytes) -> dict[bytes, bytes]:
    payload = events if isinstance(events, bytes) else encode_batch(events)
    return {b"b": payload, b"c": costs, b"i": b"batch-1"}


def test_parse_entry_valid() -> None:
    """A well-formed entry gives its events and their costs."""
    events = [event("acme"), event("globex")]
    parsed = parse_entry(fields(events, b"10,0"), METERS)
    assert parsed == (events, [10, 0])


def test_parse_entry_empty_batch() -> None:
    """A batch of no events is valid and adds nothing."""
    assert parse_entry(fields([], b""), METERS) == ([], [])


def _unknown_version() -> bytes:
    raw = msgpack.unpackb(encode_batch([event()]))
    raw[0][0] = 3
    return bytes(msgpack.packb(raw))


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        pytest.param({b"c": b"0", b"i": b"x"}, "missing field 'b'", id="no-payload"),
        pytest.param({b"b": encode_batch([event()]), b"i": b"x"}, "missing field 'c'", id="no-costs"),
        pytest.param(fields(b"\xc1garbage", b"0"), "field 'b': not a msgpack document", id="not-msgpack"),
        pytest.param(fields(encode_batch([event()])[:-9], b"0"), "field 'b': not a msgpack", id="truncated"),
        pytest.param(fields(msgpack.packb({"v": 1}), b"0"), "expected a list of events", id="not-a-list"),
        pytest.param(fields(_unknown_version(), b"0"), "unknown schema version 3", id="unknown-version"),
        pytest.param(
            fields(msgpack.packb([{"v": 1}]), b"0"), "event 0: field 'id'", id="missing-event-fields"
        ),
        pytest.param(fields([event(), event()], b"1"), "1 costs for 2 events", id="too-few-costs"),
        pytest.param(fields([event()], b"1,2"), "2 costs for 1 events", id="too-many-costs"),
        pytest.param(fields([event()], b"x"), "cost 0 is not a non-negative integer", id="cost-not-a-number"),
        pytest.param(fields([event()], b"-3"), "cost 0 is not a non-negative integer", id="negative-cost"),
        pytest.param(fields([event(), event()], b"1,"), "cost 1 is not", id="empty-cost"),
        pytest.param(fields([event(), event()], b"1_0,2"), "cost 0 is not", id="underscore-cost"),
        pytest.param(fields([event()], b"1" * 16), "cost 0 is not", id="cost-beyond-range"),
        pytest.param(
            fields([event(units={"tokens": 2**60})], b"0"),
            "meter 'tokens' has a value out of range",
            id="huge-units",
        ),
        pytest.param(
            fields([event(units={"other": -(2**63)})], b"0"),
            "meter 'other' has a value out",
            id="huge-unknown-meter",
        ),
        pytest.param(
            fields([event(units={"tokens": "many"})], b"0"),
            "meter 'tokens' (sum) needs an integer",
            id="sum-text",
        ),
        pytest.param(
            fields([event(), event(units={"gauge": "x"})], b"0,0"),
            "event 1: meter 'gauge' (last)",
            id="last-text",
        ),
    ],
)
def test_parse_entry_garbage(entry: dict[bytes, bytes], reason: str) -> None:
    """An entry that is not a valid batch gives a one-line reason instead of events."""
    parsed = parse_entry(entry, METERS)
    assert isinstance(parsed, str)
    assert reason in parsed
    assert "\n" not in parsed
    assert len(parsed) <= 200


def test_parse_entry_ignores_units_of_unbilled_events() -> None:
    """Units of events that are not billed are never folded, so their shape does not spoil the batch."""
    events = [event(outcome="server_error", units={"tokens": "oops"})]
    assert parse_entry(fields(events, b"0"), METERS) == (events, [0])


def test_last_tie_across_billing_periods() -> None:
    """Of two events with one timestamp in different billing periods, the later in the stream is last."""
    events = [
        event(units={"gauge": 1}, period_start=PERIOD),
        event(units={"gauge": 2}, period_start=PERIOD + 1),
        event(units={"gauge": 3}, period_start=PERIOD),
    ]
    totals = window_totals(events)
    assert totals[at("day", DAY0)]["gauge"] == 3
    assert totals[at("period", PERIOD + 1)]["gauge"] == 2
    assert window_totals(events[:2])[at("day", DAY0)]["gauge"] == 2


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 3),  # customer
            st.integers(0, 3 * 60_000),  # ms after T0: a few minutes, with timestamp ties
            st.integers(-5, 5),  # gauge and peak value
            st.booleans(),  # live
            st.booleans(),  # billable
            st.booleans(),  # in the next billing period
        ),
        max_size=40,
    ),
    st.lists(st.integers(0, 40), max_size=4),
)
def test_fold_is_independent_of_batching(
    raw: list[tuple[int, int, int, bool, bool, bool]], cuts: list[int]
) -> None:
    """Folding a stream in any split, batch after batch into the same totals, equals folding it at once."""
    events = [
        event(
            f"c{customer}",
            ts=T0_MS + offset // 1000 * 1000,
            live=live,
            billable=billable,
            units={"calls": 1, "gauge": value, "peak": value, "users": str(value)},
            period_start=PERIOD + next_period,
        )
        for customer, offset, value, live, billable, next_period in raw
    ]
    costs = list(range(len(events)))
    stepwise: dict[Window, WindowTotals] = {}
    bounds = [0, *sorted(min(cut, len(events)) for cut in cuts), len(events)]
    for start, end in itertools.pairwise(bounds):
        fold(events[start:end], costs[start:end], METERS, stepwise)
    assert stepwise == fold(events, costs, METERS)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 3),  # customer
            st.integers(0, 3 * 60_000),  # ms after T0
            st.integers(-5, 5),  # units
            st.booleans(),  # billable
            st.sampled_from(["success", "client_error", "server_error", "rejected"]),
            st.sampled_from(["rate_limited", "suspended", "", "garbage"]),  # reason
            st.integers(0, 3),  # cost
        ),
        max_size=30,
    ),
)
def test_fold_without_signs_equals_fold_with_signs_of_one(
    raw: list[tuple[int, int, int, bool, str, str, int]],
) -> None:
    """A batch without signs (counted in C) folds as the same batch with every sign 1 (event by event)."""
    events = [
        event(
            f"c{customer}",
            ts=T0_MS + offset,
            billable=billable,
            outcome=outcome,
            units={"calls": 1, "tokens": value, "gauge": value, "peak": value, "users": str(value)},
            reason=reason,
        )
        for customer, offset, value, billable, outcome, reason, _ in raw
    ]
    columns = decode_columns(encode_batch(events))
    costs = [cost for *_, cost in raw]
    plain, signed = Fold(METERS), Fold(METERS)
    plain.add(columns, costs)
    signed.add(columns, costs, [1] * len(events))
    assert plain.totals() == signed.totals() == fold(events, costs, METERS)
    assert plain.events == signed.events == len(events)


def test_parse_entry_accepts_values_up_to_the_bounds() -> None:
    """The largest cost (15 digits) and units of magnitude up to ``MAX_VALUE`` are valid."""
    events = [event(units={"tokens": MAX_VALUE, "peak": -MAX_VALUE})]
    assert parse_entry(fields(events, b"9" * 15), METERS) == (events, [10**15 - 1])
