"""Graceful shutdown under load: SIGTERM to the rollup worker, then to the app (uvicorn and gunicorn).

The worker finishes its step, releases its leases and exits 0; a second worker takes over at once. The app
finishes the calls in flight and flushes everything buffered (flushes are one second apart here, so a
second of events is in the buffer when the signal comes). Every call is then counted and charged exactly
once, and no reservation is left open: the reservation timeout is a minute, so none was refunded, all
were settled.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import redis

from meterware.storage import _keyspace
from meterware.storage.base import START_OFFSET
from tests.faults.books import assert_exact, rolled_up
from tests.faults.harness import SHARDS, Load, figures, tokens_of, wait_until
from tests.faults.scenario import Scenario
from tests.helpers import paths_cycling

pytestmark = [pytest.mark.faults, pytest.mark.redis, pytest.mark.slow]


TRAFFIC = paths_cycling(["/v1/ok/{}", "/v1/slow/{}?s=0.3", "/v1/tokens/{}?n=3", "/v1/fail/{}", "/v1/ok/{}"])


def committed_anything(client: redis.Redis) -> bool:
    """Whether the worker committed an offset in some shard."""
    return any(
        (client.get(_keyspace.offset(s)) or START_OFFSET.encode()) != START_OFFSET.encode()
        for s in range(SHARDS)
    )


@pytest.mark.parametrize("kind", ["uvicorn", "gunicorn"])
def test_sigterm_to_worker_and_app_under_load_loses_nothing(
    kind: str, make_scenario: Callable[..., Scenario]
) -> None:
    """SIGTERM the worker, then the app, while calls run: every call counted and charged once."""
    scenario = make_scenario({"pipeline": {"flush_interval": 1.0}, "policy": {"reservation_timeout": 60.0}})
    client = scenario.server.client()
    app = scenario.app(kind)
    first = scenario.worker()

    with Load(app.url, scenario.key, TRAFFIC, threads=6) as load:
        wait_until(lambda: committed_anything(client), 15, "the worker never committed")
        assert first.terminate() == 0, first.output()
        second = scenario.worker()
        time.sleep(1.5)
        signalled = time.monotonic()
        output = app.stop()
        stopped = time.monotonic()
    wait_until(lambda: rolled_up(client), 20, "the second worker did not catch up")
    assert second.terminate() == 0, second.output()
    assert "rolled up 0 events" in scenario.rollup_once()

    assert "stopped" in first.output()
    assert "Traceback" not in first.output() + second.output()
    assert "meterware:" not in output, output  # no flush failed, nothing dropped
    finished_in_shutdown = [r for r in load.snapshot() if r.status is not None and signalled < r.at < stopped]
    stream = scenario.stream()
    ledger = scenario.books()
    succeeded = load.paths(200)
    assert_exact(stream, ledger, succeeded, tokens=tokens_of(succeeded))
    assert ledger.calls["server_error"] == len(load.paths(503))
    figures(
        f"sigterm-{kind}-and-worker",
        requests=len(load.snapshot()),
        succeeded=len(succeeded),
        answered_during_shutdown=len(finished_in_shutdown),
        refused_after_shutdown=sum(1 for r in load.snapshot() if r.status is None),
        events=len(stream.events),
        charged_micros=ledger.charged,
        shutdown_seconds=round(stopped - signalled, 2),
    )
