"""A metered call in flight, and what the plan holds of calls like it."""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from meterware.config import Plan
from meterware.metering.admission import AdmitRequest, Decision, MeterHold, ScopedLimit, scoped_limits
from meterware.metering.cache import LRUCache
from meterware.metering.leases import Lease
from meterware.metering.records import KeyInfo
from meterware.usage import CallUsage

#: The route of a call whose route template the framework never told (refused calls, unmatched paths).


@dataclass(slots=True, weakref_slot=True)  # weakly held by the calls in flight (metering/inflight.py)
class Call:
    """One metered call in flight: what the adapters record as the response goes out."""

    key: KeyInfo
    request: AdmitRequest
    decision: Decision
    method: str
    path: str
    started_ns: int
    usage: CallUsage
    status: int = 0
    ttfb_ns: int = 0
    response_bytes: int = 0
    request_bytes: int = 0
    #: Usage headers of the response, by meter (None until the response starts).
    header_units: dict[str, str] | None = None
    #: The route template, where the framework tells it before the call ends.
    route: str | None = None
    finished: bool = False
    #: When the middleware received the call (before the key lookup and admission); 0 if unknown.
    arrived_ns: int = 0
    #: The lease that admitted the call (``admission = "lease"``), or None when the backend did.
    lease: Lease | None = None
    #: Whether the response started while the client was there (a client that leaves later was served).
    responded: bool = False
    #: When the last chunk of the response went out, if the call ends later (its background tasks run).
    ended_ns: int = 0
    #: When its reservation's deadline was last pushed forward (``metering/inflight.py``), 0: never.
    renewed_ns: int = 0


@dataclass(frozen=True, slots=True)
class CallTerms:
    """What a plan holds of a call on one route weight, in one billing period (cached per process)."""

    plan: Plan
    holds: tuple[MeterHold, ...]
    period_start: int
    period_end: int
    #: When these terms stop holding: the period's end, or sooner the next version of the customer's terms.
    until: float
    #: The rate limits of the route (``[plans.X.routes]``), scoped to it.
    scoped_limits: tuple[ScopedLimit, ...] = ()
    #: The plan's spend cap for these calls (micro-credits; -1: none, or a test key's).
    spend_cap: int = -1


def header_map(headers: Iterable[tuple[bytes, bytes]], wanted: Mapping[bytes, str]) -> dict[str, str]:
    """Values of the usage headers among ``headers``, by meter name."""
    found: dict[str, str] = {}
    for name, value in headers:
        meter = wanted.get(name.lower())
        if meter is not None:
            found[meter] = value.decode("latin-1")
    return found


def route_limits(plan: Plan, route: int) -> tuple[ScopedLimit, ...]:
    """The rate limits of ``plan.route_limits[route]``, scoped to its glob (a stable name, bounded by the
    config: never the raw path)."""
    glob, limits = plan.route_limits[route]
    return scoped_limits(limits, f"r{zlib.crc32(glob.encode()):08x}", "route")


def spend_cap_of(key: KeyInfo, plan: Plan) -> int:
    """The spend cap of ``key``'s customer in micro-credits (the customer's own, else the plan's), or -1:
    none, or a test key (the sandbox is never charged)."""
    cap = key.customer.spend_cap
    if cap is None:
        cap = plan.spend_cap
    return -1 if cap is None or not key.live else cap


def plan_spend_cap(plan: Plan, live: bool) -> int:
    """The plan's spend cap for live or test calls (-1: none)."""
    return -1 if plan.spend_cap is None or not live else plan.spend_cap


class ScopedLimits:
    """The rate limits of a call's route and key, made once per key and route (the same object each
    time: leases are keyed by it)."""

    def __init__(self, size: int) -> None:
        self._made: LRUCache[tuple[object, ...], tuple[tuple[ScopedLimit, ...], ...]] = LRUCache(size)

    def of(self, key: KeyInfo, terms: CallTerms) -> tuple[ScopedLimit, ...]:
        if not key.rate_limits:
            return terms.scoped_limits
        cache_key = (key.key_id, key.rate_limits, id(terms.scoped_limits))
        found = self._made.get(cache_key)
        if found is None or found[0] is not terms.scoped_limits:
            own = scoped_limits(key.rate_limits, f"k{key.key_id}", "key")
            found = (terms.scoped_limits, terms.scoped_limits + own)
            self._made.put(cache_key, found)
        return found[1]
