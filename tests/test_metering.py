"""The shared request-path core's own rules (the behaviour suite covers it through every adapter)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from meterware import Accounts, Config, MeteringMiddleware
from meterware._metering import ThrottledWarning
from meterware.rollup import RollupWorker


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
