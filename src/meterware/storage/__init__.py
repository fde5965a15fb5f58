"""Storage backends: open one from its URL.

``memory://`` is one process-wide store per URL and shard count, so the synchronous side (CLI, in-process
rollup) and the asyncio request path of one process see the same data. ``redis://``, ``rediss://``,
``unix://``, ``redis+sentinel://`` and ``redis+cluster://`` open the Redis backend, whose driver is imported
only then. Each backend class declares its schemes (:mod:`meterware.storage._registry`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from meterware.storage._registry import backend_for

if TYPE_CHECKING:
    from meterware.storage.base import AsyncStorage, ReplicaWait, Storage

__all__ = ["check_url", "open_async_storage", "open_storage"]


def check_url(url: str) -> None:
    """Raise ``ValueError`` naming the problem (never a password) if no backend could be opened at ``url``."""
    backend_for(url).check_url(url)


def open_storage(
    url: str,
    *,
    shards: int,
    timeout: float | None = None,
    allow_eviction: bool | None = None,
    replica_wait: ReplicaWait | None = None,
) -> Storage:
    """Open the synchronous backend at ``url``; ``timeout`` bounds each Redis call, in seconds.

    ``allow_eviction``: ``None`` (tools) skips the start-up check; otherwise the first call checks, once per
    process, that Redis keeps the money, and raises :class:`~meterware.errors.UnsafeStorageError` on an
    evicting policy unless ``True``. ``replica_wait``: see :class:`~meterware.storage.base.ReplicaWait`.
    """
    return backend_for(url).open(
        url, shards=shards, timeout=timeout, allow_eviction=allow_eviction, replica_wait=replica_wait
    )


def open_async_storage(
    url: str,
    *,
    shards: int,
    timeout: float | None = None,
    allow_eviction: bool | None = None,
    replica_wait: ReplicaWait | None = None,
) -> AsyncStorage:
    """Open the asyncio request path of the backend at ``url`` (no I/O until the first call)."""
    return backend_for(url).open_async(
        url, shards=shards, timeout=timeout, allow_eviction=allow_eviction, replica_wait=replica_wait
    )
