"""The memory backend's stream paging by bisection (the in-process rollup reads it after every flush)."""

from __future__ import annotations

import pytest

from meterware.storage.base import START_OFFSET, Batch
from meterware.storage.memory import MemoryStorage


def _key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _probes(ids: list[str]) -> list[str]:
    """Offsets at, just before, just after and between the ids, and past both ends."""
    probes = [START_OFFSET, "0", "99999999999999-0"]
    for entry_id in ids:
        ms, seq = _key(entry_id)
        probes += [entry_id, f"{ms}-{seq + 1}", f"{ms - 1}-{seq}", str(ms)]
    return probes


@pytest.fixture
def storage() -> MemoryStorage:
    storage = MemoryStorage(shards=1)
    for index in range(40):
        assert storage.flush(Batch(0, f"b{index}", b"\x90", ()))
    return storage


def test_read_stream_pages_strictly_after_the_offset(storage: MemoryStorage) -> None:
    """For any offset, read_stream returns the next entries with a greater id, in order, at most count."""
    ids = [entry.entry_id for entry in storage.read_stream(0, START_OFFSET, 100)]
    assert len(ids) == 40
    assert ids == sorted(ids, key=_key)
    for after in _probes(ids):
        for count in (1, 3, 100):
            expected = [i for i in ids if _key(i) > _key(after)][:count]
            assert [entry.entry_id for entry in storage.read_stream(0, after, count)] == expected


def test_trim_stream_drops_only_entries_below_the_id(storage: MemoryStorage) -> None:
    """trim_stream removes exactly the entries with a smaller id and says how many."""
    ids = [entry.entry_id for entry in storage.read_stream(0, START_OFFSET, 100)]
    for min_id in sorted(_probes(ids), key=_key):
        before = [entry.entry_id for entry in storage.read_stream(0, START_OFFSET, 100)]
        kept = [i for i in before if _key(i) >= _key(min_id)]
        assert storage.trim_stream(0, min_id) == len(before) - len(kept)
        assert [entry.entry_id for entry in storage.read_stream(0, START_OFFSET, 100)] == kept
        assert storage.stream_length(0) == len(kept)
    assert storage.stream_length(0) == 0
