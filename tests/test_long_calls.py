"""A call running past ``policy.reservation_timeout`` keeps its reservation while its process lives: the
flusher renews the deadlines of the calls in flight, so the worker refunds only a dead process's holds.

Hand-computed: a prepaid plan at 0.01 a call (10,000 micro-credits), 1.00 granted, a concurrency cap of 1
and a reservation timeout of 2 s; the worker runs in-process, as ``meterware rollup`` would.
"""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from werkzeug.test import Client

from meterware import Accounts, Config, MeteringMiddleware
from meterware.config import Pipeline, Plan
from meterware.errors import StorageError
from meterware.metering.admission import AdmitRequest, Decision
from meterware.metering.batcher import Batcher
from meterware.metering.calls import Call
from meterware.metering.inflight import CallsInFlight, Renewal
from meterware.metering.records import Customer, KeyInfo
from meterware.rollup import RollupWorker
from meterware.usage import CallUsage
from meterware.wsgi import WSGIMeteringMiddleware

RESERVATION_TIMEOUT = 2.0
PRICE = 10_000
GRANTED = 1_000_000


@pytest.fixture
def config(backend_url: str, tmp_path: Path) -> Config:
    return Config.from_dict(
        {
            "storage": {"url": backend_url, "shards": 4},
            "meters": {"calls": {"aggregation": "count", "source": "call"}},
            "plans": {"payg": {"prepaid": True, "concurrency": 1, "meters": {"calls": {"price": "0.01"}}}},
            "pipeline": {"flush_interval": 0.05, "spool_dir": str(tmp_path / "spool")},
            "policy": {"timeout": 5.0, "reservation_timeout": RESERVATION_TIMEOUT},
        }
    )


@pytest.fixture
def accounts(config: Config) -> Iterator[Accounts]:
    accounts = Accounts.open(config)
    accounts.create_customer("acme", plan="payg")
    accounts.grant_credits("acme", "1.00")
    yield accounts
    accounts.close()


class SlowApp:
    """``/v1/slow`` runs until released; any other path answers at once."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, environ: Any, start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/v1/slow":
            self.entered.set()
            self.release.wait(30)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]


def test_a_call_running_past_the_reservation_timeout_keeps_its_slot_and_is_charged_once(
    config: Config, accounts: Accounts
) -> None:
    """Cap 1: a call still running 2.5 s after its admission (timeout 2 s), with the worker refunding what
    is past its deadline, still holds its slot (another call meanwhile: 429 concurrency_exceeded) and its
    0.01 (reserved); once it ends, the next call is served. Two calls served: 0.02 charged, in two charges
    of 0.01, nothing left reserved, nothing refunded by the worker."""
    app = SlowApp()
    middleware = WSGIMeteringMiddleware(app, config, customer_getter=lambda environ: "acme")
    worker = RollupWorker(accounts.storage, config, owner="test")
    try:
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(lambda: Client(middleware).get("/v1/slow", buffered=True).status_code)
            assert app.entered.wait(10)
            time.sleep(RESERVATION_TIMEOUT + 0.5)  # past the deadline its admission set
            worker.drain()  # the worker refunds every reservation past its deadline
            held = accounts.balance("acme")
            meanwhile = Client(middleware).get("/v1/hello", buffered=True)
            app.release.set()
            assert slow.result(10) == 200
        assert (held.balance, held.reserved) == (GRANTED, PRICE)
        assert meanwhile.status_code == 429
        assert json.loads(meanwhile.get_data())["reason"] == "concurrency_exceeded"
        middleware.drain()
        assert Client(middleware).get("/v1/hello", buffered=True).status_code == 200
    finally:
        app.release.set()
        middleware.drain()  # stops the flusher thread
        middleware.clients.flusher.storage.close()
        middleware.clients.storage.close()
    worker.drain()
    assert_charged_once(accounts, calls=2)


def assert_charged_once(accounts: Accounts, calls: int) -> None:
    """Each call served is charged once (0.01), and nothing is left reserved."""
    balance = accounts.balance("acme")
    assert (balance.balance, balance.reserved) == (GRANTED - calls * PRICE, 0)
    charges = [entry.amount for entry in accounts.ledger("acme") if entry.kind == "charge"]
    assert sum(charges) == -calls * PRICE


def test_an_asgi_stream_held_open_past_the_reservation_timeout_keeps_its_slot(
    config: Config, accounts: Accounts
) -> None:
    """The same through the ASGI middleware (its flusher an asyncio task, started by the stream itself): a
    streamed response held open 2.5 s holds its slot and its 0.01 through the worker's refunds; the call
    meanwhile is refused, the one after it ends is served; two charges of 0.01."""
    release, streaming = asyncio.Event(), asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        if scope["path"] == "/v1/stream":
            await send({"type": "http.response.body", "body": b"first", "more_body": True})
            streaming.set()
            await release.wait()
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = MeteringMiddleware(
        app, config, customer_getter=lambda scope: "acme", registry=CollectorRegistry()
    )
    worker = RollupWorker(accounts.storage, config, owner="test")

    async def run() -> tuple[Any, httpx.Response, int, int]:
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            stream = asyncio.create_task(client.get("/v1/stream"))
            try:
                await asyncio.wait_for(streaming.wait(), 10)
                await asyncio.sleep(RESERVATION_TIMEOUT + 0.5)  # past the deadline its admission set
                worker.drain()
                held = accounts.balance("acme")
                meanwhile = await client.get("/v1/hello")
            finally:
                release.set()
                streamed = (await stream).status_code
            await middleware.drain()
            after = (await client.get("/v1/hello")).status_code
        await middleware.clients.aclose()
        return held, meanwhile, streamed, after

    held, meanwhile, streamed, after = asyncio.run(run())
    assert (held.balance, held.reserved) == (GRANTED, PRICE)
    assert meanwhile.status_code == 429
    assert meanwhile.json()["reason"] == "concurrency_exceeded"
    assert (streamed, after) == (200, 200)
    worker.drain()
    assert_charged_once(accounts, calls=2)


def make_call(reservation_id: str, started_ns: int) -> Call:
    plan = Plan("payg", concurrency=1)
    request = AdmitRequest(0, "acme", "", True, plan, 0, 86_400, (), reservation_id, 3000)
    key = KeyInfo("", Customer("acme", "payg"), True, "")
    decision = Decision(True, reservation_id=reservation_id)
    return Call(key, request, decision, "GET", "/v1/slow", started_ns, CallUsage({}))


def test_only_calls_running_a_third_of_their_timeout_are_renewed_and_ended_ones_are_forgotten() -> None:
    """Timeout 3 s: a call admitted 1.1 s ago is due, one admitted now is not; once renewed, it is due again
    1 s after the renewal. A call that finished, or that nothing refers to any more (never finished by its
    adapter), is forgotten: its reservation is its settlement's, or the worker's, to close."""
    now = time.perf_counter_ns()
    in_flight = CallsInFlight()
    old, young = make_call("old", now - 1_100_000_000), make_call("young", now)
    finished, dropped = make_call("finished", now - 2_000_000_000), make_call("dropped", now - 2_000_000_000)
    for call in (old, young, finished, dropped):
        in_flight.add(call)
    finished.finished = True
    del dropped, call  # no reference left: collected
    renewal = in_flight.due()
    assert renewal is not None
    assert [request.reservation_id for request in renewal.admissions] == ["old"]
    in_flight.renewed(renewal, None)
    assert in_flight.due() is None
    assert in_flight.running() == 2  # old and young
    in_flight.renewed(Renewal([old], now - 1_000_000_000), None)  # as if renewed a second ago
    again = in_flight.due()
    assert again is not None
    assert [request.reservation_id for request in again.admissions] == ["old"]
    in_flight.renewed(again, StorageError("down"))  # a failed renewal: due again with the next pass
    assert in_flight.due() is not None


def test_calls_that_ended_are_forgotten_while_the_flusher_backs_off(tmp_path: Path) -> None:
    """During an outage the flusher backs off and renews nothing, but its passes still forget the calls that
    ended: a process serving through a long outage holds only its running calls."""
    batcher = Batcher(Pipeline(spool_dir=str(tmp_path / "spool")))
    calls = [make_call(f"r{index}", time.perf_counter_ns() - 2_000_000_000) for index in range(1000)]
    for call in calls:
        batcher.in_flight.add(call)
    running = calls[0]
    for call in calls[1:]:
        call.finished = True
    batcher.retry_at = time.monotonic() + 60  # backing off
    assert list(batcher.flush_pass(final=False)) == []  # nothing to write, no renewal tried
    assert len(batcher.in_flight._calls) == 1
    assert batcher.in_flight.running() == 1
    running.finished = True
    assert batcher.in_flight.running() == 0


def test_a_pass_interrupted_by_another_midway_finishes() -> None:
    """The garbage collector may run a finalizer, and with it other code (another thread's flush pass),
    in the middle of a pass's walk over the calls: the walk is over a copy, so neither pass fails."""
    in_flight = CallsInFlight()
    calls = [make_call(f"r{index}", time.perf_counter_ns()) for index in range(10_000)]
    for call in calls:
        call.finished = True
        in_flight.add(call)
    inner: list[Renewal | None] = []

    class PassOnCollection:
        """Garbage whose finalizer runs a whole pass (what another thread could do at that moment)."""

        def __init__(self) -> None:
            self.cycle = self  # only the cyclic collector frees it: on the old walk, in its middle

        def __del__(self) -> None:
            inner.append(in_flight.due())

    thresholds = gc.get_threshold()
    gc.collect()
    gc.set_threshold(100)  # a collection within the outer pass's first hundred allocations
    try:
        PassOnCollection()
        outer = in_flight.due()
    finally:
        gc.set_threshold(*thresholds)
    gc.collect()  # the finalizer has run, in the middle of the outer pass or after it
    assert (outer, inner) == (None, [None])
    assert in_flight._calls == {}


def test_two_passes_forgetting_the_same_ended_calls_at_once_both_finish() -> None:
    """Two flush passes may run at once (the exit drain's, under the batcher's lock, and an event loop's
    flusher, which takes none): each forgets the calls that ended, and neither fails on those the other
    forgot first."""
    in_flight = CallsInFlight()
    calls = [make_call(f"r{index}", time.perf_counter_ns()) for index in range(100_000)]
    for call in calls:
        call.finished = True
        in_flight.add(call)
    start = threading.Barrier(2)

    def one_pass() -> Renewal | None:
        start.wait()
        return in_flight.due()

    with ThreadPoolExecutor(2) as pool:
        passes = [pool.submit(one_pass) for _ in range(2)]
        assert [done.result() for done in passes] == [None, None]
    assert in_flight._calls == {}
