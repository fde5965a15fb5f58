from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from meterware.storage.base import AsyncStorage, Storage
from meterware.storage.memory import AsyncMemoryStorage, MemoryStorage
from meterware.storage.redis import AsyncRedisStorage, RedisStorage

SHARDS = 8
#: Generous for a loaded CI box, still far below redis-py's defaults.
TIMEOUT = 2.0

BACKENDS = [
    pytest.param("memory", id="memory"),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
    pytest.param("cluster", id="cluster", marks=pytest.mark.redis),
]


@dataclass
class Backend:
    """One backend under test: its synchronous storage and a way to open its asyncio request path."""

    name: str
    sync: Storage
    open_async: Callable[[], AsyncStorage]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """Each backend in turn, empty: memory, a real redis-server, a real 3-node Redis Cluster."""
    if request.param == "memory":
        memory = MemoryStorage(SHARDS)
        yield Backend("memory", memory, lambda: AsyncMemoryStorage(memory))
        return
    url = request.getfixturevalue("redis_url" if request.param == "redis" else "cluster_url")
    storage = RedisStorage(url, shards=SHARDS, timeout=TIMEOUT)
    yield Backend(request.param, storage, lambda: AsyncRedisStorage(url, shards=SHARDS, timeout=TIMEOUT))
    storage.close()


@pytest.fixture
def storage(backend: Backend) -> Storage:
    """The synchronous storage of each backend in turn."""
    return backend.sync
