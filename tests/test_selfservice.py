"""The customer's own account endpoint over ASGI and WSGI, after real metered traffic (memory://, Redis)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterable
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
from meterware.rollup import RollupWorker
from meterware.wsgi import WSGIMeteringMiddleware


@pytest.fixture(
    params=[pytest.param("memory", id="memory"), pytest.param("redis", id="redis", marks=pytest.mark.redis)]
)
def config(request: pytest.FixtureRequest, tmp_path: Any) -> Config:
    """A plan with a hard quota, included calls and a price, a rate limit; the endpoint is not metered."""
    url = f"memory://selfservice-{uuid.uuid4().hex}"
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
    return Config.from_dict(
        {
            "storage": {"url": url, "shards": 4},
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
