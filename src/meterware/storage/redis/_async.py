"""The asyncio request path of the Redis backend."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.cluster
import redis.sentinel
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from meterware.errors import StorageError
from meterware.metering.admission import AdmitRequest, Decision
from meterware.metering.records import KeyInfo
from meterware.storage import _keyspace as ks
from meterware.storage._admission import admit_call
from meterware.storage._once import without_events
from meterware.storage._url import parse_url
from meterware.storage.base import DEFAULT_TIMEOUT, Batch, ReplicaWait
from meterware.storage.redis._checks import aguard
from meterware.storage.redis._connection import (
    MAX_CONNECTIONS,
    AsyncClient,
    DriverErrors,
    async_client,
    client_options,
)
from meterware.storage.redis._replicas import MONEY_SCRIPTS, AsyncNodes, arun_waiting
from meterware.storage.redis._request import (
    ADMISSION_ROUNDS,
    ADMIT_ATTEMPTS,
    CUSTOMER_FIELDS,
    STALE,
    customer_from,
    decisions_from_replies,
    duplicates_in,
    fail_admissions,
    flush_call,
    flush_result,
    key_info_from,
    release_calls,
    renew_calls,
    settle_admissions,
)
from meterware.storage.redis._scripts import Arg, Fields, as_str, sources


class AsyncRedisStorage:
    """The Redis backend's request path for asyncio (ASGI): :class:`RedisStorage` with ``await``.

    The client is made on first use, on the running event loop (never at import or construction); a
    storage used from a new loop makes a new client there.
    """

    def __init__(
        self,
        url: str,
        *,
        shards: int = 16,
        timeout: float | None = None,
        allow_eviction: bool | None = None,
        replica_wait: ReplicaWait | None = None,
    ) -> None:
        self.shards = shards
        self._replica_wait = replica_wait
        self._allow_eviction = allow_eviction
        self._target = parse_url(url)
        self._timeout = DEFAULT_TIMEOUT if timeout is None else timeout
        self._errors = DriverErrors(self._target)
        self._client: AsyncClient | None = None
        self._sentinel: redis.asyncio.sentinel.Sentinel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots = asyncio.BoundedSemaphore(MAX_CONNECTIONS)
        self._starting = asyncio.Lock()
        self._started = False
        self._scripts: dict[str, AsyncScript] = {}
        options, auth = client_options(self._target, self._timeout)
        self._nodes = AsyncNodes({**options, **auth, "retry": AsyncRetry(NoBackoff(), 0)})
        self._admit_loop: asyncio.AbstractEventLoop | None = None
        self._waiting: list[tuple[AdmitRequest, asyncio.Future[Decision]]] = []
        self._admitters: set[asyncio.Task[None]] = set()

    async def _redis(self) -> AsyncClient:
        loop = asyncio.get_running_loop()
        client = self._client
        if client is None or self._loop is not loop:
            client, self._sentinel = async_client(self._target, self._timeout)
            self._scripts = {name: client.register_script(text) for name, text in sources()}
            self._slots, self._starting = asyncio.BoundedSemaphore(MAX_CONNECTIONS), asyncio.Lock()
            self._nodes = AsyncNodes(self._nodes.options)  # the old loop's clients are of no use here
            self._client, self._loop, self._started = client, loop, False
        if not self._started:
            # redis-py's asyncio cluster client breaks when many first commands race its lazy start
            # (seen with 8.1: "Connection closed by server"), so it starts once, before any command.
            async with self._starting:
                if not self._started and isinstance(client, redis.asyncio.cluster.RedisCluster):
                    await client.initialize()
                if not self._started and self._allow_eviction is not None:
                    # Once per process (see RedisStorage): failing to reach Redis leaves it for the next call.
                    wait_replicas = self._replica_wait.replicas if self._replica_wait else 0
                    await aguard(client, self._target.where, self._allow_eviction, wait_replicas)
                self._started = True
        return client

    @asynccontextmanager
    async def _call(self) -> AsyncIterator[AsyncClient]:
        """Run one operation: wait (within the timeout) for a free connection, translate driver errors."""
        with self._errors:
            async with asyncio.timeout(self._timeout):
                client = await self._redis()
                slots = self._slots
                await slots.acquire()
            try:
                yield client
            except redis.ConnectionError:
                # The server is gone or went away: drop the idle pooled connections to it, so none is met
                # dead later (the fault tests saw a key lookup fail with "Connection closed by server" a
                # second after Redis came back from a SIGKILL, on a connection pooled before it).
                if isinstance(client, redis.asyncio.Redis):
                    with contextlib.suppress(RedisError, OSError):  # closing dead sockets may complain
                        await client.connection_pool.disconnect(inuse_connections=False)
                raise
            finally:
                slots.release()

    async def _run(self, script: str, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        if self._replica_wait is not None and script in MONEY_SCRIPTS:
            client, wait = await self._redis(), self._replica_wait
            return await arun_waiting(client, self._nodes, script, self._scripts[script], keys, args, wait)
        return await self._scripts[script](keys=keys, args=args)

    async def resolve_key(self, key_hash: str) -> KeyInfo | None:
        async with self._call() as client:
            fields = await client.hgetall(ks.key_by_hash(key_hash))
            if not fields:
                return None
            customer_id = as_str(fields[b"customer"])
            shard = ks.shard_of(customer_id, self.shards)
            values = await client.hmget(ks.customer(shard, customer_id), CUSTOMER_FIELDS)
        return key_info_from(fields, customer_from(customer_id, values))

    async def resolve_customer(self, customer_id: str) -> KeyInfo | None:
        async with self._call() as client:
            shard = ks.shard_of(customer_id, self.shards)
            values = await client.hmget(ks.customer(shard, customer_id), CUSTOMER_FIELDS)
        customer = customer_from(customer_id, values)
        return None if customer is None else KeyInfo("", customer, True, "")

    async def admit(self, request: AdmitRequest) -> Decision:
        """Admit a call together with the calls of other requests that wait meanwhile.

        At most ``ADMISSION_ROUNDS`` rounds of admissions are in flight: calls that arrive meanwhile go
        together in the next, one script call per shard, so under load one round trip admits many calls
        and when idle a call goes at once. Each call is still decided on its own, in order, exactly as
        alone.
        """
        loop = asyncio.get_running_loop()
        if self._admit_loop is not loop:  # a new event loop: whatever waited on the old one is gone
            self._admit_loop, self._waiting, self._admitters = loop, [], set()
        future: asyncio.Future[Decision] = loop.create_future()
        self._waiting.append((request, future))
        if len(self._admitters) < ADMISSION_ROUNDS:
            self._admitters.add(loop.create_task(self._admit_waiting()))
        return await future

    async def _admit_waiting(self) -> None:
        try:
            while self._waiting:
                calls, self._waiting = self._waiting, []
                by_shard: dict[int, list[tuple[AdmitRequest, asyncio.Future[Decision]]]] = {}
                for call in calls:
                    by_shard.setdefault(call[0].shard, []).append(call)
                # Failures reach the callers through their futures; the next round goes on regardless.
                await asyncio.gather(
                    *(self._admit_shard(shard_calls) for shard_calls in by_shard.values()),
                    return_exceptions=True,
                )
        finally:
            # At once, not in a done callback: a call arriving in between would find no room for a
            # new round and wait for one that never starts.
            self._admitters.discard(asyncio.current_task())

    async def _admit_shard(self, calls: list[tuple[AdmitRequest, asyncio.Future[Decision]]]) -> None:
        try:
            for attempt in range(1, ADMIT_ATTEMPTS + 1):
                requests = [request for request, _ in calls]
                async with self._call():
                    # Read at the last moment: the calls this process finished until then count.
                    keys, args = admit_call(requests, guarded=attempt < ADMIT_ATTEMPTS)
                    replies = await self._run("admit", keys, args)
                decisions = decisions_from_replies(requests, replies, self._errors)
                settle_admissions([future for _, future in calls], decisions)
                calls = [call for call, decision in zip(calls, decisions, strict=True) if decision is STALE]
                if not calls:
                    return
        except StorageError as error:
            fail_admissions([future for _, future in calls], error)
            return
        except BaseException as error:
            for _, future in calls:
                if not future.done():
                    future.set_exception(error) if isinstance(error, Exception) else future.cancel()
            raise

    async def flush(self, batch: Batch) -> bool:
        while True:  # each pass takes out at least one event found charged before
            keys, args = flush_call(batch)
            async with self._call():
                reply = await self._run("flush", keys, args)
            duplicates = duplicates_in(reply)
            if not duplicates:
                return flush_result(batch, reply, self._errors)
            batch = without_events(batch, duplicates)

    async def release(self, admissions: Sequence[AdmitRequest]) -> int:
        async with self._call():
            replies = [await self._run("refund", keys, args) for keys, args in release_calls(admissions)]
        return sum(int(reply) for reply in replies)

    async def renew_reservations(self, admissions: Sequence[AdmitRequest]) -> int:
        calls = renew_calls(admissions)
        async with self._call():
            replies = [await self._run("renew_reservations", keys, args) for keys, args in calls]
        return sum(int(reply) for reply in replies)

    async def stored_plans(self) -> dict[str, str]:
        async with self._call() as client:
            fields: Fields = await client.hgetall(ks.stored_plans())
        return {as_str(name): as_str(record) for name, record in fields.items()}

    async def use_once(self, customer_id: str, token_id: str, expires_ms: int) -> bool:
        key = ks.portal_marker(ks.shard_of(customer_id, self.shards), customer_id, token_id)
        async with self._call() as client:
            return bool(await client.set(key, 1, nx=True, pxat=max(1, expires_ms)))

    async def is_used(self, customer_id: str, token_id: str) -> bool:
        key = ks.portal_marker(ks.shard_of(customer_id, self.shards), customer_id, token_id)
        async with self._call() as client:
            return bool(await client.exists(key))

    async def ready(self) -> None:
        """Connect and run the start-up check (at the ASGI lifespan's start-up)."""
        async with self._call():
            pass

    async def aclose(self) -> None:
        """Close the connections (the storage reconnects if used again)."""
        client, sentinel, self._client, self._sentinel = self._client, self._sentinel, None, None
        with self._errors:
            if client is not None:
                await client.aclose()
            for node in sentinel.sentinels if sentinel is not None else ():
                await node.aclose()
            await self._nodes.aclose()
