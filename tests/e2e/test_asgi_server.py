"""End to end: a FastAPI app under a real uvicorn process, a real Redis, and the rollup worker process."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from meterware import Accounts
from meterware.events import UsageEvent, decode_batch
from tests.helpers import accounts_of, new_customer

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def test_streaming_response_is_delivered_chunk_by_chunk(uvicorn_server: Any, e2e_env: dict[str, str]) -> None:
    """The first chunk reaches the client while the handler is still running: nothing is buffered."""
    accounts = accounts_of(e2e_env)
    key = new_customer(accounts, "streamer", "1").plaintext
    headers = {"Authorization": f"Bearer {key}"}
    with (
        httpx.Client(base_url=uvicorn_server.url, timeout=20) as client,
        client.stream("GET", "/v1/stream", headers=headers) as response,
    ):
        lines = response.iter_lines()
        assert next(lines) == "first"
        Path(e2e_env["E2E_STREAM_FLAG"]).touch()  # the handler waits for this before its second chunk
        assert next(lines) == "second flag-seen=True"


def test_a_client_gone_before_a_slow_answer_is_not_charged(
    uvicorn_server: Any, e2e_env: dict[str, str]
) -> None:
    """A client that leaves while a one-message call is still working gets an aborted event, no charge."""
    accounts = accounts_of(e2e_env)
    key = new_customer(accounts, "leaver", "1").plaintext
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(f"{uvicorn_server.url}/v1/slow", headers={"Authorization": f"Bearer {key}"}, timeout=0.3)
    assert httpx.get(f"{uvicorn_server.url}/v1/hello", headers={"Authorization": f"Bearer {key}"}).is_success
    time.sleep(1.5)  # the slow handler ends
    uvicorn_server.stop()
    subprocess.run(
        [sys.executable, "-m", "meterware", "rollup", "--once"], env=e2e_env, check=True, timeout=60
    )
    usage = accounts.usage("leaver")
    assert (usage.calls["aborted"], usage.calls["success"]) == (1, 1)
    assert accounts.balance("leaver").balance == 1_000_000 - 10_000


def test_usage_totals_are_exact_after_a_graceful_shutdown(
    uvicorn_server: Any, e2e_env: dict[str, str]
) -> None:
    """Every success is counted and charged once, failures never; nothing is lost when the server stops."""
    accounts = accounts_of(e2e_env)
    key = new_customer(accounts, "acme", "100").plaintext
    headers = {"Authorization": f"Bearer {key}"}
    expected = {"success": 0, "server_error": 0}
    tokens = 0
    # uvicorn closes a connection after an app exception, so no keep-alive here.
    no_reuse = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=uvicorn_server.url, timeout=20, headers=headers, limits=no_reuse) as client:
        for index in range(120):
            path = ["/v1/hello", "/v1/fail", "/v1/boom", f"/v1/tokens/{index}"][index % 4]
            status = client.get(path).status_code
            expected["success" if status == 200 else "server_error"] += 1
            tokens += index if path.startswith("/v1/tokens") else 0
    output = uvicorn_server.stop()  # SIGTERM: lifespan shutdown drains the buffer
    assert "meterware:" not in output  # no warning or error of ours (the app's own tracebacks are expected)
    subprocess.run(
        [sys.executable, "-m", "meterware", "rollup", "--once"], env=e2e_env, check=True, timeout=60
    )
    usage = accounts.usage("acme")
    assert usage.calls["success"] == expected["success"] == 60
    assert usage.calls["server_error"] == expected["server_error"] == 60
    assert usage.meters["calls"] == 60
    assert usage.meters["tokens"] == tokens
    cost = 60 * 10_000 + tokens * 100
    assert usage.spend == cost
    balance = accounts.balance("acme")
    assert (balance.balance, balance.reserved) == (100_000_000 - cost, 0)


def test_a_client_gone_mid_stream_pays_for_the_call_and_the_tokens_reported(
    uvicorn_server: Any, e2e_env: dict[str, str]
) -> None:
    """A FastAPI stream left after its first chunk: an aborted event, charged for the call and for the
    tokens its handler reported until Starlette stopped it (its response had started)."""
    accounts = accounts_of(e2e_env)
    key = new_customer(accounts, "leaver", "1").plaintext
    with (
        httpx.Client(base_url=uvicorn_server.url, timeout=20) as client,
        client.stream("GET", "/v1/token-stream", headers={"Authorization": f"Bearer {key}"}) as response,
    ):
        assert next(response.iter_lines()) == "chunk 0"
    (event,) = _wait_for_events(accounts, 1)
    output = uvicorn_server.stop()
    assert "meterware:" not in output
    tokens = int(event.units["tokens"])
    assert (event.outcome, event.billable) == ("aborted", True)
    assert 1 <= tokens < 200  # stopped when the client left, not run to its end
    subprocess.run(
        [sys.executable, "-m", "meterware", "rollup", "--once"], env=e2e_env, check=True, timeout=60
    )
    usage = accounts.usage("leaver")
    assert (usage.calls["aborted"], usage.meters["calls"], usage.meters["tokens"]) == (1, 1, tokens)
    balance = accounts.balance("leaver")
    assert (balance.balance, balance.reserved) == (1_000_000 - 10_000 - tokens * 100, 0)


def test_units_of_a_background_task_and_redirects_are_billed_right(
    uvicorn_server: Any, e2e_env: dict[str, str]
) -> None:
    """Tokens a FastAPI background task reports 0.2 s after the response count against the call; the
    router's trailing-slash redirect (307) is recorded but not charged: the client pays once."""
    accounts = accounts_of(e2e_env)
    key = new_customer(accounts, "acme", "1").plaintext
    with httpx.Client(
        base_url=uvicorn_server.url, timeout=20, headers={"Authorization": f"Bearer {key}"}
    ) as client:
        assert client.get("/v1/background/25").json() == {"tokens": 25}
        redirect = client.get("/v1/hello/")
        assert redirect.status_code == 307
        assert client.get(redirect.headers["location"]).status_code == 200
    events = _wait_for_events(accounts, 3)
    output = uvicorn_server.stop()
    assert "meterware:" not in output
    assert sorted((event.status, event.billable, event.units.get("tokens", 0)) for event in events) == [
        (200, True, 0),
        (200, True, 25),
        (307, False, 0),
    ]
    subprocess.run(
        [sys.executable, "-m", "meterware", "rollup", "--once"], env=e2e_env, check=True, timeout=60
    )
    usage = accounts.usage("acme")
    assert (usage.meters["calls"], usage.meters["tokens"]) == (2, 25)
    balance = accounts.balance("acme")
    assert (balance.balance, balance.reserved) == (1_000_000 - 2 * 10_000 - 25 * 100, 0)


def _wait_for_events(accounts: Accounts, count: int) -> list[UsageEvent]:
    """The events in the streams once there are ``count`` of them (10 s at most)."""
    deadline = time.monotonic() + 10
    while True:
        shards = range(accounts.config.shards)
        entries = [entry for shard in shards for entry in accounts.storage.read_stream(shard, "0-0", 100)]
        events = [event for entry in entries for event in decode_batch(entry.fields[b"b"])]
        if len(events) >= count:
            return events
        assert time.monotonic() < deadline, f"{len(events)} events of {count} after 10 s"
        time.sleep(0.02)
