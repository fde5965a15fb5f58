"""The request path shared by every adapter: what happens before and after the app, minus the I/O.

An adapter (ASGI, WSGI, Django) translates its request into calls on :class:`Metering` and performs the two
backend calls itself (``resolve_key`` and ``admit``, with or without ``await``). Everything else - key
extraction and caching, admission requests, failure policy, outcome classification, the event and its
settlement - is decided here, once.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final

from meterware import keys
from meterware._cache import LRUCache
from meterware._core import (
    CLIENT_CLOSED_REQUEST,
    AdmitRequest,
    Decision,
    KeyInfo,
    MeterHold,
    Problem,
    Reason,
    call_units,
    classify,
    is_billable,
    limit_headers,
    meter_holds,
    period_bounds,
    problem,
)
from meterware._unsettled import CallChange
from meterware.config import MAX_CALL_COST, Config, Plan, format_credits
from meterware.errors import StorageError
from meterware.events import (
    SCHEMA_VERSION,
    Outcome,
    UsageEvent,
    bounded_method,
    bounded_route,
    event_row,
    new_event_id,
)
from meterware.flusher import Pending, Pipeline
from meterware.metrics import NO_PLAN, AppMetrics, UnitCounts, unit_counts
from meterware.storage import open_async_storage, open_storage
from meterware.storage._keyspace import shard_of
from meterware.storage.base import AsyncStorage, Batch, Settlement, Storage
from meterware.usage import CallUsage

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

logger = logging.getLogger("meterware")

#: Unknown keys are remembered for a shorter time than known ones, so a new key works almost at once.
NEGATIVE_CACHE_SECONDS: Final = 1.0
KEY_CACHE_MAX_ENTRIES: Final = 100_000
#: Unknown key hashes remembered at most (apart from known keys: no number of them evicts a known key).
UNKNOWN_KEY_CACHE_MAX_ENTRIES: Final = 10_000
UNMATCHED_ROUTE: Final = "<unmatched>"
#: What a call served without the backend (fail-open) gets instead of an admission decision.
FAIL_OPEN: Final = Decision(allowed=True)
#: The decision when the backend failed and the policy fails closed.
BACKEND_DOWN: Final = Decision(allowed=False, reason="backend_unavailable", retry_after=1)
#: The decision for a test key on a live-only route (made without the backend).
LIVE_ONLY: Final = Decision(allowed=False, reason="test_key_not_allowed")

#: During an outage every call fails the same way: say so at most once in this many seconds.
OUTAGE_WARNING_SECONDS: Final = 10.0
#: A bad usage header is the app's doing and repeats on every call: warn of each meter's at most this often.
BAD_USAGE_HEADER_WARNING_SECONDS: Final = 60.0

KeyGetter = Callable[[Any], "str | None"]


class ThrottledWarning:
    """A warning logged at most once per interval, with the count of the ones held back."""

    def __init__(self, interval: float, what: str = "backend failed: ") -> None:
        self.interval = interval
        self.what = what
        self._next = 0.0
        self._held = 0

    def warn(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self._held += 1
            return
        held, self._held, self._next = self._held, 0, now + self.interval
        suffix = f" ({held} more like it held back)" if held else ""
        logger.warning("meterware: " + self.what + message + suffix, *args)


@dataclass(slots=True)
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


@dataclass(frozen=True, slots=True)
class CallTerms:
    """What a plan holds of a call on one route weight, in one billing period (cached per process)."""

    plan: Plan
    holds: tuple[MeterHold, ...]
    period_start: int
    period_end: int


#: Leases remembered per process; past this, idle ones are forgotten (the worker refunds their holds).
LEASE_TABLE_MAX: Final = 10_000
#: A lease's reservation outlives its serving time by this much before the worker refunds it.
LEASE_RESERVATION_GRACE_SECONDS: Final = 30.0

#: The key id, the holds' identity (plan terms, route weight, live or test; the holds are kept alive by
#: the leases listed under it) and the billing period.
LeaseKey = tuple[str, int, int]


@dataclass(slots=True)
class Lease:
    """Calls of one key (at one route weight, in one period) reserved as a block by one admission.

    The block's reservation holds every call of the lease, so no hard quota or balance is ever passed;
    each call is settled on its own, charged from scratch, and the block's reservation is closed by the
    settlement of the lease's last call, or by the flusher once the lease is spent and its calls are
    written (when its last call finished before the lease ran out of time).
    """

    #: The block's admission (``calls`` calls) and its reservation.
    block: AdmitRequest
    #: What one call of the lease is (how its settlement is priced).
    call_request: AdmitRequest
    decision: Decision
    headers: list[tuple[bytes, bytes]]
    left: int
    #: ``time.monotonic()`` after which the lease serves no more calls.
    until: float
    in_flight: int = 0
    #: Whether a call's settlement has been given the block's reservation to close.
    released: bool = False
    #: Whether the next lease is being fetched ahead of need.
    renewing: bool = False
    #: Whether its calls take their share out of the block as they settle: only when every meter a call
    #: holds counts calls, so a call's units are its own hold. (A value meter's call may use more than
    #: its hold: it would take what the block holds for the calls still running.)
    captures: bool = False
    #: The settlement most of its calls share (when it ``captures``).
    capture: Settlement | None = None
    #: What the block's reservation still holds, as its calls' settlements will leave it: credits, and
    #: units per hold (what closing it releases).
    credits_left: int = 0
    held_left: list[int] = field(default_factory=list)

    def releases(
        self, settlement: Settlement, settled: SettledMeters, billable: bool
    ) -> tuple[int, list[int]]:
        """What one call's settlement releases of the block, as the flush will (under the lease lock):
        what is left when it closes the block; a capture's units and cost, at most what is left."""
        if settlement.reservation_id != self.block.reservation_id or not (settlement.closes or billable):
            return 0, [0] * len(self.held_left)
        if settlement.closes:
            released, freed = self.credits_left, self.held_left
        else:
            freed = [min(units, left) for (_, units, _, _), left in zip(settled, self.held_left, strict=True)]
            released = min(sum(units * price for _, units, price, _ in settled), self.credits_left)
        self.credits_left -= released
        self.held_left = [left - free for left, free in zip(self.held_left, freed, strict=True)]
        return released, freed


class Metering:
    """The per-process state and decisions behind one middleware instance.

    ``registry``: the prometheus-client registry of its metrics (the global ``REGISTRY`` by default).
    """

    def __init__(
        self,
        config: Config,
        *,
        key_getter: KeyGetter | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        self.routes = config.routes
        self.policy = config.policy
        self.key_getter = key_getter
        self.metrics = AppMetrics.for_registry(registry)
        #: Meters whose units add up: the ones counted in ``meterware_units_total``.
        self._additive = frozenset(name for name, meter in config.meters.items() if meter.chargeable)
        #: Whether every meter counts calls (a call's units then follow from its holds alone).
        self._calls_only = all(meter.source == "call" for meter in config.meters.values())
        #: By the holds' identity and the route weight: the holds, the units and what a settlement charges.
        self._measured: dict[tuple[int, int], Measured] = {}
        self.pipeline = Pipeline(
            config.pipeline,
            on_flushed=self._rollup_in_process if self.embedded else None,
            metrics=self.metrics,
        )
        self.usage_headers = {
            meter.header.encode("latin-1"): name for name, meter in config.meters.items() if meter.header
        }
        #: Known keys by hash: until when the resolution is fresh, and the key (kept past that for outages).
        self._keys: LRUCache[str, tuple[float, KeyInfo]] = LRUCache(KEY_CACHE_MAX_ENTRIES)
        #: Unknown key hashes: until when they are refused without a lookup.
        self._unknown: LRUCache[str, float] = LRUCache(UNKNOWN_KEY_CACHE_MAX_ENTRIES)
        #: Presented keys already hashed (a key's calls skip the SHA-256 and the shape check).
        self._hashes: LRUCache[str, str] = LRUCache(KEY_CACHE_MAX_ENTRIES)
        self._terms: dict[tuple[str, int, int, bool], CallTerms] = {}
        self._shards: dict[str, int] = {}
        self._reservation_timeout_ms = int(self.policy.reservation_timeout * 1000)
        self._balance_header = self.policy.balance_header.lower().encode("latin-1")
        self._exit_hook = False
        self._rollup_lock = threading.Lock()
        self._rollup: Any = None
        self._next_full_rollup = 0.0
        self._outage = ThrottledWarning(OUTAGE_WARNING_SECONDS)
        self._bad_values = ThrottledWarning(OUTAGE_WARNING_SECONDS)
        self._bad_usage_headers = {
            meter: ThrottledWarning(BAD_USAGE_HEADER_WARNING_SECONDS, "")
            for meter in self.usage_headers.values()
        }
        self._reject_late_units = self.metrics.units_rejected.inc
        self.leasing = config.policy.admission == "lease"
        #: Spent leases' blocks being closed by the flusher: what closing each releases.
        self._closing_blocks: dict[str, CallChange] = {}
        if self.leasing:
            self.pipeline.spent_leases = self.spent_leases
            self.pipeline.released = self._blocks_closed
        #: The leases of each key, oldest first (two while the next one is fetched ahead of need).
        self._leases: dict[LeaseKey, list[Lease]] = {}
        self._renewing_ahead: set[asyncio.Task[Lease | Decision | None]] = set()
        self._lease_lock = threading.Lock()  # threaded servers share leases
        self._renewing = threading.Lock()  # one renewal at a time in a threaded server
        self._renewals: dict[LeaseKey, asyncio.Future[None]] = {}
        self._resolving: dict[str, asyncio.Future[KeyInfo | Problem]] = {}

    def backend(self, *, flushing: bool = False) -> Storage:
        """A synchronous backend client: short timeouts for the request path, longer ones for flushing."""
        config = self.config
        timeout = config.pipeline.flush_timeout if flushing else config.policy.timeout
        return open_storage(config.storage, shards=config.shards, timeout=timeout)

    def async_backend(self, *, flushing: bool = False) -> AsyncStorage:
        """The asyncio twin of :meth:`backend` (no I/O until its first call)."""
        config = self.config
        timeout = config.pipeline.flush_timeout if flushing else config.policy.timeout
        return open_async_storage(config.storage, shards=config.shards, timeout=timeout)

    @property
    def embedded(self) -> bool:
        """Whether the backend is the in-process ``memory://`` store (the rollup then runs in-process)."""
        return self.config.storage.startswith("memory://")

    # -- before the app -----------------------------------------------------------------------------

    def start(
        self,
        storage: Storage,
        native_request: Any,
        headers: Iterable[tuple[bytes, bytes]],
        query: bytes,
        method: str,
        path: str,
    ) -> Call | Problem:
        """Identify and admit a call with a synchronous backend: the call to serve, or the refusal.

        The adapters' one entry point before the app; the backend calls are timed here, once.
        """
        arrived = time.perf_counter_ns()
        key = self.identify(native_request, headers, query)
        if isinstance(key, str):
            key = self._resolve(storage, key)
        request = self._before_admission(key, method, path, arrived)
        if not isinstance(request, AdmitRequest):
            return request
        assert isinstance(key, KeyInfo)
        if self.leasing and (renewed := self._renew(storage, request)) is not None:
            return self._renewed(key, request, renewed, method, path, arrived)
        began = time.perf_counter()
        try:
            decision = storage.admit(request)
        except StorageError as error:
            self.metrics.admit_errors.inc()
            decision = self.admit_failed(error)
        self.metrics.admit_duration.observe(time.perf_counter() - began)
        return self._started(key, request, decision, method, path, arrived)

    def astart(
        self,
        storage: AsyncStorage,
        native_request: Any,
        headers: Iterable[tuple[bytes, bytes]],
        query: bytes,
        method: str,
        path: str,
    ) -> Call | Problem | Coroutine[Any, Any, Call | Problem]:
        """The asyncio twin of :meth:`start`: the answer when no backend call is needed (a cached key,
        then a lease or a refusal), else a coroutine to await for it (most calls of a busy process need
        none, and skip a coroutine's cost)."""
        arrived = time.perf_counter_ns()
        key = self.identify(native_request, headers, query)
        if isinstance(key, str):
            return self._aresolve_and_admit(storage, key, method, path, arrived)
        return self._admit_known(storage, key, method, path, arrived)

    def _admit_known(
        self, storage: AsyncStorage, key: KeyInfo | Problem, method: str, path: str, arrived: int
    ) -> Call | Problem | Coroutine[Any, Any, Call | Problem]:
        """:meth:`astart` once the key is known."""
        request = self._before_admission(key, method, path, arrived)
        if isinstance(request, AdmitRequest):
            assert isinstance(key, KeyInfo)
            return self._aadmit(storage, key, request, method, path, arrived)
        return self._renewing_if_due(storage, request)

    async def _aresolve_and_admit(
        self, storage: AsyncStorage, key_hash: str, method: str, path: str, arrived: int
    ) -> Call | Problem:
        started = self._admit_known(storage, await self._aresolve(storage, key_hash), method, path, arrived)
        return started if isinstance(started, Call | Problem) else await started

    async def _aadmit(
        self, storage: AsyncStorage, key: KeyInfo, request: AdmitRequest, method: str, path: str, arrived: int
    ) -> Call | Problem:
        if self.leasing and (renewed := await self._arenew(storage, request)) is not None:
            return self._renewed(key, request, renewed, method, path, arrived)
        began = time.perf_counter()
        try:
            decision = await storage.admit(request)
        except StorageError as error:
            self.metrics.admit_errors.inc()
            decision = self.admit_failed(error)
        self.metrics.admit_duration.observe(time.perf_counter() - began)
        return self._started(key, request, decision, method, path, arrived)

    def _before_admission(
        self, key: KeyInfo | Problem, method: str, path: str, arrived: int
    ) -> Call | Problem | AdmitRequest:
        """Everything before the backend's admission: the answer when none is needed (a refused key, a
        test key on a live-only route, a call a lease serves), or the admission to ask for."""
        if isinstance(key, Problem):
            return self._refused(key, method, NO_PLAN, arrived)
        terms = self.call_terms(key, path, time.time())
        if not key.live and self.routes.is_live_only(path):
            return self._started(key, self.admit_request(key, terms), LIVE_ONLY, method, path, arrived)
        if self.leasing and (lease := self._take(lease_key(key.key_id, terms))):
            return self._leased_call(lease, key, method, path, arrived)
        return self.admit_request(key, terms)

    def _renewed(
        self,
        key: KeyInfo,
        request: AdmitRequest,
        renewed: Lease | Decision,
        method: str,
        path: str,
        arrived: int,
    ) -> Call | Problem:
        """A call served by the lease it renewed, or refused as the backend (or the failure policy) said."""
        if isinstance(renewed, Lease):
            return self._leased_call(renewed, key, method, path, arrived)
        return self._started(key, request, renewed, method, path, arrived)

    def _resolve(self, storage: Storage, key_hash: str) -> KeyInfo | Problem:
        """Resolve a key hash the cache does not know (timed; a failure goes to the failure policy)."""
        began = time.perf_counter()
        try:
            return self.resolved(key_hash, storage.resolve_key(key_hash))
        except StorageError as error:
            self.metrics.resolve_errors.inc()
            return self.lookup_failed(error, key_hash)
        finally:
            self.metrics.resolve_duration.observe(time.perf_counter() - began)

    # -- leases (admission = "lease") ------------------------------------------------------------

    def _renew(self, storage: Storage, request: AdmitRequest) -> Lease | Decision | None:
        """A new lease for calls like ``request`` (taking this call from it), with a synchronous backend.

        None when leases cannot serve it (the call is then admitted alone); a :class:`Decision` when the
        backend refused even this one call, or failed (the failure policy's answer).
        """
        block = self.lease_block(request)
        if block is None:
            return None
        with self._renewing:
            # Another thread may have renewed it meanwhile.
            lease = self._take(lease_key(request.key_id, request))
            if lease is not None:
                return lease
            began = time.perf_counter()
            try:
                decision = storage.admit(block)
            except StorageError as error:
                self.metrics.admit_errors.inc()
                return self.admit_failed(error)
            finally:
                self.metrics.admit_duration.observe(time.perf_counter() - began)
            return self._granted(request, block, decision, take=True)

    async def _arenew(
        self, storage: AsyncStorage, request: AdmitRequest, *, take: bool = True
    ) -> Lease | Decision | None:
        """The asyncio twin of :meth:`_renew`: calls waiting for the same lease share one renewal.

        ``take=False``: renew ahead of need (no call is waiting; a failure is left to the next call).
        """
        block = self.lease_block(request)
        if block is None:
            return None
        identity = lease_key(request.key_id, request)
        while (renewal := self._renewals.get(identity)) is not None:
            await renewal
            lease = self._take(identity) if take else None
            if lease is not None:
                return lease
        self._renewals[identity] = renewal = asyncio.get_running_loop().create_future()
        began = time.perf_counter()
        try:
            decision = await storage.admit(block)
        except StorageError as error:
            self.metrics.admit_errors.inc()
            return self.admit_failed(error) if take else None
        finally:
            self.metrics.admit_duration.observe(time.perf_counter() - began)
            del self._renewals[identity]
            renewal.set_result(None)
        return self._granted(request, block, decision, take=take)

    def _renewing_if_due(self, storage: AsyncStorage, answer: Call | Problem) -> Call | Problem:
        """``answer``, once the next lease is being fetched if the call took half of its lease."""
        lease = answer.lease if isinstance(answer, Call) else None
        if lease is not None and not lease.renewing and lease.left <= lease.block.calls // 2:
            self._renew_ahead(storage, lease)
        return answer

    def _renew_ahead(self, storage: AsyncStorage, lease: Lease) -> None:
        """Once half of a lease is used, fetch the next one in the background: calls then never wait for
        a renewal while traffic flows."""
        lease.renewing = True
        request = replace(lease.call_request, reservation_id=f"{random.getrandbits(64):016x}")
        task = asyncio.get_running_loop().create_task(self._arenew(storage, request, take=False))
        self._renewing_ahead.add(task)
        task.add_done_callback(self._renewing_ahead.discard)

    def lease_block(self, request: AdmitRequest) -> AdmitRequest | None:
        """The admission of a lease for calls like ``request``: up to ``lease_calls`` of them at once
        (the backend grants as many as fit, fewer near a limit).

        None when a lease would hold too little to be worth it (a rate limit allows so few calls that a
        block would take a large share of it), or cannot bound what its calls use: a value meter that is
        priced or under a hard quota is admitted call by call, each counting the calls finished before.
        """
        if any(not hold.exact and (hold.price or hold.quota >= 0) for hold in request.holds):
            return None
        calls = self.policy.lease_calls
        for limit in request.plan.rate_limits:
            calls = min(calls, limit.amount // 4)
        if calls < 2:
            return None
        deadline = self.policy.lease_seconds + LEASE_RESERVATION_GRACE_SECONDS
        return replace(request, calls=calls, reservation_timeout_ms=int(deadline * 1000))

    def _granted(
        self, request: AdmitRequest, block: AdmitRequest, decision: Decision, *, take: bool
    ) -> Lease | Decision:
        """Keep the lease the backend granted (and take this call from it); or the refusal of this call
        (not even one call fit: the backend decided it exactly as if it had come alone)."""
        if not decision.allowed:
            return decision
        lease = Lease(
            block,
            request,
            decision,
            self._headers(decision),
            left=decision.calls,
            until=time.monotonic() + self.policy.lease_seconds,
            captures=captures(request, decision),
            credits_left=decision.reserved_credits,
            held_left=[hold.hold * decision.calls for hold in request.holds],
        )
        with self._lease_lock:
            if len(self._leases) >= LEASE_TABLE_MAX:
                # Forget keys whose leases are all idle (the flusher or the worker closes them).
                for identity, leases in list(self._leases.items()):
                    if not any(old.in_flight for old in leases):
                        del self._leases[identity]
            self._leases.setdefault(lease_key(request.key_id, request), []).append(lease)
            if take:
                lease.left -= 1
                lease.in_flight += 1
        return lease

    def _take(self, identity: LeaseKey) -> Lease | None:
        """Take one call from a serving lease of a key (``lease_key``), the oldest first."""
        with self._lease_lock:
            now = time.monotonic()
            for lease in self._leases.get(identity, ()):
                if lease.left > 0 and now < lease.until:
                    lease.left -= 1
                    lease.in_flight += 1
                    return lease
        return None

    def spent_leases(self, final: bool) -> list[AdmitRequest]:
        """Take (and forget) the leases that serve no more calls and have none in flight: their blocks, to
        close once everything buffered is written (``final``: every idle lease, the process is stopping)."""
        now = time.monotonic()
        spent: list[AdmitRequest] = []
        with self._lease_lock:
            for identity, leases in list(self._leases.items()):
                for lease in list(leases):
                    if lease.in_flight or not (final or lease.left <= 0 or now >= lease.until):
                        continue
                    leases.remove(lease)
                    if not lease.released:
                        lease.released = True
                        spent.append(lease.block)
                        self._closing_blocks[lease.block.reservation_id] = change = self._block_change(lease)
                        self.pipeline.unsettled.add(change)
                if not leases:
                    del self._leases[identity]
        return spent

    def _block_change(self, lease: Lease) -> CallChange:
        """What closing a spent lease's block releases (counted at admission until it is closed)."""
        block = lease.block
        meters = tuple((hold.meter, 0, held) for hold, held in zip(block.holds, lease.held_left, strict=True))
        change = (block.customer, block.live, block.period_start), lease.credits_left, meters
        lease.credits_left, lease.held_left = 0, [0] * len(lease.held_left)
        return change

    def _blocks_closed(self, blocks: list[AdmitRequest]) -> None:
        """Spent leases' blocks are closed: their releases are written."""
        self.pipeline.unsettled.discard(
            change for block in blocks if (change := self._closing_blocks.pop(block.reservation_id, None))
        )

    def _leased_call(self, lease: Lease, key: KeyInfo, method: str, path: str, arrived: int) -> Call:
        return Call(
            key,
            lease.call_request,
            lease.decision,
            method,
            path,
            time.perf_counter_ns(),
            CallUsage(self.config.meters),
            arrived_ns=arrived,
            lease=lease,
        )

    def _settlement(self, call: Call, billable: bool, settled: SettledMeters) -> Settlement:
        """How a finished call's reservation is settled.

        A call closes its own. A lease's call is charged from scratch and takes its share out of the
        lease's block (if the lease ``captures``), and the last one closes the block, once no call can
        take from it any more.
        """
        request, lease = call.request, call.lease
        if lease is None:
            reservation_id, closes = call.decision.reservation_id, True
        else:
            with self._lease_lock:
                lease.in_flight -= 1
                spent = lease.left <= 0 or time.monotonic() >= lease.until
                closing = spent and lease.in_flight == 0 and not lease.released
                lease.released |= closing
            closes = closing or not lease.captures
            reservation_id = lease.block.reservation_id if closing or lease.captures else ""
            # A capture is the same for most of the lease's calls: made once (settlements never change).
            shared = lease.capture
            if not closes and shared is not None and shared.billable is billable and shared.meters is settled:
                return shared
        settlement = Settlement(
            request.customer,
            request.live,
            request.period_start,
            reservation_id,
            billable,
            request.charges_credits,
            settled,
            closes,
        )
        if not closes:
            assert lease is not None
            lease.capture = settlement
        return settlement

    def _change(
        self, call: Call, billable: bool, settled: SettledMeters, settlement: Settlement
    ) -> CallChange | None:
        """What a finished call's settlement will change of its customer's counters once it is written:
        the units it charges, and what it releases of its reservation (its own, or its lease's block).

        None when that nets out to nothing at admission (most calls: see :func:`nets_out`), so the
        calls that do change something are the only ones carried to every admission.
        """
        request, lease = call.request, call.lease
        account = (request.customer, request.live, request.period_start)
        if lease is not None:
            with self._lease_lock:
                released, freed = lease.releases(settlement, settled, billable)
            return account, released, _meter_changes(settled, billable, freed)
        holding = bool(call.decision.reservation_id)  # else served fail-open: it only charges
        if billable and holding and nets_out(request, call.decision.reserved_credits):
            return None
        released = call.decision.reserved_credits if holding else 0
        freed = [hold.hold for hold in request.holds] if holding else [0] * len(request.holds)
        return account, released, _meter_changes(settled, billable, freed)

    async def _aresolve(self, storage: AsyncStorage, key_hash: str) -> KeyInfo | Problem:
        """Resolve a key hash the cache does not know; concurrent calls with the same key share one
        lookup (a cold cache under load would otherwise send the backend one lookup per call)."""
        pending = self._resolving.get(key_hash)
        if pending is not None:
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                # The call that was looking it up went away: look it up here.
        self._resolving[key_hash] = future = asyncio.get_running_loop().create_future()
        metrics = self.metrics
        began = time.perf_counter()
        try:
            try:
                key = self.resolved(key_hash, await storage.resolve_key(key_hash))
            except StorageError as error:
                metrics.resolve_errors.inc()
                key = self.lookup_failed(error, key_hash)
        except BaseException:
            future.cancel()
            raise
        else:
            future.set_result(key)
        finally:
            if self._resolving.get(key_hash) is future:
                del self._resolving[key_hash]
            metrics.resolve_duration.observe(time.perf_counter() - began)
        return key

    def _started(
        self, key: KeyInfo, request: AdmitRequest, decision: Decision, method: str, path: str, arrived: int
    ) -> Call | Problem:
        call = self.decide(key, request, decision, method, path)
        if isinstance(call, Problem):
            return self._refused(call, method, request.plan.name, arrived)
        call.arrived_ns = arrived
        return call

    def _refused(self, refusal: Problem, method: str, plan: str, arrived: int) -> Problem:
        # A refused call never reaches the app's router: its route template is unknown.
        seconds = (time.perf_counter_ns() - arrived) / 1e9
        self.metrics.refused(refusal.reason, method, plan, UNMATCHED_ROUTE, seconds)
        return refusal

    def _presented_key(
        self, native_request: Any, headers: Iterable[tuple[bytes, bytes]], query: bytes
    ) -> str | None:
        """The key the caller presented, by the user's getter or from the configured headers/query."""
        if self.key_getter is not None:
            return self.key_getter(native_request)
        return keys.key_from_headers(headers, query, self.policy.key_headers, self.policy.key_query)

    def identify(
        self, native_request: Any, headers: Iterable[tuple[bytes, bytes]], query: bytes
    ) -> KeyInfo | str | Problem:
        """The presented key: its cached resolution, its hash to look up, or a refusal.

        Absent and malformed keys are refused before any lookup (and without hashing a huge value).
        """
        presented = self._presented_key(native_request, headers, query)
        if not presented:
            return problem("missing_key")
        key_hash = self._hashes.get(presented)
        if key_hash is None:
            if not keys.is_well_formed(presented):
                return problem("malformed_key")
            key_hash = keys.hash_key(presented)
            self._hashes.put(presented, key_hash)
        now = time.monotonic()
        entry = self._keys.get(key_hash)
        if entry is not None and now <= entry[0]:
            return entry[1]
        unknown_until = self._unknown.get(key_hash)
        if unknown_until is not None and now <= unknown_until:
            return problem("unknown_key")
        return key_hash

    def resolved(self, key_hash: str, key: KeyInfo | None) -> KeyInfo | Problem:
        """Remember what the backend said about a key hash (briefly; unknown keys even more briefly, in a
        cache of their own, so no number of them makes this process forget a known key)."""
        now = time.monotonic()
        if key is None:
            self._keys.pop(key_hash)
            self._unknown.put(key_hash, now + min(NEGATIVE_CACHE_SECONDS, self.policy.key_cache_ttl))
            return problem("unknown_key")
        self._unknown.pop(key_hash)
        self._keys.put(key_hash, (now + self.policy.key_cache_ttl, key))
        return key

    def lookup_failed(self, error: StorageError, key_hash: str) -> KeyInfo | Problem:
        """The backend failed to resolve a key: without it an unknown key cannot be told from a known one.

        Failing open, a key this process resolved before is served as it was last resolved (its admission
        fails open too), so an outage longer than ``key_cache_ttl`` does not turn into refusals.
        """
        entry = self._keys.get(key_hash)
        if self.policy.on_backend_error == "open" and entry is not None:
            self._outage.warn("key lookup failed (%s); serving keys as last seen", error)
            return entry[1]
        self._outage.warn("key lookup failed (%s); refusing keys not seen before", error)
        return problem("backend_unavailable", Decision(allowed=False, retry_after=1))

    def call_terms(self, key: KeyInfo, path: str, now: float) -> CallTerms:
        """What the plan holds of a call by ``key`` to ``path``, in the billing period of ``now`` (cached)."""
        customer = key.customer
        weight = self.routes.weight(path) if self.routes.weights else 1
        cache_key = (customer.plan, customer.anchor, weight, key.live)
        terms = self._terms.get(cache_key)
        if terms is None or not terms.period_start <= now < terms.period_end:
            plan = self.config.plan(customer.plan)
            start, end = period_bounds(customer.anchor, plan.period, now)
            holds = meter_holds(plan, self.config.meters, weight, key.live)
            previous = self._terms.get(cache_key)
            if previous is not None and previous.holds == holds:
                holds = previous.holds  # the same object: leases are keyed by it
            if len(self._terms) >= KEY_CACHE_MAX_ENTRIES:
                self._terms.clear()
            terms = self._terms[cache_key] = CallTerms(plan, holds, start, end)
        return terms

    def admit_request(self, key: KeyInfo, terms: CallTerms) -> AdmitRequest:
        """What the backend must check and reserve for a call by ``key`` on ``terms``."""
        customer = key.customer.id
        shard = self._shards.get(customer)
        if shard is None:
            if len(self._shards) >= KEY_CACHE_MAX_ENTRIES:
                self._shards.clear()
            shard = self._shards[customer] = shard_of(customer, self.config.shards)
        return AdmitRequest(
            shard=shard,
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
            unsettled=self.pipeline.unsettled if terms.holds else None,
        )

    def admit_failed(self, error: StorageError) -> Decision:
        """Apply the failure policy: serve without the backend (fail open) or refuse with 503.

        A refusal of the backend (a key of the wrong type, a counter that is not an integer) is about this
        customer's stored values, and lasts until they are repaired: failing open would serve the customer
        free all that time, so their calls are refused (503) whatever the policy.
        """
        if error.refused:
            self._bad_values.warn("admission refused (%s); refusing the customer until repaired", error)
            return BACKEND_DOWN
        self._outage.warn("admission failed (%s); failing %s", error, self.policy.on_backend_error)
        if self.policy.on_backend_error == "open":
            return FAIL_OPEN
        return BACKEND_DOWN

    def decide(
        self, key: KeyInfo, request: AdmitRequest, decision: Decision, method: str, path: str
    ) -> Call | Problem:
        """Start an admitted call, or answer a refused one (recorded as a rejected event when the customer
        is known and entitled to see it in their usage)."""
        if decision.allowed:
            return Call(
                key, request, decision, method, path, time.perf_counter_ns(), CallUsage(self.config.meters)
            )
        assert decision.reason is not None
        refusal = problem(decision.reason, decision)
        if decision.reason not in ("unknown_key", "revoked_key", "expired_key"):
            self.reject(key, request, decision.reason, refusal.status, method, path)
        return refusal

    def response_headers(self, call: Call) -> list[tuple[bytes, bytes]]:
        """Headers added to an admitted call's response (a lease's calls share the lease's)."""
        if call.lease is not None:
            return call.lease.headers
        return self._headers(call.decision)

    def _headers(self, decision: Decision) -> list[tuple[bytes, bytes]]:
        """The ``RateLimit`` headers of a decision and, on prepaid plans, the credits left."""
        headers = limit_headers(decision.limits)
        if self._balance_header and decision.available_credits is not None:
            headers.append((self._balance_header, format_credits(decision.available_credits).encode()))
        return headers

    # -- after the app ------------------------------------------------------------------------------

    def finish(self, call: Call, route: str | None, *, failed: bool = False, aborted: bool = False) -> None:
        """Record a finished call: classify it, measure its units, and queue its event.

        ``failed``: the app raised or never completed its response (not charged); ``aborted``: the client
        went away before the end (charged as the response it had started to receive, if any: see
        :func:`~meterware._core.is_billable`).
        """
        if call.finished:
            return
        call.finished = True
        ended = call.ended_ns or time.perf_counter_ns()
        outcome: Outcome
        sent = call.status
        if aborted:
            status, outcome = call.status or CLIENT_CLOSED_REQUEST, "aborted"
            if not call.responded:
                sent = 0
        elif failed:
            status, outcome = call.status if call.status >= 500 else 500, "server_error"
        else:
            status, outcome = call.status, classify(call.status)
        billable = is_billable(outcome, sent, self.policy)
        request = call.request
        # Units reported from now on (by work the handler left running) miss the event: counted as rejected.
        call.usage.late = self._reject_late_units
        _, units, settled, counted = self._measure(call, ended)
        if call.usage.rejected:
            self.metrics.units_rejected.inc(call.usage.rejected)
        now_ms = time.time_ns() // 1_000_000
        recorded = bounded_route(route or call.path)
        # The event as written (a UsageEvent's fields in order), built directly: this runs for every call.
        row = [
            SCHEMA_VERSION,
            new_event_id(now_ms),
            now_ms,
            request.customer,
            call.key.key_id,
            request.plan.name,
            recorded,
            bounded_method(call.method),
            status,
            outcome,
            (ended - call.started_ns) // 1000,
            (call.ttfb_ns - call.started_ns) // 1000 if call.ttfb_ns else 0,
            units,
            billable,
            request.live,
            request.period_start,
            "",
        ]
        settlement = self._settlement(call, billable, settled)
        change = self._change(call, billable, settled, settlement) if request.holds else None
        self._queue(Pending(request.shard, row, settlement, change))
        self.metrics.call(
            recorded if route else UNMATCHED_ROUTE,
            call.method,
            outcome,
            request.plan.name,
            (ended - (call.arrived_ns or call.started_ns)) / 1e9,
            counted if billable and request.live else (),
        )

    def _measure(self, call: Call, ended_ns: int) -> Measured:
        """A finished call's holds, its units per meter, per held meter what its settlement charges
        (``(meter, units, price, included)``), and what it adds to ``meterware_units`` if billable.

        When every meter counts calls, they depend only on the route's weight and the plan's terms: they
        are made once (a call's units are never changed once measured, so calls share them).
        """
        holds = call.request.holds
        if not self._calls_only:
            units = self._units(call, ended_ns)
            self._bound_cost(call, units)
            return holds, units, settled_meters(holds, units), unit_counts(units, self._additive)
        weight = self.routes.weight(call.path) if self.routes.weights else 1
        measured = (id(holds), weight)
        known = self._measured.get(measured)
        if known is None or known[0] is not holds:
            units = self._units(call, ended_ns)
            if len(self._measured) >= KEY_CACHE_MAX_ENTRIES:
                self._measured.clear()
            # The holds are kept with their id, so the id names them while the entry lives.
            known = self._measured[measured] = (
                holds,
                units,
                settled_meters(holds, units),
                unit_counts(units, self._additive),
            )
        return known

    def _units(self, call: Call, ended_ns: int) -> dict[str, int | str]:
        units: dict[str, int | str] = {}
        weight = self.routes.weight(call.path) if self.routes.weights else 1
        for name, meter in self.config.meters.items():
            source = meter.source
            if source == "call":
                units[name] = call_units(meter, weight)
            elif source == "handler":
                if name in call.usage.units:
                    units[name] = call.usage.units[name]
            elif source == "response_bytes":
                units[name] = call.response_bytes
            elif source == "request_bytes":
                units[name] = call.request_bytes
            elif source == "duration_ms":
                units[name] = (ended_ns - call.started_ns) // 1_000_000
            elif call.header_units and name in call.header_units:
                value = call.header_units[name].strip()
                # isdigit() alone takes '²' and other digits that int() refuses (once the response is gone).
                if value.isascii() and value.isdigit() and len(value) < 16:
                    units[name] = int(value)
                else:
                    call.usage.rejected += 1
                    self._bad_usage_headers[name].warn(
                        "ignored usage header for meter %r: not a whole number", name
                    )
        return units

    def _bound_cost(self, call: Call, units: dict[str, int | str]) -> None:
        """Ignore priced value units that would take the call past :data:`MAX_CALL_COST`."""
        holds = call.request.holds
        cost = sum(hold.hold * hold.price for hold in holds if hold.exact)  # the call's own price
        for hold in holds:
            value = units.get(hold.meter)
            if hold.exact or not hold.price or not isinstance(value, int):
                continue
            if cost + value * hold.price > MAX_CALL_COST:
                del units[hold.meter]
                call.usage.rejected += 1
                logger.warning(
                    "meterware: ignored usage for meter %r: %d units would cost more than one call may",
                    hold.meter,
                    value,
                )
            else:
                cost += value * hold.price

    def reject(
        self, key: KeyInfo, request: AdmitRequest, reason: Reason, status: int, method: str, route: str
    ) -> None:
        """Record a refused call of a known customer (it is never charged)."""
        event = UsageEvent(
            id=new_event_id(),
            timestamp_ms=time.time_ns() // 1_000_000,
            customer=request.customer,
            key_id=key.key_id,
            plan=request.plan.name,
            route=bounded_route(route),
            method=bounded_method(method),
            status=status,
            outcome="rejected",
            duration_us=0,
            ttfb_us=0,
            live=request.live,
            period_start=request.period_start,
            reason=reason,
        )
        self._queue(Pending(request.shard, event_row(event), None))

    def _queue(self, item: Pending) -> None:
        if not self._exit_hook:
            # Once per instance: a process forked after this inherits the registration.
            self._exit_hook = True
            atexit.register(self.drain_at_exit)
        self.pipeline.put(item)

    # -- pipeline -----------------------------------------------------------------------------------

    def drain_at_exit(self) -> None:
        """Flush what is still buffered with a synchronous client (the event loop may be gone)."""
        # A flusher thread (a daemon: it dies with the interpreter) may hold events it has taken out of
        # the buffer and not written yet: wait for it first.
        with self.pipeline.flushing:
            if not len(self.pipeline.buffer) and not self.pipeline.spool.pending() and not self._leases:
                return
            storage = self.backend(flushing=True)
            try:
                self.pipeline.flush_sync(storage, final=True)
            finally:
                storage.close()

    def _rollup_in_process(self, batch: Batch) -> None:
        from meterware.rollup import RollupWorker

        with self._rollup_lock:
            if self._rollup is None:
                storage = self.backend(flushing=True)
                self._rollup = RollupWorker(storage, self.config, owner=f"in-process-{os.getpid()}")
            # The flushed shard at once; every shard (and its housekeeping: expired reservations) each second.
            now = time.monotonic()
            if now >= self._next_full_rollup:
                self._next_full_rollup = now + 1.0
                self._rollup.drain()
            else:
                self._rollup.drain(only=batch.shard)


def header_map(headers: Iterable[tuple[bytes, bytes]], wanted: Mapping[bytes, str]) -> dict[str, str]:
    """Values of the usage headers among ``headers``, by meter name."""
    found: dict[str, str] = {}
    for name, value in headers:
        meter = wanted.get(name.lower())
        if meter is not None:
            found[meter] = value.decode("latin-1")
    return found


SettledMeters = tuple[tuple[str, int, int, int], ...]
Measured = tuple[tuple[MeterHold, ...], dict[str, int | str], SettledMeters, UnitCounts]


def settled_meters(holds: tuple[MeterHold, ...], units: Mapping[str, int | str]) -> SettledMeters:
    """What a call's settlement charges of each held meter: ``(meter, units, price, included)``."""
    return tuple((hold.meter, int(units.get(hold.meter, 0)), hold.price, hold.included) for hold in holds)


def nets_out(request: AdmitRequest, reserved_credits: int) -> bool:
    """Whether a charged call, settled from its own reservation, changes nothing an admission reads:
    it holds its full price (:func:`holds_full_price`) and no included units could make it cheaper."""
    return holds_full_price(request, reserved_credits, 1) and not (
        request.charges_credits and any(hold.included for hold in request.holds)
    )


def captures(request: AdmitRequest, decision: Decision) -> bool:
    """Whether a lease's calls take their share out of its block as they settle: when the block holds
    each call's full price (a block that spans the included units holds less for some calls: what a
    call's settlement takes of it then depends on the order the calls are flushed in, which admission
    cannot know)."""
    return holds_full_price(request, decision.reserved_credits, decision.calls)


def holds_full_price(request: AdmitRequest, reserved_credits: int, calls: int) -> bool:
    """Whether ``calls`` calls like ``request`` use exactly what they hold: every meter counts calls (a
    call's units are its hold) and ``reserved_credits`` is their whole price (nothing if not charged)."""
    if not all(hold.exact for hold in request.holds):
        return False
    price = sum(hold.hold * hold.price for hold in request.holds) if request.charges_credits else 0
    return reserved_credits == calls * price


def _meter_changes(
    settled: SettledMeters, billable: bool, freed: list[int]
) -> tuple[tuple[str, int, int], ...]:
    """Per held meter, ``(meter, units charged, units released)`` of a call's settlement."""
    return tuple(
        (meter, units if billable else 0, free)
        for (meter, units, _, _), free in zip(settled, freed, strict=True)
    )


def lease_key(key_id: str, terms: CallTerms | AdmitRequest) -> LeaseKey:
    """What calls sharing a lease have in common: the key, the holds (plan terms, route weight, live or
    test) and the billing period."""
    return (key_id, id(terms.holds), terms.period_start)
