"""Redis Cluster with replicas (3 primaries, 3 replicas) under traffic: a primary killed, a slot moved.

The metered app serves on the ``redis+cluster://`` URL, one customer per shard, so every primary holds
money; a rollup worker runs throughout. Then the load stops, the app drains (SIGTERM), a last rollup runs,
and the books are compared customer by customer: client-seen successes, the rollup, the charges.

Failover: the primary holding the most customers is SIGKILLed; its replica is promoted
(``cluster-node-timeout`` 1 s) and the killed node comes back as its replica. Replication is asynchronous:
without ``WAIT`` a flush the primary acknowledged but had not yet sent to its replica is lost with it (the
flusher took it as written). Such a loss is bounded: only calls of the killed primary's customers that
ended just before the kill, each lost whole (its event and its charge go together: one script, replicated
as one transaction), so a customer is never charged for a call without an event, and nothing counts twice.

Resharding: the slot of one customer's shard (every key of the shard shares its hash tag) is moved to
another primary by hand, a few keys per ``MIGRATE``, while the app and the worker write to it. A script
whose keys are split between the two nodes gets ``TRYAGAIN``; the driver retries, then the call fails as a
backend error: the event waits in the spool and is replayed once the slot has moved.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from meterware.storage._keyspace import shard_of
from tests.faults.books import assert_exact, spool_bytes
from tests.faults.cluster import (
    ClusterDeployment,
    configure,
    keys_in_slot,
    move_slot,
    owner,
    primaries,
    shard_slot,
    sigkill,
    wait_for_failover,
    wait_for_replica,
)
from tests.faults.harness import (
    CALL_PRICE,
    MIXED_PATHS,
    SHARDS,
    TOKEN_PRICE,
    App,
    Load,
    Worker,
    base_env,
    figures,
    rollup_once,
    tokens_of,
    wait_until,
)
from tests.servers import RedisClusterServers, RedisServer, redis_cluster

pytestmark = [pytest.mark.faults, pytest.mark.redis, pytest.mark.slow]

#: Milliseconds before a silent node is taken as failing; its replica is promoted about a second later.
NODE_TIMEOUT_MS = 1000
#: A lost call ended at most this long before the kill: one flush interval, then the replication lag.
LOSS_WINDOW_SECONDS = 1.0


def customer_per_shard() -> list[str]:
    """One customer id on each shard."""
    found: dict[int, str] = {}
    for number in itertools.count():
        found.setdefault(shard_of(f"cust-{number}", SHARDS), f"cust-{number}")
        if len(found) == SHARDS:
            return [found[shard] for shard in range(SHARDS)]
    raise AssertionError("unreachable")


def customer_slot(customer: str) -> int:
    return shard_slot(shard_of(customer, SHARDS))


@pytest.fixture
def cluster() -> Iterator[RedisClusterServers]:
    """A fresh cluster of 3 primaries and 3 replicas (in sync), failing over within about 2 s."""
    with redis_cluster(3, replicas=1) as servers:
        configure(servers, "cluster-node-timeout", str(NODE_TIMEOUT_MS))
        yield servers


class Traffic:
    """The app, a rollup worker and one load per customer (2 client threads each)."""

    def __init__(
        self,
        deployment: ClusterDeployment,
        make_app: Callable[..., App],
        make_worker: Callable[..., Worker],
    ) -> None:
        self.deployment = deployment
        self.env = base_env(deployment.config)
        self.app = make_app("uvicorn", self.env).start()
        self.worker = make_worker(self.env)
        self.loads = {
            customer: Load(self.app.url, key, MIXED_PATHS, threads=2)
            for customer, key in deployment.keys.items()
        }
        self._running = ExitStack()

    def __enter__(self) -> Traffic:
        for load in self.loads.values():
            self._running.enter_context(load)
        return self

    def __exit__(self, *exc: object) -> None:
        self._running.close()

    def settle(self, tmp_path: Path, since: float) -> dict[str, float]:
        """After the load: the app's metrics, the spool replayed, the app drained, the worker stopped,
        reservations due (``since`` + 2.2 s) refunded, and a last rollup."""
        metrics = self.app.metrics()
        wait_until(lambda: spool_bytes(self.deployment.spool) == 0, 20, "the spool was never replayed")
        self.app.stop()
        assert self.worker.terminate() == 0, self.worker.output()
        time.sleep(max(0.0, since + 2.2 - time.monotonic()))
        rollup_once(self.env, tmp_path / "rollup.log")
        return metrics

    def requests(self) -> int:
        return sum(len(load.snapshot()) for load in self.loads.values())

    def succeeded(self, customer: str) -> set[str]:
        return self.loads[customer].paths(200)

    def answered(self) -> set[int | None]:
        return {result.status for load in self.loads.values() for result in load.snapshot()}


def flush_figures(metrics: dict[str, float]) -> dict[str, int]:
    return {
        "flush_errors": int(metrics.get('meterware_backend_errors_total{operation="flush"}', 0)),
        "admit_errors": int(metrics.get('meterware_backend_errors_total{operation="admit"}', 0)),
        "events_spooled": int(metrics.get("meterware_events_spooled_total", 0)),
        "batches_replayed": int(metrics.get("meterware_batches_replayed_total", 0)),
    }


def test_primary_killed_under_load_without_wait(
    cluster: RedisClusterServers,
    tmp_path: Path,
    make_app: Callable[..., App],
    make_worker: Callable[..., Worker],
) -> None:
    """A primary SIGKILLed under load, WAIT off: the loss is measured, bounded to calls of its customers
    that ended just before the kill, each lost whole (never charged without its event), nothing twice."""
    customers = customer_per_shard()
    deployment = ClusterDeployment(tmp_path, cluster, customers, {})
    owners = {customer: owner(cluster, customer_slot(customer)) for customer in customers}
    victim = max(set(owners.values()), key=lambda server: list(owners.values()).count(server))
    on_victim = [customer for customer in customers if owners[customer] is victim]

    with Traffic(deployment, make_app, make_worker) as traffic:
        time.sleep(1.5)
        sigkill(victim)
        killed = time.monotonic()
        failover = wait_for_failover(cluster, victim, [customer_slot(c) for c in on_victim], timeout=20)
        restart_as_replica(cluster, victim)
        time.sleep(1.5)
    metrics = traffic.settle(tmp_path, killed)

    stream = deployment.stream()
    stream.assert_no_duplicates()
    assert traffic.answered() <= {200, 503}, "a request failed another way than the app's own 503s"
    lost_calls: dict[str, int] = {}
    for customer in customers:
        mine = stream.of(customer)
        ledger = deployment.books(customer)
        succeeded = traffic.succeeded(customer)
        recorded = mine.paths("success")
        assert recorded <= succeeded, "an event of a call the client did not see succeed"
        lost = succeeded - recorded
        lost_calls[customer] = len(lost)
        if customer not in on_victim:
            assert not lost, f"{customer} (on a surviving primary) lost {len(lost)} calls"
        ended = {r.path.split("?")[0]: r.at for r in traffic.loads[customer].snapshot()}
        late = [path for path in lost if not killed - LOSS_WINDOW_SECONDS <= ended[path] <= killed]
        assert not late, f"{customer} lost calls that ended outside the window before the kill: {late[:5]}"
        # The rollup and the charges are the events that exist: a lost call is lost whole.
        assert ledger.calls["success"] == len(recorded)
        expected = len(recorded) * CALL_PRICE + tokens_of(recorded) * TOKEN_PRICE
        assert ledger.spend == mine.charged() == ledger.charged == expected
        assert ledger.reserved == 0, "reservations left open"
    figures(
        "cluster-failover-no-wait",
        requests=traffic.requests(),
        succeeded=sum(len(traffic.succeeded(c)) for c in customers),
        events=len(stream.events),
        customers_on_killed_primary=len(on_victim),
        lost_calls=sum(lost_calls.values()),
        failover_seconds=round(failover, 2),
        **flush_figures(metrics),
    )


def restart_as_replica(cluster: RedisClusterServers, server: RedisServer) -> float:
    """Start a killed node again (its cluster config kept, its data gone): it comes back as a replica of
    the primary promoted in its place. Return the seconds until it is in sync."""
    server.start()
    configure(cluster, "cluster-node-timeout", str(NODE_TIMEOUT_MS))
    return wait_for_replica(server, timeout=20)


def test_slot_moved_under_load(
    cluster: RedisClusterServers,
    tmp_path: Path,
    make_app: Callable[..., App],
    make_worker: Callable[..., Worker],
) -> None:
    """The slot of a customer's shard moved to another primary under load, the worker running: nothing
    lost or counted twice; successes == rollup == charges for every customer."""
    customers = customer_per_shard()
    deployment = ClusterDeployment(tmp_path, cluster, customers, {})
    moving = customers[0]
    slot = customer_slot(moving)
    source = owner(cluster, slot)
    target = next(server for server in primaries(cluster) if server is not source)

    with Traffic(deployment, make_app, make_worker) as traffic:
        time.sleep(1.5)
        started = time.monotonic()
        migration = move_slot(cluster, slot, target, seconds=2.0)
        moved = time.monotonic()
        time.sleep(1.5)
    metrics = traffic.settle(tmp_path, moved)

    assert owner(cluster, slot) is target
    assert keys_in_slot(source, slot) == 0
    assert keys_in_slot(target, slot) > 0
    stream = deployment.stream()
    for customer in customers:
        succeeded = traffic.succeeded(customer)
        assert_exact(stream.of(customer), deployment.books(customer), succeeded, tokens=tokens_of(succeeded))
    during = [r for r in traffic.loads[moving].snapshot() if started < r.at < moved]
    after = {r.path.split("?")[0] for r in traffic.loads[moving].snapshot() if r.at > moved + 0.5}
    assert during, "no call of the moving customer during the migration"
    assert after & stream.paths("success"), "no call of the moving customer recorded after the move"
    figures(
        "cluster-reshard",
        requests=traffic.requests(),
        succeeded=sum(len(traffic.succeeded(c)) for c in customers),
        events=len(stream.events),
        keys_moved=migration.keys,
        migration_seconds=round(migration.seconds, 2),
        calls_of_moved_customer_during_migration=len(during),
        refused_during_migration=sum(
            1 for r in during if r.status == 503 and not r.path.startswith("/v1/fail/")
        ),
        **flush_figures(metrics),
    )
