"""What this process's finished calls will still do to their customers' counters once they are flushed.

A call's reservation is settled when its event is flushed, up to a flush interval after the call ended:
until then the backend still counts what the call held (a failed call's credits, a value meter's reserve)
and not what it used (the tokens it reported). So every admission carries the changes still to come from
the calls this process has finished, and the backend counts them as if they were written: a customer who
has the credits and quota is served, one who has not is refused, flush or no flush.

A change is named by the batch that will write it (its id is known once the flusher has taken the call
into a batch). The backend counts a batch's changes only while the batch is not written (its idempotency
marker is absent), so a change is never counted both as written and as still to come, whenever the
flush lands. Changes not in a batch yet are counted as they are.
"""

from __future__ import annotations

import os
import random
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

#: The counters a change moves: a customer's, live or test, in one billing period.
Account = tuple[str, bool, int]

#: Batches whose changes are remembered at most (a batch spooled by this process and replayed by
#: another is never confirmed here); past it the oldest are forgotten (their markers exist by then).
MAX_BATCHES: Final = 4096
#: A batch's changes are forgotten this long after it was made, before its marker can expire (23 h of
#: the 24 h the backend remembers a batch: a spooled batch older than this is never replayed).
MAX_AGE_SECONDS: Final = 23 * 3600


@dataclass(slots=True)
class Change:
    """What settlements still to be written do to one account: credits released from its reserve, and
    per meter the units charged (added to ``used``) and the units released (taken from ``held``)."""

    released: int = 0
    meters: dict[str, list[int]] = field(default_factory=dict)

    def add(self, released: int, meters: Iterable[tuple[str, int, int]], sign: int = 1) -> None:
        self.released += sign * released
        for meter, used, held in meters:
            totals = self.meters.get(meter)
            if totals is None:
                totals = self.meters[meter] = [0, 0]
            totals[0] += sign * used
            totals[1] += sign * held

    def is_empty(self) -> bool:
        return not self.released and not any(used or held for used, held in self.meters.values())


#: One finished call's part: its account, the credits it releases, and ``(meter, used, held)``.
CallChange = tuple[Account, int, tuple[tuple[str, int, int], ...]]


@dataclass(slots=True)
class Snapshot:
    """What an admission counts of one account's unsettled calls, as read when it is sent."""

    #: ``(batch id, change)``; the id "" for calls not in a batch when read.
    changes: list[tuple[str, Change]]
    #: The reading process as a writer of batches, and the generation of its last batch then: if a batch
    #: of a later generation is written before the admission runs, calls read as not in a batch may be
    #: written already, and the admission is asked again.
    writer: str
    generation: int

    @property
    def guarded(self) -> bool:
        """Whether the admission must check that no later batch was written (calls not in a batch)."""
        return any(not batch_id for batch_id, _ in self.changes)


class Unsettled:
    """The changes of this process's finished calls that are not known to be written yet (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: Per account: its changes by batch id ("" for the calls not in a batch yet).
        self._changes: dict[Account, dict[str, Change]] = {}
        #: The accounts of each batch and when it was made (``time.monotonic()``), oldest first.
        self._batches: dict[str, tuple[float, list[Account]]] = {}
        #: Batches made so far, and its name as a writer of batches.
        self._generation = 0
        self._writer = _new_writer()
        _ALL.add(self)

    def add(self, change: CallChange) -> None:
        """A call finished: its settlement waits in the buffer."""
        account, released, meters = change
        with self._lock:
            self._change(account, "").add(released, meters)

    def discard(self, changes: Iterable[CallChange]) -> None:
        """Calls whose settlements will never be written (their events were dropped)."""
        with self._lock:
            for account, released, meters in changes:
                self._unqueue(account, released, meters)

    def batched(self, batch_id: str, changes: Iterable[CallChange]) -> tuple[str, int]:
        """The flusher took these calls into batch ``batch_id``: the backend knows when it is written.

        Return the batch's writer and generation (:attr:`Batch.writer`, :attr:`Batch.generation`).
        """
        with self._lock:
            self._generation += 1
            accounts = []
            for account, released, meters in changes:
                self._unqueue(account, released, meters)
                if batch_id not in self._changes.get(account, {}):
                    accounts.append(account)
                self._change(account, batch_id).add(released, meters)
            if accounts:
                now = time.monotonic()
                while self._batches and (
                    len(self._batches) >= MAX_BATCHES
                    or next(iter(self._batches.values()))[0] < now - MAX_AGE_SECONDS
                ):
                    self._forget(next(iter(self._batches)))
                self._batches[batch_id] = now, accounts
            return self.writer, self._generation

    @property
    def writer(self) -> str:
        """Its name as a writer of batches (random; new in a forked child, which counts its own)."""
        return self._writer

    def split(self, batch_id: str, kept_id: str | None, refused: Iterable[str]) -> None:
        """Batch ``batch_id`` is not written as it is: the calls of the ``refused`` customers are set
        aside (they stop counting), the others' go on counting under ``kept_id`` (None: all set aside)."""
        refused = set(refused)
        with self._lock:
            made, accounts = self._batches.pop(batch_id, (0.0, []))
            kept = []
            for account in accounts:
                changes = self._changes[account]
                change = changes.pop(batch_id)
                if kept_id is not None and account[0] not in refused:
                    changes[kept_id] = change
                    kept.append(account)
                elif not changes:
                    del self._changes[account]
            if kept_id is not None and kept:
                self._batches[kept_id] = made, kept

    def settled(self, batch_id: str) -> None:
        """Batch ``batch_id`` is written (or never will be: it was dropped or set aside)."""
        with self._lock:
            self._forget(batch_id)

    def of(self, account: Account) -> Snapshot:
        """The changes still to come for ``account``: ``(batch id, change)``, the id "" for calls not in a
        batch yet (copies: calls go on while the caller reads them), and the generation of the last batch
        made when they were read (calls not in a batch then are in batches made after it)."""
        with self._lock:
            changes = self._changes.get(account)
            if not changes:
                return Snapshot([], self.writer, self._generation)
            found = [(batch_id, _copy(change)) for batch_id, change in changes.items()]
            return Snapshot(found, self.writer, self._generation)

    def _change(self, account: Account, batch_id: str) -> Change:
        changes = self._changes.get(account)
        if changes is None:
            changes = self._changes[account] = {}
        change = changes.get(batch_id)
        if change is None:
            change = changes[batch_id] = Change()
        return change

    def _unqueue(self, account: Account, released: int, meters: Iterable[tuple[str, int, int]]) -> None:
        changes = self._changes.get(account)
        queued = changes.get("") if changes is not None else None
        if changes is None or queued is None:
            return
        queued.add(released, meters, -1)
        if queued.is_empty():
            del changes[""]
            if not changes:
                del self._changes[account]

    def _forget(self, batch_id: str) -> None:
        for account in self._batches.pop(batch_id, (0.0, []))[1]:
            changes = self._changes.get(account)
            if changes is not None:
                changes.pop(batch_id, None)
                if not changes:
                    del self._changes[account]


def _new_writer() -> str:
    return f"{random.getrandbits(64):016x}"


_ALL: weakref.WeakSet[Unsettled] = weakref.WeakSet()


def _renamed_after_fork() -> None:
    # A forked child (a pre-fork server's worker) makes batches of its own, numbered from its own count.
    for unsettled in list(_ALL):
        unsettled._writer = _new_writer()


os.register_at_fork(after_in_child=_renamed_after_fork)


def _copy(change: Change) -> Change:
    return Change(change.released, {meter: list(totals) for meter, totals in change.meters.items()})
