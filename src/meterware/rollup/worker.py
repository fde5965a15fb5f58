"""The rollup worker: read the shard streams, aggregate, and commit each batch exactly once.

Each shard is owned by one worker at a time through a claim with a fencing token. A step reads the next
entries after the shard's committed offset, folds them (:mod:`meterware.rollup.aggregate`) and commits the
aggregates *and* the new offset in one atomic call that checks the token and the offset it read from. A
worker that crashes anywhere before the commit leaves the offset where it was, so its successor reads the
same entries again; a commit that lands is never repeated, because the offset it expects has moved. So a
crash, a restart or two racing workers never count an event twice or zero times.

Entries that are not valid batches go to the shard's dead-letter stream in the same commit, with a one-line
reason; they never stop the worker.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Container, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Final

from meterware.billing.alerts import AlertEvaluator, webhook_secret
from meterware.config import Config
from meterware.errors import ConfigError, StorageError, UnsafeStorageError
from meterware.rollup.aggregate import Fold, parse_columns
from meterware.rollup.backlog import Backlog
from meterware.rollup.housekeeping import housekeep
from meterware.rollup.metrics import CustomerMetrics, MetricsOptions, RollupMetrics, ShardLag
from meterware.storage import open_storage
from meterware.storage.base import RollupCommit, Storage, StreamEntry

logger = logging.getLogger("meterware.rollup")

#: Timeout in seconds of one backend call of the worker (it is off the request path: it can wait).
STORAGE_TIMEOUT: Final = 5.0
#: Longest pause after backend errors, in seconds.
MAX_BACKOFF: Final = 30.0
#: Seconds between two warnings that keys' last uses could not be recorded (each failure is counted).
KEY_USE_WARNING_INTERVAL: Final = 60.0


def default_owner() -> str:
    """A worker name unique across hosts, processes and restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(slots=True)
class _Claim:
    """What the worker remembers of a shard it owns."""

    token: int
    #: The committed offset as of our last commit (None: read it from the backend).
    offset: str | None = None
    #: How far into the stream the committed offset is (for the lag metric).
    backlog: Backlog = field(default_factory=Backlog)


@dataclass(frozen=True, slots=True)
class _Progress:
    """What one round over the shards did."""

    entries: int = 0
    events: int = 0
    #: Shards whose backend calls all answered (claimed by us or not).
    worked: tuple[int, ...] = ()
    #: Shards whose backend calls failed, with the error.
    failed: tuple[tuple[int, StorageError], ...] = ()

    def raise_failure(self) -> None:
        """Raise the first failure, if any (the other shards' work is committed)."""
        if self.failed:
            raise self.failed[0][1]


class _KeyUses:
    """Record when keys were last used after each commit, best-effort: the commit stands whatever happens
    here, and a failure is counted as a backend error of the shard and logged once in a while."""

    def __init__(self, storage: Storage, metrics: RollupMetrics | None) -> None:
        self.storage = storage
        self.metrics = metrics
        self._warned_at = -KEY_USE_WARNING_INTERVAL
        self._unreported = 0

    def record(self, shard: int, uses: Mapping[str, int]) -> None:
        if not uses:
            return
        try:
            self.storage.record_key_use(uses)
        except StorageError as error:
            if self.metrics is not None:
                self.metrics.errors.labels(str(shard)).inc()
            self._unreported += 1
            now = time.monotonic()
            if now - self._warned_at >= KEY_USE_WARNING_INTERVAL:
                logger.warning(
                    "shard %d: could not record when keys were last used (batches missed since the last "
                    "warning: %d): %s",
                    shard,
                    self._unreported,
                    error,
                )
                self._warned_at, self._unreported = now, 0


class RollupWorker:
    """Roll the event streams of a backend up into usage windows, exactly once.

    :param storage: the backend (any :class:`~meterware.storage.base.Storage`).
    :param config: the meters (how each is aggregated) and the ``[rollup]`` settings.
    :param owner: the name this worker holds claims under; unique by default.
    :param shards: the shards to work on; all of the backend's by default.
    :param metrics: where to count its progress and lag (see :mod:`meterware.rollup.metrics`); measuring
        the lag costs two ``XLEN`` per shard and step.
    :param alerts: evaluates each committed batch's customers (:mod:`~meterware.billing.alerts`); made from
        ``config.alerts`` by default when the configuration has an ``[alerts]`` section.

    ``step()`` does one round over the shards, ``drain()`` steps until the shards it can own are caught
    up (``meterware rollup --once``, and the in-process rollup of ``memory://``), and ``run(stop)``
    steps until ``stop`` is set, then releases its claims::

        worker = RollupWorker(storage, config)
        worker.drain()
    """

    def __init__(
        self,
        storage: Storage,
        config: Config,
        *,
        owner: str | None = None,
        shards: Iterable[int] | None = None,
        metrics: RollupMetrics | None = None,
        alerts: AlertEvaluator | None = None,
    ) -> None:
        self.storage = storage
        self.metrics = metrics
        if alerts is None and config.alerts.enabled:
            alerts = AlertEvaluator.from_config(storage, config, metrics=metrics)
        self.alerts = alerts
        self.config = config
        self.owner = owner or default_owner()
        self.shards = tuple(range(storage.shards) if shards is None else shards)
        self._claim_ms = max(1, int(config.rollup.lease_seconds * 1000))
        self._retention_ms = int(config.rollup.retention_seconds * 1000)
        self._claims: dict[int, _Claim] = {}
        # Events per entry seen last on each shard: reads aim at about batch_size events. Until a shard
        # is read, assume full flusher batches, so a backlog of big batches is never read all at once.
        self._events_per_entry: dict[int, int] = {}
        self._full_entry = max(1, config.pipeline.batch_size)
        self._key_uses = _KeyUses(storage, metrics)

    @property
    def owned(self) -> tuple[int, ...]:
        """The shards this worker claims (as of its last step)."""
        return tuple(sorted(self._claims))

    def step(self) -> int:
        """Do one round over the shards; return the number of events committed.

        A shard whose backend calls fail does not hold up the others: the round goes on, then the
        first :class:`~meterware.errors.StorageError` is raised.
        """
        progress = self._step()
        progress.raise_failure()
        return progress.events

    def drain(self, *, only: int | None = None) -> int:
        """Step until no owned shard (or shard ``only``) has anything left; return the events committed."""
        skip = () if only is None else frozenset(self.shards) - {only}
        events = 0
        while True:
            progress = self._step(skip)
            progress.raise_failure()
            events += progress.events
            if not progress.entries:
                return events

    def run(self, stop: threading.Event, idle_sleep: float | None = None) -> None:
        """Step until ``stop`` is set, pausing when idle and backing off on backend errors.

        The claims are released on the way out, so another worker can take the shards over at once.
        """
        if idle_sleep is None:
            # Idle steps renew the claims: sleep well within them.
            idle_sleep = min(1.0, self.config.rollup.lease_seconds / 3)
        backoff = 0.0
        # Shards whose own calls failed (a poisoned key, say) wait apart, without holding up the rest.
        failures: dict[int, int] = {}
        retry_at: dict[int, float] = {}
        logger.info("rollup worker %s started on %d shards", self.owner, len(self.shards))
        try:
            while not stop.is_set():
                now = time.monotonic()
                progress = self._step(skip={shard for shard, at in retry_at.items() if at > now})
                if progress.failed and not progress.worked:
                    # Nothing answered: the backend is away, not one shard's data.
                    backoff = min(MAX_BACKOFF, max(idle_sleep, backoff * 2))
                    logger.warning("backend error, retrying in %.1fs: %s", backoff, progress.failed[-1][1])
                    stop.wait(backoff)
                    continue
                backoff = 0.0
                for shard in progress.worked:
                    failures.pop(shard, None)
                    retry_at.pop(shard, None)
                for shard, error in progress.failed:
                    failures[shard] = count = failures.get(shard, 0) + 1
                    delay = min(MAX_BACKOFF, idle_sleep * 2 ** min(count, 16))
                    retry_at[shard] = now + delay
                    logger.warning("shard %d: backend error, retrying it in %.1fs: %s", shard, delay, error)
                if not progress.entries:
                    stop.wait(idle_sleep)
        finally:
            self.release()
            logger.info("rollup worker %s stopped", self.owner)

    def release(self) -> None:
        """Give up every claim this worker holds (and deliver the webhooks still queued, for a while)."""
        if self.alerts is not None:
            self.alerts.close()
        claims, self._claims = self._claims, {}
        if self.metrics is not None:
            self.metrics.shards_owned.set(0)
            for shard in claims:
                self.metrics.lag.pop(shard, None)  # the next owner reports it
        for shard in claims:
            try:
                self.storage.release_shard(shard, self.owner)
            except StorageError as error:
                # The claim expires on its own; the next worker only waits a little longer.
                logger.warning("could not release its claim on shard %d: %s", shard, error)

    # -- one step -------------------------------------------------------------------------------------

    def _step(self, skip: Container[int] = ()) -> _Progress:
        entries = events = 0
        worked: list[int] = []
        failed: list[tuple[int, StorageError]] = []
        streak = 0
        for shard in self.shards:
            if shard in skip:
                continue
            try:
                claim = self._claim(shard)
                if claim is not None:
                    progress = self._roll(shard, claim)
                    entries += progress.entries
                    events += progress.events
                    if shard in self._claims:
                        trimmed = housekeep(
                            self.storage, shard, claim.offset, self._retention_ms, self.metrics
                        )
                        claim.backlog.after_trim(trimmed)
            except StorageError as error:
                # Another worker may take the shard meanwhile: whatever we knew of it is read again.
                self._claims.pop(shard, None)
                failed.append((shard, error))
                if self.metrics is not None:
                    self.metrics.errors.labels(str(shard)).inc()
                streak += 1
                if streak >= 2:
                    break  # the backend itself is failing, most likely: don't wait out every timeout
                continue
            streak = 0
            worked.append(shard)
        if self.metrics is not None:
            self.metrics.shards_owned.set(len(self._claims))
            if worked or not failed:
                self.metrics.last_round.set(time.time())
        return _Progress(entries, events, tuple(worked), tuple(failed))

    def _claim(self, shard: int) -> _Claim | None:
        token = self.storage.claim_shard(shard, self.owner, self._claim_ms)
        claim = self._claims.get(shard)
        if token is None:
            if claim is not None:
                logger.info("shard %d is now owned by another worker", shard)
                del self._claims[shard]
            if self.metrics is not None:
                self.metrics.lag.pop(shard, None)  # its owner reports it
            return None
        if claim is None or claim.token != token:
            # New or regained: someone may have committed in between, so the offset is read afresh.
            if claim is None:
                logger.info("worker %s owns shard %d (token %d)", self.owner, shard, token)
            claim = self._claims[shard] = _Claim(token)
        return claim

    def _roll(self, shard: int, claim: _Claim) -> _Progress:
        offset = claim.offset
        if offset is None:
            offset = claim.offset = self.storage.committed_offset(shard)
        # At most batch_size entries, and about batch_size events: a backlog of big batches stays small.
        count = max(1, self.config.rollup.batch_size // self._events_per_entry.get(shard, self._full_entry))
        started = time.perf_counter()
        before = self.storage.stream_length(shard) if self.metrics is not None else 0
        entries = self.storage.read_stream(shard, offset, count)
        if self.metrics is not None:
            after = self.storage.stream_length(shard)
            lag = self.metrics.lag.setdefault(shard, ShardLag())
            claim.backlog.after_read(lag, offset, entries, count, before, after)
        if not entries:
            return _Progress()
        dead: list[tuple[str, str]] = []
        meters = self.config.meters
        # One fold for the whole read: events of a customer's minute collapse before the windows are built.
        folding = Fold(meters)
        for entry in entries:
            parsed = parse_columns(entry.fields, meters)
            if isinstance(parsed, str):
                logger.warning("shard %d: entry %s is a dead letter: %s", shard, entry.entry_id, parsed)
                dead.append((entry.entry_id, parsed))
                continue
            folding.add(*parsed)
        windows = folding.totals()
        events = folding.events
        new_offset = entries[-1].entry_id
        commit = RollupCommit(shard, claim.token, offset, new_offset, windows, tuple(dead))
        if not self.storage.commit_rollup(commit):
            # Another worker took the claim or moved the offset: nothing of this batch counted.
            logger.info("shard %d: commit refused (claim lost or offset moved); dropping the shard", shard)
            self._claims.pop(shard, None)
            return _Progress()
        claim.offset = new_offset
        self._key_uses.record(shard, folding.key_uses)
        valid = len(entries) - len(dead)
        if valid:
            self._events_per_entry[shard] = max(1, events // valid)
        if self.metrics is not None:
            self._committed(shard, claim, entries, count, events, len(dead), started)
        if self.alerts is not None:
            self.alerts.after_commit(commit)  # after the commit: what it counted is in the totals read
        return _Progress(len(entries), events)

    # -- metrics (only with ``metrics``) ---------------------------------------------------------------

    def _committed(
        self,
        shard: int,
        claim: _Claim,
        entries: list[StreamEntry],
        count: int,
        events: int,
        dead: int,
        started: float,
    ) -> None:
        assert self.metrics is not None
        metrics = self.metrics
        metrics.batch_duration.observe(time.perf_counter() - started)
        metrics.entries.inc(len(entries))
        metrics.events.inc(events)
        if dead:
            metrics.dead_letters.inc(dead)
        claim.backlog.after_commit(metrics.lag.setdefault(shard, ShardLag()), entries, count)


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Set ``stop`` on SIGTERM and SIGINT while inside (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        logger.info("received %s, stopping after the current step", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_worker(
    config: Config,
    *,
    once: bool = False,
    stop: threading.Event | None = None,
    metrics: MetricsOptions | None = None,
) -> int:
    """Run a rollup worker on the configured backend until SIGTERM/SIGINT (or once); return an exit code.

    ``0`` when done, ``1`` when the backend failed (``--once``), cannot be opened, evicts keys (unless
    ``[storage] allow_eviction``), or the metrics port
    cannot be bound, ``2`` for a backend that cannot be rolled up from another process (``memory://``),
    or a webhook without its secret in the environment, ``3`` when ``--once`` could not take every
    shard: other workers hold their claims (each is logged with its holder and until when; a crashed
    worker's claim runs out after ``rollup.lease_seconds``), so those shards were not rolled up.
    ``metrics``: serve the worker's metrics over HTTP meanwhile.
    """
    if config.storage.startswith("memory:"):
        logger.error(
            "memory:// lives inside the app process, which rolls it up itself; "
            "a rollup worker needs a shared backend such as redis://"
        )
        return 2

    try:
        webhook_secret(config)
    except ConfigError as error:
        logger.error("%s", error)
        return 2
    try:
        storage = open_storage(
            config.storage,
            shards=config.shards,
            timeout=STORAGE_TIMEOUT,
            allow_eviction=config.allow_eviction,
            replica_wait=config.replica_wait,
        )
    except StorageError as error:
        logger.error("cannot open the backend: %s", error)
        return 1
    stop = stop or threading.Event()
    try:
        if metrics is None:
            return _run(RollupWorker(storage, config), stop, once)
        with _metrics_served(storage, config, metrics, stop) as worker_metrics:
            if worker_metrics is None:
                return 1
            return _run(RollupWorker(storage, config, metrics=worker_metrics), stop, once)
    except UnsafeStorageError as error:  # raised by the first call that reaches Redis
        logger.error("refusing to start: %s", error)
        return 1
    finally:
        storage.close()


def _run(worker: RollupWorker, stop: threading.Event, once: bool) -> int:
    with _stop_on_signals(stop):
        if not once:
            worker.run(stop)
            return 0
        try:
            events = worker.drain()
            # Shards another worker (or one that crashed, until its claim runs out) holds were not read.
            held = [
                (shard, holder)
                for shard in worker.shards
                if shard not in worker.owned and (holder := worker.storage.shard_holder(shard)) is not None
            ]
        except StorageError as error:
            logger.error("backend error: %s", error)
            return 1
        finally:
            worker.release()
        logger.info("rolled up %d events", events)
        for shard, (owner, until_ms) in held:
            until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(until_ms / 1000))
            left = max(0.0, until_ms / 1000 - time.time())
            logger.error(
                "shard %d not rolled up: worker %s holds its lease until %s (%.0fs from now)",
                shard,
                owner,
                until,
                left,
            )
        return 3 if held else 0


@contextmanager
def _metrics_served(
    storage: Storage, config: Config, options: MetricsOptions, stop: threading.Event
) -> Iterator[RollupMetrics | None]:
    """Serve the worker's metrics over HTTP while inside (None if the port cannot be bound).

    Per-customer numbers are read by a background thread, which ``stop`` ends.
    """
    from prometheus_client import REGISTRY, start_http_server

    registry = REGISTRY if options.registry is None else options.registry
    metrics = RollupMetrics.for_registry(registry)
    customers = None
    if options.customers > 0:
        customers = CustomerMetrics(storage, config, limit=options.customers, interval=options.interval)
        registry.register(customers)
    try:
        server, _ = start_http_server(options.port, options.host, registry)
    except OSError as error:
        logger.error("cannot serve metrics on %s:%d: %s", options.host, options.port, error)
        if customers is not None:
            registry.unregister(customers)
        yield None
        return
    logger.info("metrics on http://%s:%d/metrics", options.host, server.server_port)
    refresher = None
    if customers is not None:
        refresher = threading.Thread(
            target=customers.run, args=(stop,), name="meterware-customer-metrics", daemon=True
        )
        refresher.start()
    try:
        yield metrics
    finally:
        stop.set()
        if refresher is not None:
            refresher.join(STORAGE_TIMEOUT * 2)
        if customers is not None:
            registry.unregister(customers)
        server.shutdown()
        server.server_close()
