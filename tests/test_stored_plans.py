"""Stored plans: plans kept in the backend as versions (who, when, what), parsed by the config's own plan
parser, and seen by every running process within ``policy.key_cache_ttl``; on memory, Redis and the
Cluster."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import pickle
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from meterware import Accounts, Config, MeteringMiddleware
from meterware.cli import main
from meterware.config._stored import MAX_PLAN_VERSIONS, StoredPlans, dump_plan_versions, load_plan_versions
from meterware.errors import ConfigError, UsageError
from meterware.rollup import RollupWorker
from meterware.storage import open_storage
from meterware.wsgi import WSGIMeteringMiddleware
from tests.helpers import lifespan

TTL = 0.2
#: A prepaid plan stored after the app started: calls at 0.05 credits (the config's payg: 0.25).
CHEAP = {"prepaid": True, "meters": {"calls": {"price": "0.05"}}}


def settings(storage: str) -> dict[str, Any]:
    return {
        "storage": {"url": storage, "shards": 4},
        "meters": {"calls": {}, "tokens": {"aggregation": "sum", "source": "handler"}},
        "plans": {
            "payg": {"prepaid": True, "meters": {"calls": {"price": "0.25"}}},
            "scale": {"meters": {"tokens": {"price": "0.000002"}}},
        },
        "pipeline": {"flush_interval": 0.01},
        "policy": {"timeout": 5.0, "key_cache_ttl": TTL},
    }


@pytest.fixture
def url(backend_url: str) -> str:
    """memory://, a real redis-server, a real 3-node Redis Cluster."""
    return backend_url


@pytest.fixture
def accounts(url: str) -> Iterator[Accounts]:
    """The seller's tools: another process's view of the backend (its own Config, its own cache)."""
    config = Config.from_dict(settings(url))
    accounts = Accounts(open_storage(config.storage, shards=config.shards), config)
    yield accounts
    accounts.close()


async def work(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def serve_asgi(config: Config, plaintext: str, between: Any) -> list[str]:
    """Two calls through the ASGI middleware (async driver), ``between()`` run between them, 0.3 s apart
    (past the TTL): the credits left after each."""
    app = MeteringMiddleware(Starlette(routes=[Route("/v1/work", work)]), config=config)

    async def serve() -> list[str]:
        balances = []
        transport = httpx.ASGITransport(app=app)
        async with lifespan(app), httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            headers = {"Authorization": f"Bearer {plaintext}"}
            for step in range(2):
                response = await client.get("/v1/work", headers=headers)
                assert response.status_code == 200
                balances.append(response.headers["x-credits-remaining"])
                if step == 0:
                    between()
                    await asyncio.sleep(TTL + 0.1)
        return balances

    return asyncio.run(serve())


def serve_wsgi(config: Config, plaintext: str, between: Any) -> list[str]:
    """:func:`serve_asgi` through the WSGI middleware (the sync driver)."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    middleware = WSGIMeteringMiddleware(app, config=config)
    balances = []
    with httpx.Client(transport=httpx.WSGITransport(app=middleware), base_url="http://api") as client:
        for step in range(2):
            response = client.get("/v1/work", headers={"Authorization": f"Bearer {plaintext}"})
            assert response.status_code == 200
            balances.append(response.headers["x-credits-remaining"])
            if step == 0:
                between()
                time.sleep(TTL + 0.1)
    middleware.drain()
    return balances


@pytest.mark.parametrize("serve", [serve_asgi, serve_wsgi], ids=["asgi", "wsgi"])
def test_a_customer_moved_to_a_plan_stored_after_start_is_charged_its_price_within_the_ttl(
    url: str, accounts: Accounts, serve: Any
) -> None:
    """A running app charges 0.25 a call on the file's payg plan; the seller stores 'cheap' (0.05 a call)
    and moves the customer to it: past the TTL the app charges 0.05 (10 - 0.25 - 0.05 = 9.70), and the
    rollup and the invoice read the same plan."""
    accounts.create_customer("acme", plan="payg")
    accounts.grant_credits("acme", "10")
    plaintext = accounts.create_key("acme").plaintext
    app_config = Config.from_dict(settings(url))

    def move() -> None:
        accounts.set_plan("cheap", CHEAP, actor="ops")
        accounts.change_plan("acme", "cheap")

    assert serve(app_config, plaintext, move) == ["9.750000", "9.700000"]
    assert app_config.plan("cheap").meters["calls"].price == 50_000
    assert accounts.balance("acme").balance == 9_700_000
    RollupWorker(accounts.storage, Config.from_dict(settings(url))).drain()
    assert accounts.usage("acme").spend == 300_000
    assert accounts.terms("acme").name == "cheap"


def run_asgi(config: Config, script: list[Any]) -> list[str]:
    """Run ``script`` against the ASGI middleware: a key is a call (its credits left are returned), a
    number a pause, a function a step of the seller's."""
    app = MeteringMiddleware(Starlette(routes=[Route("/v1/work", work)]), config=config)

    async def serve() -> list[str]:
        balances = []
        transport = httpx.ASGITransport(app=app)
        async with lifespan(app), httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            for step in script:
                if isinstance(step, str):
                    response = await client.get("/v1/work", headers={"Authorization": f"Bearer {step}"})
                    balances.append(response.headers["x-credits-remaining"])
                elif isinstance(step, float):
                    await asyncio.sleep(step)
                else:
                    step()
        return balances

    return asyncio.run(serve())


def run_wsgi(config: Config, script: list[Any]) -> list[str]:
    """:func:`run_asgi` through the WSGI middleware (the sync driver)."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    middleware = WSGIMeteringMiddleware(app, config=config)
    balances = []
    with httpx.Client(transport=httpx.WSGITransport(app=middleware), base_url="http://api") as client:
        for step in script:
            if isinstance(step, str):
                response = client.get("/v1/work", headers={"Authorization": f"Bearer {step}"})
                balances.append(response.headers["x-credits-remaining"])
            elif isinstance(step, float):
                time.sleep(step)
            else:
                step()
    middleware.drain()
    return balances


@pytest.mark.parametrize("run", [run_asgi, run_wsgi], ids=["asgi", "wsgi"])
def test_a_plan_name_a_resolved_key_brings_is_read_at_once(url: str, accounts: Accounts, run: Any) -> None:
    """The app read the stored plans just now (another customer's call, past their TTL) when the
    customer's key, past its own TTL, brings a plan stored since: the plans are read with the key, and
    the call is charged 0.05, not the default plan's 0.25 until the plans' TTL ends."""
    for customer in ("acme", "other"):
        accounts.create_customer(customer, plan="payg")
        accounts.grant_credits(customer, "10")
    acme, other = (accounts.create_key(customer).plaintext for customer in ("acme", "other"))

    def move() -> None:
        accounts.set_plan("cheap", CHEAP, actor="ops")
        accounts.change_plan("acme", "cheap")

    balances = run(Config.from_dict(settings(url)), [acme, TTL + 0.02, other, move, acme])
    assert balances == ["9.750000", "9.750000", "9.700000"]


def test_a_new_version_of_a_stored_plan_is_charged_within_the_ttl(url: str, accounts: Accounts) -> None:
    """A customer stays on the stored plan 'cheap' (0.05 a call); its new version (0.02) is charged by
    the running app past the TTL: 10 - 0.05 - 0.02 = 9.93."""
    accounts.set_plan("cheap", CHEAP, actor="ops")
    accounts.create_customer("acme", plan="cheap")
    accounts.grant_credits("acme", "10")
    plaintext = accounts.create_key("acme").plaintext

    def reprice() -> None:
        accounts.set_plan("cheap", {"prepaid": True, "meters": {"calls": {"price": "0.02"}}}, actor="ops")

    assert serve_asgi(Config.from_dict(settings(url)), plaintext, reprice) == ["9.950000", "9.930000"]


def test_a_new_customer_is_created_on_a_stored_plan_and_invoiced_by_it(url: str, accounts: Accounts) -> None:
    """'cheap' invoiced (tokens at 0.00001, a base fee of 5): a customer created on it in another
    process is invoiced 5 + 30,000 x 0.00001 = 5.30 for 30,000 tokens."""
    accounts.set_plan(
        "tokens-plus", {"base_fee": "5", "meters": {"tokens": {"price": "0.00001"}}}, actor="sales"
    )
    other = Accounts(accounts.storage, Config.from_dict(settings(url)))
    other.create_customer("acme", plan="tokens-plus")
    app_config = Config.from_dict(settings(url))
    plaintext = other.create_key("acme").plaintext

    async def tokens(request: Request) -> PlainTextResponse:
        import meterware

        meterware.usage.add("tokens", 30_000)
        return PlainTextResponse("ok")

    app = MeteringMiddleware(Starlette(routes=[Route("/v1/tokens", tokens)]), config=app_config)

    async def serve() -> None:
        transport = httpx.ASGITransport(app=app)
        async with lifespan(app), httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            response = await client.get("/v1/tokens", headers={"Authorization": f"Bearer {plaintext}"})
            assert response.status_code == 200

    asyncio.run(serve())
    RollupWorker(accounts.storage, Config.from_dict(settings(url))).drain()
    invoice = other.invoice("acme")
    assert invoice.plan == "tokens-plus"
    assert str(invoice.total) == "5.30"


@pytest.mark.parametrize(
    ("name", "table", "message"),
    [
        pytest.param(
            "gold",
            {"meters": {"bogus": {"price": "1"}}},
            "plan plans.gold.meters.bogus: names no meter defined under [meters] (known: calls, tokens)",
            id="unknown-meter",
        ),
        pytest.param(
            "gold",
            {"meters": {"calls": {"price": "abc"}}},
            "plan plans.gold.meters.calls.price: ",
            id="bad-price",
        ),
        pytest.param("gold", {"prepaid": "yes"}, "plan plans.gold.prepaid: ", id="bad-type"),
        pytest.param("gold", {"colour": "red"}, "plan plans.gold.colour: ", id="unknown-field"),
        pytest.param(
            "payg",
            CHEAP,
            "plan plans.payg: is defined in the config file, which wins over a stored plan of the same "
            "name: change it there",
            id="config-file-name",
        ),
    ],
)
def test_a_bad_stored_plan_is_refused_with_one_line_naming_the_field(
    accounts: Accounts, name: str, table: dict[str, Any], message: str
) -> None:
    """The config's own parser checks a stored plan: one line naming the field; nothing is stored."""
    with pytest.raises(UsageError) as refused:
        accounts.set_plan(name, table, actor="ops")
    assert str(refused.value).startswith(message)
    assert "\n" not in str(refused.value)
    assert accounts.storage.stored_plans() == {}


def test_history_records_who_when_and_what_and_stays_bounded(accounts: Accounts) -> None:
    """Each change appends a version (who, when, the table); the plan is the last; at most
    MAX_PLAN_VERSIONS are kept, the oldest dropped first."""
    before = int(time.time())
    accounts.set_plan("cheap", CHEAP, actor="alice")
    accounts.set_plan("cheap", {"prepaid": True, "meters": {"calls": {"price": "0.04"}}}, actor="bob")
    history = accounts.plan_history("cheap")
    assert [(v.actor, dict(v.table)) for v in history] == [
        ("alice", CHEAP),
        ("bob", {"prepaid": True, "meters": {"calls": {"price": "0.04"}}}),
    ]
    assert all(before <= v.recorded_at <= time.time() for v in history)
    assert accounts.stored_plans()["cheap"].meters["calls"].price == 40_000
    for count in range(MAX_PLAN_VERSIONS):
        accounts.set_plan("cheap", {"meters": {"calls": {"included": count}}}, actor=f"bot{count}")
    history = accounts.plan_history("cheap")
    assert len(history) == MAX_PLAN_VERSIONS
    assert history[0].actor == "bot0"
    assert history[-1].actor == f"bot{MAX_PLAN_VERSIONS - 1}"


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param("not json {", id="not-json"),
        pytest.param('[{"recorded_at": 1}]', id="no-table"),
        pytest.param(
            dump_plan_versions(
                tuple(load_plan_versions(json.dumps([{"recorded_at": 1, "actor": "x", "table": {"x": 1}}])))
            ),
            id="bad-table",
        ),
    ],
)
def test_a_running_app_keeps_the_last_good_plan_when_the_stored_record_is_garbage(
    url: str, accounts: Accounts, garbage: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A record overwritten with garbage behind the tools' back: the app keeps serving at the last good
    plan's price (0.05 a call) and logs one clear line naming the plan."""
    accounts.set_plan("cheap", CHEAP, actor="ops")
    accounts.create_customer("acme", plan="cheap")
    accounts.grant_credits("acme", "10")
    plaintext = accounts.create_key("acme").plaintext

    def spoil() -> None:
        record = accounts.storage.stored_plans()["cheap"]
        assert accounts.storage.swap_stored_plan("cheap", record, garbage)

    with caplog.at_level(logging.ERROR, logger="meterware"):
        assert serve_asgi(Config.from_dict(settings(url)), plaintext, spoil) == ["9.950000", "9.900000"]
    lines = [r.getMessage() for r in caplog.records if "stored plan 'cheap'" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].endswith("keeping the last good one")
    # The tools append a good version (one whose record is no longer read starts a new history).
    accounts.set_plan("cheap", CHEAP, actor="ops")
    assert accounts.plan_history("cheap")[-1].actor == "ops"
    assert accounts.stored_plans()["cheap"].meters["calls"].price == 50_000


def test_the_config_file_wins_over_a_stored_plan_it_took_the_name_of(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A plan stored as 'gold', then 'gold' added to the config file: the file's plan is the one used,
    and the stored record is reported, not used."""
    record = json.dumps([{"recorded_at": 1, "actor": "ops", "table": CHEAP}])
    config = Config.from_dict({"meters": {"calls": {}}, "plans": {"gold": {}}})
    with caplog.at_level(logging.ERROR, logger="meterware"):
        config.stored.update(config, {"gold": record})
    assert config.plan("gold") is config.plans["gold"]
    assert "is defined in the config file" in caplog.text


def test_a_config_still_copies_and_pickles() -> None:
    """The stored plans' cache (locks inside) does not stop a Config from being copied or pickled: the
    copy's cache starts empty, to be read by the process that uses it."""
    config = Config.from_dict({"meters": {"calls": {}}, "plans": {"a": {}}})
    record = json.dumps([{"recorded_at": 1, "actor": "ops", "table": {}}])
    config.stored.update(config, {"b": record})
    for copied in (copy.deepcopy(config), pickle.loads(pickle.dumps(config))):
        assert copied.plans == config.plans
        assert copied.stored.plans == {}
        assert not copied.stored.settled


def test_stored_plans_are_read_at_most_once_per_ttl() -> None:
    """One read per TTL per process, however many ask; a forced read comes at once."""
    config = Config.from_dict({"meters": {"calls": {}}, "policy": {"key_cache_ttl": 60}})
    reads: list[int] = []

    def read() -> dict[str, str]:
        reads.append(1)
        return {}

    stored = StoredPlans()
    for _ in range(100):
        stored.refresh(config, read)
    assert len(reads) == 1
    stored.refresh(config, read, force=True)
    assert len(reads) == 2


@pytest.mark.redis
@pytest.mark.parametrize("backend", ["redis", "cluster"])  # CLI processes share no memory:// store
def test_cli_plans_set_list_show(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """plans set stores a plan from a TOML file (a one-line error for a bad one), plans list shows it with
    the file's plans, plans show its history; customers create --plan takes it."""
    url = str(request.getfixturevalue(f"{backend}_url"))
    config = tmp_path / "meterware.toml"
    config.write_text(
        f'[storage]\nurl = "{url}"\nshards = 4\n[meters.calls]\n[plans.payg]\nprepaid = true\n'
        '[plans.payg.meters.calls]\nprice = "0.25"\n'
    )
    plan = tmp_path / "gold.toml"
    plan.write_text('prepaid = true\n[meters.calls]\nprice = "0.05"\n')
    run = ["--config", str(config)]
    assert main(["plans", "set", "gold", "--file", str(plan), "--actor", "alice", *run]) == 0
    assert "stored plan gold (version 1, by alice)" in capsys.readouterr().out
    assert main(["plans", "list", *run]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "payg: per month, prepaid, no rate limit"
    assert out[2].startswith("gold: per month, prepaid, no rate limit (stored, version 1 by alice at ")
    assert out[3] == "  calls: no quota, 0 included, 0.050000 per unit"
    assert main(["plans", "show", "gold", "--json", *run]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["source"] == "stored"
    assert [(v["actor"], v["table"]) for v in shown["history"]] == [
        ("alice", {"prepaid": True, "meters": {"calls": {"price": "0.05"}}})
    ]
    assert main(["customers", "create", "acme", "--plan", "gold", *run]) == 0
    assert "created customer acme on plan gold" in capsys.readouterr().out
    plan.write_text("[meters.nope]\nprice = 1\n")
    assert main(["plans", "set", "gold", "--file", str(plan), *run]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        "meterware: error: plan plans.gold.meters.nope: names no meter defined under [meters] (known: calls)"
    )


def test_a_config_error_reads_like_the_files(accounts: Accounts) -> None:
    """Sanity: the parser is the config file's (the same error for the same table)."""
    with pytest.raises(ConfigError) as from_file:
        Config.from_dict({**settings("memory://"), "plans": {"gold": {"meters": {"bogus": {}}}}})
    with pytest.raises(UsageError) as stored:
        accounts.set_plan("gold", {"meters": {"bogus": {}}})
    assert from_file.value.field in str(stored.value)
