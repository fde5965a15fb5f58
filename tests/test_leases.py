"""Lease admission (``policy.admission = "lease"``): calls reserved in blocks, served without a round trip.

The promises: hard quotas and balances are never passed, however many processes share them; a lease's
unused calls come back once it is spent; a revocation bites within ``lease_seconds``; and most calls need
no admission of their own.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import Message

import meterware
from meterware import Accounts, Config, MeteringMiddleware
from meterware.rollup import RollupWorker

QUOTA = 150
PRICE_MICROS = 10_000  # "0.01" credits a call
LEASE_CALLS = 40


def hello(request: Any) -> JSONResponse:
    return JSONResponse({"hello": "world"})


def make_config(storage: str, spool: Path, **policy: Any) -> Config:
    return Config.from_dict(
        {
            "storage": {"url": storage, "shards": 4},
            "meters": {"calls": {"aggregation": "count", "source": "call"}},
            "plans": {
                "metered": {
                    "prepaid": True,
                    "rate_limits": ["100000/second"],
                    "meters": {"calls": {"quota": QUOTA, "price": "0.01"}},
                }
            },
            "policy": {
                "admission": "lease",
                "lease_calls": LEASE_CALLS,
                "lease_seconds": 30,
                "on_backend_error": "closed",
                # Generous for a loaded CI box: a backend call past it would be a 503, not a quota answer.
                "timeout": 5.0,
                **policy,
            },
            "pipeline": {"spool_dir": str(spool), "flush_interval": 0.05},
        }
    )


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def storage_url(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "memory":
        yield f"memory://leases-{uuid.uuid4().hex}"
    else:
        url = request.getfixturevalue("redis_url")
        yield url


class Process:
    """One app process: a Starlette app behind its own middleware (its own leases, buffer and client),
    run with its lifespan as a server runs it."""

    def __init__(self, config: Config, registry: CollectorRegistry | None = None) -> None:
        app = Starlette(routes=[Route("/v1/hello", hello)])
        self.middleware = MeteringMiddleware(app, config, registry=registry or CollectorRegistry())
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.middleware), base_url="http://testserver"
        )
        self._events: asyncio.Queue[Message] = asyncio.Queue()
        self._replies: asyncio.Queue[Message] = asyncio.Queue()
        self._lifespan: asyncio.Task[None] | None = None

    async def call(self, key: str) -> httpx.Response:
        if self._lifespan is None:
            scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
            self._lifespan = asyncio.create_task(self.middleware(scope, self._events.get, self._replies.put))
            await self._events.put({"type": "lifespan.startup"})
            assert (await self._replies.get())["type"] == "lifespan.startup.complete"
        return await self.client.get("/v1/hello", headers={"authorization": f"Bearer {key}"})

    async def stop(self) -> None:
        """The lifespan shutdown: flush everything, close the spent leases and the connections."""
        await self.client.aclose()
        if self._lifespan is not None:
            await self._events.put({"type": "lifespan.shutdown"})
            assert (await self._replies.get())["type"] == "lifespan.shutdown.complete"
            await self._lifespan


def open_customer(config: Config, credits: str = "1000") -> tuple[Accounts, str, str]:
    accounts = Accounts.open(config)
    customer = f"c-{uuid.uuid4().hex[:10]}"
    accounts.create_customer(customer, plan="metered")
    accounts.grant_credits(customer, credits)
    return accounts, customer, accounts.create_key(customer).plaintext


def roll_up(config: Config, accounts: Accounts) -> None:
    RollupWorker(accounts.storage, config, owner="test").drain()


async def _concurrently(config: Config, key: str, processes: int, calls: int) -> Counter[int]:
    """``calls`` concurrent calls into each of ``processes`` processes, which then shut down."""
    running = [Process(config) for _ in range(processes)]
    responses = await asyncio.gather(*(p.call(key) for p in running for _ in range(calls)))
    for process in running:
        await process.stop()
    return Counter(response.status_code for response in responses)


async def _until_refused(config: Config, key: str) -> int:
    """Calls one at a time from a fresh process until one is refused: how many were served."""
    process = Process(config)
    served = 0
    while (await process.call(key)).status_code == 200:
        served += 1
    await process.stop()
    return served


def test_processes_sharing_a_hard_quota_never_pass_it(storage_url: str, tmp_path: Path) -> None:
    """Three processes, 100 concurrent calls each, share a quota of 150: at most 150 are served; once
    their leases are closed, the calls they reserved and did not use are served by others, to exactly 150."""
    config = make_config(storage_url, tmp_path / "spool")
    accounts, customer, key = open_customer(config)

    statuses = asyncio.run(_concurrently(config, key, processes=3, calls=100))
    assert set(statuses) == {200, 429}
    assert statuses[200] <= QUOTA
    assert statuses[200] + asyncio.run(_until_refused(config, key)) == QUOTA

    roll_up(config, accounts)
    assert accounts.usage(customer).meters["calls"] == QUOTA
    balance = accounts.balance(customer)
    assert (balance.balance, balance.reserved) == (1000 * 1_000_000 - QUOTA * PRICE_MICROS, 0)


def test_processes_sharing_a_balance_never_overspend(storage_url: str, tmp_path: Path) -> None:
    """Credits for exactly 97 calls, shared by three processes: never more than 97 calls, then the rest,
    and the balance ends at exactly 0."""
    config = make_config(storage_url, tmp_path / "spool")
    accounts, customer, key = open_customer(config, credits="0.97")

    statuses = asyncio.run(_concurrently(config, key, processes=3, calls=60))
    assert set(statuses) == {200, 402}
    assert statuses[200] + asyncio.run(_until_refused(config, key)) == 97
    balance = accounts.balance(customer)
    assert (balance.balance, balance.reserved) == (0, 0)


def test_a_lease_near_a_limit_takes_a_share_of_what_is_left(storage_url: str, tmp_path: Path) -> None:
    """With 30 calls of the quota left, a lease of 40 is granted 10: the largest halving that fits (20),
    halved once more, so what is left is shared out."""
    config = make_config(storage_url, tmp_path / "spool")
    accounts, customer, key = open_customer(config)
    assert asyncio.run(_concurrently(config, key, processes=1, calls=QUOTA - 30))[200] == QUOTA - 30
    registry = CollectorRegistry()

    async def run() -> None:
        process = Process(config, registry)
        assert (await process.call(key)).status_code == 200
        assert accounts.balance(customer).reserved == 10 * PRICE_MICROS
        await process.stop()

    asyncio.run(run())


def test_most_calls_need_no_admission_of_their_own(storage_url: str, tmp_path: Path) -> None:
    """120 calls through one process take 3 lease admissions of 40 calls (and at most one more, fetched
    ahead of need), not 120, all served under a quota of 150: the settled calls of a lease are taken out
    of its block, so none counts twice, however the flushes cut them."""
    config = make_config(storage_url, tmp_path / "spool")
    _, _, key = open_customer(config)
    registry = CollectorRegistry()

    async def run() -> None:
        process = Process(config, registry)
        for _ in range(3):
            statuses = {r.status_code for r in await asyncio.gather(*(process.call(key) for _ in range(40)))}
            assert statuses == {200}
        await process.stop()

    asyncio.run(run())
    admissions = registry.get_sample_value("meterware_backend_duration_seconds_count", {"operation": "admit"})
    assert admissions is not None
    assert 3 <= admissions <= 4


def test_a_spent_lease_gives_its_unused_calls_back_while_serving(storage_url: str, tmp_path: Path) -> None:
    """Once a lease runs out of time, the flusher closes it: its unused calls and credits are free again."""
    config = make_config(storage_url, tmp_path / "spool", lease_seconds=0.2)
    accounts, customer, key = open_customer(config)

    async def run() -> None:
        process = Process(config)
        assert (await process.call(key)).status_code == 200
        assert accounts.balance(customer).reserved == LEASE_CALLS * PRICE_MICROS
        deadline = time.monotonic() + 5
        while accounts.balance(customer).reserved and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert accounts.balance(customer).reserved == 0  # closed while the process still runs
        await process.stop()

    asyncio.run(run())
    assert accounts.balance(customer).balance == 1000 * 1_000_000 - PRICE_MICROS


def test_a_revoked_key_stops_working_within_lease_seconds(storage_url: str, tmp_path: Path) -> None:
    """Revocation bites when the key's lease ends: within lease_seconds, and after no more calls than
    the lease had left."""
    lease_seconds = 0.5
    config = make_config(storage_url, tmp_path / "spool", lease_seconds=lease_seconds, key_cache_ttl=0)
    accounts, customer, key = open_customer(config)

    async def run() -> tuple[int, float]:
        process = Process(config)
        assert (await process.call(key)).status_code == 200
        revoked = time.monotonic()
        accounts.revoke_key(accounts.list_keys(customer)[0].key_id)
        served = 0
        while (await process.call(key)).status_code == 200:
            served += 1
            await asyncio.sleep(0.01)
        took = time.monotonic() - revoked
        await process.stop()
        return served, took

    served, took = asyncio.run(run())
    assert served <= LEASE_CALLS - 1
    assert took <= lease_seconds + 0.5
    roll_up(config, accounts)
    assert accounts.usage(customer).meters["calls"] == served + 1
    assert accounts.balance(customer).reserved == 0


def test_a_tight_rate_limit_is_admitted_call_by_call(tmp_path: Path) -> None:
    """A limit of 5 calls a second makes blocks pointless: each call is admitted alone, and exactly."""
    config = Config.from_dict(
        {
            "storage": {"url": f"memory://leases-{uuid.uuid4().hex}"},
            "plans": {"metered": {"rate_limits": ["5/second"]}},
            "policy": {"admission": "lease"},
            "pipeline": {"spool_dir": str(tmp_path / "spool")},
        }
    )
    accounts = Accounts.open(config)
    accounts.create_customer("tight", plan="metered")
    key = accounts.create_key("tight").plaintext

    async def run() -> list[int]:
        process = Process(config)
        responses = await asyncio.gather(*(process.call(key) for _ in range(12)))
        await process.stop()
        return [response.status_code for response in responses]

    assert Counter(asyncio.run(run())) == {200: 5, 429: 7}


def test_calls_of_a_priced_value_meter_are_admitted_one_by_one(storage_url: str, tmp_path: Path) -> None:
    """A lease cannot bound what its calls use of a value meter (a call may use more than it holds): on
    a plan that prices one, each call is admitted alone and counts the calls finished before it, so a
    balance of 1,000 tokens' worth serves calls of 400 tokens while it is positive: three of five."""
    config = Config.from_dict(
        {
            "storage": {"url": storage_url, "shards": 4},
            "meters": {
                "calls": {"aggregation": "count"},
                "tokens": {"aggregation": "sum", "source": "handler", "reserve": 100},
            },
            "plans": {"metered": {"prepaid": True, "meters": {"tokens": {"price": "0.000001"}}}},
            "policy": {"admission": "lease", "lease_calls": 4, "lease_seconds": 30, "timeout": 2.0},
            "pipeline": {"spool_dir": str(tmp_path / "spool"), "flush_interval": 60},
        }
    )
    accounts, customer, key = open_customer(config, credits="0.001")  # 1,000 tokens' worth
    registry = CollectorRegistry()

    def big(request: Any) -> JSONResponse:
        meterware.usage.add("tokens", 400)
        return JSONResponse({"ok": True})

    async def run() -> list[int]:
        app = Starlette(routes=[Route("/v1/big", big)])
        middleware = MeteringMiddleware(app, config, registry=registry)
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            headers = {"authorization": f"Bearer {key}"}
            statuses = [(await client.get("/v1/big", headers=headers)).status_code for _ in range(5)]
        await middleware.drain()
        await middleware.storage.aclose()
        await middleware.flusher.storage.aclose()
        return statuses

    assert asyncio.run(run()) == [200, 200, 200, 402, 402]
    admissions = registry.get_sample_value("meterware_backend_duration_seconds_count", {"operation": "admit"})
    assert admissions == 5
    balance = accounts.storage.get_balance(customer)
    assert (balance.balance, balance.reserved) == (1_000 - 3 * 400, 0)
