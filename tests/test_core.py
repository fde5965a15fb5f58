"""The pure core: billing periods, outcomes, holds, admission replies, problem bodies and headers."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterware.config import Meter, MeterTerms, Plan, Policy, RateLimit
from meterware.events import Outcome
from meterware.metering.admission import (
    AdmitRequest,
    Decision,
    LimitState,
    MeterHold,
    Reason,
    meter_holds,
)
from meterware.metering.outcomes import classify, is_billable
from meterware.metering.periods import period_bounds
from meterware.metering.responses import limit_headers, problem
from meterware.storage._admission import decision_from_reply


def utc(text: str) -> int:
    """Epoch seconds of an ISO date-time in UTC."""
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


DAY = 86_400

# -- billing periods -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("anchor", "period", "now", "start", "end"),
    [
        pytest.param(
            "2023-01-31T12:00",
            "month",
            "2023-02-15T00:00",
            "2023-01-31T12:00",
            "2023-02-28T12:00",
            id="31st-into-feb",
        ),
        pytest.param(
            "2023-01-31T12:00",
            "month",
            "2023-03-01T00:00",
            "2023-02-28T12:00",
            "2023-03-31T12:00",
            id="31st-after-feb",
        ),
        pytest.param(
            "2024-01-31T12:00",
            "month",
            "2024-02-20T00:00",
            "2024-01-31T12:00",
            "2024-02-29T12:00",
            id="31st-leap-feb",
        ),
        pytest.param(
            "2024-01-31T12:00",
            "month",
            "2024-02-29T13:00",
            "2024-02-29T12:00",
            "2024-03-31T12:00",
            id="leap-day",
        ),
        pytest.param(
            "2024-01-31T12:00",
            "month",
            "2024-05-31T12:00",
            "2024-05-31T12:00",
            "2024-06-30T12:00",
            id="back-to-31st",
        ),
        pytest.param(
            "2024-01-31T12:00",
            "month",
            "2024-07-15T00:00",
            "2024-06-30T12:00",
            "2024-07-31T12:00",
            id="after-30-day",
        ),
        pytest.param(
            "2024-02-29T00:00",
            "month",
            "2025-02-28T00:00",
            "2025-02-28T00:00",
            "2025-03-29T00:00",
            id="leap-anchor",
        ),
        pytest.param(
            "2023-01-30T00:00",
            "month",
            "2024-02-29T23:59",
            "2024-02-29T00:00",
            "2024-03-30T00:00",
            id="30th-leap",
        ),
        pytest.param(
            "2023-12-15T08:00",
            "month",
            "2024-01-20T00:00",
            "2024-01-15T08:00",
            "2024-02-15T08:00",
            id="year-wrap",
        ),
        pytest.param(
            "2024-01-20T00:00",
            "month",
            "2024-03-10T00:00",
            "2024-02-20T00:00",
            "2024-03-20T00:00",
            id="before-day",
        ),
        pytest.param(
            "2024-01-20T00:00",
            "month",
            "2024-03-20T00:00",
            "2024-03-20T00:00",
            "2024-04-20T00:00",
            id="at-boundary",
        ),
        pytest.param(
            "2024-01-20T00:00",
            "month",
            "2024-03-19T23:59:59",
            "2024-02-20T00:00",
            "2024-03-20T00:00",
            id="second-before-boundary",
        ),
        pytest.param(
            "2024-01-20T00:00",
            "month",
            "2024-01-20T00:00",
            "2024-01-20T00:00",
            "2024-02-20T00:00",
            id="at-anchor",
        ),
        pytest.param(
            "2024-03-31T00:00",
            "month",
            "2024-01-10T00:00",
            "2023-12-31T00:00",
            "2024-01-31T00:00",
            id="before-anchor",
        ),
        pytest.param(
            "2024-01-01T00:00", "week", "2024-01-11T05:00", "2024-01-08T00:00", "2024-01-15T00:00", id="week"
        ),
        pytest.param(
            "2024-01-01T00:00",
            "week",
            "2024-01-15T00:00",
            "2024-01-15T00:00",
            "2024-01-22T00:00",
            id="week-boundary",
        ),
        pytest.param(
            "2024-01-01T06:00",
            "day",
            "2024-03-01T05:59:59",
            "2024-02-29T06:00",
            "2024-03-01T06:00",
            id="day-leap",
        ),
        pytest.param(
            "2024-01-01T06:00",
            "day",
            "2024-03-01T06:00",
            "2024-03-01T06:00",
            "2024-03-02T06:00",
            id="day-boundary",
        ),
        pytest.param(
            "2024-01-10T06:00",
            "day",
            "2024-01-01T00:00",
            "2023-12-31T06:00",
            "2024-01-01T06:00",
            id="day-before-anchor",
        ),
    ],
)
def test_period_bounds(anchor: str, period: str, now: str, start: str, end: str) -> None:
    """Periods run [start, end) from the anchor; a 31st anchor uses the last day of shorter months."""
    assert period_bounds(utc(anchor), period, utc(now)) == (utc(start), utc(end))


def test_period_bounds_accepts_fractional_now() -> None:
    """A float 'now' just before a boundary still belongs to the earlier period."""
    boundary = utc("2024-02-20T00:00")
    assert period_bounds(utc("2024-01-20T00:00"), "month", boundary - 0.001) == (
        utc("2024-01-20T00:00"),
        boundary,
    )
    assert period_bounds(utc("2024-01-01T00:00"), "day", boundary - 0.5) == (boundary - DAY, boundary)


@given(
    anchor=st.integers(utc("2000-01-01T00:00"), utc("2060-01-01T00:00")),
    now=st.integers(utc("2000-01-01T00:00"), utc("2060-01-01T00:00")),
    period=st.sampled_from(["month", "week", "day"]),
)
def test_periods_contain_now_and_tile_time(anchor: int, now: int, period: str) -> None:
    """The period contains now, and the next period starts where this one ends."""
    start, end = period_bounds(anchor, period, now)
    assert start <= now < end
    assert period_bounds(anchor, period, end)[0] == end
    assert period_bounds(anchor, period, end - 1) == (start, end)
    assert 28 * DAY <= end - start <= 31 * DAY if period == "month" else end - start in (DAY, 7 * DAY)


# -- outcomes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        pytest.param(100, "success", id="100"),
        pytest.param(200, "success", id="200"),
        pytest.param(204, "success", id="204"),
        pytest.param(301, "success", id="301"),
        pytest.param(304, "success", id="304"),
        pytest.param(399, "success", id="399"),
        pytest.param(400, "client_error", id="400"),
        pytest.param(404, "client_error", id="404"),
        pytest.param(429, "client_error", id="429"),
        pytest.param(499, "client_error", id="499"),
        pytest.param(500, "server_error", id="500"),
        pytest.param(503, "server_error", id="503"),
        pytest.param(599, "server_error", id="599"),
    ],
)
def test_classify(status: int, outcome: Outcome) -> None:
    """2xx/3xx are successes, 4xx client errors, 5xx server errors."""
    assert classify(status) == outcome


@pytest.mark.parametrize(
    ("outcome", "status", "policy", "billable"),
    [
        pytest.param("success", 200, Policy(), True, id="200"),
        pytest.param("success", 204, Policy(bill_client_errors=True), True, id="204-bill-4xx"),
        pytest.param("success", 101, Policy(), False, id="101"),
        pytest.param("success", 301, Policy(), False, id="301"),
        pytest.param("success", 307, Policy(bill_client_errors=True), False, id="307-bill-4xx"),
        pytest.param("success", 304, Policy(), False, id="304"),
        pytest.param("client_error", 404, Policy(), False, id="404"),
        pytest.param("client_error", 404, Policy(bill_client_errors=True), True, id="404-bill-4xx"),
        pytest.param("server_error", 500, Policy(), False, id="500"),
        pytest.param("server_error", 200, Policy(bill_client_errors=True), False, id="failed-after-200"),
        pytest.param("aborted", 200, Policy(), True, id="aborted-after-200"),
        pytest.param("aborted", 200, Policy(refund_aborted_streams=True), False, id="aborted-refunded"),
        pytest.param("aborted", 0, Policy(bill_client_errors=True), False, id="aborted-before-response"),
        pytest.param("aborted", 302, Policy(), False, id="aborted-after-302"),
        pytest.param("aborted", 404, Policy(), False, id="aborted-after-404"),
        pytest.param("aborted", 404, Policy(bill_client_errors=True), True, id="aborted-after-404-bill-4xx"),
        pytest.param("rejected", 429, Policy(bill_client_errors=True), False, id="rejected"),
    ],
)
def test_is_billable(outcome: Outcome, status: int, policy: Policy, billable: bool) -> None:
    """2xx responses are charged, 4xx only when configured; redirects, failures and refusals never; a call
    whose client left after its response started is charged as that response, unless the policy refunds."""
    assert is_billable(outcome, status, policy) is billable


# -- holds ---------------------------------------------------------------------------------------------

METERS = {
    "calls": Meter("calls", "count", "call"),
    "units": Meter("units", "sum", "call"),
    "tokens": Meter("tokens", "sum", "handler", reserve=50),
    "bytes": Meter("bytes", "sum", "response_bytes"),
    "peak": Meter("peak", "max", "handler"),
}


def plan_with(**terms: MeterTerms) -> Plan:
    return Plan("p", meters=terms)


@pytest.mark.parametrize(
    ("terms", "weight", "live", "hold"),
    [
        pytest.param(
            MeterTerms(quota=100),
            10,
            True,
            MeterHold("calls", 100, 0, 0, 1, 1, True),
            id="count-call-holds-one",
        ),
        pytest.param(
            MeterTerms(price=2000), 1, True, MeterHold("calls", -1, 0, 2000, 1, 1, True), id="priced-call"
        ),
        pytest.param(
            MeterTerms(price=2000), 1, False, MeterHold("calls", -1, 0, 0, 1, 1, True), id="test-key-free"
        ),
        pytest.param(
            MeterTerms(quota=100, hard=False, included=10, price=5),
            1,
            True,
            MeterHold("calls", -1, 10, 5, 1, 1, True),
            id="soft-quota-not-enforced",
        ),
        pytest.param(
            MeterTerms(included=10), 1, True, MeterHold("calls", -1, 10, 0, 1, 1, True), id="included-only"
        ),
        pytest.param(MeterTerms(quota=0), 1, True, MeterHold("calls", 0, 0, 0, 1, 1, True), id="zero-quota"),
    ],
)
def test_meter_holds_count_call_meter(terms: MeterTerms, weight: int, live: bool, hold: MeterHold) -> None:
    """A counted call meter holds one unit whatever the route weight; test keys are priced 0."""
    assert meter_holds(plan_with(calls=terms), METERS, weight, live) == (hold,)


@pytest.mark.parametrize(
    ("meter", "weight", "live", "hold"),
    [
        pytest.param(
            "units", 10, True, MeterHold("units", 1000, 0, 7, 10, 10, True), id="summed-call-weight"
        ),
        pytest.param("units", 0, True, MeterHold("units", 1000, 0, 7, 0, 0, True), id="summed-call-weight-0"),
        pytest.param(
            "tokens", 10, True, MeterHold("tokens", 1000, 0, 7, 1, 50, False), id="value-meter-reserve"
        ),
        pytest.param(
            "tokens", 10, False, MeterHold("tokens", 1000, 0, 0, 1, 50, False), id="value-meter-test-key"
        ),
        pytest.param(
            "bytes", 3, True, MeterHold("bytes", 1000, 0, 7, 1, 0, False), id="value-meter-no-reserve"
        ),
    ],
)
def test_meter_holds_sum_and_value_meters(meter: str, weight: int, live: bool, hold: MeterHold) -> None:
    """Summed call meters hold the weight; value meters need one unit left and hold their reserve."""
    plan = plan_with(**{meter: MeterTerms(quota=1000, price=7)})
    assert meter_holds(plan, METERS, weight, live) == (hold,)


def test_meter_holds_skip_meters_without_terms() -> None:
    """Meters a plan neither limits nor prices hold nothing; plan order is kept."""
    plan = plan_with(peak=MeterTerms(), units=MeterTerms(price=1), calls=MeterTerms(quota=5))
    assert [hold.meter for hold in meter_holds(plan, METERS, 1, True)] == ["units", "calls"]
    assert meter_holds(Plan("empty"), METERS, 1, True) == ()


# -- admission replies ---------------------------------------------------------------------------------

NOW = utc("2026-03-10T00:00")
PERIOD_START = utc("2026-03-01T00:00")
PERIOD_END = utc("2026-04-01T00:00")
LIMITED = Plan(
    "limited",
    rate_limits=(RateLimit(5, 1), RateLimit(100, 60)),
    meters={"calls": MeterTerms(quota=1000), "units": MeterTerms(quota=50, hard=False)},
)


def admit_request(
    plan: Plan = LIMITED, *, live: bool = True, holds: tuple[MeterHold, ...] | None = None
) -> AdmitRequest:
    return AdmitRequest(
        shard=0,
        customer="acme",
        key_id="key_0123456789abcdef",
        live=live,
        plan=plan,
        period_start=PERIOD_START,
        period_end=PERIOD_END,
        holds=meter_holds(plan, METERS, 1, live) if holds is None else holds,
        reservation_id="res-1",
        reservation_timeout_ms=300_000,
    )


LIMITS = (
    LimitState("rate-1s", 5, 1, 4, 1),
    LimitState("rate-60s", 100, 60, 99, 2),
    LimitState("quota-calls", 1000, PERIOD_END - PERIOD_START, 998, PERIOD_END - NOW),
)


@pytest.mark.parametrize(
    ("request_", "reply", "decision"),
    [
        pytest.param(
            admit_request(),
            [1, "", 0, 0, 0, 1, 4, 200, 99, 1001, 998],
            Decision(True, None, "res-1", 0, 0, LIMITS),
            id="allowed",
        ),
        pytest.param(
            admit_request(),
            [1, b"", b"0", b"0", b"0", b"1", b"4", b"200", b"99", b"1001", b"998"],
            Decision(True, None, "res-1", 0, 0, LIMITS),
            id="allowed-bytes-reply",
        ),
        pytest.param(
            admit_request(),
            [0, b"rate_limited", 1001, 0, 0, 0, 0, 1001, 99, 1001, 998],
            Decision(
                False,
                "rate_limited",
                "",
                0,
                2,
                (LimitState("rate-1s", 5, 1, 0, 2), *LIMITS[1:]),
                calls=0,
            ),
            id="rate-limited-retry-rounds-up",
        ),
        pytest.param(
            admit_request(),
            [0, "quota_exceeded", 0, 0, 0, 0, 4, 200, 99, 1001, -3],
            Decision(
                False,
                "quota_exceeded",
                "",
                0,
                PERIOD_END - NOW,
                (
                    *LIMITS[:2],
                    LimitState("quota-calls", 1000, PERIOD_END - PERIOD_START, 0, PERIOD_END - NOW),
                ),
                calls=0,
            ),
            id="quota-retry-at-period-end",
        ),
        pytest.param(
            admit_request(),
            [0, "revoked_key", 0, 0, 0],
            Decision(False, "revoked_key", calls=0),
            id="short-reply-key-refusal",
        ),
        pytest.param(
            admit_request(),
            [0, "suspended", 0, 0, 0],
            Decision(False, "suspended", calls=0),
            id="short-reply-suspended",
        ),
        pytest.param(
            admit_request(Plan("open")),
            [1, "", 0, 0, 0, 1],
            Decision(True, None, ""),
            id="allowed-holding-nothing",
        ),
    ],
)
def test_decision_from_reply(request_: AdmitRequest, reply: list[Any], decision: Decision) -> None:
    """The admission reply becomes a Decision with one LimitState per rate limit and hard quota."""
    assert decision_from_reply(request_, reply, NOW) == decision


def test_decision_prepaid_live_call_reports_credits() -> None:
    """Live calls on prepaid plans report the reserved and remaining credits; a reservation is opened."""
    plan = Plan("payg", prepaid=True, meters={"calls": MeterTerms(price=2000)})
    decision = decision_from_reply(admit_request(plan), [1, "", 0, 2000, 998_000, 1], NOW)
    assert decision == Decision(True, None, "res-1", 2000, 0, (), 998_000)


def test_decision_prepaid_test_call_reports_no_credits() -> None:
    """Test keys never spend credits, so their decision carries no balance."""
    plan = Plan("payg", prepaid=True, meters={"calls": MeterTerms(price=2000)})
    decision = decision_from_reply(admit_request(plan, live=False), [1, "", 0, 0, 5, 1], NOW)
    assert decision.available_credits is None
    assert decision.reservation_id == "res-1"  # the call still holds its unit of the calls meter


def test_decision_insufficient_credits() -> None:
    """A refusal for credits carries the balance and no reservation."""
    plan = Plan("payg", prepaid=True, meters={"calls": MeterTerms(price=2000)})
    decision = decision_from_reply(admit_request(plan), [0, "insufficient_credits", 0, 0, 1000, 0], NOW)
    assert decision == Decision(False, "insufficient_credits", "", 0, 0, (), 1000, calls=0)


def test_decision_window_after_period_end() -> None:
    """A reply read after the period ended never reports a negative reset."""
    decision = decision_from_reply(
        admit_request(), [1, "", 0, 0, 0, 1, 4, 200, 99, 1001, 998], PERIOD_END + 5
    )
    assert decision.limits[-1].reset == 0


# -- responses -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "status", "title"),
    [
        pytest.param("missing_key", 401, "API key required", id="missing-key"),
        pytest.param("malformed_key", 401, "Malformed API key", id="malformed-key"),
        pytest.param("unknown_key", 401, "Unknown API key", id="unknown-key"),
        pytest.param("revoked_key", 401, "Revoked API key", id="revoked-key"),
        pytest.param("expired_key", 401, "Expired API key", id="expired-key"),
        pytest.param("key_exhausted", 403, "API key used up", id="key-exhausted"),
        pytest.param("unknown_customer", 403, "Unknown customer", id="unknown-customer"),
        pytest.param("suspended", 403, "Account suspended", id="suspended"),
        pytest.param("rate_limited", 429, "Rate limit exceeded", id="rate-limited"),
        pytest.param("quota_exceeded", 429, "Quota exhausted", id="quota-exceeded"),
        pytest.param("insufficient_credits", 402, "Insufficient credits", id="insufficient-credits"),
        pytest.param("backend_unavailable", 503, "Service unavailable", id="backend-unavailable"),
        pytest.param("test_key_not_allowed", 403, "Live key required", id="test-key-not-allowed"),
    ],
)
def test_problem_body(reason: Reason, status: int, title: str) -> None:
    """Each refusal is an RFC 9457 problem+json document with the README's status and reason."""
    refused = problem(reason)
    body = json.loads(refused.body())
    assert refused.status == status
    assert body == {
        "type": f"https://meterware.dev/problems/{reason.replace('_', '-')}",
        "title": title,
        "status": status,
        "detail": refused.detail,
        "reason": reason,
    }
    assert refused.detail
    assert refused.response_headers() == [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(refused.body())).encode()),
    ]


@pytest.mark.parametrize(
    ("reason", "retry_after", "expected"),
    [
        pytest.param("rate_limited", 2, b"2", id="rate-limited"),
        pytest.param("quota_exceeded", 1_900_000, b"1900000", id="quota"),
        pytest.param("backend_unavailable", 1, b"1", id="backend"),
        pytest.param("rate_limited", 0, None, id="no-retry-time"),
        pytest.param("insufficient_credits", 5, None, id="not-on-402"),
        pytest.param("revoked_key", 5, None, id="not-on-401"),
        pytest.param("suspended", 5, None, id="not-on-403"),
    ],
)
def test_problem_retry_after(reason: Reason, retry_after: int, expected: bytes | None) -> None:
    """Retry-After is sent on 429 and 503 refusals that know when to retry, and only there."""
    headers = dict(problem(reason, Decision(False, reason, retry_after=retry_after)).response_headers())
    assert headers.get(b"retry-after") == expected


def test_problem_carries_limit_headers_of_the_decision() -> None:
    """A refused call still tells the client where it stands in each policy."""
    decision = Decision(False, "rate_limited", retry_after=1, limits=(LimitState("rate-1s", 5, 1, 0, 1),))
    headers = problem("rate_limited", decision).response_headers()
    assert headers[2:] == [
        (b"ratelimit-policy", b'"rate-1s";q=5;w=1'),
        (b"ratelimit", b'"rate-1s";r=0;t=1'),
        (b"retry-after", b"1"),
    ]


def test_limit_headers_format() -> None:
    """RateLimit-Policy and RateLimit list one item per policy, as draft-ietf-httpapi-ratelimit-headers-10."""
    limits = (
        LimitState("rate-60s", 600, 60, 599, 1),
        LimitState("quota-calls", 1000, 2_592_000, 998, 2_591_990),
    )
    assert limit_headers(limits) == [
        (b"ratelimit-policy", b'"rate-60s";q=600;w=60, "quota-calls";q=1000;w=2592000'),
        (b"ratelimit", b'"rate-60s";r=599;t=1, "quota-calls";r=998;t=2591990'),
    ]


def test_limit_headers_match_the_readme() -> None:
    """The README's header example is what limit_headers produces."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    limits = (
        LimitState("rate-60s", 600, 60, 599, 1),
        LimitState("quota-calls", 1000, 2_592_000, 998, 2_591_990),
    )
    names = {b"ratelimit-policy": "RateLimit-Policy", b"ratelimit": "RateLimit"}
    for name, value in limit_headers(limits):
        assert f"\n{names[name]}: {value.decode()}\n" in readme


def test_no_limits_no_headers() -> None:
    """A plan without rate limits or hard quotas sends no RateLimit headers."""
    assert limit_headers(()) == []
