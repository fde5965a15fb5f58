"""Soak: a bounded run at steady load, with the rollup worker trimming as it goes.

Nothing may grow with time: the resident memory of the app and of the worker, the app's buffer, the spool,
Redis's memory and the streams are sampled every second, and the last third of the run is compared with
the first (generous bounds: this catches a leak of every call, not noise). The run is
``METERWARE_SOAK_SECONDS`` long (60 by default, for CI); the totals at the end are exact.

Redis keeps one idempotency marker per flushed batch for 24 hours (``mw:{sN}:b:<batch id>``): they are
what a longer soak would see grow until then, so the Redis bound allows for them, counted exactly.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable

import pytest

from meterware.storage import _keyspace
from tests.faults.books import rolled_up, spool_bytes
from tests.faults.harness import (
    CALL_PRICE,
    SHARDS,
    TOKEN_PRICE,
    Load,
    figures,
    rss_kib,
    tokens_of,
    wait_until,
)
from tests.faults.scenario import Scenario
from tests.helpers import paths_cycling

pytestmark = [pytest.mark.faults, pytest.mark.redis, pytest.mark.slow]

SOAK_SECONDS = float(os.environ.get("METERWARE_SOAK_SECONDS", "60"))
RATE = 150  # requests per second
#: Bytes Redis may use per batch marker it keeps (key, value, expiry, dict entry): generous.
MARKER_BYTES = 250


#: Three fixed paths: a bare app's metrics are labelled by path, so unique paths would grow by design.
TRAFFIC = paths_cycling(["/v1/ok/soak", "/v1/tokens/soak?n=2", "/v1/fail/soak"])


def test_steady_load_leaves_memory_buffer_spool_and_redis_flat(
    make_scenario: Callable[..., Scenario],
) -> None:
    """RSS, buffer, spool, Redis memory and stream lengths stay flat over the run; totals exact."""
    scenario = make_scenario({"rollup": {"retention_seconds": 2.0}})
    spool = scenario.spool
    app = scenario.app()
    worker = scenario.worker()
    client = scenario.server.client()
    samples: list[dict[str, float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(1.0):
            metrics = app.metrics()
            info = client.info("memory")
            samples.append(
                {
                    "rss_kib": app.rss_kib(),
                    "worker_rss_kib": rss_kib(worker.process.pid),
                    "buffer": metrics.get("meterware_buffer_events", 0.0),
                    "spool": spool_bytes(spool),
                    "redis_bytes": info["used_memory"],
                    "markers": sum(1 for _ in client.scan_iter("mw:{s*}:b:*", count=1000)),
                    "stream": sum(client.xlen(_keyspace.events(s)) for s in range(SHARDS)),
                }
            )

    sampler = threading.Thread(target=sample, daemon=True)
    with Load(app.url, scenario.key, TRAFFIC, threads=3, rate=RATE) as load:
        sampler.start()
        time.sleep(SOAK_SECONDS)
        stop.set()
        sampler.join(10)
    app.stop()
    wait_until(lambda: rolled_up(client), 30, "the worker did not catch up")
    # An admission whose reply came after the request path's budget (a loaded machine) was served fail-open
    # while its reservation stood: the worker refunds it once `reservation_timeout` has passed.
    wait_until(lambda: scenario.books().reserved == 0, 30, "the worker did not refund the orphaned holds")
    assert worker.terminate() == 0

    third = len(samples) // 3
    first, last = samples[:third], samples[-third:]

    def mean(window: list[dict[str, float]], name: str) -> float:
        return statistics.fmean(entry[name] for entry in window)

    growth = {name: mean(last, name) - mean(first, name) for name in samples[0]}
    assert growth["rss_kib"] <= 4 * 1024, growth
    assert growth["worker_rss_kib"] <= 4 * 1024, growth
    assert max(entry["buffer"] for entry in samples) <= 200, "the buffer grew (the flusher fell behind)"
    assert max(entry["spool"] for entry in samples) == 0
    assert growth["stream"] <= 100, "the stream grows: trimming does not keep up"
    markers = growth["markers"] * MARKER_BYTES
    assert growth["redis_bytes"] <= 1024 * 1024 + markers, growth

    statuses = load.statuses()
    assert set(statuses) <= {200, 503}, statuses
    ledger = scenario.books()
    succeeded = statuses[200]
    assert ledger.calls["success"] == succeeded
    assert ledger.calls["server_error"] == statuses[503]
    tokens = tokens_of((result.path for result in load.snapshot() if result.status == 200), per_call=2)
    assert ledger.tokens == tokens
    assert ledger.spend == ledger.charged == succeeded * CALL_PRICE + tokens * TOKEN_PRICE
    assert ledger.reserved == 0
    figures(
        "soak",
        seconds=SOAK_SECONDS,
        requests=len(load.snapshot()),
        rate_per_second=round(len(load.snapshot()) / SOAK_SECONDS, 1),
        samples=len(samples),
        rss_kib_first_last=(round(mean(first, "rss_kib")), round(mean(last, "rss_kib"))),
        worker_rss_kib_first_last=(round(mean(first, "worker_rss_kib")), round(mean(last, "worker_rss_kib"))),
        redis_bytes_first_last=(round(mean(first, "redis_bytes")), round(mean(last, "redis_bytes"))),
        markers_first_last=(round(mean(first, "markers")), round(mean(last, "markers"))),
        stream_first_last=(round(mean(first, "stream")), round(mean(last, "stream"))),
        max_buffer=max(entry["buffer"] for entry in samples),
        max_spool=max(entry["spool"] for entry in samples),
        charged_micros=ledger.charged,
    )
