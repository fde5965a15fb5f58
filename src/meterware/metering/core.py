"""The sans-I/O request core: every step of a call before the app, none of the backend calls.

Each step returns what comes next: a :class:`~meterware.metering.keycache.NeedsLookup` (the backend must
resolve the key), an :class:`~meterware.metering.admission.AdmitRequest` (the backend must admit the call),
or the answer: the :class:`~meterware.metering.calls.Call` to serve, or the
:class:`~meterware.metering.responses.Problem` to refuse it with. The drivers
(:mod:`meterware.metering.drivers`) make the backend calls, with or without ``await``, and hand the
results back here.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from typing import Any, Final, TypeAlias

from meterware import keys
from meterware.config import UNMATCHED_ROUTE, Config, format_credits
from meterware.config._overrides import in_force, load_versions, plan_with
from meterware.errors import StorageError
from meterware.metering.admission import AdmitRequest, Decision, ScopedLimit, meter_holds
from meterware.metering.cache import LRUCache
from meterware.metering.calls import (
    Call,
    CallTerms,
    ScopedLimits,
    plan_spend_cap,
    route_limits,
    spend_cap_of,
)
from meterware.metering.keycache import KeyCache, NeedsCustomer, NeedsLookup
from meterware.metering.leases import Lease, LeaseTable, lease_block, lease_key
from meterware.metering.logs import OUTAGE_WARNING_SECONDS, ThrottledWarning
from meterware.metering.measure import Measurer
from meterware.metering.periods import period_bounds
from meterware.metering.records import KeyInfo
from meterware.metering.responses import Problem, limit_headers, problem
from meterware.metering.unsettled import Unsettled
from meterware.metrics import NO_PLAN, AppMetrics
from meterware.storage._keyspace import shard_of
from meterware.usage import CallUsage

#: What a call served without the backend (fail-open) gets instead of an admission decision.
FAIL_OPEN: Final = Decision(allowed=True)
#: The decision when the backend failed and the policy fails closed.
BACKEND_DOWN: Final = Decision(allowed=False, reason="backend_unavailable", retry_after=1)
#: The decision for a test key on a live-only route (made without the backend).
LIVE_ONLY: Final = Decision(allowed=False, reason="test_key_not_allowed")
#: Plan terms remembered per process (by plan, anchor, route weight, and live or test).
TERMS_MAX_ENTRIES: Final = 100_000

#: Finds the presented key in the framework's request object (instead of the configured headers).
KeyGetter = Callable[[Any], "str | None"]
#: The customer an app authenticated itself (JWT, session) from the framework's request object, or None
#: (the call then needs a key as usual).
CustomerGetter = Callable[[Any], "str | None"]


#: A call's terms are cached by plan, anchor, route weight, live, own terms, route, stored plans' generation.
TermsKey: TypeAlias = tuple[str, int, int, bool, str, int, int]


class RequestCore:
    """The decisions of the request path, for one middleware instance.

    A call goes :meth:`identify` -> (lookup: :meth:`key_resolved`) -> :meth:`admission` -> (a lease to
    renew: :meth:`lease_block`, :meth:`granted`) -> (admission: :meth:`admitted`); the response's headers
    come from :meth:`response_headers`, and the finished call goes to :attr:`measurer`.
    """

    def __init__(
        self,
        config: Config,
        metrics: AppMetrics,
        measurer: Measurer,
        unsettled: Unsettled,
        release_later: Callable[[AdmitRequest, StorageError], None],
        key_getter: KeyGetter | None = None,
        customer_getter: CustomerGetter | None = None,
    ) -> None:
        self.config = config
        self.routes = config.routes
        self.policy = config.policy
        self.metrics = metrics
        self.measurer = measurer
        self.leases: LeaseTable = measurer.leases
        self.unsettled = unsettled
        self.release_later = release_later  # closes a reservation with the next flush
        self.key_getter = key_getter
        self.customer_getter = customer_getter
        self.leasing = config.policy.admission == "lease"
        self._outage = ThrottledWarning(OUTAGE_WARNING_SECONDS)
        self._bad_values = ThrottledWarning(OUTAGE_WARNING_SECONDS)
        self.keys = KeyCache(self.policy, self._outage)
        self._terms: LRUCache[TermsKey, CallTerms] = LRUCache(TERMS_MAX_ENTRIES)
        self.scoped_limits = ScopedLimits(TERMS_MAX_ENTRIES)
        self._routed = any(plan.route_limits for plan in config.plans.values())
        self._reservation_timeout_ms = int(self.policy.reservation_timeout * 1000)
        self._balance_header = self.policy.balance_header.lower().encode("latin-1")

    # -- the key ---------------------------------------------------------------------------------------

    def identify(
        self, native_request: Any, headers: Iterable[tuple[bytes, bytes]], query: bytes
    ) -> KeyInfo | NeedsLookup | NeedsCustomer | Problem:
        """The presented key (by the user's getter, or from the configured headers and query): its cached
        resolution, its hash to look up, or a refusal. A customer the app authenticated itself
        (``customer_getter``) comes first, as a key without a key id."""
        if self.customer_getter is not None:
            customer_id = self.customer_getter(native_request)
            if customer_id is not None:
                return self.keys.lookup_customer(customer_id)
        if self.key_getter is not None:
            presented = self.key_getter(native_request)
        else:
            presented = keys.key_from_headers(headers, query, self.policy.key_headers, self.policy.key_query)
        return self.keys.lookup(presented)

    def key_resolved(self, key_hash: str, found: KeyInfo | StorageError | None) -> KeyInfo | Problem:
        """What the backend's lookup of a key hash (or its failure) makes of the key."""
        if isinstance(found, StorageError):
            self.metrics.resolve_errors.inc()
            return self.keys.lookup_failed(found, key_hash)
        return self.keys.resolved(key_hash, found)

    # -- admission -------------------------------------------------------------------------------------

    def admission(
        self, key: KeyInfo | Problem, method: str, path: str, arrived: int
    ) -> Call | Problem | AdmitRequest:
        """Everything before the backend's admission: the answer when none is needed (a refused key, a
        test key on a live-only route, a call a lease serves), or the admission to ask for."""
        if isinstance(key, Problem):
            return self.refused(key, method, NO_PLAN, arrived)
        terms = self.call_terms(key, path, time.time())
        if not key.live and self.routes.is_live_only(path):
            return self.started(key, self.admit_request(key, terms), LIVE_ONLY, method, path, arrived)
        if (
            self.leasing
            and key.key_id
            and not key.counts_uses
            and (
                lease := self.leases.take(
                    lease_key(key.key_id, terms.holds, terms.period_start, self.scoped_limits.of(key, terms))
                )
            )
        ):
            return self.leased_call(lease, key, method, path, arrived)
        return self.admit_request(key, terms)

    def call_terms(self, key: KeyInfo, path: str, now: float) -> CallTerms:
        """What the customer's terms (its plan, and its own overrides in force at ``now``) hold of a call
        by ``key`` to ``path``, in the billing period of ``now`` (cached until the period or terms change)."""
        customer = key.customer
        weight = self.routes.weight(path) if self.routes.weights else 1
        # Only plans with route limits match the path; the key: the customer's own terms, the stored plans'.
        kept = self.config.stored  # its generation changes with a stored plan: the terms are read anew
        route = self.config.plan(customer.plan).route_of(path) if self._routed or kept.routed else -1
        cache_key = (customer.plan, customer.anchor, weight, key.live, customer.terms, route, kept.generation)
        previous = terms = self._terms.get(cache_key)
        if terms is None or not terms.period_start <= now < terms.until:
            plan = self.config.plan(customer.plan)
            start, end = period_bounds(customer.anchor, plan.period, now)
            until: float = end
            if customer.terms:
                version, following = in_force(load_versions(customer.terms), now)
                plan, until = plan_with(plan, version, self.config.meters), min(end, following)
            holds = meter_holds(plan, self.config.meters, weight, key.live)
            scoped: tuple[ScopedLimit, ...] = ()
            if previous is not None and previous.holds == holds:
                holds = previous.holds  # the same object: leases are keyed by it
                scoped = previous.scoped_limits
            elif route >= 0:
                scoped = route_limits(plan, route)
            terms = CallTerms(plan, holds, start, end, until, scoped, plan_spend_cap(plan, key.live))
            self._terms.put(cache_key, terms)
        return terms

    def admit_request(self, key: KeyInfo, terms: CallTerms) -> AdmitRequest:
        """What the backend must check and reserve for a call by ``key`` on ``terms``."""
        customer = key.customer.id
        return AdmitRequest(
            shard=shard_of(customer, self.config.shards),
            customer=customer,
            key_id=key.key_id,
            live=key.live,
            plan=terms.plan,
            period_start=terms.period_start,
            period_end=terms.period_end,
            holds=terms.holds,
            # Unique, not secret (it names a reservation): a fast random, reseeded in forked children.
            reservation_id=f"{random.getrandbits(64):016x}",
            reservation_timeout_ms=self._reservation_timeout_ms,
            unsettled=self.unsettled if terms.holds else None,
            # Leases are a key's: a customer without one (customer_getter) is admitted call by call; so is
            # a call under a concurrency cap (a lease's calls would hold their slots until it ends).
            one_by_one=key.counts_uses or not key.key_id or terms.plan.concurrency > 0,
            scoped_limits=self.scoped_limits.of(key, terms) if key.rate_limits else terms.scoped_limits,
            spend_cap=terms.spend_cap if key.customer.spend_cap is None else spend_cap_of(key, terms.plan),
        )

    def admitted(
        self,
        key: KeyInfo,
        request: AdmitRequest,
        answer: Decision | Lease | StorageError,
        method: str,
        path: str,
        arrived: int,
    ) -> Call | Problem:
        """The call the backend's answer (a decision, a lease renewed for it, or a failure) makes."""
        if isinstance(answer, Lease):
            return self.leased_call(answer, key, method, path, arrived)
        if isinstance(answer, StorageError):
            answer = self.admit_failed(answer, request)
        return self.started(key, request, answer, method, path, arrived)

    def admit_failed(self, error: StorageError, request: AdmitRequest) -> Decision:
        """Apply the failure policy: serve without the backend (fail open) or refuse with 503.

        A refusal of the backend (a key of the wrong type, a counter that is not an integer) is about this
        customer's stored values, and lasts until they are repaired: failing open would serve the customer
        free all that time, so their calls are refused (503) whatever the policy. Any other failure may
        have come after the admission ran and held units, credits or a concurrency slot: its reservation
        is closed with the next flush, not left for ``reservation_timeout`` (a cap would refuse meanwhile).
        """
        self.release_later(request, error)
        if error.refused:
            self._bad_values.warn("admission refused (%s); refusing the customer until repaired", error)
            return BACKEND_DOWN
        self._outage.warn("admission failed (%s); failing %s", error, self.policy.on_backend_error)
        if self.policy.on_backend_error == "open":
            return FAIL_OPEN
        return BACKEND_DOWN

    # -- leases (admission = "lease") ------------------------------------------------------------------

    def lease_block(self, request: AdmitRequest) -> AdmitRequest | None:
        """A new lease's admission for calls like ``request``; None: not leasing, or no lease can serve it."""
        return lease_block(request, self.policy) if self.leasing else None

    def granted(
        self, request: AdmitRequest, block: AdmitRequest, answer: Decision | StorageError, *, take: bool
    ) -> Lease | Decision | None:
        """The lease the backend granted (``take``: with this call taken from it); or the refusal of this
        call (not even one call fit: the backend decided it exactly as if it had come alone), or the
        failure policy's answer. ``take=False`` (a renewal ahead of need): None on a failure, left to the
        next call."""
        if isinstance(answer, StorageError):
            decision = self.admit_failed(answer, block)
            return decision if take else None
        if not answer.allowed:
            return answer
        headers = decision_headers(answer, self._balance_header)
        return self.leases.grant(request, block, answer, headers, take=take)

    def leased_call(self, lease: Lease, key: KeyInfo, method: str, path: str, arrived: int) -> Call:
        return Call(
            key,
            lease.call_request,
            lease.decision,
            method,
            path,
            time.perf_counter_ns(),
            CallUsage(self.config.meters, key=key),
            arrived_ns=arrived,
            lease=lease,
        )

    # -- the answer ------------------------------------------------------------------------------------

    def decide(
        self, key: KeyInfo, request: AdmitRequest, decision: Decision, method: str, path: str
    ) -> Call | Problem:
        """Start an admitted call, or answer a refused one (recorded as a rejected event when the customer
        is known and entitled to see it in their usage)."""
        if decision.allowed:
            return Call(
                key,
                request,
                decision,
                method,
                path,
                time.perf_counter_ns(),
                CallUsage(self.config.meters, key=key),
            )
        assert decision.reason is not None
        refusal = problem(decision.reason, decision)
        if decision.reason not in ("unknown_key", "revoked_key", "expired_key", "unknown_customer"):
            self.measurer.reject(key, request, decision.reason, refusal.status, method, path)
        return refusal

    def started(
        self, key: KeyInfo, request: AdmitRequest, decision: Decision, method: str, path: str, arrived: int
    ) -> Call | Problem:
        call = self.decide(key, request, decision, method, path)
        if isinstance(call, Problem):
            return self.refused(call, method, request.plan.name, arrived)
        call.arrived_ns = arrived
        return call

    def refused(self, refusal: Problem, method: str, plan: str, arrived: int) -> Problem:
        # A refused call never reaches the app's router: its route template is unknown.
        seconds = (time.perf_counter_ns() - arrived) / 1e9
        self.metrics.refused(refusal.reason, method, plan, UNMATCHED_ROUTE, seconds)
        return refusal

    def response_headers(self, call: Call) -> list[tuple[bytes, bytes]]:
        """Headers added to an admitted call's response (a lease's calls share the lease's)."""
        if call.lease is not None:
            return call.lease.headers
        return decision_headers(call.decision, self._balance_header)


def decision_headers(decision: Decision, balance_header: bytes) -> list[tuple[bytes, bytes]]:
    """The ``RateLimit`` headers of a decision and, on prepaid plans, the credits left (``balance_header``,
    b"" for none)."""
    headers = limit_headers(decision.limits)
    if balance_header and decision.available_credits is not None:
        headers.append((balance_header, format_credits(decision.available_credits).encode()))
    return headers
