"""The batcher: one process's buffer of finished calls, its spool, and the decisions of a flush.

The request path only appends to the in-process buffer (no I/O). A flusher (an asyncio task under ASGI, a
thread under WSGI) takes events out on size or age, groups them per shard into batches, and hands each to
the backend's atomic, idempotent ``flush``. When the backend fails, batches go to the spool on local disk
and the flusher backs off; spooled batches are replayed (by any process sharing the directory) once the
backend answers again. A batch keeps its id from the first attempt to the last, so an ambiguous failure
followed by a retry never writes it twice. Events are dropped only when both the buffer and the spool are
full, and every drop is counted.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from meterware.config import Pipeline as PipelineConfig
from meterware.errors import ConfigError, StorageError
from meterware.metering.admission import AdmitRequest
from meterware.metering.batching import Batches, EventBuffer, Pending, count_events
from meterware.metering.inflight import CallsInFlight, Renewal
from meterware.metering.spool import REPLAY_WITHIN_SECONDS, Spool, batch_time, split_batch
from meterware.metering.unsettled import Unsettled
from meterware.storage.base import Batch

if TYPE_CHECKING:
    from meterware.metrics import AppMetrics

logger = logging.getLogger("meterware.flusher")

MAX_BACKOFF_SECONDS = 5.0
#: Admissions whose answer was lost kept to be closed by the flusher (each is a few hundred bytes).
MAX_LOST_ADMISSIONS = 10_000

#: What a flush pass asks its flusher to write: buffered events, a spooled batch, reservations to close,
#: reservations to renew.
FlushStep = Batches | Batch | list[AdmitRequest] | Renewal
#: How it went: nothing, a replayed batch's ``flush`` result, or the error it raised.
FlushOutcome = bool | StorageError | None


@dataclass(slots=True)
class FlushStats:
    """Counters of one process's batcher (exported as metrics)."""

    flushed_events: int = 0
    flushed_batches: int = 0
    spooled_events: int = 0
    replayed_batches: int = 0
    quarantined_batches: int = 0
    expired_batches: int = 0
    dropped_events: int = 0
    failures: int = 0


class Batcher:
    """One process's buffer, spool and counters, shared by its flushers and its request path: every
    decision of a flush, none of its I/O (the flushers' passes, :mod:`meterware.metering.flushers`, do that).

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
        #: Reservations to close once every event before them is written (spent leases, lost admissions).
        self.releasing: list[AdmitRequest] = []
        #: Called with the spent leases once their reservations are closed.
        self.released: Callable[[list[AdmitRequest]], None] = lambda blocks: None
        #: The changes of the calls buffered, batched and spooled that are not known to be written yet.
        self.unsettled = Unsettled()
        self.in_flight = CallsInFlight()  # the calls running: the passes renew their reservations

    def put(self, item: Pending) -> None:
        """Queue a finished call (the request path's only step here)."""
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

    def flush_pass(self, final: bool) -> Generator[FlushStep, FlushOutcome, None]:
        """One flush pass, sans I/O: yields what to write (the :class:`Renewal` of calls running long, the
        buffered events' :class:`Batches`, each spooled :class:`Batch` to replay, the spent leases' blocks
        to close) and is sent how writing it went: the :class:`StorageError` it raised, a replayed batch's
        ``flush`` result, or None (the writer of :class:`Batches` records each batch's outcome itself).
        ``final``: the last pass before stopping, made even while backing off, taking every idle lease."""
        if final:
            self.retry_at = 0.0
        self.observe()
        renewal = self.in_flight.due()  # also while backing off: the calls that ended are forgotten
        if renewal is not None and not final and self.healthy():
            self.in_flight.renewed(renewal, (yield renewal))
        if self.spent_leases is not None:
            # Before the buffer is taken: the spent leases' calls are all buffered by now.
            self.releasing += self.spent_leases(final)
        while batches := self.next_batches():
            yield batches
            # Full batches go on (everything, at the last flush). The calls that arrived during the
            # pass wait for the next one: a pass that chased every new event would flush them a few at
            # a time, paying each batch's fixed cost for a handful.
            if not (final or len(self.buffer) >= self.config.batch_size):
                break
        if self.healthy():
            paths = self.spool.pending()
            for path in paths:  # grows by what is left of a batch refused in part
                batch = self.replayable(path)
                if batch is None:
                    continue
                outcome = yield batch
                if isinstance(outcome, StorageError):
                    if outcome.refused:
                        paths += filter(None, [self.refused(batch, outcome, path)])
                        continue
                    self.failed(outcome)
                    return
                self.spool.remove(path)
                self.succeeded(batch, bool(outcome), replayed=True)
        # Spent leases close once every event buffered before them is written. (Closing a lease while
        # one of its calls waits in the spool would let other calls take its units again.)
        if self.releasing and self.healthy() and not self.spool.pending():
            releasing, self.releasing = self.releasing, []  # what is lost meanwhile joins the next pass
            outcome = yield releasing
            if isinstance(outcome, StorageError):
                # They stay listed for the next pass (the worker refunds them past their deadline).
                self.releasing = releasing + self.releasing
                logger.warning("meterware: closing %d reservations failed (%s)", len(releasing), outcome)
            else:
                self.released(releasing)

    def release_later(self, admission: AdmitRequest, error: StorageError) -> None:
        """Close ``admission``'s reservation, if it was made (``error`` lost its answer), with the next
        flush; past :data:`MAX_LOST_ADMISSIONS` (an outage), the worker's ``reservation_timeout`` does."""
        if admission.holds and not error.refused and len(self.releasing) < MAX_LOST_ADMISSIONS:
            self.releasing.append(admission)

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
            self.stats.flushed_events += count_events(batch)
            if self.metrics is not None:
                self.metrics.batches_flushed.inc()
                self.metrics.events_flushed.inc(count_events(batch))
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
            count_events(aside),
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
            self.stats.dropped_events += count_events(batch)
            if self.metrics is not None:
                self.metrics.events_dropped.inc(count_events(batch))
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
                self.stats.spooled_events += count_events(batch)
                if self.metrics is not None:
                    self.metrics.events_spooled.inc(count_events(batch))
            else:
                self.unsettled.settled(batch.batch_id)
                self.stats.dropped_events += count_events(batch)
                if self.metrics is not None:
                    self.metrics.events_dropped.inc(count_events(batch))
                logger.error("meterware: %s; dropped a batch of %d events", problem, count_events(batch))

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
