"""Every writing operation is all or nothing: one that cannot complete raises and changes nothing.

Redis keeps the writes a script made before a command of it fails, so the scripts check every key's type
and every counter's range before their first write (and Redis refuses them up front when out of memory).
These tests break one key or one value at a time, under every writing script, and compare a full dump of
the database before and after the failed call.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import pytest
import redis
import redis.cluster

from meterware.config import Meter, MeterTerms, Plan, RateLimit
from meterware.errors import StorageError
from meterware.metering.admission import AdmitRequest, Decision, meter_holds
from meterware.metering.periods import period_bounds
from meterware.metering.records import Customer, KeyRecord
from meterware.storage import _keyspace as ks
from meterware.storage.base import Balance, Batch, RollupCommit, Settlement, Storage, Window, WindowTotals
from meterware.storage.redis import RedisStorage, script_sources
from tests.servers import RedisClusterServers, RedisServer, redis_server

SHARDS = 8
ACME = "acme"
SHARD = ks.shard_of(ACME, SHARDS)
NEWCO = "newco"
METERS = {"calls": Meter("calls")}
PLAN = Plan(
    "pro",
    rate_limits=(RateLimit(5, 60), RateLimit(100, 3600)),
    prepaid=True,
    meters={"calls": MeterTerms(quota=10, price=100)},
)
WINDOW = Window(True, ACME, "day", 1_772_323_200)
TOTALS = WindowTotals(
    sums={"calls": 1}, maxes={"latency": 900}, lasts={"level": (2_000, 4)}, uniques={"users": {"u2"}}, ttl=0
)
Snapshot = dict[bytes, tuple[bytes | str, bytes | None, bool]]


def admit_request(storage: Storage, *, plan: Plan = PLAN, key_id: str = "key-acme", timeout_ms: int = 60_000
                  ) -> AdmitRequest:  # fmt: skip
    start, end = period_bounds(0, plan.period, time.time())
    holds = meter_holds(plan, METERS, 1, True)
    return AdmitRequest(SHARD, ACME, key_id, True, plan, start, end, holds, uuid.uuid4().hex, timeout_ms)


def settlement(request: AdmitRequest, decision: Decision) -> Settlement:
    meters = tuple((hold.meter, hold.hold, hold.price, hold.included) for hold in request.holds)
    return Settlement(ACME, True, request.period_start, decision.reservation_id, True, True, meters)


def quota_key() -> str:
    return ks.quota(SHARD, True, ACME, period_bounds(0, "month", time.time())[0])


@dataclass
class World:
    """A shard in use: an account, an open and a due reservation, a stream, a shard claim and a rollup."""

    storage: RedisStorage
    open_request: AdmitRequest
    open_decision: Decision
    due_id: str
    token: int
    committed: str
    pending: str


def build_world(storage: RedisStorage) -> World:
    storage.create_customer(Customer(ACME, "pro"))
    storage.add_key(KeyRecord("key-acme", ACME, "mw_live_ab12", True, "active", 1), "hash-acme")
    storage.grant_credits(ACME, 10_000)
    open_request = admit_request(storage)
    open_decision = storage.admit(open_request)
    due = storage.admit(admit_request(storage, timeout_ms=1))
    assert open_decision.allowed
    assert due.allowed
    assert storage.flush(Batch(SHARD, "batch-0", b"events-0", (None,)))
    token = storage.claim_shard(SHARD, "worker", 60_000)
    assert token is not None
    [first] = storage.read_stream(SHARD, "0-0", 10)
    totals = WindowTotals(sums={"calls": 2}, maxes={"latency": 50}, lasts={"level": (1_000, 3)},
                          uniques={"users": {"u1"}})  # fmt: skip
    assert storage.commit_rollup(RollupCommit(SHARD, token, "0-0", first.entry_id, {WINDOW: totals}))
    assert storage.flush(Batch(SHARD, "batch-1", b"events-1", (None,)))
    [pending] = storage.read_stream(SHARD, first.entry_id, 10)
    time.sleep(0.01)  # the second reservation's deadline passes
    return World(storage, open_request, open_decision, due.reservation_id, token, first.entry_id,
                 pending.entry_id)  # fmt: skip


# What each operation calls, by name: every writing script, through the storage API.
OPERATIONS: dict[str, Callable[[World], object]] = {
    "admit": lambda w: w.storage.admit(admit_request(w.storage)),
    # Under a spend cap the admission also reads what the period was charged (the quota hash's @spent).
    "admit_capped": lambda w: w.storage.admit(replace(admit_request(w.storage), spend_cap=1_000_000)),
    "flush": lambda w: w.storage.flush(
        Batch(SHARD, "batch-2", b"events-2", (settlement(w.open_request, w.open_decision), None))
    ),
    "commit": lambda w: w.storage.commit_rollup(
        RollupCommit(SHARD, w.token, w.committed, w.pending, {WINDOW: TOTALS}, ((w.pending, "bad"),))
    ),
    "expire_reservations": lambda w: w.storage.expire_reservations(SHARD, 100),
    "claim_shard": lambda w: w.storage.claim_shard(SHARD, "worker", 60_000),
    "release_shard": lambda w: w.storage.release_shard(SHARD, "worker"),
    "create_customer": lambda w: w.storage.create_customer(Customer(NEWCO, "pro")),
    "add_key": lambda w: w.storage.add_key(
        KeyRecord("key-2", ACME, "mw_live_cd34", True, "active", 2), "hash-2"
    ),
    "update_customer": lambda w: w.storage.update_customer(ACME, plan="max"),
    "set_key_state": lambda w: w.storage.set_key_state("key-acme", status="revoked"),
    "grant_credits": lambda w: w.storage.grant_credits(ACME, 500),
}

_USAGE = ks.usage(SHARD, True, ACME, "day", WINDOW.start)
# (operation, key position, its key, the type the script expects there)
KEY_POSITIONS: list[tuple[str, str, Callable[[], str], str]] = [
    ("admit", "key-record", lambda: ks.key_record(SHARD, "key-acme"), "hash"),
    ("admit", "customer", lambda: ks.customer(SHARD, ACME), "hash"),
    ("admit", "quota", quota_key, "hash"),
    ("admit", "reservations", lambda: ks.reservations(SHARD), "hash"),
    ("admit", "deadlines", lambda: ks.reservation_deadlines(SHARD), "zset"),
    ("admit", "rate-60s", lambda: ks.rate(SHARD, True, ACME, 60), "string"),
    ("admit", "rate-3600s", lambda: ks.rate(SHARD, True, ACME, 3600), "string"),
    ("flush", "batch-marker", lambda: ks.flushed_batch(SHARD, "batch-2"), "string"),
    ("flush", "events", lambda: ks.events(SHARD), "stream"),
    ("flush", "reservations", lambda: ks.reservations(SHARD), "hash"),
    ("flush", "deadlines", lambda: ks.reservation_deadlines(SHARD), "zset"),
    ("flush", "customer", lambda: ks.customer(SHARD, ACME), "hash"),
    ("flush", "quota", quota_key, "hash"),
    ("commit", "fence", lambda: ks.fence(SHARD), "string"),
    ("commit", "offset", lambda: ks.offset(SHARD), "string"),
    ("commit", "events", lambda: ks.events(SHARD), "stream"),
    ("commit", "dead-letters", lambda: ks.dead_letters(SHARD), "stream"),
    ("commit", "usage", lambda: _USAGE, "hash"),
    (
        "commit",
        "unique-values",
        lambda: ks.unique_values(SHARD, True, ACME, "day", WINDOW.start, "users"),
        "set",
    ),
    ("expire_reservations", "reservations", lambda: ks.reservations(SHARD), "hash"),
    ("expire_reservations", "deadlines", lambda: ks.reservation_deadlines(SHARD), "zset"),
    ("expire_reservations", "customer", lambda: ks.customer(SHARD, ACME), "hash"),
    ("expire_reservations", "quota", quota_key, "hash"),
    ("claim_shard", "claim", lambda: ks.shard_claim(SHARD), "string"),
    ("claim_shard", "fence", lambda: ks.fence(SHARD), "string"),
    ("release_shard", "claim", lambda: ks.shard_claim(SHARD), "string"),
    ("create_customer", "customer", lambda: ks.customer(ks.shard_of(NEWCO, SHARDS), NEWCO), "hash"),
    ("create_customer", "customer-set", lambda: ks.customers(ks.shard_of(NEWCO, SHARDS)), "set"),
    ("add_key", "customer", lambda: ks.customer(SHARD, ACME), "hash"),
    ("add_key", "key-record", lambda: ks.key_record(SHARD, "key-2"), "hash"),
    ("add_key", "key-list", lambda: ks.customer_keys(SHARD, ACME), "list"),
    ("update_customer", "customer", lambda: ks.customer(SHARD, ACME), "hash"),
    ("set_key_state", "key-record", lambda: ks.key_record(SHARD, "key-acme"), "hash"),
    ("grant_credits", "customer", lambda: ks.customer(SHARD, ACME), "hash"),
]

# (operation, what is wrong, the hash and field, the text put there)
BAD_VALUES: list[tuple[str, str, Callable[[], str], str, str]] = [
    ("admit", "held-units-not-an-integer", quota_key, "calls:h", "1.5"),
    ("admit", "reserved-not-an-integer", lambda: ks.customer(SHARD, ACME), "reserved", "abc"),
    ("admit", "reserved-beyond-2^62", lambda: ks.customer(SHARD, ACME), "reserved", str(-(2**62))),
    ("admit_capped", "spent-not-an-integer", quota_key, "@spent", "1.5"),
    ("flush", "used-units-not-an-integer", quota_key, "calls:u", "x"),
    ("flush", "spent-not-an-integer", quota_key, "@spent", "x"),
    ("flush", "spent-beyond-2^62", quota_key, "@spent", str(2**62 - 50)),
    ("flush", "held-units-leading-zero", quota_key, "calls:h", "01"),
    ("flush", "balance-at-int64-min", lambda: ks.customer(SHARD, ACME), "balance", str(-(2**63))),
    ("flush", "reservation-record", lambda: ks.reservations(SHARD), "{open}", "acme 1 0 x"),
    ("commit", "sum-not-an-integer", lambda: _USAGE, "s:calls", "two"),
    ("commit", "sum-near-int64-max", lambda: _USAGE, "s:calls", str(2**63 - 2)),
    ("commit", "max-not-a-number", lambda: _USAGE, "m:latency", "high"),
    ("commit", "last-stamp-nan", lambda: _USAGE, "t:level", "nan"),
    ("expire_reservations", "reserved-not-an-integer", lambda: ks.customer(SHARD, ACME), "reserved", "-"),
    ("expire_reservations", "reservation-record", lambda: ks.reservations(SHARD), "{due}", "garbage"),
    ("grant_credits", "balance-not-an-integer", lambda: ks.customer(SHARD, ACME), "balance", "1e3"),
    ("grant_credits", "balance-at-int64-max", lambda: ks.customer(SHARD, ACME), "balance", str(2**63 - 1)),
]


@dataclass
class Database:
    """A real Redis (one node or a cluster): a client to break keys with and one per node to dump them."""

    url: str
    writer: redis.Redis | redis.cluster.RedisCluster
    nodes: list[redis.Redis]

    def snapshot(self) -> Snapshot:
        """Every key: its type, its DUMP and whether it expires."""
        found: Snapshot = {}
        for node in self.nodes:
            for key in node.scan_iter(count=1000):
                found[key] = (node.type(key), node.dump(key), node.pttl(key) >= 0)
        return found


@pytest.fixture(params=["redis", "cluster"])
def database(request: pytest.FixtureRequest) -> Iterator[Database]:
    """An empty real redis-server, then an empty real 3-node cluster."""
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        writer: redis.Redis | redis.cluster.RedisCluster = redis.Redis.from_url(url)
        nodes = [redis.Redis.from_url(url)]
    else:
        url = request.getfixturevalue("cluster_url")
        servers: RedisClusterServers = request.getfixturevalue("redis_cluster_servers")
        port = servers.nodes[0].port
        writer = redis.cluster.RedisCluster(host="127.0.0.1", port=port)
        nodes = [redis.Redis(port=node.port) for node in servers.nodes]
    yield Database(url, writer, nodes)
    writer.close()
    for node in nodes:
        node.close()


@pytest.fixture
def world(database: Database) -> Iterator[World]:
    """The busy shard, on each database in turn."""
    storage = RedisStorage(database.url, shards=SHARDS, timeout=2.0)
    yield build_world(storage)
    storage.close()


def _break_type(writer: redis.Redis | redis.cluster.RedisCluster, key: str, expected: str) -> None:
    writer.delete(key)
    if expected == "string":
        writer.rpush(key, "not a string")
    else:
        writer.set(key, f"not a {expected}")


@pytest.mark.redis
@pytest.mark.parametrize(
    ("operation", "make_key", "expected"),
    [pytest.param(op, key, kind, id=f"{op}-{where}") for op, where, key, kind in KEY_POSITIONS],
)
def test_a_wrongly_typed_key_fails_the_call_and_changes_nothing(
    database: Database, world: World, operation: str, make_key: Callable[[], str], expected: str
) -> None:
    """A key of the wrong type makes the call raise StorageError naming it, and no key changes."""
    key = make_key()
    saved = database.writer.dump(key)
    _break_type(database.writer, key, expected)
    before = database.snapshot()
    with pytest.raises(StorageError, match="WRONGTYPE") as caught:
        OPERATIONS[operation](world)
    assert database.snapshot() == before
    message = str(caught.value)
    assert f"{key} holds a " in message
    assert "\n" not in message
    # Once the key is mended, the same call goes through.
    database.writer.delete(key)
    if saved is not None:
        database.writer.restore(key, 0, saved)
    OPERATIONS[operation](world)


@pytest.mark.redis
@pytest.mark.parametrize(
    ("operation", "make_key", "field", "value"),
    [pytest.param(op, key, field, value, id=f"{op}-{what}") for op, what, key, field, value in BAD_VALUES],
)
def test_a_counter_that_cannot_move_fails_the_call_and_changes_nothing(
    database: Database, world: World, operation: str, make_key: Callable[[], str], field: str, value: str
) -> None:
    """A counter HINCRBY would choke on (not an integer, or pushed past 2**62) fails the call whole."""
    key = make_key()
    field = field.format(open=world.open_decision.reservation_id, due=world.due_id)
    database.writer.hset(key, field, value)
    before = database.snapshot()
    with pytest.raises(StorageError, match="BADVALUE") as caught:
        OPERATIONS[operation](world)
    assert database.snapshot() == before
    assert f"{key} field {field} " in str(caught.value)


# -- out of memory -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_redis() -> Iterator[RedisServer]:
    """A redis-server of its own whose memory limit the tests lower below what it holds."""
    with redis_server("--maxmemory-policy", "noeviction") as server:
        yield server


def _fill(client: redis.Redis) -> None:
    """Fill the server until writes fail, then set its limit under what it holds (writes keep failing)."""
    client.config_set("maxmemory", int(client.info("memory")["used_memory"]) + 2_000_000)
    for index in range(100_000):
        try:
            client.set(f"fill:{index}", "x" * 10_000)
        except redis.exceptions.OutOfMemoryError:
            break
    else:
        pytest.fail("the server never ran out of memory")
    client.config_set("maxmemory", int(client.info("memory")["used_memory"]) - 500_000)
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        client.set("one-more", "x")


OOM_OPERATIONS = {
    **{name: OPERATIONS[name] for name in ("admit", "flush", "commit", "expire_reservations")},
    # Refused before it runs: an old-style script would have answered this without writing.
    "admit-unknown-key": lambda w: w.storage.admit(admit_request(w.storage, key_id="key-unknown")),
    "claim_shard": OPERATIONS["claim_shard"],
    "grant_credits": OPERATIONS["grant_credits"],
}


@pytest.mark.redis
@pytest.mark.parametrize("operation", list(OOM_OPERATIONS))
def test_out_of_memory_refuses_the_whole_script(small_redis: RedisServer, operation: str) -> None:
    """Past maxmemory, a writing script is refused before it runs: StorageError, no key changes."""
    client = redis.Redis(port=small_redis.port)
    client.config_set("maxmemory", 0)
    client.flushall()
    storage = RedisStorage(small_redis.url, shards=SHARDS, timeout=2.0)
    try:
        world = build_world(storage)
        _fill(client)
        keys = list(client.scan_iter(match="mw:*"))
        before = {key: (client.dump(key), client.pttl(key) >= 0) for key in keys}
        with pytest.raises(StorageError, match="maxmemory"):
            OOM_OPERATIONS[operation](world)
        assert sorted(client.scan_iter(match="mw:*")) == sorted(keys)
        assert {key: (client.dump(key), client.pttl(key) >= 0) for key in keys} == before
        # With memory back, the refused call goes through, once.
        client.config_set("maxmemory", 0)
        OOM_OPERATIONS[operation](world)
        if operation == "flush":
            assert storage.get_balance(ACME).balance == 10_000 - 100
            assert not OOM_OPERATIONS[operation](world)
            assert storage.get_balance(ACME).balance == 10_000 - 100
    finally:
        client.config_set("maxmemory", 0)
        client.close()
        storage.close()


# -- the script texts --------------------------------------------------------------------------------


def test_every_script_declares_its_flags_first() -> None:
    """Each script starts with a #!lua line (no allow-oom), then the shared helpers, then its body."""
    for name, text in script_sources().items():
        first, _, rest = text.partition("\n")
        assert first.startswith("#!lua"), name
        assert "allow-oom" not in first, name
        assert rest.startswith("-- Shared helpers"), name


# -- every backend -----------------------------------------------------------------------------------


def _account(storage: Storage) -> None:
    storage.create_customer(Customer(ACME, "pro"))
    storage.add_key(KeyRecord("key-acme", ACME, "mw_live_ab12", True, "active", 1), "hash-acme")
    storage.grant_credits(ACME, 10_000)


def test_a_rate_finer_than_the_clock_still_admits(storage: Storage) -> None:
    """A rate limit whose interval rounds away against now admits, and keeps the other limits' state."""
    _account(storage)
    plan = Plan("fast", rate_limits=(RateLimit(5, 60), RateLimit(10**9, 1)))
    decisions = [storage.admit(admit_request(storage, plan=plan)) for _ in range(6)]
    assert [decision.allowed for decision in decisions] == [True] * 5 + [False]
    assert decisions[-1].reason == "rate_limited"


def test_a_flush_that_cannot_be_sent_changes_nothing(storage: Storage) -> None:
    """A batch whose id cannot be encoded raises on every backend, and settles nothing."""
    _account(storage)
    request = admit_request(storage)
    decision = storage.admit(request)
    batch = Batch(SHARD, "batch-\udc80", b"events", (settlement(request, decision),))
    with pytest.raises(UnicodeEncodeError):
        storage.flush(batch)
    assert storage.get_balance(ACME) == Balance(10_000, 100)
    assert storage.stream_length(SHARD) == 0
    assert storage.flush(Batch(SHARD, "batch-1", b"events", (settlement(request, decision),)))
    assert storage.get_balance(ACME).balance == 10_000 - 100


def test_a_commit_that_cannot_be_sent_changes_nothing(storage: Storage) -> None:
    """A dead-letter reason that cannot be encoded raises on every backend, and commits nothing."""
    assert storage.flush(Batch(SHARD, "batch-0", b"events", ()))
    [entry] = storage.read_stream(SHARD, "0-0", 10)
    token = storage.claim_shard(SHARD, "worker", 60_000)
    assert token is not None
    dead = ((entry.entry_id, "bad \udc80"),)
    with pytest.raises(UnicodeEncodeError):
        storage.commit_rollup(RollupCommit(SHARD, token, "0-0", entry.entry_id, {WINDOW: TOTALS}, dead))
    assert storage.read_usage(ACME, True, "day", WINDOW.start) == {}
    assert storage.committed_offset(SHARD) == "0-0"


@pytest.mark.parametrize("ttl_ms", [0, -5])
def test_a_claim_shorter_than_a_millisecond_is_refused(storage: Storage, ttl_ms: int) -> None:
    """claim_shard refuses a ttl under 1 ms with ValueError on every backend, taking no token."""
    with pytest.raises(ValueError, match="at least 1 ms"):
        storage.claim_shard(SHARD, "worker", ttl_ms)
    assert storage.claim_shard(SHARD, "worker", 60_000) == 1
