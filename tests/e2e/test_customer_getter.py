"""``customer_getter`` under concurrent traffic through a real uvicorn: a customer without a key is held
to its credits exactly, as a key's customer is."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import accounts_of
from tests.servers import ServerProcess, free_port

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def test_200_concurrent_calls_without_a_key_never_pass_the_credits(
    e2e_env: dict[str, str], tmp_path: Path
) -> None:
    """Credits for 40 calls, 200 concurrent calls by a customer the app authenticated: 40 served, 160
    refused with 402, the 40 charged once; an unknown customer is 403, no customer at all 401."""
    accounts = accounts_of(e2e_env)
    accounts.create_customer("acme", plan="payg")
    # 40 calls at 0.01, and a little left: the plan also prices tokens, so a call needs a positive balance
    # after it.
    accounts.grant_credits("acme", "0.405")
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "uvicorn",
        "tests.e2e.getter_app:app",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    server = ServerProcess(args, e2e_env, port, tmp_path / "server.log")
    try:

        def call(client: httpx.Client) -> tuple[int, Any]:
            response = client.get("/v1/hello")
            body = response.json()
            return response.status_code, body.get("customer", body.get("reason"))

        with (
            httpx.Client(base_url=server.url, timeout=20, headers={"X-User": "acme"}) as client,
            ThreadPoolExecutor(32) as pool,
        ):
            results = Counter(pool.map(lambda _: call(client), range(200)))
            unknown = client.get("/v1/hello", headers={"X-User": "nobody"})
        anonymous = httpx.get(f"{server.url}/v1/hello", timeout=20)
    finally:
        output = server.stop()
    assert results == {(200, "acme"): 40, (402, "insufficient_credits"): 160}, output
    assert (unknown.status_code, unknown.json()["reason"]) == (403, "unknown_customer")
    assert (anonymous.status_code, anonymous.json()["reason"]) == (401, "missing_key")
    subprocess.run(
        [sys.executable, "-m", "meterware", "rollup", "--once"], env=e2e_env, check=True, timeout=60
    )
    usage = accounts.usage("acme")
    assert (usage.meters["calls"], usage.spend) == (40, 400_000)
    balance = accounts.balance("acme")
    assert (balance.balance, balance.reserved) == (5_000, 0)
    accounts.close()
