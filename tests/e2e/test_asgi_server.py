"""End to end: a FastAPI app under a real uvicorn process, a real Redis, and the rollup worker process."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from meterware import Accounts, Config

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def _accounts(env: dict[str, str]) -> Accounts:
    return Accounts.open(Config.load(env["METERWARE_CONFIG"], storage=env["METERWARE_STORAGE"]))


def test_streaming_response_is_delivered_chunk_by_chunk(uvicorn_server: Any, e2e_env: dict[str, str]) -> None:
    """The first chunk reaches the client while the handler is still running: nothing is buffered."""
    accounts = _accounts(e2e_env)
    accounts.create_customer("streamer", plan="payg")
    accounts.grant_credits("streamer", "1")
    key = accounts.create_key("streamer").plaintext
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
    accounts = _accounts(e2e_env)
    accounts.create_customer("leaver", plan="payg")
    accounts.grant_credits("leaver", "1")
    key = accounts.create_key("leaver").plaintext
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
    accounts = _accounts(e2e_env)
    accounts.create_customer("acme", plan="payg")
    accounts.grant_credits("acme", "100")
    key = accounts.create_key("acme").plaintext
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
