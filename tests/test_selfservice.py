"""The customer's own account endpoint over ASGI and WSGI, after real metered traffic (memory://, Redis)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.test import Client

from meterware.asgi import MeteringMiddleware
from meterware.billing import selfservice
from meterware.billing.accounts import Accounts
from meterware.config import Config
from meterware.errors import ConfigError
from meterware.keys import generate_key
from meterware.metering.keycache import NEGATIVE_CACHE_SECONDS
from meterware.rollup import RollupWorker
from meterware.wsgi import WSGIMeteringMiddleware


@pytest.fixture
def config(storage_url: str, tmp_path: Any) -> Config:
    """A plan with a hard quota, included calls and a price, a rate limit; the endpoint is not metered."""
    return Config.from_dict(
        {
            "storage": {"url": storage_url, "shards": 4},
            "plans": {
                "pro": {
                    "rate_limits": ["100/second", "1000/hour"],
                    "meters": {"calls": {"included": 2, "price": "0.01", "quota": 10}},
                },
            },
            "routes": {"exclude": ["/v1/account", "/v1/account/*"]},
            "pipeline": {"spool_dir": str(tmp_path / "spool")},
        }
    )


@asynccontextmanager
async def lifespan(app: Any) -> AsyncIterator[None]:
    """Run the ASGI lifespan around the block, as a server does (its shutdown closes the connections)."""
    messages: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    sent: asyncio.Queue[str] = asyncio.Queue()

    async def send(message: dict[str, Any]) -> None:
        await sent.put(message["type"])

    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    task = asyncio.create_task(app(scope, messages.get, send))
    await messages.put({"type": "lifespan.startup"})
    assert await sent.get() == "lifespan.startup.complete"
    try:
        yield
    finally:
        await messages.put({"type": "lifespan.shutdown"})
        assert await sent.get() == "lifespan.shutdown.complete"
        await task


def get(client: Client, url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """GET through werkzeug's client, closing the response (the middleware finishes a call at close)."""
    with client.get(url, headers=headers or {}) as response:
        return response.status_code, response.get_json(silent=True)


def open_account(config: Config) -> tuple[Accounts, str]:
    accounts = Accounts.open(config)
    accounts.create_customer("acme", plan="pro")
    accounts.grant_credits("acme", "5")
    return accounts, accounts.create_key("acme").plaintext


def roll_up(config: Config) -> None:
    """memory:// rolls up in the app's process; Redis needs the worker."""
    if not config.storage.startswith("memory://"):
        accounts = Accounts.open(config)
        RollupWorker(accounts.storage, config).drain()
        accounts.close()


def check_account(data: dict[str, Any], accounts: Accounts) -> None:
    """What three successful calls and one failed call of the pro plan show."""
    assert data["customer"] == "acme"
    assert data["plan"] == "pro"
    assert data["live"] is True
    assert data["usage"]["calls"] == {
        "used": 3,
        "included": 2,
        "quota": 10,
        "quota_mode": "hard",
        "remaining": 7,
    }
    assert data["calls"]["success"] == 3
    assert data["calls"]["server_error"] == 1
    assert data["credits"] == {
        "prepaid": False,
        "balance": "5.000000",
        "reserved": "0.000000",
        "available": "5.000000",
    }
    assert data["rate_limits"] == [
        {"name": "rate-1s", "limit": 100, "window_seconds": 1},
        {"name": "rate-3600s", "limit": 1000, "window_seconds": 3600},
    ]
    report = accounts.usage("acme")
    assert (data["period"]["start"], data["period"]["end"]) == (report.period_start, report.period_end)
    invoice = accounts.invoice("acme")
    assert data["invoice"] == invoice.as_dict()
    assert data["invoice"]["total"] == str(invoice.total)
    assert data["key"]["prefix"].startswith("mw_live_")


def test_the_asgi_endpoint_shows_the_callers_own_account(config: Config) -> None:
    """Mounted with one line next to a metered Starlette app, it answers the caller's key with its numbers."""
    accounts, key = open_account(config)

    async def hello(request: Any) -> JSONResponse:
        return JSONResponse({"hello": "world"})

    async def fail(request: Any) -> JSONResponse:
        return JSONResponse({"error": "down"}, status_code=503)

    account = selfservice.asgi_app(config)
    routes = [Route("/v1/hello", hello), Route("/v1/fail", fail), Mount("/v1/account", account)]
    app = MeteringMiddleware(Starlette(routes=routes), config=config, registry=CollectorRegistry())
    auth = {"Authorization": f"Bearer {key}"}

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with lifespan(app), httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            for _ in range(3):
                assert (await client.get("/v1/hello", headers=auth)).status_code == 200
            assert (await client.get("/v1/fail", headers=auth)).status_code == 503
            await app.drain()
            await asyncio.to_thread(roll_up, config)
            return [
                await client.get("/v1/account/", headers=auth),
                await client.get("/v1/account/", headers={"X-API-Key": key}),
                await client.get("/v1/account/"),
                await client.get("/v1/account/", headers={"Authorization": "Bearer nope"}),
                await client.get("/v1/account/", headers={"Authorization": f"Bearer {key[:-4]}AAAA"}),
                await client.post("/v1/account/", headers=auth),
                await client.head("/v1/account/", headers=auth),
            ]

    ok, by_header, missing, malformed, unknown, post, head = asyncio.run(run())
    assert ok.status_code == 200
    assert ok.headers["cache-control"] == "no-store"
    check_account(ok.json(), accounts)
    assert by_header.json()["usage"] == ok.json()["usage"]
    for response, reason in (
        (missing, "missing_key"),
        (malformed, "malformed_key"),
        (unknown, "unknown_key"),
    ):
        assert response.status_code == 401
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["reason"] == reason
    assert post.status_code == 405
    assert post.headers["allow"] == "GET, HEAD"
    assert head.status_code == 200
    assert head.content == b""
    # Reading one's account is not a metered call.
    assert accounts.usage("acme").meters["calls"] == 3
    account.view.close()
    accounts.close()


def test_the_wsgi_endpoint_shows_the_callers_own_account(config: Config) -> None:
    """Mounted with DispatcherMiddleware next to a metered WSGI app; revoked keys are refused."""
    accounts, key = open_account(config)

    def api(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        status = "503 Service Unavailable" if environ["PATH_INFO"] == "/v1/fail" else "200 OK"
        start_response(status, [("Content-Type", "application/json")])
        return [b"{}"]

    metered = WSGIMeteringMiddleware(api, config=config, registry=CollectorRegistry())
    account = selfservice.wsgi_app(config)
    client = Client(DispatcherMiddleware(metered, {"/v1/account": account}))
    auth = {"Authorization": f"Bearer {key}"}
    assert [get(client, "/v1/hello", auth)[0] for _ in range(3)] == [200] * 3
    assert get(client, "/v1/fail", auth)[0] == 503
    metered.drain()
    roll_up(config)

    status, data = get(client, "/v1/account", auth)
    assert status == 200
    check_account(data, accounts)
    assert get(client, f"/v1/account?api_key={key}")[0] == 401  # no query key unless configured

    test_key = accounts.create_key("acme", live=False).plaintext
    status, sandbox = get(client, "/v1/account", {"Authorization": f"Bearer {test_key}"})
    assert sandbox["live"] is False
    assert sandbox["usage"]["calls"]["used"] == 0
    assert sandbox["invoice"] is None

    accounts.revoke_key(accounts.list_keys("acme")[0].key_id)
    status, refused = get(client, "/v1/account", auth)
    assert status == 401
    assert refused["reason"] == "revoked_key"
    account.view.close()
    accounts.close()


def test_a_query_parameter_key_works_when_configured() -> None:
    """The endpoint reads the key where the middleware does: here, also ?api_key=."""
    config = Config.from_dict(
        {"storage": f"memory://selfservice-{uuid.uuid4().hex}", "policy": {"key_query": "api_key"}}
    )
    accounts = Accounts.open(config)
    accounts.create_customer("solo")
    key = accounts.create_key("solo").plaintext
    status, data = get(Client(selfservice.wsgi_app(config)), f"/?api_key={key}")
    assert status == 200
    assert data["customer"] == "solo"


class CountingStorage:
    """The real storage, counting the key lookups made on it."""

    def __init__(self, storage: Any) -> None:
        self.storage = storage
        self.lookups = 0

    def resolve_key(self, key_hash: str) -> Any:
        self.lookups += 1
        return self.storage.resolve_key(key_hash)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.storage, name)


def test_an_unknown_key_flood_reaches_the_backend_a_bounded_number_of_times(config: Config) -> None:
    """500 distinct unknown keys, then one unknown key 200 times: the backend is asked at most the lookup
    budget's burst plus its rate over the time taken (past it: 429 with Retry-After, no lookup) and the
    repeated key once; a customer who read their account before the flood still reads it during it."""
    view = selfservice.AccountView(config)
    accounts, key = open_account(config)
    counting = CountingStorage(view.accounts.storage)
    view.accounts.storage = counting
    client = Client(selfservice.SelfServiceWSGIApp(view))
    assert get(client, "/", {"Authorization": f"Bearer {key}"})[0] == 200
    counting.lookups = 0

    began = time.monotonic()
    statuses = Counter(
        get(client, "/", {"Authorization": f"Bearer {generate_key().plaintext}"})[0] for _ in range(500)
    )
    flood_lookups = counting.lookups
    budget = selfservice.UNKNOWN_KEY_LOOKUP_BURST + selfservice.UNKNOWN_KEY_LOOKUPS_PER_SECOND * (
        time.monotonic() - began
    )
    assert flood_lookups <= budget
    assert statuses[401] == flood_lookups
    assert statuses[429] == 500 - flood_lookups
    with client.get("/", headers={"Authorization": f"Bearer {generate_key().plaintext}"}) as refused:
        assert (refused.status_code, refused.headers["Retry-After"]) == (429, "1")
        assert refused.get_json()["reason"] == "rate_limited"
    assert get(client, "/", {"Authorization": f"Bearer {key}"})[0] == 200

    time.sleep(1.0 / selfservice.UNKNOWN_KEY_LOOKUPS_PER_SECOND + 0.05)  # one lookup's worth of budget
    counting.lookups = 0
    repeated = {"Authorization": f"Bearer {generate_key().plaintext}"}
    began = time.monotonic()
    assert {get(client, "/", repeated)[0] for _ in range(200)} == {401}
    # Refused from the negative cache for a second at a time: one lookup per second at most.
    assert counting.lookups <= 1 + (time.monotonic() - began) / NEGATIVE_CACHE_SECONDS
    view.close()
    accounts.close()


# -- the README's recipe ---------------------------------------------------------------------------------

#: The configuration of the README's recipe: the account path is never metered, whatever ``exclude`` says.
RECIPE_TOML = """
[storage]
url = "{url}"
shards = 4

[pipeline]
spool_dir = "{spool}"

[plans.payg]
prepaid = true
[plans.payg.meters.calls]
price = "0.01"

[plans.free]
[plans.free.meters.calls]
quota = 2
quota_mode = "hard"

[routes]
exclude = ["/health"]
account = "/v1/account"
"""


@pytest.fixture
def recipe(redis_url: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Accounts]:
    """./meterware.toml as the README writes it, on a real Redis; a customer at 0 credits, one over quota."""
    for name in ("METERWARE_CONFIG", "METERWARE_STORAGE", "METERWARE_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "meterware.toml").write_text(RECIPE_TOML.format(url=redis_url, spool=tmp_path / "spool"))
    monkeypatch.chdir(tmp_path)
    accounts = Accounts.open()
    accounts.create_customer("broke", plan="payg")
    accounts.create_customer("capped", plan="free")
    yield accounts
    accounts.close()


def read_accounts(accounts: Accounts, read: Any, metered: Any) -> None:
    """Both customers read their account with and without the slash (a 307 first): 200 each time."""
    broke, capped = accounts.create_key("broke").plaintext, accounts.create_key("capped").plaintext
    assert metered(broke) == 402
    assert [metered(capped) for _ in range(3)] == [200, 200, 429]
    for key, customer in ((broke, "broke"), (capped, "capped")):
        for path in ("/v1/account", "/v1/account/"):
            status, data = read(path, key)
            assert status == 200, (path, customer, data)
            assert data["customer"] == customer
    assert read("/v1/account/", "mw_live_" + "0" * 32)[0] == 401


def check_nothing_charged(accounts: Accounts) -> None:
    """Once the events are flushed and rolled up: only the metered calls count, no read was charged."""
    RollupWorker(accounts.storage, accounts.config).drain()
    assert accounts.balance("broke").balance == 0
    assert accounts.usage("broke").calls["success"] == 0
    assert accounts.usage("broke").calls["rejected"] == 1
    assert accounts.usage("capped").calls["success"] == 2
    assert accounts.usage("capped").calls["rejected"] == 1
    assert accounts.usage("capped").meters["calls"] == 2
    assert accounts.usage("broke").refusals == {"insufficient_credits": 1}
    assert accounts.usage("capped").refusals == {"quota_exceeded": 1}


@pytest.mark.redis
@pytest.mark.parametrize("framework", ["starlette", "fastapi"])
def test_the_readme_recipe_never_meters_the_account_under_starlette(recipe: Accounts, framework: str) -> None:
    """``app.add_middleware(MeteringMiddleware)`` + ``app.mount("/v1/account", selfservice.asgi_app())``:
    a customer at 0 credits and one over its hard quota read their account, for free, slash or not."""
    from fastapi import FastAPI
    from starlette.testclient import TestClient

    async def hello(request: Any) -> JSONResponse:
        return JSONResponse({"ok": True})

    app: Any = FastAPI() if framework == "fastapi" else Starlette()
    app.add_route("/v1/hello", hello)
    app.add_middleware(MeteringMiddleware)
    app.mount("/v1/account", selfservice.asgi_app())

    with TestClient(app) as client:

        def read(path: str, key: str) -> tuple[int, Any]:
            response = client.get(path, headers={"Authorization": f"Bearer {key}"})
            return response.status_code, response.json()

        def metered(key: str) -> int:
            return client.get("/v1/hello", headers={"Authorization": f"Bearer {key}"}).status_code

        read_accounts(recipe, read, metered)
    check_nothing_charged(recipe)  # the lifespan's shutdown flushed the events


@pytest.mark.redis
@pytest.mark.parametrize("order", ["mount-outside", "mount-inside"])
def test_the_readme_recipe_never_meters_the_account_under_flask(recipe: Accounts, order: str) -> None:
    """Flask with ``DispatcherMiddleware``: free reads whichever of the two lines comes first."""
    from flask import Flask

    app = Flask(__name__)

    @app.get("/v1/hello")
    def hello() -> Any:
        return {"ok": True}

    metering = WSGIMeteringMiddleware(app.wsgi_app)
    if order == "mount-outside":  # the README's order: the middleware first, then the mount around it
        app.wsgi_app = DispatcherMiddleware(metering, {"/v1/account": selfservice.wsgi_app()})  # type: ignore[method-assign]
    else:
        metering.app = DispatcherMiddleware(metering.app, {"/v1/account": selfservice.wsgi_app()})
        app.wsgi_app = metering  # type: ignore[method-assign]
    client = app.test_client()

    def read(path: str, key: str) -> tuple[int, Any]:
        with client.get(path, headers={"Authorization": f"Bearer {key}"}, follow_redirects=True) as response:
            return response.status_code, response.get_json(silent=True)

    def metered(key: str) -> int:
        with client.get("/v1/hello", headers={"Authorization": f"Bearer {key}"}) as response:
            response.get_data()  # read to its end: a body left unread is an aborted call, not charged
            return response.status_code

    read_accounts(recipe, read, metered)
    metering.drain()
    check_nothing_charged(recipe)


def test_a_metered_account_endpoint_says_how_to_fix_it() -> None:
    """Mounted without ``routes.account``: a 500 naming the line to add, and the read is not charged."""
    config = Config.from_dict(
        {"storage": {"url": f"memory://selfservice-{uuid.uuid4().hex}"}, "plans": {"pro": {}}}
    )
    accounts = Accounts.open(config)
    accounts.create_customer("acme", plan="pro")
    key = accounts.create_key("acme").plaintext
    app = Starlette(routes=[Mount("/v1/account", selfservice.asgi_app(config))])
    from starlette.testclient import TestClient

    with TestClient(MeteringMiddleware(app, config=config)) as client:
        response = client.get("/v1/account/", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 500
    assert 'set routes.account = "/v1/account" in the configuration' in response.json()["detail"]
    calls = accounts.usage("acme").calls
    assert (calls["success"], calls["server_error"]) == (0, 1)


@pytest.mark.parametrize(
    ("account", "expected"),
    [
        pytest.param("/v1/account", "/v1/account", id="plain"),
        pytest.param("/v1/account/", "/v1/account", id="trailing-slash"),
    ],
)
def test_the_account_path_is_never_metered_whatever_exclude_says(account: str, expected: str) -> None:
    """``routes.account`` excludes the path, with or without its slash, and what is below it."""
    routes = Config.from_dict({"routes": {"exclude": [], "account": account}}).routes
    assert routes.account == expected
    for path in ("/v1/account", "/v1/account/", "/v1/account/x"):
        assert routes.is_excluded(path), path
    for path in ("/v1/accounts", "/v1/account/../paid", "/v1"):
        assert not routes.is_excluded(path), path


@pytest.mark.parametrize("account", ["/", "v1/account", "/v1/../account", ""])
def test_an_account_path_that_is_not_one_is_refused(account: str) -> None:
    """A bad ``routes.account`` stops start-up with one line naming it."""
    with pytest.raises(ConfigError, match=r"^routes\.account: must be a path like /v1/account, got "):
        Config.from_dict({"routes": {"account": account}})
