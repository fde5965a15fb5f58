"""Fair sharing of the shards among the rollup workers that run, without a coordinator.

Each worker announces itself on every step with a heartbeat that expires after the claims' lease, and
learns which workers are alive (``Storage.rollup_heartbeat``). The shards are split evenly: with ``n``
live workers, each holds ``shards // n``, and the first ``shards % n`` by name one more. A worker claims
free shards up to its share and, after committing what it read, gives back the ones above it (the highest
it holds), which a worker below its share takes on its next step. So a worker started while others run
gets its share within a step or two, one that stops (and leaves) or dies (its heartbeat and claims
expire) leaves its shards to the others, and a claim's fencing token keeps every handover exact.
Only workers over all of a backend's shards (the default) share them; one given a part of them takes no
part and claims what it can, first come. A worker whose heartbeat has failed for longer than its lifetime
is not counted by the others any more, so it takes every shard it can too until the heartbeat is back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence

from meterware.errors import StorageError
from meterware.storage.base import RollupStorage

logger = logging.getLogger("meterware.rollup")


def share_of(shards: int, live: Sequence[str], owner: str) -> int:
    """How many of ``shards`` ``owner`` may hold while the ``live`` workers run."""
    workers = sorted(set(live) | {owner})
    rank = workers.index(owner)
    return shards // len(workers) + (rank < shards % len(workers))


class FairShare:
    """One worker's share of the shards, kept up to date by its heartbeat."""

    def __init__(self, storage: RollupStorage, owner: str, shards: int, ttl_ms: int) -> None:
        self.storage = storage
        self.owner = owner
        self.shards = shards
        self.ttl_ms = ttl_ms
        #: The most shards to hold: all of them until other workers are seen.
        self.share = shards
        self._failing = False
        self._last_heartbeat = time.monotonic()

    def refresh(self) -> int:
        """Announce this worker for ``ttl_ms`` more and return its share: the last known one while the
        backend fails (the shards' own calls report the outage), every shard once the heartbeat has
        expired (the others no longer count this worker)."""
        try:
            live = self.storage.rollup_heartbeat(self.owner, self.ttl_ms)
        except StorageError as error:
            if not self._failing:
                logger.warning("worker %s: heartbeat failed: %s", self.owner, error)
            self._failing = True
            if time.monotonic() - self._last_heartbeat > self.ttl_ms / 1000:
                self.share = self.shards
            return self.share
        self._failing = False
        self._last_heartbeat = time.monotonic()
        share = share_of(self.shards, live, self.owner)
        if share != self.share:
            logger.info(
                "worker %s: %d workers live, its share is %d of %d shards",
                self.owner,
                len(live),
                share,
                self.shards,
            )
            self.share = share
        return share

    def excess(self, held: Iterable[int]) -> list[int]:
        """The shards to give back: the highest of ``held`` beyond the share."""
        return sorted(held)[self.share :]

    def leave(self) -> None:
        """Stop counting this worker, so the others take its share at their next step."""
        try:
            self.storage.rollup_leave(self.owner)
        except StorageError as error:
            # Its heartbeat expires on its own; the others only wait a little longer.
            logger.warning("worker %s: could not leave the live workers: %s", self.owner, error)
