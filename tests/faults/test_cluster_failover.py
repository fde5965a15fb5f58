"""Redis Cluster with replicas (3 primaries, 3 replicas) under traffic: a primary killed, a slot moved.

The metered app serves on the ``redis+cluster://`` URL, one customer per shard, so every primary holds
money; a rollup worker runs throughout. Then the load stops, the app drains (SIGTERM), a last rollup runs,
and the books are compared customer by customer: client-seen successes, the rollup, the charges.

Failover: the primary holding the most customers is SIGKILLed by PID, its replica in sync or held behind
(stopped, its link dropped, 0.5 s before the kill); the replica is promoted (``cluster-node-timeout``
1 s) and the killed node, started again, comes back as the promoted one's replica. With
``[storage] wait_replicas = 1`` nothing acknowledged is lost. Without it, a flush the primary acknowledged
but had not sent to its replica is lost with it (the flusher took it as written). Such a loss is bounded:
only calls of the killed primary's customers that ended just before the kill (or while the replica was
behind), each lost whole (its event and its charge go together: one script, replicated as one
transaction), so a customer is never charged for a call without an event, and nothing counts twice.

Resharding: the slot of one customer's shard (every key of the shard shares its hash tag) is moved to
another primary by hand, one key per ``MIGRATE`` over about 2 s, while the app and the worker write to it.
A script whose keys are split between the two nodes gets ``TRYAGAIN``; the driver retries, then the call
fails as a backend error: the event waits in the spool and is replayed once the slot has moved.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path

import pytest

from meterware.storage._keyspace import shard_of
from tests.faults.books import Stream, assert_exact, spool_bytes
from tests.faults.cluster import (
    ClusterDeployment,
    cluster_with_replicas,
    configure,
    cut_off,
    keys_in_slot,
    move_slot,
    owner,
    primaries,
    replica_of,
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
from tests.servers import RedisClusterServers

pytestmark = [pytest.mark.faults, pytest.mark.redis, pytest.mark.slow]

#: Milliseconds before a silent node is taken as failing; its replica is promoted about a second later.
NODE_TIMEOUT_MS = 1000
#: A lost call ended at most this long before its flush was acknowledged (the flush interval, with room).
LOSS_WINDOW_SECONDS = 1.0
#: How long the replica of the killed primary is held behind it in the runs that test the worst case.
BEHIND_SECONDS = 0.5


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
    with cluster_with_replicas(NODE_TIMEOUT_MS) as servers:
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
        """After the load: the spool replayed, the app's metrics, the app drained, the worker stopped,
        reservations due (``since`` + 2.2 s) refunded, and a last rollup."""
        wait_until(lambda: spool_bytes(self.deployment.spool) == 0, 20, "the spool was never replayed")
        metrics = self.app.metrics()
        self.app.stop()
        assert self.worker.terminate() == 0, self.worker.output()
        time.sleep(max(0.0, since + 2.2 - time.monotonic()))
        rollup_once(self.env, tmp_path / "rollup.log")
        return metrics

    def requests(self) -> int:
        return sum(len(load.snapshot()) for load in self.loads.values())

    def succeeded(self, customer: str) -> set[str]:
        return self.loads[customer].paths(200)

    def answered(self, customer: str) -> set[str]:
        """The paths of the customer's calls that got an answer, whatever it was."""
        return {result.path.split("?")[0] for result in self.loads[customer].snapshot() if result.status}

    def unresolved(self, customer: str) -> set[str]:
        """The paths of the customer's calls refused before their key was resolved: no customer, no event
        (a loaded machine can time out the app's first lookups while its cluster client starts)."""
        return {
            result.path.split("?")[0]
            for result in self.loads[customer].snapshot()
            if result.headers.get("content-type") == "application/problem+json"
            and json.loads(result.body)["reason"] == "backend_unavailable"
        }

    def assert_each_answer_recorded_once(self, stream: Stream, customer: str) -> None:
        """Every answered call of ``customer`` has its event (a refused lookup may not), none other."""
        recorded = stream.of(customer).routes()
        assert len(recorded) == len(set(recorded)), "a call has two events"
        answered = self.answered(customer)
        assert set(recorded) <= answered, f"events of unanswered calls: {sorted(set(recorded) - answered)}"
        missing = answered - set(recorded) - self.unresolved(customer)
        assert not missing, f"{customer}: {len(missing)} answered calls have no event: {sorted(missing)[:5]}"

    def statuses(self) -> set[int | None]:
        return {result.status for load in self.loads.values() for result in load.snapshot()}

    def slowest(self) -> float:
        return max(load.slowest().seconds for load in self.loads.values())


def flush_figures(metrics: dict[str, float]) -> dict[str, int]:
    return {
        "flush_errors": int(metrics.get('meterware_backend_errors_total{operation="flush"}', 0)),
        "admit_errors": int(metrics.get('meterware_backend_errors_total{operation="admit"}', 0)),
        "events_spooled": int(metrics.get("meterware_events_spooled_total", 0)),
        "batches_replayed": int(metrics.get("meterware_batches_replayed_total", 0)),
    }


@dataclass(slots=True)
class Failover:
    """A primary killed under load, and what the test saw of it."""

    deployment: ClusterDeployment
    traffic: Traffic
    #: The customers whose shards the killed primary held.
    on_victim: list[str]
    #: When the replica fell behind (the kill itself if it never did), when the primary was killed.
    behind_from: float
    killed: float
    failover_seconds: float
    rejoin_seconds: float
    metrics: dict[str, float]

    def figures(self, name: str, lost: int) -> None:
        stream = self.deployment.stream()
        customers = list(self.deployment.keys)
        figures(
            name,
            requests=self.traffic.requests(),
            succeeded=sum(len(self.traffic.succeeded(c)) for c in customers),
            events=len(stream.events),
            customers_on_killed_primary=len(self.on_victim),
            lost_calls=lost,
            refused_lookups=sum(len(self.traffic.unresolved(c)) for c in customers),
            lost_micros=sum(self.cost(c, self.lost(c, stream)) for c in customers),
            replica_behind_seconds=round(self.killed - self.behind_from, 2),
            failover_seconds=round(self.failover_seconds, 2),
            rejoin_seconds=round(self.rejoin_seconds, 2),
            slowest_seconds=round(self.traffic.slowest(), 3),
            **flush_figures(self.metrics),
        )

    def lost(self, customer: str, stream: Stream) -> set[str]:
        return self.traffic.succeeded(customer) - stream.of(customer).paths("success")

    @staticmethod
    def cost(customer: str, paths: set[str]) -> int:
        return len(paths) * CALL_PRICE + tokens_of(paths) * TOKEN_PRICE


def fail_over(
    tmp_path: Path,
    cluster: RedisClusterServers,
    make_app: Callable[..., App],
    make_worker: Callable[..., Worker],
    changes: dict[str, object],
    *,
    behind: bool,
) -> Failover:
    """SIGKILL the primary holding the most customers under load (its replica held ``behind`` for
    :data:`BEHIND_SECONDS` first), wait for its replica's promotion, start the killed node again (it comes
    back as a replica), go on for 1.5 s, then settle everything."""
    customers = customer_per_shard()
    deployment = ClusterDeployment(tmp_path, cluster, customers, changes)
    owners = {customer: owner(cluster, customer_slot(customer)) for customer in customers}
    victim = max(set(owners.values()), key=lambda server: list(owners.values()).count(server))
    on_victim = [customer for customer in customers if owners[customer] is victim]
    replica = replica_of(cluster, victim)

    with Traffic(deployment, make_app, make_worker) as traffic:
        time.sleep(1.5)
        behind_from = time.monotonic()
        with cut_off(victim, replica) if behind else nullcontext():
            time.sleep(BEHIND_SECONDS if behind else 0.0)
            sigkill(victim)
            killed = time.monotonic()
        failover = wait_for_failover(cluster, victim, [customer_slot(c) for c in on_victim], timeout=20)
        victim.start()  # its cluster config kept, its data gone: a replica of the promoted one
        configure(cluster, "cluster-node-timeout", str(NODE_TIMEOUT_MS))
        rejoin = wait_for_replica(victim, timeout=20)
        time.sleep(1.5)
    metrics = traffic.settle(tmp_path, killed)
    assert traffic.statuses() <= {200, 503}, "a request failed another way than the app's own 503s"
    return Failover(deployment, traffic, on_victim, behind_from, killed, failover, rejoin, metrics)


@pytest.mark.parametrize("replica", ["in-sync", "behind"])
def test_primary_killed_under_load_without_wait(
    replica: str,
    cluster: RedisClusterServers,
    tmp_path: Path,
    make_app: Callable[..., App],
    make_worker: Callable[..., Worker],
) -> None:
    """A primary SIGKILLed under load, WAIT off (its replica in sync, or cut off for 0.5 s before): the
    loss is measured, bounded to calls of its customers that ended while the replica was behind, each lost
    whole (never charged without its event); nothing counts twice."""
    run = fail_over(tmp_path, cluster, make_app, make_worker, {}, behind=replica == "behind")
    stream = run.deployment.stream()
    stream.assert_no_duplicates()
    lost_calls = 0
    for customer, load in run.traffic.loads.items():
        mine = stream.of(customer)
        recorded = mine.paths("success")
        assert recorded <= run.traffic.succeeded(customer), "an event of a call the client saw fail"
        lost_calls += len(run.lost(customer, stream))
        # Every call's event counts here, failed calls' too: each one lost must have ended in the window.
        lost = run.traffic.answered(customer) - run.traffic.unresolved(customer) - set(mine.routes())
        if customer not in run.on_victim:
            assert not lost, f"{customer} (on a surviving primary) lost {len(lost)} events"
        ended = {result.path.split("?")[0]: result.at for result in load.snapshot()}
        window = (run.behind_from - LOSS_WINDOW_SECONDS, run.killed)
        late = sorted(path for path in lost if not window[0] <= ended[path] <= window[1])
        assert not late, f"{customer} lost events of calls that ended outside {window}: {late[:5]}"
        # The rollup and the charges are the events that exist: a lost call is lost whole.
        ledger = run.deployment.books(customer)
        assert ledger.calls["success"] == len(recorded)
        assert ledger.spend == mine.charged() == ledger.charged == run.cost(customer, recorded)
        assert ledger.reserved == 0, "reservations left open"
    if replica == "behind":
        assert lost_calls, "no acknowledged write was lost with a replica 0.5 s behind: the test saw nothing"
    run.figures(f"cluster-failover-no-wait-{replica}", lost_calls)


@pytest.mark.parametrize("replica", ["in-sync", "behind"])
def test_primary_killed_under_load_with_wait(
    replica: str,
    cluster: RedisClusterServers,
    tmp_path: Path,
    make_app: Callable[..., App],
    make_worker: Callable[..., Worker],
) -> None:
    """A primary SIGKILLed under load, ``wait_replicas = 1`` (its replica in sync, or cut off for 0.5 s
    before): nothing is lost, successes == rollup == charges for every customer. The flushes the replica
    did not confirm waited in the spool and were replayed once on the promoted replica."""
    changes: dict[str, object] = {"storage": {"wait_replicas": 1, "wait_timeout": 0.5}}
    run = fail_over(tmp_path, cluster, make_app, make_worker, changes, behind=replica == "behind")
    stream = run.deployment.stream()
    for customer in run.deployment.keys:
        succeeded = run.traffic.succeeded(customer)
        ledger = run.deployment.books(customer)
        assert_exact(stream.of(customer), ledger, succeeded, tokens=tokens_of(succeeded))
        run.traffic.assert_each_answer_recorded_once(stream, customer)
    run.figures(f"cluster-failover-wait-{replica}", lost=0)


@pytest.mark.parametrize("policy", ["open", "closed"])
def test_slot_moved_under_load(
    policy: str,
    cluster: RedisClusterServers,
    tmp_path: Path,
    make_app: Callable[..., App],
    make_worker: Callable[..., Worker],
) -> None:
    """The slot of a customer's shard moved to another primary under load, the worker running, the app
    failing open or closed: nothing lost or counted twice; successes == rollup == charges for every
    customer."""
    customers = customer_per_shard()
    deployment = ClusterDeployment(tmp_path, cluster, customers, {"policy": {"on_backend_error": policy}})
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
    stream.assert_no_duplicates()
    for customer in customers:
        succeeded = traffic.succeeded(customer)
        assert_exact(stream.of(customer), deployment.books(customer), succeeded, tokens=tokens_of(succeeded))
        traffic.assert_each_answer_recorded_once(stream, customer)
    during = [r for r in traffic.loads[moving].snapshot() if started < r.at < moved]
    after = {r.path.split("?")[0] for r in traffic.loads[moving].snapshot() if r.at > moved + 0.5}
    assert during, "no call of the moving customer during the migration"
    assert after & stream.paths("success"), "no call of the moving customer recorded after the move"
    refused = [r for r in during if r.status == 503 and not r.path.startswith("/v1/fail/")]
    if policy == "open":
        assert not refused, f"fail-open refused {len(refused)} calls during the migration"
    assert traffic.statuses() <= {200, 503}
    figures(
        f"cluster-reshard-{policy}",
        requests=traffic.requests(),
        succeeded=sum(len(traffic.succeeded(c)) for c in customers),
        events=len(stream.events),
        keys_moved=migration.keys,
        migration_seconds=round(migration.seconds, 2),
        calls_of_moved_customer_during_migration=len(during),
        refused_during_migration=len(refused),
        slowest_seconds=round(traffic.slowest(), 3),
        **flush_figures(metrics),
    )
