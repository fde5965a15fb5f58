"""Concurrent admissions share round trips to Redis, and each call is still decided on its own."""

from __future__ import annotations

import asyncio
import threading

import pytest
import redis

from meterware.config import Plan, RateLimit
from meterware.errors import StorageError
from meterware.metering.admission import AdmitRequest, Decision
from meterware.storage import _keyspace as ks
from meterware.storage.redis import AsyncRedisStorage, RedisStorage
from meterware.storage.redis._scripts import as_str
from tests.storage.conftest import SHARDS, TIMEOUT
from tests.storage.test_contract import admit_request, make_plan, open_account

pytestmark = pytest.mark.redis

CALLS = 60


def _script_runs(url: str) -> int:
    stats = redis.Redis.from_url(url).info("commandstats")
    return sum(int(stats.get(name, {}).get("calls", 0)) for name in ("cmdstat_evalsha", "cmdstat_eval"))


def _admit_all(url: str, requests: list[AdmitRequest]) -> list[Decision | BaseException]:
    async def run() -> list[Decision | BaseException]:
        storage = AsyncRedisStorage(url, shards=SHARDS, timeout=TIMEOUT)
        try:
            calls = (storage.admit(request) for request in requests)
            return list(await asyncio.gather(*calls, return_exceptions=True))
        finally:
            await storage.aclose()

    return asyncio.run(run())


@pytest.fixture
def sync_storage(redis_url: str) -> RedisStorage:
    redis.Redis.from_url(redis_url).flushall()
    return RedisStorage(redis_url, shards=SHARDS, timeout=TIMEOUT)


def test_concurrent_admissions_share_round_trips(redis_url: str, sync_storage: RedisStorage) -> None:
    """60 concurrent admissions of two customers take a handful of script runs, not 60."""
    for customer in ("acme", "globex"):
        open_account(sync_storage, customer, credits=10_000)
    plan = make_plan(quota=1_000, price=10, prepaid=True)
    requests = [admit_request(sync_storage, plan, ("acme", "globex")[i % 2]) for i in range(CALLS)]
    redis.Redis.from_url(redis_url).config_resetstat()

    decisions = _admit_all(redis_url, requests)

    assert all(isinstance(d, Decision) and d.allowed for d in decisions)
    runs = _script_runs(redis_url)
    assert runs <= 6, f"{runs} script runs for {CALLS} concurrent admissions"
    for customer in ("acme", "globex"):
        assert sync_storage.get_balance(customer).reserved == CALLS // 2 * 10


def test_a_garbage_key_refuses_only_its_own_call(redis_url: str, sync_storage: RedisStorage) -> None:
    """A call whose quota key holds garbage is refused alone; the calls admitted with it are unharmed."""
    for customer in ("acme", "globex"):
        open_account(sync_storage, customer, credits=10_000)
    plan = make_plan(quota=1_000, price=10, prepaid=True)
    good = [admit_request(sync_storage, plan, "acme") for _ in range(5)]
    bad = admit_request(sync_storage, plan, "globex")
    quota_key = ks.quota(bad.shard, True, "globex", bad.period_start)
    redis.Redis.from_url(redis_url).set(quota_key, "garbage")

    decisions = _admit_all(redis_url, [*good[:2], bad, *good[2:]])

    refused = decisions[2]
    assert isinstance(refused, StorageError)
    assert refused.refused
    assert "WRONGTYPE" in str(refused)
    assert quota_key in str(refused)
    assert [isinstance(d, Decision) and d.allowed for d in decisions[:2] + decisions[3:]] == [True] * 5
    assert sync_storage.get_balance("acme").reserved == 50
    assert sync_storage.get_balance("globex").reserved == 0


def test_an_unreachable_redis_fails_every_waiting_call(sync_storage: RedisStorage) -> None:
    """With Redis unreachable, each waiting call gets its own StorageError (none hangs)."""
    plan = make_plan(quota=1_000)
    requests = [admit_request(sync_storage, plan, f"c{i}") for i in range(10)]

    decisions = _admit_all("redis://127.0.0.1:1/0", requests)

    assert all(isinstance(d, StorageError) and not d.refused for d in decisions)
    assert len({id(d) for d in decisions}) == len(decisions)


def test_calls_arriving_as_rounds_end_are_never_stranded(redis_url: str, sync_storage: RedisStorage) -> None:
    """Three callers sending bursts (each as its last one ends, so often as a round ends) are all
    admitted promptly: no call waits for a round that never starts."""
    open_account(sync_storage, "acme", credits=10_000_000)
    plan = make_plan(quota=100_000, price=1, prepaid=True)
    bursts = 100

    async def run() -> int:
        storage = AsyncRedisStorage(redis_url, shards=SHARDS, timeout=TIMEOUT)

        async def caller(offset: int) -> int:
            admitted = 0
            for burst in range(bursts):
                calls = [
                    storage.admit(admit_request(sync_storage, plan)) for _ in range(1 + (burst + offset) % 3)
                ]
                decisions = await asyncio.wait_for(asyncio.gather(*calls), timeout=2)
                admitted += sum(decision.allowed for decision in decisions)
            return admitted

        try:
            return sum(await asyncio.gather(*(caller(offset) for offset in range(3))))
        finally:
            await storage.aclose()

    assert asyncio.run(run()) == sum(
        1 + (burst + offset) % 3 for burst in range(bursts) for offset in range(3)
    )


@pytest.mark.parametrize(
    ("plan", "credits"),
    [
        pytest.param(make_plan(rates=(RateLimit(5, 60),), price=1), 0, id="rate-limit"),
        pytest.param(make_plan(quota=7), 0, id="hard-quota"),
        pytest.param(make_plan(price=10, prepaid=True), 60, id="credits"),
        pytest.param(
            make_plan(rates=(RateLimit(10, 60),), quota=8, price=10, included=2, prepaid=True), 55, id="all"
        ),
    ],
)
def test_one_run_decides_as_calls_one_by_one(
    redis_url: str, sync_storage: RedisStorage, plan: Plan, credits: int
) -> None:
    """A script run admitting 12 calls of a customer, past its limits, decides each call and leaves
    the customer's counters exactly as 12 runs of one call each do (the run keeps what its earlier calls
    admitted, and writes once at its end)."""
    client = redis.Redis.from_url(redis_url)
    together = [admit_request(sync_storage, plan, "acme") for _ in range(12)]
    alone = [admit_request(sync_storage, plan, "globex") for _ in range(12)]
    for customer in ("acme", "globex"):
        open_account(sync_storage, customer, credits=credits)
    client.config_resetstat()

    in_one_run = _admit_all(redis_url, together)
    assert _script_runs(redis_url) == 1
    one_by_one = [sync_storage.admit(request) for request in alone]

    def seen(decision: Decision | BaseException) -> tuple[object, ...]:
        assert isinstance(decision, Decision)
        remaining = [(limit.name, limit.remaining) for limit in decision.limits]
        return (
            decision.allowed,
            decision.reason,
            decision.reserved_credits,
            decision.available_credits,
            remaining,
        )

    assert [seen(d) for d in in_one_run] == [seen(d) for d in one_by_one]
    assert any(isinstance(d, Decision) and not d.allowed for d in in_one_run) or plan.prepaid is False
    acme, globex = sync_storage.get_balance("acme"), sync_storage.get_balance("globex")
    assert (acme.balance, acme.reserved) == (globex.balance, globex.reserved)
    period = together[0].period_start
    acme_quota, globex_quota = (
        client.hgetall(ks.quota(request.shard, True, request.customer, period))
        for request in (together[0], alone[0])
    )
    assert acme_quota == globex_quota
    reserving = {
        request.reservation_id
        for request, decision in zip(together, in_one_run, strict=True)
        if isinstance(decision, Decision) and decision.reservation_id
    }
    shard = together[0].shard
    assert {as_str(field) for field in client.hkeys(ks.reservations(shard))} >= reserving
    deadlines: list[bytes] = client.zrange(ks.reservation_deadlines(shard), 0, -1)  # type: ignore[assignment]
    assert {member.decode() for member in deadlines} >= reserving


def _admit_from_threads(storage: RedisStorage, requests: list[AdmitRequest], threads: int) -> list[object]:
    """Admit ``requests`` from ``threads`` threads at once (as a threaded WSGI server does)."""
    outcomes: list[object] = [None] * len(requests)

    def admit_share(first: int) -> None:
        for index in range(first, len(requests), threads):
            try:
                outcomes[index] = storage.admit(requests[index])
            except StorageError as error:
                outcomes[index] = error

    workers = [threading.Thread(target=admit_share, args=(first,)) for first in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)
        assert not worker.is_alive(), "an admission never returned"
    return outcomes


def test_threads_share_round_trips_and_each_call_is_decided_alone(
    redis_url: str, sync_storage: RedisStorage
) -> None:
    """Calls of 8 threads wait for a round trip in flight and go together in the next script run (fewer
    runs than calls); a hard quota of 100 still admits exactly 100 of 160 calls."""
    open_account(sync_storage, "acme", credits=100_000)
    plan = make_plan(quota=100, price=10, prepaid=True)
    requests = [admit_request(sync_storage, plan, "acme") for _ in range(160)]
    redis.Redis.from_url(redis_url).config_resetstat()

    outcomes = _admit_from_threads(sync_storage, requests, threads=8)

    admitted = [o for o in outcomes if isinstance(o, Decision) and o.allowed]
    refused = [o for o in outcomes if isinstance(o, Decision) and o.reason == "quota_exceeded"]
    assert (len(admitted), len(refused)) == (100, 60)
    assert sync_storage.get_balance("acme").reserved == 100 * 10
    assert _script_runs(redis_url) < len(requests)


def test_threads_waiting_on_an_unreachable_redis_each_fail() -> None:
    """With Redis unreachable, every thread's call gets its own StorageError and none hangs."""
    storage = RedisStorage("redis://127.0.0.1:1/0", shards=SHARDS, timeout=TIMEOUT)
    plan = make_plan(quota=1_000)
    requests = [admit_request(storage, plan, f"c{i}") for i in range(24)]

    outcomes = _admit_from_threads(storage, requests, threads=6)

    assert all(isinstance(o, StorageError) and not o.refused for o in outcomes)
    assert len({id(o) for o in outcomes}) == len(outcomes)
