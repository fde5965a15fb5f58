"""From the request path to the backend: a bounded buffer, flushers, and a spool for bad times.

The request path only appends to an in-process :class:`EventBuffer` (no I/O). A flusher (an asyncio task
under ASGI, a thread under WSGI) takes events out on size or age, groups them per shard into
:class:`~meterware.storage.base.Batch` es, and hands each to the backend's atomic, idempotent ``flush``.
When the backend fails, batches go to a :class:`Spool` directory on local disk and the flusher backs off;
spooled batches are replayed (by any process sharing the directory) once the backend answers again.
A batch keeps its id from the first attempt to the last, so an ambiguous failure followed by a retry never
writes it twice. Events are dropped only when both the buffer and the spool are full, and every drop is
counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import operator
import os
import signal
import stat
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Final, overload

import msgpack

from meterware._unsettled import CallChange, Unsettled
from meterware.config import Pipeline as PipelineConfig
from meterware.errors import ConfigError, StorageError
from meterware.events import EventRow, encode_rows, encode_rows_async, format_event_id, new_event_id
from meterware.storage._keyspace import check_customer_id
from meterware.storage.base import BATCH_MEMORY_SECONDS, AsyncStorage, Batch, Settlement, Storage

if TYPE_CHECKING:
    from meterware._core import AdmitRequest
    from meterware.metrics import AppMetrics

logger = logging.getLogger("meterware.flusher")

MAX_BACKOFF_SECONDS = 5.0
#: A spooled batch is replayed only while the backend remembers its id (an hour's margin for clocks).
REPLAY_WITHIN_SECONDS: Final = BATCH_MEMORY_SECONDS - 3600


# Built for every call: not frozen, as a frozen dataclass's __init__ costs an object.__setattr__ per field.
@dataclass(slots=True)
class Pending:
    """A finished call waiting to be flushed."""

    shard: int
    #: The call's event as written (:func:`meterware.events.event_row`).
    row: EventRow
    settlement: Settlement | None
    #: What its settlement will change of the customer's counters (counted at admission until written).
    change: CallChange | None = None


@dataclass(slots=True)
class FlushStats:
    """Counters of one process's pipeline (exported as metrics)."""

    flushed_events: int = 0
    flushed_batches: int = 0
    spooled_events: int = 0
    replayed_batches: int = 0
    quarantined_batches: int = 0
    expired_batches: int = 0
    dropped_events: int = 0
    failures: int = 0


class EventBuffer:
    """A bounded FIFO of pending events, safe to use from any thread without a lock."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: deque[Pending] = deque()

    def put(self, item: Pending) -> bool:
        """Append ``item``; return False (and keep nothing) when the buffer is full."""
        if len(self._items) >= self.capacity:
            return False
        self._items.append(item)
        return True

    def take(self, limit: int) -> list[Pending]:
        """Remove and return up to ``limit`` of the oldest events."""
        items: list[Pending] = []
        pop = self._items.popleft
        try:
            for _ in range(min(limit, len(self._items))):
                items.append(pop())
        except IndexError:  # another taker (an exit hook) emptied it meanwhile
            pass
        return items

    def __len__(self) -> int:
        return len(self._items)


_row_of: Final = operator.attrgetter("row")
_settlement_of: Final = operator.attrgetter("settlement")


class Batches(Sequence[Batch]):
    """The batches of some pending events: grouped per shard at once, each encoded when first asked for,
    so an asyncio flusher encodes one batch at a time between its writes instead of holding the event
    loop while it encodes thousands of events."""

    def __init__(self, items: Iterable[Pending], batch_size: int, unsettled: Unsettled | None = None) -> None:
        self._unsettled = unsettled
        by_shard: dict[int, list[Pending]] = defaultdict(list)
        for item in items:
            by_shard[item.shard].append(item)
        self._groups = [
            (shard, group[start : start + batch_size])
            for shard, group in by_shard.items()
            for start in range(0, len(group), batch_size)
        ]
        self._batches: dict[int, Batch] = {}

    def __len__(self) -> int:
        return len(self._groups)

    @overload
    def __getitem__(self, index: int) -> Batch: ...
    @overload
    def __getitem__(self, index: slice) -> list[Batch]: ...
    def __getitem__(self, index: int | slice) -> Batch | list[Batch]:
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        index = range(len(self))[index]
        batch = self._batches.get(index)
        if batch is None:
            shard, group = self._groups[index]
            batch = self._batch(shard, group, encode_rows(list(map(_row_of, group))))
            batch = self._batches[index] = self._name(batch, group)
        return batch

    async def get_async(self, index: int) -> Batch:
        """``self[index]`` on an event loop: a big batch is encoded with yields in between."""
        batch = self._batches.get(index)
        if batch is None:
            shard, group = self._groups[index]
            payload = await encode_rows_async(list(map(_row_of, group)))
            batch = self._batches[index] = self._name(self._batch(shard, group, payload), group)
        return batch

    def _name(self, batch: Batch, group: list[Pending]) -> Batch:
        """From now on the changes of the batch's calls count at admission until the batch is written:
        the batch, with who made it and its generation."""
        if self._unsettled is None:
            return batch
        writer, generation = self._unsettled.batched(
            batch.batch_id, [item.change for item in group if item.change]
        )
        return replace(batch, writer=writer, generation=generation)

    @staticmethod
    def _batch(shard: int, group: list[Pending], payload: bytes) -> Batch:
        return Batch(
            shard=shard,
            batch_id=format_event_id(new_event_id()),
            payload=payload,
            settlements=tuple(map(_settlement_of, group)),
        )


def make_batches(items: Iterable[Pending], batch_size: int = PipelineConfig().batch_size) -> list[Batch]:
    """Group pending events per shard into batches of at most ``batch_size`` events (one script run each:
    bounded, so a flush never holds Redis for long), with fresh, time-sortable ids."""
    return list(Batches(items, batch_size))


def _count_events(batch: Batch) -> int:
    return len(batch.settlements)


class Spool:
    """Batches kept on local disk while the backend is unreachable, one file per batch.

    A spooled batch is replayed as it reads (it names the customers to charge and the prices), so the
    directory is private: made 0700 with files 0600, and refused if another user owns it or if group or
    others may write to it.
    """

    SUFFIX = ".batch"

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self._size: int | None = None

    def check(self) -> None:
        """Raise ``ConfigError`` naming the directory if it exists and is not private to this user."""
        try:
            found = self.directory.stat()
        except FileNotFoundError:
            return
        if found.st_uid != os.geteuid():
            problem = (
                f"{self.directory} is owned by uid {found.st_uid}, not by this process's ({os.geteuid()})"
            )
        elif found.st_mode & 0o022:
            mode = stat.S_IMODE(found.st_mode)
            problem = f"{self.directory} is writable by group or others (mode {mode:04o}); make it 0700"
        else:
            return
        raise ConfigError("pipeline.spool_dir", problem)

    def write(self, batch: Batch) -> bool:
        """Persist ``batch``; return False if the spool is full (the batch is then dropped).

        Raise ``ConfigError`` if the directory is not private, ``OSError`` if it cannot be written.
        """
        data = _batch_data(batch)
        if self.size() + len(data) > self.max_bytes:
            return False
        self._store(batch.batch_id + self.SUFFIX, data)
        self._size = self.size() + len(data)
        return True

    def set_aside(self, batch: Batch, suffix: str) -> Path:
        """Keep ``batch`` in the directory under ``suffix`` (not replayed; beyond the size cap)."""
        return self._store(batch.batch_id + suffix, _batch_data(batch))

    def _store(self, name: str, data: bytes) -> Path:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.check()
        final = self.directory / name
        temporary = final.with_suffix(f".tmp{os.getpid()}")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with open(descriptor, "wb") as file:
            os.fchmod(descriptor, 0o600)  # one left behind by a crash keeps its mode otherwise
            file.write(data)
            file.flush()
            os.fsync(descriptor)
        os.replace(temporary, final)
        return final

    def size(self) -> int:
        """Bytes currently spooled (by every process sharing the directory, as last counted)."""
        if self._size is None:
            self._size = sum(path.stat().st_size for path in self._files())
        return self._size

    def _files(self) -> list[Path]:
        try:
            return sorted(self.directory.glob(f"*{self.SUFFIX}"))
        except FileNotFoundError:
            return []

    def pending(self) -> list[Path]:
        """Spooled batch files, oldest first (none, and an error logged, if the directory is not private)."""
        try:
            self.check()
        except ConfigError as error:
            logger.error("meterware: spooled batches are not replayed: %s", error)
            return []
        files = self._files()
        self._size = None if files else 0
        return files

    def read(self, path: Path) -> Batch | None:
        """Load one spooled batch; a damaged file is set aside as ``.bad`` and None returned."""
        try:
            shard, batch_id, payload, rows = msgpack.unpackb(path.read_bytes(), raw=False)
            batch = Batch(shard, batch_id, payload, tuple(_settlement_from_row(row) for row in rows))
            batch_time(batch)
            return batch
        except FileNotFoundError:
            return None  # replayed meanwhile by another process
        except Exception as error:
            logger.error("meterware: spooled batch %s is damaged (%s); moved aside as .bad", path, error)
            path.rename(path.with_suffix(".bad"))
            return None

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        self._size = None


def _batch_data(batch: Batch) -> bytes:
    """What a spool file holds."""
    settlements = [_settlement_row(s) for s in batch.settlements]
    return msgpack.packb([batch.shard, batch.batch_id, batch.payload, settlements], use_bin_type=True)


def split_batch(batch: Batch, customers: Iterable[str]) -> tuple[Batch, Batch | None]:
    """The calls of ``customers`` in ``batch``, and the others (None if none, or if it cannot be split):
    each with an id made from the batch's (its time, and the same ids however often it is split)."""
    named = frozenset(customers)
    rows = msgpack.unpackb(batch.payload, raw=False)
    if not isinstance(rows, list) or len(rows) != len(batch.settlements):
        return batch, None
    picked = [s is not None and s.customer in named for s in batch.settlements]
    if all(picked) or not any(picked):
        return batch, None
    tag = " ".join(sorted(named))
    parts = []
    for keep in (True, False):
        chosen = [index for index, chose in enumerate(picked) if chose is keep]
        parts.append(
            Batch(
                batch.shard,
                _derived_id(batch.batch_id, f"{keep} {tag}"),
                encode_rows([rows[index] for index in chosen]),
                tuple(batch.settlements[index] for index in chosen),
            )
        )
    return parts[0], parts[1]


def _derived_id(batch_id: str, tag: str) -> str:
    """A UUIDv7 with the time of ``batch_id`` and bits drawn from ``tag``."""
    drawn = int.from_bytes(hashlib.sha256(f"{batch_id} {tag}".encode()).digest()[:10], "big")
    value = uuid.UUID(batch_id).int >> 80 << 80 | drawn
    value = value & ~(0xF << 76 | 0b11 << 62) | 7 << 76 | 0b10 << 62  # version 7, RFC 9562 variant
    return str(uuid.UUID(int=value))


def batch_time(batch: Batch) -> float:
    """When ``batch`` was made (epoch seconds, from its UUIDv7 id); ``ValueError`` if its id is not one."""
    value = uuid.UUID(batch.batch_id)
    if value.version != 7:
        raise ValueError(f"batch id {batch.batch_id!r:.60} is not a UUIDv7")
    return (value.int >> 80) / 1000


#: Prefixed to the reservation id of a spooled settlement that captures from its block (ids are hex).
CAPTURE_MARK: Final = "+"


def _settlement_row(settlement: Settlement | None) -> list[object] | None:
    if settlement is None:
        return None
    s = settlement
    meters = [list(m) for m in s.meters]
    # A capture is marked on its reservation id: a reader from before captures finds no such reservation
    # (the call is still charged) instead of closing the block early, or refusing the row.
    reservation_id = s.reservation_id if s.closes else CAPTURE_MARK + s.reservation_id
    return [s.customer, s.live, s.period_start, reservation_id, s.billable, s.charges_credits, meters]


def _settlement_from_row(row: list[object] | None) -> Settlement | None:
    if row is None:
        return None
    customer, live, period_start, reservation_id, billable, charges, meters = row
    closes = not str(reservation_id).startswith(CAPTURE_MARK)
    return Settlement(
        check_customer_id(str(customer)),
        bool(live),
        int(period_start),  # type: ignore[call-overload]
        str(reservation_id).removeprefix(CAPTURE_MARK),
        bool(billable),
        bool(charges),
        tuple((str(m), int(u), int(p), int(i)) for m, u, p, i in meters),  # type: ignore[attr-defined]
        closes=closes,
    )


class Pipeline:
    """One process's buffer, spool and counters, shared by its flushers and its request path.

    ``metrics``: where the counters are also exported (incremented where they happen, so they add up
    across the processes of a pre-fork server).
    """

    def __init__(
        self,
        config: PipelineConfig,
        *,
        on_flushed: Callable[[Batch], None] | None = None,
        metrics: AppMetrics | None = None,
    ) -> None:
        self.config = config
        self.buffer = EventBuffer(config.buffer_size)
        self.spool = Spool(config.spool_dir, config.spool_max_bytes)
        self.spool.check()
        self.stats = FlushStats()
        self.on_flushed = on_flushed
        self.metrics = metrics
        #: The depth gauge, when each event in and out of the buffer updates it (multiprocess mode).
        self._depth = (
            metrics.buffer_events if metrics is not None and metrics.counts_buffer(self.buffer) else None
        )
        #: The process that counted this buffer's capacity (a forked worker counts its own).
        self._counted_pid = 0
        self.backoff = 0.0
        self.retry_at = 0.0
        #: Set by the running flusher: tells it a full batch is waiting.
        self.wake: Callable[[], None] = lambda: None
        #: Held by a synchronous flush from taking events out of the buffer until they are written, so
        #: the exit hook waits for one in progress in the flusher thread instead of finding nothing to do.
        self.flushing = threading.RLock()
        #: Set under lease admission: takes the leases whose calls have all finished (so are buffered).
        self.spent_leases: Callable[[bool], list[AdmitRequest]] | None = None
        #: Spent leases whose reservations close once every event before them is written.
        self.releasing: list[AdmitRequest] = []
        #: Called with the spent leases once their reservations are closed.
        self.released: Callable[[list[AdmitRequest]], None] = lambda blocks: None
        #: The changes of the calls buffered, batched and spooled that are not known to be written yet.
        self.unsettled = Unsettled()

    def put(self, item: Pending) -> None:
        """Queue a finished call (the request path's only pipeline step)."""
        change = item.change
        if change is not None:
            self.unsettled.add(change)  # before the flusher can take it
        if not self.buffer.put(item):
            if change is not None:
                self.unsettled.discard((change,))
            self.stats.dropped_events += 1
            if self.metrics is not None:
                self.metrics.events_dropped.inc()
            logger.error("meterware: event buffer full (%d); an event was dropped", self.buffer.capacity)
            return
        if self._depth is not None:
            self._depth.inc()
        if len(self.buffer) == self.config.batch_size:
            # Once per batch that fills up: the flusher then takes everything buffered.
            self.wake()

    # The decisions below are shared by the async and the thread flusher; only the I/O differs.

    def more_to_flush(self, final: bool) -> bool:
        """Whether a flush pass goes on: while full batches wait (or to the end, at the last flush). The
        calls that arrived during the pass wait for the next one: a pass that chased every new event would
        flush them a few at a time, paying each batch's fixed cost for a handful."""
        return final or len(self.buffer) >= self.config.batch_size

    def take_spent_leases(self, final: bool) -> None:
        """Before a flush pass takes the buffer: the spent leases, whose calls are all buffered by now
        (``final``: every idle lease, the process is stopping)."""
        if self.spent_leases is not None:
            self.releasing += self.spent_leases(final)

    def may_release(self) -> bool:
        """Whether spent leases may close: every event buffered before them is written. (Closing a
        lease while one of its calls waits in the spool would let other calls take its units again.)"""
        return bool(self.releasing) and self.healthy() and not self.spool.pending()

    def release_failed(self, error: StorageError) -> None:
        # The leases stay listed for the next pass (the worker refunds them past their deadline anyway).
        logger.warning("meterware: closing %d spent leases failed (%s)", len(self.releasing), error)

    def next_batches(self) -> Batches:
        # Up to a full batch for each of 16 shards at a time: the more events of a customer a batch holds,
        # the less each costs (its counters and ledger move once per batch).
        items = self.buffer.take(self.config.batch_size * 16)
        if self._depth is not None and items:
            self._depth.dec(len(items))
        return Batches(items, self.config.batch_size, self.unsettled)

    def observe(self) -> None:
        """Export what only the flusher sees (when it starts and at each flush pass, in its process)."""
        metrics = self.metrics
        if metrics is None:
            return
        if self._counted_pid != os.getpid():
            # Counted by the process that flushes, never by a pre-fork master that only built the app.
            self._counted_pid = os.getpid()
            metrics.buffer_capacity.inc(self.buffer.capacity)
        metrics.spool_bytes.set(self.spool.size())

    def healthy(self) -> bool:
        return time.monotonic() >= self.retry_at

    def succeeded(self, batch: Batch, applied: bool, *, replayed: bool = False) -> None:
        self.unsettled.settled(batch.batch_id)
        self.backoff = 0.0
        self.retry_at = 0.0
        if replayed:
            self.stats.replayed_batches += 1
            if self.metrics is not None:
                self.metrics.batches_replayed.inc()
        if applied:
            self.stats.flushed_batches += 1
            self.stats.flushed_events += _count_events(batch)
            if self.metrics is not None:
                self.metrics.batches_flushed.inc()
                self.metrics.events_flushed.inc(_count_events(batch))
            if self.on_flushed is not None:
                self.on_flushed(batch)

    def failed(self, error: StorageError) -> None:
        self.stats.failures += 1
        if self.metrics is not None:
            self.metrics.flush_errors.inc()
        self.backoff = min(MAX_BACKOFF_SECONDS, self.backoff * 2 or 0.1)
        self.retry_at = time.monotonic() + self.backoff
        logger.warning("meterware: flush failed (%s); spooling, retry in %.1fs", error, self.backoff)

    def refused(self, batch: Batch, error: StorageError, path: Path | None = None) -> Path | None:
        """Set aside what the backend refuses of ``batch`` as it is, so it cannot hold up the rest: the
        calls of the customers whose stored values it cannot settle (``error.customers``), else all of it.

        The part set aside stays on disk (``.refused``) for an operator to repair the data and put it back
        (as ``.batch``); the rest goes to the spool, to be flushed next (its path is returned). ``path``:
        the spool file ``batch`` came from, removed once its parts are kept.
        """
        aside, rest = split_batch(batch, error.customers) if error.customers else (batch, None)
        self.stats.quarantined_batches += 1
        if self.metrics is not None:
            self.metrics.batches_quarantined.inc()
        whose = f" of customer {', '.join(error.customers)}" if rest is not None else ""
        logger.error(
            "meterware: the backend refuses %s (%s): %d events%s set aside as .refused",
            path.name if path is not None else f"batch {batch.batch_id}",
            error,
            _count_events(aside),
            whose,
        )
        # What is set aside stops counting at admission; the rest counts under the id it is kept by.
        self.unsettled.split(batch.batch_id, rest.batch_id if rest is not None else None, error.customers)
        try:
            if path is not None and rest is None:
                path.rename(path.with_suffix(".refused"))
                self.spool.remove(path)
                return None
            self.spool.set_aside(aside, ".refused")
            kept = self.spool.set_aside(rest, Spool.SUFFIX) if rest is not None else None
        except (ConfigError, OSError) as problem:
            self.stats.dropped_events += _count_events(batch)
            if self.metrics is not None:
                self.metrics.events_dropped.inc(_count_events(batch))
            logger.error(
                "meterware: cannot set aside (%s); dropped a batch of %d events",
                problem,
                len(batch.settlements),
            )
            return None
        if path is not None:
            self.spool.remove(path)
        return kept

    def spill(self, batches: Iterable[Batch]) -> None:
        for batch in batches:
            try:
                problem = "" if self.spool.write(batch) else f"spool full ({self.spool.max_bytes} bytes)"
            except (ConfigError, OSError) as error:
                problem = f"cannot spool ({' '.join(str(error).split())})"
            if not problem:
                self.stats.spooled_events += _count_events(batch)
                if self.metrics is not None:
                    self.metrics.events_spooled.inc(_count_events(batch))
            else:
                self.unsettled.settled(batch.batch_id)
                self.stats.dropped_events += _count_events(batch)
                if self.metrics is not None:
                    self.metrics.events_dropped.inc(_count_events(batch))
                logger.error("meterware: %s; dropped a batch of %d events", problem, _count_events(batch))

    def replayable(self, path: Path) -> Batch | None:
        """The spooled batch at ``path``, unless it is damaged (set aside as ``.bad``) or older than the
        backend remembers batch ids (set aside as ``.expired``: it may have been applied before the failure
        that spooled it, and a replay would then charge it twice)."""
        batch = self.spool.read(path)
        if batch is None:
            # Damaged, or replayed by another process sharing the directory: not to be written from here.
            self.unsettled.settled(path.stem)
            return None
        if time.time() - batch_time(batch) < REPLAY_WITHIN_SECONDS:
            return batch
        self.unsettled.settled(batch.batch_id)
        self.stats.expired_batches += 1
        if self.metrics is not None:
            self.metrics.batches_expired.inc()
        logger.error(
            "meterware: spooled batch %s is older than %d hours (the backend may have applied it and "
            "forgotten its id: a replay could charge it twice); set aside as .expired, not replayed",
            path.name,
            REPLAY_WITHIN_SECONDS // 3600,
        )
        path.rename(path.with_suffix(".expired"))
        self.spool.remove(path)
        return None

    def flush_sync(self, storage: Storage, *, final: bool = False) -> None:
        """Flush everything buffered and spooled now (the thread flusher's step; also used at exit).

        ``final``: the last attempt before stopping, made even while backing off.
        """
        with self.flushing:
            if final:
                self.retry_at = 0.0
            self.observe()
            self.take_spent_leases(final)
            while batches := self.next_batches():
                self._flush_sync(storage, batches)
                if not self.more_to_flush(final):
                    break
            if self.healthy():
                paths = self.spool.pending()
                for path in paths:  # grows by what is left of a batch refused in part
                    batch = self.replayable(path)
                    if batch is None:
                        continue
                    try:
                        applied = self._timed_flush(storage, batch)
                    except StorageError as error:
                        if error.refused:
                            paths += filter(None, [self.refused(batch, error, path)])
                            continue
                        self.failed(error)
                        return
                    self.spool.remove(path)
                    self.succeeded(batch, applied, replayed=True)
            if self.may_release():
                try:
                    storage.release(self.releasing)
                except StorageError as error:
                    self.release_failed(error)
                else:
                    self.released(self.releasing)
                    self.releasing = []

    def _flush_sync(self, storage: Storage, batches: Sequence[Batch]) -> None:
        for index, batch in enumerate(batches):
            if not self.healthy():
                self.spill(batches[index:])
                return
            try:
                applied = self._timed_flush(storage, batch)
            except StorageError as error:
                if error.refused:  # the backend answered: the rest goes on
                    self.refused(batch, error)
                    continue
                self.failed(error)
                self.spill(batches[index:])
                return
            self.succeeded(batch, applied)

    def _timed_flush(self, storage: Storage, batch: Batch) -> bool:
        if self.metrics is None:
            return storage.flush(batch)
        began = time.perf_counter()
        try:
            return storage.flush(batch)
        finally:
            self.metrics.flush_duration.observe(time.perf_counter() - began)

    async def _timed_flush_async(self, storage: AsyncStorage, batch: Batch) -> bool:
        if self.metrics is None:
            return await storage.flush(batch)
        began = time.perf_counter()
        try:
            return await storage.flush(batch)
        finally:
            self.metrics.flush_duration.observe(time.perf_counter() - began)

    async def flush_async(self, storage: AsyncStorage, *, final: bool = False) -> None:
        """The twin of :meth:`flush_sync` for asyncio."""
        if final:
            self.retry_at = 0.0
        self.observe()
        self.take_spent_leases(final)
        while batches := self.next_batches():
            await self._flush_async(storage, batches)
            if not self.more_to_flush(final):
                break
        if self.healthy():
            paths = self.spool.pending()
            for path in paths:  # grows by what is left of a batch refused in part
                batch = self.replayable(path)
                if batch is None:
                    continue
                try:
                    applied = await self._timed_flush_async(storage, batch)
                except StorageError as error:
                    if error.refused:
                        paths += filter(None, [self.refused(batch, error, path)])
                        continue
                    self.failed(error)
                    return
                self.spool.remove(path)
                self.succeeded(batch, applied, replayed=True)
        if self.may_release():
            try:
                await storage.release(self.releasing)
            except StorageError as error:
                self.release_failed(error)
            else:
                self.released(self.releasing)
                self.releasing = []

    async def _flush_async(self, storage: AsyncStorage, batches: Batches) -> None:
        """Write the batches, two at a time: while one is in the backend, the next is encoded and sent, so
        the process's work overlaps the backend's. Two batches of one shard never overlap: each shard's
        stream and counters take its batches in order."""
        # Sent and not answered yet, oldest first; a batch leaves the list once its outcome is recorded.
        flying: list[tuple[Batch, asyncio.Task[bool]]] = []
        sent = 0  # batches[:sent] are flying or done
        try:
            while sent < len(batches):
                batch = await batches.get_async(sent)  # encoded while the batch before is in the backend
                if flying and flying[0][0].shard == batch.shard and not await self._land_oldest(flying):
                    break
                if not self.healthy():
                    break
                flying.append((batch, asyncio.ensure_future(self._timed_flush_async(storage, batch))))
                sent += 1
                await asyncio.sleep(0)  # the flush sends its batch; calls run in between too
                if len(flying) == 2 and not await self._land_oldest(flying):
                    break
            while flying:
                await self._land_oldest(flying)
        except BaseException:
            # Cancelled (the loop is ending) or broken mid-flush: keep what is not known to be written
            # (retrying an applied batch is a no-op).
            for _, task in flying:
                task.cancel()
            self.spill([batch for batch, _ in flying])
            self.spill(batches[sent:])
            raise
        self.spill(batches[sent:])  # after a failure: the rest waits in the spool

    async def _land_oldest(self, flying: list[tuple[Batch, asyncio.Task[bool]]]) -> bool:
        """Record the outcome of the oldest batch in flight: written, or spooled (False) if it failed."""
        batch, task = flying[0]
        try:
            applied = await task
        except StorageError as error:
            del flying[0]
            if error.refused:  # the backend answered: the rest goes on
                self.refused(batch, error)
                return True
            self.failed(error)
            self.spill([batch])
            return False
        del flying[0]
        self.succeeded(batch, applied)
        return True


class AsyncFlusher:
    """Flushes a pipeline from an asyncio task, started lazily on the running loop, restarted if it dies."""

    def __init__(self, pipeline: Pipeline, storage: AsyncStorage) -> None:
        self.pipeline = pipeline
        self.storage = storage
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._stopping = False

    def ensure_running(self) -> None:
        """Start the flusher task on the current loop unless it is alive there (cheap; called per event).

        Outside a running loop (a sync iterator served from a worker thread) it does nothing: the next
        call on the loop starts the task, and the exit hook flushes what is left.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = self._task
        if task is not None and not task.done() and self._loop is loop:
            return
        if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
            logger.error("meterware: flusher died (%r); restarting", task.exception())
        self._loop = loop
        self._wake = event = asyncio.Event()

        loop_thread = threading.get_ident()

        def wake() -> None:  # from any thread: Django serves sync streams from worker threads
            if threading.get_ident() == loop_thread:
                event.set()
            else:
                loop.call_soon_threadsafe(event.set)

        self.pipeline.wake = wake
        self._task = loop.create_task(self._run(), name="meterware-flusher")

    async def _run(self) -> None:
        interval = self.pipeline.config.flush_interval
        self.pipeline.observe()
        task = asyncio.current_task()
        # A driver may turn a cancellation into a connection error: stop once cancelled, whatever it said.
        while not self._stopping and not (task is not None and task.cancelling()):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._wake.wait()
            self._wake.clear()
            await self.pipeline.flush_async(self.storage)

    async def drain(self) -> None:
        """Flush everything buffered (at shutdown): the task ends its current flush, then the rest goes."""
        task = self._task
        if task is not None and not task.done() and self._loop is asyncio.get_running_loop():
            self._stopping = True
            self._wake.set()
            await asyncio.wait([task])
        self._task = None
        self._stopping = False
        await self.pipeline.flush_async(self.storage, final=True)


class ThreadFlusher:
    """Flushes a pipeline from a daemon thread, started lazily per process (after fork), restarted if dead.

    In a development reloader's child (``manage.py runserver``, ``flask run --reload``) each call's event is
    also written at once, by the thread that finished the call: the reloader answers SIGTERM by killing its
    child with SIGKILL, which no exit hook survives.
    """

    def __init__(self, pipeline: Pipeline, storage: Storage) -> None:
        self.pipeline = pipeline
        self.storage = storage
        self.write_through = reloader_child()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def ensure_running(self) -> None:
        """Start the thread in this process unless it is alive (cheap; called per event)."""
        if self.write_through:
            self.pipeline.flush_sync(self.storage)
        thread = self._thread
        if thread is not None and thread.is_alive() and self._pid == os.getpid():
            return
        with self._lock:
            if self._thread is not None and self._thread.is_alive() and self._pid == os.getpid():
                return
            if self._thread is not None and self._pid == os.getpid():
                logger.error("meterware: flusher thread died; restarting")
            self._pid = os.getpid()
            self._stop = threading.Event()
            self.pipeline.wake = self._wake.set
            self._thread = threading.Thread(target=self._run, name="meterware-flusher", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        interval = self.pipeline.config.flush_interval
        self.pipeline.observe()
        while not self._stop.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            try:
                self.pipeline.flush_sync(self.storage)
            except Exception:
                logger.exception("meterware: unexpected error in the flusher; retrying")
                time.sleep(interval)

    def drain(self, timeout: float = 10.0) -> None:
        """Stop the thread and flush everything buffered (at exit)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread.is_alive() and self._pid == os.getpid():
            self._thread.join(timeout)
        self._thread = None
        self.pipeline.flush_sync(self.storage, final=True)


def reloader_child() -> bool:
    """Whether this process is the child of Django's or werkzeug's reloader (which SIGKILLs it on SIGTERM)."""
    return os.environ.get("RUN_MAIN") == "true" or os.environ.get("WERKZEUG_RUN_MAIN") == "true"


#: The modules whose code a SIGTERM does not interrupt in the main thread: a call's path and the drain.
_UNINTERRUPTED: Final = frozenset(
    {"meterware._metering", "meterware.flusher", "meterware.asgi", "meterware.wsgi", "meterware.django"}
)
#: How soon SIGTERM is raised again when it came while the main thread was in that code, and for how long.
SIGTERM_RETRY_SECONDS: Final = 0.01
SIGTERM_WAIT_SECONDS: Final = 5.0
_sigterm_first = 0.0


def exit_on_sigterm() -> None:
    """Make SIGTERM leave through the interpreter's exit, whose hooks drain the buffer, where nothing else
    handles it (the development servers: ``flask run``, ``app.run()``, ``manage.py runserver --noreload``,
    ``wsgiref``). Python's default action kills the process without running exit hooks.

    Only over the default action and only from the main thread (``signal.signal`` works nowhere else): a
    server that handles SIGTERM itself (uvicorn, gunicorn) owns its shutdown, which drains through the
    lifespan or the exit hooks, and replaces this handler when it installs its own after loading the app.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return
    with contextlib.suppress(ValueError):  # not the main interpreter
        signal.signal(signal.SIGTERM, _exit_on_sigterm)


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    global _sigterm_first
    now = time.monotonic()
    _sigterm_first = _sigterm_first or now
    # A single-threaded server (wsgiref) serves calls in the main thread, which this handler interrupts:
    # not in the middle of a call's metering (its event not yet buffered) or of the drain. SIGTERM comes
    # again shortly, until the thread is out of that code (a call still running after a few seconds is
    # cut short: its reservation is refunded by the worker).
    while frame is not None and now - _sigterm_first < SIGTERM_WAIT_SECONDS:
        if frame.f_globals.get("__name__") in _UNINTERRUPTED:
            retry = threading.Timer(SIGTERM_RETRY_SECONDS, os.kill, (os.getpid(), signum))
            retry.daemon = True
            retry.start()
            return
        frame = frame.f_back
    signal.signal(signum, signal.SIG_DFL)  # a second SIGTERM kills at once, as it did
    # SystemExit, as Django's and werkzeug's reloaders do on SIGTERM: the main thread unwinds, the exit
    # hooks drain the buffer, and the status is the one a shell reports for a SIGTERM death.
    raise SystemExit(128 + signum)
