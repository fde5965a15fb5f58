"""Usage export to Stripe, Dodo Payments, OpenMeter and Lago, against local servers that check each request.

Usage comes from real calls through the WSGI middleware on memory:// (and once on a real Redis), rolled
up by the worker; the export reads the rollup windows. Time is moved forward by passing ``now`` (the
servers' clocks move with it), so the current hour counts as a completed window.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qsl

import pytest
from werkzeug.test import Client

from meterware import usage
from meterware.billing.accounts import Accounts
from meterware.billing.export import ExportError, ExportReport, UsageRecord, export_usage, open_exporter
from meterware.config import Config
from meterware.rollup.worker import RollupWorker
from meterware.storage import open_storage
from meterware.storage.base import ExportMark, Storage
from meterware.wsgi import WSGIMeteringMiddleware
from tests.export.providers import API_KEY, SERVERS, Answer, Elsewhere, ProviderServer, Redirector

PROVIDERS = list(SERVERS)
HOUR = 3600
NAMES = {"calls": "api_calls", "tokens": "llm_tokens"}


def tokens_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    query = dict(parse_qsl(environ.get("QUERY_STRING", "")))
    usage.add("tokens", int(query.pop("tokens", 0)), **query)  # the rest: dimension values
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def make_config(storage: str, provider: str, base_url: str, **target: Any) -> Config:
    return Config.from_dict(
        {
            "storage": {"url": storage, "shards": 4},
            "meters": {"calls": {}, "tokens": {"aggregation": "sum", "source": "handler"}},
            "plans": {"pro": {}},
            "export": {provider: {"meters": NAMES, "base_url": base_url} | target},
        }
    )


class World:
    """An app metered on one backend, customers with ids at the provider, and the provider's server."""

    def __init__(self, config: Config, server: ProviderServer) -> None:
        self.config = config
        self.server = server
        self.provider = server.name
        self.storage: Storage = open_storage(config.storage, shards=config.shards)
        self.accounts = Accounts(self.storage, config)
        self.app = WSGIMeteringMiddleware(tokens_app, config)
        self.keys: dict[str, str] = {}
        self.sleeps: list[float] = []
        # One worker for the whole test: a second one would wait for the first one's leases to lapse.
        self.worker = RollupWorker(self.storage, config)

    def customer(self, name: str, external: str | None) -> None:
        self.accounts.create_customer(name)
        if external:
            self.accounts.set_external_id(name, self.provider, external)
        self.keys[name] = self.accounts.create_key(name).plaintext

    def calls(self, name: str, count: int, tokens: int, query: str = "") -> None:
        client = Client(self.app)
        for _ in range(count):
            headers = {"X-API-Key": self.keys[name]}
            # Buffered: the body is read to the end and the response closed, which ends the call.
            path = f"/v1/chat?tokens={tokens}{query}"
            response = client.get(path, headers=headers, buffered=True)
            assert response.status_code == 200
        self.app.drain()
        self.worker.drain()

    def export(self, later: float | None = None, **kwargs: Any) -> Any:
        # By default, five minutes into the next hour: this hour is complete, and young enough for Dodo.
        now = time.time() + later if later is not None else hour_start() + HOUR + 300
        self.server.now = now
        exporter = open_exporter(self.config.export[self.provider], API_KEY)
        try:
            return export_usage(
                self.config,
                self.storage,
                self.provider,
                exporter=exporter,
                now=now,
                sleep=self.sleeps.append,
                **kwargs,
            )
        finally:
            exporter.close()


@pytest.fixture(params=PROVIDERS)
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    provider: str = request.param
    with SERVERS[provider](time.time()) as server:
        config = make_config(f"memory://export-{uuid.uuid4().hex}", provider, server.url)
        yield World(config, server)


def hour_start() -> int:
    return int(time.time()) // HOUR * HOUR


def test_exports_each_meter_of_each_window_once_in_the_documented_shape(world: World) -> None:
    """One event per customer, meter and hour, with the deterministic id; every request is well formed."""
    world.customer("acme", "ext_acme")
    world.customer("globex", "ext_globex")
    world.customer("nobody", None)
    world.calls("acme", 3, tokens=10)
    world.calls("globex", 1, tokens=7)
    world.calls("nobody", 2, tokens=1)
    report = world.export()
    assert world.server.invalid == []
    assert world.server.totals() == {
        ("ext_acme", "api_calls"): 3,
        ("ext_acme", "llm_tokens"): 30,
        ("ext_globex", "api_calls"): 1,
        ("ext_globex", "llm_tokens"): 7,
    }
    start = hour_start()
    assert f"mw:acme:tokens:hour:{start}" in world.server.ids()
    assert (len(report.sent), report.unmapped, report.rejected, report.too_late) == (4, 1, {}, [])
    assert report.requests == (4 if world.provider == "stripe" else 1)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_dimension_values_are_sent_as_the_provider_s_properties(provider: str) -> None:
    """One event per sub-meter with its values as properties (Stripe payload, OpenMeter data, Lago
    properties, Dodo metadata), and the units reported without values under the meter: they add up to the
    window's total; a later value is sent as its own event, nothing twice."""
    with SERVERS[provider](time.time()) as server:
        config = make_config(f"memory://export-{uuid.uuid4().hex}", provider, server.url)
        meters = dict(config.meters)
        meters["tokens"] = replace(meters["tokens"], dimensions=(("model", ("small", "large")),))
        world = World(replace(config, meters=meters), server)
        world.customer("acme", "ext_acme")
        world.calls("acme", 2, tokens=10, query="&model=large")
        world.calls("acme", 1, tokens=4, query="&model=small")
        world.calls("acme", 1, tokens=3)
        world.export()
        world.calls("acme", 1, tokens=5, query="&model=small")
        world.export()
        assert server.invalid == []
        assert {
            key: total for key, total in server.totals_by_dimensions().items() if key[1] == "llm_tokens"
        } == {
            ("ext_acme", "llm_tokens", (("model", "large"),)): 20,
            ("ext_acme", "llm_tokens", (("model", "small"),)): 9,
            ("ext_acme", "llm_tokens", ()): 3,
        }
        start = hour_start()
        assert {
            f"mw:acme:tokens{{model=large}}:hour:{start}",
            f"mw:acme:tokens{{model=small}}:hour:{start}:r2",
            f"mw:acme:tokens:hour:{start}",
        } <= set(server.ids())


def test_a_second_run_sends_nothing(world: World) -> None:
    """Marks remember what was exported: rerunning over the same windows makes no request."""
    world.customer("acme", "ext_acme")
    world.calls("acme", 2, tokens=5)
    world.export()
    before = len(world.server.requests)
    report = world.export(since=hour_start() - HOUR)
    assert (report.sent, report.requests, len(world.server.requests)) == ([], 0, before)


def test_late_usage_is_sent_once_as_a_revision_with_the_delta(world: World) -> None:
    """Usage arriving after its window was exported goes out as ``...:r2`` carrying only the difference."""
    world.customer("acme", "ext_acme")
    world.calls("acme", 2, tokens=5)
    world.export()
    world.calls("acme", 1, tokens=4)
    report = world.export()
    start = hour_start()
    assert sorted(r.event_id for r in report.sent) == [
        f"mw:acme:calls:hour:{start}:r2",
        f"mw:acme:tokens:hour:{start}:r2",
    ]
    assert world.server.totals() == {("ext_acme", "api_calls"): 3, ("ext_acme", "llm_tokens"): 14}
    assert world.export().sent == []
    assert world.server.invalid == []


def test_429_with_retry_after_is_retried_and_delivered_once(world: World) -> None:
    """A 429 waits the Retry-After seconds, then the same request goes through, once."""
    world.customer("acme", "ext_acme")
    world.calls("acme", 1, tokens=3)
    world.server.inject(Answer(429, world.server.error_body("Too many requests"), {"Retry-After": "2"}))
    report = world.export()
    assert world.sleeps == [2.0]
    assert report.retries == 1
    assert world.server.totals() == {("ext_acme", "api_calls"): 1, ("ext_acme", "llm_tokens"): 3}
    assert world.server.invalid == []


def test_5xx_backs_off_exponentially_then_gives_up_and_a_rerun_resumes(world: World) -> None:
    """Server errors back off with jitter up to max_attempts, then the run fails; the next run delivers."""
    world.customer("acme", "ext_acme")
    world.calls("acme", 1, tokens=3)
    world.server.inject(*[Answer(503, world.server.error_body("Service unavailable"))] * 5)
    with pytest.raises(ExportError, match="gave up after 5 attempts"):
        world.export()
    assert len(world.sleeps) == 4
    assert all(0 <= delay <= 0.5 * 2**attempt for attempt, delay in enumerate(world.sleeps))
    assert world.server.events == {}
    world.export()
    assert world.server.totals() == {("ext_acme", "api_calls"): 1, ("ext_acme", "llm_tokens"): 3}


def confirmed_marks(world: World) -> list[ExportMark]:
    """The marks of this hour that say the provider took the event."""
    marks = world.storage.read_export_marks(world.provider, "acme", "hour", [hour_start()])
    return [mark for meters in marks.values() for mark in meters.values() if mark.confirmed]


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_redirect_is_never_followed_and_nothing_is_recorded_as_delivered(
    status: int, provider: str
) -> None:
    """A 3xx ends the run as a failure: no request (and no API key) reaches the other host, no mark is
    confirmed, and the next run sends the same events to the right address."""
    with Elsewhere() as elsewhere, SERVERS[provider](time.time()) as server:
        with Redirector(status, elsewhere.url) as moved:
            url = f"memory://export-{uuid.uuid4().hex}"
            world = World(make_config(url, provider, moved.url), server)
            world.customer("acme", "ext_acme")
            world.calls("acme", 1, tokens=2)
            with pytest.raises(ExportError, match=f"HTTP {status}.*not followed"):
                world.export()
            assert len(moved.requests) == 1  # not retried either: the address is wrong for every event
        assert (elsewhere.keys_received(), elsewhere.requests) == ([], [])
        assert confirmed_marks(world) == []
        world.config = make_config(url, provider, server.url)
        assert len(world.export().sent) == 2
        assert world.server.totals() == {("ext_acme", "api_calls"): 1, ("ext_acme", "llm_tokens"): 2}


@pytest.mark.parametrize("status", [200, 201, 202])
def test_openmeter_takes_only_its_documented_204_as_delivered(status: int) -> None:
    """OpenMeter answers 204 when it accepts events; another 2xx (a proxy, a wrong base_url) is a failure."""
    with SERVERS["openmeter"](time.time()) as server:
        world = World(make_config(f"memory://export-{uuid.uuid4().hex}", "openmeter", server.url), server)
        world.customer("acme", "ext_acme")
        world.calls("acme", 1, tokens=2)
        server.inject(Answer(status, {"ok": True}))
        with pytest.raises(ExportError, match=f"HTTP {status}.*204"):
            world.export()
        assert confirmed_marks(world) == []
        assert len(world.export().sent) == 2
        assert server.totals() == {("ext_acme", "api_calls"): 1, ("ext_acme", "llm_tokens"): 2}


class FailingMarks:
    """A storage whose confirmation of marks fails: the process "dies" after the provider took the events."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def __getattr__(self, name: str) -> Any:
        return getattr(self.storage, name)

    def write_export_marks(self, provider: str, customer: str, window: str, marks: Any, ttl: int) -> None:
        if any(mark is not None and mark.confirmed for meters in marks.values() for mark in meters.values()):
            raise RuntimeError("killed between send and checkpoint")
        self.storage.write_export_marks(provider, customer, window, marks, ttl)


def test_a_crash_between_send_and_checkpoint_resends_the_same_ids_and_the_provider_dedupes(
    world: World,
) -> None:
    """The rerun sends the same ids with the same values; the provider counts them once."""
    world.customer("acme", "ext_acme")
    world.calls("acme", 2, tokens=5)
    crashed = World(world.config, world.server)
    crashed.storage = FailingMarks(world.storage)  # type: ignore[assignment]
    with pytest.raises(RuntimeError):
        crashed.export()
    world.calls("acme", 1, tokens=1)  # more usage meanwhile: it must not ride on the old ids
    first = world.export()
    assert {r.event_id for r in first.sent} == set(world.server.ids())
    second = world.export()
    assert [r.event_id.rsplit(":", 1)[1] for r in second.sent] == ["r2", "r2"]
    assert world.server.totals() == {("ext_acme", "api_calls"): 3, ("ext_acme", "llm_tokens"): 11}
    assert world.server.invalid == []


def test_a_refused_event_is_reported_and_does_not_hold_up_the_others(world: World) -> None:
    """A 4xx for one customer's events is reported per event (not retried); the batch's others go through."""
    world.customer("acme", "ext_acme")
    world.customer("bad", "ext_bad")
    world.calls("acme", 1, tokens=2)
    world.calls("bad", 1, tokens=2)
    world.server.refuse_customers.add("ext_bad")
    report = world.export()
    assert sorted(report.rejected) == [
        f"mw:bad:calls:hour:{hour_start()}",
        f"mw:bad:tokens:hour:{hour_start()}",
    ]
    assert all(re.match(r"HTTP (400|422): ", reason) for reason in report.rejected.values())
    assert world.server.totals() == {("ext_acme", "api_calls"): 1, ("ext_acme", "llm_tokens"): 2}
    assert report.retries == 0
    world.server.refuse_customers.clear()  # fixed at the provider: the next run sends them
    assert len(world.export().sent) == 2


@pytest.mark.parametrize(
    ("provider", "target", "later"),
    [
        pytest.param("stripe", {"window": "day"}, 37 * 86_400, id="stripe-35-days"),
        pytest.param("dodo", {}, 3 * HOUR, id="dodo-1-hour"),
        pytest.param("openmeter", {"max_age_seconds": HOUR}, 3 * HOUR, id="openmeter-configured"),
        pytest.param("lago", {"max_age_seconds": HOUR}, 3 * HOUR, id="lago-configured"),
    ],
)
def test_windows_older_than_the_provider_accepts_are_reported_not_sent(
    provider: str, target: dict[str, Any], later: float, caplog: pytest.LogCaptureFixture
) -> None:
    """Too-late events are counted and logged; the run succeeds and sends nothing for them."""
    with SERVERS[provider](time.time()) as server:
        config = make_config(f"memory://export-{uuid.uuid4().hex}", provider, server.url, **target)
        world = World(config, server)
        world.customer("acme", "ext_acme")
        world.calls("acme", 1, tokens=2)
        report = world.export(later=later, since=int(time.time()) - 86_400)
        assert (len(report.too_late), report.sent, server.requests) == (2, [], [])
        assert "older than the provider accepts" in caplog.text


def test_dry_run_lists_the_events_and_records_nothing() -> None:
    """--dry-run shows what would be sent, sends and checkpoints nothing."""
    with SERVERS["dodo"](time.time()) as server:
        world = World(make_config(f"memory://export-{uuid.uuid4().hex}", "dodo", server.url), server)
        world.customer("acme", "ext_acme")
        world.calls("acme", 2, tokens=1)
        now = time.time() + 2 * HOUR
        report = export_usage(world.config, world.storage, "dodo", dry_run=True, now=now)
        assert sorted((r.name, r.value) for r in report.sent) == [("api_calls", 2), ("llm_tokens", 2)]
        assert server.requests == []
        assert world.storage.read_export_marks("dodo", "acme", "hour", [hour_start()]) == {}
        assert len(world.export().sent) == 2


def test_customer_ids_meterware_falls_back_to_the_meterware_id() -> None:
    """With customer_ids = "meterware", a customer without an external id is sent under its own id."""
    with SERVERS["openmeter"](time.time()) as server:
        url = f"memory://export-{uuid.uuid4().hex}"
        world = World(make_config(url, "openmeter", server.url, customer_ids="meterware"), server)
        world.customer("acme", None)
        world.calls("acme", 1, tokens=1)
        world.export()
        assert server.totals() == {("acme", "api_calls"): 1, ("acme", "llm_tokens"): 1}


@pytest.mark.redis
def test_export_on_redis_keeps_marks_cursor_and_external_ids(redis_url: str) -> None:
    """The Redis backend stores external ids, marks and cursors: a rerun sends nothing, late usage a delta."""
    with SERVERS["stripe"](time.time()) as server:
        world = World(make_config(redis_url, "stripe", server.url), server)
        world.customer("acme", "cus_acme")
        assert world.accounts.external_ids("acme") == {"stripe": "cus_acme"}
        world.calls("acme", 2, tokens=3)
        assert len(world.export().sent) == 2
        start = hour_start()
        marks = world.storage.read_export_marks("stripe", "acme", "hour", [start, start - HOUR])
        assert marks == {start: {"calls": ExportMark(2, 1, 2, True), "tokens": ExportMark(6, 1, 6, True)}}
        assert world.storage.read_export_cursor("stripe", "acme", "hour") == start + HOUR
        assert world.export().sent == []
        world.calls("acme", 1, tokens=3)
        assert [(r.meter, r.value, r.revision) for r in world.export().sent] == [
            ("calls", 1, 2),
            ("tokens", 3, 2),
        ]
        assert server.totals() == {("cus_acme", "api_calls"): 3, ("cus_acme", "llm_tokens"): 9}
        assert server.invalid == []


def test_report_as_dict_keeps_field_order() -> None:
    """A run's report as data: fields in order, records as dicts, ``unmapped`` as ``unmapped_customers``."""
    record = UsageRecord("e1", "acme", "cus_1", "calls", "api_calls", 5, "day", 100, 199, 2)
    report = ExportReport("stripe", sent=[record], rejected={"e2": "bad"}, decreased=[("e3", 4, 2)])
    report.unmapped = 1
    record_data = [
        ("event_id", "e1"),
        ("customer", "acme"),
        ("external_id", "cus_1"),
        ("meter", "calls"),
        ("name", "api_calls"),
        ("value", 5),
        ("window", "day"),
        ("start", 100),
        ("timestamp", 199),
        ("revision", 2),
        ("dimensions", {}),
    ]
    assert list(record.as_dict().items()) == record_data
    assert list(report.as_dict().items()) == [
        ("provider", "stripe"),
        ("dry_run", False),
        ("windows_read", 0),
        ("requests", 0),
        ("retries", 0),
        ("sent", [dict(record_data)]),
        ("rejected", {"e2": "bad"}),
        ("too_late", []),
        ("decreased", [["e3", 4, 2]]),
        ("unmapped_customers", 1),
    ]
