"""The flushers: the flush passes (a thread's, synchronous; an asyncio task's, overlapping two batches)
and what runs them in a process, started lazily and restarted if they die."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Generator, Sequence
from types import FrameType
from typing import Final

from meterware.errors import StorageError
from meterware.metering.batcher import Batcher, FlushOutcome, FlushStep
from meterware.metering.batching import Batches
from meterware.metering.inflight import Renewal
from meterware.storage.base import AsyncStorage, Batch, Storage

logger = logging.getLogger("meterware.flusher")


def flush_sync(batcher: Batcher, storage: Storage, *, final: bool = False) -> None:
    """Flush everything buffered and spooled now (the thread flusher's step; also used at exit).

    ``final``: the last attempt before stopping, made even while backing off.
    """
    with batcher.flushing:
        steps = batcher.flush_pass(final)
        outcome: FlushOutcome = None
        while (step := _next(steps, outcome)) is not None:
            outcome = None
            if isinstance(step, Batches):
                _flush_sync(batcher, storage, step)
                continue
            try:
                if isinstance(step, Batch):
                    outcome = _timed_flush(batcher, storage, step)
                elif isinstance(step, Renewal):
                    storage.renew_reservations(step.admissions)
                else:
                    storage.release(step)
            except StorageError as error:
                outcome = error


def _next(steps: Generator[FlushStep, FlushOutcome, None], outcome: FlushOutcome) -> FlushStep | None:
    """A flush pass's next step, once it is sent how the last one went (None: the pass is over)."""
    try:
        return steps.send(outcome)
    except StopIteration:
        return None


def _flush_sync(batcher: Batcher, storage: Storage, batches: Sequence[Batch]) -> None:
    for index, batch in enumerate(batches):
        if not batcher.healthy():
            batcher.spill(batches[index:])
            return
        try:
            applied = _timed_flush(batcher, storage, batch)
        except StorageError as error:
            if error.refused:  # the backend answered: the rest goes on
                batcher.refused(batch, error)
                continue
            batcher.failed(error)
            batcher.spill(batches[index:])
            return
        batcher.succeeded(batch, applied)


def _timed_flush(batcher: Batcher, storage: Storage, batch: Batch) -> bool:
    if batcher.metrics is None:
        return storage.flush(batch)
    began = time.perf_counter()
    try:
        return storage.flush(batch)
    finally:
        batcher.metrics.flush_duration.observe(time.perf_counter() - began)


async def _timed_flush_async(batcher: Batcher, storage: AsyncStorage, batch: Batch) -> bool:
    if batcher.metrics is None:
        return await storage.flush(batch)
    began = time.perf_counter()
    try:
        return await storage.flush(batch)
    finally:
        batcher.metrics.flush_duration.observe(time.perf_counter() - began)


async def flush_async(batcher: Batcher, storage: AsyncStorage, *, final: bool = False) -> None:
    """The twin of :func:`flush_sync` for asyncio."""
    steps = batcher.flush_pass(final)
    outcome: FlushOutcome = None
    while (step := _next(steps, outcome)) is not None:
        outcome = None
        if isinstance(step, Batches):
            await _flush_async(batcher, storage, step)
            continue
        try:
            if isinstance(step, Batch):
                outcome = await _timed_flush_async(batcher, storage, step)
            elif isinstance(step, Renewal):
                await storage.renew_reservations(step.admissions)
            else:
                await storage.release(step)
        except StorageError as error:
            outcome = error


async def _flush_async(batcher: Batcher, storage: AsyncStorage, batches: Batches) -> None:
    """Write the batches, two at a time: while one is in the backend, the next is encoded and sent, so
    the process's work overlaps the backend's. Two batches of one shard never overlap: each shard's
    stream and counters take its batches in order."""
    # Sent and not answered yet, oldest first; a batch leaves the list once its outcome is recorded.
    flying: list[tuple[Batch, asyncio.Task[bool]]] = []
    sent = 0  # batches[:sent] are flying or done
    try:
        while sent < len(batches):
            batch = await batches.get_async(sent)  # encoded while the batch before is in the backend
            if flying and flying[0][0].shard == batch.shard and not await _land_oldest(batcher, flying):
                break
            if not batcher.healthy():
                break
            flying.append((batch, asyncio.ensure_future(_timed_flush_async(batcher, storage, batch))))
            sent += 1
            await asyncio.sleep(0)  # the flush sends its batch; calls run in between too
            if len(flying) == 2 and not await _land_oldest(batcher, flying):
                break
        while flying:
            await _land_oldest(batcher, flying)
    except BaseException:
        # Cancelled (the loop is ending) or broken mid-flush: keep what is not known to be written
        # (retrying an applied batch is a no-op).
        for _, task in flying:
            task.cancel()
        batcher.spill([batch for batch, _ in flying])
        batcher.spill(batches[sent:])
        raise
    batcher.spill(batches[sent:])  # after a failure: the rest waits in the spool


async def _land_oldest(batcher: Batcher, flying: list[tuple[Batch, asyncio.Task[bool]]]) -> bool:
    """Record the outcome of the oldest batch in flight: written, or spooled (False) if it failed."""
    batch, task = flying[0]
    try:
        applied = await task
    except StorageError as error:
        del flying[0]
        if error.refused:  # the backend answered: the rest goes on
            batcher.refused(batch, error)
            return True
        batcher.failed(error)
        batcher.spill([batch])
        return False
    del flying[0]
    batcher.succeeded(batch, applied)
    return True


class AsyncFlusher:
    """Flushes a batcher from an asyncio task, started lazily on the running loop, restarted if it dies."""

    def __init__(self, batcher: Batcher, storage: AsyncStorage) -> None:
        self.batcher = batcher
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

        self.batcher.wake = wake
        self._task = loop.create_task(self._run(), name="meterware-flusher")

    async def _run(self) -> None:
        interval = self.batcher.config.flush_interval
        self.batcher.observe()
        task = asyncio.current_task()
        # A driver may turn a cancellation into a connection error: stop once cancelled, whatever it said.
        while not self._stopping and not (task is not None and task.cancelling()):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._wake.wait()
            self._wake.clear()
            await flush_async(self.batcher, self.storage)

    async def drain(self) -> None:
        """Flush everything buffered (at shutdown): the task ends its current flush, then the rest goes."""
        task = self._task
        if task is not None and not task.done() and self._loop is asyncio.get_running_loop():
            self._stopping = True
            self._wake.set()
            await asyncio.wait([task])
        self._task = None
        self._stopping = False
        await flush_async(self.batcher, self.storage, final=True)


class ThreadFlusher:
    """Flushes a batcher from a daemon thread, started lazily per process (after fork), restarted if dead.

    In a development reloader's child (``manage.py runserver``, ``flask run --reload``) each call's event is
    also written at once, by the thread that finished the call: the reloader answers SIGTERM by killing its
    child with SIGKILL, which no exit hook survives.
    """

    def __init__(self, batcher: Batcher, storage: Storage) -> None:
        self.batcher = batcher
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
            flush_sync(self.batcher, self.storage)
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
            self.batcher.wake = self._wake.set
            self._thread = threading.Thread(target=self._run, name="meterware-flusher", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        interval = self.batcher.config.flush_interval
        self.batcher.observe()
        while not self._stop.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            try:
                flush_sync(self.batcher, self.storage)
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
        flush_sync(self.batcher, self.storage, final=True)


def reloader_child() -> bool:
    """Whether this process is the child of Django's or werkzeug's reloader (which SIGKILLs it on SIGTERM)."""
    return os.environ.get("RUN_MAIN") == "true" or os.environ.get("WERKZEUG_RUN_MAIN") == "true"


#: The modules whose code a SIGTERM does not interrupt in the main thread: a call's path and the drain.
_UNINTERRUPTED: Final = frozenset({"meterware.asgi", "meterware.wsgi", "meterware.django"})
#: ... and every module of the request path's internals.
_UNINTERRUPTED_PACKAGE: Final = "meterware.metering."
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
        module = frame.f_globals.get("__name__", "")
        if module in _UNINTERRUPTED or module.startswith(_UNINTERRUPTED_PACKAGE):
            retry = threading.Timer(SIGTERM_RETRY_SECONDS, os.kill, (os.getpid(), signum))
            retry.daemon = True
            retry.start()
            return
        frame = frame.f_back
    signal.signal(signum, signal.SIG_DFL)  # a second SIGTERM kills at once, as it did
    # SystemExit, as Django's and werkzeug's reloaders do on SIGTERM: the main thread unwinds, the exit
    # hooks drain the buffer, and the status is the one a shell reports for a SIGTERM death.
    raise SystemExit(128 + signum)
