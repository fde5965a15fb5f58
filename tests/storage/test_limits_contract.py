"""Limits on what costs money, over every backend (memory, Redis, Redis Cluster): rate limits scoped to a
route or a key, the concurrency cap and the spend cap, each decided in the one atomic admission."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import replace

import pytest

from meterware.config import MeterTerms, Plan, RateLimit
from meterware.metering.admission import (
    CONCURRENCY_METER,
    AdmitRequest,
    Decision,
    scoped_limits,
)
from meterware.metering.unsettled import Unsettled
from meterware.storage._keyspace import shard_of
from meterware.storage.base import Batch, Settlement, Storage
from tests.storage.conftest import Backend
from tests.storage.test_contract import admit_request, flush, make_plan, open_account

CONCURRENT_CALLS = 200


def state(decision: Decision, name: str) -> tuple[int, int, int, int]:
    """The ``RateLimit`` entry ``name`` of a decision: (quota, window, remaining, reset)."""
    found = [limit for limit in decision.limits if limit.name == name]
    assert len(found) == 1, decision.limits
    return found[0].quota, found[0].window, found[0].remaining, found[0].reset


def again(request: AdmitRequest) -> AdmitRequest:
    return replace(request, reservation_id=uuid.uuid4().hex)


def settle(request: AdmitRequest, decision: Decision) -> Settlement:
    """How the flusher settles a finished call: its units (a concurrency slot uses none)."""
    meters = tuple(
        (hold.meter, 0 if hold.meter == CONCURRENCY_METER else hold.hold, hold.price, hold.included)
        for hold in request.holds
    )
    return Settlement(
        request.customer,
        request.live,
        request.period_start,
        decision.reservation_id,
        True,
        request.charges_credits,
        meters,
    )


# -- rate limits of a route and of a key ---------------------------------------------------------------


def test_a_route_limit_counts_the_customers_calls_to_that_route_only(storage: Storage) -> None:
    """Plan 5/minute, its route /v1/chat 2/minute: two chat calls pass, the third is refused for 30 s
    (the GCRA's next slot: 60 s / 2) and takes nothing of the plan's limit; another route still passes."""
    open_account(storage)
    plan = make_plan(rates=(RateLimit(5, 60),))
    chat = replace(
        admit_request(storage, plan), scoped_limits=scoped_limits((RateLimit(2, 60),), "r0badc0de", "route")
    )
    first = storage.admit(again(chat))
    assert state(first, "rate-60s") == (5, 60, 4, 12)
    assert state(first, "route-rate-60s") == (2, 60, 1, 30)
    assert storage.admit(again(chat)).allowed
    refused = storage.admit(again(chat))
    assert (refused.allowed, refused.reason, refused.retry_after) == (False, "rate_limited", 30)
    assert state(refused, "route-rate-60s")[2] == 0
    other = storage.admit(admit_request(storage, plan))
    assert other.allowed
    assert state(other, "rate-60s")[2] == 2  # 5 - the two chat calls - this one: the refused took none


def test_a_key_limit_counts_that_keys_calls_only(storage: Storage) -> None:
    """A key with 1/second of its own: its second call is refused for 1 s; the customer's other key is not."""
    open_account(storage)
    plan = make_plan()
    limited = replace(
        admit_request(storage, plan), scoped_limits=scoped_limits((RateLimit(1, 1),), "kkey-acme", "key")
    )
    assert storage.admit(again(limited)).allowed
    refused = storage.admit(again(limited))
    assert (refused.reason, refused.retry_after) == ("rate_limited", 1)
    assert state(refused, "key-rate-1s") == (1, 1, 0, 1)
    other = replace(
        admit_request(storage, plan), scoped_limits=scoped_limits((RateLimit(1, 1),), "kkey-other", "key")
    )
    assert storage.admit(other).allowed


# -- the concurrency cap -------------------------------------------------------------------------------


def test_concurrency_cap_refuses_past_n_in_flight_and_a_settled_call_frees_its_slot(storage: Storage) -> None:
    """Cap 2: two calls in flight, the third is refused (429 reason, Retry-After 1); once the first call
    is settled its slot is free again."""
    open_account(storage)
    plan = replace(make_plan(quota=100), concurrency=2)
    request = admit_request(storage, plan)
    first = storage.admit(again(request))
    assert state(first, "concurrency") == (2, 1, 1, 0)
    assert state(storage.admit(again(request)), "concurrency") == (2, 1, 0, 1)
    refused = storage.admit(again(request))
    assert (refused.allowed, refused.reason, refused.retry_after) == (False, "concurrency_exceeded", 1)
    assert state(refused, "concurrency") == (2, 1, 0, 1)
    assert state(refused, "quota-calls")[2] == 97  # the quota is not what refused it
    assert flush(storage, settle(request, first))
    freed = storage.admit(again(request))
    assert freed.allowed
    assert state(freed, "quota-calls")[2] == 100 - 3  # one used, two held


def test_a_finished_unflushed_call_frees_its_slot_at_once(storage: Storage) -> None:
    """The slot of a call that finished in this process counts as free before its batch is written."""
    open_account(storage)
    plan = replace(make_plan(), concurrency=1)
    unsettled = Unsettled()
    request = replace(admit_request(storage, plan), unsettled=unsettled)
    assert storage.admit(again(request)).allowed
    assert storage.admit(again(request)).reason == "concurrency_exceeded"
    unsettled.add(((request.customer, True, request.period_start), 0, ((CONCURRENCY_METER, 0, 1),)))
    assert storage.admit(again(request)).allowed


def test_a_crashed_calls_slot_comes_back_at_its_reservation_deadline(storage: Storage) -> None:
    """A call never settled (its process died) holds its slot until the worker refunds its reservation."""
    open_account(storage)
    plan = replace(make_plan(), concurrency=1)
    assert storage.admit(admit_request(storage, plan, timeout_ms=1)).allowed
    assert storage.admit(admit_request(storage, plan)).reason == "concurrency_exceeded"
    time.sleep(0.02)
    assert storage.expire_reservations(shard_of("acme", storage.shards), 100) == 1
    assert storage.admit(admit_request(storage, plan)).allowed


# -- the spend cap -------------------------------------------------------------------------------------


def capped(cap: int, *, prepaid: bool = False) -> Plan:
    """A plan charging 1,000 micro-credits a call past 2 included, with a spend cap of ``cap``."""
    return replace(make_plan(included=2, price=1000, prepaid=prepaid), spend_cap=cap)


def test_spend_cap_counts_charged_and_held_spend(storage: Storage) -> None:
    """Cap 2,500 on a postpaid plan: 2 free calls, then 1,000 each: the third and fourth pass (1,000,
    2,000, one of them still held), the fifth would reach 3,000 and is refused until the period ends."""
    open_account(storage)
    plan = capped(2500)
    request = replace(admit_request(storage, plan), spend_cap=2500)
    decisions = [storage.admit(again(request)) for _ in range(4)]
    assert all(decision.allowed for decision in decisions)
    assert [state(d, "spend-cap")[2] for d in decisions] == [2500, 2500, 1500, 500]
    assert flush(storage, settle(request, decisions[2]))  # charged now, no longer held: the same spend
    refused = storage.admit(again(request))
    assert (refused.allowed, refused.reason) == (False, "spend_cap_reached")
    assert 0 < refused.retry_after <= request.period_end - request.period_start
    window = request.period_end - request.period_start
    assert state(refused, "spend-cap") == (2500, window, 500, refused.retry_after)


def test_a_customer_spend_cap_on_a_prepaid_plan(storage: Storage) -> None:
    """A prepaid customer with credits for 10 calls and a cap of 3 calls' worth gets 3 (+2 included)."""
    open_account(storage, credits=10_000)
    request = replace(admit_request(storage, capped(3000, prepaid=True)), spend_cap=3000)
    decisions = [storage.admit(again(request)) for _ in range(6)]
    assert [d.reason for d in decisions] == [None] * 5 + ["spend_cap_reached"]
    assert decisions[-1].available_credits == 7000


def test_a_value_meter_needs_room_left_under_the_cap(storage: Storage) -> None:
    """A priced value meter (open-ended) needs the cap not reached after its reserve, as credits do."""
    open_account(storage)
    plan = replace(make_plan(tokens=MeterTerms(price=1)), spend_cap=100)
    request = replace(admit_request(storage, plan), spend_cap=100)  # 100 tokens reserved = the whole cap
    assert storage.admit(request).reason == "spend_cap_reached"
    plan = replace(plan, spend_cap=101)
    assert storage.admit(replace(admit_request(storage, plan), spend_cap=101)).allowed


def test_concurrent_admits_never_pass_the_spend_cap(backend: Backend) -> None:
    """200 admits gathered on one event loop, and 200 from threads, against a cap of 37 calls' worth
    (past 2 included): exactly 39 pass each time, the rest are refused for the cap."""
    open_account(backend.sync)
    cap = 37_000
    plan = capped(cap)
    requests = [replace(admit_request(backend.sync, plan), spend_cap=cap) for _ in range(CONCURRENT_CALLS)]

    async def admit_all() -> list[Decision]:
        storage = backend.open_async()
        try:
            return list(await asyncio.gather(*(storage.admit(request) for request in requests)))
        finally:
            await storage.aclose()

    decisions = asyncio.run(admit_all())
    assert sum(decision.allowed for decision in decisions) == 39
    assert {decision.reason for decision in decisions if not decision.allowed} == {"spend_cap_reached"}

    open_account(backend.sync, "bravo")
    threaded = [replace(admit_request(backend.sync, plan, "bravo"), spend_cap=cap) for _ in range(200)]
    answers: list[Decision] = []
    barrier = threading.Barrier(20)

    def admit_share(share: list[AdmitRequest]) -> None:
        barrier.wait()
        answers.extend(backend.sync.admit(request) for request in share)

    threads = [threading.Thread(target=admit_share, args=(threaded[i::20],)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(answer.allowed for answer in answers) == 39
    assert {answer.reason for answer in answers if not answer.allowed} == {"spend_cap_reached"}


def test_calls_of_one_key_to_two_routes_in_one_round_count_apart(backend: Backend) -> None:
    """Two calls of the same key and terms (no meters held) to two limited routes, admitted in one round
    (gathered): each counts in its own route's limit, so both pass."""
    open_account(backend.sync)
    plan = make_plan()
    base = admit_request(backend.sync, plan)
    first = replace(base, scoped_limits=scoped_limits((RateLimit(1, 60),), "raaaaaaaa", "route"))
    second = replace(again(base), scoped_limits=scoped_limits((RateLimit(1, 60),), "rbbbbbbbb", "route"))
    assert first.holds is second.holds

    async def admit_both() -> list[Decision]:
        storage = backend.open_async()
        try:
            return list(await asyncio.gather(storage.admit(first), storage.admit(second)))
        finally:
            await storage.aclose()

    assert [decision.allowed for decision in asyncio.run(admit_both())] == [True, True]


def test_a_block_of_calls_is_granted_what_fits_under_the_spend_cap(storage: Storage) -> None:
    """A lease asking for 10 calls (1,000 each past 2 included) under a cap of 5,000: 10 do not fit, 5
    would (2 free + 3), so it is granted 5 halved once more, 2; the cap's entry counts them as held."""
    open_account(storage)
    request = replace(admit_request(storage, capped(5000)), spend_cap=5000, calls=10)
    decision = storage.admit(request)
    assert (decision.allowed, decision.calls) == (True, 2)
    assert state(decision, "spend-cap")[2] == 5000  # both within the included 2
    decision = storage.admit(again(request))
    assert (decision.allowed, decision.calls) == (True, 2)
    assert state(decision, "spend-cap")[2] == 3000


# -- the spend cap counts what was charged -------------------------------------------------------------

CAP = 1_000_000  # 1.00 credits


def priced(price: int, *, prepaid: bool = False) -> Plan:
    """A plan (or a customer's terms) charging ``price`` micro-credits a call, capped at 1.00 credits."""
    return replace(make_plan(price=price, prepaid=prepaid), spend_cap=CAP)


def charge_calls(storage: Storage, request: AdmitRequest, calls: int) -> None:
    """Admit ``calls`` calls of ``request`` and flush each (charged at the request's prices)."""
    for _ in range(calls):
        decision = storage.admit(again(request))
        assert decision.allowed, decision
        assert flush(storage, settle(request, decision))


@pytest.mark.parametrize("prepaid", [False, True], ids=["postpaid", "prepaid"])
def test_a_price_rise_leaves_what_was_charged_as_it_was(storage: Storage, prepaid: bool) -> None:
    """6 calls at 0.10 charged 0.60 of a 1.00 cap; the customer's terms then rise to 0.30 a call. The
    cap counts the 0.60 charged (not 6 x 0.30 = 1.80): one more call passes (0.90), the next would
    reach 1.20 and is refused."""
    open_account(storage, credits=10 * CAP if prepaid else 0)
    charge_calls(storage, replace(admit_request(storage, priced(100_000, prepaid=prepaid)), spend_cap=CAP), 6)
    dear = replace(admit_request(storage, priced(300_000, prepaid=prepaid)), spend_cap=CAP)
    decision = storage.admit(again(dear))
    assert decision.allowed, decision
    assert state(decision, "spend-cap")[2] == CAP - 600_000 - 300_000
    assert flush(storage, settle(dear, decision))
    refused = storage.admit(again(dear))
    assert refused.reason == "spend_cap_reached"
    assert state(refused, "spend-cap")[2] == 100_000


@pytest.mark.parametrize("prepaid", [False, True], ids=["postpaid", "prepaid"])
def test_a_price_cut_gives_no_room_beyond_what_was_charged(storage: Storage, prepaid: bool) -> None:
    """3 calls at 0.30 charged 0.90 of a 1.00 cap; the terms then fall to 0.05 a call. The cap counts
    the 0.90 charged (not 3 x 0.05 = 0.15): two calls pass (0.95, 1.00), the third is refused."""
    open_account(storage, credits=10 * CAP if prepaid else 0)
    charge_calls(storage, replace(admit_request(storage, priced(300_000, prepaid=prepaid)), spend_cap=CAP), 3)
    cheap = replace(admit_request(storage, priced(50_000, prepaid=prepaid)), spend_cap=CAP)
    first = storage.admit(again(cheap))
    assert state(first, "spend-cap")[2] == 50_000
    assert flush(storage, settle(cheap, first))
    second = storage.admit(again(cheap))  # held, not yet charged
    assert (second.allowed, state(second, "spend-cap")[2]) == (True, 0)
    refused = storage.admit(again(cheap))
    assert (refused.reason, state(refused, "spend-cap")[2]) == ("spend_cap_reached", 0)


def test_a_refunded_a_failed_or_a_replayed_call_adds_nothing_to_the_spend(storage: Storage) -> None:
    """At 0.10 a call under a 1.00 cap: a reservation refunded at its deadline and a failed call (not
    billable) charge nothing and count nothing; a batch flushed twice (a spool replay) counts once."""
    open_account(storage)
    request = replace(admit_request(storage, priced(100_000)), spend_cap=CAP)
    assert storage.admit(replace(request, reservation_id="lost", reservation_timeout_ms=1)).allowed
    time.sleep(0.02)
    assert storage.expire_reservations(request.shard, 100) == 1
    failed = storage.admit(again(request))
    assert flush(storage, replace(settle(request, failed), billable=False))
    served = storage.admit(again(request))
    assert state(served, "spend-cap")[2] == CAP - 100_000  # only its own hold
    assert flush(storage, settle(request, served), batch_id="batch-a")
    assert not flush(storage, settle(request, served), batch_id="batch-a")
    after = storage.admit(again(request))
    assert state(after, "spend-cap")[2] == CAP - 200_000  # 0.10 charged once, 0.10 held


def test_a_finished_call_counts_before_its_flush_at_the_price_it_is_charged(storage: Storage) -> None:
    """A call this process finished (not flushed yet) counts at once; flushed, it counts once."""
    open_account(storage)
    request = replace(admit_request(storage, priced(100_000)), spend_cap=CAP)
    charge_calls(storage, request, 2)
    unsettled = Unsettled()
    request = replace(request, unsettled=unsettled)
    finished = storage.admit(again(request))
    unsettled.add(((request.customer, True, request.period_start), 0, (("calls", 1, 1),)))
    assert state(storage.admit(again(request)), "spend-cap")[2] == CAP - 400_000  # 3 charged, 1 held
    writer, generation = unsettled.batched(
        "batch-b", [((request.customer, True, request.period_start), 0, (("calls", 1, 1),))]
    )
    assert storage.flush(
        Batch(request.shard, "batch-b", b"events", (settle(request, finished),), writer, generation)
    )
    assert state(storage.admit(again(request)), "spend-cap")[2] == CAP - 500_000  # 3 charged, 2 held
