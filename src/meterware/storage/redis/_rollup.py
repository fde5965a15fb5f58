"""The rollup worker's commands: membership, shard claims, stream reads, fenced commits, refunds."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Final

from meterware.errors import StorageError
from meterware.storage import _keyspace as ks
from meterware.storage.base import (
    START_OFFSET,
    RollupCommit,
    StreamEntry,
)
from meterware.storage.redis._connection import Connection
from meterware.storage.redis._scripts import Arg, Keys, as_str, stream_entries

_INTEGER: Final = re.compile(r"-?[0-9]+")


def commit_call(commit: RollupCommit) -> tuple[list[str], list[Arg]]:
    """KEYS and ARGV of ``commit.lua`` (every window's customer lives in the commit's shard)."""
    shard = commit.shard
    keys = Keys(ks.fence(shard), ks.offset(shard), ks.events(shard), ks.dead_letters(shard))
    args: list[Arg] = [commit.token, commit.expected_offset, commit.new_offset, len(commit.windows)]
    for window, totals in commit.windows.items():
        where = (shard, window.live, window.customer, window.window, window.start)
        args += [keys.index(ks.usage(*where)), totals.ttl, len(totals.sums)]
        for name, amount in totals.sums.items():
            args += [name, amount]
        args.append(len(totals.maxes))
        for name, value in totals.maxes.items():
            args += [name, value]
        args.append(len(totals.lasts))
        for name, (stamp, value) in totals.lasts.items():
            args += [name, stamp, value]
        uniques = {name: values for name, values in totals.uniques.items() if values}
        args.append(len(uniques))
        for name, values in uniques.items():
            args += [name, keys.index(ks.unique_values(*where, name)), len(values), *sorted(values)]
    args.append(len(commit.dead_letters))
    for entry_id, reason in commit.dead_letters:
        args += [entry_id, reason]
    return keys.keys, args


def refund_call(shard: int, due: Sequence[bytes]) -> tuple[list[str], list[Arg]]:
    """KEYS and ARGV of ``refund.lua`` from the ``id, record`` pairs of ``due_reservations.lua``.

    Raise ``ValueError`` naming the reservation if a record is not one (it was not written by admit.lua).
    """
    keys = Keys(ks.reservations(shard), ks.reservation_deadlines(shard))
    args: list[Arg] = []
    for reservation_id, record in zip(due[::2], due[1::2], strict=True):
        fields = record.decode(errors="replace").split()
        # "customer live period_start credits meter hold ...", as release() in common.lua checks it.
        if (
            len(fields) < 4
            or len(fields) % 2
            or not _INTEGER.fullmatch(fields[2])
            or not all(_INTEGER.fullmatch(number) for number in fields[3::2])
        ):
            where = f"{ks.reservations(shard)} field {reservation_id.decode(errors='replace')}"
            raise ValueError(f"BADVALUE {where} is not a reservation record")
        customer, live, period_start = fields[:3]
        args += [
            reservation_id,
            keys.index(ks.customer(shard, customer)),
            keys.index(ks.quota(shard, live == "1", customer, int(period_start))),
        ]
    args.append("due")  # refund.lua re-checks each deadline: one may have been renewed since it was listed
    return keys.keys, args


class RollupCommands(Connection):
    """The rollup worker's side of :class:`~meterware.storage.redis.RedisStorage`."""

    def claim_shard(self, shard: int, owner: str, ttl_ms: int) -> int | None:
        if ttl_ms < 1:
            raise ValueError(f"a shard claim lasts at least 1 ms, not {ttl_ms}")
        with self._call():
            token = self._run("claim_shard", [ks.shard_claim(shard), ks.fence(shard)], [owner, ttl_ms])
        return None if token is None else int(token)

    def release_shard(self, shard: int, owner: str) -> None:
        with self._call():
            self._run("release_shard", [ks.shard_claim(shard)], [owner])

    def rollup_heartbeat(self, owner: str, ttl_ms: int) -> list[str]:
        if ttl_ms < 1:
            raise ValueError(f"a heartbeat lasts at least 1 ms, not {ttl_ms}")
        with self._call():
            live = self._run("rollup_heartbeat", [ks.rollup_workers()], [owner, ttl_ms])
        return sorted(as_str(name) for name in live)

    def rollup_leave(self, owner: str) -> None:
        with self._call() as client:
            client.zrem(ks.rollup_workers(), owner)

    def committed_offset(self, shard: int) -> str:
        with self._call() as client:
            offset = client.get(ks.offset(shard))
        return START_OFFSET if offset is None else as_str(offset)

    def read_stream(self, shard: int, after: str, count: int) -> list[StreamEntry]:
        if count <= 0:
            return []
        with self._call() as client:
            reply = client.xrange(ks.events(shard), min=f"({after}", max="+", count=count)
        return stream_entries(reply)

    def commit_rollup(self, commit: RollupCommit) -> bool:
        keys, args = commit_call(commit)
        with self._call():
            return bool(self._run("commit", keys, args))

    def expire_reservations(self, shard: int, limit: int) -> int:
        if limit <= 0:
            return 0
        due_keys = [ks.reservations(shard), ks.reservation_deadlines(shard)]
        with self._call():
            due = self._run("due_reservations", due_keys, [limit])
            if not due:
                return 0
            try:
                keys, args = refund_call(shard, due)
            except ValueError as error:
                raise StorageError(f"Redis at {self._errors.where}: {error}") from None
            return int(self._run("refund", keys, args))

    def trim_stream(self, shard: int, min_id: str) -> int:
        with self._call() as client:
            return int(client.xtrim(ks.events(shard), minid=min_id, approximate=False))

    def stream_length(self, shard: int) -> int:
        with self._call() as client:
            return int(client.xlen(ks.events(shard)))

    def shard_holder(self, shard: int) -> tuple[str, int] | None:
        """Which worker claims the shard, and until when (epoch ms); None when no one does."""
        with self._call() as client:
            pipe = client.pipeline(transaction=False)
            pipe.get(ks.shard_claim(shard))
            pipe.pttl(ks.shard_claim(shard))
            owner, ttl_ms = pipe.execute()
        if owner is None or ttl_ms < 0:
            return None
        return as_str(owner), time.time_ns() // 1_000_000 + int(ttl_ms)

    def dead_letters(self, shard: int) -> list[StreamEntry]:
        """Entries the worker could not decode (for inspection)."""
        with self._call() as client:
            return stream_entries(client.xrange(ks.dead_letters(shard)))
