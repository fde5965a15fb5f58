"""Batches kept on local disk while the backend is unreachable, replayed once it answers again."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Final

import msgpack

from meterware.errors import ConfigError
from meterware.events import encode_rows
from meterware.storage._keyspace import check_customer_id
from meterware.storage.base import BATCH_MEMORY_SECONDS, Batch, Settlement

logger = logging.getLogger("meterware.flusher")

#: A spooled batch is replayed only while the backend remembers its id (an hour's margin for clocks).
REPLAY_WITHIN_SECONDS: Final = BATCH_MEMORY_SECONDS - 3600


class Spool:
    """Batches kept on local disk while the backend is unreachable, one file per batch.

    A spooled batch is replayed as it reads (it names the customers to charge and the prices), so the
    directory is private: made 0700 with files 0600, and refused if another user owns it or if group or
    others may write to it.
    """

    SUFFIX = ".batch"

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self._size: int | None = None

    def check(self) -> None:
        """Raise ``ConfigError`` naming the directory if it exists and is not private to this user."""
        try:
            found = self.directory.stat()
        except FileNotFoundError:
            return
        if found.st_uid != os.geteuid():
            problem = (
                f"{self.directory} is owned by uid {found.st_uid}, not by this process's ({os.geteuid()})"
            )
        elif found.st_mode & 0o022:
            mode = stat.S_IMODE(found.st_mode)
            problem = f"{self.directory} is writable by group or others (mode {mode:04o}); make it 0700"
        else:
            return
        raise ConfigError("pipeline.spool_dir", problem)

    def write(self, batch: Batch) -> bool:
        """Persist ``batch``; return False if the spool is full (the batch is then dropped).

        Raise ``ConfigError`` if the directory is not private, ``OSError`` if it cannot be written.
        """
        data = _batch_data(batch)
        if self.size() + len(data) > self.max_bytes:
            return False
        self._store(batch.batch_id + self.SUFFIX, data)
        self._size = self.size() + len(data)
        return True

    def set_aside(self, batch: Batch, suffix: str) -> Path:
        """Keep ``batch`` in the directory under ``suffix`` (not replayed; beyond the size cap)."""
        return self._store(batch.batch_id + suffix, _batch_data(batch))

    def _store(self, name: str, data: bytes) -> Path:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.check()
        final = self.directory / name
        temporary = final.with_suffix(f".tmp{os.getpid()}")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with open(descriptor, "wb") as file:
            os.fchmod(descriptor, 0o600)  # one left behind by a crash keeps its mode otherwise
            file.write(data)
            file.flush()
            os.fsync(descriptor)
        os.replace(temporary, final)
        return final

    def size(self) -> int:
        """Bytes currently spooled (by every process sharing the directory, as last counted)."""
        if self._size is None:
            self._size = sum(path.stat().st_size for path in self._files())
        return self._size

    def _files(self) -> list[Path]:
        try:
            return sorted(self.directory.glob(f"*{self.SUFFIX}"))
        except FileNotFoundError:
            return []

    def pending(self) -> list[Path]:
        """Spooled batch files, oldest first (none, and an error logged, if the directory is not private)."""
        try:
            self.check()
        except ConfigError as error:
            logger.error("meterware: spooled batches are not replayed: %s", error)
            return []
        files = self._files()
        self._size = None if files else 0
        return files

    def read(self, path: Path) -> Batch | None:
        """Load one spooled batch; a damaged file is set aside as ``.bad`` and None returned."""
        try:
            shard, batch_id, payload, rows = msgpack.unpackb(path.read_bytes(), raw=False)
            batch = Batch(shard, batch_id, payload, tuple(_settlement_from_row(row) for row in rows))
            batch_time(batch)
            return batch
        except FileNotFoundError:
            return None  # replayed meanwhile by another process
        except Exception as error:
            logger.error("meterware: spooled batch %s is damaged (%s); moved aside as .bad", path, error)
            path.rename(path.with_suffix(".bad"))
            return None

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        self._size = None


def _batch_data(batch: Batch) -> bytes:
    """What a spool file holds."""
    settlements = [_settlement_row(s) for s in batch.settlements]
    return msgpack.packb([batch.shard, batch.batch_id, batch.payload, settlements], use_bin_type=True)


def split_batch(batch: Batch, customers: Iterable[str]) -> tuple[Batch, Batch | None]:
    """The calls of ``customers`` in ``batch``, and the others (None if none, or if it cannot be split):
    each with an id made from the batch's (its time, and the same ids however often it is split)."""
    named = frozenset(customers)
    rows = msgpack.unpackb(batch.payload, raw=False)
    if not isinstance(rows, list) or len(rows) != len(batch.settlements):
        return batch, None
    picked = [s is not None and s.customer in named for s in batch.settlements]
    # Releases (of records taken out of the batch as duplicates) go with their customer's part too.
    released = [release.customer in named for release in batch.releases]
    if all((*picked, *released)) or not any((*picked, *released)):
        return batch, None
    tag = " ".join(sorted(named))
    parts = []
    for keep in (True, False):
        chosen = [index for index, chose in enumerate(picked) if chose is keep]
        parts.append(
            Batch(
                batch.shard,
                _derived_id(batch.batch_id, f"{keep} {tag}"),
                encode_rows([rows[index] for index in chosen]),
                tuple(batch.settlements[index] for index in chosen),
                releases=tuple(r for r, chose in zip(batch.releases, released, strict=True) if chose is keep),
            )
        )
    return parts[0], parts[1]


def _derived_id(batch_id: str, tag: str) -> str:
    """A UUIDv7 with the time of ``batch_id`` and bits drawn from ``tag``."""
    drawn = int.from_bytes(hashlib.sha256(f"{batch_id} {tag}".encode()).digest()[:10], "big")
    value = uuid.UUID(batch_id).int >> 80 << 80 | drawn
    value = value & ~(0xF << 76 | 0b11 << 62) | 7 << 76 | 0b10 << 62  # version 7, RFC 9562 variant
    return str(uuid.UUID(int=value))


def batch_time(batch: Batch) -> float:
    """When ``batch`` was made (epoch seconds, from its UUIDv7 id); ``ValueError`` if its id is not one."""
    value = uuid.UUID(batch.batch_id)
    if value.version != 7:
        raise ValueError(f"batch id {batch.batch_id!r:.60} is not a UUIDv7")
    return (value.int >> 80) / 1000


#: Prefixed to the reservation id of a spooled settlement that captures from its block (ids are hex).
CAPTURE_MARK: Final = "+"


def _settlement_row(settlement: Settlement | None) -> list[object] | None:
    if settlement is None:
        return None
    s = settlement
    meters = [list(m) for m in s.meters]
    # A capture is marked on its reservation id: a reader from before captures finds no such reservation
    # (the call is still charged) instead of closing the block early, or refusing the row.
    reservation_id = s.reservation_id if s.closes else CAPTURE_MARK + s.reservation_id
    row = [s.customer, s.live, s.period_start, reservation_id, s.billable, s.charges_credits, meters]
    # A record's marker and the meter rate corrections only where there are some: the rows of calls stay
    # readable by readers from before (which ignore what follows the marker).
    if s.rates:
        return [*row, s.once, [list(rate) for rate in s.rates]]
    return [*row, s.once] if s.once else row


def _settlement_from_row(row: list[object] | None) -> Settlement | None:
    if row is None:
        return None
    customer, live, period_start, reservation_id, billable, charges, meters, *more = row
    closes = not str(reservation_id).startswith(CAPTURE_MARK)
    return Settlement(
        check_customer_id(str(customer)),
        bool(live),
        int(period_start),  # type: ignore[call-overload]
        str(reservation_id).removeprefix(CAPTURE_MARK),
        bool(billable),
        bool(charges),
        tuple((str(m), int(u), int(p), int(i)) for m, u, p, i in meters),  # type: ignore[attr-defined]
        closes=closes,
        once=str(more[0]) if more else "",
        rates=tuple((str(m), int(a), int(s), int(u)) for m, a, s, u in more[1]) if len(more) > 1 else (),  # type: ignore[attr-defined]
    )
