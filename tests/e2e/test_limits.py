"""The concurrency cap and the spend cap under concurrent traffic through real servers."""

from __future__ import annotations

import math
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import accounts_of
from tests.servers import ServerProcess, free_port, gunicorn_command

pytestmark = [pytest.mark.redis, pytest.mark.slow]

UVICORN = [sys.executable, "-m", "uvicorn", "tests.e2e.asgi_app:app", "--log-level", "warning"]
SERVERS = {
    "fastapi-uvicorn": UVICORN,
    "flask-gunicorn-gthread": gunicorn_command(
        "tests.e2e.flask_app:app",
        "--preload",
        "--workers",
        "2",
        "--worker-class",
        "gthread",
        "--threads",
        "8",
    ),
}


def serve(server_args: list[str], env: dict[str, str], tmp_path: Path) -> ServerProcess:
    port = free_port()
    args = (
        [*server_args, "--port", str(port)]
        if "uvicorn" in server_args
        else [*server_args[:-1], "--bind", f"127.0.0.1:{port}", server_args[-1]]
    )
    return ServerProcess(args, env, port, tmp_path / "server.log")


def add_to_config(env: dict[str, str], text: str) -> None:
    config = Path(env["METERWARE_CONFIG"])
    config.write_text(config.read_text() + text)


def test_at_most_5_calls_in_flight_and_a_finished_call_frees_its_slot(
    e2e_env: dict[str, str], tmp_path: Path
) -> None:
    """Cap 5: of 20 concurrent streaming calls held open, 5 are served and 15 refused (429
    concurrency_exceeded, Retry-After 1); once they finish, 5 more are served at once."""
    add_to_config(e2e_env, "\n[policy]\ntimeout = 5.0\n\n[plans.inflight]\nconcurrency = 5\n")
    accounts = accounts_of(e2e_env)
    accounts.create_customer("acme", plan="inflight")
    key = accounts.create_key("acme")
    flag = Path(e2e_env["E2E_STREAM_FLAG"])
    server = serve(UVICORN, e2e_env, tmp_path)
    try:

        def call(client: httpx.Client) -> tuple[int, Any, str | None]:
            response = client.get("/v1/stream")
            reason = response.json().get("reason") if response.status_code != 200 else None
            return response.status_code, reason, response.headers.get("retry-after")

        headers = {"Authorization": f"Bearer {key.plaintext}"}
        with (
            httpx.Client(base_url=server.url, timeout=20, headers=headers) as client,
            ThreadPoolExecutor(20) as pool,
        ):
            futures = [pool.submit(call, client) for _ in range(20)]
            deadline = time.monotonic() + 10
            while sum(future.done() for future in futures) < 15 and time.monotonic() < deadline:
                time.sleep(0.02)
            refused_while_open = sum(future.done() for future in futures)
            flag.touch()  # the 5 served streams end
            wait(futures)
            results = Counter(future.result() for future in futures)
            flag.unlink()
            again = Counter(pool.map(lambda _: client.get("/v1/hello").status_code, range(5)))
    finally:
        output = server.stop()
    assert refused_while_open == 15, output
    assert results == {(200, None, None): 5, (429, "concurrency_exceeded", "1"): 15}, output
    assert again == {200: 5}, output
    accounts.close()


def test_a_tokens_per_minute_limit_refuses_with_a_retry_after(
    e2e_env: dict[str, str], tmp_path: Path
) -> None:
    """1,000 words a minute (60 ms a word), each call taking the meter's reserve of 100 (6 s) at admission:
    two calls reporting 500 words, each flushed before the next, fill the bucket (60 s ahead); the third
    needs 6 s more than the burst: 429 rate_limited, Retry-After 6 less the time since the first call
    (the bucket drains meanwhile; rounded up), its ``words-rate-60s`` entry alone in the headers."""
    add_to_config(
        e2e_env,
        '\n[policy]\ntimeout = 5.0\n\n[meters.words]\naggregation = "sum"\nsource = "handler"\n'
        "reserve = 100\n"
        '\n[plans.tpm]\nrate_limits = ["1000 words/minute"]\n',
    )
    accounts = accounts_of(e2e_env)
    accounts.create_customer("acme", plan="tpm")
    key = accounts.create_key("acme")
    server = serve(UVICORN, e2e_env, tmp_path)
    try:
        headers = {"Authorization": f"Bearer {key.plaintext}"}
        with httpx.Client(base_url=server.url, timeout=20, headers=headers) as client:
            served = []
            first = time.time()
            for _ in range(2):
                served.append(client.get("/v1/words/500").status_code)
                time.sleep(0.25)  # flushed (every 50 ms): its 500 words are in the bucket
            before = time.time()
            refused = client.get("/v1/words/500")
            after = time.time()
    finally:
        output = server.stop()
    accounts.close()
    assert served == [200, 200], output
    assert refused.status_code == 429, output
    assert refused.json()["reason"] == "rate_limited"
    assert (
        math.ceil(6 - (after - first))
        <= int(refused.headers["retry-after"])
        <= math.ceil(6 - (before - first))
    )
    assert int(refused.headers["retry-after"]) >= 5
    assert refused.headers["ratelimit-policy"] == '"words-rate-60s";q=1000;w=60'
    assert refused.headers["ratelimit"].startswith('"words-rate-60s";r=')


@pytest.fixture(params=sorted(SERVERS))
def server_args(request: pytest.FixtureRequest) -> list[str]:
    return SERVERS[request.param]


@pytest.mark.parametrize("admission", ["strict", "lease"])
def test_200_concurrent_calls_never_pass_the_spend_cap(
    server_args: list[str], admission: str, e2e_env: dict[str, str], tmp_path: Path
) -> None:
    """A postpaid plan at 0.01 a call with a 0.50 cap: of 200 concurrent calls exactly 50 are served,
    150 refused with 429 spend_cap_reached, in either admission mode; the period's spend is 0.50."""
    add_to_config(
        e2e_env,
        # A generous backend timeout: a busy machine's slow admission would serve the call fail-open.
        f'\n[policy]\nadmission = "{admission}"\ntimeout = 5.0\n'
        '\n[plans.capped]\nspend_cap = "0.50"\n[plans.capped.meters.calls]\nprice = "0.01"\n',
    )
    accounts = accounts_of(e2e_env)
    accounts.create_customer("acme", plan="capped")
    key = accounts.create_key("acme")
    server = serve(server_args, e2e_env, tmp_path)
    try:

        def call(client: httpx.Client) -> tuple[int, Any]:
            response = client.get("/v1/hello")
            return response.status_code, response.json().get("reason")

        headers = {"Authorization": f"Bearer {key.plaintext}"}
        with (
            httpx.Client(base_url=server.url, timeout=20, headers=headers) as client,
            ThreadPoolExecutor(32) as pool,
        ):
            results = Counter(pool.map(lambda _: call(client), range(200)))
    finally:
        output = server.stop()
    if admission == "strict":
        assert results == {(200, None): 50, (429, "spend_cap_reached"): 150}, output
    else:
        # A lease's block holds its calls until they are served or it runs out (lease_seconds): on a busy
        # machine a block may run out with calls unused, and calls refused meanwhile are refused early.
        assert set(results) <= {(200, None), (429, "spend_cap_reached")}, results
        assert 40 <= results[(200, None)] <= 50, (results, output)
    accounts.close()
