"""``redis://``: the production backend, on one node, under Sentinel or on Redis Cluster.

Atomicity lives in the Lua scripts of ``storage/lua/`` (package data), which do step for step what
:class:`~meterware.storage.memory.MemoryStorage` does. :class:`RedisStorage` (synchronous) and
:class:`AsyncRedisStorage` (asyncio, the request path) sit side by side and differ only by ``await``: the
script arguments are built and the replies read by pure functions, one module per role (``_request``,
``_rollup``, ``_accounts``, ``_billing``). Every key name comes from :mod:`meterware.storage._keyspace`;
every script touches the keys of one shard, so one hash slot. Every driver failure surfaces as one
:class:`~meterware.errors.StorageError` (``_connection``).

URLs: see :mod:`meterware.storage._url`.
"""

from __future__ import annotations

from typing import ClassVar

from meterware.storage._registry import Backend
from meterware.storage._url import RedisTarget, parse_url
from meterware.storage.base import ReplicaWait
from meterware.storage.redis._accounts import AccountCommands, LedgerCommands
from meterware.storage.redis._async import AsyncRedisStorage
from meterware.storage.redis._billing import AlertCommands, ExportCommands, InvoiceCommands, PortalCommands
from meterware.storage.redis._checks import Finding, findings, read_nodes
from meterware.storage.redis._connection import DEFAULT_TIMEOUT, DriverErrors, check_url, sync_client
from meterware.storage.redis._request import RequestPathCommands
from meterware.storage.redis._rollup import RollupCommands
from meterware.storage.redis._scripts import script_sources

__all__ = [
    "AsyncRedisStorage",
    "Finding",
    "RedisStorage",
    "RedisTarget",
    "check_url",
    "inspect_redis",
    "parse_url",
    "script_sources",
]


def inspect_redis(
    url: str, *, allow_eviction: bool = False, wait_replicas: int = 0, timeout: float | None = None
) -> list[Finding]:
    """Check that the Redis at ``url`` keeps the money (every primary); raise ``StorageError`` if it
    cannot be reached."""
    target = parse_url(url)
    client, sentinel = sync_client(target, DEFAULT_TIMEOUT if timeout is None else timeout)
    try:
        with DriverErrors(target):
            return findings(read_nodes(client), allow_eviction=allow_eviction, wait_replicas=wait_replicas)
    finally:
        client.close()
        for node in sentinel.sentinels if sentinel is not None else ():
            node.close()


class RedisStorage(
    RequestPathCommands,
    RollupCommands,
    AccountCommands,
    LedgerCommands,
    InvoiceCommands,
    AlertCommands,
    ExportCommands,
    PortalCommands,
    Backend,
):
    """The Redis backend for threads: the WSGI request path, the rollup worker and the CLI.

    ``timeout`` (seconds) bounds connecting and every call; nothing is retried. No connection is made
    until the first call.
    """

    SCHEMES: ClassVar[tuple[str, ...]] = ("redis", "rediss", "unix", "redis+sentinel", "redis+cluster")

    @classmethod
    def check_url(cls, url: str) -> None:
        check_url(url)

    @classmethod
    def open(
        cls,
        url: str,
        *,
        shards: int,
        timeout: float | None,
        allow_eviction: bool | None = None,
        replica_wait: ReplicaWait | None = None,
    ) -> RedisStorage:
        return cls(
            url, shards=shards, timeout=timeout, allow_eviction=allow_eviction, replica_wait=replica_wait
        )

    @classmethod
    def open_async(
        cls,
        url: str,
        *,
        shards: int,
        timeout: float | None,
        allow_eviction: bool | None = None,
        replica_wait: ReplicaWait | None = None,
    ) -> AsyncRedisStorage:
        return AsyncRedisStorage(
            url, shards=shards, timeout=timeout, allow_eviction=allow_eviction, replica_wait=replica_wait
        )
