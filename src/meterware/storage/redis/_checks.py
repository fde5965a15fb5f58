"""Whether a Redis keeps the money: its eviction policy, persistence, version and replicas, checked on every
primary.

:func:`findings` is pure (what each node reported in, findings out); :func:`read_nodes` and
:func:`aread_nodes` ask the nodes; :func:`guard` and :func:`aguard` run the check once per process before
the app or the worker first uses Redis, log its warnings once and refuse an evicting policy.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

import redis.asyncio.cluster
import redis.cluster
from redis.exceptions import ResponseError

from meterware.errors import UnsafeStorageError

if TYPE_CHECKING:
    from meterware.storage.redis._connection import AsyncClient, SyncClient

logger = logging.getLogger("meterware.storage")

Level = Literal["ok", "info", "warning", "error"]
MIN_VERSION: Final = 7
ALLOW_SETTING: Final = "[storage] allow_eviction = true"

# Why any policy but noeviction loses money: allkeys-* evict any key (a balance, a ledger, an API key);
# volatile-* only keys with a TTL, but meterware gives one to its quota counters (EXPIREAT at the period's
# end), rate-limit state, usage windows, shard claims, alert markers and export marks.
_WHY: Final = {
    "allkeys": "evicts any key: a balance, a ledger or an API key evicted is money lost",
    "volatile": (
        "evicts keys that carry a TTL, and meterware's quota counters, rate limits and usage windows do "
        "(an evicted quota counter gives a customer its quota again)"
    ),
}


@dataclass(frozen=True, slots=True)
class NodeReport:
    """What one primary answered: ``INFO`` (default sections) and ``CONFIG GET`` (``None``: refused)."""

    address: str
    info: Mapping[str, Any]
    config: Mapping[str, str] | None


@dataclass(frozen=True, slots=True)
class Finding:
    """One check on one node: ``ok``, ``info``, ``warning`` or ``error``, and what it found."""

    level: Level
    check: str
    node: str
    message: str


def _policy(node: NodeReport, allow_eviction: bool) -> list[Finding]:
    found: list[Finding] = []
    policy = node.config.get("maxmemory-policy") if node.config is not None else None
    if node.config is None:
        policy = node.info.get("maxmemory_policy")
        found.append(
            Finding(
                "info",
                "config",
                node.address,
                "CONFIG is refused (managed Redis renames it): the policy was read from INFO memory, "
                "the RDB save schedule could not be checked",
            )
        )
    if policy is None:
        found.append(Finding("warning", "policy", node.address, "maxmemory-policy could not be read"))
    elif policy == "noeviction":
        found.append(Finding("ok", "policy", node.address, "maxmemory-policy noeviction"))
    else:
        why = _WHY["volatile" if str(policy).startswith("volatile") else "allkeys"]
        if allow_eviction:
            text = f"maxmemory-policy {policy} {why}; allowed by storage.allow_eviction"
            found.append(Finding("warning", "policy", node.address, text))
        else:
            text = (
                f"maxmemory-policy {policy} {why}; set it to noeviction, or set {ALLOW_SETTING} to run anyway"
            )
            found.append(Finding("error", "policy", node.address, text))
    return found


def _persistence(node: NodeReport) -> Finding:
    aof = str(node.info.get("aof_enabled", "0")) == "1"
    save = node.config.get("save") if node.config is not None else None
    if aof:
        rdb = f", RDB save {save!r}" if save else ""
        return Finding("ok", "persistence", node.address, f"AOF on{rdb}")
    if save:
        text = f"RDB snapshots (save {save!r}), AOF off: a crash loses the writes since the last snapshot"
        return Finding("ok", "persistence", node.address, text)
    if save is None:
        text = "AOF off and the RDB save schedule unknown: a restart may lose every balance and ledger"
        return Finding("warning", "persistence", node.address, text)
    text = "no persistence (neither AOF nor RDB): a restart loses every balance and ledger"
    return Finding("warning", "persistence", node.address, text)


def _version(node: NodeReport) -> Finding:
    version = str(node.info.get("redis_version", ""))
    major = version.partition(".")[0]
    if not major.isdigit():
        return Finding("warning", "version", node.address, f"version {version or 'unknown'} not understood")
    if int(major) < MIN_VERSION:
        text = f"Redis {version}: meterware needs {MIN_VERSION}.0 or later (its scripts' flags)"
        return Finding("error", "version", node.address, text)
    return Finding("ok", "version", node.address, f"Redis {version}")


def _replicas(node: NodeReport, wait_replicas: int) -> Finding:
    replicas = int(node.info.get("connected_slaves", 0))
    if wait_replicas == 0:
        if replicas == 0:
            text = "no replica: if this node is lost, what it holds is lost with it (since its last save)"
        else:
            text = (
                f"{replicas} replica(s), storage.wait_replicas off: a failover can lose the last writes "
                "acknowledged before it (charges, ledger entries)"
            )
        return Finding("info", "replicas", node.address, text)
    if replicas < wait_replicas:
        text = (
            f"{replicas} replica(s) connected, storage.wait_replicas = {wait_replicas}: no flush is "
            "acknowledged until enough are (batches wait in the flusher and its spool)"
        )
        return Finding("warning", "replicas", node.address, text)
    text = f"{replicas} replica(s) connected; money writes wait for {wait_replicas}"
    return Finding("ok", "replicas", node.address, text)


def findings(
    nodes: Sequence[NodeReport], *, allow_eviction: bool = False, wait_replicas: int = 0
) -> list[Finding]:
    """The findings on every node: policy, persistence, version, replicas."""
    found: list[Finding] = []
    for node in nodes:
        found += _policy(node, allow_eviction)
        found.append(_persistence(node))
        found.append(_version(node))
        found.append(_replicas(node, wait_replicas))
    return found


def _config(answer: Any) -> Mapping[str, str]:
    return {str(k): str(v) for k, v in answer.items()}


def _address(kwargs: Mapping[str, Any]) -> str:
    if "path" in kwargs:
        return str(kwargs["path"])
    return f"{kwargs['host']}:{kwargs.get('port', 6379)}"


def read_nodes(client: SyncClient) -> list[NodeReport]:
    """Ask every primary (one node, or each primary of a cluster); driver errors propagate."""
    if isinstance(client, redis.cluster.RedisCluster):
        targets: list[tuple[str, dict[str, Any]]] = [
            (node.name, {"target_nodes": node})
            for node in client.get_primaries()  # type: ignore[no-untyped-call]
        ]
    else:
        pool: Any = client.connection_pool
        # A Sentinel's client finds its primary when it connects: its options name no host.
        found = pool.get_master_address() if hasattr(pool, "get_master_address") else None
        address = f"{found[0]}:{found[1]}" if found else _address(pool.connection_kwargs)
        targets = [(address, {})]
    reports = []
    for address, where in targets:
        info = client.info(**where)
        try:
            config: Mapping[str, str] | None = _config(client.config_get("maxmemory-policy", "save", **where))
        except ResponseError:
            config = None
        reports.append(NodeReport(address, info, config))
    return reports


async def aread_nodes(client: AsyncClient) -> list[NodeReport]:
    """The asyncio twin of :func:`read_nodes`."""
    if isinstance(client, redis.asyncio.cluster.RedisCluster):
        targets: list[tuple[str, dict[str, Any]]] = [
            (node.name, {"target_nodes": node}) for node in client.get_primaries()
        ]
    else:
        pool: Any = client.connection_pool
        found = await pool.get_master_address() if hasattr(pool, "get_master_address") else None
        address = f"{found[0]}:{found[1]}" if found else _address(pool.connection_kwargs)
        targets = [(address, {})]
    reports = []
    for address, where in targets:
        info = await client.info(**where)
        try:
            answer = await client.config_get("maxmemory-policy", "save", **where)
            config: Mapping[str, str] | None = _config(answer)
        except ResponseError:
            config = None
        reports.append(NodeReport(address, info, config))
    return reports


#: What the check found for each (target, allow_eviction, wait_replicas), once per process.
_checked: dict[tuple[str, bool, int], list[Finding]] = {}
_checked_lock = threading.Lock()


def _settle(check: tuple[str, bool, int], found: list[Finding]) -> None:
    """Log the warnings (the first time) and raise on an error."""
    where = check[0]
    with _checked_lock:
        first = check not in _checked
        if first:
            _checked[check] = found
    if first:
        for finding in found:
            if finding.level == "warning":
                logger.warning("%s: %s", _at(where, finding), finding.message)
    refuse(where, found)


def _at(where: str, finding: Finding) -> str:
    """The Redis a finding is about: the URL, and the node when the URL does not name it."""
    return f"Redis at {where}" if finding.node in where else f"Redis at {where} ({finding.node})"


def refuse(where: str, found: Sequence[Finding]) -> None:
    """Raise :class:`UnsafeStorageError` with the first error found, if any."""
    for finding in found:
        if finding.level == "error":
            raise UnsafeStorageError(f"{_at(where, finding)}: {finding.message}")


def guard(client: SyncClient, where: str, allow_eviction: bool, wait_replicas: int = 0) -> None:
    """Check the Redis at ``where`` once per process: log its warnings, refuse what loses money."""
    check = (where, allow_eviction, wait_replicas)
    found = _checked.get(check)
    if found is None:
        found = findings(read_nodes(client), allow_eviction=allow_eviction, wait_replicas=wait_replicas)
    _settle(check, found)


async def aguard(client: AsyncClient, where: str, allow_eviction: bool, wait_replicas: int = 0) -> None:
    """The asyncio twin of :func:`guard`."""
    check = (where, allow_eviction, wait_replicas)
    found = _checked.get(check)
    if found is None:
        found = findings(
            await aread_nodes(client), allow_eviction=allow_eviction, wait_replicas=wait_replicas
        )
    _settle(check, found)
