"""Per-customer terms: overrides stored with the customer as versions, merged over the plan at admission,
settlement, record() and on invoices (split at each effective time), on memory, Redis and the Cluster."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
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
from meterware.billing.selfservice import AccountView
from meterware.cli import main
from meterware.config._overrides import (
    MAX_VERSIONS,
    TermsVersion,
    check_overrides,
    effective_hour,
    load_versions,
    plan_with,
)
from meterware.errors import ConfigError, StorageError, UsageError
from meterware.metering.admission import meter_holds
from meterware.rollup import RollupWorker
from meterware.storage import _keyspace as ks
from meterware.storage import open_storage
from meterware.storage._keyspace import shard_of
from tests.helpers import lifespan
from tests.portal.test_billing_pages import SECRET, Deployment

HOUR = 3600


def settings(storage: str, *, key_cache_ttl: float = 10.0) -> dict[str, Any]:
    return {
        "storage": {"url": storage, "shards": 4},
        "meters": {"calls": {}, "tokens": {"aggregation": "sum", "source": "handler"}},
        "plans": {
            # Invoiced: tokens at 2 micro-credits each, none included; a 1,000-call hard quota.
            "scale": {
                "period": "day",
                "rate_limits": ["100/second"],
                "meters": {"tokens": {"price": "0.000002"}, "calls": {"quota": 1000}},
            },
            # Prepaid: calls at 0.25 credits each, tokens at 0.001.
            "payg": {
                "period": "day",
                "prepaid": True,
                "meters": {"calls": {"price": "0.25"}, "tokens": {"price": "0.001"}},
            },
        },
        "pipeline": {"flush_interval": 0.01},
        "policy": {"timeout": 5.0, "key_cache_ttl": key_cache_ttl},
    }


@pytest.fixture
def url(backend_url: str) -> str:
    """memory://, a real redis-server, a real 3-node Redis Cluster."""
    return backend_url


@pytest.fixture
def accounts(url: str) -> Iterator[Accounts]:
    config = Config.from_dict(settings(url))
    storage = open_storage(config.storage, shards=config.shards)
    yield Accounts(storage, config)
    storage.close()


def this_hour() -> int:
    return int(time.time()) // HOUR * HOUR


# -- the versions ---------------------------------------------------------------------------------------


def test_versions_are_appended_with_who_when_and_what(accounts: Accounts) -> None:
    """Each set appends a full version; the one in force is the latest effective one; {} is the plan."""
    accounts.create_customer("acme", plan="scale", anchor=this_hour() - 5 * HOUR)
    assert accounts.overrides("acme") == []
    assert accounts.terms("acme") == accounts.config.plan("scale")
    first = accounts.set_overrides(
        "acme", {"tokens.price": "0.000001", "tokens.included": 1000}, effective_from=this_hour(), actor="ann"
    )
    assert (first.effective_from, first.actor) == (this_hour(), "ann")
    assert dict(first.overrides) == {"tokens.price": "0.000001", "tokens.included": "1000"}
    terms = accounts.terms("acme")
    assert (terms.meters["tokens"].price, terms.meters["tokens"].included) == (1, 1000)
    assert terms.meters["calls"].quota == 1000  # untouched terms stay the plan's
    later = accounts.set_overrides(
        "acme", {"calls.quota": "none", "rate_limits": "5/second", "base_fee": "10"}, actor="bob"
    )
    assert later.effective_from == effective_hour(time.time()) > time.time() - 1
    history = accounts.overrides("acme")
    assert [v.actor for v in history] == ["ann", "bob"]
    assert accounts.terms("acme").meters["tokens"].price == 1  # the next hour's version is not yet in force
    ahead = accounts.terms("acme", at=later.effective_from)
    assert ahead.meters["tokens"].price == 2  # a full set: tokens back to the plan's
    assert ahead.meters["calls"].quota is None
    assert [(r.amount, r.seconds) for r in ahead.rate_limits] == [(5, 1)]
    assert ahead.base_fee == Decimal(10)
    accounts.set_overrides("acme", {}, effective_from=later.effective_from, actor="cy")
    assert accounts.terms("acme", at=later.effective_from) == accounts.config.plan("scale")


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        pytest.param({"tokens.price": "-1"}, "must not be negative", id="negative-price"),
        pytest.param({"tokens.price": "0.0000001"}, "at most 6 decimals", id="seventh-decimal"),
        pytest.param({"nope.price": "1"}, "names no meter", id="unknown-meter"),
        pytest.param({"tokens{model=large}.price": "1"}, "a meter with dimensions", id="dimension-filter"),
        pytest.param({"tokens.colour": "1"}, "a meter's term is one of", id="unknown-term"),
        pytest.param({"tokens.included": "lots"}, "whole number", id="bad-units"),
        pytest.param({"tokens.quota_mode": "firm"}, "'hard' or 'soft'", id="bad-mode"),
        pytest.param({"rate_limits": "fast"}, "expected a rate", id="bad-rate"),
        pytest.param({"period": "week"}, "not a term that can be overridden", id="unknown-plan-term"),
        pytest.param({"calls.price": "1000000000"}, "a call may cost at most", id="call-too-dear"),
    ],
)
def test_bad_overrides_are_refused_and_nothing_is_stored(
    accounts: Accounts, overrides: dict[str, Any], problem: str
) -> None:
    """A bad value names its field, and no version is recorded."""
    accounts.create_customer("acme", plan="scale")
    with pytest.raises(UsageError, match=problem):
        accounts.set_overrides("acme", overrides)
    assert accounts.overrides("acme") == []


def test_the_past_is_open_only_back_to_the_current_period(accounts: Accounts) -> None:
    """Closed periods never change: an effective time before the current period's start is refused."""
    accounts.create_customer("acme", plan="scale", anchor=this_hour() - 2 * HOUR)
    accounts.set_overrides("acme", {"tokens.price": "1"}, effective_from=this_hour() - 2 * HOUR)
    with pytest.raises(UsageError, match="start of the current billing period"):
        accounts.set_overrides("acme", {"tokens.price": "1"}, effective_from=this_hour() - 3 * HOUR)


def test_versions_are_bounded(accounts: Accounts) -> None:
    """Past the bound, the oldest versions no longer in force in the current period are dropped; when every
    kept version is still to come, the next one is refused: the record never grows without bound."""
    accounts.create_customer("acme", plan="scale", anchor=this_hour() - 2 * HOUR)
    for price in range(MAX_VERSIONS + 5):
        accounts.set_overrides("acme", {"tokens.price": str(price)}, effective_from=this_hour() - 2 * HOUR)
    kept = accounts.overrides("acme")
    assert len(kept) == MAX_VERSIONS
    assert kept[0].overrides["tokens.price"] == "5.000000"
    assert accounts.terms("acme").meters["tokens"].price == (MAX_VERSIONS + 4) * 1_000_000
    accounts.create_customer("bold", plan="scale", anchor=this_hour() - 2 * HOUR)
    for hours in range(1, MAX_VERSIONS + 1):
        accounts.set_overrides("bold", {"tokens.price": "1"}, effective_from=this_hour() + hours * HOUR)
    with pytest.raises(UsageError, match=f"at most {MAX_VERSIONS} versions"):
        accounts.set_overrides("bold", {"tokens.price": "2"})
    assert len(accounts.overrides("bold")) == MAX_VERSIONS


# -- invoices ---------------------------------------------------------------------------------------------


def test_an_override_prices_the_invoice_from_its_effective_time(url: str, tmp_path: Path) -> None:
    """Plan: tokens at 2 micro-credits. From hour 5 of the period: 1 micro-credit with 1,000 included.
    3,000,000 tokens before (6.00) used the 1,000 up (as the period's counter does on the request path), so
    the 5,001,000 after are all billable (5.001, 5.00 rounded): 11.00, where the plan alone would bill
    8,001,000 x 0.000002 = 16.00 (16.002 rounded)."""
    config = Config.from_dict(settings(url))
    storage = open_storage(config.storage, shards=config.shards)
    accounts = Accounts(storage, config)
    start = this_hour() - 10 * HOUR
    accounts.create_customer("acme", plan="scale", anchor=start)
    events = [(start + HOUR + 60, 3_000_000), (start + 6 * HOUR + 60, 5_001_000)]
    lines = [
        {"id": str(uuid.uuid4()), "customer": "acme", "units": {"tokens": n}, "timestamp": at * 1000}
        for at, n in events
    ]
    path = tmp_path / "usage.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    accounts.import_events(str(path))
    RollupWorker(storage, config).drain()
    assert accounts.invoice("acme").total == Decimal("16.00")
    accounts.set_overrides(
        "acme",
        {"tokens.price": "0.000001", "tokens.included": 1000},
        effective_from=start + 5 * HOUR,
        actor="ann",
    )
    invoice = accounts.invoice("acme")
    usage = [(line.meter, line.quantity, line.included, line.billable, line.amount) for line in invoice.lines]
    assert usage == [
        ("tokens", 3_000_000, 0, 3_000_000, Decimal("6.00")),
        ("tokens", 5_001_000, 0, 5_001_000, Decimal("5.00")),
        ("calls", 0, 0, 0, Decimal("0.00")),
        ("calls", 0, 0, 0, Decimal("0.00")),
    ]
    descriptions = [line.description for line in invoice.lines]
    assert "plan terms" in descriptions[0]
    assert "set by ann" in descriptions[1]
    assert invoice.total == Decimal("11.00")
    storage.close()


def split_invoice(
    url: str, tmp_path: Path, plan: dict[str, Any], usage: list[tuple[int, dict[str, int]]]
) -> Any:
    """The invoice of a customer of ``plan`` (daily, started 10 hours ago) with ``usage`` imported (hour of
    the period, units), once an override of an unrelated term takes effect at hour 5."""
    data = settings(url)
    data["meters"]["seats"] = {"aggregation": "max", "source": "handler"}
    data["plans"]["deal"] = {"period": "day", **plan}
    config = Config.from_dict(data)
    storage = open_storage(config.storage, shards=config.shards)
    accounts = Accounts(storage, config)
    start = this_hour() - 10 * HOUR
    accounts.create_customer("acme", plan="deal", anchor=start)
    lines = [
        {
            "id": str(uuid.uuid4()),
            "customer": "acme",
            "units": units,
            "timestamp": (start + hour * HOUR + 60) * 1000,
        }
        for hour, units in usage
    ]
    path = tmp_path / "usage.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    accounts.import_events(str(path))
    RollupWorker(storage, config).drain()
    before = accounts.invoice("acme")
    accounts.set_overrides("acme", {"rate_limits": "none"}, effective_from=start + 5 * HOUR, actor="ann")
    after = accounts.invoice("acme")
    storage.close()
    return before, after


def test_included_units_are_used_up_once_across_the_parts_of_a_period(url: str, tmp_path: Path) -> None:
    """1,000 tokens included, then 0.001 each: 800 before the override and 800 after use the 1,000 once, as
    the request path's period counter does: 600 billable, 0.60, split or not (each part getting its own
    1,000 billed 0.00)."""
    plan = {"meters": {"tokens": {"price": "0.001", "included": 1000}}}
    before, after = split_invoice(url, tmp_path, plan, [(1, {"tokens": 800}), (7, {"tokens": 800})])
    assert before.total == after.total == Decimal("0.60")
    tokens = [(line.quantity, line.included, line.billable, line.amount) for line in after.lines]
    assert tokens == [(800, 1000, 0, Decimal("0.00")), (800, 200, 600, Decimal("0.60"))]


def test_a_peak_is_priced_once_by_the_terms_at_the_end_of_a_split_period(url: str, tmp_path: Path) -> None:
    """Seats at 4 every hour for 8 hours, 2 included then 5.00 each: the period's peak of 4 is 10.00 with an
    override in force from hour 5 too (the hours' peaks are not added up)."""
    plan = {"meters": {"seats": {"price": "5.00", "included": 2}}}
    before, after = split_invoice(url, tmp_path, plan, [(hour, {"seats": 4}) for hour in range(1, 9)])
    assert before.total == after.total == Decimal("10.00")
    assert [(line.meter, line.quantity, line.amount) for line in after.lines] == [
        ("seats", 4, Decimal("10.00"))
    ]


def test_a_negotiated_seat_price_prices_the_peak() -> None:
    """A ``max`` meter's price and included units are overridable (on its invoice pricing), not its quota:
    a peak of 8 seats, 2 included then 5.00 on the plan, 5 included then 3.00 negotiated: 9.00."""
    data = settings("memory://")
    data["meters"]["seats"] = {"aggregation": "max", "source": "handler"}
    data["plans"]["team"] = {"meters": {"seats": {"price": "5.00", "included": 2}}}
    config = Config.from_dict(data)
    team = config.plans["team"]
    with pytest.raises(ConfigError, match="has no quota"):
        check_overrides({"seats.quota": 10}, config.meters)
    version = TermsVersion(
        0, 0, "ann", check_overrides({"seats.price": "3.00", "seats.included": 5}, config.meters)
    )
    (price,) = plan_with(team, version, config.meters).prices().meters.values()
    assert price.charge(8).amount == Decimal("9.00")
    assert (
        meter_holds(plan_with(team, version, config.meters), config.meters, 1, True) == ()
    )  # never call by call


@pytest.mark.redis
def test_clobbered_stored_terms_are_one_clear_error(redis_url: str) -> None:
    """A customer record whose terms are not what meterware stored is refused with a StorageError naming the
    customer (a Python error from deep in the JSON before), for the key lookup and the CLI alike."""
    config = Config.from_dict(settings(redis_url))
    storage = open_storage(config.storage, shards=config.shards)
    accounts = Accounts(storage, config)
    customer = f"clobbered-{uuid.uuid4().hex[:6]}"
    accounts.create_customer(customer, plan="scale")
    key = accounts.create_key(customer)
    raw = redis.Redis.from_url(redis_url)
    for garbage in ("not json", '["text"]', '[{"effective_from": 1}]'):
        raw.hset(ks.customer(shard_of(customer, config.shards), customer), "terms", garbage)
        load_versions.cache_clear()
        with pytest.raises(
            StorageError, match=f"customer '{customer}': its stored anchor, terms or spend cap are not"
        ):
            storage.resolve_key(key.hash)
    storage.close()


# -- the request path ---------------------------------------------------------------------------------


async def work(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def test_a_running_middleware_charges_the_override_within_the_key_cache_ttl(url: str) -> None:
    """Prepaid calls at 0.25 each; an override of 0.10 (in force since this hour) is charged by the
    running middleware once its key cache (0.2 s) has expired: 10 - 0.25 - 0.10 = 9.65 left."""
    config = Config.from_dict(settings(url, key_cache_ttl=0.2))
    storage = open_storage(config.storage, shards=config.shards)
    accounts = Accounts(storage, config)
    accounts.create_customer("acme", plan="payg", anchor=this_hour() - HOUR)
    accounts.grant_credits("acme", "10")
    plaintext = accounts.create_key("acme").plaintext
    app = MeteringMiddleware(Starlette(routes=[Route("/v1/work", work)]), config=config)

    async def serve() -> list[str]:
        balances = []
        transport = httpx.ASGITransport(app=app)
        async with lifespan(app), httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            headers = {"Authorization": f"Bearer {plaintext}"}
            response = await client.get("/v1/work", headers=headers)
            balances.append(response.headers["x-credits-remaining"])
            accounts.set_overrides("acme", {"calls.price": "0.10"}, effective_from=this_hour(), actor="ops")
            await asyncio.sleep(0.3)
            response = await client.get("/v1/work", headers=headers)
            balances.append(response.headers["x-credits-remaining"])
        return balances

    assert asyncio.run(serve()) == ["9.750000", "9.650000"]
    assert accounts.balance("acme").balance == 9_650_000
    RollupWorker(storage, config).drain()
    assert accounts.usage("acme").spend == 350_000
    storage.close()


def test_quota_and_rate_limit_overrides_are_enforced_at_admission(url: str) -> None:
    """The plan allows 1,000 calls a day and 100 a second; the customer's terms allow 3 calls (hard), and
    1,000 a second: the 4th call is refused 429 quota_exceeded, with the customer's terms in its headers."""
    config = Config.from_dict(settings(url))
    storage = open_storage(config.storage, shards=config.shards)
    accounts = Accounts(storage, config)
    accounts.create_customer("acme", plan="scale", anchor=this_hour() - HOUR)
    accounts.set_overrides(
        "acme", {"calls.quota": 3, "rate_limits": "1000/second"}, effective_from=this_hour(), actor="ops"
    )
    plaintext = accounts.create_key("acme").plaintext
    app = MeteringMiddleware(Starlette(routes=[Route("/v1/work", work)]), config=config)

    async def serve() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            headers = {"Authorization": f"Bearer {plaintext}"}
            responses = [await client.get("/v1/work", headers=headers) for _ in range(4)]
        await app.drain()
        await app.storage.aclose()
        await app.flusher.storage.aclose()
        return responses

    responses = asyncio.run(serve())
    assert [r.status_code for r in responses] == [200, 200, 200, 429]
    assert responses[3].json()["reason"] == "quota_exceeded"
    policy = responses[0].headers["ratelimit-policy"]
    assert '"rate-1s";q=1000' in policy
    assert '"quota-calls";q=3' in policy
    storage.close()


def test_record_charges_the_override(url: str) -> None:
    """record() admits and settles by the customer's terms: 300 tokens at 0.0005 (not 0.001) = 0.15."""
    config = Config.from_dict(settings(url))
    storage = open_storage(config.storage, shards=config.shards)
    accounts = Accounts(storage, config)
    accounts.create_customer("acme", plan="payg", anchor=this_hour() - HOUR)
    accounts.grant_credits("acme", "1")
    accounts.set_overrides("acme", {"tokens.price": "0.0005"}, effective_from=this_hour())
    recorder = meterware.Recorder(config=config)
    try:
        result = recorder.record("acme", {"tokens": 300}, event_id="job-1")
        assert (result.recorded, result.reserved_credits) == (True, 150_000)
    finally:
        recorder.close()
    assert accounts.balance("acme").balance == 850_000
    storage.close()


def test_concurrent_calls_and_records_never_pass_the_credits_at_the_overridden_prices(url: str) -> None:
    """100 calls (0.02 each by the customer's terms, 0.25 by the plan) and 100 records of 100 tokens
    (0.01 each, 0.10 by the plan) at once against 2.00 credits: what was charged is exactly the overridden
    prices of what was served, never more than 2.00, and a refusal means too little was left."""
    config = Config.from_dict(settings(url))
    storage = open_storage(config.storage, shards=config.shards)
    accounts = Accounts(storage, config)
    accounts.create_customer("acme", plan="payg", anchor=this_hour() - HOUR)
    accounts.grant_credits("acme", "2")
    accounts.set_overrides(
        "acme", {"calls.price": "0.02", "tokens.price": "0.0001"}, effective_from=this_hour()
    )
    plaintext = accounts.create_key("acme").plaintext
    app = MeteringMiddleware(Starlette(routes=[Route("/v1/work", work)]), config=config)
    recorder = meterware.Recorder(config=config)

    async def record(number: int) -> bool:
        try:
            await recorder.arecord("acme", {"tokens": 100}, event_id=f"job-{number}")
        except meterware.Refused:
            return False
        return True

    async def serve() -> tuple[list[int], list[bool]]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            headers = {"Authorization": f"Bearer {plaintext}"}
            calls = [client.get("/v1/work", headers=headers) for _ in range(100)]
            responses, records = await asyncio.gather(
                asyncio.gather(*calls), asyncio.gather(*(record(n) for n in range(100)))
            )
        await app.drain()
        await app.storage.aclose()
        await app.flusher.storage.aclose()
        await recorder.aclose()
        return [r.status_code for r in responses], list(records)

    statuses, records = asyncio.run(serve())
    served, recorded = statuses.count(200), records.count(True)
    assert statuses.count(402) == 100 - served
    charged = served * 20_000 + recorded * 10_000
    assert 0 < charged <= 2_000_000
    balance = accounts.balance("acme")
    assert (balance.balance, balance.reserved) == (2_000_000 - charged, 0)
    if served < 100:  # a call needs more than its price left: the tokens it may report are priced
        assert balance.balance <= 20_000
    if recorded < 100:
        assert balance.balance < 10_000
    storage.close()


def test_the_account_endpoint_shows_the_customers_terms(accounts: Accounts) -> None:
    """The caller's account shows its own quota (3, not the plan's 1,000) and included units."""
    accounts.create_customer("acme", plan="scale", anchor=this_hour() - HOUR)
    accounts.set_overrides("acme", {"calls.quota": 3, "tokens.included": 500}, effective_from=this_hour())
    view = AccountView(accounts.config)
    try:
        usage = view.account("acme")["usage"]
    finally:
        view.close()
    assert usage["calls"] == {"used": 0, "included": 0, "quota": 3, "quota_mode": "hard", "remaining": 3}
    assert usage["tokens"]["included"] == 500


# -- the CLI and the portal -------------------------------------------------------------------------------


EXAMPLE = Path(__file__).parent.parent / "examples" / "meterware.toml"


@pytest.mark.redis
def test_cli_sets_and_shows_the_terms_and_the_invoice_names_them(
    redis_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """customers set --override records a version (actor, effective time); customers show prints the terms
    in force next to the plan's and the history; the invoice's line says which terms priced it."""
    monkeypatch.delenv("METERWARE_CONFIG", raising=False)

    def cli(*args: str) -> str:
        capsys.readouterr()
        code = main([*args, "--storage", redis_url, "--config", str(EXAMPLE)])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        return captured.out

    cli("customers", "create", "acme", "--plan", "pro", "--anchor", "1767225600")  # 2026-01-01, monthly
    start = Accounts.open(Config.load(EXAMPLE, storage=redis_url)).invoice("acme").period_start
    cli(
        "customers", "set", "acme",
        "--override", "calls.price=0.0001", "--override", "calls.included=0",
        "--effective", str(start), "--actor", "ann",
    )  # fmt: skip
    shown = cli("customers", "show", "acme")
    assert "  calls.included = 0 (plan: 100000)\n" in shown
    assert "  calls.price = 0.000100 (plan: 0.000500)\n" in shown
    assert "by ann]" in shown
    assert "calls.included=0, calls.price=0.000100" in shown
    data = json.loads(cli("customers", "show", "acme", "--json"))
    assert data["terms"]["calls.price"] == {"value": "0.000100", "plan": "0.000500"}
    assert [(v["actor"], v["effective_from"]) for v in data["overrides"]] == [("ann", start)]
    later = cli("customers", "set", "acme", "--no-overrides", "--json")
    assert [v["overrides"] for v in json.loads(later)["overrides"]] == [
        {"calls.included": "0", "calls.price": "0.000100"},
        {},
    ]
    invoice = json.loads(cli("invoice", "acme", "--json"))
    # The period splits where the empty version takes over (the next full hour): a line per part.
    first, second = [line for line in invoice["lines"] if line["meter"] == "calls"]
    assert "set by ann" in first["description"]
    assert "plan terms" in second["description"]


@pytest.mark.parametrize("backend", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
def test_the_portal_overview_shows_the_negotiated_terms(
    backend: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The overview lists the terms in force next to the plan's, and nothing without overrides."""
    monkeypatch.setenv("METERWARE_PORTAL_SECRET", SECRET)
    url = f"memory://{uuid.uuid4().hex}" if backend == "memory" else request.getfixturevalue("redis_url")
    deployment = Deployment(url)
    try:
        customer = deployment.customer("acme", "daily", this_hour() - HOUR)
        client = deployment.client(customer)
        assert "terms" not in deployment.page(client, "/").tables
        deployment.accounts.set_overrides(
            customer, {"calls.price": "0.25", "calls.included": 10}, effective_from=this_hour(), actor="ann"
        )
        page = deployment.page(client, "/")
        assert page.rows("terms") == [["calls.included", "10", "2"], ["calls.price", "0.250000", "0.500000"]]
        assert page.field("terms.calls.price") == "0.250000"
        assert page.field("usage.calls.included") == "10"  # the usage cards are the customer's terms too
    finally:
        deployment.close()
