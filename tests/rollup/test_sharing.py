"""Rollup workers share the shards evenly: joining, leaving and dying workers, every event counted once."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator, Sequence

import pytest
import redis

from meterware.config import Config
from meterware.events import UsageEvent
from meterware.rollup import RollupWorker
from meterware.rollup.sharing import share_of
from meterware.storage import _keyspace as ks
from meterware.storage import open_storage
from meterware.storage.base import Storage
from meterware.storage.memory import MemoryStorage
from meterware.storage.redis import RedisStorage
from tests.rollup.helpers import config, expected_usage, random_events, read_all, write_events

SHARDS = 16


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def storage(request: pytest.FixtureRequest) -> Iterator[Storage]:
    """The in-process backend, and the Redis backend on a real, empty redis-server."""
    if request.param == "memory":
        yield MemoryStorage(shards=SHARDS)
        return
    opened = open_storage(request.getfixturevalue("redis_url"), shards=SHARDS, timeout=5)
    yield opened
    opened.close()


@pytest.mark.parametrize(
    ("shards", "workers", "shares"),
    [
        pytest.param(16, 1, [16], id="alone"),
        pytest.param(16, 2, [8, 8], id="even"),
        pytest.param(16, 3, [6, 5, 5], id="first-takes-the-remainder"),
        pytest.param(16, 5, [4, 3, 3, 3, 3], id="five"),
        pytest.param(2, 3, [1, 1, 0], id="more-workers-than-shards"),
    ],
)
def test_shares_add_up_to_every_shard(shards: int, workers: int, shares: list[int]) -> None:
    """The live workers' shares differ by one at most and add up to the shards, whatever the order."""
    live = [f"worker-{index}" for index in range(workers)]
    assert [share_of(shards, live[::-1], owner) for owner in live] == shares


def test_a_worker_not_yet_listed_counts_itself() -> None:
    """A worker missing from the live list (its heartbeat failed) still counts as one of them."""
    assert share_of(16, ["worker-a"], "worker-b") == 8


class Traffic:
    """Events flushed a chunk at a time between the workers' steps, and what the workers committed."""

    def __init__(self, storage: Storage, seed: int) -> None:
        self.storage = storage
        self.rng = random.Random(seed)
        self.written: list[tuple[UsageEvent, int]] = []
        self.committed = 0

    def flush(self, count: int = 300) -> None:
        self.written += write_events(self.storage, random_events(self.rng, count), batch_size=10)

    def rounds(self, workers: Sequence[RollupWorker], count: int) -> None:
        """Step each worker in turn, ``count`` times, flushing more events before each round."""
        for _ in range(count):
            self.flush()
            for worker in workers:
                self.committed += worker.step()

    def check_exact(self, workers: Sequence[RollupWorker]) -> None:
        """Every event flushed was committed once, and the windows hold exactly their events."""
        for _ in range(200):
            stepped = sum(worker.step() for worker in workers)
            self.committed += stepped
            if not stepped:
                break
        assert self.committed == len(self.written)
        expected = expected_usage(self.written)
        assert read_all(self.storage, expected) == expected


def _workers(storage: Storage, settings: Config, *owners: str) -> list[RollupWorker]:
    return [RollupWorker(storage, settings, owner=owner) for owner in owners]


def _owned(workers: Sequence[RollupWorker]) -> list[int]:
    return [len(worker.owned) for worker in workers]


def test_workers_started_together_split_the_shards_evenly(storage: Storage) -> None:
    """Two workers stepping from the start hold 8 shards each after two rounds, and count every event once."""
    traffic = Traffic(storage, 1)
    workers = _workers(storage, config(batch_size=20, lease_seconds=60), "a", "b")
    traffic.rounds(workers, 2)
    assert _owned(workers) == [8, 8]
    assert set(workers[0].owned).isdisjoint(workers[1].owned)
    traffic.rounds(workers, 3)
    assert _owned(workers) == [8, 8]
    traffic.check_exact(workers)


def test_a_late_worker_gets_its_share(storage: Storage) -> None:
    """A worker started while two others run takes its share within two rounds; they drop to theirs."""
    traffic = Traffic(storage, 2)
    settings = config(batch_size=20, lease_seconds=60)
    first = _workers(storage, settings, "a", "b")
    traffic.rounds(first, 3)
    assert _owned(first) == [8, 8]
    workers = [*first, *_workers(storage, settings, "c")]
    traffic.rounds(workers, 2)
    assert _owned(workers) == [6, 5, 5]
    assert sorted(shard for worker in workers for shard in worker.owned) == list(range(SHARDS))
    traffic.rounds(workers, 3)
    assert _owned(workers) == [6, 5, 5]
    traffic.check_exact(workers)


def test_a_worker_that_stops_hands_its_shards_over_at_once(storage: Storage) -> None:
    """A released worker leaves the live workers: the other takes all its shards at its next step."""
    traffic = Traffic(storage, 3)
    workers = _workers(storage, config(batch_size=20, lease_seconds=60), "a", "b")
    traffic.rounds(workers, 3)
    assert _owned(workers) == [8, 8]
    workers[1].release()
    traffic.rounds(workers[:1], 1)
    assert _owned(workers) == [16, 0]
    traffic.check_exact(workers[:1])


def test_a_worker_that_dies_loses_its_shards_when_its_lease_runs_out(storage: Storage) -> None:
    """A worker that stops stepping without a release keeps its shards until its claims and heartbeat
    expire; then the other takes them all, and nothing is counted twice or lost."""
    lease = 2.0  # long enough for three rounds on a busy machine
    traffic = Traffic(storage, 4)
    workers = _workers(storage, config(batch_size=20, lease_seconds=lease), "a", "b")
    traffic.rounds(workers, 3)
    assert _owned(workers) == [8, 8]
    died = time.monotonic()
    traffic.rounds(workers[:1], 1)
    if time.monotonic() - died < lease * 0.8:  # a slow machine may have let the lease run out already
        assert _owned(workers[:1]) == [8]
    time.sleep(lease + 0.05)
    traffic.rounds(workers[:1], 1)
    assert _owned(workers[:1]) == [16]
    traffic.check_exact(workers[:1])


def test_workers_given_parts_of_the_shards_claim_them_all(storage: Storage) -> None:
    """Workers each given a part of the shards (``shards=``) take no part in sharing: between them every
    shard is rolled up, none is left without an owner."""
    traffic = Traffic(storage, 6)
    settings = config(batch_size=20, lease_seconds=60)
    workers = [
        RollupWorker(storage, settings, owner="low", shards=range(0, 8)),
        RollupWorker(storage, settings, owner="high", shards=range(8, 16)),
    ]
    traffic.rounds(workers, 3)
    assert _owned(workers) == [8, 8]
    traffic.check_exact(workers)


@pytest.mark.redis
def test_a_worker_whose_heartbeat_keeps_failing_takes_every_shard_it_can(redis_url: str) -> None:
    """The live workers' key clobbered (a string): no heartbeat answers, each worker keeps its last share
    until its own heartbeat would have expired, then claims what it can, first come, so no shard waits."""
    storage = RedisStorage(redis_url, shards=SHARDS, timeout=5)
    traffic = Traffic(storage, 7)
    lease = 2.0  # long enough for three rounds on a busy machine
    workers = _workers(storage, config(batch_size=20, lease_seconds=lease), "a", "b")
    traffic.rounds(workers, 3)
    assert _owned(workers) == [8, 8]
    workers[1].release()
    clobbered = time.monotonic()
    redis.Redis.from_url(redis_url).set(ks.rollup_workers(), "clobbered")
    traffic.rounds(workers[:1], 1)
    if time.monotonic() - clobbered < lease * 0.8:  # a slow machine may have reached the expiry already
        assert _owned(workers[:1]) == [8]  # its share as last known
    time.sleep(lease + 0.05)
    traffic.rounds(workers[:1], 1)
    assert _owned(workers[:1]) == [16]
    traffic.check_exact(workers[:1])
    storage.close()


@pytest.mark.redis
def test_running_workers_share_and_rebalance(redis_url: str) -> None:
    """Workers running in threads (as ``meterware rollup`` does) split 8/8, make room for a third, take a
    stopped one's shards, and count every event flushed meanwhile exactly once."""
    storage = RedisStorage(redis_url, shards=SHARDS, timeout=5)
    settings = config(batch_size=50, lease_seconds=1.5)  # steps every 0.5 s when idle
    rng = random.Random(5)
    written: list[tuple[UsageEvent, int]] = []
    running: dict[str, tuple[RollupWorker, threading.Event, threading.Thread]] = {}

    def start(owner: str) -> RollupWorker:
        worker = RollupWorker(RedisStorage(redis_url, shards=SHARDS, timeout=5), settings, owner=owner)
        stop = threading.Event()
        thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
        thread.start()
        running[owner] = (worker, stop, thread)
        return worker

    def stop(owner: str) -> None:
        worker, event, thread = running.pop(owner)
        event.set()
        thread.join(timeout=10)
        worker.storage.close()  # type: ignore[attr-defined]

    def settles(shares: dict[str, int]) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            written.extend(write_events(storage, random_events(rng, 100), batch_size=10))
            if {owner: len(running[owner][0].owned) for owner in running} == shares:
                return
            time.sleep(0.1)
        pytest.fail(f"shares {[len(running[o][0].owned) for o in running]}, expected {shares}")

    try:
        start("a")
        start("b")
        settles({"a": 8, "b": 8})
        start("c")
        settles({"a": 6, "b": 5, "c": 5})
        stop("a")
        settles({"b": 8, "c": 8})
    finally:
        for owner in list(running):
            stop(owner)
    final = RollupWorker(storage, settings, owner="final")
    final.drain()
    expected = expected_usage(written)
    assert read_all(storage, expected) == expected
    storage.close()
