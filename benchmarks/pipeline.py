"""Event pipeline and rollup throughput against a real Redis, in events per second.

* **flusher**: one process's buffer, filled with the events and settlements a metered call leaves
  behind, written to Redis by the real flush passes of ``meterware.metering.flushers``: ``flush_sync``
  (the WSGI flusher thread's step) or ``flush_async`` (the ASGI flusher task's, on uvloop): batches of
  ``pipeline.batch_size`` events taken from the buffer, grouped per shard, encoded, and each appended as
  one stream entry and settled by one script. The settlements charge credits and count quota as real
  ones do, but open no reservation (admission is not part of this benchmark), so the script's HGET of
  the reservation misses.
* **rollup**: ``RollupWorker.drain()`` in its own process over the 16 shards those flushes filled; then
  two worker processes over 32 shards filled with twice the customers and events (the same per shard,
  and the same events per stream entry), to show how throughput grows with shards and workers.

Redis and the measured processes are not pinned here: on a 2-core machine two rollup workers and Redis
share the two cores, so the two-worker figure is a lower bound.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from queue import Empty

import redis
from prometheus_client import CollectorRegistry

from benchmarks._harness import OthersClock, Retries
from meterware.config import Config
from meterware.events import UsageEvent, event_row, new_event_id
from meterware.metering import flushers
from meterware.metering.batcher import Batcher
from meterware.metering.batching import Pending
from meterware.metering.periods import period_bounds
from meterware.metering.records import Customer
from meterware.metrics import AppMetrics
from meterware.rollup import RollupWorker
from meterware.storage import open_async_storage, open_storage
from meterware.storage._keyspace import shard_of
from meterware.storage.base import ReplicaWait, Settlement

SHARDS = 16
#: Customers per 16 shards: twice the shards get twice the customers, so each shard sees as many.
CUSTOMERS = 1000
BATCH_SIZE = 1000
PLAN = "bench"
#: Credits and quota no benchmark reaches, so every settlement charges.
CREDITS_MICROS = 10**15 - 1


def config(url: str, shards: int, batch_size: int) -> Config:
    return Config.from_dict(
        {
            "storage": {"url": url, "shards": shards},
            "meters": {"calls": {"aggregation": "count"}},
            "plans": {PLAN: {"prepaid": True, "meters": {"calls": {"price": "0.000001"}}}},
            "pipeline": {
                "batch_size": batch_size,
                "buffer_size": 10_000_000,
                "spool_dir": os.path.join(tempfile.gettempdir(), f"mw-bench-spool-{os.getpid()}"),
            },
        }
    )


def _customers(url: str, shards: int) -> list[str]:
    """Empty Redis, then create the customers (as many per shard whatever the shards), each with credits
    beyond reach."""
    client = redis.Redis.from_url(url)
    client.flushall()
    client.close()
    storage = open_storage(url, shards=shards, timeout=30)
    names = [f"customer-{index:04d}" for index in range(CUSTOMERS * shards // SHARDS)]
    for name in names:
        storage.create_customer(Customer(name, PLAN))
        storage.grant_credits(name, CREDITS_MICROS)
    storage.close()
    return names


def pending(count: int, customers: list[str], shards: int) -> list[Pending]:
    """What ``count`` successful calls leave in the buffer (``Metering.finish``'s shape)."""
    now = time.time()
    period_start = period_bounds(0, "month", now)[0]
    timestamp_ms = int(now * 1000)
    items = []
    for index in range(count):
        customer = customers[index % len(customers)]
        event = UsageEvent(
            id=new_event_id(timestamp_ms),
            timestamp_ms=timestamp_ms,
            customer=customer,
            key_id="key_0123456789abcdef",
            plan=PLAN,
            route="/v1/hello",
            method="GET",
            status=200,
            outcome="success",
            duration_us=180,
            ttfb_us=150,
            units={"calls": 1},
            billable=True,
            live=True,
            period_start=period_start,
        )
        settlement = Settlement(customer, True, period_start, "", True, True, (("calls", 1, 1, 0),))
        items.append(Pending(shard_of(customer, shards), event_row(event), settlement))
    return items


def _filled(url: str, shards: int, batch_size: int, items: Iterable[Pending]) -> Batcher:
    pipeline = Batcher(
        config(url, shards, batch_size).pipeline, metrics=AppMetrics.for_registry(CollectorRegistry())
    )
    for item in items:
        pipeline.put(item)
    return pipeline


def _check(pipeline: Batcher, count: int) -> None:
    stats = pipeline.stats
    if stats.flushed_events != count or stats.failures or stats.spooled_events or stats.dropped_events:
        raise RuntimeError(f"the flush did not write every event: {stats}")


def flush_sync(
    url: str,
    items: list[Pending],
    shards: int = SHARDS,
    batch_size: int = BATCH_SIZE,
    replica_wait: ReplicaWait | None = None,
) -> float:
    """Events per second of ``flush_sync`` writing ``items`` to Redis."""
    pipeline = _filled(url, shards, batch_size, items)
    storage = open_storage(url, shards=shards, timeout=30, replica_wait=replica_wait)
    storage.stream_length(0)  # connected before the clock starts
    started = time.perf_counter()
    flushers.flush_sync(pipeline, storage)
    elapsed = time.perf_counter() - started
    storage.close()
    _check(pipeline, len(items))
    return len(items) / elapsed


def flush_async(url: str, items: list[Pending]) -> float:
    """Events per second of ``flush_async`` writing ``items`` to Redis, on uvloop."""
    pipeline = _filled(url, SHARDS, BATCH_SIZE, items)

    async def flush() -> float:
        storage = open_async_storage(url, shards=SHARDS, timeout=30)
        await storage.resolve_key("0" * 64)  # connected before the clock starts
        started = time.perf_counter()
        await flushers.flush_async(pipeline, storage)
        elapsed = time.perf_counter() - started
        await storage.aclose()
        return elapsed

    elapsed = _run_on_uvloop(flush)
    _check(pipeline, len(items))
    return len(items) / elapsed


def _run_on_uvloop(main: Callable[[], object]) -> float:
    try:
        import uvloop
    except ImportError:
        factory = None
    else:
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        result = runner.run(main())  # type: ignore[arg-type]
    assert isinstance(result, float)
    return result


# -- rollup ------------------------------------------------------------------------------------------


def _worker(
    url: str, shards: int, owned: tuple[int, ...], ready: Queue[int], go: Event, done: Queue[int]
) -> None:
    """One rollup worker process: connect, say ready, wait for the start, drain its shards."""
    storage = open_storage(url, shards=shards, timeout=60)
    worker = RollupWorker(storage, config(url, shards, BATCH_SIZE * shards // SHARDS), shards=owned)
    storage.stream_length(0)
    ready.put(os.getpid())
    go.wait()
    done.put(worker.drain())
    storage.close()


def rollup(url: str, shards: int, workers: int, expected: int) -> float:
    """Events per second of ``workers`` processes draining ``shards`` (split evenly) at once."""
    context = multiprocessing.get_context("spawn")
    ready, done, go = context.Queue(), context.Queue(), context.Event()
    share = shards // workers
    processes = [
        context.Process(
            target=_worker,
            args=(url, shards, tuple(range(n * share, (n + 1) * share)), ready, go, done),
        )
        for n in range(workers)
    ]
    for process in processes:
        process.start()
    for _ in processes:
        _wait(ready, processes)
    started = time.perf_counter()
    go.set()
    events = sum(_wait(done, processes) for _ in processes)
    elapsed = time.perf_counter() - started
    for process in processes:
        process.join(30)
    if events != expected:
        raise RuntimeError(f"the rollup committed {events} events of {expected}")
    return events / elapsed


def _wait(queue: Queue[int], processes: list[BaseProcess]) -> int:
    """The next value from ``queue``, unless a process died without giving it."""
    while True:
        try:
            return queue.get(timeout=1)
        except Empty:
            if any(process.exitcode not in (None, 0) for process in processes):
                raise RuntimeError("a rollup worker process failed") from None


# -- the whole pipeline benchmark --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PipelineRun:
    flush_sync: float
    flush_async: float
    rollup_one: float
    rollup_two: float
    #: CPU used by other processes during the round, in cores.
    others_cores: float = 0.0


def run_round(url: str, events: int) -> PipelineRun:
    others = OthersClock()
    customers = _customers(url, SHARDS)
    synchronous = flush_sync(url, pending(events, customers, SHARDS))
    asynchronous = flush_async(url, pending(events, customers, SHARDS))
    one = rollup(url, SHARDS, 1, 2 * events)
    # Twice the shards, customers and events: the same customers, events and stream entries per shard.
    customers = _customers(url, 2 * SHARDS)
    flush_sync(url, pending(4 * events, customers, 2 * SHARDS), 2 * SHARDS, 2 * BATCH_SIZE)
    two = rollup(url, 2 * SHARDS, 2, 4 * events)
    return PipelineRun(synchronous, asynchronous, one, two, others.cores())


def run_rounds(
    url: str, events: int, rounds: int, retries: Retries, progress: Callable[[str], None]
) -> list[PipelineRun]:
    runs = []
    for number in range(rounds):
        attempt = 0
        while True:
            run = run_round(url, events)
            progress(
                f"round {number + 1}/{rounds} pipeline: flush sync {run.flush_sync:,.0f} ev/s,"
                f" async {run.flush_async:,.0f} ev/s; rollup 1 worker {run.rollup_one:,.0f} ev/s,"
                f" 2 workers {run.rollup_two:,.0f} ev/s; others {run.others_cores:.2f} cores"
            )
            if not retries.again(run.others_cores, attempt):
                break
            attempt += 1
            progress(f"other processes used {run.others_cores:.2f} cores: measuring it again")
        runs.append(run)
    return runs


def medians(runs: list[PipelineRun]) -> PipelineRun:
    return PipelineRun(
        statistics.median(run.flush_sync for run in runs),
        statistics.median(run.flush_async for run in runs),
        statistics.median(run.rollup_one for run in runs),
        statistics.median(run.rollup_two for run in runs),
        max(run.others_cores for run in runs),
    )
