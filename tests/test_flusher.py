"""The event pipeline: bounded buffer, per-shard batches, the disk spool, and replay with the same ids."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import cast

import msgpack
import pytest

import meterware.metering.flushers as flusher_module
from meterware.config import Pipeline as PipelineConfig
from meterware.errors import ConfigError, StorageError
from meterware.events import UsageEvent, decode_batch, event_row, format_event_id, new_event_id
from meterware.metering.admission import AdmitRequest
from meterware.metering.batcher import MAX_BACKOFF_SECONDS, Batcher
from meterware.metering.batching import Batches, EventBuffer, Pending, make_batches
from meterware.metering.flushers import AsyncFlusher, ThreadFlusher, exit_on_sigterm, flush_async, flush_sync
from meterware.metering.spool import Spool
from meterware.storage import open_async_storage, open_storage
from meterware.storage.base import BATCH_MEMORY_SECONDS, AsyncStorage, Batch, Settlement, Storage
from tests.servers import free_port

SHARDS = 4


def event(number: int, customer: str = "acme") -> UsageEvent:
    return UsageEvent(
        id=new_event_id(),
        timestamp_ms=1_767_225_600_000 + number,
        customer=customer,
        key_id="key_0123456789abcdef",
        plan="pro",
        route=f"/v1/items/{number}",
        method="GET",
        status=200,
        outcome="success",
        duration_us=100,
        ttfb_us=50,
        units={"calls": 1},
        billable=True,
    )


SETTLEMENT = Settlement("acme", True, 1_767_225_600, "", True, False, (("calls", 1, 2000, 0),))


def pending(number: int, shard: int = 0, settlement: Settlement | None = SETTLEMENT) -> Pending:
    return Pending(shard, event_row(event(number)), settlement)


@pytest.fixture
def memory_storage() -> Storage:
    """A fresh memory:// store with four shards."""
    return open_storage(f"memory://{uuid.uuid4().hex}", shards=SHARDS)


@pytest.fixture
def unreachable_storage() -> Iterator[Storage]:
    """A real Redis client pointed at a loopback port nobody listens on."""
    storage = open_storage(f"redis://127.0.0.1:{free_port()}/0", shards=SHARDS, timeout=0.2)
    yield storage
    storage.close()


def config(tmp_path: Path, **changes: object) -> PipelineConfig:
    return replace(PipelineConfig(spool_dir=str(tmp_path / "spool")), **changes)  # type: ignore[arg-type]


def stream(storage: Storage) -> list[tuple[int, str, list[UsageEvent]]]:
    """Every entry of every shard's stream: (shard, batch id, events)."""
    return [
        (shard, entry.fields[b"i"].decode(), decode_batch(entry.fields[b"b"]))
        for shard in range(SHARDS)
        for entry in storage.read_stream(shard, "0-0", 10_000)
    ]


def routes(events: list[UsageEvent]) -> list[str]:
    return [e.route for e in events]


# -- buffer and batches --------------------------------------------------------------------------------


def test_buffer_is_fifo_and_bounded() -> None:
    """The buffer keeps the oldest events up to its capacity and refuses the rest."""
    buffer = EventBuffer(3)
    items = [pending(n) for n in range(4)]
    assert [buffer.put(item) for item in items] == [True, True, True, False]
    assert len(buffer) == 3
    assert buffer.take(2) == items[:2]
    assert buffer.take(10) == items[2:3]
    assert buffer.take(10) == []


def test_batcher_put_drops_and_counts_when_the_buffer_is_full(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Batcher.put never blocks: past buffer_size, events are dropped, counted and logged."""
    pipeline = Batcher(config(tmp_path, buffer_size=3))
    with caplog.at_level(logging.ERROR, logger="meterware.flusher"):
        for number in range(5):
            pipeline.put(pending(number))
    assert len(pipeline.buffer) == 3
    assert pipeline.stats.dropped_events == 2
    assert [r.getMessage() for r in caplog.records] == [
        "meterware: event buffer full (3); an event was dropped"
    ] * 2


def test_make_batches_groups_by_shard_in_order() -> None:
    """Pending events become one batch per shard, events and settlements in arrival order."""
    items = [pending(0, 0), pending(1, 2, None), pending(2, 0), pending(3, 3), pending(4, 2)]
    batches = make_batches(items)
    assert [batch.shard for batch in batches] == [0, 2, 3]
    by_shard = {batch.shard: batch for batch in batches}
    assert routes(decode_batch(by_shard[0].payload)) == ["/v1/items/0", "/v1/items/2"]
    assert routes(decode_batch(by_shard[2].payload)) == ["/v1/items/1", "/v1/items/4"]
    assert by_shard[2].settlements == (None, SETTLEMENT)
    assert [event_row(e) for e in decode_batch(by_shard[3].payload)] == [items[3].row]
    ids = [batch.batch_id for batch in batches]
    assert len(set(ids)) == 3
    assert all(uuid.UUID(batch_id).version == 7 for batch_id in ids)


def test_make_batches_splits_a_shard_past_the_batch_size() -> None:
    """A shard with more events than the batch size gets several batches, in order (bounded script runs)."""
    items = [pending(index, 1) for index in range(5)]
    batches = make_batches(items, batch_size=2)
    assert [len(batch.settlements) for batch in batches] == [2, 2, 1]
    assert [route for batch in batches for route in routes(decode_batch(batch.payload))] == [
        f"/v1/items/{index}" for index in range(5)
    ]


def test_make_batches_of_nothing() -> None:
    """No pending events, no batches."""
    assert make_batches([]) == []


# -- spool ---------------------------------------------------------------------------------------------


def test_spool_round_trip(tmp_path: Path) -> None:
    """A spooled batch reads back identical, is listed until removed, and counts toward the size."""
    spool = Spool(tmp_path / "spool", max_bytes=1_000_000)
    assert spool.pending() == []
    assert spool.size() == 0
    capture = replace(SETTLEMENT, reservation_id="block-1", closes=False)  # a lease's call, not its last
    batches = make_batches([pending(0, 1), pending(1, 1, None), pending(2, 3), pending(3, 3, capture)])
    for batch in batches:
        assert spool.write(batch)
    paths = spool.pending()
    assert [path.name for path in paths] == sorted(f"{batch.batch_id}.batch" for batch in batches)
    assert spool.size() == sum(path.stat().st_size for path in paths)
    assert sorted((spool.read(path) for path in paths), key=lambda b: b.shard) == batches  # type: ignore[arg-type, return-value, union-attr]
    for path in paths:
        spool.remove(path)
    assert spool.pending() == []
    assert spool.size() == 0
    assert list((tmp_path / "spool").iterdir()) == []


def test_a_spooled_record_keeps_its_marker_and_a_spool_from_before_still_reads(tmp_path: Path) -> None:
    """A record's settlement reads back with its marker (replayed, it is still charged once); a call's row
    is written as before records had markers, and a file written before reads back as it did."""
    spool = Spool(tmp_path, max_bytes=1_000_000)
    record = replace(SETTLEMENT, once="record:job-1")
    (batch,) = make_batches([pending(0, 1, record), pending(1, 1)])
    spool.write(batch)
    (path,) = spool.pending()
    assert spool.read(path) == batch
    _, _, _, rows = msgpack.unpackb(path.read_bytes(), raw=False)
    assert [len(row) for row in rows] == [8, 7]
    path.write_bytes(msgpack.packb([1, batch.batch_id, batch.payload, [rows[1], rows[1]]], use_bin_type=True))
    assert spool.read(path) == replace(batch, settlements=(SETTLEMENT, SETTLEMENT))


def test_a_spooled_calls_rate_corrections_read_back(tmp_path: Path) -> None:
    """A call's meter rate corrections (a negative one too) follow its marker ("" for a call) in its row;
    readers from before read the first 8 values of such a row only (the 8-value row of a record)."""
    spool = Spool(tmp_path, max_bytes=1_000_000)
    metered = replace(SETTLEMENT, rates=(("tokens", 1000, 60, 300), ("tokens", 50, 1, -90)))
    (batch,) = make_batches([pending(0, 1, metered)])
    spool.write(batch)
    (path,) = spool.pending()
    assert spool.read(path) == batch
    _, _, _, rows = msgpack.unpackb(path.read_bytes(), raw=False)
    assert rows[0][7:] == ["", [["tokens", 1000, 60, 300], ["tokens", 50, 1, -90]]]


def test_spool_is_shared_through_the_directory(tmp_path: Path) -> None:
    """A second Spool on the same directory (another process) sees the batches of the first."""
    (batch,) = make_batches([pending(0)])
    Spool(tmp_path, max_bytes=1_000_000).write(batch)
    other = Spool(tmp_path, max_bytes=1_000_000)
    (path,) = other.pending()
    assert other.read(path) == batch


def test_spool_refuses_batches_beyond_its_cap(tmp_path: Path) -> None:
    """Once spool_max_bytes would be exceeded, write refuses the batch and keeps nothing."""
    spool = Spool(tmp_path, max_bytes=1_000_000)
    first, second = make_batches([pending(0, 0), pending(1, 1)])
    assert spool.write(first)
    capped = Spool(tmp_path, max_bytes=spool.size() + 10)
    assert not capped.write(second)
    assert [path.name for path in capped.pending()] == [f"{first.batch_id}.batch"]


def test_batcher_counts_batches_the_full_spool_drops(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """When the spool is full too, the batch's events are dropped and counted."""
    pipeline = Batcher(config(tmp_path, spool_max_bytes=0))
    with caplog.at_level(logging.ERROR, logger="meterware.flusher"):
        pipeline.spill(make_batches([pending(0), pending(1), pending(2, 1)]))
    assert pipeline.stats.dropped_events == 3
    assert pipeline.stats.spooled_events == 0
    assert "spool full (0 bytes); dropped a batch of 2 events" in caplog.records[0].getMessage()


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xc1garbage", id="not-msgpack"),
        pytest.param(b"\x93\x01\x02\x03", id="wrong-shape"),
        pytest.param(b"\x94\x00\xa1x\xc4\x00\x91\x91\x01", id="bad-settlement"),
    ],
)
def test_damaged_spool_file_is_set_aside(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """A spool file that cannot be read is renamed to .bad, logged, and no longer replayed."""
    spool = Spool(tmp_path, max_bytes=1_000_000)
    damaged = tmp_path / "0190f000-0000-7000-8000-000000000000.batch"
    damaged.write_bytes(content)
    with caplog.at_level(logging.ERROR, logger="meterware.flusher"):
        assert spool.read(damaged) is None
    assert not damaged.exists()
    assert damaged.with_suffix(".bad").read_bytes() == content
    assert "is damaged" in caplog.records[0].getMessage()
    assert spool.pending() == []


def test_reading_a_batch_replayed_meanwhile_returns_none(tmp_path: Path) -> None:
    """A spool file removed by another process is skipped, not reported as damaged."""
    spool = Spool(tmp_path, max_bytes=1_000_000)
    assert spool.read(tmp_path / "gone.batch") is None
    assert list(tmp_path.iterdir()) == []


# -- flushing, failing, spooling, replaying ------------------------------------------------------------


def test_flush_sync_writes_every_event_to_its_shard(tmp_path: Path, memory_storage: Storage) -> None:
    """flush_sync empties the buffer into one stream entry per shard and counts what it flushed."""
    flushed: list[Batch] = []
    pipeline = Batcher(config(tmp_path), on_flushed=flushed.append)
    for number, shard in enumerate([0, 1, 1, 3, 0]):
        pipeline.put(pending(number, shard))
    flush_sync(pipeline, memory_storage)
    assert len(pipeline.buffer) == 0
    entries = stream(memory_storage)
    assert [(shard, routes(events)) for shard, _, events in entries] == [
        (0, ["/v1/items/0", "/v1/items/4"]),
        (1, ["/v1/items/1", "/v1/items/2"]),
        (3, ["/v1/items/3"]),
    ]
    assert (pipeline.stats.flushed_events, pipeline.stats.flushed_batches, pipeline.stats.failures) == (
        5,
        3,
        0,
    )
    assert sorted(batch.batch_id for batch in flushed) == sorted(batch_id for _, batch_id, _ in entries)


def test_flush_sync_spools_when_the_backend_fails_and_replays_with_the_same_ids(
    tmp_path: Path, unreachable_storage: Storage, memory_storage: Storage, caplog: pytest.LogCaptureFixture
) -> None:
    """Batches that fail go to the spool; a later flush replays them with their ids, exactly once."""
    pipeline = Batcher(config(tmp_path))
    pipeline.backoff = MAX_BACKOFF_SECONDS  # the pass never retries (however long spooling takes)
    for number, shard in enumerate([0, 1, 2, 0]):
        pipeline.put(pending(number, shard))
    with caplog.at_level(logging.WARNING, logger="meterware.flusher"):
        flush_sync(pipeline, unreachable_storage)
    assert len(pipeline.buffer) == 0
    assert (pipeline.stats.failures, pipeline.stats.spooled_events, pipeline.stats.flushed_events) == (
        1,
        4,
        0,
    )
    assert pipeline.stats.dropped_events == 0
    assert "flush failed" in caplog.records[0].getMessage()
    spooled = [pipeline.spool.read(path) for path in pipeline.spool.pending()]
    assert sorted(batch.shard for batch in spooled if batch) == [0, 1, 2]

    # Another process sharing the spool directory (or this one once its backoff is over) replays it.
    replayer = Batcher(config(tmp_path))
    flush_sync(replayer, memory_storage)
    assert replayer.spool.pending() == []
    assert (replayer.stats.replayed_batches, replayer.stats.flushed_events) == (3, 4)
    entries = stream(memory_storage)
    assert sorted(batch_id for _, batch_id, _ in entries) == sorted(
        batch.batch_id for batch in spooled if batch
    )
    assert sorted(route for _, _, events in entries for route in routes(events)) == [
        f"/v1/items/{n}" for n in range(4)
    ]

    # An ambiguous failure left the same batches in the spool: replaying them again writes nothing.
    for batch in spooled:
        assert batch is not None
        replayer.spool.write(batch)
    flush_sync(replayer, memory_storage)
    assert replayer.spool.pending() == []
    assert stream(memory_storage) == entries
    assert (replayer.stats.replayed_batches, replayer.stats.flushed_batches) == (6, 3)


def test_replay_stops_at_the_first_failure(tmp_path: Path, unreachable_storage: Storage) -> None:
    """While the backend is still down, spooled batches stay where they are."""
    spool = Spool(tmp_path / "spool", max_bytes=1_000_000)
    for batch in make_batches([pending(0, 0), pending(1, 1)]):
        spool.write(batch)
    pipeline = Batcher(config(tmp_path))
    flush_sync(pipeline, unreachable_storage)
    assert len(pipeline.spool.pending()) == 2
    assert (pipeline.stats.failures, pipeline.stats.replayed_batches) == (1, 0)
    assert not pipeline.healthy()


@pytest.mark.redis
def test_a_batch_the_backend_refuses_is_set_aside_and_the_others_replay(
    tmp_path: Path, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A spooled batch refused as it is (a clobbered key) is quarantined; the batches behind it still flow."""
    import redis as redis_py

    from meterware.metering.records import Customer
    from meterware.storage import _keyspace

    storage = open_storage(redis_url, shards=SHARDS)
    for customer in ("acme", "globex"):
        storage.create_customer(Customer(customer, "pro"))
    spool = Spool(tmp_path / "spool", max_bytes=1_000_000)
    globex = Settlement("globex", True, 1_767_225_600, "", True, False, (("calls", 1, 2000, 0),))
    acme_shard, globex_shard = (_keyspace.shard_of(c, SHARDS) for c in ("acme", "globex"))
    refused, good = (
        make_batches([pending(0, acme_shard)]),
        make_batches([Pending(globex_shard, event_row(event(1, "globex")), globex)]),
    )
    for batch in refused + good:
        spool.write(batch)
    client = redis_py.Redis.from_url(redis_url)
    client.delete(_keyspace.customer(acme_shard, "acme"))
    client.set(_keyspace.customer(acme_shard, "acme"), "clobbered")  # an operator's mistake

    pipeline = Batcher(config(tmp_path))
    with caplog.at_level(logging.ERROR, logger="meterware.flusher"):
        flush_sync(pipeline, storage)
    assert pipeline.spool.pending() == []
    assert (pipeline.stats.quarantined_batches, pipeline.stats.replayed_batches) == (1, 1)
    assert [path.name for path in (tmp_path / "spool").iterdir()] == [f"{refused[0].batch_id}.refused"]
    assert "set aside as .refused" in caplog.records[0].getMessage()
    assert [routes(events) for _, _, events in stream(storage)] == [["/v1/items/1"]]
    client.close()
    storage.close()


def test_a_flush_pass_asks_for_its_writes_and_makes_none(tmp_path: Path) -> None:
    """``Batcher.flush_pass`` writes nothing itself: it yields the buffered events' batches, then each
    spooled batch to replay (sent what writing it gave), then the spent leases' blocks to close."""
    Batcher(config(tmp_path)).spill(make_batches([pending(1)]))
    batcher = Batcher(config(tmp_path))
    block = cast(AdmitRequest, "a spent lease's block")
    batcher.spent_leases = lambda final: [block]
    closed: list[list[AdmitRequest]] = []
    batcher.released = closed.append
    batcher.put(pending(0))
    steps = batcher.flush_pass(final=False)
    buffered = next(steps)
    assert isinstance(buffered, Batches)
    assert [routes(decode_batch(batch.payload)) for batch in buffered] == [["/v1/items/0"]]
    batcher.succeeded(buffered[0], True)  # the buffered batches' writer records their outcomes
    replayed = steps.send(None)
    assert isinstance(replayed, Batch)
    assert routes(decode_batch(replayed.payload)) == ["/v1/items/1"]
    assert steps.send(True) == [block]
    with pytest.raises(StopIteration):
        steps.send(None)
    assert (closed, batcher.releasing, batcher.spool.pending()) == ([[block]], [], [])
    assert (batcher.stats.flushed_batches, batcher.stats.replayed_batches) == (2, 1)


def test_a_flush_pass_ends_at_a_failed_replay_and_keeps_the_leases_open(tmp_path: Path) -> None:
    """A replay that fails ends the pass: the batch stays spooled, the batcher backs off, and the spent
    leases stay listed (closed while a call of theirs waits in the spool, their units could be taken
    again)."""
    Batcher(config(tmp_path)).spill(make_batches([pending(1)]))
    batcher = Batcher(config(tmp_path))
    block = cast(AdmitRequest, "a spent lease's block")
    batcher.spent_leases = lambda final: [block]
    steps = batcher.flush_pass(final=False)
    assert isinstance(next(steps), Batch)  # nothing buffered: the replay comes first
    with pytest.raises(StopIteration):
        steps.send(StorageError("connection refused"))
    assert (len(batcher.spool.pending()), batcher.releasing, batcher.healthy()) == (1, [block], False)


def test_flush_during_backoff_spools_without_calling_the_backend(
    tmp_path: Path, unreachable_storage: Storage
) -> None:
    """After a failure, new batches go straight to the spool until the backoff is over."""
    pipeline = Batcher(config(tmp_path))
    pipeline.put(pending(0))
    flush_sync(pipeline, unreachable_storage)
    pipeline.put(pending(1, 1))
    flush_sync(pipeline, unreachable_storage)
    assert pipeline.stats.failures == 1
    assert pipeline.stats.spooled_events == 2
    assert len(pipeline.spool.pending()) == 2


# -- flushers ------------------------------------------------------------------------------------------


def flusher_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "meterware-flusher"]


def test_thread_flusher_starts_once_and_drain_flushes_everything(
    tmp_path: Path, memory_storage: Storage
) -> None:
    """ensure_running starts one thread however often it is called; drain flushes all and stops it."""
    pipeline = Batcher(config(tmp_path, flush_interval=60.0))
    flusher = ThreadFlusher(pipeline, memory_storage)
    before = set(flusher_threads())
    for number in range(50):
        flusher.ensure_running()
        pipeline.put(pending(number, number % SHARDS))
    (thread,) = set(flusher_threads()) - before
    flusher.drain()
    assert not thread.is_alive()
    assert len(pipeline.buffer) == 0
    assert sorted(e.route for _, _, events in stream(memory_storage) for e in events) == sorted(
        f"/v1/items/{n}" for n in range(50)
    )
    assert pipeline.stats.flushed_events == 50


def test_thread_flusher_restarts_after_drain(tmp_path: Path, memory_storage: Storage) -> None:
    """A drained flusher starts a new thread when events arrive again."""
    pipeline = Batcher(config(tmp_path, flush_interval=60.0))
    flusher = ThreadFlusher(pipeline, memory_storage)
    before = set(flusher_threads())
    flusher.ensure_running()
    (first,) = set(flusher_threads()) - before
    flusher.drain()
    flusher.ensure_running()
    pipeline.put(pending(0))
    (second,) = set(flusher_threads()) - before
    assert second is not first
    flusher.drain()
    assert not second.is_alive()
    assert pipeline.stats.flushed_events == 1


def test_thread_flusher_wakes_up_on_a_full_batch(tmp_path: Path, memory_storage: Storage) -> None:
    """A full batch wakes the thread before its interval: the events arrive without a drain."""
    pipeline = Batcher(config(tmp_path, flush_interval=60.0, batch_size=10))
    flushed = threading.Event()
    pipeline.on_flushed = lambda batch: flushed.set()
    flusher = ThreadFlusher(pipeline, memory_storage)
    flusher.ensure_running()
    for number in range(10):
        pipeline.put(pending(number))
    try:
        assert flushed.wait(30), "the flusher thread never flushed the full batch"
    finally:
        flusher.drain()
    assert pipeline.stats.flushed_events == 10


def test_async_flusher_drain_flushes_everything(tmp_path: Path) -> None:
    """The asyncio flusher starts on the running loop and its drain flushes everything buffered."""
    url = f"memory://{uuid.uuid4().hex}"
    pipeline = Batcher(config(tmp_path, flush_interval=60.0))

    async def serve() -> None:
        flusher = AsyncFlusher(pipeline, open_async_storage(url, shards=SHARDS))
        for number in range(20):
            flusher.ensure_running()
            pipeline.put(pending(number, number % SHARDS))
        await flusher.drain()

    asyncio.run(serve())
    assert len(pipeline.buffer) == 0
    assert pipeline.stats.flushed_events == 20
    assert len([e for _, _, events in stream(open_storage(url, shards=SHARDS)) for e in events]) == 20


class WatchedFlushes:
    """Counts the flushes of a real async storage in flight (overall and per shard); the ``fail_at``-th
    flush raises instead of writing (as a timed-out one would)."""

    def __init__(self, storage: AsyncStorage, fail_at: int = 0, delay: float = 0.0) -> None:
        self.real_flush = storage.flush
        self.fail_at = fail_at
        self.delay = delay
        self.sent = 0
        self.in_flight: list[int] = []
        self.most_in_flight = 0
        self.overlapped_a_shard = False
        storage.flush = self.flush  # type: ignore[method-assign]

    async def flush(self, batch: Batch) -> bool:
        self.sent += 1
        if self.sent == self.fail_at:
            raise StorageError("injected: the connection timed out")
        self.overlapped_a_shard |= batch.shard in self.in_flight
        self.in_flight.append(batch.shard)
        self.most_in_flight = max(self.most_in_flight, len(self.in_flight))
        try:
            await asyncio.sleep(self.delay)
            return await self.real_flush(batch)
        finally:
            self.in_flight.remove(batch.shard)


def events_in_streams(url: str) -> list[UsageEvent]:
    storage = open_storage(url, shards=SHARDS)
    try:
        return [event for _, _, events in stream(storage) for event in events]
    finally:
        storage.close()


@pytest.mark.redis
def test_flush_async_sends_the_next_batch_while_one_is_in_redis_never_two_of_a_shard(
    tmp_path: Path, redis_url: str
) -> None:
    """Two batches are in flight at once (the next is encoded and sent while Redis runs one), never two
    of one shard: each shard's stream keeps its events in order."""
    pipeline = Batcher(config(tmp_path, batch_size=2))
    for number in range(16):
        pipeline.put(pending(number, number // 4))  # 4 events, 2 batches, per shard

    async def flush() -> WatchedFlushes:
        storage = open_async_storage(redis_url, shards=SHARDS)
        watched = WatchedFlushes(storage)
        await flush_async(pipeline, storage)
        await storage.aclose()
        return watched

    watched = asyncio.run(flush())
    assert (watched.sent, watched.most_in_flight, watched.overlapped_a_shard) == (8, 2, False)
    assert pipeline.stats.flushed_events == 16
    events = events_in_streams(redis_url)
    for shard in range(SHARDS):
        expected = [f"/v1/items/{shard * 4 + n}" for n in range(4)]
        assert [e.route for e in events if e.route in expected] == expected


@pytest.mark.redis
def test_flush_async_failure_spools_what_was_not_written_and_the_replay_completes_it(
    tmp_path: Path, redis_url: str
) -> None:
    """A flush fails while others are in flight: the ones answered are written, the failed one and the
    ones not sent go to the spool, and the replay writes each event exactly once."""
    pipeline = Batcher(config(tmp_path, batch_size=2))
    pipeline.backoff = MAX_BACKOFF_SECONDS  # the first pass never replays (however long it takes)
    for number in range(16):
        pipeline.put(pending(number, number % SHARDS))  # the batches alternate shards

    async def flush() -> WatchedFlushes:
        storage = open_async_storage(redis_url, shards=SHARDS)
        watched = WatchedFlushes(storage, fail_at=3)
        await flush_async(pipeline, storage)
        written = pipeline.stats.flushed_events
        assert written in (4, 6)  # the first two batches, and the one in flight with the failed one
        assert pipeline.stats.spooled_events == 16 - written
        await flush_async(pipeline, storage, final=True)  # the backend answers again: the spool replays
        await storage.aclose()
        return watched

    watched = asyncio.run(flush())
    assert pipeline.spool.pending() == []
    assert pipeline.stats.flushed_events == 16
    assert watched.overlapped_a_shard is False
    routes_written = sorted(e.route for e in events_in_streams(redis_url))
    assert routes_written == sorted(f"/v1/items/{n}" for n in range(16))


@pytest.mark.redis
def test_flush_async_cancelled_mid_flush_keeps_every_batch(tmp_path: Path, redis_url: str) -> None:
    """The loop ends while batches are in flight: each batch is written or spooled, and the replay writes
    each event exactly once."""
    pipeline = Batcher(config(tmp_path, batch_size=2))
    for number in range(16):
        pipeline.put(pending(number, number % SHARDS))

    async def cancel_mid_flush() -> None:
        storage = open_async_storage(redis_url, shards=SHARDS)
        WatchedFlushes(storage, delay=0.05)
        flush = asyncio.ensure_future(flush_async(pipeline, storage))
        await asyncio.sleep(0.01)
        flush.cancel()
        with pytest.raises(asyncio.CancelledError):
            await flush
        await storage.aclose()

    asyncio.run(cancel_mid_flush())
    assert pipeline.stats.flushed_events + pipeline.stats.spooled_events == 16
    assert pipeline.spool.pending()

    async def replay() -> None:
        storage = open_async_storage(redis_url, shards=SHARDS)
        await flush_async(pipeline, storage, final=True)
        await storage.aclose()

    asyncio.run(replay())
    assert pipeline.spool.pending() == []
    routes_written = sorted(e.route for e in events_in_streams(redis_url))
    assert routes_written == sorted(f"/v1/items/{n}" for n in range(16))


@pytest.mark.redis
def test_exit_drain_waits_for_the_flush_in_progress(tmp_path: Path, redis_url: str) -> None:
    """At exit, events the flusher thread has taken but not yet written are not left behind.

    The thread's flush is held up by a real Redis paused for writes; the exit hook must return only
    once those events are in the stream (a daemon thread does not outlive the interpreter's exit).
    """
    import redis

    from meterware.config import Config
    from meterware.metering.facade import Metering

    metering = Metering(
        Config.from_dict(
            {
                "storage": {"url": redis_url, "shards": SHARDS},
                "pipeline": {"flush_interval": 60, "spool_dir": str(tmp_path / "spool")},
            }
        )
    )
    storage = metering.backend()
    flusher = ThreadFlusher(metering.batcher, metering.backend(flushing=True))
    admin = redis.Redis.from_url(redis_url)
    try:
        flusher.ensure_running()
        admin.execute_command("CLIENT", "PAUSE", "500", "WRITE")
        metering.batcher.put(pending(0))
        metering.batcher.wake()
        for _ in range(200):  # at most 2 s for the thread to take the event
            if not len(metering.batcher.buffer):
                break
            threading.Event().wait(0.01)
        assert not len(metering.batcher.buffer), "the flusher thread never took the event"
        metering.drain_at_exit()
        assert routes([e for _, _, events in stream(storage) for e in events]) == ["/v1/items/0"]
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
        admin.close()
        flusher.drain()
        flusher.storage.close()
        storage.close()


# -- the spool's integrity ------------------------------------------------------------------------------


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def any_storage(request: pytest.FixtureRequest) -> Iterator[Storage]:
    """memory:// and a real redis-server in turn, empty."""
    url = (
        f"memory://{uuid.uuid4().hex}" if request.param == "memory" else request.getfixturevalue("redis_url")
    )
    storage = open_storage(url, shards=SHARDS)
    yield storage
    storage.close()


def test_a_spooled_batch_with_a_negative_price_is_refused_and_mints_nothing(
    tmp_path: Path, any_storage: Storage, caplog: pytest.LogCaptureFixture
) -> None:
    """A crafted spool file whose call has a negative price (it would raise a balance of 1 credit to
    1000.99) is refused by the backend and set aside as .refused: the balance does not move."""
    from meterware.metering.records import Customer
    from meterware.storage._keyspace import shard_of

    any_storage.create_customer(Customer("acme", "pro"))
    any_storage.grant_credits("acme", 1_000_000)
    minting = replace(SETTLEMENT, charges_credits=True, meters=(("calls", 1, -999_990_000, 0),))
    (batch,) = make_batches([pending(0, shard_of("acme", SHARDS), minting)])
    Spool(tmp_path / "spool", max_bytes=1_000_000).write(batch)

    pipeline = Batcher(config(tmp_path))
    with caplog.at_level(logging.ERROR, logger="meterware.flusher"):
        flush_sync(pipeline, any_storage)
    assert any_storage.get_balance("acme").balance == 1_000_000
    assert stream(any_storage) == []
    assert [path.name for path in (tmp_path / "spool").iterdir()] == [f"{batch.batch_id}.refused"]
    assert pipeline.stats.quarantined_batches == 1
    assert "price" in caplog.records[0].getMessage()


def test_the_spool_is_created_private(tmp_path: Path) -> None:
    """The spool directory is made 0700 and its files 0600, whatever the umask."""
    previous = os.umask(0)
    try:
        spool = Spool(tmp_path / "deep" / "spool", max_bytes=1_000_000)
        assert spool.write(make_batches([pending(0)])[0])
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "deep" / "spool").stat().st_mode) == 0o700
    (path,) = spool.pending()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777], ids=["world-writable", "group-writable", "sticky"])
def test_a_spool_writable_by_others_is_refused_at_start_up_and_at_first_use(
    tmp_path: Path, mode: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A spool directory others can write to (they could plant batches that charge or credit anyone) is
    refused with one line naming it: at start-up, and if it turns so later, nothing is spooled into it
    (the batch is dropped and counted) and nothing in it is replayed."""
    directory = tmp_path / "spool"
    directory.mkdir()
    directory.chmod(mode)
    with pytest.raises(ConfigError, match=rf"pipeline.spool_dir: {directory} is writable by group or others"):
        Batcher(config(tmp_path))

    directory.chmod(0o700)
    pipeline = Batcher(config(tmp_path))
    (planted,) = make_batches([pending(0)])
    pipeline.spool.write(planted)
    directory.chmod(mode)
    with caplog.at_level(logging.ERROR, logger="meterware.flusher"):
        pipeline.spill(make_batches([pending(1)]))
        assert pipeline.spool.pending() == []
    assert pipeline.stats.dropped_events == 1
    assert f"{directory} is writable by group or others" in caplog.records[0].getMessage()
    assert "\n" not in caplog.records[0].getMessage()


def test_a_spool_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    """A spool directory owned by another user is refused at start-up, naming it."""
    if os.geteuid() == 0:
        directory = tmp_path / "spool"
        directory.mkdir(mode=0o700)
        os.chown(directory, 65534, 65534)  # nobody
    else:
        directory = Path("/usr")  # root's
    with pytest.raises(ConfigError, match=rf"pipeline.spool_dir: {directory} is owned by uid \d+, not by"):
        Batcher(replace(PipelineConfig(), spool_dir=str(directory)))


def test_a_spooled_batch_older_than_its_marker_is_set_aside_not_replayed(
    tmp_path: Path, memory_storage: Storage, caplog: pytest.LogCaptureFixture
) -> None:
    """A spooled batch older than the backend remembers batch ids (it may have been applied before its
    ambiguous failure: a replay would charge it twice) is set aside as .expired, logged and counted; the
    younger batches beside it are replayed."""
    from prometheus_client import CollectorRegistry

    from meterware.metrics import AppMetrics

    now_ms = time.time_ns() // 1_000_000
    (fresh,) = make_batches([pending(0)])
    old = replace(fresh, batch_id=format_event_id(new_event_id(now_ms - (BATCH_MEMORY_SECONDS + 60) * 1000)))
    (young,) = make_batches([pending(1)])
    spool = Spool(tmp_path / "spool", max_bytes=1_000_000)
    spool.write(old)
    spool.write(young)

    registry = CollectorRegistry()
    pipeline = Batcher(config(tmp_path), metrics=AppMetrics(registry))
    with caplog.at_level(logging.ERROR, logger="meterware.flusher"):
        flush_sync(pipeline, memory_storage)
    assert [batch_id for _, batch_id, _ in stream(memory_storage)] == [young.batch_id]
    assert [path.name for path in (tmp_path / "spool").iterdir()] == [f"{old.batch_id}.expired"]
    assert pipeline.stats.expired_batches == 1
    assert registry.get_sample_value("meterware_batches_expired_total") == 1
    message = caplog.records[0].getMessage()
    assert f"spooled batch {old.batch_id}.batch is older than" in message


def same_shard_customers(count: int) -> list[str]:
    """``count`` customer ids whose keys share one shard (of SHARDS)."""
    from meterware.storage._keyspace import shard_of

    names = [f"c{index}" for index in range(200)]
    return [name for name in names if shard_of(name, SHARDS) == shard_of(names[0], SHARDS)][:count]


@pytest.mark.redis
@pytest.mark.parametrize("path", ["live-sync", "live-async", "replayed"])
def test_one_customers_clobbered_counter_sets_aside_only_their_part_of_a_batch(
    tmp_path: Path, redis_url: str, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch holding the calls of a customer whose balance was clobbered (not an integer) still settles
    the other customers of the shard: only that customer's part is set aside as a .refused batch (logged
    with the reason, counted), to be put back once the value is repaired."""
    import redis as redis_py

    from meterware.metering.records import Customer
    from meterware.storage import _keyspace
    from meterware.storage.base import Balance

    storage = open_storage(redis_url, shards=SHARDS)
    victim, payer, other = same_shard_customers(3)
    shard = _keyspace.shard_of(victim, SHARDS)
    for customer in (victim, payer, other):
        storage.create_customer(Customer(customer, "pro"))
        storage.grant_credits(customer, 1_000_000)
    client = redis_py.Redis.from_url(redis_url)
    client.hset(_keyspace.customer(shard, victim), "balance", "oops")
    calls = [(victim, 0), (payer, 1), (victim, 2), (other, 3), (payer, 4)]
    items = [
        Pending(
            shard, event_row(event(n, customer)), replace(SETTLEMENT, customer=customer, charges_credits=True)
        )
        for customer, n in calls
    ]

    pipeline = Batcher(config(tmp_path))
    with caplog.at_level(logging.ERROR, logger="meterware.flusher"):
        if path == "replayed":
            pipeline.spool.write(make_batches(items)[0])
            flush_sync(pipeline, storage)
        else:
            for item in items:
                pipeline.put(item)
            if path == "live-sync":
                flush_sync(pipeline, storage)
            else:

                async def flush_all() -> None:
                    async_storage = open_async_storage(redis_url, shards=SHARDS)
                    await flush_async(pipeline, async_storage, final=True)
                    await async_storage.aclose()

                asyncio.run(flush_all())
    assert storage.get_balance(payer) == Balance(1_000_000 - 2 * 2000, 0)
    assert storage.get_balance(other) == Balance(1_000_000 - 2000, 0)
    assert [routes(events) for _, _, events in stream(storage)] == [
        ["/v1/items/1", "/v1/items/3", "/v1/items/4"]
    ]
    [refused] = (tmp_path / "spool").glob("*.refused")
    aside = Spool(tmp_path / "spool", 1 << 20).read(refused.rename(refused.with_suffix(".batch")))
    assert aside is not None
    assert [s.customer for s in aside.settlements if s] == [victim, victim]
    assert routes(decode_batch(aside.payload)) == ["/v1/items/0", "/v1/items/2"]
    assert pipeline.stats.quarantined_batches == 1
    [line] = [r.getMessage() for r in caplog.records if "set aside" in r.getMessage()]
    assert f"{victim} field balance is not an integer" in line
    assert f"2 events of customer {victim}" in line

    # Repaired, the set-aside part is put back in the spool and replayed: the customer is charged.
    client.hset(_keyspace.customer(shard, victim), "balance", "1000000")
    flush_sync(pipeline, storage)
    assert storage.get_balance(victim) == Balance(1_000_000 - 2 * 2000, 0)
    client.close()
    storage.close()


@pytest.fixture
def sigterm_handler(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """SIGTERM's handler in this process (and when it first fired), put back after the test."""
    monkeypatch.setattr(flusher_module, "_sigterm_first", 0.0)
    before = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGTERM, before)


@pytest.mark.usefixtures("sigterm_handler")
def test_sigterm_exits_through_the_exit_hooks_only_where_nothing_else_handles_it() -> None:
    """Over the default action, from the main thread: a server's or app's own handler is left alone."""
    thread = threading.Thread(target=exit_on_sigterm)
    thread.start()
    thread.join()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # signal.signal works in the main thread only
    exit_on_sigterm()
    ours = signal.getsignal(signal.SIGTERM)
    assert callable(ours)
    with pytest.raises(SystemExit) as exited:
        ours(signal.SIGTERM, None)
    assert exited.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # a second SIGTERM kills at once

    def servers_own(signum: int, frame: object) -> None: ...

    signal.signal(signal.SIGTERM, servers_own)
    exit_on_sigterm()
    assert signal.getsignal(signal.SIGTERM) is servers_own
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    exit_on_sigterm()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN


def test_a_reloader_child_writes_each_event_when_its_call_finishes(
    monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """Django's and werkzeug's reloaders SIGKILL their child on SIGTERM: it keeps nothing buffered."""
    monkeypatch.setenv("RUN_MAIN", "true")
    pipeline = Batcher(PipelineConfig(flush_interval=60.0))
    storage = open_storage(redis_url, shards=4)
    flusher = ThreadFlusher(pipeline, storage)
    try:
        pipeline.put(pending(0))
        flusher.ensure_running()  # what the adapters call as each call finishes
        assert len(pipeline.buffer) == 0
        assert pipeline.stats.flushed_events == 1
    finally:
        flusher.drain()
        storage.close()


def test_a_spooled_record_is_charged_once_however_often_it_is_spooled(
    tmp_path: Path, any_storage: Storage
) -> None:
    """A record spooled by two processes (its retry was admitted in another before the first flushed)
    replays through the same flush: charged once, the marker set; the other copy writes no event of it."""
    from meterware.metering.records import Customer
    from meterware.storage._keyspace import shard_of

    any_storage.create_customer(Customer("acme", "pro"))
    any_storage.grant_credits("acme", 1_000_000)
    record = replace(SETTLEMENT, charges_credits=True, once="record:job-7")
    shard = shard_of("acme", SHARDS)
    first, second = (make_batches([pending(n, shard, record), pending(n + 10, shard)])[0] for n in (0, 1))
    for batch in (first, second):
        Spool(tmp_path / "spool", max_bytes=1_000_000).write(batch)
    flush_sync(Batcher(config(tmp_path)), any_storage)
    assert list((tmp_path / "spool").iterdir()) == []
    assert any_storage.get_balance("acme").balance == 1_000_000 - 2000  # the other calls charge no credits
    assert any_storage.is_used("acme", "record:job-7")
    # The copy replayed first is charged; the other's record is taken out of its batch, its call stays.
    written = sorted(route for _, _, events in stream(any_storage) for route in routes(events))
    assert written in (
        ["/v1/items/0", "/v1/items/10", "/v1/items/11"],
        ["/v1/items/1", "/v1/items/10", "/v1/items/11"],
    )


def test_a_split_batch_keeps_each_release_with_its_customer() -> None:
    """A batch refused for one customer is split by customer, the releases of its records taken out as
    duplicates included: a customer present only through a release is set aside alone (the batch was set
    aside whole), and the other customers' calls and releases are flushed."""
    from meterware.metering.spool import split_batch

    def settlement(customer: str) -> Settlement:
        return Settlement(customer, True, 0, "r-" + customer, True, True)

    rows = [event_row(UsageEvent(new_event_id(), 0, "a", "", "p", "/", "GET", 200, "success", 0, 0, {}))] * 2
    batch = Batch(
        0,
        str(uuid.uuid4()),
        msgpack.packb(rows),
        (settlement("a"), settlement("a")),
        releases=(settlement("b"), settlement("a")),
    )
    aside, rest = split_batch(batch, ["b"])
    assert rest is not None
    assert (aside.settlements, [r.customer for r in aside.releases]) == ((), ["b"])
    assert ([s.customer for s in rest.settlements if s], [r.customer for r in rest.releases]) == (
        ["a", "a"],
        ["a"],
    )
