"""The shared request-path core's own rules (the behaviour suite covers it through every adapter)."""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

import meterware
from meterware import Accounts, Config, MeteringMiddleware
from meterware.keys import generate_key
from meterware.metering import keycache
from meterware.metering.logs import ThrottledWarning
from meterware.rollup import RollupWorker
from meterware.storage import open_storage
from meterware.wsgi import WSGIMeteringMiddleware
from tests.servers import redis_server


def test_outage_warnings_are_logged_once_per_interval_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    """Failing calls during an outage log one warning per interval, then say how many were held back."""
    warning = ThrottledWarning(interval=3600)
    with caplog.at_level(logging.WARNING, logger="meterware"):
        for _ in range(1000):
            warning.warn("admission failed (%s)", "Connection refused")
    assert [r.getMessage() for r in caplog.records] == [
        "meterware: backend failed: admission failed (Connection refused)"
    ]
    warning._next = 0.0  # the interval has passed
    with caplog.at_level(logging.WARNING, logger="meterware"):
        warning.warn("admission failed (%s)", "Connection refused")
    assert caplog.records[-1].getMessage() == (
        "meterware: backend failed: admission failed (Connection refused) (999 more like it held back)"
    )


def test_asgi_response_headers_may_come_as_any_iterable(tmp_path: Path) -> None:
    """An app may send its response headers as a generator (ASGI allows any iterable): with a usage header
    configured, they still all reach the client, and the usage header is metered and stripped."""
    config = Config.from_dict(
        {
            "storage": {"url": f"memory://{uuid.uuid4().hex}"},
            "meters": {"tokens": {"aggregation": "sum", "source": "header:X-Usage-Tokens"}},
            "plans": {"open": {"meters": {"tokens": {}}}},
            "pipeline": {"spool_dir": str(tmp_path / "spool")},
        }
    )
    accounts = Accounts.open(config)
    accounts.create_customer("acme", plan="open")
    key = accounts.create_key("acme").plaintext

    async def app(scope: Any, receive: Any, send: Any) -> None:
        headers = (
            (name, value) for name, value in [(b"content-type", b"text/plain"), (b"x-usage-tokens", b"7")]
        )
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = MeteringMiddleware(app, config, registry=CollectorRegistry())

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            response = await client.get("/v1/anything", headers={"authorization": f"Bearer {key}"})
        await middleware.drain()
        return response

    response = asyncio.run(call())
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain"
    assert "x-usage-tokens" not in response.headers
    RollupWorker(accounts.storage, config, owner="test").drain()
    assert accounts.usage("acme").meters["tokens"] == 7


@pytest.mark.redis
def test_known_keys_survive_a_flood_of_unknown_ones_through_an_outage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three times more unknown keys than the key caches hold, then Redis stops: a key served before is
    still served (failing open, as last resolved), an unknown one gets 503, and the unknown keys' cache
    stayed within its bound."""
    monkeypatch.setattr(keycache, "KEY_CACHE_MAX_ENTRIES", 50)
    monkeypatch.setattr(keycache, "UNKNOWN_KEY_CACHE_MAX_ENTRIES", 50)
    with redis_server() as server:
        config = Config.from_dict(
            {
                "storage": {"url": server.url, "shards": 2},
                "plans": {"open": {}},
                "policy": {"on_backend_error": "open", "key_cache_ttl": 0.2, "timeout": 0.5},
                "pipeline": {"spool_dir": str(tmp_path / "spool")},
            }
        )
        accounts = Accounts(open_storage(server.url, shards=2), config)
        accounts.create_customer("acme", plan="open")
        known = {"Authorization": f"Bearer {accounts.create_key('acme').plaintext}"}
        accounts.close()

        def app(environ: Any, start_response: Any) -> list[bytes]:
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok"]

        middleware = WSGIMeteringMiddleware(app, config, registry=CollectorRegistry())
        with httpx.Client(transport=httpx.WSGITransport(app=middleware), base_url="http://test") as client:
            assert client.get("/v1/hello", headers=known).status_code == 200
            for _ in range(150):
                unknown = {"Authorization": f"Bearer {generate_key().plaintext}"}
                assert client.get("/v1/hello", headers=unknown).json()["reason"] == "unknown_key"
            assert len(middleware.metering.core.keys.unknown) == 50
            server.stop()
            time.sleep(0.3)  # past the key cache's TTL: the known key is looked up again, and that fails
            assert client.get("/v1/hello", headers=known).status_code == 200
            unknown = {"Authorization": f"Bearer {generate_key().plaintext}"}
            assert client.get("/v1/hello", headers=unknown).json()["reason"] == "backend_unavailable"
        middleware.drain()  # into the spool: Redis is gone
        atexit.unregister(middleware.metering.drain_at_exit)  # the spool goes with tmp_path


def test_units_reported_after_the_call_ended_are_warned_about_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Units a thread the handler left running reports once the call's event is made are ignored (never
    charged), warned about and counted in ``meterware_units_rejected_total``; the call keeps its own."""
    config = Config.from_dict(
        {
            "storage": {"url": f"memory://{uuid.uuid4().hex}"},
            "meters": {"tokens": {"aggregation": "sum", "source": "handler"}},
            "plans": {"open": {"meters": {"tokens": {}}}},
            "pipeline": {"spool_dir": str(tmp_path / "spool")},
        }
    )
    accounts = Accounts.open(config)
    accounts.create_customer("acme", plan="open")
    key = accounts.create_key("acme").plaintext
    release, reported = threading.Event(), threading.Event()

    def report_later() -> None:
        release.wait(10)
        meterware.usage.add("tokens", 3)
        reported.set()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        meterware.usage.add("tokens", 2)
        threading.Thread(target=contextvars.copy_context().run, args=(report_later,)).start()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    registry = CollectorRegistry()
    middleware = MeteringMiddleware(app, config, registry=registry)

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            return await client.get("/v1/anything", headers={"authorization": f"Bearer {key}"})

    with caplog.at_level(logging.WARNING, logger="meterware"):
        assert asyncio.run(call()).status_code == 200
        release.set()
        assert reported.wait(10)
    asyncio.run(middleware.drain())
    assert registry.get_sample_value("meterware_units_rejected_total") == 1
    assert [r.getMessage() for r in caplog.records] == [
        "meterware: ignored usage for meter 'tokens': reported after its call had ended"
    ]
    RollupWorker(accounts.storage, config, owner="test").drain()
    assert accounts.usage("acme").meters["tokens"] == 2
