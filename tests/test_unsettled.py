"""The changes of a process's finished calls, from the buffer to a written batch: each counted once."""

from __future__ import annotations

import pytest

from meterware.metering.unsettled import MAX_AGE_SECONDS, CallChange, Unsettled

ACME = ("acme", True, 0)
BETA = ("beta", True, 0)


def change(account: tuple[str, bool, int] = ACME, released: int = 10, used: int = 1) -> CallChange:
    return account, released, (("calls", used, 1),)


def totals(unsettled: Unsettled, account: tuple[str, bool, int] = ACME) -> dict[str, tuple[int, ...]]:
    """Per batch id ("" before a batch): credits released, units charged, units released."""
    return {
        batch_id: (found.released, *found.meters["calls"])
        for batch_id, found in unsettled.of(account).changes
    }


def test_a_change_moves_from_the_buffer_to_its_batch_and_goes_when_written() -> None:
    """Added while buffered, named by its batch once taken into one, gone once the batch is written."""
    unsettled = Unsettled()
    unsettled.add(change())
    unsettled.add(change())
    assert totals(unsettled) == {"": (20, 2, 2)}
    unsettled.batched("b1", [change()])
    assert totals(unsettled) == {"": (10, 1, 1), "b1": (10, 1, 1)}
    unsettled.settled("b1")
    assert totals(unsettled) == {"": (10, 1, 1)}
    unsettled.discard([change()])  # dropped: its event will never be written
    assert totals(unsettled) == {}


def test_a_split_batch_keeps_counting_what_it_keeps() -> None:
    """A batch the backend refuses for one customer: that customer's calls stop counting, the others'
    count on under the id of the part kept."""
    unsettled = Unsettled()
    for account in (ACME, BETA):
        unsettled.add(change(account))
    unsettled.batched("b1", [change(ACME), change(BETA)])
    unsettled.split("b1", "b1-kept", ["beta"])
    assert totals(unsettled) == {"b1-kept": (10, 1, 1)}
    assert totals(unsettled, BETA) == {}
    unsettled.settled("b1-kept")
    assert totals(unsettled) == {}


def test_batches_are_forgotten_before_their_markers_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch never confirmed here (spooled, then replayed by another process sharing the spool: the
    admission skips it while its marker lives) is forgotten before the backend forgets its marker, so
    it can never count again."""
    unsettled = Unsettled()
    clock = [1000.0]
    monkeypatch.setattr("meterware.metering.unsettled.time.monotonic", lambda: clock[0])
    unsettled.add(change())
    unsettled.batched("old", [change()])
    clock[0] += MAX_AGE_SECONDS + 1
    unsettled.add(change())
    unsettled.batched("new", [change()])
    assert totals(unsettled) == {"new": (10, 1, 1)}


def test_a_batch_gets_the_writer_and_the_next_generation() -> None:
    """Batches are numbered in the order they are made; what an admission reads names the last one."""
    unsettled = Unsettled()
    unsettled.add(change())
    assert unsettled.of(ACME).generation == 0
    writer, first = unsettled.batched("b1", [change()])
    _, second = unsettled.batched("b2", [])
    assert (first, second) == (1, 2)
    snapshot = unsettled.of(ACME)
    assert (snapshot.writer, snapshot.generation) == (writer, 2)
    assert not snapshot.guarded  # nothing outside a batch: no later batch can hold its calls
