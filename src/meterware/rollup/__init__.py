"""The rollup worker: usage windows per customer, aggregated from the event streams exactly once."""

from __future__ import annotations

from meterware.rollup.worker import RollupWorker, run_worker

__all__ = ["RollupWorker", "run_worker"]
