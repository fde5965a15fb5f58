"""Metrics scraped over HTTP from real processes: an app under uvicorn, the rollup worker, and gunicorn
with several worker processes in prometheus-client's multiprocess mode. Values must match the traffic sent."""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from meterware import Config
from meterware.keys import generate_key
from meterware.metering.admission import AdmitRequest, meter_holds
from meterware.metering.periods import period_bounds
from meterware.storage import open_storage
from meterware.storage._keyspace import shard_of
from tests.helpers import accounts_of
from tests.servers import ServerProcess, free_port

pytestmark = [pytest.mark.redis, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    """Every sample of a ``/metrics`` page, parsed with prometheus-client's parser."""
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(value for (sample, found), value in samples.items() if sample == name and wanted <= found)


def eventually(read: Callable[[], Samples], ready: Callable[[Samples], bool], seconds: float = 20) -> Samples:
    """Scrape until ``ready`` holds (bounded); return the last scrape."""
    deadline = time.monotonic() + seconds
    while True:
        samples = read()
        if ready(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


@contextmanager
def serving(args: list[str], env: dict[str, str], port: int, log: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(args, env, port, log)
    try:
        yield server
    finally:
        server.stop()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def send_traffic(base_url: str, acme: str, poor: str) -> None:
    """36 calls of acme (29 billable), 2 of poor (the second refused for credits), 6 without a valid key."""
    # uvicorn closes a connection after an app exception, so no keep-alive here.
    no_reuse = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=base_url, timeout=20, limits=no_reuse) as client:
        paths = ["/v1/hello"] * 20 + [f"/v1/items/{i}" for i in range(5)] + ["/v1/fail"] * 3
        paths += ["/v1/boom"] * 2 + [f"/v1/tokens/{count}" for count in (1, 2, 3, 4)] + ["/nowhere"] * 2
        for path in paths:
            client.get(path, headers=bearer(acme))
        assert client.get("/v1/hello", headers=bearer(poor)).status_code == 200
        assert client.get("/v1/hello", headers=bearer(poor)).status_code == 402
        for _ in range(3):
            assert client.get("/v1/hello").status_code == 401
        assert client.get("/v1/hello", headers={"X-API-Key": "nope"}).status_code == 401
        for _ in range(2):
            assert (
                client.get("/v1/hello", headers=bearer(generate_key(live=True).plaintext)).status_code == 401
            )


def customers(env: dict[str, str]) -> tuple[str, str, str]:
    """acme (100 credits) and poor (one call's worth, 0.01); their keys, and acme's key id."""
    accounts = accounts_of(env)
    accounts.create_customer("acme", plan="payg", anchor=0)
    accounts.grant_credits("acme", "100")
    acme = accounts.create_key("acme")
    accounts.create_customer("poor", plan="payg", anchor=0)
    accounts.grant_credits("poor", "0.015")
    poor = accounts.create_key("poor")
    accounts.close()
    return acme.plaintext, poor.plaintext, acme.key_id


def uvicorn(env: dict[str, str], tmp_path: Path) -> tuple[list[str], int, Path]:
    port = free_port()
    args = [sys.executable, "-m", "uvicorn", "tests.e2e.metrics_asgi_app:asgi", "--port", str(port)]
    return [*args, "--log-level", "warning"], port, tmp_path / "uvicorn.log"


def test_app_metrics_over_http_match_the_traffic(e2e_env: dict[str, str], tmp_path: Path) -> None:
    """An app under uvicorn: calls by route template / outcome / plan, units, rejections, pipeline."""
    acme, poor, _ = customers(e2e_env)
    args, port, log = uvicorn(e2e_env, tmp_path)
    with serving(args, e2e_env, port, log) as server:
        send_traffic(server.url, acme, poor)
        metrics_url = f"{server.url}/metrics"  # no key needed: excluded from metering by default
        samples = eventually(
            lambda: scrape(metrics_url), lambda s: total(s, "meterware_events_flushed_total") >= 38
        )
    requests = "meterware_requests_total"
    expected_calls = [
        ("/v1/hello", "success", "payg", 21),
        ("/v1/items/{id}", "success", "payg", 5),
        ("/v1/fail", "server_error", "payg", 3),
        ("/v1/boom", "server_error", "payg", 2),
        ("/v1/tokens/{count:int}", "success", "payg", 4),
        ("<unmatched>", "client_error", "payg", 2),
        ("<unmatched>", "rejected", "payg", 1),
        ("<unmatched>", "rejected", "<none>", 6),
    ]
    for route, outcome, plan, count in expected_calls:
        assert total(samples, requests, route=route, outcome=outcome, plan=plan, method="GET") == count
    assert total(samples, requests) == 44
    assert total(samples, requests, route="/v1/items/1") == 0  # templates only
    reasons = {"missing_key": 3, "malformed_key": 1, "unknown_key": 2, "insufficient_credits": 1}
    for reason, count in reasons.items():
        assert total(samples, "meterware_rejections_total", reason=reason) == count
    assert total(samples, "meterware_rejections_total") == 7
    assert total(samples, "meterware_units_total", meter="calls", plan="payg") == 30
    assert total(samples, "meterware_units_total", meter="tokens", plan="payg") == 10
    duration = "meterware_request_duration_seconds_count"
    assert total(samples, duration, route="/v1/hello", outcome="success") == 21
    assert total(samples, duration) == 44
    assert total(samples, "meterware_backend_duration_seconds_count", operation="admit") == 38
    assert total(samples, "meterware_backend_duration_seconds_count", operation="resolve_key") >= 3
    assert total(samples, "meterware_backend_errors_total") == 0
    assert total(samples, "meterware_events_flushed_total") == 38  # 36 + 2 calls of known customers
    assert total(samples, "meterware_buffer_events") == 0
    assert total(samples, "meterware_buffer_capacity_events") == 100_000
    assert total(samples, "meterware_flush_duration_seconds_count") >= 1
    assert total(samples, "meterware_events_dropped_total") == total(samples, "meterware_spool_bytes") == 0
    assert "meterware:" not in server.output()


def test_worker_metrics_over_http_match_the_rollup(e2e_env: dict[str, str], tmp_path: Path) -> None:
    """``meterware rollup --metrics-port``: events consumed, lag, refunds, per-customer usage and balance."""
    acme, poor, acme_key_id = customers(e2e_env)
    args, port, log = uvicorn(e2e_env, tmp_path)
    with serving(args, e2e_env, port, log) as server:
        send_traffic(server.url, acme, poor)
    # A call whose app process died before settling: its reservation is refunded by the worker.
    config = Config.load(e2e_env["METERWARE_CONFIG"], storage=e2e_env["METERWARE_STORAGE"])
    plan = config.plan("payg")
    start, end = period_bounds(0, plan.period, time.time())
    storage = open_storage(config.storage, shards=config.shards)
    holds = meter_holds(plan, config.meters, 1, True)
    orphan = AdmitRequest(
        shard_of("acme", 4), "acme", acme_key_id, True, plan, start, end, holds, "orphan", 1
    )
    assert storage.admit(orphan).allowed
    storage.close()

    metrics_port = free_port()
    worker = [sys.executable, "-m", "meterware", "rollup", "--metrics-port", str(metrics_port)]
    worker += ["--customer-metrics-interval", "0.2"]
    with serving(worker, e2e_env, metrics_port, tmp_path / "worker.log") as process:
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        samples = eventually(
            lambda: scrape(url),
            lambda s: (
                total(s, "meterware_rollup_events_total") >= 38
                and total(s, "meterware_rollup_reservations_refunded_total") >= 1
                and total(s, "meterware_customer_period_usage", customer="acme", meter="calls") >= 29
            ),
        )
    assert total(samples, "meterware_rollup_events_total") == 38
    assert total(samples, "meterware_rollup_dead_letters_total") == 0
    assert total(samples, "meterware_rollup_batch_duration_seconds_count") >= 1
    assert total(samples, "meterware_rollup_reservations_refunded_total") == 1
    assert total(samples, "meterware_rollup_errors_total") == 0
    assert total(samples, "meterware_rollup_shards_owned") == 4
    assert abs(total(samples, "meterware_rollup_last_round_timestamp_seconds") - time.time()) < 30
    for shard in range(4):
        assert ("meterware_rollup_lag_entries", frozenset({("shard", str(shard))})) in samples
        assert total(samples, "meterware_rollup_lag_entries", shard=str(shard)) == 0
        assert total(samples, "meterware_rollup_lag_seconds", shard=str(shard)) == 0
    usage = "meterware_customer_period_usage"
    assert total(samples, usage, customer="acme", meter="calls") == 29
    assert total(samples, usage, customer="acme", meter="tokens") == 10
    assert total(samples, usage, customer="poor", meter="calls") == 1
    # payg: 0.01 credits a call, 0.0001 a token.
    balance = "meterware_customer_balance_credits"
    assert total(samples, balance, customer="acme") == pytest.approx(100 - 29 * 0.01 - 10 * 0.0001)
    assert total(samples, balance, customer="poor") == pytest.approx(0.005)
    assert total(samples, "meterware_customers") == 2
    output = process.stop()
    assert "Traceback" not in output
    assert not re.search(r"\b(ERROR|WARNING)\b", output), output


def test_gunicorn_workers_add_up_in_multiprocess_mode(e2e_env: dict[str, str], tmp_path: Path) -> None:
    """Three gunicorn workers, recycled after 15 requests: the scraped totals are every worker's, counters
    of exited workers included; the live gauges of exited workers are gone (``child_exit``)."""
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()  # it must exist before the app is imported (``--preload``: in the master)
    config = tmp_path / "multiproc.toml"
    # Events stay in each worker's buffer until it exits (then its exit hook flushes them).
    text = Path(e2e_env["METERWARE_CONFIG"]).read_text()
    config.write_text(text.replace("flush_interval = 0.05", "flush_interval = 3600\nbuffer_size = 1000"))
    env = {**e2e_env, "METERWARE_CONFIG": str(config), "PROMETHEUS_MULTIPROC_DIR": str(multiproc)}
    acme, _, _ = customers(env)
    port = free_port()
    args = [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "examples" / "gunicorn.conf.py")]
    args += ["--workers", "3", "--max-requests", "15", "--max-requests-jitter", "0", "--preload"]
    args += ["--bind", f"127.0.0.1:{port}", "tests.e2e.metrics_wsgi_app:flask"]
    calls = 60
    pids: set[int] = set()
    with serving(args, env, port, tmp_path / "gunicorn.log") as server:
        for _ in range(calls):
            # A new connection each time, so the calls spread over the workers.
            response = httpx.get(f"{server.url}/v1/pid", headers=bearer(acme), timeout=20)
            assert response.status_code == 200
            pids.add(response.json()["pid"])

        def settled(samples: Samples) -> bool:
            buffered = total(samples, "meterware_buffer_events")
            return buffered + total(samples, "meterware_events_flushed_total") == calls

        samples = eventually(lambda: scrape(f"{server.url}/metrics"), settled)
        output = server.output()
    # 60 calls at 15 per worker life: at least four workers served them, and one (at least) exited.
    assert len(pids) >= 4, output
    assert (
        total(samples, "meterware_requests_total", route="/v1/pid", outcome="success", plan="payg") == calls
    )
    assert total(samples, "meterware_units_total", meter="tokens", plan="payg") == 2 * calls
    assert total(samples, "meterware_units_total", meter="calls", plan="payg") == calls
    assert total(samples, "meterware_request_duration_seconds_count", route="/v1/pid") == calls
    assert total(samples, "meterware_backend_duration_seconds_count", operation="admit") == calls
    # Every event is either flushed (by a worker on its way out) or still buffered in a live worker.
    flushed = total(samples, "meterware_events_flushed_total")
    assert flushed >= 15
    assert flushed + total(samples, "meterware_buffer_events") == calls
    # Live gauges sum over live workers only: three at most, not every worker that ever ran.
    capacity = total(samples, "meterware_buffer_capacity_events")
    assert 1000 <= capacity <= 3 * 1000
    assert os.listdir(multiproc)
