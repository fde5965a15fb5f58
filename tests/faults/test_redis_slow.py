"""Redis slow: it sleeps (``DEBUG SLEEP``), pauses its clients (``CLIENT PAUSE``), or stops (SIGSTOP).

The request path keeps to its timeout budget whatever Redis does (each backend call gives up after
``policy.timeout``, and the call is served fail-open); the flusher backs off and spools without blocking
requests; the buffer and the spool never grow past their bounds, and what they cannot hold is counted.
Commands sent while Redis was stopped run when it resumes, after the app gave up on them: admissions
leave reservations nobody settles (refunded by the worker) and flushes land before their retry (which
must then be a no-op).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.faults.books import assert_exact, spool_bytes
from tests.faults.harness import (
    CALL_PRICE,
    LATENCY_BOUND,
    MIXED_PATHS,
    App,
    Load,
    figures,
    tokens_of,
    wait_until,
)
from tests.faults.scenario import Scenario

pytestmark = [pytest.mark.faults, pytest.mark.redis, pytest.mark.slow]


class Sampler:
    """Reads the app's metrics and the spool directory's size every 20 ms while the test runs."""

    def __init__(self, app: App, spool: Path) -> None:
        self.app = app
        self.spool = spool
        self.buffer: list[float] = []
        self.spool_metric: list[float] = []
        self.spool_size: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.spool_size.append(spool_bytes(self.spool))
            try:
                metrics = self.app.metrics()
            except Exception:  # a scrape that times out while Redis is stopped says nothing
                continue
            self.buffer.append(metrics.get("meterware_buffer_events", 0.0))
            self.spool_metric.append(metrics.get("meterware_spool_bytes", 0.0))


def test_slow_redis_never_stalls_a_request(make_scenario: Callable[..., Scenario]) -> None:
    """DEBUG SLEEP, CLIENT PAUSE and SIGSTOP under load: requests keep their budget, totals stay exact."""
    scenario = make_scenario()
    server, spool = scenario.server, scenario.spool
    app = scenario.app()
    control = server.client()

    with Load(app.url, scenario.key, MIXED_PATHS, threads=4) as load, Sampler(app, spool) as sampler:
        time.sleep(1.0)
        control.execute_command("DEBUG", "SLEEP", "1.2")  # blocks this client too, like every other
        time.sleep(0.5)
        control.execute_command("CLIENT", "PAUSE", "1200", "ALL")
        time.sleep(1.7)
        server.pause()
        time.sleep(1.5)
        server.resume()
        time.sleep(1.0)
    metrics = app.metrics()
    wait_until(lambda: spool_bytes(spool) == 0, 15, "the spool was never replayed")
    app.stop()
    time.sleep(2.2)  # admissions that ran after the app gave up on them: refunded after 2 s
    scenario.rollup_once()

    slowest = load.slowest()
    assert slowest.seconds <= LATENCY_BOUND, f"{slowest.path} took {slowest.seconds:.2f}s"
    assert load.statuses().keys() <= {200, 503}
    assert all(r.path.startswith("/v1/fail/") for r in load.snapshot() if r.status == 503)
    assert metrics['meterware_backend_errors_total{operation="admit"}'] > 0, "Redis was never slow enough"
    assert metrics['meterware_backend_errors_total{operation="flush"}'] > 0, "the flusher never failed"
    assert metrics["meterware_events_spooled_total"] > 0
    assert metrics["meterware_events_dropped_total"] == 0
    assert max(sampler.buffer) <= 100_000
    stream = scenario.stream()
    ledger = scenario.books()
    succeeded = load.paths(200)
    assert_exact(stream, ledger, succeeded, tokens=tokens_of(succeeded))
    figures(
        "redis-slow",
        requests=len(load.snapshot()),
        succeeded=len(succeeded),
        slowest_seconds=round(slowest.seconds, 3),
        latency_bound_seconds=LATENCY_BOUND,
        admit_timeouts=metrics['meterware_backend_errors_total{operation="admit"}'],
        flush_failures=metrics['meterware_backend_errors_total{operation="flush"}'],
        events_spooled=metrics["meterware_events_spooled_total"],
        batches_replayed=metrics["meterware_batches_replayed_total"],
        max_spool_bytes=max(sampler.spool_size),
        events=len(stream.events),
        charged_micros=ledger.charged,
    )


BUFFER_SIZE = 10
SPOOL_MAX_BYTES = 4000


def test_buffer_and_spool_bounds_hold_and_every_drop_is_counted(
    make_scenario: Callable[..., Scenario],
) -> None:
    """Redis stopped for 4.5 s, a tiny buffer and spool: bounds hold, drops are counted, none is charged."""
    changes = {"pipeline": {"buffer_size": BUFFER_SIZE, "batch_size": 5, "spool_max_bytes": SPOOL_MAX_BYTES}}
    scenario = make_scenario(changes)
    server, spool = scenario.server, scenario.spool
    app = scenario.app()

    with Load(app.url, scenario.key, "/v1/ok/{}".format, threads=8) as load, Sampler(app, spool) as sampler:
        time.sleep(1.0)
        server.pause()
        # Long enough for the spool to fill whatever the app's pace: the flusher spools only between its
        # attempts, each blocked for flush_timeout (1 s), and the backoff doubles (0.1, 0.2, 0.4 s).
        time.sleep(4.5)
        server.resume()
        time.sleep(1.0)
    metrics = app.metrics()
    wait_until(lambda: spool_bytes(spool) == 0, 15, "the spool was never replayed")
    output = app.stop()
    time.sleep(2.2)  # reservations of dropped events, and of admissions run after the app gave up
    scenario.rollup_once()

    slowest = load.slowest()
    assert slowest.seconds <= LATENCY_BOUND, f"{slowest.path} took {slowest.seconds:.2f}s"
    assert max(sampler.spool_size) <= SPOOL_MAX_BYTES
    assert max(sampler.spool_metric) <= SPOOL_MAX_BYTES
    assert max(sampler.buffer) <= BUFFER_SIZE
    dropped = int(metrics["meterware_events_dropped_total"])
    assert dropped > 0, "the bounds were never reached"
    assert "spool full" in output
    assert "event buffer full" in output
    stream = scenario.stream()
    stream.assert_no_duplicates()
    ledger = scenario.books()
    succeeded = load.paths(200)
    assert load.statuses() == {200: len(load.snapshot())}
    # Every success has an event, but for the drops; only events are charged; nothing stays reserved.
    assert stream.paths("success") <= succeeded
    assert len(succeeded) == len(stream.paths("success")) + dropped
    assert ledger.calls["success"] == len(stream.paths("success"))
    assert ledger.spend == stream.charged() == ledger.charged == len(stream.paths("success")) * CALL_PRICE
    assert ledger.reserved == 0
    figures(
        "buffer-and-spool-bounds",
        requests=len(load.snapshot()),
        succeeded=len(succeeded),
        dropped_and_counted=dropped,
        events=len(stream.events),
        max_buffer_events=max(sampler.buffer),
        buffer_size=BUFFER_SIZE,
        max_spool_bytes=max(sampler.spool_size),
        spool_max_bytes=SPOOL_MAX_BYTES,
        charged_micros=ledger.charged,
    )
