"""Finished calls waiting to be flushed: the bounded buffer the request path appends to, and the batches a
flusher takes out of it (grouped per shard, encoded when first asked for)."""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import overload

from meterware.config import Pipeline as PipelineConfig
from meterware.events import EventRow, encode_rows, encode_rows_async, format_event_id, new_event_id
from meterware.metering.unsettled import CallChange, Unsettled
from meterware.storage.base import Batch, Settlement


# Built for every call: not frozen, as a frozen dataclass's __init__ costs an object.__setattr__ per
# field (benchmarks/micro.py: Metering.finish).
@dataclass(slots=True)
class Pending:
    """A finished call waiting to be flushed."""

    shard: int
    #: The call's event as written (:func:`meterware.events.event_row`).
    row: EventRow
    settlement: Settlement | None
    #: What its settlement will change of the customer's counters (counted at admission until written).
    change: CallChange | None = None


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
            batch = self._batch(shard, group, encode_rows([item.row for item in group]))
            batch = self._batches[index] = self._name(batch, group)
        return batch

    async def get_async(self, index: int) -> Batch:
        """``self[index]`` on an event loop: a big batch is encoded with yields in between."""
        batch = self._batches.get(index)
        if batch is None:
            shard, group = self._groups[index]
            payload = await encode_rows_async([item.row for item in group])
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
            settlements=tuple([item.settlement for item in group]),
        )


def make_batches(items: Iterable[Pending], batch_size: int = PipelineConfig().batch_size) -> list[Batch]:
    """Group pending events per shard into batches of at most ``batch_size`` events (one script run each:
    bounded, so a flush never holds Redis for long), with fresh, time-sortable ids."""
    return list(Batches(items, batch_size))


def count_events(batch: Batch) -> int:
    return len(batch.settlements)
