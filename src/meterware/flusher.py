"""Old import path of the flushers (now in :mod:`meterware.metering.flushers`)."""

from meterware.metering.flushers import AsyncFlusher, ThreadFlusher, exit_on_sigterm

__all__ = ["AsyncFlusher", "ThreadFlusher", "exit_on_sigterm"]
