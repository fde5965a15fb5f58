"""A rate limit on a meter's units, at the storage: admission takes each call's estimate, the flush moves
the bucket by what the calls used beyond (or short of) it; every backend agrees (memory, Redis, cluster).

1,000 tokens a minute is 60 ms a token; the estimate (the meter's reserve) is 100 tokens, 6 s.
"""

from __future__ import annotations

import uuid
from dataclasses import replace

import msgpack
import pytest
import redis as redis_py

from meterware.config import Plan, RateLimit
from meterware.errors import StorageError
from meterware.storage import _keyspace as ks
from meterware.storage.base import Batch, Settlement, Storage
from meterware.storage.redis import RedisStorage
from meterware.storage.redis._request import flush_call
from tests.storage.test_contract import admit_request, open_account

TOKENS = RateLimit(1000, 60, "tokens", 100)
PLAN = Plan("test", rate_limits=(TOKENS,))


def settle(storage: Storage, used: int, customer: str = "acme") -> None:
    """Flush one call of ``customer`` that used ``used`` tokens (its admission took 100)."""
    request = admit_request(storage, PLAN, customer)
    rates = (("tokens", 1000, 60, used - 100),)
    settlement = Settlement(customer, True, request.period_start, "", True, False, (), rates=rates)
    assert storage.flush(Batch(request.shard, str(uuid.uuid4()), b"events", (settlement,)))


def tokens_left(storage: Storage, customer: str = "acme") -> tuple[bool, int, int]:
    """Admit one call: whether it was, the tokens left its entry says, and its Retry-After."""
    decision = storage.admit(admit_request(storage, PLAN, customer))
    (limit,) = decision.limits
    assert limit.name == "tokens-rate-60s"
    return decision.allowed, limit.remaining, decision.retry_after


def test_the_flush_corrects_the_estimate_by_the_actual_units(storage: Storage) -> None:
    """Call 1 takes 100 (900 left), uses 500: +400. Call 2 takes 100 (400 left), uses 500: +400, the
    bucket full (60 s ahead). Call 3 would need 6 s more than the burst: refused, Retry-After 6, 0 left."""
    open_account(storage)
    allowed, left, _ = tokens_left(storage)
    assert allowed
    assert 900 <= left <= 910
    settle(storage, 500)
    allowed, left, _ = tokens_left(storage)
    assert allowed
    assert 400 <= left <= 410
    settle(storage, 500)
    allowed, left, retry_after = tokens_left(storage)
    assert (allowed, retry_after) == (False, 6)
    assert 0 <= left <= 10


def test_a_call_using_less_gives_back_at_most_a_full_bucket(storage: Storage) -> None:
    """Taken 100, used 10: 90 back (990 left before the next call's 100, 890 after it). A settlement
    giving back more than was taken (-5,000) leaves a full bucket, never more: 900 after a call."""
    open_account(storage)
    tokens_left(storage)
    settle(storage, 10)
    allowed, left, _ = tokens_left(storage)
    assert allowed
    assert 890 <= left <= 900
    settle(storage, -4900)
    assert tokens_left(storage)[1] == 900


def test_the_debt_is_at_most_one_period(storage: Storage) -> None:
    """A call using 5,000 tokens takes the bucket one period ahead, not five: the next waits 6 s."""
    open_account(storage)
    tokens_left(storage)
    settle(storage, 5000)
    assert tokens_left(storage)[::2] == (False, 6)


@pytest.mark.redis
def test_a_clobbered_rate_key_refuses_that_customers_flush_only(redis_url: str) -> None:
    """A tokens rate key holding a hash refuses the batch naming its customer, before any write (the
    flusher then sets that customer's calls aside and flushes the rest)."""
    storage = RedisStorage(redis_url, shards=4)
    try:
        open_account(storage)
        request = admit_request(storage, PLAN)
        client = redis_py.Redis.from_url(redis_url)
        client.hset(ks.rate(request.shard, True, "acme", 60, "mtokens"), "x", "1")
        events_before = client.xlen(ks.events(request.shard))
        with pytest.raises(StorageError) as refused:
            settle(storage, 500)
        assert refused.value.customers == ("acme",)
        assert client.xlen(ks.events(request.shard)) == events_before
        client.close()
    finally:
        storage.close()


def test_a_flush_without_meter_limits_sends_what_it_always_did() -> None:
    """flush.lua's arguments: 10 for a batch of calls without a meter's limit; an 11th, one correction per
    customer and limit (the calls' summed: +400 and -90 make +310), only when some call carries one."""
    plain = Settlement("acme", True, 0, "", True, False, ())
    metered = [replace(plain, rates=(("tokens", 1000, 60, units),)) for units in (400, -90)]
    batch = Batch(0, str(uuid.uuid4()), b"events", (plain, plain))
    keys, args = flush_call(batch)
    assert len(args) == 10
    keys, args = flush_call(replace(batch, settlements=(plain, *metered)))
    assert len(args) == 11
    assert isinstance(args[10], bytes)
    rate_key, amount, seconds, units, customer_key = msgpack.unpackb(args[10])
    assert (keys[rate_key - 1], amount, seconds, units) == (
        ks.rate(0, True, "acme", 60, "mtokens"),
        1000,
        60,
        310,
    )
    assert keys[customer_key - 1] == ks.customer(0, "acme")
