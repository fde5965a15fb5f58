"""How far a shard's committed offset is into its stream: the bookkeeping behind the lag metric."""

from __future__ import annotations

from dataclasses import dataclass

from meterware.rollup.housekeeping import stream_id
from meterware.rollup.metrics import ShardLag
from meterware.storage.base import START_OFFSET, StreamEntry


@dataclass(slots=True)
class Backlog:
    """An owned shard's position in its stream, kept up to date as the worker reads, commits and trims.

    It feeds the shard's :class:`~meterware.rollup.metrics.ShardLag` (only with metrics).
    """

    #: Stream entries up to the committed offset, for the lag metric (None: not counted yet).
    position: int | None = None

    def after_read(
        self, lag: ShardLag, offset: str, entries: list[StreamEntry], count: int, before: int, length: int
    ) -> None:
        """Note the backlog as of a read of ``count`` from ``offset``; the stream's length just before
        the read was ``before``, just after it ``length``."""
        if offset == START_OFFSET:
            self.position = 0  # nothing committed, so nothing trimmed either
        elif len(entries) < count and length == before:
            # The read reached the end of a stream nobody appended to meanwhile: entry `length` is its last.
            self.position = length - len(entries)
        lag.length = length
        lag.oldest_ms = stream_id(entries[0].entry_id)[0] if entries else None
        lag.behind = None if self.position is None else max(0, length - self.position)

    def after_commit(self, lag: ShardLag, entries: list[StreamEntry], count: int) -> None:
        """Move past the ``entries`` just committed (read with a limit of ``count``)."""
        if self.position is not None:
            self.position += len(entries)
            lag.behind = max(0, lag.length - self.position)
        if len(entries) < count or lag.behind == 0:
            lag.oldest_ms = None  # the read reached the end
        else:
            # The next entry is no older than the last one read (and is read at the next step).
            lag.oldest_ms = stream_id(entries[-1].entry_id)[0]

    def after_trim(self, trimmed: int) -> None:
        """Count ``trimmed`` entries fewer before the committed offset."""
        if self.position is not None:
            self.position = max(0, self.position - trimmed)
