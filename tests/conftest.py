from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.servers import RedisServer, redis_server


@pytest.fixture(scope="session")
def redis_process() -> Iterator[RedisServer]:
    """One real redis-server for the whole session."""
    with redis_server() as server:
        yield server


@pytest.fixture
def redis_url(redis_process: RedisServer) -> Iterator[str]:
    """The URL of an empty real Redis database."""
    client = redis.Redis.from_url(redis_process.url)
    client.flushall()
    client.close()
    yield redis_process.url
