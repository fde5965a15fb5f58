"""End to end: Flask and Django under real gunicorn and uvicorn processes, a real Redis, the rollup worker.

Each server takes concurrent traffic (successes, failures, exceptions, handler-reported units, streams),
is stopped with SIGTERM right after the last response, and the totals must come out exact: every event
buffered at exit is flushed by the worker processes on their way out.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from meterware import Accounts
from meterware.events import UsageEvent, decode_batch
from tests.helpers import accounts_of, new_customer
from tests.servers import ServerProcess, free_port, gunicorn_command

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def _gunicorn(app: str, *options: str) -> list[str]:
    return gunicorn_command(app, *options, "--graceful-timeout", "10")


PRELOADED_FLASK = ("tests.e2e.flask_app:app", "--preload", "--workers", "2")
SERVERS = {
    "flask-gunicorn-sync": _gunicorn(*PRELOADED_FLASK, "--worker-class", "sync"),
    "flask-gunicorn-gthread": _gunicorn(*PRELOADED_FLASK, "--worker-class", "gthread", "--threads", "4"),
    "django-gunicorn": _gunicorn("django.core.wsgi:get_wsgi_application()", "--workers", "2"),
    "django-uvicorn": [
        sys.executable, "-m", "uvicorn", "--factory", "meterware.django:get_asgi_application",
        "--log-level", "warning",
    ],
}  # fmt: skip


@pytest.fixture
def flush_interval() -> float:
    """Seconds between the flusher's passes in the server processes."""
    return 0.05


@pytest.fixture(params=sorted(SERVERS))
def server(
    request: pytest.FixtureRequest, e2e_env: dict[str, str], tmp_path: Path, flush_interval: float
) -> Any:
    name = request.param
    port = free_port()
    args = SERVERS[name]
    if "gunicorn" in args:
        args = [*args[:-1], "--bind", f"127.0.0.1:{port}", args[-1]]
    else:
        args = [*args, "--port", str(port)]
    env = {**e2e_env, "DJANGO_SETTINGS_MODULE": "tests.e2e.django_site.settings"}
    config = Path(env["METERWARE_CONFIG"])
    text = config.read_text().replace("flush_interval = 0.05", f"flush_interval = {flush_interval}")
    config.write_text(text)
    process = ServerProcess(args, env, port, tmp_path / f"{name}.log")
    yield process
    process.stop()


@pytest.mark.parametrize("flush_interval", [60.0])  # nothing flushes while serving: all at exit
def test_usage_totals_are_exact_after_a_graceful_shutdown(server: Any, e2e_env: dict[str, str]) -> None:
    """Concurrent traffic, SIGTERM right after the last response: every call counted and charged once."""
    accounts = accounts_of(e2e_env)
    key = new_customer(accounts, "acme", "100").plaintext
    paths = [
        ["/v1/hello", "/v1/fail", "/v1/boom", f"/v1/tokens/{index}", f"/v1/stream/{index % 7}"][index % 5]
        for index in range(200)
    ]

    def call(client: httpx.Client, path: str) -> tuple[str, int, str]:
        response = client.get(path)
        return path, response.status_code, response.text

    limits = httpx.Limits(max_keepalive_connections=0)  # some servers close a connection after a 500
    headers = {"Authorization": f"Bearer {key}"}
    with (
        httpx.Client(base_url=server.url, timeout=20, headers=headers, limits=limits) as client,
        ThreadPoolExecutor(8) as pool,
    ):
        results = list(pool.map(lambda path: call(client, path), paths))
    output = server.stop()  # SIGTERM at once: events of the last calls are still buffered

    statuses = Counter(status for _, status, _ in results)
    assert statuses == {200: 120, 503: 40, 500: 40}, output
    tokens = 0
    for path, _, text in results:
        count = int(path.rsplit("/", 1)[1]) if path[4:10] in ("tokens", "stream") else 0
        tokens += count
        if path.startswith("/v1/stream/"):
            assert text == "".join(f"chunk {index}\n" for index in range(count))
    assert "meterware:" not in output  # no warning or error of ours (the apps' tracebacks are expected)
    subprocess.run(
        [sys.executable, "-m", "meterware", "rollup", "--once"], env=e2e_env, check=True, timeout=60
    )
    usage = accounts.usage("acme")
    assert usage.calls == {"success": 120, "client_error": 0, "server_error": 80, "aborted": 0, "rejected": 0}
    assert usage.meters["calls"] == 120
    assert usage.meters["tokens"] == tokens
    cost = 120 * 10_000 + tokens * 100
    assert usage.spend == cost
    balance = accounts.balance("acme")
    assert (balance.balance, balance.reserved) == (100_000_000 - cost, 0)


def test_a_client_gone_mid_stream_is_recorded_as_aborted_and_charged_as_served(
    server: Any, e2e_env: dict[str, str]
) -> None:
    """The server notices the client left on its next write; the call is an aborted event, charged: its
    response had started (``policy.refund_aborted_streams`` would refund it)."""
    accounts = accounts_of(e2e_env)
    key = new_customer(accounts, "acme", "1").plaintext
    headers = {"Authorization": f"Bearer {key}"}
    with (
        httpx.Client(base_url=server.url, timeout=20) as client,
        client.stream("GET", "/v1/slow-stream", headers=headers) as response,
    ):
        assert next(response.iter_lines()) == "chunk 0"
    # The stream would last 2 s; its event is flushed as soon as the server gives up on it.
    deadline = time.monotonic() + 10
    while not _events(accounts):
        assert time.monotonic() < deadline, "no event 10 s after the client went away"
        time.sleep(0.02)
    output = server.stop()
    assert "meterware:" not in output
    (event,) = _events(accounts)
    assert (event.outcome, event.billable) == ("aborted", True)
    assert event.duration_us < 1_500_000  # not run to its end
    subprocess.run(
        [sys.executable, "-m", "meterware", "rollup", "--once"], env=e2e_env, check=True, timeout=60
    )
    assert accounts.usage("acme").calls["aborted"] == 1
    balance = accounts.balance("acme")
    assert (balance.balance, balance.reserved) == (1_000_000 - 10_000, 0)


def _events(accounts: Accounts) -> list[UsageEvent]:
    shards = accounts.config.shards
    entries = [entry for shard in range(shards) for entry in accounts.storage.read_stream(shard, "0-0", 100)]
    return [event for entry in entries for event in decode_batch(entry.fields[b"b"])]
