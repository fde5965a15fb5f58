"""The in-process backend's side of the rollup worker."""

from __future__ import annotations

import bisect

from meterware.storage.base import (
    RollupCommit,
    StreamEntry,
)
from meterware.storage.memory._state import (
    MemoryState,
    clock_ms,
    entry_id_key,
    id_tuple,
)


class RollupMixin(MemoryState):
    """Membership, shard claims, stream reads, fenced commits, reservation refunds."""

    def rollup_heartbeat(self, owner: str, ttl_ms: int) -> list[str]:
        if ttl_ms < 1:
            raise ValueError(f"a heartbeat lasts at least 1 ms, not {ttl_ms}")
        with self._lock:
            now = clock_ms()
            live = {name: until for name, until in self._rollup_workers.items() if until > now}
            live[owner] = now + ttl_ms
            self._rollup_workers = live
            return sorted(live)

    def rollup_leave(self, owner: str) -> None:
        with self._lock:
            self._rollup_workers.pop(owner, None)

    def claim_shard(self, shard: int, owner: str, ttl_ms: int) -> int | None:
        if ttl_ms < 1:
            raise ValueError(f"a shard claim lasts at least 1 ms, not {ttl_ms}")
        with self._lock:
            state = self._shards[shard]
            now = clock_ms()
            if state.claim is not None and state.claim[0] != owner and state.claim[1] > now:
                return None
            if state.claim is None or state.claim[0] != owner or state.claim[1] <= now:
                state.fence += 1
            state.claim = (owner, now + ttl_ms)
            return state.fence

    def release_shard(self, shard: int, owner: str) -> None:
        with self._lock:
            state = self._shards[shard]
            if state.claim is not None and state.claim[0] == owner:
                state.claim = None

    def committed_offset(self, shard: int) -> str:
        with self._lock:
            return self._shards[shard].offset

    def read_stream(self, shard: int, after: str, count: int) -> list[StreamEntry]:
        with self._lock:
            # The stream is in id order: find the offset by bisection, not by scanning a day of entries.
            stream = self._shards[shard].stream
            start = bisect.bisect_right(stream, id_tuple(after), key=entry_id_key)
            return stream[start : start + count]

    def commit_rollup(self, commit: RollupCommit) -> bool:
        with self._lock:
            state = self._shards[commit.shard]
            if state.fence != commit.token or state.offset != commit.expected_offset:
                return False
            # As commit.lua: what can fail (here, encoding) comes first, and the dead letters lead the writes.
            by_id = {entry.entry_id: entry for entry in state.stream} if commit.dead_letters else {}
            dead = []
            for entry_id, reason in commit.dead_letters:
                fields = dict(by_id[entry_id].fields) if entry_id in by_id else {}
                dead.append(fields | {b"entry": entry_id.encode(), b"reason": reason.encode()})

            for fields in dead:
                state.dead.append(StreamEntry(state.next_id(), fields))
            for window, totals in commit.windows.items():
                usage = self._usage[window]
                for name, amount in totals.sums.items():
                    usage.sums[name] += amount
                for name, value in totals.maxes.items():
                    usage.maxes[name] = max(value, usage.maxes.get(name, value))
                for name, (stamp, value) in totals.lasts.items():
                    if name not in usage.lasts or usage.lasts[name][0] <= stamp:
                        usage.lasts[name] = (stamp, value)
                for name, values in totals.uniques.items():
                    usage.uniques[name] |= values
            state.offset = commit.new_offset
            return True

    def expire_reservations(self, shard: int, limit: int) -> int:
        with self._lock:
            state = self._shards[shard]
            now = clock_ms()
            due = [rid for rid, r in state.reservations.items() if r.deadline_ms <= now][:limit]
            for reservation_id in due:
                self._release(state.reservations.pop(reservation_id))
            return len(due)

    def trim_stream(self, shard: int, min_id: str) -> int:
        with self._lock:
            state = self._shards[shard]
            trimmed = bisect.bisect_left(state.stream, id_tuple(min_id), key=entry_id_key)
            del state.stream[:trimmed]
            return trimmed

    def stream_length(self, shard: int) -> int:
        with self._lock:
            return len(self._shards[shard].stream)

    def shard_holder(self, shard: int) -> tuple[str, int] | None:
        """Which worker claims the shard, and until when (epoch ms); None when no one does."""
        with self._lock:
            claim = self._shards[shard].claim
            return claim if claim is not None and claim[1] > clock_ms() else None

    def dead_letters(self, shard: int) -> list[StreamEntry]:
        """Entries the worker could not decode (for inspection)."""
        with self._lock:
            return list(self._shards[shard].dead)
