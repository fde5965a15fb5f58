"""What only the Redis backend has: URLs, lazy clients, error wrapping, Sentinel and Cluster placement."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from importlib import resources

import pytest
import redis

from meterware.config import Meter, MeterTerms, Plan
from meterware.errors import StorageError
from meterware.metering.admission import AdmitRequest, meter_holds
from meterware.metering.periods import period_bounds
from meterware.metering.records import Customer, KeyRecord
from meterware.storage import open_async_storage, open_storage
from meterware.storage._keyspace import key_record, rollup_workers, shard_of
from meterware.storage.base import START_OFFSET, Batch, RollupCommit, Settlement, Window, WindowTotals
from meterware.storage.memory import AsyncMemoryStorage, MemoryStorage
from meterware.storage.redis import AsyncRedisStorage, RedisStorage, RedisTarget, parse_url, script_sources
from tests.servers import RedisClusterServers, free_port

PLAN = Plan("pro", meters={"calls": MeterTerms(quota=100, price=10)}, prepaid=True)
METERS = {"calls": Meter("calls")}


def _request(customer: str, shards: int) -> AdmitRequest:
    start, end = period_bounds(0, "month", time.time())
    return AdmitRequest(
        shard_of(customer, shards),
        customer,
        f"key-{customer}",
        True,
        PLAN,
        start,
        end,
        meter_holds(PLAN, METERS, 1, True),
        uuid.uuid4().hex,
        60_000,
    )


def _open_account(storage: RedisStorage, customer: str) -> None:
    storage.create_customer(Customer(customer, "pro"))
    storage.add_key(
        KeyRecord(f"key-{customer}", customer, "mw_live_x", True, "active", 1), f"hash-{customer}"
    )
    storage.grant_credits(customer, 1_000)


# -- URLs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "target"),
    [
        pytest.param(
            "redis://:pw@127.0.0.1:6379/2",
            RedisTarget("url", url="redis://:pw@127.0.0.1:6379/2", password="pw"),
            id="redis",
        ),
        pytest.param(
            "unix:///tmp/redis.sock?db=1", RedisTarget("url", url="unix:///tmp/redis.sock?db=1"), id="unix"
        ),
        pytest.param(
            "redis+sentinel://s1:26379,s2:26380/mymaster/3",
            RedisTarget("sentinel", hosts=(("s1", 26379), ("s2", 26380)), service="mymaster", db=3),
            id="sentinel",
        ),
        pytest.param(
            "redis+sentinel://:p%40ss@s1/cache",
            RedisTarget("sentinel", hosts=(("s1", 26379),), service="cache", password="p@ss"),
            id="sentinel-default-port-and-password",
        ),
        pytest.param(
            "redis+cluster://app:pw@n1:7000,n2:7001",
            RedisTarget("cluster", hosts=(("n1", 7000), ("n2", 7001)), username="app", password="pw"),
            id="cluster",
        ),
    ],
)
def test_parse_url(url: str, target: RedisTarget) -> None:
    """Every supported URL form parses into its target without I/O."""
    assert parse_url(url) == target


@pytest.mark.parametrize(
    ("url", "message"),
    [
        pytest.param("redis+sentinel://s1:26379", "must name the service", id="sentinel-without-service"),
        pytest.param("redis+sentinel://s1:26379/m/x", "is not a number", id="sentinel-bad-db"),
        pytest.param("redis+cluster://n1:7000/3", "cannot select a database", id="cluster-with-db"),
        pytest.param("redis+cluster://n1:port", "bad port", id="cluster-bad-port"),
        pytest.param("memcached://h:1", "not a Redis storage URL", id="other-scheme"),
    ],
)
def test_parse_url_rejects(url: str, message: str) -> None:
    """A malformed URL raises ValueError saying what is wrong."""
    with pytest.raises(ValueError, match=message):
        parse_url(url)


@pytest.mark.parametrize(
    ("url", "where"),
    [
        pytest.param("redis://user:s3cret@h:6379/0", "redis://h:6379/0", id="redis"),
        pytest.param("redis+sentinel://:s3cret@s1:1/m/2", "redis+sentinel://s1:1/m/2", id="sentinel"),
        pytest.param("redis+cluster://:s3cret@n1:7000", "redis+cluster://n1:7000", id="cluster"),
    ],
)
def test_target_is_named_without_credentials(url: str, where: str) -> None:
    """Messages name the target without its password."""
    assert parse_url(url).where == where


# -- clients -------------------------------------------------------------------------------------------


def test_scripts_ship_as_package_data() -> None:
    """Every Lua script is read from the installed package, each with the shared helpers."""
    shipped = {path.name for path in resources.files("meterware.storage").joinpath("lua").iterdir()}
    sources = script_sources()
    assert {f"{name}.lua" for name in sources} | {"common.lua"} == shipped
    assert all("local function release(" in text for text in sources.values())


def _gcra_divisions() -> list[tuple[float, float]]:
    cases = [(1.0, 0.1), (0.3, 0.1), (-1.0, 0.1), (7.0, 2.0), (0.0, 3.0)]
    for amount in (3, 7, 11, 13, 17, 1000):
        for period in (1_000, 60_000, 3_600_000):
            interval = period / amount
            tat = 0.0
            for _ in range(amount + 1):
                tat += interval
                cases.append((period - tat, interval))
    return cases


@pytest.mark.redis
def test_lua_floor_division_matches_python(redis_url: str) -> None:
    """The scripts' floor division gives Python's a // b, so GCRA replies match MemoryStorage exactly."""
    client = redis.Redis.from_url(redis_url)
    common = resources.files("meterware.storage").joinpath("lua", "common.lua").read_text()
    script = client.register_script(f"{common}\nreturn floordiv(tonumber(ARGV[1]), tonumber(ARGV[2]))")
    cases = _gcra_divisions()
    assert [script(args=[repr(a), repr(b)]) for a, b in cases] == [int(a // b) for a, b in cases]
    assert (1.0 // 0.1, math.floor(1.0 / 0.1)) == (9.0, 10)  # where the naive version would be wrong
    client.close()


@pytest.mark.parametrize(
    "url",
    ["redis://127.0.0.1:{port}/0", "redis+cluster://127.0.0.1:{port}", "redis+sentinel://127.0.0.1:{port}/m"],
)
def test_nothing_connects_before_the_first_call(url: str) -> None:
    """Opening a storage on a port nobody listens on succeeds: connections are made on first use."""
    closed = url.format(port=free_port())
    RedisStorage(closed, shards=4).close()
    assert isinstance(open_async_storage(closed, shards=4), AsyncRedisStorage)


@pytest.mark.parametrize(
    "url", ["redis://:s3cret@127.0.0.1:{port}/0", "redis+cluster://:s3cret@127.0.0.1:{port}"]
)
def test_unreachable_redis_raises_one_storage_error(url: str) -> None:
    """Every driver failure surfaces as StorageError with a one-line message and no password."""
    storage = RedisStorage(url.format(port=free_port()), shards=4, timeout=0.5)
    with pytest.raises(StorageError) as caught:
        storage.get_balance("acme")
    message = str(caught.value)
    assert message.startswith("Redis at ")
    assert "s3cret" not in message
    assert "\n" not in message
    storage.close()


@pytest.mark.redis
def test_driver_errors_never_show_the_password(redis_url: str) -> None:
    """A refused password (the server has none) is reported without the password it was given."""
    url = redis_url.replace("redis://", "redis://someone:s3cret@")
    storage = RedisStorage(url, shards=4, timeout=1.0)
    with pytest.raises(StorageError) as caught:
        storage.get_customer("acme")
    assert "s3cret" not in str(caught.value)
    assert isinstance(caught.value.__cause__, redis.RedisError)
    storage.close()

    async def resolve() -> None:
        async_storage = AsyncRedisStorage(url, shards=4, timeout=1.0)
        try:
            with pytest.raises(StorageError) as caught:
                await async_storage.resolve_key("hash")
            assert "s3cret" not in str(caught.value)
        finally:
            await async_storage.aclose()

    asyncio.run(resolve())


@pytest.mark.redis
def test_request_path_client_fails_fast(redis_url: str) -> None:
    """The client uses the given timeout for connecting and reading, and never retries."""
    storage = RedisStorage(redis_url, shards=4, timeout=0.25)
    assert storage.get_customer("acme") is None
    client = storage._client
    assert isinstance(client, redis.Redis)
    options = client.connection_pool.connection_kwargs
    assert (options["socket_timeout"], options["socket_connect_timeout"]) == (0.25, 0.25)
    retry = client.get_retry()
    assert retry is not None
    assert retry.get_retries() == 0
    storage.close()


@pytest.mark.redis
def test_async_storage_follows_the_running_loop(redis_url: str) -> None:
    """One asyncio storage made outside any loop works from successive event loops."""
    sync = RedisStorage(redis_url, shards=4)
    _open_account(sync, "acme")
    sync.close()
    storage = AsyncRedisStorage(redis_url, shards=4, timeout=1.0)

    async def resolve() -> str | None:
        info = await storage.resolve_key("hash-acme")
        await storage.aclose()
        return info.customer.id if info else None

    assert asyncio.run(resolve()) == "acme"
    assert asyncio.run(resolve()) == "acme"


# -- open_storage --------------------------------------------------------------------------------------


def test_memory_storage_is_shared_per_url_and_shards() -> None:
    """memory:// gives the synchronous and asyncio sides of a process the same store."""
    url = f"memory://{uuid.uuid4().hex}"
    sync = open_storage(url, shards=4)
    async_side = open_async_storage(url, shards=4)
    assert isinstance(sync, MemoryStorage)
    assert isinstance(async_side, AsyncMemoryStorage)
    assert async_side.sync is sync
    assert open_storage(url, shards=4) is sync
    assert open_storage(url, shards=8) is not sync
    assert open_storage(f"{url}-other", shards=4) is not sync


def test_open_storage_picks_the_backend_by_scheme() -> None:
    """Redis URLs open the Redis twins (without I/O); unknown schemes raise ValueError."""
    assert isinstance(open_storage("redis://127.0.0.1:1/0", shards=4, timeout=0.1), RedisStorage)
    assert isinstance(open_async_storage("rediss://127.0.0.1:1/0", shards=4), AsyncRedisStorage)
    with pytest.raises(ValueError, match="storage URL: unknown scheme"):
        open_storage("postgres://db", shards=4)


# -- Sentinel and Cluster ------------------------------------------------------------------------------


@pytest.mark.redis
def test_sentinel_finds_the_master(sentinel_url: str, redis_url: str) -> None:
    """Through redis+sentinel:// both twins reach the master the sentinel names."""
    storage = RedisStorage(sentinel_url, shards=4, timeout=1.0)
    _open_account(storage, "acme")
    request = _request("acme", 4)
    decision = storage.admit(request)
    assert decision.allowed

    async def resolve_and_admit() -> bool:
        async_storage = AsyncRedisStorage(sentinel_url, shards=4, timeout=1.0)
        try:
            assert await async_storage.resolve_key("hash-acme") is not None
            return (await async_storage.admit(_request("acme", 4))).allowed
        finally:
            await async_storage.aclose()

    assert asyncio.run(resolve_and_admit())
    storage.close()
    direct = RedisStorage(redis_url, shards=4)
    assert direct.get_balance("acme").reserved == 20
    direct.close()


@pytest.mark.redis
def test_cluster_spreads_shards_over_nodes(
    cluster_url: str, redis_cluster_servers: RedisClusterServers
) -> None:
    """Customers of different shards live on different cluster nodes, and each one's calls still work."""
    shards = 16
    storage = RedisStorage(cluster_url, shards=shards, timeout=2.0)
    customers = [f"customer-{index}" for index in range(32)]
    for customer in customers:
        _open_account(storage, customer)
        request = _request(customer, shards)
        decision = storage.admit(request)
        assert decision.allowed
        settlement = Settlement(customer, True, request.period_start, decision.reservation_id, True, True,
                                (("calls", 1, 10, 0),))  # fmt: skip
        assert storage.flush(Batch(request.shard, uuid.uuid4().hex, b"events", (settlement,)))
        token = storage.claim_shard(request.shard, f"worker-{customer}", 10_000)
        window = Window(True, customer, "day", 0)
        offset = storage.committed_offset(request.shard)
        commit = RollupCommit(request.shard, token or 0, offset, f"{time.time_ns()}-0",
                              {window: WindowTotals(sums={"calls": 1})})  # fmt: skip
        assert storage.commit_rollup(commit)
        storage.release_shard(request.shard, f"worker-{customer}")
        assert storage.read_usage(customer, True, "day", 0) == {"calls": 1}
        assert storage.get_balance(customer).balance == 990
    assert storage.list_customers() == sorted(customers)

    nodes_by_customer: dict[str, set[int]] = {}
    for node in redis_cluster_servers.nodes:
        client = redis.Redis(port=node.port)
        for key in client.scan_iter(match="mw:*:c:*"):
            nodes_by_customer.setdefault(key.decode().rsplit(":", 1)[1], set()).add(node.port)
        client.close()
    assert set(nodes_by_customer) == set(customers)
    assert all(len(ports) == 1 for ports in nodes_by_customer.values())
    assert len(set().union(*nodes_by_customer.values())) > 1
    assert storage.committed_offset(shard_of(customers[0], shards)) != START_OFFSET
    storage.close()


@pytest.mark.redis
@pytest.mark.parametrize("where", ["redis", "cluster"])
def test_record_key_use_never_recreates_a_deleted_record(request: pytest.FixtureRequest, where: str) -> None:
    """A key whose record is gone (its id still pointing at its customer) is not recorded back into
    existence; the script is loaded again where a node forgot it (SCRIPT FLUSH), in one call."""
    url = request.getfixturevalue("redis_url" if where == "redis" else "cluster_url")
    storage = RedisStorage(url, shards=8, timeout=2.0)
    customers = [f"customer-{index}" for index in range(8)]
    for customer in customers:
        _open_account(storage, customer)
    gone = key_record(shard_of("customer-0", 8), "key-customer-0")
    if where == "redis":
        nodes = [redis.Redis.from_url(url)]
        data: redis.Redis | redis.RedisCluster = nodes[0]
    else:
        ports = [node.port for node in request.getfixturevalue("redis_cluster_servers").nodes]
        nodes = [redis.Redis(port=port) for port in ports]
        data = redis.RedisCluster(host="127.0.0.1", port=ports[0])
    data.delete(gone)
    for client in nodes:
        client.script_flush()
    storage.record_key_use({f"key-{customer}": 77 for customer in customers})
    assert storage.get_key("key-customer-0") is None
    assert not data.exists(gone)
    for customer in customers[1:]:
        assert storage.list_keys(customer)[0].last_used_ms == 77
    for client in nodes:
        client.close()
    data.close()
    storage.close()


@pytest.mark.redis
def test_rollup_workers_key_expires_with_its_last_heartbeat(redis_url: str) -> None:
    """The live workers' set lives as long as its latest heartbeat, and a key of another type is named."""
    storage = RedisStorage(redis_url, shards=8, timeout=2.0)
    client = redis.Redis.from_url(redis_url)
    storage.rollup_heartbeat("worker-a", 60_000)
    storage.rollup_heartbeat("worker-b", 5_000)
    assert 55_000 < client.pttl(rollup_workers()) <= 60_000
    storage.rollup_leave("worker-a")
    storage.rollup_leave("worker-b")
    assert not client.exists(rollup_workers())
    client.set(rollup_workers(), "junk")
    with pytest.raises(StorageError, match=f"WRONGTYPE {rollup_workers()} holds a string"):
        storage.rollup_heartbeat("worker-a", 60_000)
    client.close()
    storage.close()
