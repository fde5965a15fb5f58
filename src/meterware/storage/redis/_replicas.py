"""``[storage] wait_replicas``: the writes that move money are acknowledged only once replicas hold them.

``WAIT`` counts from the last write of the connection it is sent on, so it goes in one pipeline with the
script, to the node holding the script's keys. A script that finds its write already made (a retry)
writes its marker again (``common.lua``), so the ``WAIT`` after it covers the first write too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.commands.core import AsyncScript, Script
from redis.exceptions import AskError, MovedError, NoScriptError, RedisClusterException, RedisError

from meterware.storage.base import ReplicaWait
from meterware.storage.redis._scripts import Arg

#: The scripts a failover must not lose once acknowledged: what they write is money or the books. The
#: others are recomputed or repeated from what survives (a lost refund leaves its reservation, which the
#: worker refunds again; a lost rollup commit is folded again from the stream).
MONEY_SCRIPTS: Final = frozenset(
    {"flush", "grant_credits", "expire_grants", "correct", "import_events", "close_period"}
)


class NotReplicated(RedisError):
    """Fewer replicas than ``wait_replicas`` confirmed a write within ``wait_timeout``."""


def checked(replies: list[Any], wait: ReplicaWait) -> Any:
    """The script's reply, once ``WAIT`` answered that enough replicas have its write."""
    reply, acknowledged = replies
    for answer in replies:
        if isinstance(answer, Exception):
            raise answer
    if acknowledged < wait.replicas:
        raise NotReplicated(
            f"the write is on the primary but {acknowledged} of {wait.replicas} replica(s) confirmed it "
            f"within {wait.timeout:g}s (storage.wait_replicas): not acknowledged, it is retried"
        )
    return reply


def run_waiting(
    client: redis.Redis | redis.cluster.RedisCluster,
    script: Script,
    keys: Sequence[str],
    args: Sequence[Arg],
    wait: ReplicaWait,
) -> Any:
    """Run ``script`` then ``WAIT`` on one connection of the node holding ``keys``."""
    if isinstance(client, redis.cluster.RedisCluster):
        cluster: Any = client  # its node lookups carry no annotations
        node: redis.Redis = cluster.get_redis_connection(cluster.get_node_from_key(keys[0]))
    else:
        node = client
    for _ in range(2):
        pipe = node.pipeline(transaction=False)
        pipe.evalsha(script.sha, len(keys), *keys, *args)
        pipe.wait(wait.replicas, wait.timeout_ms)
        replies = pipe.execute(raise_on_error=False)
        if not isinstance(replies[0], NoScriptError):
            break
        node.script_load(script.script)
    if isinstance(client, redis.cluster.RedisCluster) and isinstance(replies[0], MovedError | AskError):
        client.nodes_manager.initialize()  # the slot moved: the next try goes to its new node
    return checked(replies, wait)


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
    script: AsyncScript,
    keys: Sequence[str],
    args: Sequence[Arg],
    wait: ReplicaWait,
) -> Any:
    """The asyncio twin of :func:`run_waiting`."""
    if isinstance(client, redis.asyncio.cluster.RedisCluster):
        node = nodes.of(client.get_node_from_key(keys[0]))
    else:
        node = client
    for _ in range(2):
        pipe = node.pipeline(transaction=False)
        pipe.evalsha(script.sha, len(keys), *keys, *args)
        pipe.wait(wait.replicas, wait.timeout_ms)
        replies = await pipe.execute(raise_on_error=False)
        if not isinstance(replies[0], NoScriptError):
            break
        await node.script_load(script.script)
    if isinstance(client, redis.asyncio.cluster.RedisCluster) and isinstance(
        replies[0], MovedError | AskError
    ):
        await client.nodes_manager.initialize()
    return checked(replies, wait)
