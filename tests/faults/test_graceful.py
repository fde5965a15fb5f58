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
from pathlib import Path

import pytest

from meterware.storage import _keyspace
from meterware.storage.base import START_OFFSET
from tests.faults.harness import (
    App,
    FaultRedis,
    Load,
    Stream,
    Worker,
    assert_exact,
    base_config,
    base_env,
    books,
    figures,
    merged,
    open_accounts,
    provision,
    rollup_once,
    to_toml,
    wait_until,
)

pytestmark = [pytest.mark.faults, pytest.mark.redis, pytest.mark.slow]


def path_of(n: int) -> str:
    paths = ["/v1/ok/{}", "/v1/slow/{}?s=0.3", "/v1/tokens/{}?n=3", "/v1/fail/{}", "/v1/ok/{}"]
    return paths[n % len(paths)].format(n)


def caught_up(server: FaultRedis) -> bool:
    """Whether every shard's committed offset is its stream's last entry."""
    client = server.client()
    for shard in range(4):
        last = client.xrevrange(_keyspace.events(shard), count=1)
        offset = client.get(_keyspace.offset(shard))
        if last and (offset is None or offset != last[0][0]):
            return False
    return True


def committed_anything(server: FaultRedis) -> bool:
    client = server.client()
    return any(
        (client.get(_keyspace.offset(s)) or START_OFFSET.encode()) != START_OFFSET.encode() for s in range(4)
    )


@pytest.mark.parametrize("kind", ["uvicorn", "gunicorn"])
def test_sigterm_to_worker_and_app_under_load_loses_nothing(
    kind: str,
    tmp_path: Path,
    make_redis: Callable[..., FaultRedis],
    make_app: Callable[..., App],
    make_worker: Callable[..., Worker],
) -> None:
    """SIGTERM the worker, then the app, while calls run: every call counted and charged once."""
    server = make_redis()
    spool = tmp_path / "spool"
    config = tmp_path / "meterware.toml"
    changes = {"pipeline": {"flush_interval": 1.0}, "policy": {"reservation_timeout": 60.0}}
    config.write_text(to_toml(merged(base_config(server.url, spool), changes)))
    accounts = open_accounts(config)
    key = provision(accounts).plaintext
    env = base_env(config)
    app = make_app(kind, env).start()
    first = make_worker(env)

    with Load(app.url, key, path_of, threads=6) as load:
        wait_until(lambda: committed_anything(server), 15, "the worker never committed")
        assert first.terminate() == 0, first.output()
        second = make_worker(env)
        time.sleep(1.5)
        signalled = time.monotonic()
        output = app.stop()
        stopped = time.monotonic()
    wait_until(lambda: caught_up(server), 20, "the second worker did not catch up")
    assert second.terminate() == 0, second.output()
    assert "rolled up 0 events" in rollup_once(env, tmp_path / "rollup.log")

    assert "stopped" in first.output()
    assert "Traceback" not in first.output() + second.output()
    assert "meterware:" not in output, output  # no flush failed, nothing dropped
    finished_in_shutdown = [r for r in load.snapshot() if r.status is not None and signalled < r.at < stopped]
    stream = Stream.read(server.client())
    ledger = books(accounts)
    succeeded = load.paths(200)
    tokens = 3 * sum(1 for path in succeeded if path.startswith("/v1/tokens/"))
    assert_exact(stream, ledger, succeeded, tokens=tokens)
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
