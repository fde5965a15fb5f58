"""The storage contract, run over every backend: memory, a real redis-server and a real Redis Cluster."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from meterware.config import Meter, MeterTerms, Plan, RateLimit
from meterware.errors import NotFoundError, StorageError
from meterware.events import decode_batch, encode_rows, make_row, new_event_id
from meterware.metering.admission import AdmitRequest, Decision, meter_holds
from meterware.metering.periods import period_bounds
from meterware.metering.records import Customer, KeyRecord
from meterware.metering.unsettled import Snapshot, Unsettled
from meterware.storage._keyspace import CUSTOMER_ID_RE, shard_of
from meterware.storage.base import (
    START_OFFSET,
    Balance,
    Batch,
    RollupCommit,
    Settlement,
    Storage,
    Window,
    WindowTotals,
)
from meterware.storage.memory import MemoryStorage
from meterware.storage.redis import RedisStorage
from tests.storage.conftest import Backend

METERS = {
    "calls": Meter("calls"),
    "tokens": Meter("tokens", aggregation="sum", source="handler", reserve=100),
}
DAY = 86_400


def make_plan(
    *,
    rates: tuple[RateLimit, ...] = (),
    quota: int | None = None,
    hard: bool = True,
    included: int = 0,
    price: int = 0,
    prepaid: bool = False,
    tokens: MeterTerms | None = None,
) -> Plan:
    meters = {}
    if quota is not None or included or price:
        meters["calls"] = MeterTerms(quota=quota, hard=hard, included=included, price=price)
    if tokens is not None:
        meters["tokens"] = tokens
    return Plan("test", rate_limits=rates, prepaid=prepaid, meters=meters)


def open_account(storage: Storage, customer: str = "acme", *, live: bool = True, credits: int = 0) -> str:
    """Create a customer with one active key; return the key id."""
    storage.create_customer(Customer(customer, "test"))
    key_id = f"key-{customer}"
    storage.add_key(KeyRecord(key_id, customer, "mw_live_ab12", live, "active", created=1), f"hash-{key_id}")
    if credits:
        storage.grant_credits(customer, credits)
    return key_id


def admit_request(
    storage: Storage,
    plan: Plan,
    customer: str = "acme",
    *,
    key_id: str | None = None,
    live: bool = True,
    timeout_ms: int = 60_000,
) -> AdmitRequest:
    start, end = period_bounds(0, plan.period, time.time())
    return AdmitRequest(
        shard=shard_of(customer, storage.shards),
        customer=customer,
        key_id=f"key-{customer}" if key_id is None else key_id,
        live=live,
        plan=plan,
        period_start=start,
        period_end=end,
        holds=meter_holds(plan, METERS, 1, live),
        reservation_id=uuid.uuid4().hex,
        reservation_timeout_ms=timeout_ms,
    )


def settlement(request: AdmitRequest, decision: Decision | None, *, billable: bool = True) -> Settlement:
    """How the flusher settles a call that used exactly what it held."""
    return Settlement(
        customer=request.customer,
        live=request.live,
        period_start=request.period_start,
        reservation_id=decision.reservation_id if decision else "",
        billable=billable,
        charges_credits=request.charges_credits,
        meters=tuple((hold.meter, hold.hold, hold.price, hold.included) for hold in request.holds),
    )


def flush(storage: Storage, *settlements: Settlement | None, batch_id: str | None = None) -> bool:
    shard = shard_of("acme", storage.shards)
    return storage.flush(Batch(shard, batch_id or uuid.uuid4().hex, b"events", settlements))


def quota_left(decision: Decision, meter: str = "calls") -> int:
    return next(limit.remaining for limit in decision.limits if limit.name == f"quota-{meter}")


def dead_letters(storage: Storage, shard: int) -> list[dict[bytes, bytes]]:
    assert isinstance(storage, MemoryStorage | RedisStorage)
    return [dict(entry.fields) for entry in storage.dead_letters(shard)]


# -- finished calls not yet flushed --------------------------------------------------------------------


def test_admission_counts_a_finished_calls_change_until_its_batch_is_written(storage: Storage) -> None:
    """A finished call's settlement counts at admission while it waits (in the buffer, then in a batch),
    and stops counting the moment its batch is written: never zero times, never twice."""
    open_account(storage, credits=30)
    plan = make_plan(price=10, prepaid=True)
    unsettled = Unsettled()
    first = admit_request(storage, plan)
    first.unsettled = unsettled
    decision = storage.admit(first)
    assert decision.available_credits == 20
    # The call failed: its 10 credits come back once flushed, and count as back at once.
    change = (("acme", True, first.period_start), 10, (("calls", 0, 1),))
    unsettled.add(change)
    again = replace(first, reservation_id=uuid.uuid4().hex)
    assert storage.admit(again).available_credits == 20  # 30 - its own 10
    unsettled.batched("batch-1", [change])
    probe = replace(first, reservation_id=uuid.uuid4().hex)
    assert storage.admit(probe).available_credits == 10  # 30 - 2 x 10 held (the change still counts)
    assert flush(storage, settlement(first, decision, billable=False), batch_id="batch-1")
    # Written, not yet forgotten by the process: the backend counts it once (twice would leave 10).
    assert storage.admit(replace(first, reservation_id=uuid.uuid4().hex)).available_credits == 0
    unsettled.settled("batch-1")
    balance = storage.get_balance("acme")
    assert (balance.balance, balance.reserved) == (30, 30)


class FlushWhileRead(Unsettled):
    """Unsettled calls whose first reading lets a flush run (in a thread, given half a second) before
    the admission that read them goes on: the flusher writing while an admission is on its way."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.flush: Callable[[], object] = lambda: None
        self.flushing = threading.Thread(target=lambda: self.flush())

    def of(self, account: tuple[str, bool, int]) -> Snapshot:
        snapshot = super().of(account)
        self.reads += 1
        if self.reads == 1:
            self.flushing.start()
            self.flushing.join(0.5)  # memory:// holds its lock while it admits: the flush waits for it
        return snapshot


@pytest.mark.parametrize("driver", ["sync", "asyncio"])
def test_a_batch_written_while_an_admission_is_on_its_way_is_counted_once(
    backend: Backend, driver: str
) -> None:
    """A call finished (10 credits reserved, 10 charged): the next admission reads it as not in a batch
    yet, then the flusher batches and writes it before the admission runs. The admission counts it once:
    on Redis it is answered STALE and asked again, on memory:// the flush waits for the admission."""
    storage = backend.sync
    open_account(storage, credits=30)
    plan = make_plan(price=10, prepaid=True)
    unsettled = FlushWhileRead()
    first = admit_request(storage, plan)
    decision = storage.admit(first)
    change = (("acme", True, first.period_start), 10, (("calls", 1, 1),))
    unsettled.add(change)

    def flush_the_call() -> None:
        writer, generation = unsettled.batched("batch-1", [change])
        batch = Batch(first.shard, "batch-1", b"events", (settlement(first, decision),), writer, generation)
        assert storage.flush(batch)

    unsettled.flush = flush_the_call
    second = replace(first, reservation_id=uuid.uuid4().hex, unsettled=unsettled)
    if driver == "sync":
        admitted = storage.admit(second)
    else:

        async def admit() -> Decision:
            requests = backend.open_async()
            try:
                return await requests.admit(second)
            finally:
                await requests.aclose()

        admitted = asyncio.run(admit())
    assert admitted.available_credits == 30 - 10 - 10  # charged once, and its own 10 held
    unsettled.flushing.join()
    unsettled.settled("batch-1")
    balance = storage.get_balance("acme")
    assert (balance.balance, balance.reserved) == (20, 10)
    assert unsettled.reads == (1 if backend.name == "memory" else 2)


def test_admission_counts_what_finished_calls_charge_past_included_units(storage: Storage) -> None:
    """Units charged by calls not yet flushed cost what the flush will charge: included units first."""
    open_account(storage, credits=100)
    plan = make_plan(price=10, included=2, prepaid=True)
    unsettled = Unsettled()
    request = admit_request(storage, plan)
    request.unsettled = unsettled
    # Three calls served fail-open (nothing held): 2 included, 1 at 10 credits.
    unsettled.add((("acme", True, request.period_start), 0, (("calls", 3, 0),)))
    decision = storage.admit(request)
    assert decision.available_credits == 100 - 10 - 10


# -- customers and keys --------------------------------------------------------------------------------


def test_customer_round_trip(storage: Storage) -> None:
    """A created customer reads back as created; an unknown one reads as None."""
    storage.create_customer(Customer("acme", "pro", "active", anchor=1_700_000_000))
    assert storage.get_customer("acme") == Customer("acme", "pro", "active", 1_700_000_000)
    assert storage.get_customer("nobody") is None


def test_customer_cannot_be_created_twice(storage: Storage) -> None:
    """Creating an existing customer raises ValueError and changes nothing."""
    storage.create_customer(Customer("acme", "pro"))
    with pytest.raises(ValueError, match="already exists"):
        storage.create_customer(Customer("acme", "free"))
    assert storage.get_customer("acme") == Customer("acme", "pro")


def test_update_customer_changes_only_what_is_given(storage: Storage) -> None:
    """update_customer sets the plan and/or status; an unknown customer raises NotFoundError."""
    storage.create_customer(Customer("acme", "free", anchor=5))
    storage.update_customer("acme", plan="pro")
    assert storage.get_customer("acme") == Customer("acme", "pro", "active", 5)
    storage.update_customer("acme", status="suspended")
    assert storage.get_customer("acme") == Customer("acme", "pro", "suspended", 5)
    with pytest.raises(NotFoundError):
        storage.update_customer("nobody", plan="pro")


def test_a_customer_id_with_a_trailing_newline_is_refused(storage: Storage) -> None:
    """An id that is a valid one plus a newline is refused by create and update (on Redis its reservation
    records, split into words, would name the other customer: its orphan refund would land there)."""
    names = (f"t{i}" for i in itertools.count())
    name = next(n for n in names if shard_of(f"{n}\n", storage.shards) == shard_of(n, storage.shards))
    open_account(storage, name, credits=1000)
    with pytest.raises(ValueError, match=r"customer id .* must be 1-128 letters"):
        storage.create_customer(Customer(f"{name}\n", "test"))
    with pytest.raises(ValueError, match=r"customer id .* must be 1-128 letters"):
        storage.update_customer(f"{name}\n", status="suspended")
    assert storage.get_customer(f"{name}\n") is None
    assert storage.list_customers() == [name]


#: Every customer id the fuzz tries gets a fresh prefix: the storage outlives hypothesis's examples.
_fuzzed = itertools.count()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(suffix=st.text(st.sampled_from("aZ09_.@-\n\r\t :{}\x00\u00e9\u0661"), max_size=6))
@example(suffix="\n")
@example(suffix="")
def test_fuzzed_customer_ids_are_refused_or_refunded_to_their_owner(storage: Storage, suffix: str) -> None:
    """Through create -> admit -> orphan refund, an id is either refused by create (not 1-128 of letters,
    digits, '_', '.', '@', '-') and stored nowhere, or its orphaned reservation goes back to it alone."""
    customer = f"c{next(_fuzzed)}{suffix}"
    if not CUSTOMER_ID_RE.fullmatch(customer):
        with pytest.raises(ValueError, match="customer id"):
            storage.create_customer(Customer(customer, "test"))
        assert customer not in storage.list_customers()
        return
    plan = make_plan(price=100, prepaid=True)
    open_account(storage, customer, credits=1000)
    orphan = storage.admit(admit_request(storage, plan, customer, timeout_ms=1))
    assert (orphan.allowed, storage.get_balance(customer).reserved) == (True, 100)
    time.sleep(0.005)
    assert storage.expire_reservations(shard_of(customer, storage.shards), 100) == 1
    assert storage.get_balance(customer) == Balance(1000, 0)


def test_list_customers_spans_every_shard(storage: Storage) -> None:
    """list_customers returns every customer, sorted, whatever shard holds it."""
    names = [f"customer-{index}" for index in range(12)]
    assert len({shard_of(name, storage.shards) for name in names}) > 1
    for name in reversed(names):
        storage.create_customer(Customer(name, "free"))
    assert storage.list_customers() == sorted(names)


def test_keys_are_added_listed_and_resolved(storage: Storage) -> None:
    """A key resolves by its hash to its id, owner and mode, and is listed and read back by id."""
    storage.create_customer(Customer("acme", "pro"))
    first = KeyRecord("k1", "acme", "mw_live_ab12", True, "active", created=10)
    second = KeyRecord("k2", "acme", "mw_test_cd34", False, "active", created=20, expires_ms=99)
    storage.add_key(first, "hash-1")
    storage.add_key(second, "hash-2")
    info = storage.resolve_key("hash-2")
    assert info is not None
    assert (info.key_id, info.customer, info.live, info.prefix) == (
        "k2",
        Customer("acme", "pro"),
        False,
        "mw_test_cd34",
    )
    assert storage.resolve_key("hash-unknown") is None
    assert storage.get_key("k1") == first
    assert storage.get_key("k-unknown") is None
    assert storage.list_keys("acme") == [first, second]


def test_a_key_keeps_its_name_and_metadata(storage: Storage) -> None:
    """A key's name and metadata read back as added (by id and in the customer's list)."""
    storage.create_customer(Customer("acme", "pro"))
    metadata = {"team": "data", "ticket": "OPS-1 \u00e9", "empty": ""}
    record = KeyRecord("k1", "acme", "mw_live_ab12", True, "active", 10, name="CI key", metadata=metadata)
    storage.add_key(record, "hash-1")
    assert storage.get_key("k1") == record
    assert storage.list_keys("acme") == [record]
    storage.set_key_state("k1", status="revoked")
    revoked = storage.get_key("k1")
    assert revoked is not None
    assert (revoked.name, revoked.metadata) == ("CI key", metadata)


def test_a_key_resolves_with_its_scopes(storage: Storage) -> None:
    """A key's scopes are kept with its record and come with its resolution (none: an empty tuple)."""
    storage.create_customer(Customer("acme", "pro"))
    scopes = ("files:read", "files/*", "admin")
    record = KeyRecord("k1", "acme", "mw_live_ab12", True, "active", 10, scopes=scopes)
    storage.add_key(record, "hash-1")
    storage.add_key(KeyRecord("k2", "acme", "mw_live_cd34", True, "active", 10), "hash-2")
    assert storage.get_key("k1") == record
    first, second = storage.resolve_key("hash-1"), storage.resolve_key("hash-2")
    assert first is not None
    assert second is not None
    assert (first.scopes, second.scopes) == (scopes, ())


def test_a_key_hash_is_added_once(storage: Storage) -> None:
    """Adding a key whose hash another key has (a concurrent import) is refused: the first key keeps the
    hash, and the refused one is neither listed nor found by id."""
    open_account(storage)
    storage.create_customer(Customer("other", "test"))
    taken = KeyRecord("key-second", "other", "sk_live_ab12", True, "active", created=1)
    with pytest.raises(ValueError, match="exists already"):
        storage.add_key(taken, "hash-key-acme")
    resolved = storage.resolve_key("hash-key-acme")
    assert resolved is not None
    assert (resolved.key_id, resolved.customer.id) == ("key-acme", "acme")
    assert (storage.list_keys("other"), storage.get_key("key-second")) == ([], None)


def test_keys_need_an_existing_customer(storage: Storage) -> None:
    """Adding or listing keys of an unknown customer raises NotFoundError."""
    with pytest.raises(NotFoundError):
        storage.add_key(KeyRecord("k1", "nobody", "mw_live_ab12", True, "active", created=1), "hash-1")
    with pytest.raises(NotFoundError):
        storage.list_keys("nobody")
    assert storage.resolve_key("hash-1") is None


def test_set_key_state(storage: Storage) -> None:
    """set_key_state revokes a key or sets its expiry; an unknown key raises NotFoundError."""
    key_id = open_account(storage)
    storage.set_key_state(key_id, expires_ms=1234)
    storage.set_key_state(key_id, status="revoked")
    record = storage.get_key(key_id)
    assert record is not None
    assert (record.status, record.expires_ms) == ("revoked", 1234)
    with pytest.raises(NotFoundError):
        storage.set_key_state("k-unknown", status="revoked")


def test_record_key_use_keeps_each_keys_latest_use(storage: Storage) -> None:
    """record_key_use raises each key's last_used_ms to the newest time given (keys of customers in
    several shards at once), never lowers it, and leaves the rest of the record alone."""
    names = [f"cust-{index}" for index in range(6)]
    assert len({shard_of(name, storage.shards) for name in names}) > 1
    for name in names:
        open_account(storage, name)
    storage.set_key_state("key-cust-1", status="revoked")
    assert storage.get_key("key-cust-0") == KeyRecord(
        "key-cust-0", "cust-0", "mw_live_ab12", True, "active", created=1
    )
    storage.record_key_use({})
    storage.record_key_use({f"key-{name}": 1_000 + index for index, name in enumerate(names)})
    storage.record_key_use({"key-cust-0": 5_000, "key-cust-1": 999, "key-cust-2": 1_002})
    expected = {f"key-{name}": 1_000 + index for index, name in enumerate(names)} | {"key-cust-0": 5_000}
    assert {name: storage.list_keys(name)[0].last_used_ms for name in names} == {
        name: expected[f"key-{name}"] for name in names
    }
    revoked = storage.get_key("key-cust-1")
    assert revoked is not None
    assert (revoked.status, revoked.last_used_ms) == ("revoked", 1_001)
    first = storage.get_key("key-cust-0")
    assert first == KeyRecord("key-cust-0", "cust-0", "mw_live_ab12", True, "active", 1, last_used_ms=5_000)


def test_record_key_use_never_creates_a_key(storage: Storage) -> None:
    """A key id that names no key is skipped: no record appears, and the known keys are still recorded."""
    key_id = open_account(storage)
    storage.record_key_use({"k-unknown": 7, key_id: 8, "": 9})
    assert storage.get_key("k-unknown") is None
    assert storage.get_key("") is None
    assert [(record.key_id, record.last_used_ms) for record in storage.list_keys("acme")] == [(key_id, 8)]


def test_a_key_is_added_with_its_last_use(storage: Storage) -> None:
    """add_key keeps the record's last_used_ms (0 for a new key): a record reads back as it was added."""
    storage.create_customer(Customer("acme", "pro"))
    record = KeyRecord("k1", "acme", "mw_live_ab12", True, "active", created=10, last_used_ms=42)
    storage.add_key(record, "hash-1")
    assert storage.get_key("k1") == record


def test_credits_are_granted_to_known_customers(storage: Storage) -> None:
    """grant_credits adds to the balance and returns it; unknown customers raise NotFoundError."""
    storage.create_customer(Customer("acme", "pro"))
    assert storage.get_balance("acme").balance == 0
    assert storage.grant_credits("acme", 5_000_000).balance == 5_000_000
    balance = storage.grant_credits("acme", 1)
    assert (balance.balance, balance.reserved, balance.available) == (5_000_001, 0, 5_000_001)
    with pytest.raises(NotFoundError):
        storage.grant_credits("nobody", 1)
    with pytest.raises(NotFoundError):
        storage.get_balance("nobody")


# -- admission -----------------------------------------------------------------------------------------


def test_admit_allows_an_active_key_and_reserves(storage: Storage) -> None:
    """An active key within every limit is admitted and its call's units are held."""
    open_account(storage)
    request = admit_request(storage, make_plan(quota=10))
    decision = storage.admit(request)
    assert decision.allowed
    assert decision.reason is None
    assert decision.reservation_id == request.reservation_id
    assert quota_left(decision) == 9


def test_admit_without_limits_allows_and_holds_nothing(storage: Storage) -> None:
    """A plan that limits and prices nothing admits every call without opening a reservation."""
    open_account(storage)
    decision = storage.admit(admit_request(storage, make_plan()))
    assert decision.allowed
    assert decision.reason is None
    assert decision.reservation_id == ""
    assert decision.limits == ()


def _revoke(storage: Storage) -> None:
    storage.set_key_state("key-acme", status="revoked")


def _expire(storage: Storage) -> None:
    storage.set_key_state("key-acme", expires_ms=time.time_ns() // 1_000_000 - 1_000)


def _expire_later(storage: Storage) -> None:
    storage.set_key_state("key-acme", expires_ms=time.time_ns() // 1_000_000 + 3_600_000)


def _suspend(storage: Storage) -> None:
    storage.update_customer("acme", status="suspended")


def _other_customer(storage: Storage) -> None:
    open_account(storage, "globex")


@pytest.mark.parametrize(
    ("prepare", "key_id", "reason"),
    [
        pytest.param(None, "key-missing", "unknown_key", id="unknown"),
        pytest.param(_other_customer, "key-globex", "unknown_key", id="another-customers-key"),
        pytest.param(_revoke, "key-acme", "revoked_key", id="revoked"),
        pytest.param(_expire, "key-acme", "expired_key", id="expired"),
        pytest.param(_expire_later, "key-acme", None, id="expires-later"),
        pytest.param(_suspend, "key-acme", "suspended", id="suspended"),
    ],
)
def test_admit_checks_key_and_customer(
    storage: Storage, prepare: Callable[[Storage], None] | None, key_id: str, reason: str | None
) -> None:
    """Unknown, revoked and expired keys and suspended customers are refused before any limit."""
    open_account(storage, credits=10_000)
    if prepare is not None:
        prepare(storage)
    plan = make_plan(rates=(RateLimit(5, 60),), quota=5, price=100, prepaid=True)
    decision = storage.admit(admit_request(storage, plan, key_id=key_id))
    assert decision.allowed is (reason is None)
    assert decision.reason == reason
    if reason is not None:
        assert decision.limits == ()
        assert decision.reservation_id == ""
        assert storage.get_balance("acme").reserved == 0


def _key_with_uses(storage: Storage, remaining: int) -> str:
    storage.create_customer(Customer("acme", "test"))
    record = KeyRecord("key-acme", "acme", "mw_live_ab12", True, "active", created=1, remaining=remaining)
    storage.add_key(record, "hash-key-acme")
    return record.key_id


def _remaining(storage: Storage) -> int | None:
    record = storage.get_key("key-acme")
    assert record is not None
    return record.remaining


def test_a_key_with_remaining_uses_gives_one_to_each_admitted_call(storage: Storage) -> None:
    """A key with 3 uses serves 3 calls, then is refused (key_exhausted) before any limit; a call refused
    by a limit takes no use; a key without the count resolves as such and never counts."""
    _key_with_uses(storage, 3)
    info = storage.resolve_key("hash-key-acme")
    assert info is not None
    assert info.counts_uses
    assert _remaining(storage) == 3
    plan = make_plan(rates=(RateLimit(2, 3600),))
    assert [storage.admit(admit_request(storage, plan)).reason for _ in range(3)] == [
        None,
        None,
        "rate_limited",
    ]
    assert _remaining(storage) == 1
    unlimited = make_plan(quota=10)
    assert storage.admit(admit_request(storage, unlimited)).allowed
    refused = storage.admit(admit_request(storage, unlimited))
    assert (refused.allowed, refused.reason, refused.limits, refused.reservation_id) == (
        False,
        "key_exhausted",
        (),
        "",
    )
    assert _remaining(storage) == 0
    open_account(storage, "globex")
    other = storage.resolve_key("hash-key-globex")
    assert other is not None
    assert not other.counts_uses
    assert storage.get_key("key-globex") == KeyRecord(
        "key-globex", "globex", "mw_live_ab12", True, "active", created=1
    )


def test_a_block_of_calls_gets_no_more_than_the_uses_left(storage: Storage) -> None:
    """An admission asking for 10 calls at once by a key with 4 uses is granted 4."""
    _key_with_uses(storage, 4)
    decision = storage.admit(replace(admit_request(storage, make_plan(quota=100)), calls=10))
    assert (decision.allowed, decision.calls) == (True, 4)
    assert _remaining(storage) == 0
    assert storage.admit(admit_request(storage, make_plan(quota=100))).reason == "key_exhausted"


def test_concurrent_admits_never_pass_a_keys_uses(backend: Backend) -> None:
    """200 admits gathered on one event loop by a key with 37 uses admit exactly 37."""
    _key_with_uses(backend.sync, 37)
    plan = make_plan(quota=1_000)
    requests = [admit_request(backend.sync, plan) for _ in range(CONCURRENT_CALLS)]

    async def admit_all() -> list[Decision]:
        storage = backend.open_async()
        try:
            return list(await asyncio.gather(*(storage.admit(request) for request in requests)))
        finally:
            await storage.aclose()

    decisions = asyncio.run(admit_all())
    assert sum(decision.allowed for decision in decisions) == 37
    assert {decision.reason for decision in decisions if not decision.allowed} == {"key_exhausted"}
    assert _remaining(backend.sync) == 0


def test_a_customer_without_a_key_is_resolved_and_admitted(backend: Backend) -> None:
    """resolve_customer gives a customer as a key without a key id (None for an unknown one), sync and
    async; its calls are admitted on their limits without a key record, and refused for an unknown or
    suspended customer."""
    storage = backend.sync
    storage.create_customer(Customer("acme", "pro", anchor=7))
    found = storage.resolve_customer("acme")
    assert found is not None
    assert (found.key_id, found.customer, found.live, found.scopes) == (
        "",
        Customer("acme", "pro", anchor=7),
        True,
        (),
    )
    assert storage.resolve_customer("nobody") is None

    async def resolve() -> tuple[object, object]:
        client = backend.open_async()
        try:
            return await client.resolve_customer("acme"), await client.resolve_customer("nobody")
        finally:
            await client.aclose()

    assert asyncio.run(resolve()) == (found, None)
    plan = make_plan(quota=2)
    decisions = [storage.admit(admit_request(storage, plan, key_id="")) for _ in range(3)]
    assert [decision.reason for decision in decisions] == [None, None, "quota_exceeded"]
    assert storage.admit(admit_request(storage, plan, "nobody", key_id="")).reason == "unknown_customer"
    storage.update_customer("acme", status="suspended")
    assert storage.admit(admit_request(storage, plan, key_id="")).reason == "suspended"


def test_customers_without_keys_admitted_together_keep_their_own_limits(backend: Backend) -> None:
    """Calls of two customers of one shard without keys, gathered into the same admission rounds, each
    count against their own customer's quota (3 each against a quota of 2: 2 each admitted)."""
    plan = make_plan(quota=2)
    shard = shard_of("acme", backend.sync.shards)
    other = next(f"c{i}" for i in itertools.count() if shard_of(f"c{i}", backend.sync.shards) == shard)
    for name in ("acme", other):
        backend.sync.create_customer(Customer(name, "test"))
    # As the request path makes them: the same plan terms (one holds object) for both customers.
    base = admit_request(backend.sync, plan, key_id="")
    requests = [
        replace(base, customer=name, reservation_id=uuid.uuid4().hex)
        for _ in range(3)
        for name in ("acme", other)
    ]

    async def admit_all() -> list[Decision]:
        storage = backend.open_async()
        try:
            return list(await asyncio.gather(*(storage.admit(request) for request in requests)))
        finally:
            await storage.aclose()

    decisions = asyncio.run(admit_all())
    admitted = Counter(
        request.customer for request, decision in zip(requests, decisions, strict=True) if decision.allowed
    )
    assert admitted == {"acme": 2, other: 2}


def test_gcra_allows_a_burst_then_refuses(storage: Storage) -> None:
    """A rate of 3 per minute admits a burst of 3, then refuses with a retry-after of about 20 s."""
    open_account(storage)
    plan = make_plan(rates=(RateLimit(3, 60),))
    remaining = []
    for _ in range(3):
        decision = storage.admit(admit_request(storage, plan))
        assert decision.allowed
        remaining.append(decision.limits[0].remaining)
    assert remaining == [2, 1, 0]
    refused = storage.admit(admit_request(storage, plan))
    assert (refused.allowed, refused.reason) == (False, "rate_limited")
    assert 0 < refused.retry_after <= 20
    assert (refused.limits[0].name, refused.limits[0].quota, refused.limits[0].remaining) == (
        "rate-60s",
        3,
        0,
    )


def test_rate_limits_are_all_decided_before_any_is_consumed(storage: Storage) -> None:
    """A call refused by one rate limit consumes none of the others."""
    open_account(storage)
    both = make_plan(rates=(RateLimit(2, 60), RateLimit(10, 3600)))
    for _ in range(2):
        assert storage.admit(admit_request(storage, both)).allowed
    for _ in range(3):
        assert storage.admit(admit_request(storage, both)).reason == "rate_limited"
    hourly_only = make_plan(rates=(RateLimit(10, 3600),))
    decision = storage.admit(admit_request(storage, hourly_only))
    assert decision.limits[0].remaining == 7  # 10 - 2 admitted - this one


@pytest.mark.parametrize(
    ("hard", "third"),
    [pytest.param(True, "quota_exceeded", id="hard"), pytest.param(False, None, id="soft")],
)
def test_quota_hard_refuses_soft_reports(storage: Storage, hard: bool, third: str | None) -> None:
    """A hard quota refuses the call past it until the period ends; a soft quota admits it."""
    open_account(storage)
    plan = make_plan(quota=2, hard=hard)
    for _ in range(2):
        assert storage.admit(admit_request(storage, plan)).allowed
    request = admit_request(storage, plan)
    decision = storage.admit(request)
    assert decision.reason == third
    if hard:
        assert quota_left(decision) == 0
        assert 0 < decision.retry_after <= request.period_end - request.period_start
    else:
        assert decision.limits == ()


@pytest.mark.parametrize(
    ("plan", "live", "balance", "reason", "available"),
    [
        pytest.param(make_plan(price=1000, prepaid=True), True, 999, "insufficient_credits", 999, id="short"),
        pytest.param(make_plan(price=1000, prepaid=True), True, 1000, None, 0, id="exact"),
        pytest.param(make_plan(price=1000, prepaid=True), False, 0, None, None, id="test-key-is-free"),
        pytest.param(make_plan(price=1000), True, 0, None, None, id="postpaid"),
        pytest.param(
            make_plan(prepaid=True, tokens=MeterTerms(price=1)), True, 100, "insufficient_credits", 100,
            id="value-meter-needs-credit-left",
        ),
        pytest.param(
            make_plan(prepaid=True, tokens=MeterTerms(price=1)), True, 101, None, 1, id="value-meter-covered"
        ),
    ],
)  # fmt: skip
def test_admit_checks_credits(
    storage: Storage, plan: Plan, live: bool, balance: int, reason: str | None, available: int | None
) -> None:
    """Prepaid live calls need credits for their price (and one spare for open-ended meters)."""
    open_account(storage, live=live, credits=balance)
    decision = storage.admit(admit_request(storage, plan, live=live))
    assert decision.reason == reason
    assert decision.available_credits == available
    expected_reserved = balance - available if reason is None and available is not None else 0
    assert decision.reserved_credits == expected_reserved
    assert storage.get_balance("acme").reserved == expected_reserved


# -- settlement ----------------------------------------------------------------------------------------


def test_flush_charges_billable_calls_and_refunds_the_rest(storage: Storage) -> None:
    """Settling charges billable calls at included-then-overage prices and gives refused ones back."""
    open_account(storage, credits=1000)
    plan = make_plan(quota=10, included=2, price=100, prepaid=True)
    calls = [admit_request(storage, plan) for _ in range(3)]
    decisions = [storage.admit(request) for request in calls]
    # The third call is past the 2 included units, so it holds its price.
    assert [decision.reserved_credits for decision in decisions] == [0, 0, 100]
    assert storage.get_balance("acme").reserved == 100

    # The second call fails: its unit goes back, so the third one fits in the included units after all.
    billable = [True, False, True]
    assert flush(
        storage, *(settlement(r, d, billable=b) for r, d, b in zip(calls, decisions, billable, strict=True))
    )
    shard = shard_of("acme", storage.shards)
    [entry] = storage.read_stream(shard, START_OFFSET, 10)
    assert entry.fields[b"c"] == b"0,0,0"
    balance = storage.get_balance("acme")
    assert (balance.balance, balance.reserved) == (1000, 0)

    more = [admit_request(storage, plan) for _ in range(2)]
    more_decisions = [storage.admit(request) for request in more]
    assert flush(storage, *(settlement(r, d) for r, d in zip(more, more_decisions, strict=True)))
    entry = storage.read_stream(shard, entry.entry_id, 10)[0]
    assert entry.fields[b"c"] == b"100,100"
    balance = storage.get_balance("acme")
    assert (balance.balance, balance.reserved) == (800, 0)
    assert quota_left(storage.admit(admit_request(storage, plan))) == 10 - 4 - 1


def test_a_leases_calls_take_their_share_out_of_its_block_as_they_settle(storage: Storage) -> None:
    """A lease's calls are charged from scratch and each takes its units and cost out of the block, so a
    settled call never counts both as used and as held; the last call closes what is left. Calls within
    the included units cost nothing and take no credits."""
    open_account(storage, credits=10_000)
    plan = make_plan(quota=20, included=2, price=100, prepaid=True)
    block = replace(admit_request(storage, plan), calls=10)
    granted = storage.admit(block)
    assert (granted.calls, granted.reserved_credits) == (10, 800)  # 2 included, 8 at 100
    call = replace(block, calls=1)
    share = replace(settlement(call, None), reservation_id=block.reservation_id, closes=False)

    # 4 calls settle in one batch (2 of them within the included units): 4 used, 6 still held.
    assert flush(storage, *[share] * 4)
    assert quota_left(storage.admit(admit_request(storage, plan))) == 20 - 4 - 6 - 1
    balance = storage.get_balance("acme")
    assert (balance.balance, balance.reserved) == (10_000 - 200, 800 - 200 + 100)  # the probe holds a call

    # 3 more in a later batch, then the last one closes the block: nothing of it is held any more.
    assert flush(storage, *[share] * 3)
    assert flush(storage, replace(share, closes=True))
    assert quota_left(storage.admit(admit_request(storage, plan))) == 20 - 8 - 1 - 1
    balance = storage.get_balance("acme")
    assert balance.balance == 10_000 - 600  # 8 calls, 2 of them within the included units
    assert balance.reserved == 2 * 100  # the two probes, each holding one call


def test_flush_prices_each_call_by_the_units_before_it(storage: Storage) -> None:
    """In one batch, each call costs what it adds past the included units, given the calls before it:
    calls of a customer with the same terms and calls with other units or meters interleave."""
    open_account(storage, credits=100_000)
    period_start = period_bounds(0, "month", time.time())[0]

    def call(units: int, tokens: int = 0, *, billable: bool = True, charges: bool = True) -> Settlement:
        meters = (("calls", units, 100, 5),) + ((("tokens", tokens, 1, 50),) if tokens else ())
        return Settlement("acme", True, period_start, "", billable, charges, meters)

    batch = [call(2), call(2), call(3, 40), call(2, billable=False), call(2), call(1, 30, charges=False)]
    assert flush(storage, *batch, call(2))
    shard = shard_of("acme", storage.shards)
    [entry] = storage.read_stream(shard, START_OFFSET, 10)
    # calls: 0-2, 2-4, 4-7 (2 past 5), not billable, 7-9, 9-10, 10-12; tokens: 0-40, 40-70 (20 past 50).
    assert entry.fields[b"c"] == b"0,0,200,0,200,120,200"
    # The call that does not charge credits still counts its units, and its cost is not charged.
    assert storage.get_balance("acme").balance == 100_000 - 600
    [charge] = [e for e in storage.read_ledger("acme") if e.kind == "charge"]
    assert charge.amount == -600


def test_flush_past_the_included_units_prices_calls_by_their_units(storage: Storage) -> None:
    """Once past its included units, every call costs its units times their prices, in any batch."""
    open_account(storage, credits=100_000)
    period_start = period_bounds(0, "month", time.time())[0]

    def call(units: int, *, billable: bool = True) -> Settlement:
        return Settlement("acme", True, period_start, "", billable, True, (("calls", units, 7, 2),))

    assert flush(storage, call(3))  # 1 past the 2 included
    assert flush(storage, call(1), call(3), call(1, billable=False), None, call(2), call(0))
    shard = shard_of("acme", storage.shards)
    entries = storage.read_stream(shard, START_OFFSET, 10)
    assert [entry.fields[b"c"] for entry in entries] == [b"7", b"7,21,0,0,14,0"]
    assert storage.get_balance("acme").balance == 100_000 - 7 - 42
    assert [e.amount for e in storage.read_ledger("acme") if e.kind == "charge"] == [-7, -42]


def test_flush_closes_every_reservation_of_a_big_batch(storage: Storage) -> None:
    """A batch closes all its reservations, however many (the script asks for them in slices)."""
    open_account(storage, credits=10_000)
    plan = make_plan(quota=5000, price=1, prepaid=True)
    calls = [admit_request(storage, plan) for _ in range(2100)]
    decisions = [storage.admit(request) for request in calls]
    assert storage.get_balance("acme").reserved == 2100
    billable = [index % 3 != 0 for index in range(2100)]
    settlements = [settlement(r, d, billable=b) for r, d, b in zip(calls, decisions, billable, strict=True)]
    assert flush(storage, *settlements, settlements[0])  # the first (refunded) twice: closed once
    balance = storage.get_balance("acme")
    assert (balance.balance, balance.reserved) == (10_000 - 1400, 0)
    assert storage.expire_reservations(shard_of("acme", storage.shards), 10_000) == 0


def test_flush_refund_gives_quota_and_credits_back(storage: Storage) -> None:
    """A call that is not billable releases its quota hold and its reserved credits."""
    open_account(storage, credits=100)
    plan = make_plan(quota=1, price=100, prepaid=True)
    request = admit_request(storage, plan)
    decision = storage.admit(request)
    assert (decision.allowed, decision.reserved_credits, decision.available_credits) == (True, 100, 0)
    assert storage.admit(admit_request(storage, plan)).reason == "quota_exceeded"
    assert flush(storage, settlement(request, decision, billable=False))
    balance = storage.get_balance("acme")
    assert (balance.balance, balance.reserved) == (100, 0)
    assert storage.admit(admit_request(storage, plan)).allowed


def test_flush_records_calls_without_reservation(storage: Storage) -> None:
    """A billable call served without admission (fail-open) is still counted and charged."""
    open_account(storage, credits=500)
    plan = make_plan(quota=5, price=100, prepaid=True)
    assert flush(storage, settlement(admit_request(storage, plan), None), None)
    [entry] = storage.read_stream(shard_of("acme", storage.shards), START_OFFSET, 10)
    assert entry.fields[b"c"] == b"100,0"
    assert storage.get_balance("acme").balance == 400
    assert quota_left(storage.admit(admit_request(storage, plan))) == 5 - 1 - 1


@pytest.mark.parametrize(
    "meters",
    [
        pytest.param((("calls", 1, -999_990_000, 0),), id="negative-price"),
        pytest.param((("calls", -5, 100, 0),), id="negative-units"),
        pytest.param((("calls", 1, 100, -1),), id="negative-included"),
        pytest.param((("calls", 1, 2**53, 0),), id="price-beyond-2^53"),
        pytest.param((("calls", 2**60, 1, 0),), id="units-beyond-2^53"),
    ],
)
@pytest.mark.parametrize("billable", [True, False], ids=["billable", "refunded"])
def test_flush_refuses_a_settlement_out_of_range_and_changes_nothing(
    storage: Storage, meters: tuple[tuple[str, int, int, int], ...], billable: bool
) -> None:
    """A batch with a settlement whose units, price or included units are not integers from 0 to 2^53-1
    (a crafted spool file) is refused as it is, with one line naming it: nothing appended, charged or
    credited (a negative price once minted credits)."""
    open_account(storage, credits=1_000_000)
    period_start = period_bounds(0, "month", time.time())[0]
    good = Settlement("acme", True, period_start, "", True, True, (("calls", 1, 100, 0),))
    bad = Settlement("acme", True, period_start, "", billable, True, meters)
    with pytest.raises(StorageError, match=r"BADVALUE batch \S+ .*(price|units|included)") as refused:
        flush(storage, good, bad)
    assert refused.value.refused
    assert "\n" not in str(refused.value)
    assert storage.get_balance("acme") == Balance(1_000_000, 0)
    assert storage.stream_length(shard_of("acme", storage.shards)) == 0
    assert [entry.kind for entry in storage.read_ledger("acme")] == ["grant"]


def test_flush_is_idempotent_by_batch_id(storage: Storage) -> None:
    """Flushing the same batch id twice appends and charges once; the second flush returns False."""
    open_account(storage, credits=1000)
    plan = make_plan(quota=5, price=100, prepaid=True)
    request = admit_request(storage, plan)
    decision = storage.admit(request)
    assert flush(storage, settlement(request, decision), batch_id="batch-1")
    assert not flush(storage, settlement(request, decision), batch_id="batch-1")
    assert storage.stream_length(shard_of("acme", storage.shards)) == 1
    balance = storage.get_balance("acme")
    assert (balance.balance, balance.reserved) == (900, 0)
    assert quota_left(storage.admit(admit_request(storage, plan))) == 5 - 1 - 1


def test_a_flush_charges_each_record_once_and_releases_its_duplicates(storage: Storage) -> None:
    """A record's settlement carries its marker: a batch holding one marker twice charges it once, sets it
    with the charge, writes the first event only and releases the duplicate's reservation; a later batch
    holding a marker set before writes no event of it and releases its reservation too."""
    open_account(storage, credits=1000)
    plan = make_plan(quota=10, price=100, prepaid=True)
    shard = shard_of("acme", storage.shards)

    def batch_of(*markers: str) -> Batch:
        requests = [admit_request(storage, plan) for _ in markers]
        settled = [
            replace(settlement(request, storage.admit(request)), once=marker)
            for request, marker in zip(requests, markers, strict=True)
        ]
        rows = [
            make_row(
                new_event_id(),
                1,
                "acme",
                "",
                "test",
                f"r{n}",
                "RECORD",
                200,
                "success",
                0,
                0,
                {},
                True,
                True,
                0,
                "",
            )
            for n in range(len(markers))
        ]
        return Batch(shard, str(uuid.uuid4()), encode_rows(rows), tuple(settled))

    assert not storage.is_used("acme", "record:a")
    assert storage.flush(batch_of("record:a", "record:a", "", "record:b"))
    [entry] = storage.read_stream(shard, START_OFFSET, 10)
    assert [event.route for event in decode_batch(entry.fields[b"b"])] == ["r0", "r2", "r3"]
    assert entry.fields[b"c"] == b"100,100,100"
    assert (storage.get_balance("acme").balance, storage.get_balance("acme").reserved) == (700, 0)
    assert storage.is_used("acme", "record:a")
    assert storage.is_used("acme", "record:b")

    assert storage.flush(batch_of("record:b", "record:c"))
    entry = storage.read_stream(shard, entry.entry_id, 10)[0]
    assert [event.route for event in decode_batch(entry.fields[b"b"])] == ["r1"]
    assert (storage.get_balance("acme").balance, storage.get_balance("acme").reserved) == (600, 0)
    # A crafted batch whose payload is not one event per settlement cannot be taken apart (record:c is
    # charged): refused whole, nothing written.
    with pytest.raises(StorageError) as refused:
        storage.flush(replace(batch_of("record:c", "record:d"), payload=b"events"))
    assert refused.value.refused
    assert (storage.get_balance("acme").balance, storage.is_used("acme", "record:d")) == (600, False)
    assert storage.stream_length(shard) == 2


def test_expire_reservations_refunds_after_the_timeout(storage: Storage) -> None:
    """A reservation never settled is refunded after its timeout, once; a live one is kept."""
    open_account(storage, credits=1000)
    plan = make_plan(quota=5, price=100, prepaid=True)
    abandoned = admit_request(storage, plan, timeout_ms=1)
    abandoned_decision = storage.admit(abandoned)
    storage.admit(admit_request(storage, plan, timeout_ms=600_000))
    assert storage.get_balance("acme").reserved == 200
    time.sleep(0.02)
    shard = shard_of("acme", storage.shards)
    assert storage.expire_reservations(shard, 100) == 1
    assert storage.expire_reservations(shard, 100) == 0
    assert storage.get_balance("acme").reserved == 100
    assert quota_left(storage.admit(admit_request(storage, plan))) == 5 - 2
    # The call's event arrives late: its reservation is gone, so nothing is released twice.
    assert flush(storage, settlement(abandoned, abandoned_decision, billable=False))
    assert storage.get_balance("acme").reserved == 200


def test_renewed_reservations_outlive_their_first_deadline(backend: Backend) -> None:
    """A reservation renewed (its call still running) is not refunded past the deadline its admission set,
    and is refunded once its renewed deadline passes; renewing one closed meanwhile renews nothing; the
    asyncio twin renews the same way."""
    storage = backend.sync
    open_account(storage, credits=1000)
    plan = make_plan(quota=5, price=100, prepaid=True)
    running, ended = (admit_request(storage, plan, timeout_ms=500) for _ in range(2))
    storage.admit(running)
    ended_decision = storage.admit(ended)
    assert flush(storage, settlement(ended, ended_decision))  # ended: its reservation is closed
    shard = shard_of("acme", storage.shards)
    assert storage.renew_reservations([running, ended]) == 1
    time.sleep(0.3)
    assert asyncio.run(renew_async(backend, [running])) == 1
    time.sleep(0.35)  # past the deadline its admission set (500 ms), not the renewed one
    assert storage.expire_reservations(shard, 100) == 0
    assert storage.get_balance("acme").reserved == 100
    time.sleep(0.25)
    assert storage.expire_reservations(shard, 100) == 1
    assert storage.get_balance("acme").reserved == 0
    assert storage.renew_reservations([running]) == 0


async def renew_async(backend: Backend, admissions: list[AdmitRequest]) -> int:
    storage = backend.open_async()
    try:
        return await storage.renew_reservations(admissions)
    finally:
        await storage.aclose()


# -- the rollup worker ---------------------------------------------------------------------------------


def test_claim_fence_grows_only_on_a_fresh_claim(storage: Storage) -> None:
    """Renewing keeps the token, another owner is refused while the claim is held, each shard counts apart."""
    assert storage.claim_shard(0, "worker-a", 10_000) == 1
    assert storage.claim_shard(0, "worker-a", 10_000) == 1
    assert storage.claim_shard(0, "worker-b", 10_000) is None
    storage.release_shard(0, "worker-b")  # not the holder: nothing happens
    assert storage.claim_shard(0, "worker-b", 10_000) is None
    storage.release_shard(0, "worker-a")
    assert storage.claim_shard(0, "worker-b", 10_000) == 2
    assert storage.claim_shard(1, "worker-a", 10_000) == 1


def test_shard_holder_names_the_owner_and_when_the_claim_runs_out(storage: Storage) -> None:
    """Who claims a shard and until when (epoch ms), as long as it is held; None otherwise."""
    assert storage.shard_holder(2) is None
    before = time.time_ns() // 1_000_000
    storage.claim_shard(2, "worker-a", 10_000)
    holder = storage.shard_holder(2)
    assert holder is not None
    owner, until_ms = holder
    assert owner == "worker-a"
    assert before + 9_000 <= until_ms <= time.time_ns() // 1_000_000 + 10_000
    storage.release_shard(2, "worker-a")
    assert storage.shard_holder(2) is None
    storage.claim_shard(2, "worker-b", 1)
    time.sleep(0.02)
    assert storage.shard_holder(2) is None  # ran out


def test_shard_claim_expires(storage: Storage) -> None:
    """A claim not renewed within its ttl can be taken by another owner, with a new token."""
    assert storage.claim_shard(3, "worker-a", 1) == 1
    time.sleep(0.02)
    assert storage.claim_shard(3, "worker-b", 10_000) == 2


def test_rollup_heartbeat_names_the_live_workers(storage: Storage) -> None:
    """Each heartbeat returns the live workers by name; an expired or departed worker is forgotten."""
    assert storage.rollup_heartbeat("worker-b", 10_000) == ["worker-b"]
    assert storage.rollup_heartbeat("worker-a", 10_000) == ["worker-a", "worker-b"]
    assert storage.rollup_heartbeat("worker-a", 10_000) == ["worker-a", "worker-b"]  # renewed, not added
    assert storage.rollup_heartbeat("worker-c", 1) == ["worker-a", "worker-b", "worker-c"]
    time.sleep(0.02)
    assert storage.rollup_heartbeat("worker-b", 10_000) == ["worker-a", "worker-b"]  # c's expired
    storage.rollup_leave("worker-a")
    storage.rollup_leave("worker-z")  # not a live worker: nothing happens
    assert storage.rollup_heartbeat("worker-b", 10_000) == ["worker-b"]
    with pytest.raises(ValueError, match="at least 1 ms"):
        storage.rollup_heartbeat("worker-b", 0)


def _window(storage: Storage) -> tuple[int, Window]:
    return shard_of("acme", storage.shards), Window(True, "acme", "day", 20_000 * DAY)


def test_commit_rollup_applies_aggregates_and_moves_the_offset(storage: Storage) -> None:
    """A fenced commit adds its totals and sets the shard's offset."""
    shard, window = _window(storage)
    token = storage.claim_shard(shard, "worker", 10_000)
    assert token is not None
    totals = WindowTotals(sums={"calls": 3}, maxes={"latency": 50}, lasts={"level": (1_000, 7)})
    assert storage.commit_rollup(RollupCommit(shard, token, START_OFFSET, "5-0", {window: totals}))
    assert storage.committed_offset(shard) == "5-0"
    assert storage.read_usage("acme", True, "day", window.start) == {"calls": 3, "latency": 50, "level": 7}
    assert storage.read_usage("acme", False, "day", window.start) == {}
    assert storage.committed_offset((shard + 1) % storage.shards) == START_OFFSET


def _stale_token(storage: Storage, shard: int, token: int) -> int:
    storage.release_shard(shard, "worker")
    assert storage.claim_shard(shard, "other-worker", 10_000) == token + 1
    return token


@pytest.mark.parametrize(
    ("break_commit"),
    [
        pytest.param(lambda storage, shard, token: (token + 1, "5-0"), id="wrong-token"),
        pytest.param(
            lambda storage, shard, token: (_stale_token(storage, shard, token), "5-0"), id="lost-claim"
        ),
        pytest.param(lambda storage, shard, token: (token, "4-0"), id="wrong-offset"),
    ],
)
def test_commit_rollup_is_fenced(
    storage: Storage, break_commit: Callable[[Storage, int, int], tuple[int, str]]
) -> None:
    """A commit with a stale token or from a moved offset is refused and applies nothing."""
    shard, window = _window(storage)
    token = storage.claim_shard(shard, "worker", 10_000)
    assert token is not None
    assert storage.commit_rollup(RollupCommit(shard, token, START_OFFSET, "5-0", {}))
    bad_token, expected = break_commit(storage, shard, token)
    totals = WindowTotals(sums={"calls": 3}, uniques={"users": {"u1"}})
    commit = RollupCommit(shard, bad_token, expected, "9-0", {window: totals}, dead_letters=(("5-0", "bad"),))
    assert not storage.commit_rollup(commit)
    assert storage.committed_offset(shard) == "5-0"
    assert storage.read_usage("acme", True, "day", window.start) == {}
    assert dead_letters(storage, shard) == []


def test_read_usage_merges_every_aggregation(storage: Storage) -> None:
    """Sums add up, maxes keep the largest, the newest last value wins, unique values are counted once."""
    shard, window = _window(storage)
    token = storage.claim_shard(shard, "worker", 10_000)
    assert token is not None
    first = WindowTotals(
        sums={"calls": 3, "tokens": 100},
        maxes={"latency": 50},
        lasts={"level": (2_000, 7)},
        uniques={"users": {"u1", "u2"}},
        ttl=3600,
    )
    second = WindowTotals(
        sums={"calls": 2},
        maxes={"latency": 40},
        lasts={"level": (1_000, 3), "depth": (1_000, 9)},  # an older "level" arrives late
        uniques={"users": {"u2", "u3"}},
        ttl=3600,
    )
    assert storage.commit_rollup(RollupCommit(shard, token, START_OFFSET, "1-0", {window: first}))
    assert storage.commit_rollup(RollupCommit(shard, token, "1-0", "2-0", {window: second}))
    usage = storage.read_usage("acme", True, "day", window.start)
    assert usage == {"calls": 5, "tokens": 100, "latency": 50, "level": 7, "depth": 9, "users": 3}


def test_read_usage_windows_reads_each_window_in_order(storage: Storage) -> None:
    """Many windows in one read: each as read_usage reports it, in the order asked, {} where nothing was
    written (a gap, another mode), uniques counted per window."""
    shard, window = _window(storage)
    token = storage.claim_shard(shard, "worker", 10_000)
    assert token is not None
    first, third = window, replace(window, start=window.start + 2 * DAY)
    commit = RollupCommit(
        shard,
        token,
        START_OFFSET,
        "1-0",
        {
            first: WindowTotals(sums={"calls": 3}, uniques={"users": {"u1", "u2"}}),
            third: WindowTotals(sums={"calls": 1}, maxes={"latency": 9}, uniques={"users": {"u1"}}),
            replace(first, live=False): WindowTotals(sums={"calls": 7}),
        },
    )
    assert storage.commit_rollup(commit)
    starts = [third.start, first.start + DAY, first.start]
    assert storage.read_usage_windows("acme", True, "day", starts) == [
        {"calls": 1, "latency": 9, "users": 1},
        {},
        {"calls": 3, "users": 2},
    ]
    assert storage.read_usage_windows("acme", True, "day", starts) == [
        storage.read_usage("acme", True, "day", start) for start in starts
    ]
    assert storage.read_usage_windows("acme", False, "day", [first.start]) == [{"calls": 7}]
    assert storage.read_usage_windows("acme", True, "hour", [first.start]) == [{}]
    assert storage.read_usage_windows("acme", True, "day", []) == []


def test_read_and_trim_stream(storage: Storage) -> None:
    """read_stream pages after an offset; trim_stream drops entries below an id only."""
    open_account(storage)
    shard = shard_of("acme", storage.shards)
    for index in range(3):
        assert storage.flush(Batch(shard, f"batch-{index}", f"payload-{index}".encode(), ()))
    first_two = storage.read_stream(shard, START_OFFSET, 2)
    assert [entry.fields[b"b"] for entry in first_two] == [b"payload-0", b"payload-1"]
    assert first_two[0].fields[b"i"] == b"batch-0"
    [third] = storage.read_stream(shard, first_two[1].entry_id, 10)
    assert third.fields[b"b"] == b"payload-2"
    assert storage.read_stream(shard, third.entry_id, 10) == []
    assert storage.trim_stream(shard, third.entry_id) == 2
    assert storage.stream_length(shard) == 1
    assert [entry.entry_id for entry in storage.read_stream(shard, START_OFFSET, 10)] == [third.entry_id]


def test_dead_letters_keep_the_entry_and_the_reason(storage: Storage) -> None:
    """An entry the worker cannot decode is copied aside with its id and the reason."""
    shard = shard_of("acme", storage.shards)
    assert storage.flush(Batch(shard, "batch-1", b"\x00garbage", ()))
    [entry] = storage.read_stream(shard, START_OFFSET, 10)
    token = storage.claim_shard(shard, "worker", 10_000)
    assert token is not None
    commit = RollupCommit(
        shard, token, START_OFFSET, entry.entry_id, {}, dead_letters=((entry.entry_id, "not msgpack"),)
    )
    assert storage.commit_rollup(commit)
    [dead] = dead_letters(storage, shard)
    assert dead == {
        b"b": b"\x00garbage",
        b"c": b"",
        b"i": b"batch-1",
        b"entry": entry.entry_id.encode(),
        b"reason": b"not msgpack",
    }
    assert storage.committed_offset(shard) == entry.entry_id


# -- concurrency and the asyncio request path ----------------------------------------------------------

CONCURRENT_CALLS = 200
AFFORDABLE_CALLS = 37
PRICE = 1_000


def _prepaid_account(storage: Storage) -> Plan:
    open_account(storage, credits=AFFORDABLE_CALLS * PRICE)
    return make_plan(price=PRICE, prepaid=True)


def _assert_spent_exactly(storage: Storage, decisions: list[Decision]) -> None:
    admitted = [decision for decision in decisions if decision.allowed]
    assert len(admitted) == AFFORDABLE_CALLS
    assert {decision.reason for decision in decisions if not decision.allowed} == {"insufficient_credits"}
    balance = storage.get_balance("acme")
    assert (balance.balance, balance.reserved) == (AFFORDABLE_CALLS * PRICE, AFFORDABLE_CALLS * PRICE)


def test_concurrent_admits_never_overspend(storage: Storage) -> None:
    """200 threads admitting at once against credits for exactly 37 calls admit exactly 37."""
    plan = _prepaid_account(storage)
    requests = [admit_request(storage, plan) for _ in range(CONCURRENT_CALLS)]
    start = threading.Barrier(CONCURRENT_CALLS)
    decisions: list[Decision] = [Decision(allowed=False)] * CONCURRENT_CALLS

    def call(index: int) -> None:
        start.wait()
        decisions[index] = storage.admit(requests[index])

    threads = [threading.Thread(target=call, args=(index,)) for index in range(CONCURRENT_CALLS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    _assert_spent_exactly(storage, decisions)

    settled = [settlement(r, d) for r, d in zip(requests, decisions, strict=True) if d.allowed]
    assert flush(storage, *settled)
    balance = storage.get_balance("acme")
    assert (balance.balance, balance.reserved) == (0, 0)


def test_concurrent_async_admits_never_overspend(backend: Backend) -> None:
    """200 admits gathered on one event loop against credits for exactly 37 calls admit exactly 37."""
    plan = _prepaid_account(backend.sync)
    requests = [admit_request(backend.sync, plan) for _ in range(CONCURRENT_CALLS)]

    async def admit_all() -> list[Decision]:
        storage = backend.open_async()
        try:
            return list(await asyncio.gather(*(storage.admit(request) for request in requests)))
        finally:
            await storage.aclose()

    _assert_spent_exactly(backend.sync, asyncio.run(admit_all()))


def test_async_request_path(backend: Backend) -> None:
    """The asyncio twin resolves keys, admits and flushes (idempotently) like the synchronous one."""
    open_account(backend.sync, credits=1000)
    plan = make_plan(quota=5, price=100, prepaid=True)
    request = admit_request(backend.sync, plan)

    async def run() -> None:
        storage = backend.open_async()
        try:
            info = await storage.resolve_key("hash-key-acme")
            assert info is not None
            assert (info.key_id, info.customer.id) == ("key-acme", "acme")
            assert await storage.resolve_key("hash-unknown") is None
            decision = await storage.admit(request)
            assert (decision.allowed, decision.reserved_credits) == (True, 100)
            batch = Batch(request.shard, "batch-1", b"events", (settlement(request, decision),))
            assert await storage.flush(batch)
            assert not await storage.flush(batch)
        finally:
            await storage.aclose()

    asyncio.run(run())
    balance = backend.sync.get_balance("acme")
    assert (balance.balance, balance.reserved) == (900, 0)
