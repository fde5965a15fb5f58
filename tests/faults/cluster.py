"""A fault test's Redis Cluster with replicas: its topology, a primary killed, a slot moved by hand.

Every node is a redis-server process the test started (tests/servers.py); each signal goes to its PID.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.crc import key_slot

from meterware.storage import _keyspace
from tests.faults.books import Books, Stream, books
from tests.faults.scenario import base_config, open_accounts, provision
from tests.helpers import merged, to_toml
from tests.servers import RedisClusterServers, RedisServer, info_fields, redis_cli


@contextmanager
def cluster_with_replicas(node_timeout_ms: int) -> Iterator[RedisClusterServers]:
    """3 primaries with a replica each, in sync, failing a silent node after ``node_timeout_ms``.

    ``free_port()`` cannot hold a port until redis-server binds it: a client socket of another process may
    take one meanwhile (a node then fails to bind its cluster bus port, and the cluster cannot be made).
    The cluster is then made again on new ports, three times at most.
    """
    failures: list[str] = []
    for _ in range(3):
        servers = RedisClusterServers(3, replicas=1)
        try:
            servers.start()
        except (subprocess.CalledProcessError, TimeoutError) as error:
            servers.cleanup()
            failures.append(str(getattr(error, "stdout", "") or error)[-600:])
            continue
        try:
            configure(servers, "cluster-node-timeout", str(node_timeout_ms))
            yield servers
        finally:
            servers.cleanup()
        return
    raise RuntimeError("no cluster could be made:\n" + "\n".join(failures))


@dataclass(frozen=True, slots=True)
class Node:
    """One line of ``CLUSTER NODES``."""

    id: str
    port: int
    flags: frozenset[str]
    slots: tuple[range, ...]

    @property
    def serving(self) -> bool:
        """A primary believed up, holding slots."""
        return "master" in self.flags and not {"fail", "fail?"} & self.flags and bool(self.slots)


def parse_nodes(text: str) -> list[Node]:
    nodes = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split()
        slots = []
        for part in fields[8:]:
            if part.startswith("["):  # a slot being imported or migrated: still owned as listed elsewhere
                continue
            first, _, last = part.partition("-")
            slots.append(range(int(first), int(last or first) + 1))
        port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
        nodes.append(Node(fields[0], port, frozenset(fields[2].split(",")), tuple(slots)))
    return nodes


def live(cluster: RedisClusterServers) -> list[RedisServer]:
    return [server for server in cluster.nodes if server.process is not None]


def topology(server: RedisServer) -> list[Node]:
    """The cluster as ``server`` sees it."""
    return parse_nodes(redis_cli("-p", str(server.port), "cluster", "nodes"))


def node_id(server: RedisServer) -> str:
    return redis_cli("-p", str(server.port), "cluster", "myid").strip()


def owner(cluster: RedisClusterServers, slot: int) -> RedisServer:
    """The primary serving ``slot``, as the first live node sees it."""
    for node in topology(live(cluster)[0]):
        if node.serving and any(slot in slots for slots in node.slots):
            return next(server for server in cluster.nodes if server.port == node.port)
    raise LookupError(f"no primary serves slot {slot}")


def shard_slot(shard: int) -> int:
    """The hash slot of every key of a meterware shard (its hash tag)."""
    return key_slot(_keyspace.events(shard).encode())


def configure(cluster: RedisClusterServers, name: str, value: str) -> None:
    """``CONFIG SET`` on every live node."""
    for server in live(cluster):
        redis_cli("-p", str(server.port), "config", "set", name, value)


def sigkill(server: RedisServer) -> None:
    """SIGKILL: no shutdown, no save; what its replica had not received is gone."""
    assert server.process is not None
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(timeout=10)
    server.process = None


def replica_of(cluster: RedisClusterServers, primary: RedisServer) -> RedisServer:
    """The replica of ``primary``, as the replicas say (the primary's cluster view may lag behind)."""
    for server in live(cluster):
        replication = info_fields(redis_cli("-p", str(server.port), "info", "replication"))
        if replication["role"] == "slave" and replication["master_port"] == str(primary.port):
            return server
    raise LookupError(f"127.0.0.1:{primary.port} has no replica")


@contextmanager
def cut_off(primary: RedisServer, replica: RedisServer) -> Iterator[None]:
    """Hold ``replica`` behind ``primary``: stop it (SIGSTOP, shorter than the node timeout) and drop its
    link, so the primary goes on acknowledging writes the replica never gets; let it go (SIGCONT) at the
    end. What was sent before the cut still reaches it."""
    assert replica.process is not None
    replica.process.send_signal(signal.SIGSTOP)
    try:
        redis_cli("-p", str(primary.port), "client", "kill", "type", "replica")
        yield
    finally:
        replica.process.send_signal(signal.SIGCONT)


def wait_for_failover(
    cluster: RedisClusterServers, dead: RedisServer, slots: list[int], timeout: float
) -> float:
    """Wait until every live node sees ``slots`` served by a primary other than ``dead`` and the cluster
    ok; return the seconds it took."""
    began = time.monotonic()
    while True:
        views = [topology(server) for server in live(cluster)]
        states = [info_fields(redis_cli("-p", str(s.port), "cluster", "info")) for s in live(cluster)]
        if all(state["cluster_state"] == "ok" for state in states) and all(
            any(
                node.serving and node.port != dead.port and any(slot in r for r in node.slots)
                for node in view
            )
            for view in views
            for slot in slots
        ):
            return time.monotonic() - began
        if time.monotonic() - began > timeout:
            raise TimeoutError(f"no failover after {timeout}s")
        time.sleep(0.05)


def wait_for_replica(server: RedisServer, timeout: float) -> float:
    """Wait until ``server`` is a replica in sync with its primary; return the seconds it took."""
    began = time.monotonic()
    while True:
        replication = info_fields(redis_cli("-p", str(server.port), "info", "replication"))
        if (
            replication.get("role") == "slave"
            and replication.get("master_link_status") == "up"
            and replication.get("master_sync_in_progress") == "0"
        ):
            return time.monotonic() - began
        if time.monotonic() - began > timeout:
            raise TimeoutError(f"127.0.0.1:{server.port} is no replica in sync after {timeout}s")
        time.sleep(0.05)


@dataclass(slots=True)
class Migration:
    """What moving a slot took."""

    keys: int
    seconds: float


def move_slot(cluster: RedisClusterServers, slot: int, target: RedisServer, *, seconds: float) -> Migration:
    """Move ``slot`` to the primary ``target`` by hand, as ``redis-cli --cluster reshard`` does but one key
    per ``MIGRATE``, spread over about ``seconds``: IMPORTING, MIGRATING, the keys, then ``SETSLOT NODE``
    on the target, the source and every other primary."""
    source = owner(cluster, slot)
    source_id, target_id = node_id(source), node_id(target)
    began = time.monotonic()
    redis_cli("-p", str(target.port), "cluster", "setslot", str(slot), "importing", source_id)
    redis_cli("-p", str(source.port), "cluster", "setslot", str(slot), "migrating", target_id)
    # Once the slot is migrating, the source makes no new key in it: the count only goes down.
    pause = seconds / max(1, keys_in_slot(source, slot))
    client = redis.Redis(port=source.port, socket_timeout=10)
    moved = 0
    try:
        while keys := client.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1):
            client.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
            time.sleep(pause)
    finally:
        client.close()
    others = [server for server in primaries(cluster) if server not in (target, source)]
    for server in [target, source, *others]:
        redis_cli("-p", str(server.port), "cluster", "setslot", str(slot), "node", target_id)
    return Migration(moved, time.monotonic() - began)


def is_primary(server: RedisServer) -> bool:
    return info_fields(redis_cli("-p", str(server.port), "info", "replication"))["role"] == "master"


def primaries(cluster: RedisClusterServers) -> list[RedisServer]:
    return [server for server in live(cluster) if is_primary(server)]


def keys_in_slot(server: RedisServer, slot: int) -> int:
    return int(redis_cli("-p", str(server.port), "cluster", "countkeysinslot", str(slot)).strip())


class ClusterDeployment:
    """The fault suite's base configuration on the ``redis+cluster://`` URL of ``cluster`` (with
    ``changes``), and ``customers`` each with credits and a live key (``keys``)."""

    def __init__(
        self, tmp_path: Path, cluster: RedisClusterServers, customers: list[str], changes: dict[str, object]
    ) -> None:
        self.cluster = cluster
        self.spool = tmp_path / "spool"
        self.config = tmp_path / "meterware.toml"
        self.config.write_text(to_toml(merged(base_config(cluster.url, self.spool), changes)))
        self.rollup_log = tmp_path / "rollup.log"
        accounts = open_accounts(self.config)
        try:
            self.keys = {customer: provision(accounts, customer).plaintext for customer in customers}
        finally:
            accounts.close()

    def client(self) -> redis.RedisCluster:
        """A cluster client of the test's own (found through a live node)."""
        return redis.RedisCluster(host="127.0.0.1", port=live(self.cluster)[0].port, socket_timeout=10)

    def stream(self) -> Stream:
        client = self.client()
        try:
            return Stream.read(client)
        finally:
            client.close()

    def books(self, customer: str) -> Books:
        accounts = open_accounts(self.config)
        try:
            return books(accounts, customer)
        finally:
            accounts.close()
