"""What an adapter (ASGI, WSGI, Django) holds: one middleware instance's request core, its two drivers,
its batcher and its backends."""

from __future__ import annotations

import atexit
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Final

from meterware.config import Config
from meterware.metering.batcher import Batcher
from meterware.metering.batching import Pending
from meterware.metering.core import CustomerGetter, KeyGetter, RequestCore
from meterware.metering.drivers import AsyncDriver, SyncDriver
from meterware.metering.flushers import flush_sync
from meterware.metering.leases import LeaseTable
from meterware.metering.logs import logger
from meterware.metering.measure import Measurer
from meterware.metrics import AppMetrics
from meterware.storage import open_async_storage, open_storage
from meterware.storage.base import AsyncStorage, Batch, Storage

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry


#: How long the exit drain waits for the calls in flight to finish.
EXIT_WAIT_SECONDS: Final = 5.0
_exit_deadline = 0.0

#: The configuration of the first middleware (or recorder) made in this process: what ``meterware.record``
#: uses when not given one.
_first_config: Config | None = None


def first_config() -> Config | None:
    """The configuration of the first :class:`Metering` made in this process, if any."""
    return _first_config


class Metering:
    """The per-process state and decisions behind one middleware instance.

    ``registry``: the prometheus-client registry of its metrics (the global ``REGISTRY`` by default).
    """

    def __init__(
        self,
        config: Config,
        *,
        key_getter: KeyGetter | None = None,
        customer_getter: CustomerGetter | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        global _first_config
        if _first_config is None:
            _first_config = config
        self.config = config
        self.routes = config.routes
        self.policy = config.policy
        self.metrics = AppMetrics.for_registry(registry)
        self.batcher = Batcher(
            config.pipeline,
            on_flushed=self._rollup_in_process if self.embedded else None,
            metrics=self.metrics,
        )
        self.usage_headers = {
            meter.header.encode("latin-1"): name for name, meter in config.meters.items() if meter.header
        }
        self.leases = LeaseTable(self.policy, self.batcher.unsettled)
        if self.policy.admission == "lease":
            self.batcher.spent_leases = self.leases.spent
            self.batcher.released = self.leases.closed
        self.measurer = Measurer(config, self.metrics, self.leases, self.queue)
        self.core = RequestCore(
            config,
            self.metrics,
            self.measurer,
            self.batcher.unsettled,
            self.batcher.release_later,
            key_getter,
            customer_getter,
        )
        # The adapters' entry points, bound once (each is called for every call).
        self.start = SyncDriver(self.core).start
        self.astart = AsyncDriver(self.core).start
        self.finish = self.measurer.finish
        self.response_headers = self.core.response_headers
        self.exit_hooked = False
        self._rollup_lock = threading.Lock()
        self._rollup: Any = None
        self._next_full_rollup = 0.0

    def backend(self, *, flushing: bool = False) -> Storage:
        """A synchronous backend client: short timeouts for the request path, longer ones for flushing."""
        config = self.config
        timeout = config.pipeline.flush_timeout if flushing else config.policy.timeout
        return open_storage(
            config.storage,
            shards=config.shards,
            timeout=timeout,
            allow_eviction=config.allow_eviction,
            replica_wait=config.replica_wait,
        )

    def async_backend(self, *, flushing: bool = False) -> AsyncStorage:
        """The asyncio twin of :meth:`backend` (no I/O until its first call)."""
        config = self.config
        timeout = config.pipeline.flush_timeout if flushing else config.policy.timeout
        return open_async_storage(
            config.storage,
            shards=config.shards,
            timeout=timeout,
            allow_eviction=config.allow_eviction,
            replica_wait=config.replica_wait,
        )

    @property
    def embedded(self) -> bool:
        """Whether the backend is the in-process ``memory://`` store (the rollup then runs in-process)."""
        return self.config.storage.startswith("memory://")

    def queue(self, item: Pending) -> None:
        """Buffer a finished call's (or a record's) event and settlement for the flusher."""
        if not self.exit_hooked:
            self.hook_exit()
        self.batcher.put(item)

    def hook_exit(self) -> None:
        """Drain at the interpreter's exit: registered when the first call starts or is queued, once per
        instance (a process forked after this inherits the registration)."""
        if not self.exit_hooked:
            self.exit_hooked = True
            atexit.register(self.drain_at_exit)

    def drain_at_exit(self) -> None:
        """The exit hook: :meth:`drain`, once the calls in flight have finished (a threaded server finishes a
        call in its own thread after the client has the response, so a SIGTERM can come first), waiting at
        most :data:`EXIT_WAIT_SECONDS` in all for the process."""
        global _exit_deadline
        in_flight = self.batcher.in_flight
        if in_flight.running():
            _exit_deadline = _exit_deadline or time.monotonic() + EXIT_WAIT_SECONDS
            unfinished = in_flight.wait(_exit_deadline - time.monotonic())
            if unfinished:
                logger.warning(
                    "meterware: %d calls still in flight at exit after %.0f s: not recorded (the rollup "
                    "worker refunds their reservations)",
                    unfinished,
                    EXIT_WAIT_SECONDS,
                )
        self.drain()

    def drain(self) -> None:
        """Flush what is still buffered with a synchronous client (the event loop may be gone)."""
        batcher = self.batcher
        # A flusher thread (a daemon: it dies with the interpreter) may hold events it has taken out of
        # the buffer and not written yet: wait for it first.
        with batcher.flushing:
            if not len(batcher.buffer) and not batcher.spool.pending() and not self.leases:
                return
            storage = self.backend(flushing=True)
            try:
                flush_sync(batcher, storage, final=True)
            finally:
                storage.close()

    def _rollup_in_process(self, batch: Batch) -> None:
        from meterware.rollup import RollupWorker

        with self._rollup_lock:
            if self._rollup is None:
                storage = self.backend(flushing=True)
                self._rollup = RollupWorker(storage, self.config, owner=f"in-process-{os.getpid()}")
            # The flushed shard at once; every shard (and its housekeeping: expired reservations) each second.
            now = time.monotonic()
            if now >= self._next_full_rollup:
                self._next_full_rollup = now + 1.0
                self._rollup.drain()
            else:
                self._rollup.drain(only=batch.shard)
