"""Clients for a Redis storage URL (one node, Sentinel or Cluster), and the one place driver errors turn
into :class:`~meterware.errors.StorageError`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Final, TypeAlias

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.cluster
import redis.sentinel
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.exceptions import RedisClusterException, RedisError, ResponseError
from redis.retry import Retry

from meterware.errors import StorageError
from meterware.storage import _keyspace as ks
from meterware.storage._url import RedisTarget, parse_url
from meterware.storage.base import ReplicaWait
from meterware.storage.redis._checks import guard
from meterware.storage.redis._replicas import MONEY_SCRIPTS, run_waiting
from meterware.storage.redis._scripts import Arg, sources

#: Seconds each call may take when the caller gives no timeout (the worker and the CLI).
DEFAULT_TIMEOUT: Final = 5.0
#: Calls in flight per storage object; more wait (within the timeout) instead of opening connections
#: without bound. Each connection pool (one per cluster node) is this large.
MAX_CONNECTIONS: Final = 64

SyncClient: TypeAlias = "redis.Redis | redis.cluster.RedisCluster"
AsyncClient: TypeAlias = "redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster"


def check_url(url: str) -> None:
    """Raise ``ValueError`` if the driver could not use ``url`` (no I/O; no password in the message)."""
    target = parse_url(url)
    try:
        target.where  # noqa: B018  # reads the port of a redis:// URL
        if target.kind == "url":
            redis.Redis.from_url(url).close()  # the driver's own checks (port range, options)
    except ValueError as error:
        text = str(error).replace(target.password, "***") if target.password else str(error)
        raise ValueError(f"storage URL: {text}") from None


def client_options(target: RedisTarget, timeout: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """The connection options and the credentials of a client of ``target``."""
    # No retries and short timeouts: the request path fails fast and its own policy decides what next.
    options = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "max_connections": MAX_CONNECTIONS,
    }
    return options, {"username": target.username, "password": target.password}


def sync_client(target: RedisTarget, timeout: float) -> tuple[SyncClient, redis.sentinel.Sentinel | None]:
    options, auth = client_options(target, timeout)
    retry = Retry(NoBackoff(), 0)
    if target.kind == "cluster":
        nodes = [redis.cluster.ClusterNode(host, port) for host, port in target.hosts]  # type: ignore[no-untyped-call]
        return redis.cluster.RedisCluster(startup_nodes=nodes, retry=retry, **auth, **options), None
    if target.kind == "sentinel":
        # Sentinel is untyped before redis-py 6 and typed since: called through Any, both pass mypy.
        untyped_sentinel: Any = redis.sentinel.Sentinel
        sentinel = untyped_sentinel(list(target.hosts), sentinel_kwargs=dict(options), **options)
        client: redis.Redis = sentinel.master_for(target.service, db=target.db, retry=retry, **auth)
        return client, sentinel
    return redis.Redis.from_url(target.url, retry=retry, **options), None


def async_client(
    target: RedisTarget, timeout: float
) -> tuple[AsyncClient, redis.asyncio.sentinel.Sentinel | None]:
    options, auth = client_options(target, timeout)
    retry = AsyncRetry(NoBackoff(), 0)
    if target.kind == "cluster":
        nodes = [redis.asyncio.cluster.ClusterNode(host, port) for host, port in target.hosts]
        client = redis.asyncio.cluster.RedisCluster(startup_nodes=nodes, retry=retry, **auth, **options)
        return client, None
    if target.kind == "sentinel":
        # As the synchronous one: untyped before redis-py 6, typed since.
        untyped_sentinel: Any = redis.asyncio.sentinel.Sentinel
        sentinel: redis.asyncio.sentinel.Sentinel = untyped_sentinel(
            list(target.hosts), sentinel_kwargs=dict(options), **options
        )
        return sentinel.master_for(target.service, db=target.db, retry=retry, **auth), sentinel
    return redis.asyncio.Redis.from_url(target.url, retry=retry, **options), None


class DriverErrors:
    """Turn every failure of the driver into one :class:`StorageError`: one line, no password."""

    def __init__(self, target: RedisTarget) -> None:
        self.where = target.where
        self.secrets = tuple(secret for secret in (target.password,) if secret)

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if isinstance(error, RedisError | RedisClusterException | OSError):
            # The scripts' own refusals: they checked everything and wrote nothing.
            refused = isinstance(error, ResponseError) and str(error).startswith(("WRONGTYPE", "BADVALUE"))
            raise StorageError(self.message(error), refused=refused) from error

    def message(self, error: BaseException) -> str:
        text = " ".join(str(error).split())
        for secret in self.secrets:
            text = text.replace(secret, "***")
        # Long enough for a script's refusal naming its longest key (a customer id is up to 128 characters).
        return f"Redis at {self.where}: {type(error).__name__}: {text[:400]}"


class Connection:
    """A synchronous connection to the Redis backend: every operation goes through ``_call``.

    ``timeout`` (seconds) bounds connecting and every call; nothing is retried. No connection is made
    until the first call. ``allow_eviction``: unless ``None`` (the tools), the first call checks, once per
    process, that Redis keeps the money (:mod:`._checks`). ``replica_wait``: the money scripts wait for
    replicas (:mod:`._replicas`).
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
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._client: SyncClient | None = None
        self._sentinel: redis.sentinel.Sentinel | None = None
        self._scripts: dict[str, Script] = {}

    def _redis(self) -> SyncClient:
        client = self._client
        if client is None:
            with self._lock:
                client = self._client
                if client is None:
                    client, self._sentinel = sync_client(self._target, self._timeout)
                    self._scripts = {name: client.register_script(text) for name, text in sources()}
                    self._client = client
        if self._allow_eviction is not None:
            # Not marked checked on failure: an unreachable Redis is checked when it is first reached.
            wait_replicas = self._replica_wait.replicas if self._replica_wait else 0
            guard(client, self._target.where, self._allow_eviction, wait_replicas)
            self._allow_eviction = None
        return client

    @contextmanager
    def _call(self) -> Iterator[SyncClient]:
        """Run one operation: wait (within the timeout) for a free connection, translate driver errors."""
        with self._errors:
            if not self._slots.acquire(timeout=self._timeout):
                raise TimeoutError(f"no free connection within {self._timeout}s")
            client: SyncClient | None = None
            try:
                client = self._redis()
                yield client
            except redis.ConnectionError:
                # As in the asyncio client: drop the idle pooled connections to a server that went away.
                if isinstance(client, redis.Redis):
                    with contextlib.suppress(RedisError, OSError):
                        client.connection_pool.disconnect(inuse_connections=False)
                raise
            finally:
                self._slots.release()

    def _run(self, script: str, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        if self._replica_wait is not None and script in MONEY_SCRIPTS and self._client is not None:
            return run_waiting(self._client, self._scripts[script], keys, args, self._replica_wait)
        return self._scripts[script](keys=keys, args=args)

    def _shard(self, customer_id: str) -> int:
        return ks.shard_of(customer_id, self.shards)

    def close(self) -> None:
        """Close the connections (the storage reconnects if used again)."""
        with self._lock:
            client, sentinel, self._client, self._sentinel = self._client, self._sentinel, None, None
        with self._errors:
            if client is not None:
                client.close()
            for node in sentinel.sentinels if sentinel is not None else ():
                node.close()
