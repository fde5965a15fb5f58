"""The ingestion endpoint: batches of usage events over HTTP, recorded as ``meterware.record`` does, through
its WSGI and ASGI twins on memory and Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from werkzeug.test import Client

from meterware import Accounts, ConfigError
from meterware.ingest import MAX_EVENTS, asgi_app, wsgi_app
from meterware.rollup import RollupWorker
from tests.test_recording import TOKEN_PRICE, recording_config

TOKEN = "t" * 40
AUTH = {"Authorization": f"Bearer {TOKEN}"}

#: POST a JSON body (or raw bytes) with headers: the status and the decoded JSON answer.
Post = Callable[..., tuple[int, Any]]


class Endpoint:
    def __init__(self, kind: str, storage: str, spool_dir: Path, flush_interval: float = 0.01) -> None:
        self.config = recording_config(storage, spool_dir, flush_interval)
        self.accounts = Accounts.open(self.config)
        self.kind = kind
        self.closed = False
        if kind == "wsgi":
            self.wsgi = wsgi_app(self.config, token=TOKEN)
            self.client = Client(self.wsgi)
        else:
            self.asgi = asgi_app(self.config, token=TOKEN)
            # One loop for every request, as a server has: the recorder's client belongs to it.
            self.loop = asyncio.Runner()

    def post(self, body: Any, headers: dict[str, str] | None = None, method: str = "POST") -> tuple[int, Any]:
        headers = AUTH if headers is None else headers
        content = body if isinstance(body, bytes) else None
        payload = None if isinstance(body, bytes) else body
        if self.kind == "wsgi":
            answer = self.client.open("/", method=method, data=content, json=payload, headers=headers)
            return answer.status_code, answer.get_json()

        async def call() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.asgi)
            async with httpx.AsyncClient(transport=transport, base_url="http://ingest") as client:
                return await client.request(method, "/", content=content, json=payload, headers=headers)

        response = self.loop.run(call())
        return response.status_code, response.json()

    def close(self) -> None:
        """Flush what the endpoint recorded and close its clients (once)."""
        if self.closed:
            return
        self.closed = True
        if self.kind == "wsgi":
            self.wsgi.close()
        else:
            self.loop.run(self.asgi.aclose())
            self.loop.close()

    def settle(self) -> None:
        self.close()
        RollupWorker(self.accounts.storage, self.config).drain()

    def customer(self, credits: str | None) -> str:
        customer_id = f"ingest-{uuid.uuid4().hex[:8]}"
        self.accounts.create_customer(customer_id, plan="tokens")
        if credits:
            self.accounts.grant_credits(customer_id, credits)
        return customer_id


@pytest.fixture(params=["wsgi", "asgi"])
def endpoint(request: pytest.FixtureRequest, storage_url: str, tmp_path: Path) -> Iterator[Endpoint]:
    made = Endpoint(request.param, storage_url, tmp_path / "spool")
    yield made
    made.close()
    made.accounts.close()


def event(event_id: str, customer: str, tokens: int) -> dict[str, Any]:
    return {"event_id": event_id, "customer": customer, "units": {"tokens": tokens}}


def test_a_batch_is_charged_refused_and_deduplicated_per_event(endpoint: Endpoint) -> None:
    """One batch: 300 tokens charged (0.03 of 0.05 credits), a repeat of the same id a duplicate, 300
    more refused (0.02 left), an unknown meter invalid, a customer with no credits refused; 202 with a
    result per event, in order. The retry of the whole batch charges nothing more."""
    payer, broke = endpoint.customer("0.05"), endpoint.customer(None)
    batch = {
        "events": [
            event("e-1", payer, 300),
            event("e-1", payer, 300),
            event("e-2", payer, 300),
            {"event_id": "e-3", "customer": payer, "units": {"nope": 1}},
            event("e-4", broke, 1),
        ]
    }
    status, answer = endpoint.post(batch)
    assert status == 202
    results = answer["results"]
    assert [(entry["event_id"], entry["status"]) for entry in results] == [
        ("e-1", "recorded"),
        ("e-1", "duplicate"),
        ("e-2", "refused"),
        ("e-3", "invalid"),
        ("e-4", "refused"),
    ]
    assert (results[2]["reason"], results[4]["reason"]) == ("insufficient_credits", "insufficient_credits")
    assert str(uuid.UUID(results[0]["event"])) == results[0]["event"]
    status, again = endpoint.post(batch)
    assert status == 202
    assert again["results"][0]["status"] == "duplicate"
    endpoint.settle()
    assert endpoint.accounts.balance(payer).balance == 50_000 - 300 * TOKEN_PRICE
    assert endpoint.accounts.usage(payer).meters["tokens"] == 300


@pytest.mark.parametrize("kind", ["wsgi", "asgi"])
def test_a_batch_lost_before_its_flush_is_recorded_by_its_retry(
    kind: str, storage_url: str, tmp_path: Path
) -> None:
    """The endpoint's process dies after answering "recorded" and before its flush: the retry of the batch
    (to another process) is answered "recorded" again and charged, once."""
    crashing = Endpoint(kind, storage_url, tmp_path / "spool", flush_interval=3600)
    payer = crashing.customer("1.00")  # the lost records' reservations hold 0.03 until they expire
    batch = {"events": [event("lost-1", payer, 100), event("lost-2", payer, 200)]}
    _, answer = crashing.post(batch)
    assert [entry["status"] for entry in answer["results"]] == ["recorded", "recorded"]
    app = crashing.wsgi if kind == "wsgi" else crashing.asgi
    app.recorder.metering.batcher.buffer.take(10**6)  # the process dies: its buffer is gone
    crashing.close()
    retry = Endpoint(kind, storage_url, tmp_path / "spool")
    _, answer = retry.post(batch)
    assert [entry["status"] for entry in answer["results"]] == ["recorded", "recorded"]
    retry.settle()
    assert retry.accounts.balance(payer).balance == 1_000_000 - 300 * TOKEN_PRICE
    assert retry.accounts.usage(payer).meters["tokens"] == 300
    crashing.accounts.close()
    retry.accounts.close()


@pytest.mark.parametrize(
    ("body", "headers", "method", "status"),
    [
        pytest.param({"events": []}, {}, "POST", 401, id="no-token"),
        pytest.param({"events": []}, {"Authorization": "Bearer " + "x" * 40}, "POST", 401, id="wrong-token"),
        pytest.param({"events": []}, None, "GET", 405, id="get"),
        pytest.param(b"not json", None, "POST", 400, id="not-json"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, None, "POST", 400, id="nested-too-deep"),
        pytest.param({"event": []}, None, "POST", 400, id="no-events"),
        pytest.param({"events": [1]}, None, "POST", 400, id="not-objects"),
        pytest.param({"events": [{}] * (MAX_EVENTS + 1)}, None, "POST", 413, id="too-many"),
    ],
)
def test_requests_that_are_not_a_batch_record_nothing(
    endpoint: Endpoint, body: Any, headers: dict[str, str] | None, method: str, status: int
) -> None:
    """A missing or wrong token, another method, a body that is not a batch, too many events: refused
    with an error, nothing recorded."""
    answer = endpoint.post(body, headers, method)
    assert answer[0] == status
    assert "error" in answer[1]


def test_an_event_missing_its_fields_is_invalid(endpoint: Endpoint) -> None:
    """An event without a customer, units or event id is answered invalid, the others recorded."""
    payer = endpoint.customer("1.00")
    status, answer = endpoint.post(
        {"events": [{"event_id": "x", "units": {"tokens": 1}}, {"customer": payer}, event("ok", payer, 1)]}
    )
    assert status == 202
    assert [entry["status"] for entry in answer["results"]] == ["invalid", "invalid", "recorded"]


def test_the_endpoint_needs_an_operator_token(storage_url: str, tmp_path: Path) -> None:
    """Without token= or a long enough $METERWARE_ADMIN_TOKEN it refuses to start."""
    config = recording_config(storage_url, tmp_path)
    with pytest.raises(ConfigError):
        wsgi_app(config, token="short")
