"""Records charged once: what a flush does with an event whose one-use marker is set already.

A record's settlement carries its marker (``Settlement.once``). The flush sets the marker in the same
atomic step that writes the event and charges it, so a record is either charged and marked, or neither:
a process that dies before its flush leaves no marker, and a retry with the same ``event_id`` is charged.
A flush that finds the marker set (by an earlier flush, or an earlier event of the same batch) writes
nothing and tells which events; the client flushes the batch again without them, closing their
reservations (:func:`without_events`). Both backends run the same steps (``flush.lua``, MemoryStorage).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace

import msgpack

from meterware.errors import StorageError
from meterware.events import encode_rows
from meterware.storage.base import Batch

#: The first item of ``flush.lua``'s reply naming the events (from 1) whose marker is set.
DUPLICATES_REPLY = "DUPLICATES"


def without_events(batch: Batch, positions: Collection[int]) -> Batch:
    """``batch`` without its events at ``positions`` (from 0), under the same id (the flush that found
    them wrote nothing): their settlements only close their reservations (``Batch.releases``)."""
    try:
        rows = msgpack.unpackb(batch.payload, raw=False)
    except Exception:  # msgpack raises several unrelated types for bad input
        rows = None
    if not isinstance(rows, list) or len(rows) != len(batch.settlements):
        # Only a crafted spool file holds such a batch: set aside, as any batch the backend refuses.
        raise StorageError(f"batch {batch.batch_id}: not one event per settlement", refused=True)
    kept = [index for index in range(len(batch.settlements)) if index not in positions]
    dropped = [batch.settlements[index] for index in sorted(positions)]
    return replace(
        batch,
        payload=encode_rows([rows[index] for index in kept]),
        settlements=tuple(batch.settlements[index] for index in kept),
        releases=batch.releases + tuple(filter(None, dropped)),
    )
