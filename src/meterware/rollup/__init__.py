"""The rollup worker: usage windows per customer, aggregated from the event streams exactly once.

The worker loads on first use (PEP 562): what only reads the streams (``rollup.aggregate``, used by the
accounts) does not load it, its metrics or its alerts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meterware.rollup.worker import RollupWorker, run_worker

__all__ = ["RollupWorker", "run_worker"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'meterware.rollup' has no attribute {name!r}")
    from meterware.rollup import worker

    value = getattr(worker, name)
    globals()[name] = value  # later lookups skip this function
    return value
