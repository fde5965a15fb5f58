"""A key's remaining uses under concurrent traffic through real servers: never one call more."""

from __future__ import annotations

import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import accounts_of
from tests.servers import ServerProcess, free_port, gunicorn_command

pytestmark = [pytest.mark.redis, pytest.mark.slow]

USES = 50
CALLS = 200

SERVERS = {
    "fastapi-uvicorn": [sys.executable, "-m", "uvicorn", "tests.e2e.asgi_app:app", "--log-level", "warning"],
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


@pytest.fixture(params=sorted(SERVERS))
def server_args(request: pytest.FixtureRequest) -> list[str]:
    return SERVERS[request.param]


@pytest.mark.parametrize("admission", ["strict", "lease"])
def test_a_key_with_50_uses_serves_exactly_50_of_200_concurrent_calls(
    server_args: list[str], admission: str, e2e_env: dict[str, str], tmp_path: Path
) -> None:
    """200 concurrent calls by a key with 50 uses: exactly 50 reach the app, 150 get 403 key_exhausted,
    whatever the admission mode (a key counting uses is never leased)."""
    config = Path(e2e_env["METERWARE_CONFIG"])
    config.write_text(config.read_text() + f'\n[policy]\nadmission = "{admission}"\n')
    accounts = accounts_of(e2e_env)
    accounts.create_customer("acme", plan="payg")
    accounts.grant_credits("acme", "100")
    key = accounts.create_key("acme", remaining=USES)
    port = free_port()
    args = (
        [*server_args, "--port", str(port)]
        if "uvicorn" in server_args
        else [*server_args[:-1], "--bind", f"127.0.0.1:{port}", server_args[-1]]
    )
    server = ServerProcess(args, e2e_env, port, tmp_path / "server.log")
    try:

        def call(client: httpx.Client) -> tuple[int, Any]:
            response = client.get("/v1/hello")
            return response.status_code, response.json().get("reason")

        headers = {"Authorization": f"Bearer {key.plaintext}"}
        with (
            httpx.Client(base_url=server.url, timeout=20, headers=headers) as client,
            ThreadPoolExecutor(32) as pool,
        ):
            results = Counter(pool.map(lambda _: call(client), range(CALLS)))
    finally:
        output = server.stop()
    assert results == {(200, None): USES, (403, "key_exhausted"): CALLS - USES}, output
    assert accounts.key(key.key_id).remaining == 0
    accounts.close()
