"""``meterware.record``: usage outside an HTTP call, charged through the same admission and settlement as
calls, on memory, Redis and the cluster."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

import meterware
from meterware import Accounts, Config, Recorder, Refused, UsageError
from meterware.events import decode_batch
from meterware.recording import RECORD_METHOD, RECORD_ROUTE
from meterware.rollup import RollupWorker
from meterware.storage._keyspace import shard_of

#: 0.0001 credits a token: 100 micro-credits.
TOKEN_PRICE = 100


def recording_config(storage: str, spool_dir: Path, flush_interval: float = 0.01) -> Config:
    return Config.from_dict(
        {
            "storage": {"url": storage, "shards": 4},
            "meters": {
                "calls": {"aggregation": "count", "source": "call"},
                "tokens": {"aggregation": "sum", "source": "handler"},
                "images": {"aggregation": "sum", "source": "handler"},
                "peak": {"aggregation": "max", "source": "handler"},
            },
            "plans": {
                "tokens": {
                    "prepaid": True,
                    "rate_limits": ["1/minute"],
                    "meters": {"calls": {"price": "0.01"}, "tokens": {"price": "0.0001"}},
                },
                "included": {"prepaid": True, "meters": {"tokens": {"included": 100, "price": "0.0001"}}},
                "capped": {"meters": {"tokens": {"quota": 1000}}},
                "mixed": {
                    "prepaid": True,
                    "meters": {"calls": {"price": "0.01"}, "tokens": {"price": "0.0001"}},
                },
            },
            "pipeline": {"flush_interval": flush_interval, "spool_dir": str(spool_dir)},
            "policy": {"timeout": 5.0},
        }
    )


class Setup:
    def __init__(self, storage: str, spool_dir: Path) -> None:
        self.config = recording_config(storage, spool_dir)
        self.accounts = Accounts.open(self.config)
        self.recorder = Recorder(self.config)

    def customer(self, plan: str, credits: str | None = None) -> str:
        customer_id = f"{plan}-{uuid.uuid4().hex[:8]}"
        self.accounts.create_customer(customer_id, plan=plan)
        if credits:
            self.accounts.grant_credits(customer_id, credits)
        return customer_id

    def held(self) -> Recorder:
        """Another process's recorder, on the same backend, whose flusher waits an hour between flushes:
        what it records stays buffered until it is flushed by hand (or lost)."""
        return Recorder(replace(self.config, pipeline=replace(self.config.pipeline, flush_interval=3600)))

    def charges(self, customer: str) -> list[int]:
        return [entry.amount for entry in self.accounts.ledger(customer) if entry.kind == "charge"]

    def settle(self) -> None:
        """Write what the recorder buffered, then roll it up."""
        self.recorder.flush()
        RollupWorker(self.accounts.storage, self.config).drain()


@pytest.fixture
def setup(backend_url: str, tmp_path: Path) -> Iterator[Setup]:
    """On memory, a real redis-server, a real 3-node Redis Cluster (each empty)."""
    made = Setup(backend_url, tmp_path / "spool")
    yield made
    made.recorder.close()
    made.accounts.close()


def test_a_record_charges_a_prepaid_customer_and_lands_in_the_rollup_and_the_invoice(setup: Setup) -> None:
    """1,200 tokens at 0.0001 cost 0.12 credits: taken from a 1.00 balance with one ledger charge, counted
    in the period and the minute windows (not as a call of the `calls` meter), and on the invoice."""
    customer = setup.customer("tokens", credits="1.00")
    done = setup.recorder.record(customer, {"tokens": 1200}, event_id="job-1")
    assert (done.recorded, done.reserved_credits) == (True, 1200 * TOKEN_PRICE)
    # Reserved at once: the balance cannot be spent twice before the flush.
    assert setup.accounts.balance(customer).available == 1_000_000 - 120_000
    setup.settle()
    balance = setup.accounts.balance(customer)
    assert (balance.balance, balance.available) == (880_000, 880_000)
    assert [entry.amount for entry in setup.accounts.ledger(customer) if entry.kind == "charge"] == [-120_000]
    usage = setup.accounts.usage(customer)
    assert (usage.meters.get("tokens"), usage.meters.get("calls", 0), usage.spend) == (1200, 0, 120_000)
    minute = setup.accounts.usage_history(customer, window="minute")
    assert sum(point.meters.get("tokens", 0) for point in minute.points) == 1200
    invoice = setup.accounts.invoice(customer)
    line = next(line for line in invoice.lines if line.meter == "tokens")
    assert (line.quantity, line.amount) == (1200, Decimal("0.12"))
    assert invoice.credits_charged == 120_000


def test_the_event_has_no_route_and_names_itself_a_record(setup: Setup) -> None:
    """The stream holds the record as a billable event with route "" and method RECORD, its units, and
    the cost its settlement charged."""
    customer = setup.customer("tokens", credits="1.00")
    done = setup.recorder.record(customer, {"tokens": 7, "images": 2}, event_id="job-2")
    setup.recorder.flush()
    shard = shard_of(customer, setup.config.shards)
    events = [
        (event, int(cost))
        for entry in setup.accounts.storage.read_stream(shard, "0-0", 100)
        for event, cost in zip(decode_batch(entry.fields[b"b"]), entry.fields[b"c"].split(b","), strict=True)
        if event.customer == customer
    ]
    assert len(events) == 1
    event, cost = events[0]
    assert str(uuid.UUID(bytes=event.id)) == done.stream_event_id
    assert (event.route, event.method, event.outcome) == (RECORD_ROUTE, RECORD_METHOD, "success")
    assert event.billable
    assert (event.units, event.key_id, cost) == ({"tokens": 7, "images": 2}, "", 7 * TOKEN_PRICE)


def test_a_record_is_refused_when_the_credits_cannot_cover_it(setup: Setup) -> None:
    """At zero credits a record is refused with insufficient_credits; one that costs more than the balance
    too (nothing reserved); one that fits is charged."""
    broke = setup.customer("tokens")
    with pytest.raises(Refused) as refused:
        setup.recorder.record(broke, {"tokens": 1}, event_id="a")
    assert refused.value.reason == "insufficient_credits"
    customer = setup.customer("tokens", credits="0.05")  # 500 tokens' worth
    with pytest.raises(Refused):
        setup.recorder.record(customer, {"tokens": 501}, event_id="b")
    assert setup.accounts.balance(customer).available == 50_000
    setup.recorder.record(customer, {"tokens": 500}, event_id="b")  # the refused id may be retried
    setup.settle()
    assert setup.accounts.balance(customer).balance == 0


def test_included_units_are_free_and_a_hard_quota_refuses(setup: Setup) -> None:
    """The plan's 100 included tokens cost nothing (150 tokens cost 50 x 100 micro-credits); a hard quota
    of 1,000 tokens admits 600 + 400 and refuses the next token with quota_exceeded."""
    included = setup.customer("included", credits="1.00")
    setup.recorder.record(included, {"tokens": 150}, event_id="i-1")
    capped = setup.customer("capped")
    setup.recorder.record(capped, {"tokens": 600}, event_id="c-1")
    setup.recorder.record(capped, {"tokens": 400}, event_id="c-2")
    with pytest.raises(Refused) as refused:
        setup.recorder.record(capped, {"tokens": 1}, event_id="c-3")
    assert refused.value.reason == "quota_exceeded"
    assert refused.value.retry_after > 0
    setup.settle()
    assert setup.accounts.balance(included).balance == 1_000_000 - 50 * TOKEN_PRICE
    assert setup.accounts.usage(capped).meters["tokens"] == 1000


def test_a_retry_with_the_same_event_id_is_charged_once(setup: Setup) -> None:
    """The same event id recorded again (before or after the flush) is answered as a duplicate and charged
    nothing; another id is charged."""
    customer = setup.customer("tokens", credits="1.00")
    assert setup.recorder.record(customer, {"tokens": 100}, event_id="retry").recorded
    assert not setup.recorder.record(customer, {"tokens": 100}, event_id="retry").recorded
    setup.recorder.flush()
    again = setup.recorder.record(customer, {"tokens": 100}, event_id="retry")
    assert (again.recorded, again.stream_event_id) == (False, "")
    setup.recorder.record(customer, {"tokens": 100}, event_id="other")
    setup.settle()
    assert setup.accounts.balance(customer).balance == 1_000_000 - 2 * 100 * TOKEN_PRICE
    assert setup.accounts.usage(customer).meters["tokens"] == 200


def test_a_retry_of_a_charged_record_is_a_duplicate_even_once_the_credits_are_spent(setup: Setup) -> None:
    """A record that took the last credits, retried, is reported recorded before (not refused)."""
    customer = setup.customer("tokens", credits="0.01")
    setup.recorder.record(customer, {"tokens": 100}, event_id="last")
    setup.settle()
    assert not setup.recorder.record(customer, {"tokens": 100}, event_id="last").recorded


def test_zero_units_are_not_billed_and_bad_input_is_refused_up_front(setup: Setup) -> None:
    """No units: no admission, nothing charged (even at zero credits). An unknown meter, a meter a record
    cannot add to, a negative or non-integer value or an empty event id raise UsageError."""
    broke = setup.customer("tokens")
    assert setup.recorder.record(broke, {"tokens": 0}, event_id="zero").reserved_credits == 0
    bad: list[tuple[Any, str]] = [
        ({"nope": 1}, "x"),
        ({"calls": 1}, "x"),
        ({"peak": 1}, "x"),
        ({"tokens": -1}, "x"),
        ({"tokens": 1.5}, "x"),
        ({"tokens": True}, "x"),
        ({}, "x"),
        ({"tokens": 1}, ""),
    ]
    for units, event_id in bad:
        with pytest.raises(UsageError):
            setup.recorder.record(broke, units, event_id=event_id)
    setup.settle()
    assert setup.accounts.usage(broke).meters.get("tokens", 0) == 0


def test_an_unknown_or_suspended_customer_is_refused(setup: Setup) -> None:
    """As for a call: unknown_customer, then suspended (checked in the atomic admission)."""
    for unknown in ("nobody-here", "not a customer id"):
        with pytest.raises(Refused) as refused:
            setup.recorder.record(unknown, {"tokens": 1}, event_id="u")
        assert refused.value.reason == "unknown_customer"
    customer = setup.customer("tokens", credits="1.00")
    setup.accounts.set_status(customer, "suspended")
    with pytest.raises(Refused) as refused:
        setup.recorder.record(customer, {"tokens": 1}, event_id="s")
    assert refused.value.reason == "suspended"


def test_records_do_not_take_the_plans_call_rate_limit(setup: Setup) -> None:
    """The plan allows 1 call a minute; records are not calls: three in a row are all admitted."""
    customer = setup.customer("tokens", credits="1.00")
    for number in range(3):
        setup.recorder.record(customer, {"tokens": 1}, event_id=f"r-{number}")


def test_arecord_charges_refuses_and_deduplicates(setup: Setup) -> None:
    """The asyncio twin: the same charge, refusal and deduplication."""
    customer = setup.customer("tokens", credits="0.02")  # 200 tokens' worth

    async def main() -> list[bool]:
        recorder = setup.recorder
        first = await recorder.arecord(customer, {"tokens": 150}, event_id="a-1")
        again = await recorder.arecord(customer, {"tokens": 150}, event_id="a-1")
        with pytest.raises(Refused) as refused:
            await recorder.arecord(customer, {"tokens": 51}, event_id="a-2")
        assert refused.value.reason == "insufficient_credits"
        await recorder.aclose()
        return [first.recorded, again.recorded]

    assert asyncio.run(main()) == [True, False]
    RollupWorker(setup.accounts.storage, setup.config).drain()
    assert setup.accounts.balance(customer).balance == 20_000 - 150 * TOKEN_PRICE


def test_concurrent_records_never_spend_more_than_the_balance(setup: Setup) -> None:
    """200 records of 10 tokens (0.001 credits each) from 32 threads against 0.05 credits: exactly 50 are
    admitted, the others refused, and the balance ends at zero, never below."""
    customer = setup.customer("tokens", credits="0.05")
    outcomes: list[str] = []
    lock = threading.Lock()
    numbers = iter(range(200))

    def work() -> None:
        while True:
            with lock:
                number = next(numbers, None)
            if number is None:
                return
            try:
                setup.recorder.record(customer, {"tokens": 10}, event_id=f"c-{number}")
                outcome = "recorded"
            except Refused as refused:
                outcome = refused.reason
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=work) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (outcomes.count("recorded"), outcomes.count("insufficient_credits")) == (50, 150)
    setup.settle()
    balance = setup.accounts.balance(customer)
    assert (balance.balance, balance.reserved) == (0, 0)
    assert setup.accounts.usage(customer).meters["tokens"] == 500


def test_concurrent_arecords_never_spend_more_than_the_balance(storage_url: str, tmp_path: Path) -> None:
    """200 arecord()s gathered on one loop against 0.05 credits: exactly 50 are charged."""
    setup = Setup(storage_url, tmp_path / "spool")
    customer = setup.customer("tokens", credits="0.05")

    async def one(number: int) -> bool:
        try:
            await setup.recorder.arecord(customer, {"tokens": 10}, event_id=f"a-{number}")
        except Refused:
            return False
        return True

    async def main() -> list[bool]:
        results = await asyncio.gather(*(one(number) for number in range(200)))
        await setup.recorder.aclose()
        return list(results)

    assert asyncio.run(main()).count(True) == 50
    RollupWorker(setup.accounts.storage, setup.config).drain()
    assert setup.accounts.balance(customer).balance == 0
    assert setup.accounts.usage(customer).meters["tokens"] == 500
    setup.accounts.close()


def test_the_module_level_record_uses_the_configuration_of_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``meterware.record`` builds its recorder from METERWARE_CONFIG in a process that only has the
    configuration (a queue consumer), and what it buffered is written when the recorder closes."""
    from meterware import recording
    from meterware.metering import facade

    storage = f"memory://{uuid.uuid4().hex}"
    path = tmp_path / "meterware.toml"
    path.write_text(
        f'storage = "{storage}"\n'
        '[meters.tokens]\naggregation = "sum"\nsource = "handler"\n'
        '[plans.tokens]\nprepaid = true\n[plans.tokens.meters.tokens]\nprice = "0.0001"\n'
        f'[pipeline]\nspool_dir = "{tmp_path / "spool"}"\n'
    )
    monkeypatch.setenv("METERWARE_CONFIG", str(path))
    monkeypatch.setattr(recording, "_default", None)
    monkeypatch.setattr(facade, "_first_config", None)
    accounts = Accounts.open(Config.from_file(path))
    accounts.create_customer("worker-job", plan="tokens")
    accounts.grant_credits("worker-job", "1.00")
    assert meterware.record("worker-job", {"tokens": 1000}, event_id="q-1").recorded
    recorder = recording.default_recorder()
    recorder.close()
    assert accounts.balance("worker-job").balance == 1_000_000 - 1000 * TOKEN_PRICE


def test_the_module_level_record_uses_the_middlewares_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a process that runs the middleware (made with its configuration, not the environment's),
    ``meterware.record`` charges through that configuration's backend."""
    from meterware import recording
    from meterware.metering import facade
    from meterware.wsgi import WSGIMeteringMiddleware

    monkeypatch.delenv("METERWARE_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./meterware.toml
    monkeypatch.setattr(recording, "_default", None)
    monkeypatch.setattr(facade, "_first_config", None)
    config = recording_config(f"memory://{uuid.uuid4().hex}", tmp_path / "spool")
    WSGIMeteringMiddleware(lambda environ, start_response: [], config)
    accounts = Accounts.open(config)
    accounts.create_customer("web-job", plan="tokens")
    accounts.grant_credits("web-job", "1.00")
    assert meterware.record("web-job", {"tokens": 10}, event_id="m-1").recorded
    recording.default_recorder().close()
    assert accounts.balance("web-job").balance == 1_000_000 - 10 * TOKEN_PRICE


def test_calls_and_records_share_one_balance_without_passing_it(setup: Setup) -> None:
    """100 calls (0.01 credits each) through the WSGI middleware and 100 records (0.001 each) from 32
    threads against 0.10 credits: whatever the interleaving, what is admitted costs at most the balance,
    and exactly what was admitted is charged (the settled balance is 0.10 minus it, never below zero)."""
    from werkzeug.test import Client

    from meterware.wsgi import WSGIMeteringMiddleware

    def app(environ: Any, start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    customer = setup.customer("mixed", credits="0.10")
    middleware = WSGIMeteringMiddleware(app, setup.config, customer_getter=lambda environ: customer)
    admitted = {"calls": 0, "records": 0}
    lock = threading.Lock()
    work = iter([("call", number) for number in range(100)] + [("record", number) for number in range(100)])
    jobs = sorted(work, key=lambda job: (job[1], job[0]))  # interleaved: call 0, record 0, call 1...

    def worker(mine: list[tuple[str, int]]) -> None:
        client = Client(middleware)
        for kind, number in mine:
            if kind == "call":
                # Buffered: the body is read to its end and the response closed, as a server does.
                ok = client.get("/v1/work", buffered=True).status_code == 200
            else:
                try:
                    setup.recorder.record(customer, {"tokens": 10}, event_id=f"m-{number}")
                    ok = True
                except Refused:
                    ok = False
            with lock:
                admitted["calls" if kind == "call" else "records"] += ok

    threads = [threading.Thread(target=worker, args=(jobs[start::32],)) for start in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    spent = admitted["calls"] * 10_000 + admitted["records"] * 10 * TOKEN_PRICE
    assert 90_000 < spent <= 100_000  # refused only once less than a call's price was left
    middleware.drain()
    setup.settle()
    balance = setup.accounts.balance(customer)
    assert (balance.balance, balance.reserved) == (100_000 - spent, 0)
    usage = setup.accounts.usage(customer)
    assert (usage.meters.get("calls", 0), usage.meters.get("tokens", 0)) == (
        admitted["calls"],
        admitted["records"] * 10,
    )


def lose_buffer(recorder: Recorder) -> None:
    """The process dies before its flusher writes: what it buffered is gone (its reservations stay)."""
    recorder.metering.batcher.buffer.take(10**6)
    recorder.close()


def test_a_record_lost_before_its_flush_is_charged_by_its_retry(setup: Setup) -> None:
    """The process dies after admitting a record and before its flush: a retry with the same event id (from
    another process) is recorded and charged, once (the usage is never lost for good)."""
    customer = setup.customer("tokens", credits="1.00")
    crashing = setup.held()
    assert crashing.record(customer, {"tokens": 100}, event_id="crash").recorded
    lose_buffer(crashing)
    retry = setup.recorder.record(customer, {"tokens": 100}, event_id="crash")
    assert retry.recorded
    assert retry.stream_event_id
    setup.settle()
    assert not setup.recorder.record(customer, {"tokens": 100}, event_id="crash").recorded
    setup.settle()
    assert setup.charges(customer) == [-100 * TOKEN_PRICE]
    assert setup.accounts.balance(customer).balance == 1_000_000 - 100 * TOKEN_PRICE
    assert setup.accounts.usage(customer).meters["tokens"] == 100


def test_one_event_id_admitted_by_two_processes_at_once_is_charged_once(setup: Setup) -> None:
    """Two processes admit the same event id before either flushes: the flush charges it once and releases
    the other's reservation (balance and reserved exact to the micro-credit); the stream holds one event."""
    customer = setup.customer("tokens", credits="1.00")
    first, second = setup.held(), setup.held()
    first.record(customer, {"tokens": 100}, event_id="twice")
    second.record(customer, {"tokens": 100}, event_id="twice")
    first.close()
    second.close()
    balance = setup.accounts.balance(customer)
    assert (balance.balance, balance.reserved) == (1_000_000 - 100 * TOKEN_PRICE, 0)
    assert setup.charges(customer) == [-100 * TOKEN_PRICE]
    setup.settle()
    assert setup.accounts.usage(customer).meters["tokens"] == 100
    assert not setup.recorder.record(customer, {"tokens": 100}, event_id="twice").recorded


def test_one_event_id_recorded_by_threads_and_tasks_at_once_is_charged_once(setup: Setup) -> None:
    """16 threads, then 16 gathered tasks, record one event id each: one is recorded, the others are told
    it was recorded before once it is charged; one charge, nothing left reserved."""
    customer = setup.customer("tokens", credits="1.00")
    told: list[bool] = []
    threads = [
        threading.Thread(
            target=lambda: told.append(setup.recorder.record(customer, {"tokens": 10}, event_id="t").recorded)
        )
        for _ in range(16)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    async def main() -> list[bool]:
        done = await asyncio.gather(
            *(setup.recorder.arecord(customer, {"tokens": 20}, event_id="a") for _ in range(16))
        )
        await setup.recorder.aclose()
        return [each.recorded for each in done]

    gathered = asyncio.run(main())
    assert (told.count(True), gathered.count(True)) == (1, 1)
    balance = setup.accounts.balance(customer)
    assert (balance.balance, balance.reserved) == (1_000_000 - 30 * TOKEN_PRICE, 0)


def test_a_duplicate_is_told_recorded_before_only_once_its_original_is_charged(setup: Setup) -> None:
    """A retry while the original is still buffered (holding the last credits) is neither refused nor told
    "recorded before" while the original could still be lost: it is answered once the original is charged."""
    customer = setup.customer("tokens", credits="0.01")  # 100 tokens' worth
    recorder = setup.held()
    assert recorder.record(customer, {"tokens": 100}, event_id="held").recorded
    again = recorder.record(customer, {"tokens": 100}, event_id="held")
    assert not again.recorded
    balance = setup.accounts.balance(customer)
    assert (balance.balance, balance.reserved) == (0, 0)
    assert setup.charges(customer) == [-10_000]
    recorder.close()
