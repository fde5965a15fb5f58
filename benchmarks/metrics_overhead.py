"""What the Prometheus metrics cost one metered call, in-process (no HTTP, no Redis).

    python -m benchmarks.metrics_overhead [--calls 20000] [--rounds 7]

Times the request path of :class:`meterware.metering.facade.Metering` (identify, admit on
``memory://``, decide, finish) per call, and alone the metric updates that path makes for one call (one
request counter and latency observation, one backend latency observation, the units, the buffer depth).
Bounded: ``rounds`` rounds of ``calls`` calls each.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable

from prometheus_client import CollectorRegistry

from meterware import Accounts, Config
from meterware.metering.facade import Metering
from meterware.metering.responses import Problem
from meterware.metrics import AppMetrics


def per_call(run: Callable[[], None], calls: int, rounds: int, reset: Callable[[], None]) -> float:
    """Median microseconds per call over ``rounds`` rounds (after one warm-up round)."""
    results = []
    for index in range(rounds + 1):
        started = time.perf_counter()
        for _ in range(calls):
            run()
        elapsed = (time.perf_counter() - started) / calls * 1e6
        reset()
        if index:
            results.append(elapsed)
    return statistics.median(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    config = Config.from_dict(
        {
            "storage": {"url": f"memory://{uuid.uuid4().hex}", "shards": 16},
            "plans": {"payg": {"prepaid": True, "meters": {"calls": {"price": "0.000001"}}}},
            "pipeline": {"spool_dir": tempfile.mkdtemp(), "buffer_size": 10_000_000},
        }
    )
    registry = CollectorRegistry()
    metering = Metering(config, registry=registry)
    storage = metering.backend()
    accounts = Accounts.open(config)
    accounts.create_customer("bench", plan="payg")
    accounts.grant_credits("bench", "1000000")
    headers = [(b"authorization", b"Bearer " + accounts.create_key("bench").plaintext.encode())]

    def call() -> None:
        started = metering.start(storage, None, headers, b"", "GET", "/v1/hello")
        assert not isinstance(started, Problem)
        started.status = 200
        metering.finish(started, "/v1/hello")

    def drop_events() -> None:
        metering.batcher.buffer.take(10**9)

    metrics = AppMetrics(CollectorRegistry())

    def metric_updates() -> None:
        metrics.admit_duration.observe(0.0004)
        metrics.call("/v1/hello", "GET", "success", "payg", 0.002, (("calls", 1),))

    path = per_call(call, args.calls, args.rounds, drop_events)
    updates = per_call(metric_updates, args.calls, args.rounds, lambda: None)
    print(f"metered request path (memory://): {path:6.2f} us/call")
    print(f"  of which metric updates:        {updates:6.2f} us/call ({updates / path:.0%})")


if __name__ == "__main__":
    main()
