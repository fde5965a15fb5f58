"""The two drivers of the request core: they make its backend calls, one synchronously, one with ``await``.

Everything they decide is the core's; what is theirs is how waiting works: a threaded server's calls wait
on a lock for a lease renewal, an event loop's share one pending lookup or renewal through a future, and
fetch the next lease in the background before it is needed.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Coroutine, Iterable
from dataclasses import replace
from typing import Any

from meterware.errors import StorageError
from meterware.metering.admission import AdmitRequest, Decision
from meterware.metering.calls import Call
from meterware.metering.core import RequestCore
from meterware.metering.keycache import NeedsCustomer, NeedsLookup
from meterware.metering.leases import Lease, LeaseKey, lease_key
from meterware.metering.records import KeyInfo
from meterware.metering.responses import Problem
from meterware.storage.base import AsyncStorage, Storage


class SyncDriver:
    """Runs the request core with a synchronous backend (WSGI, Django's sync views)."""

    def __init__(self, core: RequestCore) -> None:
        self.core = core
        self._renewing = threading.Lock()  # one renewal at a time in a threaded server

    def start(
        self,
        storage: Storage,
        native_request: Any,
        headers: Iterable[tuple[bytes, bytes]],
        query: bytes,
        method: str,
        path: str,
    ) -> Call | Problem:
        """Identify and admit a call: the call to serve, or the refusal."""
        core = self.core
        arrived = time.perf_counter_ns()
        stored = core.config.stored
        if arrived >= stored.due_ns or not stored.settled:  # once per key_cache_ttl per process
            stored.refresh(core.config, storage.stored_plans)
        key = core.identify(native_request, headers, query)
        if isinstance(key, str):  # NeedsLookup
            key = self.plan_known(storage, self.resolve(storage, key))
        elif isinstance(key, NeedsCustomer):
            key = self.plan_known(storage, self.resolve_customer(storage, key))
        request = core.admission(key, method, path, arrived)
        if not isinstance(request, AdmitRequest):
            return request
        assert isinstance(key, KeyInfo)
        renewed = self.renew(storage, request) if core.leasing else None
        answer = renewed or self.admit(storage, request)
        return core.admitted(key, request, answer, method, path, arrived)

    def plan_known(self, storage: Storage, key: KeyInfo | Problem) -> KeyInfo | Problem:
        """``key``, once its customer's plan is known: a name neither the config file nor the stored plans
        read have is a plan stored since the last read, read now (only when a key is resolved)."""
        config = self.core.config
        if isinstance(key, KeyInfo) and not config.knows_plan(key.customer.plan):
            config.stored.refresh(config, storage.stored_plans, force=True)
        return key

    def resolve(self, storage: Storage, key_hash: NeedsLookup) -> KeyInfo | Problem:
        """Resolve a key hash the cache does not know (timed)."""
        began = time.perf_counter()
        try:
            found: KeyInfo | StorageError | None = storage.resolve_key(key_hash)
        except StorageError as error:
            found = error
        self.core.metrics.resolve_duration.observe(time.perf_counter() - began)
        return self.core.key_resolved(key_hash, found)

    def resolve_customer(self, storage: Storage, lookup: NeedsCustomer) -> KeyInfo | Problem:
        """Resolve a customer the app authenticated that the cache does not know (timed)."""
        began = time.perf_counter()
        try:
            found: KeyInfo | StorageError | None = storage.resolve_customer(lookup.customer_id)
        except StorageError as error:
            found = error
        self.core.metrics.resolve_duration.observe(time.perf_counter() - began)
        return self.core.key_resolved(lookup.entry, found)

    def admit(self, storage: Storage, request: AdmitRequest) -> Decision | StorageError:
        """The backend's admission of ``request`` (timed), or its failure."""
        metrics = self.core.metrics
        began = time.perf_counter()
        try:
            return storage.admit(request)
        except StorageError as error:
            metrics.admit_errors.inc()
            return error
        finally:
            metrics.admit_duration.observe(time.perf_counter() - began)

    def renew(self, storage: Storage, request: AdmitRequest) -> Lease | Decision | None:
        """A new lease for calls like ``request``, this call taken from it; None when leases cannot serve
        it; a :class:`Decision` when the backend refused even this one call, or failed."""
        core = self.core
        block = core.lease_block(request)
        if block is None:
            return None
        with self._renewing:
            # Another thread may have renewed it meanwhile.
            lease = core.leases.take(
                lease_key(request.key_id, request.holds, request.period_start, request.scoped_limits)
            )
            if lease is not None:
                return lease
            return core.granted(request, block, self.admit(storage, block), take=True)


class AsyncDriver:
    """Runs the request core with an asyncio backend: concurrent calls share one key lookup and one lease
    renewal, and the next lease is fetched ahead of need."""

    def __init__(self, core: RequestCore) -> None:
        self.core = core
        self._resolving: dict[str, asyncio.Future[KeyInfo | Problem]] = {}
        self._renewals: dict[LeaseKey, asyncio.Future[None]] = {}
        self._renewing_ahead: set[asyncio.Task[Lease | Decision | None]] = set()
        self._reading_plans: asyncio.Future[None] | None = None

    def start(
        self,
        storage: AsyncStorage,
        native_request: Any,
        headers: Iterable[tuple[bytes, bytes]],
        query: bytes,
        method: str,
        path: str,
    ) -> Call | Problem | Coroutine[Any, Any, Call | Problem]:
        """The answer when no backend call is needed (a cached key, then a lease or a refusal), else a
        coroutine to await for it (most calls of a busy process need none, and skip a coroutine's cost)."""
        arrived = time.perf_counter_ns()
        stored = self.core.config.stored
        if arrived >= stored.due_ns or not stored.settled:  # once per key_cache_ttl per process
            return self._with_plans(storage, native_request, headers, query, method, path, arrived)
        return self._identified(storage, native_request, headers, query, method, path, arrived)

    def _identified(
        self,
        storage: AsyncStorage,
        native_request: Any,
        headers: Iterable[tuple[bytes, bytes]],
        query: bytes,
        method: str,
        path: str,
        arrived: int,
    ) -> Call | Problem | Coroutine[Any, Any, Call | Problem]:
        """:meth:`start` once the stored plans are known."""
        key = self.core.identify(native_request, headers, query)
        if isinstance(key, str):  # NeedsLookup
            return self._resolve_and_admit(storage, key, method, path, arrived)
        if isinstance(key, NeedsCustomer):
            return self._resolve_customer_and_admit(storage, key, method, path, arrived)
        return self._known(storage, key, method, path, arrived)

    async def _with_plans(
        self,
        storage: AsyncStorage,
        native_request: Any,
        headers: Iterable[tuple[bytes, bytes]],
        query: bytes,
        method: str,
        path: str,
        arrived: int,
    ) -> Call | Problem:
        """:meth:`start` once the stored plans are read: concurrent calls share one read."""
        config = self.core.config
        reading = self._reading_plans
        if reading is None or reading.done():
            reading = asyncio.ensure_future(config.stored.arefresh(config, storage.stored_plans))
            self._reading_plans = reading
        await asyncio.shield(reading)
        started = self._identified(storage, native_request, headers, query, method, path, arrived)
        return started if isinstance(started, Call | Problem) else await started

    def _known(
        self, storage: AsyncStorage, key: KeyInfo | Problem, method: str, path: str, arrived: int
    ) -> Call | Problem | Coroutine[Any, Any, Call | Problem]:
        """:meth:`start` once the key is known."""
        request = self.core.admission(key, method, path, arrived)
        if isinstance(request, AdmitRequest):
            assert isinstance(key, KeyInfo)
            return self._admit_call(storage, key, request, method, path, arrived)
        return self._renewing_if_due(storage, request)

    async def _resolve_and_admit(
        self, storage: AsyncStorage, key_hash: NeedsLookup, method: str, path: str, arrived: int
    ) -> Call | Problem:
        key = await self.plan_known(storage, await self.resolve(storage, key_hash))
        started = self._known(storage, key, method, path, arrived)
        return started if isinstance(started, Call | Problem) else await started

    async def _resolve_customer_and_admit(
        self, storage: AsyncStorage, lookup: NeedsCustomer, method: str, path: str, arrived: int
    ) -> Call | Problem:
        began = time.perf_counter()
        try:
            found: KeyInfo | StorageError | None = await storage.resolve_customer(lookup.customer_id)
        except StorageError as error:
            found = error
        self.core.metrics.resolve_duration.observe(time.perf_counter() - began)
        key = await self.plan_known(storage, self.core.key_resolved(lookup.entry, found))
        started = self._known(storage, key, method, path, arrived)
        return started if isinstance(started, Call | Problem) else await started

    async def plan_known(self, storage: AsyncStorage, key: KeyInfo | Problem) -> KeyInfo | Problem:
        """The asyncio twin of :meth:`SyncDriver.plan_known`."""
        config = self.core.config
        if isinstance(key, KeyInfo) and not config.knows_plan(key.customer.plan):
            await config.stored.arefresh(config, storage.stored_plans, force=True)
        return key

    async def _admit_call(
        self, storage: AsyncStorage, key: KeyInfo, request: AdmitRequest, method: str, path: str, arrived: int
    ) -> Call | Problem:
        # Strict admission makes no renewal coroutine (a call's coroutines are most of its cost here).
        renewed = await self.renew(storage, request) if self.core.leasing else None
        answer = renewed or await self.admit(storage, request)
        return self.core.admitted(key, request, answer, method, path, arrived)

    async def resolve(self, storage: AsyncStorage, key_hash: NeedsLookup) -> KeyInfo | Problem:
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
        began = time.perf_counter()
        try:
            try:
                found: KeyInfo | StorageError | None = await storage.resolve_key(key_hash)
            except StorageError as error:
                found = error
            key = self.core.key_resolved(key_hash, found)
        except BaseException:
            future.cancel()
            raise
        else:
            future.set_result(key)
        finally:
            if self._resolving.get(key_hash) is future:
                del self._resolving[key_hash]
            self.core.metrics.resolve_duration.observe(time.perf_counter() - began)
        return key

    async def admit(self, storage: AsyncStorage, request: AdmitRequest) -> Decision | StorageError:
        """The backend's admission of ``request`` (timed), or its failure."""
        metrics = self.core.metrics
        began = time.perf_counter()
        try:
            return await storage.admit(request)
        except StorageError as error:
            metrics.admit_errors.inc()
            return error
        finally:
            metrics.admit_duration.observe(time.perf_counter() - began)

    async def renew(
        self, storage: AsyncStorage, request: AdmitRequest, *, take: bool = True
    ) -> Lease | Decision | None:
        """The twin of :meth:`SyncDriver.renew`: calls waiting for the same lease share one renewal.

        ``take=False``: renew ahead of need (no call is waiting; a failure is left to the next call).
        """
        core = self.core
        block = core.lease_block(request)
        if block is None:
            return None
        identity = lease_key(request.key_id, request.holds, request.period_start, request.scoped_limits)
        while (renewal := self._renewals.get(identity)) is not None:
            await renewal
            lease = core.leases.take(identity) if take else None
            if lease is not None:
                return lease
        self._renewals[identity] = renewal = asyncio.get_running_loop().create_future()
        try:
            answer = await self.admit(storage, block)
        finally:
            del self._renewals[identity]
            renewal.set_result(None)
        return core.granted(request, block, answer, take=take)

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
        task = asyncio.get_running_loop().create_task(self.renew(storage, request, take=False))
        self._renewing_ahead.add(task)
        task.add_done_callback(self._renewing_ahead.discard)
