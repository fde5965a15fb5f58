"""``[storage] wait_replicas``: the writes that move money are acknowledged only once replicas hold them.

``WAIT`` counts from the last write of the connection it is sent on, so it goes in one pipeline with the
script, to the node holding the script's keys. A script that finds its write already made (a retry)
writes its marker again (``common.lua``), so the ``WAIT`` after it covers the first write too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Final, cast

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.commands.core import AsyncScript, Script
from redis.exceptions import MovedError, NoScriptError, RedisClusterException, RedisError

from meterware.storage.base import ReplicaWait
from meterware.storage.redis._scripts import Arg

#: The scripts a failover must not lose once acknowledged (what they write is money or the books), and
#: what one whose write the replicas did not confirm in time means: it stays applied on the primary, and a
#: failover may still lose it. The other scripts are redone from what survives (a lost refund leaves its
#: reservation, which the worker refunds again; a lost rollup commit is folded again from the stream).
MONEY_SCRIPTS: Final = {
    "flush": "the flusher keeps the batch and retries it (its marker applies it once)",
    "close_period": "closing the period again applies it once",
    "correct": "repeating the correction applies it once",
    "import_events": "importing the events again applies them once",
    "expire_grants": "expiring the grants again applies it once",
    "grant_credits": "it is not undone: read the ledger before granting again (a repeat grants twice)",
}


class NotReplicated(RedisError):
    """Fewer replicas than ``wait_replicas`` confirmed a write within ``wait_timeout``."""


def replicated_reply(name: str, replies: list[Any], wait: ReplicaWait) -> Any:
    """The reply of script ``name``, once ``WAIT`` answered that enough replicas have its write."""
    reply, acknowledged = replies
    for answer in replies:
        if isinstance(answer, Exception):
            raise answer
    if acknowledged < wait.replicas:
        raise NotReplicated(
            f"{name}: applied on the primary, but {acknowledged} of {wait.replicas} replica(s) confirmed it "
            f"within {wait.timeout:g}s (storage.wait_replicas): {MONEY_SCRIPTS[name]}"
        )
    return reply


def run_waiting(
    client: redis.Redis | redis.cluster.RedisCluster,
    name: str,
    script: Script,
    keys: Sequence[str],
    args: Sequence[Arg],
    wait: ReplicaWait,
) -> Any:
    """Run ``script`` then ``WAIT`` on one connection of the node holding ``keys``."""
    cluster = client if isinstance(client, redis.cluster.RedisCluster) else None
    if cluster is not None:
        untyped: Any = cluster  # its node lookups carry no annotations
        node: redis.Redis = untyped.get_redis_connection(untyped.get_node_from_key(keys[0]))
    else:
        node = cast(redis.Redis, client)
    try:
        for _ in range(2):
            pipe = node.pipeline(transaction=False)
            pipe.evalsha(script.sha, len(keys), *keys, *args)
            pipe.wait(wait.replicas, wait.timeout_ms)
            replies = pipe.execute(raise_on_error=False)
            if not isinstance(replies[0], NoScriptError):
                break
            node.script_load(script.script)
    except (redis.ConnectionError, redis.TimeoutError):
        if cluster is not None:  # its primary may have failed over: learn who holds the slot now
            with contextlib.suppress(RedisError, RedisClusterException, OSError):
                cluster.nodes_manager.initialize()
        raise
    if cluster is not None and isinstance(replies[0], MovedError):
        cluster.nodes_manager.initialize()  # the slot moved: the next try goes to its new node
    return replicated_reply(name, replies, wait)


class AsyncNodes:
    """A client per cluster node for the pipelines of :func:`arun_waiting` (the asyncio cluster client has
    none to lend)."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        self.clients: dict[str, redis.asyncio.Redis] = {}

    def of(self, node: redis.asyncio.cluster.ClusterNode | None) -> redis.asyncio.Redis:
        if node is None:
            raise RedisClusterException("no node holds the slot (the cluster is changing)")
        client = self.clients.get(node.name)
        if client is None:
            client = self.clients[node.name] = redis.asyncio.Redis(
                host=node.host, port=int(node.port), **self.options
            )
        return client

    async def aclose(self) -> None:
        clients, self.clients = self.clients, {}
        for client in clients.values():
            await client.aclose()


async def arun_waiting(
    client: redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster,
    nodes: AsyncNodes,
    name: str,
    script: AsyncScript,
    keys: Sequence[str],
    args: Sequence[Arg],
    wait: ReplicaWait,
) -> Any:
    """The asyncio twin of :func:`run_waiting`."""
    cluster = client if isinstance(client, redis.asyncio.cluster.RedisCluster) else None
    node = (
        nodes.of(cluster.get_node_from_key(keys[0]))
        if cluster is not None
        else cast(redis.asyncio.Redis, client)
    )
    try:
        for _ in range(2):
            pipe = node.pipeline(transaction=False)
            pipe.evalsha(script.sha, len(keys), *keys, *args)
            pipe.wait(wait.replicas, wait.timeout_ms)
            replies = await pipe.execute(raise_on_error=False)
            if not isinstance(replies[0], NoScriptError):
                break
            await node.script_load(script.script)
    except (redis.ConnectionError, redis.TimeoutError):
        if cluster is not None:
            with contextlib.suppress(RedisError, RedisClusterException, OSError):
                await cluster.nodes_manager.initialize()
        raise
    if cluster is not None and isinstance(replies[0], MovedError):
        await cluster.nodes_manager.initialize()
    return replicated_reply(name, replies, wait)
