"""Odd or poisoned values in the backend (set behind meterware's back) never serve a customer for free,
never stop the billing of the others, and never give a negative Retry-After.

The values are written with redis-py directly (on memory, where the same state can be made, into the
store), then the calls go through the real request path of each adapter and the real flusher.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
import redis as redis_py

from meterware.metering.periods import period_bounds
from meterware.storage import _keyspace as ks
from meterware.storage.memory import MemoryStorage
from tests.behaviour.apps import CALLS

Api = Any

#: One adapter of each kind is enough here: the storage and the failure policy are what is tested.
ADAPTERS = pytest.mark.parametrize("framework", ["starlette", "flask", "django-async"])


def redis_client(api: Api) -> redis_py.Redis:
    return redis_py.Redis.from_url(api.config.storage)


@ADAPTERS
def test_a_rate_limit_tat_far_in_the_future_is_clamped_to_one_period(api: Api) -> None:
    """A stored TAT of 1e308 refuses the call with a Retry-After within the limit's period (never negative,
    never astronomical), and is clamped to now + the period, so the limit recovers within one period."""
    key = api.customer("tight")  # 3/minute
    customer = api.customer_of(key)
    shard = ks.shard_of(customer, api.config.shards)
    if isinstance(api.storage, MemoryStorage):
        api.storage._rates[(True, customer, 60, "")] = 1e308
    else:
        client = redis_client(api)
        client.set(ks.rate(shard, True, customer, 60), "1e308")
    refused = api.call("GET", "/v1/hello", key)
    assert refused.status_code == 429
    assert 0 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["ratelimit"] == '"rate-60s";r=0;t=60'
    now_ms = time.time() * 1000
    if isinstance(api.storage, MemoryStorage):
        stored = api.storage._rates[(True, customer, 60, "")]
    else:
        stored = float(client.get(ks.rate(shard, True, customer, 60)) or 0)
        assert 0 < client.pttl(ks.rate(shard, True, customer, 60)) <= 60_000
        client.close()
    assert now_ms < stored <= now_ms + 60_000


@pytest.mark.parametrize("backend", [pytest.param("redis", marks=pytest.mark.redis)], indirect=True)
@pytest.mark.parametrize(
    ("plan", "poison"),
    [
        pytest.param("tight", "rate-key-wrong-type", id="rate-key-wrong-type"),
        pytest.param("payg", "balance-1e308", id="balance-not-an-integer"),
        pytest.param("free", "quota-counter-clobbered", id="quota-counter-not-an-integer"),
        pytest.param("free", "quota-held-clobbered", id="quota-hold-not-an-integer"),
    ],
)
@ADAPTERS
def test_a_poisoned_value_fails_that_customer_closed_not_open(
    api: Api, plan: str, poison: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Under the default fail-open policy, a customer whose stored values the admission cannot decide on
    (a rate key of the wrong type, a balance or a quota counter that is not an integer) is refused with
    503 and a log line naming the key, and the app never runs for them; other customers are served."""
    key = api.customer(plan, credits="1" if plan == "payg" else None)
    other = api.customer(plan, credits="1" if plan == "payg" else None)
    customer = api.customer_of(key)
    shard = ks.shard_of(customer, api.config.shards)
    client = redis_client(api)
    period_start = period_bounds(api.accounts.customer(customer).anchor, "month", time.time())[0]
    if poison == "rate-key-wrong-type":
        client.hset(ks.rate(shard, True, customer, 60), "x", "1")
    elif poison == "balance-1e308":
        client.hset(ks.customer(shard, customer), "balance", "1e308")
    elif poison == "quota-counter-clobbered":
        client.hset(ks.quota(shard, True, customer, period_start), "calls:u", "-1e300")
    else:
        client.hset(ks.quota(shard, True, customer, period_start), "calls:h", "oops")
    client.close()

    CALLS.clear()
    with caplog.at_level(logging.WARNING, logger="meterware"):
        refused = [api.call("GET", "/v1/hello", key) for _ in range(3)]
    assert [response.status_code for response in refused] == [503] * 3
    assert CALLS == []
    assert api.call("GET", "/v1/hello", other).status_code == 200
    lines = [record.getMessage() for record in caplog.records]
    [line] = [line for line in lines if "refusing the customer until repaired" in line]
    assert f":{customer}" in line
    assert "\n" not in line
