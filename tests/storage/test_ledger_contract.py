"""The ledger part of the storage contract, over memory, a real redis-server and a real Redis Cluster."""

from __future__ import annotations

import uuid

from meterware.events import UsageEvent, encode_batch, new_event_id
from meterware.metering.records import Customer
from meterware.storage._keyspace import shard_of
from meterware.storage.base import Batch, Correction, LedgerEntry, Settlement, Storage


def customer(storage: Storage, name: str = "acme") -> int:
    storage.create_customer(Customer(name, "test"))
    return shard_of(name, storage.shards)


def test_every_move_is_an_entry_and_the_balance_is_their_sum(storage: Storage) -> None:
    """Grants, adjustments and the charges of a flush are ledger entries; the balance is their sum."""
    shard = customer(storage)
    storage.grant_credits("acme", 5_000)
    storage.move_credits("acme", LedgerEntry("purchase", 2_000, "g1", "alice", "order", "", 50, 99))
    storage.move_credits("acme", LedgerEntry("adjustment", -500, actor="bob", reason="oops"))
    settle = Settlement("acme", True, 0, "", True, True, (("calls", 1, 300, 0),))
    assert storage.flush(Batch(shard, "batch-1", b"events", (settle, settle, None)))
    assert not storage.flush(Batch(shard, "batch-1", b"events", (settle, settle, None)))
    ledger = storage.read_ledger("acme")
    assert [(e.kind, e.amount, e.ref) for e in ledger] == [
        ("grant", 5_000, ""),
        ("purchase", 2_000, ""),
        ("adjustment", -500, ""),
        ("charge", -600, "batch-1"),
    ]
    assert (ledger[1].grant, ledger[1].actor, ledger[1].priority, ledger[1].expires_ms) == (
        "g1",
        "alice",
        50,
        99,
    )
    assert storage.get_balance("acme").balance == sum(e.amount for e in ledger) == 5_900
    assert storage.due_grant_expiries(shard, 100, 10) == [("acme", "g1")]


def test_an_expiry_applies_only_to_the_ledger_it_was_computed_from(storage: Storage) -> None:
    """expire_grants writes nothing when the ledger moved since its last id; otherwise once, and unlists."""
    shard = customer(storage)
    storage.move_credits("acme", LedgerEntry("grant", 1_000, "g1", expires_ms=10))
    last = storage.read_ledger("acme")[-1].id
    assert not storage.expire_grants("acme", "0-0", [("g1", -1_000)], "test")
    assert storage.expire_grants("acme", last, [("g1", -1_000)], "test")
    assert not storage.expire_grants("acme", last, [("g1", -1_000)], "test")
    assert [e.kind for e in storage.read_ledger("acme")] == ["grant", "expiry"]
    assert storage.get_balance("acme").balance == 0
    assert storage.due_grant_expiries(shard, 100, 10) == []


def test_a_correction_applies_once_per_state(storage: Storage) -> None:
    """correct_event appends, refunds and records the new state only over the state it expects."""
    shard = customer(storage)
    event_id = str(uuid.uuid4())
    refund = LedgerEntry("refund", 300, ref=f"void:{event_id}")
    fix = Correction(shard, "acme", event_id, "", "void", b"payload", (300,), (-1,), refund)
    assert storage.correct_event(fix)
    assert not storage.correct_event(fix)
    assert storage.correction_state(shard, event_id) == "void"
    assert [(e.kind, e.amount) for e in storage.read_ledger("acme")] == [("refund", 300)]
    [entry] = storage.read_stream(shard, "0-0", 10)
    assert (entry.fields[b"c"], entry.fields[b"n"]) == (b"300", b"-1")


def test_an_import_appends_each_event_once(storage: Storage) -> None:
    """import_events refuses a batch holding an event imported before, and indexes each by id."""
    shard = customer(storage)
    ids = [str(uuid.UUID(bytes=new_event_id())) for _ in range(2)]
    event = UsageEvent(new_event_id(), 1, "acme", "import", "test", "/", "", 200, "success", 0, 0)
    payload = encode_batch([event, event])
    assert storage.import_events(shard, ids, payload)
    assert not storage.import_events(shard, ids[1:], payload)
    [entry] = storage.read_stream(shard, "0-0", 10)
    assert storage.imported_entries(shard, [*ids, "other"]) == {
        ids[0]: entry.entry_id,
        ids[1]: entry.entry_id,
    }
    assert entry.fields[b"c"] == b"0,0"
