"""The rollup worker on the in-process backend: exact totals, dead letters, shard claims and fencing."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import redis

from meterware.config import MeterTerms, Plan, RateLimit
from meterware.errors import StorageError
from meterware.metering.admission import AdmitRequest, meter_holds
from meterware.metering.records import Customer, KeyRecord
from meterware.rollup import RollupWorker, run_worker
from meterware.rollup.aggregate import windows_of
from meterware.rollup.worker import default_owner
from meterware.storage import _keyspace as keyspace
from meterware.storage import open_storage
from meterware.storage._keyspace import shard_of
from meterware.storage.base import Balance, Batch, RollupCommit, Storage
from meterware.storage.memory import MemoryStorage
from tests.rollup.helpers import (
    CUSTOMERS,
    METERS,
    PERIOD,
    batch,
    config,
    event,
    expected_usage,
    random_events,
    read_all,
    write_events,
)

SHARDS = 4
ACME = shard_of("acme", SHARDS)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def storage(request: pytest.FixtureRequest) -> Iterator[Storage]:
    """The in-process backend, and the Redis backend on a real, empty redis-server."""
    if request.param == "memory":
        yield MemoryStorage(shards=SHARDS)
        return
    opened = open_storage(request.getfixturevalue("redis_url"), shards=SHARDS, timeout=5)
    yield opened
    opened.close()


def test_drain_gives_exact_totals(storage: Storage) -> None:
    """Draining the streams adds every event exactly once to each of its windows."""
    written = write_events(storage, random_events(random.Random(1), 3000), batch_size=50, price=2000)
    expected = expected_usage(written)
    worker = RollupWorker(storage, config(batch_size=400))
    assert worker.drain() == 3000
    assert read_all(storage, expected) == expected
    periods = [v for w, v in expected.items() if w.window == "period"]
    assert sum(v.get("calls", 0) for v in periods) == sum(e.billable for e, _ in written)
    assert sum(v["spend"] for v in periods) == 2000 * sum(e.billable for e, _ in written)


def test_second_drain_adds_nothing(storage: Storage) -> None:
    """A drained worker finds nothing more to commit, and totals stay the same."""
    written = write_events(storage, random_events(random.Random(2), 500), batch_size=20)
    expected = expected_usage(written)
    worker = RollupWorker(storage, config())
    assert worker.drain() == 500
    assert worker.drain() == 0
    assert worker.step() == 0
    assert RollupWorker(storage, config()).drain() == 0
    assert read_all(storage, expected) == expected


def test_new_events_after_drain(storage: Storage) -> None:
    """Events flushed after a drain are picked up by the next one, from where the last stopped."""
    rng = random.Random(3)
    worker = RollupWorker(storage, config())
    first = write_events(storage, random_events(rng, 200), batch_size=30)
    assert worker.drain() == 200
    second = write_events(storage, random_events(rng, 300), batch_size=30)
    assert worker.drain() == 300
    expected = expected_usage(first + second)
    assert read_all(storage, expected) == expected


def test_reads_about_batch_size_events(storage: Storage) -> None:
    """A step reads about ``batch_size`` events (entries hold many), assuming full batches at first."""
    for _ in range(20):
        storage.flush(batch(ACME, [event() for _ in range(10)]))
    worker = RollupWorker(storage, config(batch_size=30, pipeline={"batch_size": 15}), shards=[ACME])
    # Entries of up to 15 events: two per read, until the worker sees they hold 10.
    assert [worker.step() for _ in range(8)] == [20] + [30] * 6 + [0]
    # Entries that suddenly grow are read by the last estimate once, then by their own size.
    for _ in range(6):
        storage.flush(batch(ACME, [event() for _ in range(200)]))
    assert [worker.step() for _ in range(5)] == [600, 200, 200, 200, 0]


def test_dead_letters(storage: Storage, caplog: pytest.LogCaptureFixture) -> None:
    """Garbage entries go to the dead-letter stream with a reason; the offset moves past them."""
    shard = shard_of("acme", SHARDS)
    storage.flush(batch(shard, [event(), event()]))
    storage.flush(Batch(shard, "garbage", b"\xc1 not msgpack", (None,)))
    storage.flush(Batch(shard, "short", batch(shard, [event(), event()]).payload, (None,)))
    storage.flush(batch(shard, [event()]))
    ids = [entry.entry_id for entry in storage.read_stream(shard, "0-0", 10)]
    with caplog.at_level(logging.WARNING, logger="meterware.rollup"):
        assert RollupWorker(storage, config()).drain() == 3
    assert storage.read_usage("acme", True, "period", PERIOD) == {"n:success": 3, "spend": 0, "calls": 3}
    assert storage.committed_offset(shard) == ids[-1]
    dead = storage.dead_letters(shard)  # type: ignore[attr-defined]  # both backends have it
    assert [d.fields[b"entry"] for d in dead] == [ids[1].encode(), ids[2].encode()]
    assert dead[0].fields[b"reason"].startswith(b"field 'b': not a msgpack document")
    assert dead[1].fields[b"reason"] == b"field 'c': 1 costs for 2 events"
    assert dead[1].fields[b"b"] == storage.read_stream(shard, ids[1], 1)[0].fields[b"b"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert ids[1] in warnings[0]
    assert "not a msgpack document" in warnings[0]
    assert all("\n" not in w for w in warnings)


def test_only_dead_letters_still_progress(storage: Storage) -> None:
    """A read of nothing but garbage still commits its offset, so a drain never stalls on it."""
    for index in range(5):
        storage.flush(Batch(ACME, f"junk-{index}", b"junk", (None,)))
    worker = RollupWorker(storage, config(batch_size=2), shards=[ACME])
    assert worker.drain() == 0
    assert len(storage.dead_letters(ACME)) == 5  # type: ignore[attr-defined]
    assert storage.read_stream(ACME, storage.committed_offset(ACME), 10) == []


def test_two_workers_never_double_count(storage: Storage) -> None:
    """Two workers stepping in turn, with claims expiring between steps, count every event once."""
    written = write_events(storage, random_events(random.Random(4), 2000), batch_size=25)
    expected = expected_usage(written)
    settings = config(batch_size=60, lease_seconds=0.001)
    workers = [RollupWorker(storage, settings, owner="a"), RollupWorker(storage, settings, owner="b")]
    committed = 0
    deadline = time.monotonic() + 30
    for turn in range(10_000):
        committed += workers[turn % 2].step()
        time.sleep(0.002)  # let the claim lapse, so the other worker takes the shard over
        if committed == 2000 or time.monotonic() > deadline:
            break
    assert committed == 2000
    assert sum(worker.drain() for worker in workers) == 0
    assert read_all(storage, expected) == expected


def test_two_workers_in_threads(storage: Storage) -> None:
    """Two workers draining the same backend at once from two threads count every event once."""
    written = write_events(storage, random_events(random.Random(5), 3000), batch_size=10)
    expected = expected_usage(written)
    settings = config(batch_size=30, lease_seconds=0.002)
    counts: list[int] = []

    def drain(owner: str) -> None:
        counts.append(RollupWorker(storage, settings, owner=owner).drain())

    threads = [threading.Thread(target=drain, args=(owner,)) for owner in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    final = RollupWorker(storage, settings, owner="c").drain()
    assert sum(counts) + final == 3000
    assert read_all(storage, expected) == expected


def test_held_claim_keeps_other_workers_out(storage: Storage) -> None:
    """A shard another worker claims is left alone until the claim is released."""
    storage.flush(batch(ACME, [event()]))
    first = RollupWorker(storage, config(lease_seconds=60), owner="first", shards=[ACME])
    second = RollupWorker(storage, config(lease_seconds=60), owner="second", shards=[ACME])
    assert first.step() == 1
    storage.flush(batch(ACME, [event()]))
    assert second.drain() == 0
    assert not second.owned
    first.release()
    assert second.drain() == 1
    assert second.owned == (ACME,)


def test_stale_token_cannot_commit(storage: Storage) -> None:
    """A commit under a token from before another worker took the expired claim is refused."""
    storage.flush(batch(ACME, [event()]))
    old = storage.claim_shard(ACME, "a", 1)
    assert old is not None
    time.sleep(0.005)
    new = storage.claim_shard(ACME, "b", 60_000)
    assert new is not None
    assert new != old
    entries = storage.read_stream(ACME, "0-0", 10)
    commit = RollupCommit(ACME, old, "0-0", entries[-1].entry_id, {})
    assert storage.commit_rollup(commit) is False
    assert storage.committed_offset(ACME) == "0-0"


class RacingStorage(MemoryStorage):
    """The memory backend, with a hook run once just before the next commit (to stage a race)."""

    before_commit: Callable[[], None] | None = None

    def commit_rollup(self, commit: RollupCommit) -> bool:
        hook, self.before_commit = self.before_commit, None
        if hook is not None:
            hook()
        return super().commit_rollup(commit)


def test_worker_that_lost_its_claim_mid_step_commits_nothing() -> None:
    """A worker whose claim lapsed and was taken between its read and its commit counts nothing."""
    storage = RacingStorage(shards=1)
    written = write_events(storage, random_events(random.Random(6), 100), batch_size=10)
    expected = expected_usage(written)
    slow = RollupWorker(storage, config(lease_seconds=0.02), owner="slow")
    rival = RollupWorker(storage, config(lease_seconds=60), owner="rival")

    def rival_takes_over() -> None:
        time.sleep(0.03)
        assert rival.drain() == 100

    storage.before_commit = rival_takes_over
    assert slow.step() == 0
    assert slow.owned == ()
    assert slow.drain() == 0
    assert read_all(storage, expected) == expected


def test_worker_with_a_stale_offset_re_reads() -> None:
    """A commit refused because the offset moved makes the worker drop the shard and read it afresh."""
    storage = MemoryStorage(shards=1)
    written = write_events(storage, random_events(random.Random(7), 60), batch_size=10)
    expected = expected_usage(written)
    # Two entries per read; the twin (a restarted process reusing the owner name, so holding the same
    # lease) commits behind the worker's back.
    settings = config(batch_size=20, pipeline={"batch_size": 10})
    worker = RollupWorker(storage, settings, owner="w")
    twin = RollupWorker(storage, settings, owner="w")
    assert worker.step() == 20
    assert twin.step() == 20
    assert worker.step() == 0
    assert worker.owned == ()
    assert worker.drain() == 20
    assert read_all(storage, expected) == expected


def test_expires_reservations_of_dead_processes(storage: Storage) -> None:
    """A step refunds the credits held by a call whose app process never settled it."""
    plan = Plan("paid", (RateLimit(100, 1),), prepaid=True, meters={"calls": MeterTerms(price=1_000)})
    storage.create_customer(Customer("acme", "paid"))
    storage.add_key(KeyRecord("key1", "acme", "mw_live_ab12", True, "active", 0), "hash1")
    storage.grant_credits("acme", 10_000)
    shard = shard_of("acme", SHARDS)
    request = AdmitRequest(
        shard,
        "acme",
        "key1",
        True,
        plan,
        PERIOD,
        PERIOD + 86_400,
        meter_holds(plan, METERS, 1, True),
        "r1",
        1,
    )
    assert storage.admit(request).allowed
    assert storage.get_balance("acme") == Balance(10_000, 1_000)
    time.sleep(0.005)
    RollupWorker(storage, config(), shards=[shard]).step()
    assert storage.get_balance("acme") == Balance(10_000, 0)


def test_trims_only_committed_entries(storage: Storage) -> None:
    """Past the retention, the stream is trimmed up to the committed offset and never beyond it."""
    for _ in range(10):
        storage.flush(batch(ACME, [event()]))
    worker = RollupWorker(
        storage, config(batch_size=4, retention_seconds=0.001, pipeline={"batch_size": 1}), shards=[ACME]
    )
    time.sleep(0.005)
    assert worker.step() == 4
    # The committed entry stays (it is the offset); the six after it are not rolled up yet.
    assert storage.stream_length(ACME) == 7
    assert worker.drain() == 6
    worker.step()
    assert storage.stream_length(ACME) == 1
    assert storage.read_usage("acme", True, "period", PERIOD)["calls"] == 10


def test_keeps_entries_within_retention(storage: Storage) -> None:
    """Committed entries younger than the retention period stay in the stream."""
    for _ in range(10):
        storage.flush(batch(ACME, [event()]))
    worker = RollupWorker(storage, config(retention_seconds=3600), shards=[ACME])
    assert worker.drain() == 10
    assert storage.stream_length(ACME) == 10


def test_run_until_stopped(storage: Storage) -> None:
    """``run`` rolls up events as they come until stopped, then releases its claims."""
    worker = RollupWorker(storage, config(lease_seconds=60), owner="runner")
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), kwargs={"idle_sleep": 0.005})
    thread.start()
    try:
        written = write_events(storage, random_events(random.Random(8), 400), batch_size=20)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if all(storage.read_stream(s, storage.committed_offset(s), 1) == [] for s in range(SHARDS)):
                break
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()
    expected = expected_usage(written)
    assert read_all(storage, expected) == expected
    assert worker.owned == ()
    assert all(storage.claim_shard(s, "next", 1000) is not None for s in range(SHARDS))


def test_owners_are_unique() -> None:
    """Default owner names differ between workers, even in one process."""
    assert default_owner() != default_owner()


def test_run_worker_refuses_memory(caplog: pytest.LogCaptureFixture) -> None:
    """A separate worker process cannot roll up ``memory://``: it says so and exits with 2."""
    with caplog.at_level(logging.ERROR, logger="meterware.rollup"):
        assert run_worker(config(), once=True) == 2
    assert "memory://" in caplog.text


def _wait_for(condition: Callable[[], bool], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.redis
@pytest.mark.parametrize(
    "window",
    [
        pytest.param("minute", id="first-window-of-the-commit"),
        pytest.param("period", id="last-window-of-the-commit"),
    ],
)
def test_a_failing_shard_does_not_hold_up_the_others(
    redis_url: str, window: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A shard whose commits fail (a clobbered key) is retried apart; the others go on; none counts twice."""
    storage = open_storage(redis_url, shards=SHARDS, timeout=5)
    client = redis.Redis.from_url(redis_url)
    other = next(c for c in CUSTOMERS if shard_of(c, SHARDS) != ACME)
    windows = windows_of(event())
    [poisoned] = [w for w in windows if w.window == window]
    key = keyspace.usage(ACME, True, "acme", window, poisoned.start)
    client.set(key, "not a hash")
    storage.flush(batch(ACME, [event("acme")]))
    storage.flush(batch(shard_of(other, SHARDS), [event(other)]))
    worker = RollupWorker(storage, config(), owner="w")
    with pytest.raises(StorageError):
        worker.drain()
    one_call = {"n:success": 1, "spend": 0, "calls": 1}
    assert storage.read_usage(other, True, "minute", windows[0].start) == one_call

    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), kwargs={"idle_sleep": 0.01})
    try:
        with caplog.at_level(logging.WARNING, logger="meterware.rollup"):
            thread.start()
            storage.flush(batch(shard_of(other, SHARDS), [event(other)]))
            _wait_for(lambda: storage.read_usage(other, True, "minute", windows[0].start).get("calls") == 2)
            _wait_for(lambda: f"shard {ACME}: backend error, retrying it" in caplog.text)
            client.delete(key)
            _wait_for(lambda: storage.read_stream(ACME, storage.committed_offset(ACME), 1) == [])
    finally:
        stop.set()
        thread.join(timeout=10)
        client.close()
        storage.close()
    assert not thread.is_alive()
    assert {w.window: storage.read_usage("acme", True, w.window, w.start) for w in windows} == {
        w.window: one_call for w in windows
    }
