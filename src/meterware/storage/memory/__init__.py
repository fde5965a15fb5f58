"""``memory://``: a complete in-process backend for development, demos and tests of user apps.

It implements the same contract as the Redis backend, step for step the same as the Lua scripts in
``storage/lua/`` (the storage contract tests run both). Everything lives in one process and is lost when
it exits; one lock makes each operation atomic across threads.

Each operation is also all or nothing, as the scripts are: everything that can raise (reading, deciding,
encoding) happens before its first change, and the changes themselves are assignments and arithmetic on
Python ints, which have no bound to overflow and no type to mismatch. Where a script checks the types and
ranges of what Redis holds, there is nothing to check here: the store only ever holds what it wrote.

The operations are grouped by role (one mixin each, over the shared :class:`MemoryState`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import ClassVar

from meterware.metering.admission import AdmitRequest, Decision
from meterware.metering.records import KeyInfo
from meterware.storage._registry import Backend
from meterware.storage.base import Batch, ReplicaWait
from meterware.storage.memory._accounts import AccountMixin, LedgerMixin
from meterware.storage.memory._billing import AlertMixin, ExportMixin, InvoiceMixin, PortalMixin
from meterware.storage.memory._request import AdmissionMixin, SettlementMixin
from meterware.storage.memory._rollup import RollupMixin
from meterware.storage.memory._state import MemoryState

__all__ = ["AsyncMemoryStorage", "MemoryState", "MemoryStorage"]

_stores: dict[tuple[str, int], MemoryStorage] = {}
_stores_lock = threading.Lock()


class MemoryStorage(
    AdmissionMixin,
    SettlementMixin,
    RollupMixin,
    AccountMixin,
    LedgerMixin,
    InvoiceMixin,
    AlertMixin,
    ExportMixin,
    PortalMixin,
    Backend,
):
    """The embedded backend (synchronous; see :class:`AsyncMemoryStorage` for asyncio)."""

    SCHEMES: ClassVar[tuple[str, ...]] = ("memory",)

    @classmethod
    def open(
        cls,
        url: str,
        *,
        shards: int,
        timeout: float | None,
        allow_eviction: bool | None = None,
        replica_wait: ReplicaWait | None = None,
    ) -> MemoryStorage:
        """The process-wide store of ``url`` and ``shards`` (``timeout``, ``allow_eviction`` and
        ``replica_wait`` are moot: nothing waits, nothing is evicted, nothing is replicated)."""
        with _stores_lock:
            store = _stores.get((url, shards))
            if store is None:
                store = _stores[(url, shards)] = cls(shards)
            return store

    @classmethod
    def open_async(
        cls,
        url: str,
        *,
        shards: int,
        timeout: float | None,
        allow_eviction: bool | None = None,
        replica_wait: ReplicaWait | None = None,
    ) -> AsyncMemoryStorage:
        return AsyncMemoryStorage(cls.open(url, shards=shards, timeout=timeout))

    def close(self) -> None:
        pass


class AsyncMemoryStorage:
    """The embedded backend's request path for asyncio: the same store, without I/O to wait on."""

    def __init__(self, storage: MemoryStorage) -> None:
        self.sync = storage
        self.shards = storage.shards

    async def resolve_key(self, key_hash: str) -> KeyInfo | None:
        return self.sync.resolve_key(key_hash)

    async def resolve_customer(self, customer_id: str) -> KeyInfo | None:
        return self.sync.resolve_customer(customer_id)

    async def admit(self, request: AdmitRequest) -> Decision:
        return self.sync.admit(request)

    async def flush(self, batch: Batch) -> bool:
        return self.sync.flush(batch)

    async def release(self, admissions: Sequence[AdmitRequest]) -> int:
        return self.sync.release(admissions)

    async def renew_reservations(self, admissions: Sequence[AdmitRequest]) -> int:
        return self.sync.renew_reservations(admissions)

    async def stored_plans(self) -> dict[str, str]:
        return self.sync.stored_plans()

    async def use_once(self, customer_id: str, token_id: str, expires_ms: int) -> bool:
        return self.sync.use_once(customer_id, token_id, expires_ms)

    async def is_used(self, customer_id: str, token_id: str) -> bool:
        return self.sync.is_used(customer_id, token_id)

    async def ready(self) -> None:
        """Nothing to connect to or check."""

    async def aclose(self) -> None:
        pass
