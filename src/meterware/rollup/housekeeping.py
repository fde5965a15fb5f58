"""Chores on a shard the worker owns, done after each roll.

Reservations left open by app processes that died are refunded, credit grants whose time has come expire,
and stream entries both committed and older than ``rollup.retention_seconds`` are trimmed.
"""

from __future__ import annotations

import logging
import time
from typing import Final

from meterware.billing.ledger import expire_due_grants
from meterware.rollup.metrics import RollupMetrics
from meterware.storage.base import START_OFFSET, Storage

logger = logging.getLogger("meterware.rollup")

#: Reservations refunded per shard and step at most (the rest wait for the next step).
EXPIRE_LIMIT: Final = 1000


def housekeep(
    storage: Storage, shard: int, committed: str | None, retention_ms: int, metrics: RollupMetrics | None
) -> int:
    """Do the chores of ``shard``, whose committed offset is ``committed``; return the entries trimmed."""
    refunded = storage.expire_reservations(shard, EXPIRE_LIMIT)
    if refunded:
        logger.info("shard %d: refunded %d reservations left open by dead app processes", shard, refunded)
        if metrics is not None:
            metrics.refunded.inc(refunded)
    now_ms = time.time_ns() // 1_000_000
    due = {customer for customer, _ in storage.due_grant_expiries(shard, now_ms, EXPIRE_LIMIT)}
    if due:
        # The customers' credit grants whose time has come: what is left of them expires (once).
        expired = expire_due_grants(storage, sorted(due), now_ms, actor="meterware rollup")
        if expired:
            logger.info("shard %d: expired %d credit grants", shard, len(expired))
    if committed is None or committed == START_OFFSET:
        return 0
    horizon = time.time_ns() // 1_000_000 - retention_ms
    # Only entries both committed and older than the retention go; the committed entry itself stays.
    floor = min(stream_id(committed), (max(0, horizon), 0))
    if floor > (0, 0):
        return storage.trim_stream(shard, f"{floor[0]}-{floor[1]}")
    return 0


def stream_id(entry_id: str) -> tuple[int, int]:
    """A stream entry id (``"1767225600000-3"``) as ``(ms, sequence)``, ordered as the stream orders them."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
