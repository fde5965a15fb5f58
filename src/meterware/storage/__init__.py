"""Storage backends: open one from its URL.

``memory://`` is one process-wide store per URL and shard count, so the synchronous side (CLI, in-process
rollup) and the asyncio request path of one process see the same data. ``redis://``, ``rediss://``,
``unix://``, ``redis+sentinel://`` and ``redis+cluster://`` open the Redis backend, whose driver is imported
only then.
"""

from __future__ import annotations

import threading

from meterware.storage.base import AsyncStorage, Storage
from meterware.storage.memory import AsyncMemoryStorage, MemoryStorage

__all__ = ["check_url", "open_async_storage", "open_storage"]

REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "redis+cluster")

_memory_stores: dict[tuple[str, int], MemoryStorage] = {}
_memory_lock = threading.Lock()


def _scheme(url: str) -> str:
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme != "memory" and scheme not in REDIS_SCHEMES:
        raise ValueError(f"unknown storage URL scheme {scheme!r} (memory, {', '.join(REDIS_SCHEMES)})")
    return scheme


def _memory(url: str, shards: int) -> MemoryStorage:
    with _memory_lock:
        store = _memory_stores.get((url, shards))
        if store is None:
            store = _memory_stores[(url, shards)] = MemoryStorage(shards)
        return store


def check_url(url: str) -> None:
    """Raise ``ValueError`` naming the problem (never a password) if no backend could be opened at ``url``."""
    if _scheme(url) != "memory":
        from meterware.storage.redis import check_url as check_redis_url

        check_redis_url(url)


def open_storage(url: str, *, shards: int, timeout: float | None = None) -> Storage:
    """Open the synchronous backend at ``url``; ``timeout`` bounds each Redis call, in seconds."""
    if _scheme(url) == "memory":
        return _memory(url, shards)
    from meterware.storage.redis import RedisStorage

    return RedisStorage(url, shards=shards, timeout=timeout)


def open_async_storage(url: str, *, shards: int, timeout: float | None = None) -> AsyncStorage:
    """Open the asyncio request path of the backend at ``url`` (no I/O until the first call)."""
    if _scheme(url) == "memory":
        return AsyncMemoryStorage(_memory(url, shards))
    from meterware.storage.redis import AsyncRedisStorage

    return AsyncRedisStorage(url, shards=shards, timeout=timeout)
