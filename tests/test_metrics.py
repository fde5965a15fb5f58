"""App-side metrics, read from a fresh registry per test: calls, units, rejections, backend, pipeline."""

from __future__ import annotations

import gc
import re
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from flask import Flask
from prometheus_client import CollectorRegistry, disable_created_metrics, enable_created_metrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.test import Client

import meterware
from meterware import Accounts, Config, MeteringMiddleware, metrics
from meterware.events import UsageEvent, event_row, new_event_id
from meterware.keys import generate_key
from meterware.metering.batcher import Batcher
from meterware.metering.batching import Pending
from meterware.metering.flushers import flush_sync
from meterware.metrics import AppMetrics
from meterware.rollup.metrics import RollupMetrics, ShardLag
from meterware.storage import open_storage
from meterware.storage.base import Settlement
from meterware.wsgi import WSGIMeteringMiddleware
from tests.servers import free_port


def app_config(tmp_path: Path, **sections: Any) -> Config:
    return Config.from_dict(
        {
            "storage": {"url": f"memory://metrics-{uuid.uuid4().hex}", "shards": 4},
            "meters": {
                "calls": {"aggregation": "count"},
                "tokens": {"aggregation": "sum", "source": "handler"},
                "peak": {"aggregation": "max", "source": "handler"},
            },
            "plans": {
                "payg": {"prepaid": True, "meters": {"calls": {"price": "0.01"}}},
                "tight": {"rate_limits": ["2/minute"]},
                "free": {"meters": {"calls": {"quota": 1}}},
            },
            "pipeline": {"flush_interval": 0.01, "spool_dir": str(tmp_path / "spool")},
            **sections,
        }
    )


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A sample's value; 0 when the series does not exist."""
    return registry.get_sample_value(name, labels) or 0.0


def calls(registry: CollectorRegistry, route: str, outcome: str, plan: str, method: str = "GET") -> float:
    labels = {"route": route, "method": method, "outcome": outcome, "plan": plan}
    return value(registry, "meterware_requests_total", **labels)


class Customers:
    def __init__(self, config: Config) -> None:
        self.accounts = Accounts(open_storage(config.storage, shards=config.shards), config)

    def key(self, plan: str, credits: str | None = None, *, live: bool = True) -> dict[str, str]:
        customer = f"{plan}-{uuid.uuid4().hex[:8]}"
        self.accounts.create_customer(customer, plan=plan)
        if credits:
            self.accounts.grant_credits(customer, credits)
        return {"Authorization": f"Bearer {self.accounts.create_key(customer, live=live).plaintext}"}


# -- ASGI ---------------------------------------------------------------------------------------------


async def hello(request: Request) -> Response:
    return JSONResponse({"ok": True})


async def item(request: Request) -> Response:
    return JSONResponse({"id": request.path_params["id"]})


async def fail(request: Request) -> Response:
    return JSONResponse({"error": "overloaded"}, status_code=503)


async def boom(request: Request) -> Response:
    raise RuntimeError("boom")


async def tokens(request: Request) -> Response:
    meterware.usage.add("tokens", int(request.path_params["count"]))
    meterware.usage.add("peak", 1000)  # a max meter: its units never add up
    return JSONResponse({})


def starlette_app(config: Config, registry: CollectorRegistry) -> Starlette:
    routes = [
        Route("/v1/hello", hello, methods=["GET", "POST", "PURGE"]),
        Route("/v1/items/{id}", item),
        Route("/v1/fail", fail),
        Route("/v1/boom", boom),
        Route("/v1/tokens/{count:int}", tokens),
        Route("/metrics", metrics.asgi_app(registry)),
    ]
    app = Starlette(routes=routes)
    app.add_middleware(MeteringMiddleware, config=config, registry=registry)
    return app


@pytest.fixture
def asgi(tmp_path: Path) -> Iterator[tuple[TestClient, CollectorRegistry, Customers]]:
    config = app_config(tmp_path)
    registry = CollectorRegistry()
    with TestClient(starlette_app(config, registry), raise_server_exceptions=False) as client:
        yield client, registry, Customers(config)


def test_asgi_counts_calls_by_route_template_method_outcome_and_plan(asgi: Any) -> None:
    """Every served call is counted once under its route template, method, outcome and plan."""
    client, registry, customers = asgi
    payg = customers.key("payg", "10")
    for path in ["/v1/hello"] * 3 + ["/v1/items/1", "/v1/items/2", "/v1/fail", "/v1/boom", "/nowhere"]:
        client.get(path, headers=payg)
    client.post("/v1/hello", headers=payg)
    assert calls(registry, "/v1/hello", "success", "payg") == 3
    assert calls(registry, "/v1/hello", "success", "payg", method="POST") == 1
    assert calls(registry, "/v1/items/{id}", "success", "payg") == 2
    assert calls(registry, "/v1/fail", "server_error", "payg") == 1
    assert calls(registry, "/v1/boom", "server_error", "payg") == 1
    assert calls(registry, "<unmatched>", "client_error", "payg") == 1
    assert (
        value(registry, "meterware_request_duration_seconds_count", route="/v1/hello", outcome="success") == 4
    )
    assert value(registry, "meterware_request_duration_seconds_sum", route="/v1/hello", outcome="success") > 0
    # One key lookup (then cached), one admission per call.
    assert value(registry, "meterware_backend_duration_seconds_count", operation="resolve_key") == 1
    assert value(registry, "meterware_backend_duration_seconds_count", operation="admit") == 9
    assert value(registry, "meterware_backend_errors_total", operation="admit") == 0


def test_asgi_counts_billable_units_of_live_calls_only(asgi: Any) -> None:
    """Units of successful live calls add up per meter and plan; test keys and failures add nothing."""
    client, registry, customers = asgi
    live, sandbox = customers.key("payg", "10"), customers.key("payg", live=False)
    for count in (7, 5):
        client.get(f"/v1/tokens/{count}", headers=live)
    client.get("/v1/tokens/100", headers=sandbox)
    client.get("/v1/fail", headers=live)
    assert value(registry, "meterware_units_total", meter="calls", plan="payg") == 2
    assert value(registry, "meterware_units_total", meter="tokens", plan="payg") == 12
    assert registry.get_sample_value("meterware_units_total", {"meter": "peak", "plan": "payg"}) is None
    assert calls(registry, "/v1/tokens/{count:int}", "success", "payg") == 3


def test_asgi_counts_rejections_by_reason(asgi: Any) -> None:
    """Refused calls: counted by reason, and as ``rejected`` calls of their plan (``<none>`` if unknown)."""
    client, registry, customers = asgi
    unknown = {"Authorization": f"Bearer {generate_key(live=True).plaintext}"}
    tight, free, poor = customers.key("tight"), customers.key("free"), customers.key("payg", "0.01")
    client.get("/v1/hello")
    client.get("/v1/hello", headers={"X-API-Key": "not-a-key"})
    client.get("/v1/hello", headers=unknown)
    for _ in range(3):
        client.get("/v1/hello", headers=tight)
    for _ in range(2):
        client.get("/v1/hello", headers=free)
        client.get("/v1/hello", headers=poor)
    expected = {
        "missing_key": 1,
        "malformed_key": 1,
        "unknown_key": 1,
        "rate_limited": 1,
        "quota_exceeded": 1,
        "insufficient_credits": 1,
        "backend_unavailable": 0,
        "suspended": 0,
    }
    for reason, count in expected.items():
        assert value(registry, "meterware_rejections_total", reason=reason) == count, reason
    assert calls(registry, "<unmatched>", "rejected", "<none>") == 3
    assert calls(registry, "<unmatched>", "rejected", "tight") == 1
    assert calls(registry, "<unmatched>", "rejected", "free") == 1
    assert calls(registry, "<unmatched>", "rejected", "payg") == 1
    assert calls(registry, "/v1/hello", "success", "tight") == 2
    assert (
        value(registry, "meterware_request_duration_seconds_count", route="<unmatched>", outcome="rejected")
        == 6
    )


def test_backend_outage_counts_errors_and_the_failure_policy(tmp_path: Path) -> None:
    """With the backend down, lookups fail (503 ``backend_unavailable``) and the errors are counted."""
    down = f"redis://127.0.0.1:{free_port()}/0"
    config = app_config(tmp_path, storage={"url": down, "shards": 4}, policy={"timeout": 0.5})
    registry = CollectorRegistry()
    key = {"Authorization": f"Bearer {generate_key(live=True).plaintext}"}
    with TestClient(starlette_app(config, registry)) as client:
        assert client.get("/v1/hello", headers=key).status_code == 503
    assert value(registry, "meterware_backend_errors_total", operation="resolve_key") == 1
    assert value(registry, "meterware_backend_duration_seconds_count", operation="resolve_key") == 1
    assert value(registry, "meterware_rejections_total", reason="backend_unavailable") == 1


def test_metrics_endpoint_needs_no_key_and_is_not_metered(asgi: Any) -> None:
    """``/metrics`` is excluded by default: served without a key, and never counted as a call."""
    client, _, customers = asgi
    client.get("/v1/hello", headers=customers.key("payg", "1"))
    response = client.get("/metrics")
    assert response.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    assert families["meterware_requests"].type == "counter"
    assert families["meterware_request_duration_seconds"].type == "histogram"
    assert [s.value for s in families["meterware_requests"].samples if s.name.endswith("_total")] == [1.0]


def test_fastapi_serves_the_global_registry_with_one_line(tmp_path: Path) -> None:
    """``app.add_route("/metrics", metrics.endpoint)``: prometheus-client's global registry, no key needed."""
    config = app_config(tmp_path)
    app = FastAPI()
    app.add_middleware(MeteringMiddleware, config=config)
    app.add_route("/metrics", metrics.endpoint)

    @app.get("/v1/fastapi-hello")
    def fastapi_hello() -> dict[str, bool]:
        return {"ok": True}

    with TestClient(app) as client:
        assert client.get("/v1/fastapi-hello", headers=Customers(config).key("payg", "1")).status_code == 200
        response = client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    samples = [
        sample
        for family in openmetrics_families(response.text)
        for sample in family.samples
        if sample.labels.get("route") == "/v1/fastapi-hello"
    ]
    assert [
        (s.name, s.labels["outcome"], s.value) for s in samples if s.name == "meterware_requests_total"
    ] == [("meterware_requests_total", "success", 1.0)]


def test_a_configured_exclude_list_replaces_the_default(tmp_path: Path) -> None:
    """A configuration naming its own ``routes.exclude`` meters ``/metrics`` unless it lists it too."""
    registry = CollectorRegistry()
    config = app_config(tmp_path, routes={"exclude": ["/health"]})
    with TestClient(starlette_app(config, registry)) as client:
        assert client.get("/metrics").status_code == 401
    config = app_config(tmp_path, routes={"exclude": ["/health", "/metrics"]})
    with TestClient(starlette_app(config, registry)) as client:
        assert client.get("/metrics").status_code == 200


def test_middlewares_sharing_a_registry_register_once(tmp_path: Path) -> None:
    """Two middleware instances on one registry share its metrics (no "Duplicated timeseries")."""
    registry = CollectorRegistry()
    config = app_config(tmp_path)
    customers = Customers(config)
    key = customers.key("payg", "1")
    for _ in range(2):
        with TestClient(starlette_app(config, registry)) as client:
            client.get("/v1/hello", headers=key)
    assert calls(registry, "/v1/hello", "success", "payg") == 2
    assert AppMetrics.for_registry(registry) is AppMetrics.for_registry(registry)


def test_labels_stay_bounded(asgi: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past ``MAX_ROUTES`` route labels, and for non-standard methods, calls are counted as ``<other>``."""
    client, registry, customers = asgi
    monkeypatch.setattr(metrics, "MAX_ROUTES", 2)
    key = customers.key("payg", "10")
    client.get("/v1/hello", headers=key)
    client.get("/v1/items/1", headers=key)
    client.get("/v1/fail", headers=key)
    client.request("PURGE", "/v1/hello", headers=key)
    assert calls(registry, "/v1/hello", "success", "payg") == 1
    assert calls(registry, "/v1/items/{id}", "success", "payg") == 1
    assert calls(registry, "<other>", "server_error", "payg") == 1
    assert calls(registry, "/v1/hello", "success", "payg", method="<other>") == 1


# -- WSGI ---------------------------------------------------------------------------------------------


def test_wsgi_counts_calls_units_and_rejections(tmp_path: Path) -> None:
    """The WSGI adapter counts through the same path; ``wsgi_app()`` serves the metrics without a key."""
    config = app_config(tmp_path)
    registry = CollectorRegistry()
    flask = Flask(__name__)

    @flask.get("/v1/items/<int:item_id>")
    def get_item(item_id: int) -> dict[str, int]:
        meterware.usage.add("tokens", item_id)
        return {"id": item_id}

    flask.wsgi_app = WSGIMeteringMiddleware(  # type: ignore[method-assign]
        DispatcherMiddleware(flask.wsgi_app, {"/metrics": metrics.wsgi_app(registry)}),
        config=config,
        registry=registry,
    )
    client = Client(flask)
    key = Customers(config).key("payg", "10")

    def status(path: str, **kwargs: Any) -> int:
        # A WSGI call ends when the server has sent the body and closes the response.
        with client.get(path, **kwargs) as response:
            response.get_data()
            return response.status_code

    for item_id in (1, 2, 3):
        assert status(f"/v1/items/{item_id}", headers=key) == 200
    assert status("/v1/nothing", headers=key) == 404
    assert status("/v1/items/1") == 401
    assert calls(registry, "/v1/items/<int:item_id>", "success", "payg") == 3
    assert calls(registry, "<unmatched>", "client_error", "payg") == 1
    assert value(registry, "meterware_units_total", meter="tokens", plan="payg") == 6
    assert value(registry, "meterware_rejections_total", reason="missing_key") == 1
    response = client.get("/metrics")
    assert response.status_code == 200
    names = {f.name for f in text_string_to_metric_families(response.get_data(as_text=True))}
    assert {"meterware_requests", "meterware_units", "meterware_buffer_events"} <= names


# -- pipeline -----------------------------------------------------------------------------------------


def pending(shard: int = 0) -> Pending:
    event = UsageEvent(
        new_event_id(),
        0,
        "acme",
        "key_x",
        "payg",
        "/v1/x",
        "GET",
        200,
        "success",
        10,
        5,
        {"calls": 1},
        True,
        True,
        0,
    )
    return Pending(shard, event_row(event), Settlement("acme", True, 0, "", True, False, ()))


def pipeline(tmp_path: Path, registry: CollectorRegistry, **settings: Any) -> Batcher:
    config = Config.from_dict({"pipeline": {"spool_dir": str(tmp_path / "spool"), **settings}})
    return Batcher(config.pipeline, metrics=AppMetrics(registry))


def test_buffer_depth_scrapes_while_pipelines_are_made(tmp_path: Path) -> None:
    """A scrape reads the buffers while other threads make pipelines (middleware built on first use)."""
    registry = CollectorRegistry()
    shared = AppMetrics(registry)
    config = Config.from_dict({"pipeline": {"spool_dir": str(tmp_path / "spool")}})
    made: list[Batcher] = []
    stop = threading.Event()

    def make_pipelines() -> None:
        while not stop.is_set() and len(made) < 5_000:
            made.append(Batcher(config.pipeline, metrics=shared))

    maker = threading.Thread(target=make_pipelines)
    maker.start()
    try:
        for _ in range(2_000):
            value(registry, "meterware_buffer_events")
    finally:
        stop.set()
        maker.join()
    made[0].put(pending(0))
    assert value(registry, "meterware_buffer_events") == 1


def test_pipeline_exports_buffer_depth_and_flushes(tmp_path: Path) -> None:
    """Buffered events show in the depth gauge; a flush moves them to ``events_flushed`` and times it."""
    registry = CollectorRegistry()
    flow = pipeline(tmp_path, registry, buffer_size=100)
    for shard in (0, 0, 1):
        flow.put(pending(shard))
    assert value(registry, "meterware_buffer_events") == 3
    flush_sync(flow, open_storage(f"memory://{uuid.uuid4().hex}", shards=4))
    assert value(registry, "meterware_buffer_events") == 0
    assert value(registry, "meterware_buffer_capacity_events") == 100  # counted by the flushing process
    assert value(registry, "meterware_events_flushed_total") == 3
    assert value(registry, "meterware_batches_flushed_total") == 2
    assert value(registry, "meterware_flush_duration_seconds_count") == 2


def test_pipeline_exports_spooling_replay_and_drops(tmp_path: Path) -> None:
    """Backend down: the flush error, the spooled events and bytes; back up: the replay; full: drops."""
    registry = CollectorRegistry()
    flow = pipeline(tmp_path, registry, buffer_size=2)
    for _ in range(3):
        flow.put(pending())
    assert value(registry, "meterware_events_dropped_total") == 1  # the buffer holds two
    down = open_storage(f"redis://127.0.0.1:{free_port()}/0", shards=4, timeout=0.5)
    flush_sync(flow, down)
    assert value(registry, "meterware_backend_errors_total", operation="flush") == 1
    assert value(registry, "meterware_flush_duration_seconds_count") == 1
    assert value(registry, "meterware_events_spooled_total") == 2
    flush_sync(flow, down)  # backing off: nothing tried
    assert value(registry, "meterware_spool_bytes") > 0
    up = open_storage(f"memory://{uuid.uuid4().hex}", shards=4)
    flush_sync(flow, up, final=True)
    assert value(registry, "meterware_batches_replayed_total") == 1
    assert value(registry, "meterware_events_flushed_total") == 2
    flush_sync(flow, up)
    assert value(registry, "meterware_spool_bytes") == 0
    full_registry = CollectorRegistry()
    full = pipeline(tmp_path / "full", full_registry, spool_max_bytes=0)
    full.put(pending())
    flush_sync(full, down)
    assert value(full_registry, "meterware_events_dropped_total") == 1  # the spool is full too


# -- exposition ---------------------------------------------------------------------------------------


def test_exposition_speaks_both_formats() -> None:
    """``exposition()`` gives the text format, or OpenMetrics when the scraper asks for it."""
    registry = CollectorRegistry()
    AppMetrics(registry).call("/v1/x", "GET", "success", "payg", 0.01)
    body, content_type = metrics.exposition(None, registry)
    assert content_type.startswith("text/plain")
    assert b'meterware_requests_total{method="GET",outcome="success",plan="payg",route="/v1/x"} 1.0' in body
    body, content_type = metrics.exposition("application/openmetrics-text; version=1.0.0", registry)
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


def test_child_exit_is_harmless_outside_multiprocess_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gunicorn hook does nothing when ``PROMETHEUS_MULTIPROC_DIR`` is not set."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)

    class Worker:
        pid = 12345

    metrics.child_exit(None, Worker())
    assert metrics.exposition_registry() is not None


# -- the scrape, sample by sample ---------------------------------------------------------------------

SCRAPES = Path(__file__).parent / "data"
CREATED = re.compile(r"^(\w+_created(?:\{.*\})?) (\S+)$", re.MULTILINE)


class Depth:
    """A buffer of a fixed depth (what the depth gauge reads)."""

    def __init__(self, depth: int) -> None:
        self.depth = depth

    def __len__(self) -> int:
        return self.depth


def scripted_traffic(registry: CollectorRegistry) -> tuple[AppMetrics, Depth]:
    """Every update the request path, the flusher and the worker make, with fixed values (the metrics
    returned are kept, as a middleware keeps them)."""
    app = AppMetrics(registry)
    app.call("/v1/hello", "GET", "success", "payg", 0.003, (("calls", 1),))
    app.call("/v1/hello", "GET", "success", "payg", 0.2, (("calls", 1), ("tokens", 7)))
    app.call("/v1/items/{id}", "POST", "server_error", "payg", 1.5)
    app.call("/v1/hello", "PURGE", "success", "free", 61.0, (("tokens", 2),))
    app.refused("missing_key", "GET", "<none>", "<unmatched>", 0.001)
    app.refused("rate_limited", "GET", "tight", "<unmatched>", 0.0005)
    app.admit_duration.observe(0.0004)
    app.admit_duration.observe(0.001)  # on a bucket's bound: counted in that bucket
    app.resolve_duration.observe(0.02)
    for errors in (app.admit_errors, app.resolve_errors, app.flush_errors):
        errors.inc()
    app.units_rejected.inc(3)
    app.events_flushed.inc(5)
    app.events_spooled.inc(2)
    app.events_dropped.inc()
    for batches in (app.batches_flushed, app.batches_replayed, app.batches_quarantined, app.batches_expired):
        batches.inc()
    app.flush_duration.observe(0.03)
    app.buffer_capacity.inc(100)
    app.spool_bytes.set(2048)
    buffer = Depth(4)
    if app.counts_buffer(buffer):  # multiprocess mode: the pipeline counts its events in and out
        app.buffer_events.inc(len(buffer))
    worker = RollupMetrics(registry)
    worker.events.inc(50)
    worker.entries.inc(10)
    worker.dead_letters.inc()
    worker.batch_duration.observe(0.07)
    worker.refunded.inc(2)
    worker.errors.labels("3").inc()
    worker.last_round.set(1700000000.5)
    worker.shards_owned.set(4)
    worker.alerts.labels("quota").inc()
    worker.webhooks_delivered.inc()
    worker.webhooks_failed.inc()
    worker.lag[0] = ShardLag(None, 3, 7)
    worker.lag[2] = ShardLag(None, None, 0)
    return app, buffer


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        pytest.param(None, "metrics_scrape.txt", id="text"),
        pytest.param("application/openmetrics-text", "metrics_scrape.openmetrics.txt", id="openmetrics"),
    ],
)
@pytest.mark.parametrize("multiprocess", [False, True], ids=["tallied", "multiprocess-mode-metrics"])
def test_a_scrape_shows_every_name_label_help_bucket_and_value(
    accept: str | None, expected: str, multiprocess: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole scrape of scripted traffic, line by line, as dashboards and rules read it (the creation
    times aside: each is the time its series was first counted); the same from the metrics made for
    multiprocess mode (prometheus-client's own, read here from this process's registry)."""
    if multiprocess:
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    else:
        monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    registry = CollectorRegistry()
    began = time.time()
    _, buffer = scripted_traffic(registry)
    gc.collect()
    body = metrics.exposition(accept, registry)[0].decode()
    assert buffer.depth == value(registry, "meterware_buffer_events")
    created = [float(found) for _, found in CREATED.findall(body)]
    assert created
    assert all(began <= when <= time.time() for when in created)
    assert CREATED.sub(r"\1 CREATED", body) == (SCRAPES / expected).read_text()


def test_switching_off_created_series_holds_for_meterware_too() -> None:
    """``disable_created_metrics()`` (or ``PROMETHEUS_DISABLE_CREATED_SERIES``) drops every ``_created``."""
    registry = CollectorRegistry()
    scripted_traffic(registry)
    disable_created_metrics()
    try:
        body = metrics.exposition(None, registry)[0].decode()
    finally:
        enable_created_metrics()
    assert "_total" in body
    assert "_created" not in body


def test_a_scrape_filtered_by_name_reads_the_current_values() -> None:
    """``?name[]=...`` (a restricted registry) finds meterware's families and what was counted so far."""
    registry = CollectorRegistry()
    AppMetrics(registry).call("/v1/x", "GET", "success", "payg", 0.01)
    restricted = registry.restricted_registry(["meterware_requests_total"])
    assert [sample.value for family in restricted.collect() for sample in family.samples] == [1.0]
