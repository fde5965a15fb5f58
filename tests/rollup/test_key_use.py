"""When each key was last used: the rollup's fold collects each key's newest event, and the worker records
it after each commit, best-effort (memory, a real redis-server and a real Redis Cluster)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace

import pytest
import redis
from prometheus_client import CollectorRegistry

from meterware.events import UsageEvent, decode_columns, encode_batch
from meterware.metering.records import Customer, KeyRecord
from meterware.rollup import RollupWorker
from meterware.rollup.aggregate import Fold
from meterware.rollup.metrics import RollupMetrics
from meterware.storage import _keyspace as keyspace
from meterware.storage import open_storage
from meterware.storage._keyspace import shard_of
from meterware.storage.base import Storage
from meterware.storage.memory import MemoryStorage
from tests.rollup.helpers import METERS, PERIOD, T0_MS, batch, config, event

SHARDS = 4
CUSTOMERS = ("acme", "globex")


def used(key_id: str, ts: int, *, customer: str = "acme", outcome: str = "success") -> UsageEvent:
    """An event of ``customer``'s call with key ``key_id`` at ``ts`` (ms)."""
    return replace(event(customer, ts=ts, outcome=outcome), key_id=key_id)


def key_uses(*batches: list[UsageEvent]) -> dict[str, int]:
    folding = Fold(METERS)
    for events in batches:
        folding.add(decode_columns(encode_batch(events)), [0] * len(events))
    return folding.key_uses


@pytest.mark.parametrize(
    ("batches", "expected"),
    [
        pytest.param([[]], {}, id="no-events"),
        pytest.param(
            [[used("k1", T0_MS), used("k2", T0_MS + 5), used("k1", T0_MS + 9), used("k1", T0_MS + 3)]],
            {"k1": T0_MS + 9, "k2": T0_MS + 5},
            id="newest-per-key-whatever-the-order",
        ),
        pytest.param(
            [[used("k1", T0_MS + 7)], [used("k1", T0_MS + 2), used("k2", T0_MS)]],
            {"k1": T0_MS + 7, "k2": T0_MS},
            id="an-older-batch-later-keeps-the-newest",
        ),
        pytest.param(
            [
                [
                    used("k1", T0_MS),
                    used("k1", T0_MS + 4, outcome="rejected"),
                    used("k2", T0_MS, outcome="aborted"),
                ]
            ],
            {"k1": T0_MS + 4, "k2": T0_MS},
            id="a-refused-call-used-its-key",
        ),
        pytest.param(
            [[used("", T0_MS + 99, outcome="rejected"), used("k1", T0_MS)]],
            {"k1": T0_MS},
            id="a-refusal-without-a-key-names-none",
        ),
    ],
)
def test_the_fold_keeps_each_keys_newest_event(
    batches: list[list[UsageEvent]], expected: dict[str, int]
) -> None:
    """Each key id of the folded events maps to its newest event's timestamp (every outcome counts)."""
    assert key_uses(*batches) == expected


@pytest.fixture(
    params=[
        "memory",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("cluster", marks=pytest.mark.redis),
    ]
)
def storage(request: pytest.FixtureRequest) -> Iterator[Storage]:
    """Each backend, empty, with two customers: acme with keys ka1 and ka2, globex with kg1."""
    if request.param == "memory":
        opened: Storage = MemoryStorage(shards=SHARDS)
    else:
        url = request.getfixturevalue("redis_url" if request.param == "redis" else "cluster_url")
        opened = open_storage(url, shards=SHARDS, timeout=5)
    for customer in CUSTOMERS:
        opened.create_customer(Customer(customer, "default"))
    for key_id, customer in (("ka1", "acme"), ("ka2", "acme"), ("kg1", "globex")):
        opened.add_key(KeyRecord(key_id, customer, "mw_live_ab12", True, "active", 1), f"hash-{key_id}")
    yield opened
    opened.close()


def flush(storage: Storage, *events: UsageEvent) -> None:
    for customer in CUSTOMERS:
        mine = [e for e in events if e.customer == customer]
        if mine:
            assert storage.flush(batch(shard_of(customer, SHARDS), mine))


def last_used(storage: Storage) -> dict[str, int]:
    records = [record for customer in CUSTOMERS for record in storage.list_keys(customer)]
    listed = {record.key_id: record.last_used_ms for record in records}
    for key_id, ms in listed.items():
        got = storage.get_key(key_id)
        assert got is not None
        assert got.last_used_ms == ms
    return listed


def test_keys_read_as_never_used_until_the_rollup_sees_a_call(storage: Storage) -> None:
    """A new key's last use is 0, and stays so while its events are not rolled up."""
    flush(storage, used("ka1", T0_MS))
    assert last_used(storage) == {"ka1": 0, "ka2": 0, "kg1": 0}


def test_the_worker_records_each_keys_newest_event(storage: Storage) -> None:
    """After a drain each key's last use is its newest event's timestamp, over several batches and reads."""
    flush(storage, used("ka1", T0_MS + 10), used("ka2", T0_MS + 20), used("ka1", T0_MS + 30))
    flush(storage, used("ka1", T0_MS + 5), used("kg1", T0_MS + 7, customer="globex", outcome="rejected"))
    flush(storage, used("ka2", T0_MS + 1), used("ka1", T0_MS + 3))
    assert RollupWorker(storage, config(batch_size=3, pipeline={"batch_size": 3})).drain() == 7
    assert last_used(storage) == {"ka1": T0_MS + 30, "ka2": T0_MS + 20, "kg1": T0_MS + 7}


def test_older_events_rolled_up_later_never_move_it_back(storage: Storage) -> None:
    """A late event (or a replay) older than the recorded last use leaves it; a newer one moves it on."""
    worker = RollupWorker(storage, config())
    flush(storage, used("ka1", T0_MS + 1_000), used("ka2", T0_MS))
    assert worker.drain() == 2
    flush(storage, used("ka1", T0_MS - 60_000), used("ka2", T0_MS + 1))
    assert worker.drain() == 2
    assert last_used(storage) == {"ka1": T0_MS + 1_000, "ka2": T0_MS + 1, "kg1": 0}


def test_an_unknown_key_id_creates_no_record(storage: Storage) -> None:
    """Events naming a key that does not exist (deleted, made up) leave no record behind."""
    flush(storage, used("ka1", T0_MS), used("key_gone", T0_MS), used("", T0_MS, outcome="rejected"))
    assert RollupWorker(storage, config()).drain() == 3
    assert storage.get_key("key_gone") is None
    assert storage.get_key("") is None
    assert last_used(storage) == {"ka1": T0_MS, "ka2": 0, "kg1": 0}
    assert storage.read_usage("acme", True, "period", PERIOD)["n:success"] == 2


@pytest.mark.redis
def test_a_failed_write_never_fails_the_commit(redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A key record Redis cannot update is counted as a backend error and logged once a while; the
    batch's usage is committed once and the other keys are recorded."""
    storage = open_storage(redis_url, shards=SHARDS, timeout=5)
    storage.create_customer(Customer("acme", "default"))
    for key_id in ("ka1", "ka2"):
        storage.add_key(KeyRecord(key_id, "acme", "mw_live_ab12", True, "active", 1), f"hash-{key_id}")
    client = redis.Redis.from_url(redis_url)
    poisoned = keyspace.key_record(shard_of("acme", SHARDS), "ka2")
    client.delete(poisoned)
    client.rpush(poisoned, "not a hash")  # WRONGTYPE for the script: a real failure of the backend
    registry = CollectorRegistry()
    worker = RollupWorker(storage, config(), metrics=RollupMetrics.for_registry(registry))
    with caplog.at_level(logging.WARNING, logger="meterware.rollup"):
        for step in range(3):
            flush(storage, used("ka1", T0_MS + step), used("ka2", T0_MS + step))
            assert worker.drain() == 2
    assert storage.read_usage("acme", True, "period", PERIOD)["n:success"] == 6
    record = storage.get_key("ka1")
    assert record is not None
    assert record.last_used_ms == T0_MS + 2
    shard = str(shard_of("acme", SHARDS))
    assert registry.get_sample_value("meterware_rollup_errors_total", {"shard": shard}) == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "last used" in warnings[0]
    assert "WRONGTYPE" in warnings[0]
    client.close()
    storage.close()
