"""``[storage] wait_replicas``: a money write is acknowledged only once that many replicas have it.

Redis replicates asynchronously, so without it a failover can lose the last charges the primary
acknowledged. With it, the flush (and every ledger write) sends ``WAIT`` after its script on the same
connection; a write no replica confirmed in time fails like an unreachable Redis, so the flusher keeps the
batch and retries it, and the batch marker makes the retry apply it once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis

from meterware.billing.accounts import Accounts
from meterware.config import Config
from meterware.errors import ConfigError, StorageError
from meterware.storage import _keyspace as ks
from meterware.storage import open_async_storage, open_storage
from meterware.storage.base import Batch, ReplicaWait
from tests.servers import RedisServer

pytestmark = pytest.mark.redis

SHARDS = 4
WAIT = ReplicaWait(replicas=1, timeout=0.2)


@pytest.fixture
def primary() -> Iterator[RedisServer]:
    # No 5 s wait before the full sync a replica asks for (repl-diskless-sync-delay).
    server = RedisServer("--repl-diskless-sync-delay", "0").start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def replica(primary: RedisServer) -> Iterator[RedisServer]:
    server = RedisServer("--replicaof", "127.0.0.1", str(primary.port)).start()
    client = redis.Redis(port=server.port)
    try:
        deadline = time.monotonic() + 10
        while client.info("replication").get("master_link_status") != "up":
            assert time.monotonic() < deadline, "the replica did not connect within 10 s"
            time.sleep(0.02)
        # Streaming: it has confirmed a write (a replica that never did is not counted by WAIT at all).
        primary_client = redis.Redis(port=primary.port)
        primary_client.set("replica-check", 1)
        assert primary_client.wait(1, 10_000) == 1
        primary_client.close()
        yield server
    finally:
        client.close()
        server.cleanup()


@contextmanager
def stopped(server: RedisServer) -> Iterator[None]:
    """``server`` frozen (SIGSTOP): connected, but confirming nothing."""
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


def flush(url: str, batch: Batch, *, asynchronous: bool) -> bool:
    """Flush ``batch`` through a new storage (so a new connection), synchronous or asyncio."""
    if not asynchronous:
        storage = open_storage(url, shards=SHARDS, replica_wait=WAIT)
        try:
            return storage.flush(batch)
        finally:
            storage.close()

    async def run() -> bool:
        storage = open_async_storage(url, shards=SHARDS, replica_wait=WAIT)
        try:
            return await storage.flush(batch)
        finally:
            await storage.aclose()

    return asyncio.run(run())


def stream_length(server: RedisServer, shard: int) -> int:
    client = redis.Redis(port=server.port)
    try:
        return int(client.xlen(ks.events(shard)))
    finally:
        client.close()


def a_batch() -> Batch:
    return Batch(1, uuid.uuid4().hex, b"events", ())


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_flush_is_acknowledged_once_the_replica_has_it(
    primary: RedisServer, replica: RedisServer, asynchronous: bool
) -> None:
    batch = a_batch()
    assert flush(primary.url, batch, asynchronous=asynchronous)
    # Read at once from the replica: acknowledged means it is there, not on its way.
    assert stream_length(replica, batch.shard) == 1


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_flush_no_replica_confirmed_is_retried_and_applied_once(
    primary: RedisServer, replica: RedisServer, asynchronous: bool
) -> None:
    batch = a_batch()
    with stopped(replica):
        with pytest.raises(StorageError, match=r"0 of 1 replica\(s\) confirmed it within 0.2s"):
            flush(primary.url, batch, asynchronous=asynchronous)
        assert stream_length(primary, batch.shard) == 1  # written on the primary, not acknowledged
        # The retry finds the batch applied; on its new connection its WAIT must still cover the first
        # write (the marker is written again), or it would acknowledge what no replica has.
        with pytest.raises(StorageError, match="not acknowledged"):
            flush(primary.url, batch, asynchronous=asynchronous)
    assert flush(primary.url, batch, asynchronous=asynchronous) is False  # applied before: once
    assert stream_length(replica, batch.shard) == stream_length(primary, batch.shard) == 1


def test_a_ledger_write_waits_for_the_replica_too(primary: RedisServer, replica: RedisServer) -> None:
    config = Config(storage=primary.url, shards=SHARDS, replica_wait=WAIT)
    accounts = Accounts.open(config)
    accounts.create_customer("acme")
    assert accounts.grant_credits("acme", "5").available == 5_000_000
    with stopped(replica), pytest.raises(StorageError, match=r"storage\.wait_replicas"):
        accounts.grant_credits("acme", "1")


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_on_a_cluster_the_wait_goes_to_the_node_holding_the_shard(
    cluster_url: str, asynchronous: bool
) -> None:
    # The suite's cluster has no replicas: the node that ran the script is the one that answers 0.
    batch = a_batch()
    with pytest.raises(StorageError, match=r"0 of 1 replica\(s\)"):
        flush(cluster_url, batch, asynchronous=asynchronous)
    client = redis.cluster.RedisCluster.from_url(
        cluster_url.replace("redis+cluster://", "redis://").split(",")[0]
    )
    try:
        assert client.xlen(ks.events(batch.shard)) == 1
    finally:
        client.close()


def test_the_wait_is_configured_under_storage() -> None:
    redis_url = "redis://127.0.0.1:1/0"
    config = Config.from_dict({"storage": {"url": redis_url, "wait_replicas": 2}})
    assert config.replica_wait == ReplicaWait(2, 1.0)
    assert Config.from_dict({"storage": {"url": redis_url}}).replica_wait is None
    with pytest.raises(ConfigError, match=r"storage.wait_replicas.*memory:// has no replicas"):
        Config.from_dict({"storage": {"url": "memory://", "wait_replicas": 1}})
    with pytest.raises(ConfigError, match=r"storage.wait_timeout.*below pipeline.flush_timeout \(5s\)"):
        Config.from_dict({"storage": {"url": redis_url, "wait_replicas": 1, "wait_timeout": 5}})


# The first loop's connections cannot be closed once it is gone (as for every client a loop leaves behind).
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_async_storage_moved_to_a_new_event_loop_waits_there(cluster_url: str) -> None:
    """The per-node clients the cluster's waits use belong to a loop; a new loop gets new ones."""
    storage = open_async_storage(cluster_url, shards=SHARDS, replica_wait=WAIT)

    async def flush(close: bool) -> None:
        with pytest.raises(StorageError, match=r"0 of 1 replica\(s\)"):
            await storage.flush(a_batch())
        if close:
            await storage.aclose()

    asyncio.run(flush(close=False))
    asyncio.run(flush(close=True))  # a new event loop
