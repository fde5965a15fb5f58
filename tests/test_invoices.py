"""Invoices end to end: real traffic through the middleware and the rollup, previews, close, late events."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest
import redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import meterware
from meterware import Accounts, Config, MeteringMiddleware
from meterware.cli import main
from meterware.errors import StorageError, UsageError
from meterware.metering.records import Customer
from meterware.rollup import RollupWorker
from meterware.storage import _keyspace as ks
from meterware.storage import open_storage
from meterware.storage.base import Billed, Storage
from tests.helpers import lifespan

DAY = 86_400


def settings(storage: str) -> dict[str, Any]:
    """Daily periods, so one test can close a period by looking one day ahead (``at``)."""
    return {
        "storage": {"url": storage, "shards": 4},
        "meters": {"calls": {}, "tokens": {"aggregation": "sum", "source": "handler"}},
        "plans": {
            # 49 base fee, 100 minimum; 2 calls included then 0.5 each; tokens 0.02 per started 1,000.
            "pro": {
                "period": "day",
                "base_fee": "49.00",
                "minimum": "100.00",
                "meters": {
                    "calls": {"included": 2, "price": "0.5"},
                    "tokens": {"package": {"size": 1000, "price": "0.02"}},
                },
            },
            # 1-3 at 1.00, 4-5 at 0.50 + 2.00 flat, then 0.10.
            "scale": {
                "period": "day",
                "currency": "EUR",
                "meters": {
                    "calls": {
                        "tier_mode": "graduated",
                        "tiers": [
                            {"up_to": 3, "price": "1"},
                            {"up_to": 5, "price": "0.5", "flat": "2"},
                            {"price": "0.1"},
                        ],
                    }
                },
            },
            "payg": {"period": "day", "prepaid": True, "meters": {"calls": {"price": "0.25"}}},
        },
        "pipeline": {"flush_interval": 0.01},
        "policy": {"timeout": 5.0},
    }


async def chat(request: Request) -> PlainTextResponse:
    meterware.usage.add("tokens", int(request.query_params.get("tokens", "0")))
    return PlainTextResponse("ok")


class Api:
    """A Starlette app behind the middleware, its accounts, and the rollup worker."""

    def __init__(self, storage: str) -> None:
        self.config = Config.from_dict(settings(storage))
        self.storage = open_storage(self.config.storage, shards=self.config.shards)
        self.accounts = Accounts(self.storage, self.config)
        self.app = MeteringMiddleware(Starlette(routes=[Route("/v1/chat", chat)]), config=self.config)
        self.keys: dict[str, str] = {}
        # One worker: it keeps its shard leases from one drain to the next.
        self.worker = RollupWorker(self.storage, self.config)

    def customer(self, plan: str, *, credits: str | None = None) -> str:
        customer = f"{plan}-{uuid.uuid4().hex[:6]}"
        # The anchor is an hour ago: the period runs 23 more hours, and "tomorrow" is in the next one.
        self.accounts.create_customer(customer, plan=plan, anchor=int(time.time()) - 3600)
        if credits:
            self.accounts.grant_credits(customer, credits)
        self.keys[customer] = self.accounts.create_key(customer).plaintext
        return customer

    def call(self, customer: str, times: int = 1, tokens: int = 0) -> None:
        """Make calls through the middleware (lifespan and all), then roll everything up."""

        async def serve() -> None:
            client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://api")
            headers = {"Authorization": f"Bearer {self.keys[customer]}"}
            async with lifespan(self.app), client:
                for _ in range(times):
                    response = await client.get(f"/v1/chat?tokens={tokens}", headers=headers)
                    assert response.status_code == 200

        asyncio.run(serve())
        self.worker.drain()

    def start(self, customer: str) -> int:
        return self.accounts.invoice(customer).period_start

    def close(self) -> None:
        self.storage.close()


@pytest.fixture(params=["memory", "redis"])
def api(request: pytest.FixtureRequest) -> Iterator[Api]:
    """The API on memory://, then on a real Redis."""
    url = (
        f"memory://{uuid.uuid4().hex}" if request.param == "memory" else request.getfixturevalue("redis_url")
    )
    served = Api(url)
    yield served
    served.close()


def amounts(invoice: meterware.Invoice) -> dict[str, Any]:
    data = invoice.as_dict()
    return {
        "lines": [(line["kind"], line["meter"], line["quantity"], line["amount"]) for line in data["lines"]],
        "adjustments": [(line["meter"], line["quantity"], line["amount"]) for line in data["adjustments"]],
        **{name: data[name] for name in ("subtotal", "credits_applied", "total", "status")},
    }


# -- previews of running periods ---------------------------------------------------------------------------


def test_running_invoice_prices_real_traffic(api: Api) -> None:
    """5 calls with 1,500 tokens each: base fee 49, calls (5 - 2) x 0.5 = 1.50, tokens 8 packages =
    0.16; 50.66 lifted to the 100.00 minimum by a 49.34 line."""
    customer = api.customer("pro")
    api.call(customer, times=5, tokens=1500)
    invoice = api.accounts.invoice(customer)
    assert amounts(invoice) == {
        "lines": [
            ("base_fee", None, None, "49.00"),
            ("usage", "calls", 5, "1.50"),
            ("usage", "tokens", 7500, "0.16"),
            ("minimum", None, None, "49.34"),
        ],
        "adjustments": [],
        "subtotal": "100.00",
        "credits_applied": "0.00",
        "total": "100.00",
        "status": "running",
    }
    assert invoice.total == Decimal("100.00")
    tokens = invoice.as_dict()["lines"][2]
    assert (tokens["included"], tokens["billable"], tokens["packages"]) == (0, 7500, 8)
    assert tokens["pricing"] == "0.02 per 1000 units (partial packages rounded up)"


def test_graduated_tiers_on_real_traffic(api: Api) -> None:
    """7 calls on 1-3 at 1, 4-5 at 0.5 + 2 flat, then 0.1: 3 + 1 + 2 + 0.2 = 6.20 EUR, tiers listed."""
    customer = api.customer("scale")
    api.call(customer, times=7)
    invoice = api.accounts.invoice(customer)
    (line,) = invoice.as_dict()["lines"]
    assert (invoice.currency, line["amount"], str(invoice.total)) == ("EUR", "6.20", "6.20")
    assert [(tier["first"], tier["units"], tier["amount"]) for tier in line["tiers"]] == [
        (1, 3, "3"),
        (4, 2, "3"),
        (6, 2, "0.2"),
    ]


def test_prepaid_usage_is_paid_by_the_credits_charged(api: Api) -> None:
    """On a prepaid plan calls are charged as they go: 4 x 0.25 = 1.00 of credits pays the 1.00 line."""
    customer = api.customer("payg", credits="10")
    api.call(customer, times=4)
    invoice = api.accounts.invoice(customer)
    assert amounts(invoice) == {
        "lines": [("usage", "calls", 4, "1.00")],
        "adjustments": [],
        "subtotal": "1.00",
        "credits_applied": "1.00",
        "total": "0.00",
        "status": "running",
    }
    assert invoice.credits_charged == 1_000_000
    assert api.accounts.balance(customer).balance == 9_000_000


# -- closing periods and late events -----------------------------------------------------------------------


def test_close_freezes_the_invoice_and_late_events_adjust_the_next_period(api: Api) -> None:
    """A closed invoice never changes; late usage of its period is billed once, on the next period."""
    customer = api.customer("scale")
    api.call(customer, times=3)
    first = api.start(customer)
    tomorrow = first + DAY + 60

    (closed,) = api.accounts.close_periods(at=tomorrow, customer_id=customer)
    assert (closed.status, closed.period_start, str(closed.total)) == ("closed", first, "3.00")
    assert api.accounts.close_periods(at=tomorrow, customer_id=customer) == []  # idempotent

    # Two late calls of the closed period (its events carry its period) arrive after the close.
    api.call(customer, times=2)
    assert api.accounts.usage(customer).meters["calls"] == 5  # usage reports count them
    assert api.accounts.invoice(customer, period_start=first) == closed  # the closed invoice does not
    running = api.accounts.invoice(customer, at=tomorrow)
    assert running.period_start == first + DAY
    # Priced with the closed period's tiers: 5 calls cost 3 + 1 + 2 flat = 6, 3.00 more than billed.
    assert amounts(running)["adjustments"] == [("calls", 2, "3.00")]
    assert running.adjustments[0].period_start == first
    assert str(running.total) == "3.00"

    # Closing the next period freezes the adjustment into it; the period after owes nothing more.
    (second,) = api.accounts.close_periods(at=tomorrow + DAY, customer_id=customer)
    assert amounts(second)["adjustments"] == [("calls", 2, "3.00")]
    assert api.accounts.invoice(customer, at=tomorrow + DAY).adjustments == ()
    # One more late call of the first period, its 6th: billed alone, at the 0.10 of the last tier.
    api.call(customer)
    third = api.accounts.invoice(customer, at=tomorrow + DAY)
    assert amounts(third)["adjustments"] == [("calls", 1, "0.10")]
    assert api.accounts.invoice(customer, period_start=first) == closed
    assert api.accounts.invoice(customer, period_start=first + DAY) == second


def test_late_usage_counts_towards_the_closed_period_minimum(api: Api) -> None:
    """A period lifted to its minimum absorbs late usage: 2 late calls at 0.5 only shrink its minimum line."""
    customer = api.customer("pro")
    api.call(customer, times=3)  # 49 + 0.50, lifted by 50.50
    first = api.start(customer)
    (closed,) = api.accounts.close_periods(at=first + DAY, customer_id=customer)
    assert str(closed.total) == "100.00"
    api.call(customer, times=2)
    running = api.accounts.invoice(customer, at=first + DAY)
    assert [(line.kind, line.quantity, str(line.amount)) for line in running.adjustments] == [
        ("adjustment", 2, "1.00"),
        ("adjustment", None, "-1.00"),
    ]
    # This period's own 49 + 100 minimum; the adjustments add nothing.
    assert str(running.total) == "100.00"


def test_every_ended_period_closes_once_in_order(api: Api) -> None:
    """Periods that ended are closed oldest first, each once; an empty one still bills its base fee."""
    customer = api.customer("pro")
    first = api.start(customer)
    closed = api.accounts.close_periods(at=first + 3 * DAY, customer_id=customer)
    assert [invoice.period_start for invoice in closed] == [first, first + DAY, first + 2 * DAY]
    assert {str(invoice.total) for invoice in closed} == {"100.00"}
    assert api.accounts.close_periods(at=first + 3 * DAY) == []


def test_concurrent_closers_agree(api: Api) -> None:
    """Closers racing on one period freeze one invoice: each returns the same, one says it froze it."""
    customer = api.customer("scale")
    api.call(customer, times=4)
    first = api.start(customer)
    results: list[list[meterware.Invoice]] = []

    def close() -> None:
        accounts = Accounts(open_storage(api.config.storage, shards=api.config.shards), api.config)
        results.append(accounts.close_periods(at=first + DAY, customer_id=customer))
        accounts.close()

    threads = [threading.Thread(target=close) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(len(found) for found in results) == [0, 0, 0, 1]
    assert api.accounts.invoice(customer, period_start=first) == next(found[0] for found in results if found)


def test_a_period_start_must_be_one(api: Api) -> None:
    """Asking for the invoice of an instant that starts no period names the start of the one around it."""
    customer = api.customer("pro")
    first = api.start(customer)
    with pytest.raises(UsageError, match=f"starts at {first}"):
        api.accounts.invoice(customer, period_start=first + 1)


@pytest.fixture(params=["memory", "redis", "cluster"])
def backend(request: pytest.FixtureRequest) -> Iterator[Storage]:
    """The storage contract's backends: memory, a real Redis, a real 3-node Redis Cluster."""
    if request.param == "memory":
        url = f"memory://{uuid.uuid4().hex}"
    else:
        url = request.getfixturevalue("redis_url" if request.param == "redis" else "cluster_url")
    storage = open_storage(url, shards=8, timeout=5.0)
    storage.create_customer(Customer("acme", "pro"))
    yield storage
    storage.close()


def test_close_period_contract(backend: Storage) -> None:
    """A period freezes once; a close computed from an older billed version writes nothing."""
    assert backend.read_billed("acme") == Billed(0, {})
    assert backend.read_invoice("acme", 100) is None
    assert backend.close_period("acme", 100, "first", {100: "a"}, 0) == "closed"
    assert backend.close_period("acme", 100, "second", {100: "b"}, 1) == "exists"
    assert backend.close_period("acme", 200, "late", {200: "c", 100: "d"}, 0) == "conflict"
    assert (backend.read_invoice("acme", 100), backend.read_invoice("acme", 200)) == ("first", None)
    assert backend.close_period("acme", 200, "next", {200: "c", 100: "d"}, 1) == "closed"
    assert backend.read_billed("acme") == Billed(2, {100: "d", 200: "c"})
    assert backend.read_billed("nobody") == Billed(0, {})


@pytest.mark.redis
def test_a_close_that_cannot_be_written_changes_nothing(redis_url: str) -> None:
    """A clobbered billed record refuses the close before any write: no invoice is frozen."""
    api = Api(redis_url)
    customer = api.customer("pro")
    first = api.start(customer)
    client = redis.Redis.from_url(redis_url)
    shard = ks.shard_of(customer, api.config.shards)
    client.set(ks.billed(shard, customer), "not a hash")
    with pytest.raises(StorageError, match="WRONGTYPE"):
        api.accounts.close_periods(at=first + DAY, customer_id=customer)
    assert client.exists(ks.invoice(shard, customer, first)) == 0
    client.delete(ks.billed(shard, customer))
    client.hset(ks.billed(shard, customer), "v", "1.5")
    with pytest.raises(StorageError, match="BADVALUE"):
        api.accounts.close_periods(at=first + DAY, customer_id=customer)
    assert client.exists(ks.invoice(shard, customer, first)) == 0
    client.close()
    api.close()


# -- the command line --------------------------------------------------------------------------------------


def test_cli_invoice_json_csv_and_close(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """`meterware invoice` prints the preview as text, JSON or CSV; `periods close` freezes it."""
    url = f"memory://{uuid.uuid4().hex}"
    config = tmp_path / "meterware.toml"
    config.write_text(_toml(settings(url)), encoding="utf-8")
    api = Api(url)
    customer = api.customer("pro")
    api.call(customer, times=5, tokens=1500)

    def run(*args: str) -> str:
        capsys.readouterr()
        assert main([*args, "--config", str(config)]) == 0
        return capsys.readouterr().out

    text = run("invoice", customer)
    assert "minimum commitment of 100.00" in text
    assert text.splitlines()[-1].split() == ["total", "100.00"]
    data = json.loads(run("invoice", customer, "--json"))
    assert (data["status"], data["total"], data["currency"]) == ("running", "100.00", "USD")
    rows = list(csv.DictReader(io.StringIO(run("invoice", customer, "--csv"))))
    assert [(row["kind"], row["meter"], row["amount"]) for row in rows] == [
        ("base_fee", "", "49.00"),
        ("usage", "calls", "1.50"),
        ("usage", "tokens", "0.16"),
        ("minimum", "", "49.34"),
        ("subtotal", "", "100.00"),
        ("credits_applied", "", "0.00"),
        ("total", "", "100.00"),
    ]
    start = data["period_start"]
    assert run("periods", "close", "--customer", customer, "--json") == "[]\n"  # nothing has ended yet
    closed = json.loads(run("periods", "close", "--customer", customer, "--at", str(start + DAY), "--json"))
    assert [(invoice["period_start"], invoice["status"], invoice["total"]) for invoice in closed] == [
        (start, "closed", "100.00")
    ]
    frozen = json.loads(run("invoice", customer, "--period", str(start), "--json"))
    assert frozen == closed[0]
    assert (
        "  calls: no quota, 0 included, graduated: 1-3 at 1, 4-5 at 0.5 + 2 flat, 6+ at 0.1"
        in run("plans", "list").splitlines()
    )

    capsys.readouterr()
    assert main(["invoice", customer, "--json", "--csv", "--config", str(config)]) == 1
    assert capsys.readouterr().err == "meterware: error: choose one of --json and --csv\n"
    assert main(["invoice", customer, "--period", "soon", "--config", str(config)]) == 1
    assert capsys.readouterr().err.endswith(
        "error: --period must be epoch seconds or a date like 2026-11-01, got 'soon'\n"
    )
    api.close()


def _toml(data: dict[str, Any], prefix: str = "") -> str:
    """A small TOML writer for the test settings: tables, then inline values (strings, numbers, lists)."""
    scalars, tables = [], []
    for key, value in data.items():
        if isinstance(value, dict) and key != "package":
            tables.append(_toml(value, f"{prefix}{key}."))
        else:
            scalars.append(f"{key} = {_value(value)}")
    head = f"[{prefix[:-1]}]\n" if prefix and (scalars or not tables) else ""
    return head + "".join(f"{line}\n" for line in scalars) + "".join(tables)


def _value(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key} = {_value(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    return json.dumps(value)


def test_cli_invoice_of_an_unknown_customer_or_before_the_first_period_is_refused(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """No invoice (nor base fee, nor minimum) for a customer that does not exist, or for a period that
    ended before the customer's billing anchor: an error naming it, exit status 1."""
    url = f"memory://{uuid.uuid4().hex}"
    config = tmp_path / "meterware.toml"
    config.write_text(_toml(settings(url)), encoding="utf-8")
    api = Api(url)
    customer = api.customer("pro")
    anchor = api.accounts.customer(customer).anchor

    def fails(*args: str) -> str:
        capsys.readouterr()
        assert main([*args, "--config", str(config)]) == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        return captured.err.splitlines(keepends=True)[-1]  # after memory://'s note

    assert fails("invoice", "ghost") == "meterware: error: no customer 'ghost'\n"
    for before in (str(anchor - 1), str(anchor - 40 * DAY), "2001-01-01"):
        assert fails("invoice", customer, "--period", before) == (
            f"meterware: error: {customer} has no billing period before its first, which starts at "
            f"{datetime.fromtimestamp(anchor, UTC):%Y-%m-%d %H:%M:%S}Z ({anchor})\n"
        )
    capsys.readouterr()
    assert main(["invoice", customer, "--period", str(anchor), "--json", "--config", str(config)]) == 0
    assert json.loads(capsys.readouterr().out)["period_start"] == anchor
    api.close()
