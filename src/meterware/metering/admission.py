"""Admission: what a call asks of the backend's one atomic check, and what the backend answers.

The request path and every storage backend share these records and rules, so what a call holds at
admission and how the admission script's reply reads are written once.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

from meterware.config import Meter, Plan, RateLimit
from meterware.dimensions import REMAINDER, Pricing, base_of, filtered, pricing
from meterware.metering.unsettled import Snapshot, Unsettled

if TYPE_CHECKING:
    from meterware.storage.base import Settlement

Reason = Literal[
    "missing_key",
    "malformed_key",
    "unknown_key",
    "revoked_key",
    "expired_key",
    "key_exhausted",
    "unknown_customer",
    "suspended",
    "rate_limited",
    "quota_exceeded",
    "insufficient_credits",
    "backend_unavailable",
    "test_key_not_allowed",
    "concurrency_exceeded",
    "spend_cap_reached",
]

#: The hold that counts a customer's calls in flight (a plan's ``concurrency``): held in the period's quota
#: hash like a meter's units, under a name no meter can have, and released when the call settles (or by the
#: worker, past the reservation's deadline). admit.lua names it too.
CONCURRENCY_METER = "@inflight"
#: ``RateLimit`` policy names of the concurrency cap and the spend cap.
CONCURRENCY_NAME = "concurrency"
SPEND_CAP_NAME = "spend-cap"


@dataclass(frozen=True, slots=True)
class ScopedLimit:
    """A rate limit narrower than the customer: on one route of the plan, or on one key."""

    limit: RateLimit
    #: What its rate key is scoped to: ``r<crc32 of the route glob>`` or ``k<key id>``.
    scope: str
    #: Its policy name in the ``RateLimit`` headers.
    name: str


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


# Built for every call: not frozen, as a frozen dataclass's __init__ costs an object.__setattr__ per
# field (benchmarks/micro.py: RequestCore.call_terms + admit_request).
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
    #: Whether the call must be admitted alone, never leased: a key with remaining uses (a lease would take
    #: uses its calls might never make), a customer without a key (leases are a key's).
    one_by_one: bool = False
    #: Rate limits beyond the plan's: the route's (``[plans.X.routes."<glob>"]``), then the key's.
    scoped_limits: tuple[ScopedLimit, ...] = ()
    #: Most micro-credits the customer's live calls may cost in the period (-1: no cap).
    spend_cap: int = -1

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


# Built for every call: not frozen, as a frozen dataclass's __init__ costs an object.__setattr__ per
# field (benchmarks/micro.py: decision_from_reply).
@dataclass(slots=True)
class LimitState:
    """One line of the ``RateLimit`` headers: a policy and where the caller stands in it."""

    name: str
    quota: int
    window: int
    remaining: int
    #: Seconds until the caller gets more of this policy.
    reset: int


# Built for every call: not frozen, as a frozen dataclass's __init__ costs an object.__setattr__ per
# field (benchmarks/micro.py: decision_from_reply).
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
    """What a call of ``weight`` units holds of each meter the plan limits or prices (and a slot of the
    plan's concurrency cap)."""
    holds = []
    split = filtered(frozenset(plan.meters))
    for name, terms in plan.meters.items():
        meter = meters[base_of(name)]
        if meter.level or (terms.quota is None and not terms.price and not terms.included):
            continue  # a level (max, last) is priced on invoices only
        is_call = meter.source == "call"
        units = call_units(meter, weight)
        quota = terms.quota if terms.quota is not None and terms.hard else -1
        price = terms.price if live else 0
        # A value meter's size is unknown until the end: admit while one unit is left.
        need, hold = (units, units) if is_call else (1, meter.reserve)
        if "{" in name:  # a filter of dimension values: what the call reports (its meter holds the estimate)
            holds.append(MeterHold(name, -1, terms.included, price, 1, 0, exact=False))
        elif name in split:  # its quota counts every value; its included units and price the others
            if terms.quota is not None:
                holds.append(MeterHold(name, quota, 0, 0, need, hold, is_call))
            if terms.price or terms.included:
                holds.append(MeterHold(name + REMAINDER, -1, terms.included, price, 1, hold, exact=False))
        else:
            holds.append(MeterHold(name, quota, terms.included, price, need, hold, is_call))
    if plan.concurrency:
        holds.append(MeterHold(CONCURRENCY_METER, plan.concurrency, 0, 0, 1, 1))
    return tuple(holds)


def scoped_limits(limits: tuple[RateLimit, ...], scope: str, kind: str) -> tuple[ScopedLimit, ...]:
    """``limits`` scoped to a route (``kind`` "route") or a key ("key"); a meter's limit has its own
    bucket (``<scope>:m<meter>``) and entry (``route-tokens-rate-60s``)."""
    return tuple(
        ScopedLimit(
            limit,
            f"{scope}:{meter_scope(limit.meter)}" if limit.meter else scope,
            f"{kind}-{rate_limit_name(limit.seconds, limit.meter)}",
        )
        for limit in limits
    )


#: Seconds a call refused by the concurrency cap is told to wait (a slot frees when a call finishes).
CONCURRENCY_RETRY_SECONDS = 1


def concurrency_state(cap: int, remaining: int) -> LimitState:
    """The ``RateLimit`` entry of a concurrency cap: ``remaining`` slots free (reset: a second when none)."""
    return LimitState(CONCURRENCY_NAME, cap, 1, remaining, 0 if remaining else CONCURRENCY_RETRY_SECONDS)


@functools.cache
def rate_limit_name(seconds: int, meter: str = "") -> str:
    """Name of a rate-limit policy in the ``RateLimit`` headers (``tokens-rate-60s`` for a meter's)."""
    return f"{meter}-rate-{seconds}s" if meter else f"rate-{seconds}s"


def meter_scope(meter: str) -> str:
    """What a plan's rate limit's key is scoped to: "" for calls, ``m<meter>`` for a meter's units (a
    name from the config, never from a request)."""
    return "m" + meter if meter else ""


#: What a call's settlement moves of each meter rate limit of its plan and route: ``(limit, amount,
#: seconds, units)``, ``limit`` the plan's limit's meter or the route's limit's scope (:func:`rate_scope`),
#: ``units`` its actual units less the estimate its admission took (negative: given back).
RateCorrections = tuple[tuple[str, int, int, int], ...]


def rate_corrections(
    plan: Plan, units: Mapping[str, int | str], estimated: bool, scoped: tuple[ScopedLimit, ...] = ()
) -> RateCorrections:
    """What a call reporting ``units`` moves of its plan's and its ``scoped`` meter rate limits
    (``estimated``: its admission took each limit's estimate: not a record, nor a call served fail-open,
    whose decision, made without the backend, has no limit state)."""
    if not (plan.meter_limited or scoped):
        return ()
    limits = [(limit.meter, limit) for limit in plan.rate_limits]
    limits += [(scoped_limit.scope, scoped_limit.limit) for scoped_limit in scoped]
    corrections = []
    for name, limit in limits:
        if limit.meter:
            value = units.get(limit.meter, 0)
            actual = value if isinstance(value, int) else 0
            corrections.append(
                (name, limit.amount, limit.seconds, actual - (limit.estimate if estimated else 0))
            )
    return tuple(corrections)


def rate_scope(limit: str) -> str:
    """The bucket scope of a correction's ``limit``: a plan's names its meter (``m<meter>``), a route's or a
    key's its scope (``r<crc32>:m<meter>``, ``k<key id>:m<meter>``: meter names have no colon)."""
    return limit if ":" in limit else meter_scope(limit)


#: A meter rate limit's TAT moved by a batch: ``(live, customer, limit, amount, seconds)`` (``limit`` as
#: in :data:`RateCorrections`).
RateMove = tuple[bool, str, str, int, int]


def rate_moves(settlements: Iterable[Settlement | None]) -> dict[RateMove, int]:
    """The units a batch's settlements move each meter rate limit by, summed (both backends apply one
    sum per limit and batch, so they agree however the clamps fall)."""
    moves: dict[RateMove, int] = {}
    for settlement in settlements:
        if settlement is not None and settlement.rates:
            for meter, amount, seconds, units in settlement.rates:
                if amount > 0 and seconds > 0:  # else not a limit (a spool file damaged by hand)
                    move = (settlement.live, settlement.customer, meter, amount, seconds)
                    moves[move] = moves.get(move, 0) + units
    return moves


def moved_tat(tat: float | None, now: float, amount: int, seconds: int, units: int) -> float:
    """A meter rate limit's TAT (ms; None: no key) moved by ``units`` at ``now``: from where the bucket
    stands (a TAT in the past is a full bucket), never below ``now`` (nothing is given back beyond a full
    bucket) nor more than one period ahead (a debt is at most one period: admit.lua clamps beyond it)."""
    period_ms = seconds * 1000
    start = now if tat is None or tat != tat else min(max(tat, now), now + period_ms)
    return min(max(start + units * period_ms / amount, now), now + period_ms)


@functools.cache
def quota_name(meter: str) -> str:
    """Name of a period-quota policy in the ``RateLimit`` headers."""
    return f"quota-{meter}"


def call_units(meter: Meter, weight: int) -> int:
    """Units a call of ``weight`` adds to a ``call`` meter: its weight if summed, one if counted."""
    return weight if meter.aggregation == "sum" else 1


def holds_anything(request: AdmitRequest, reserved_credits: int) -> bool:
    """Whether an admitted call opens a reservation (only calls that hold units or credits do)."""
    return reserved_credits > 0 or any(hold.hold for hold in request.holds)


#: What a call's settlement charges of each held meter: ``(meter, units, price, included)``.
SettledMeters = tuple[tuple[str, int, int, int], ...]


def settled_meters(holds: tuple[MeterHold, ...], units: Mapping[str, int | str]) -> SettledMeters:
    """What a call's settlement charges of each held meter: ``(meter, units, price, included)``.

    ``units`` as the event holds them; with dimensions, :func:`priced_holds` first."""
    return tuple([(hold.meter, int(units.get(hold.meter, 0)), hold.price, hold.included) for hold in holds])


def priced_holds(holds: tuple[MeterHold, ...], units: Mapping[str, int | str]) -> dict[str, int]:
    """The units of each held meter, filter of dimension values and remainder (:func:`priced_units`)."""
    return hold_pricing(holds).units(units)


def hold_pricing(holds: tuple[MeterHold, ...]) -> Pricing:
    """The :class:`~meterware.dimensions.Pricing` of what ``holds`` hold (remembered by the holds'
    identity: a call's holds are made once per plan and period, ``RequestCore.call_terms``)."""
    known = _pricings.get(id(holds))
    if known is None or known[0] is not holds:
        if len(_pricings) >= PRICINGS_KEPT:
            _pricings.clear()  # holds are made once per plan and period: a full table holds old ones
        # The holds are kept with their id, so the id names them while the entry lives.
        known = _pricings[id(holds)] = (holds, pricing(frozenset(hold.meter for hold in holds)))
    return known[1]


#: The holds whose :class:`~meterware.dimensions.Pricing` is remembered (a plain dict: read per call).
PRICINGS_KEPT: Final = 10_000
_pricings: dict[int, tuple[tuple[MeterHold, ...], Pricing]] = {}


def holds_full_price(request: AdmitRequest, reserved_credits: int, calls: int) -> bool:
    """Whether ``calls`` calls like ``request`` use exactly what they hold: every meter counts calls (a
    call's units are its hold: not a concurrency slot, which uses none) and ``reserved_credits`` is their
    whole price (nothing if not charged)."""
    if not all(hold.exact and hold.meter != CONCURRENCY_METER for hold in request.holds):
        return False
    price = sum(hold.hold * hold.price for hold in request.holds) if request.charges_credits else 0
    return reserved_credits == calls * price
