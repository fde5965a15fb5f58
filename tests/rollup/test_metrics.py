"""The rollup worker's metrics, read from a fresh registry per test: progress, lag, refunds, customers."""

from __future__ import annotations

import dataclasses
import socket
import time

import pytest
from prometheus_client import CollectorRegistry

from meterware.config import Config, MeterTerms, Plan, RateLimit
from meterware.errors import StorageError
from meterware.metering.admission import AdmitRequest, meter_holds
from meterware.metering.periods import period_bounds
from meterware.metering.records import Customer, KeyRecord
from meterware.rollup import RollupWorker, run_worker
from meterware.rollup.metrics import CustomerMetrics, MetricsOptions, RollupMetrics
from meterware.storage import open_storage
from meterware.storage._keyspace import shard_of
from meterware.storage.memory import MemoryStorage
from tests.rollup.helpers import METERS, PERIOD, batch, config, event
from tests.servers import free_port

SHARDS = 4
ACME = shard_of("acme", SHARDS)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def worker_config() -> Config:
    # 5 events per entry, 10 events per read: the worker reads 2 entries a step.
    return config(batch_size=10, pipeline={"batch_size": 5})


def fill(storage: MemoryStorage, entries: int, events_per_entry: int = 5) -> None:
    for _ in range(entries):
        assert storage.flush(batch(ACME, [event() for _ in range(events_per_entry)]))


def test_counts_events_entries_and_batches() -> None:
    """Events and entries committed, and one latency observation per committed batch."""
    storage = MemoryStorage(shards=SHARDS)
    fill(storage, 10)
    registry = CollectorRegistry()
    worker = RollupWorker(storage, worker_config(), metrics=RollupMetrics(registry))
    assert worker.drain() == 50
    assert value(registry, "meterware_rollup_events_total") == 50
    assert value(registry, "meterware_rollup_entries_total") == 10
    assert value(registry, "meterware_rollup_batch_duration_seconds_count") == 5
    assert value(registry, "meterware_rollup_dead_letters_total") == 0
    assert value(registry, "meterware_rollup_shards_owned") == SHARDS
    last_round = value(registry, "meterware_rollup_last_round_timestamp_seconds")
    assert last_round is not None
    assert abs(last_round - time.time()) < 5


def test_lag_counts_entries_behind_and_ages_the_oldest() -> None:
    """Each step leaves the exact number of entries behind; the age is the oldest unread entry's."""
    storage = MemoryStorage(shards=SHARDS)
    fill(storage, 10)
    time.sleep(0.2)
    registry = CollectorRegistry()
    worker = RollupWorker(
        storage,
        worker_config(),
        shards=[ACME],
        metrics=RollupMetrics(registry),
    )
    shard = str(ACME)
    for behind in (8, 6, 4, 2, 0):
        worker.step()
        assert value(registry, "meterware_rollup_lag_entries", shard=shard) == behind
    lag = value(registry, "meterware_rollup_lag_seconds", shard=shard)
    assert lag == 0
    fill(storage, 3)
    time.sleep(0.2)
    worker.step()  # reads 2 of the 3 new entries
    assert value(registry, "meterware_rollup_lag_entries", shard=shard) == 1
    lag = value(registry, "meterware_rollup_lag_seconds", shard=shard)
    assert lag is not None
    assert lag >= 0.2
    time.sleep(0.1)
    # Measured at scrape time: a worker that stops stepping shows a growing lag.
    later = value(registry, "meterware_rollup_lag_seconds", shard=shard)
    assert later is not None
    assert later >= lag + 0.1


def test_lag_entries_stay_exact_while_the_stream_is_trimmed() -> None:
    """Trimming committed entries (a 1 ms retention) does not change the count of entries behind."""
    storage = MemoryStorage(shards=SHARDS)
    fill(storage, 10)
    time.sleep(0.01)  # past the retention
    registry = CollectorRegistry()
    worker = RollupWorker(
        storage,
        config(batch_size=10, retention_seconds=0.001, pipeline={"batch_size": 5}),
        shards=[ACME],
        metrics=RollupMetrics(registry),
    )
    for behind in (8, 6, 4, 2, 0):
        worker.step()
        assert value(registry, "meterware_rollup_lag_entries", shard=str(ACME)) == behind
    assert storage.stream_length(ACME) == 1  # only the committed entry is left


def test_a_new_owner_counts_the_backlog_once_it_reaches_the_end() -> None:
    """A worker taking over a half-read shard cannot count what is behind until a read reaches the end."""
    storage = MemoryStorage(shards=SHARDS)
    fill(storage, 10)
    first = RollupWorker(storage, worker_config(), shards=[ACME])
    first.step()
    first.release()
    registry = CollectorRegistry()
    second = RollupWorker(storage, worker_config(), shards=[ACME], metrics=RollupMetrics(registry))
    second.step()
    assert value(registry, "meterware_rollup_lag_entries", shard=str(ACME)) is None
    assert value(registry, "meterware_rollup_lag_seconds", shard=str(ACME)) is not None
    second.drain()
    assert value(registry, "meterware_rollup_lag_entries", shard=str(ACME)) == 0
    assert value(registry, "meterware_rollup_lag_seconds", shard=str(ACME)) == 0


def test_counts_dead_letters() -> None:
    """Entries that are not event batches are counted as dead letters (and as committed entries)."""
    storage = MemoryStorage(shards=SHARDS)
    fill(storage, 1)
    garbage = batch(ACME, [event()])
    storage.flush(type(garbage)(ACME, "garbage", b"\x00not msgpack", garbage.settlements))
    registry = CollectorRegistry()
    RollupWorker(storage, worker_config(), metrics=RollupMetrics(registry)).drain()
    assert value(registry, "meterware_rollup_dead_letters_total") == 1
    assert value(registry, "meterware_rollup_entries_total") == 2
    assert value(registry, "meterware_rollup_events_total") == 5


def test_counts_refunded_reservations() -> None:
    """A reservation never settled (its app process died) is refunded after its timeout, and counted."""
    storage = MemoryStorage(shards=SHARDS)
    plan = Plan("paid", (RateLimit(100, 1),), prepaid=True, meters={"calls": MeterTerms(price=1_000)})
    storage.create_customer(Customer("acme", "paid"))
    storage.add_key(KeyRecord("key1", "acme", "mw_live_ab12", True, "active", 0), "hash1")
    storage.grant_credits("acme", 10_000)
    holds = meter_holds(plan, METERS, 1, True)
    for reservation in ("r1", "r2"):
        request = AdmitRequest(
            ACME, "acme", "key1", True, plan, PERIOD, PERIOD + 86_400, holds, reservation, 1
        )
        assert storage.admit(request).allowed
    time.sleep(0.005)
    registry = CollectorRegistry()
    RollupWorker(storage, config(), shards=[ACME], metrics=RollupMetrics(registry)).step()
    assert value(registry, "meterware_rollup_reservations_refunded_total") == 2


def test_counts_backend_errors_per_shard() -> None:
    """A backend that does not answer: errors are counted per shard, and the round is not a success."""
    storage = open_storage(f"redis://127.0.0.1:{free_port()}/0", shards=SHARDS, timeout=0.5)
    registry = CollectorRegistry()
    worker = RollupWorker(storage, config(), metrics=RollupMetrics(registry))
    with pytest.raises(StorageError):
        worker.step()
    # Two failures in a row stop the round: the backend itself is away.
    assert value(registry, "meterware_rollup_errors_total", shard="0") == 1
    assert value(registry, "meterware_rollup_errors_total", shard="1") == 1
    assert value(registry, "meterware_rollup_errors_total", shard="2") is None
    assert value(registry, "meterware_rollup_last_round_timestamp_seconds") == 0


def test_metrics_register_once_per_registry() -> None:
    """Asking twice for the metrics of one registry gives the same object (no duplicated series)."""
    registry = CollectorRegistry()
    assert RollupMetrics.for_registry(registry) is RollupMetrics.for_registry(registry)
    assert RollupMetrics.for_registry(CollectorRegistry()) is not RollupMetrics.for_registry(registry)


def test_customer_usage_and_balances_of_the_current_period() -> None:
    """Per-customer usage (this period, live keys) and balances, for at most ``limit`` customers."""
    storage = MemoryStorage(shards=SHARDS)
    cfg = config()
    now = time.time()
    for name, calls, credits in (("acme", 3, 5_000_000), ("bravo", 2, 250_000), ("zulu", 1, 0)):
        storage.create_customer(Customer(name, "default", anchor=0))
        if credits:
            storage.grant_credits(name, credits)
        start, _ = period_bounds(0, cfg.plan("default").period, now)
        events = [
            event(name, ts=int(now * 1000), period_start=start, units={"calls": 1, "tokens": 10})
            for _ in range(calls)
        ]
        events.append(event(name, ts=int(now * 1000), period_start=start, live=False))  # a test key: not here
        events.append(event(name, ts=int(now * 1000), period_start=PERIOD))  # another period: not here
        storage.flush(batch(shard_of(name, SHARDS), events))
    RollupWorker(storage, cfg).drain()
    registry = CollectorRegistry()
    customers = CustomerMetrics(storage, cfg, limit=2, interval=30)
    registry.register(customers)
    assert value(registry, "meterware_customers") == 0  # nothing read yet: never read at scrape time
    customers.refresh(now)
    assert value(registry, "meterware_customers") == 3
    assert value(registry, "meterware_customer_period_usage", customer="acme", meter="calls") == 3
    assert value(registry, "meterware_customer_period_usage", customer="acme", meter="tokens") == 30
    assert value(registry, "meterware_customer_period_usage", customer="bravo", meter="calls") == 2
    assert value(registry, "meterware_customer_balance_credits", customer="acme") == 5.0
    assert value(registry, "meterware_customer_balance_credits", customer="bravo") == 0.25
    # The limit: the first two customers in id order only.
    assert value(registry, "meterware_customer_period_usage", customer="zulu", meter="calls") is None
    assert value(registry, "meterware_customer_balance_credits", customer="zulu") is None
    series = [s for family in registry.collect() for s in family.samples]
    assert len(series) == 1 + 2 * len(cfg.meters) + 2


def on_redis(url: str) -> Config:
    return dataclasses.replace(config(), storage=url, shards=SHARDS)


@pytest.mark.redis
def test_run_worker_serves_metrics_and_cleans_up(redis_url: str) -> None:
    """``run_worker(metrics=...)`` serves the registry while it runs, then frees the port and collector."""
    registry = CollectorRegistry()
    port = free_port()
    options = MetricsOptions(port=port, customers=10, interval=0.1, registry=registry)
    assert run_worker(on_redis(redis_url), once=True, metrics=options) == 0
    assert value(registry, "meterware_rollup_shards_owned") == 0  # released on the way out
    assert value(registry, "meterware_customers") is None  # the per-customer collector is gone
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # and the port is free again


@pytest.mark.redis
def test_run_worker_fails_when_the_metrics_port_is_taken(redis_url: str) -> None:
    """A port already in use is an error at start (exit code 1), not a worker without metrics."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        options = MetricsOptions(port=sock.getsockname()[1], registry=CollectorRegistry())
        assert run_worker(on_redis(redis_url), once=True, metrics=options) == 1
