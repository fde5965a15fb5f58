"""The pure core: every decision of the request path that needs no I/O.

The ASGI, WSGI and Django adapters and every storage backend share these functions and records, so a rule
(what a call holds at admission, which outcomes are charged, what the headers say) is written once.
"""

from __future__ import annotations

import calendar
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, Literal

from meterware._unsettled import Snapshot, Unsettled
from meterware.config import Meter, Plan, Policy
from meterware.events import Outcome

CustomerStatus = Literal["active", "suspended"]
Reason = Literal[
    "missing_key",
    "malformed_key",
    "unknown_key",
    "revoked_key",
    "expired_key",
    "suspended",
    "rate_limited",
    "quota_exceeded",
    "insufficient_credits",
    "backend_unavailable",
    "test_key_not_allowed",
]
#: Reasons the atomic admission can give (the others are decided before it runs).
ADMIT_REASONS: Final[tuple[Reason, ...]] = (
    "unknown_key",
    "revoked_key",
    "expired_key",
    "suspended",
    "rate_limited",
    "quota_exceeded",
    "insufficient_credits",
)
CLIENT_CLOSED_REQUEST: Final = 499


@dataclass(frozen=True, slots=True)
class Customer:
    """A paying (or sandboxed) user of the API."""

    id: str
    plan: str
    status: CustomerStatus = "active"
    #: Billing-period anchor, epoch seconds: periods start at this instant and every period after it.
    anchor: int = 0


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What the request path knows about a presented key once it is resolved (cached briefly)."""

    key_id: str
    customer: Customer
    live: bool
    prefix: str


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A key as listed to its owner (never the plaintext)."""

    key_id: str
    customer: str
    prefix: str
    live: bool
    status: Literal["active", "revoked"]
    created: int
    #: Epoch milliseconds after which the key stops working (0: never), e.g. a rotated key's grace end.
    expires_ms: int = 0


# -- admission ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MeterHold:
    """What one call holds of one meter at admission, and the plan's terms for that meter."""

    meter: str
    #: Hard quota for the period, or -1 when the meter has none (soft quotas are not enforced).
    quota: int
    included: int
    #: Micro-credits per unit beyond ``included`` (0 for test keys: the sandbox is never charged).
    price: int
    #: Units that must still fit under the hard quota for the call to be admitted.
    need: int
    #: Units held until the call settles (the call's weight, or a value meter's estimate).
    hold: int
    #: Whether the hold is the call's exact size (``call`` meters); value meters are open-ended, so a
    #: priced one needs a positive balance once its included units are used.
    exact: bool = True


# Built for every call: not frozen, as a frozen dataclass's __init__ costs an object.__setattr__ per field.
@dataclass(slots=True)
class AdmitRequest:
    """Everything the one atomic admission call needs."""

    shard: int
    customer: str
    key_id: str
    live: bool
    plan: Plan
    period_start: int
    period_end: int
    holds: tuple[MeterHold, ...]
    reservation_id: str
    reservation_timeout_ms: int
    #: Calls admitted at once: 1, or a lease's block (``holds`` then hold all of them).
    calls: int = 1
    #: The changes this process's finished calls still make to the customer's counters (read when the
    #: admission is sent, so it sees every call finished by then), or None when the call holds nothing.
    unsettled: Unsettled | None = None

    @property
    def charges_credits(self) -> bool:
        """Whether calls spend the prepaid credit balance (live keys on prepaid plans)."""
        return self.live and self.plan.prepaid

    def unsettled_changes(self) -> Snapshot | None:
        """What this process's finished calls still change of this call's counters (None: nothing)."""
        if self.unsettled is None:
            return None
        snapshot = self.unsettled.of((self.customer, self.live, self.period_start))
        return snapshot if snapshot.changes else None


# Built for every call: not frozen, as a frozen dataclass's __init__ costs an object.__setattr__ per field.
@dataclass(slots=True)
class LimitState:
    """One line of the ``RateLimit`` headers: a policy and where the caller stands in it."""

    name: str
    quota: int
    window: int
    remaining: int
    #: Seconds until the caller gets more of this policy.
    reset: int


# Built for every call: not frozen, as a frozen dataclass's __init__ costs an object.__setattr__ per field.
@dataclass(slots=True)
class Decision:
    """The answer of the admission call."""

    allowed: bool
    reason: Reason | None = None
    #: Id of the reservation to settle, or "" when the call holds nothing.
    reservation_id: str = ""
    reserved_credits: int = 0
    #: Seconds the caller should wait before retrying a rejected call.
    retry_after: int = 0
    limits: tuple[LimitState, ...] = ()
    #: Credits the customer still has after this call's reservation (prepaid plans), in micro-credits.
    available_credits: int | None = None
    #: Calls admitted: 1, up to a lease's ``calls`` (as many as fit), 0 when refused.
    calls: int = 1


def meter_holds(plan: Plan, meters: Mapping[str, Meter], weight: int, live: bool) -> tuple[MeterHold, ...]:
    """What a call of ``weight`` units holds of each meter the plan limits or prices."""
    holds = []
    for name, terms in plan.meters.items():
        if terms.quota is None and not terms.price and not terms.included:
            continue
        meter = meters[name]
        is_call = meter.source == "call"
        units = call_units(meter, weight)
        holds.append(
            MeterHold(
                meter=name,
                quota=terms.quota if terms.quota is not None and terms.hard else -1,
                included=terms.included,
                price=terms.price if live else 0,
                # A value meter's size is unknown until the end: admit while one unit is left.
                need=units if is_call else 1,
                hold=units if is_call else meter.reserve,
                exact=is_call,
            )
        )
    return tuple(holds)


@functools.cache
def rate_limit_name(seconds: int) -> str:
    """Name of a rate-limit policy in the ``RateLimit`` headers."""
    return f"rate-{seconds}s"


@functools.cache
def quota_name(meter: str) -> str:
    """Name of a period-quota policy in the ``RateLimit`` headers."""
    return f"quota-{meter}"


# -- billing periods ---------------------------------------------------------------------------------

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


# -- outcomes ----------------------------------------------------------------------------------------


def classify(status: int) -> Outcome:
    """The outcome of a call that completed its response, from its status."""
    if status >= 500:
        return "server_error"
    if status >= 400:
        return "client_error"
    return "success"


def is_billable(outcome: Outcome, status: int, policy: Policy) -> bool:
    """Whether a call is charged: a 2xx response, a 4xx one with ``policy.bill_client_errors``; never a
    redirect (3xx), a failure or a refusal.

    ``status`` is the status its client was sent: for an ``aborted`` call (the client left before the end),
    that of the response it had started to receive, or 0 if none had started. Such a call was served, and
    is charged unless ``policy.refund_aborted_streams``.
    """
    if outcome == "aborted":
        if policy.refund_aborted_streams:
            return False
    elif outcome != "success" and outcome != "client_error":
        return False
    return 200 <= status < 300 or (policy.bill_client_errors and 400 <= status < 500)


# -- responses ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    """An RFC 9457 problem document for a refused call."""

    status: int
    title: str
    detail: str
    reason: Reason
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    def body(self) -> bytes:
        return json.dumps(
            {
                "type": f"https://meterware.dev/problems/{self.reason.replace('_', '-')}",
                "title": self.title,
                "status": self.status,
                "detail": self.detail,
                "reason": self.reason,
            },
            separators=(",", ":"),
        ).encode()

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        body_length = str(len(self.body())).encode()
        return [
            (b"content-type", b"application/problem+json"),
            (b"content-length", body_length),
            *self.headers,
        ]


_PROBLEMS: Final[dict[Reason, tuple[int, str, str]]] = {
    "missing_key": (401, "API key required", "Send your key as 'Authorization: Bearer <key>'."),
    "malformed_key": (401, "Malformed API key", "The key does not have the shape of an API key."),
    "unknown_key": (401, "Unknown API key", "No active key matches the one presented."),
    "revoked_key": (401, "Revoked API key", "This key has been revoked."),
    "expired_key": (401, "Expired API key", "This key has expired; use its replacement."),
    "suspended": (403, "Account suspended", "The account this key belongs to is suspended."),
    "rate_limited": (429, "Rate limit exceeded", "Too many calls; retry after the time in Retry-After."),
    "quota_exceeded": (429, "Quota exhausted", "The quota of this billing period is used up."),
    "insufficient_credits": (402, "Insufficient credits", "The credit balance cannot cover this call."),
    "backend_unavailable": (503, "Service unavailable", "Metering is unavailable; retry shortly."),
    "test_key_not_allowed": (403, "Live key required", "This route serves live keys only, not test keys."),
}


def problem(reason: Reason, decision: Decision | None = None) -> Problem:
    """The response for a call refused for ``reason``."""
    status, title, detail = _PROBLEMS[reason]
    headers = limit_headers(decision.limits) if decision else []
    if decision and decision.retry_after and status in (429, 503):
        headers.append((b"retry-after", str(decision.retry_after).encode()))
    return Problem(status, title, detail, reason, headers)


def limit_headers(limits: tuple[LimitState, ...]) -> list[tuple[bytes, bytes]]:
    """``RateLimit-Policy`` and ``RateLimit`` (draft-ietf-httpapi-ratelimit-headers-10)."""
    if not limits:
        return []
    # One loop, no generators: this runs for every call admitted on its own.
    policy, state = [], []
    for limit in limits:
        policy.append(f'"{limit.name}";q={limit.quota};w={limit.window}')
        state.append(f'"{limit.name}";r={limit.remaining};t={limit.reset}')
    return [(b"ratelimit-policy", ", ".join(policy).encode()), (b"ratelimit", ", ".join(state).encode())]


def call_units(meter: Meter, weight: int) -> int:
    """Units a call of ``weight`` adds to a ``call`` meter: its weight if summed, one if counted."""
    return weight if meter.aggregation == "sum" else 1


def holds_anything(request: AdmitRequest, reserved_credits: int) -> bool:
    """Whether an admitted call opens a reservation (only calls that hold units or credits do)."""
    return reserved_credits > 0 or any(hold.hold for hold in request.holds)
