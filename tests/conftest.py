from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis
from hypothesis import HealthCheck, settings

from tests.servers import RedisClusterServers, RedisServer, redis_cluster, redis_sentinel, redis_server

# Property tests check properties, never timing: on a loaded 2-core machine (or under coverage) a slow
# example is not a failure.
settings.register_profile("meterware", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("meterware")


@pytest.fixture(scope="session")
def redis_process() -> Iterator[RedisServer]:
    """One real redis-server for the whole session."""
    with redis_server() as server:
        yield server


@pytest.fixture
def redis_url(redis_process: RedisServer) -> str:
    """The URL of an empty real Redis database."""
    client = redis.Redis.from_url(redis_process.url)
    client.flushall()
    client.close()
    return redis_process.url


@pytest.fixture(
    params=[pytest.param("memory", id="memory"), pytest.param("redis", id="redis", marks=pytest.mark.redis)]
)
def storage_url(request: pytest.FixtureRequest) -> str:
    """A fresh memory:// store, or the suite's real, emptied redis-server: a test using it runs on both."""
    if request.param == "redis":
        return str(request.getfixturevalue("redis_url"))
    return f"memory://{uuid.uuid4().hex}"


@pytest.fixture(
    params=[
        pytest.param("memory", id="memory"),
        pytest.param("redis", id="redis", marks=pytest.mark.redis),
        pytest.param("cluster", id="cluster", marks=pytest.mark.redis),
    ]
)
def backend_url(request: pytest.FixtureRequest) -> str:
    """A fresh memory:// store, the suite's real emptied redis-server, or its real 3-node Redis Cluster."""
    if request.param == "memory":
        return f"memory://{uuid.uuid4().hex}"
    return str(request.getfixturevalue("redis_url" if request.param == "redis" else "cluster_url"))


@pytest.fixture(scope="session")
def redis_cluster_servers() -> Iterator[RedisClusterServers]:
    """One real 3-node Redis Cluster for the whole session (started on first use)."""
    with redis_cluster() as cluster:
        yield cluster


@pytest.fixture
def cluster_url(redis_cluster_servers: RedisClusterServers) -> str:
    """The ``redis+cluster://`` URL of the empty real cluster."""
    for node in redis_cluster_servers.nodes:
        client = redis.Redis(port=node.port)
        client.flushall()
        client.close()
    return redis_cluster_servers.url


@pytest.fixture(scope="session")
def sentinel_process(redis_process: RedisServer) -> Iterator[RedisServer]:
    """A real Redis Sentinel watching the session's redis-server as ``mymaster``."""
    with redis_sentinel(redis_process) as sentinel:
        yield sentinel


@pytest.fixture
def sentinel_url(redis_url: str, sentinel_process: RedisServer) -> str:
    """The ``redis+sentinel://`` URL of the (empty) session redis-server, found through the sentinel."""
    return f"redis+sentinel://127.0.0.1:{sentinel_process.port}/mymaster/0"
