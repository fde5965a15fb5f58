"""The worker as an operator runs it: ``python -m meterware.rollup`` processes, and a Redis that goes away."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from meterware.config import Config
from meterware.rollup import RollupWorker
from meterware.rollup.aggregate import fold
from meterware.storage import open_storage
from meterware.storage.base import Storage
from tests.rollup.helpers import config, expected_usage, flat, random_events, read_all, write_events
from tests.servers import RedisServer

SRC = Path(__file__).resolve().parents[2] / "src"
SHARDS = 4


def run_module(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERWARE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "meterware.rollup", *args]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def backlog(storage: Storage) -> int:
    return sum(len(storage.read_stream(s, storage.committed_offset(s), 10_000)) for s in range(SHARDS))


def wait_until(condition: object, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not callable(condition) or not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def loaded(url: str) -> bool:
    """Whether a restarted server has read its append-only file back and answers commands."""
    client = redis.Redis.from_url(url)
    try:
        return bool(client.ping())
    except redis.BusyLoadingError:
        return False
    finally:
        client.close()


@pytest.mark.redis
def test_once_process_drains_and_exits(redis_url: str, tmp_path: Path) -> None:
    """``python -m meterware.rollup --once`` rolls up everything there is, then exits with 0."""
    storage = open_storage(redis_url, shards=SHARDS, timeout=5)
    try:
        written = write_events(storage, random_events(random.Random(11), 1500), batch_size=100)
        path = tmp_path / "meterware.toml"
        path.write_text(f'storage = {{ url = "{redis_url}", shards = {SHARDS} }}\n')
        done = run_module("--config", str(path), "--once", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "rolled up 1500 events" in done.stderr
        assert backlog(storage) == 0
        # The default configuration knows only ``calls``: the other meters are summed, or counted if text.
        totals = fold([e for e, _ in written], [c for _, c in written], Config().meters)
        expected = {window: flat(window_totals) for window, window_totals in totals.items()}
        assert read_all(storage, expected) == expected
        assert {"tokens", "peak", "gauge", "users"} <= set(expected[next(iter(expected))])
    finally:
        storage.close()


def test_bad_config_exits_2(tmp_path: Path) -> None:
    """A configuration mistake stops the worker at start with one line naming the field."""
    path = tmp_path / "meterware.toml"
    path.write_text("[rollup]\nbatch_size = 0\n")
    done = run_module("--config", str(path), "--once", cwd=tmp_path)
    assert done.returncode == 2
    assert "rollup.batch_size: must be at least 1" in done.stderr


@pytest.fixture
def restartable_redis() -> Iterator[list[RedisServer]]:
    """A redis-server with an append-only file, so it can be stopped and started again with its data."""
    durable = ("--appendonly", "yes", "--appendfsync", "always")
    first = RedisServer(*durable).start()
    servers = [first, RedisServer(*durable, "--dir", str(first.dir), port=first.port)]
    try:
        yield servers
    finally:
        servers[1].stop()
        first.cleanup()


@pytest.mark.redis
def test_worker_rides_out_a_redis_restart(
    restartable_redis: list[RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    """A running worker backs off while Redis is down and goes on where it stopped when it is back."""
    first, second = restartable_redis
    storage = open_storage(first.url, shards=SHARDS, timeout=1)
    worker = RollupWorker(storage, config(lease_seconds=5), owner="survivor")
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), kwargs={"idle_sleep": 0.01})
    rng = random.Random(12)
    try:
        with caplog.at_level(logging.INFO, logger="meterware.rollup"):
            thread.start()
            written = write_events(storage, random_events(rng, 800), batch_size=50)
            wait_until(lambda: backlog(storage) == 0, 30)
            first.stop()
            wait_until(lambda: "backend error" in caplog.text, 30)
            second.start()
            wait_until(lambda: loaded(second.url), 30)
            written += write_events(storage, random_events(rng, 800), batch_size=50)
            wait_until(lambda: backlog(storage) == 0, 60)
            assert thread.is_alive()
    finally:
        stop.set()
        thread.join(timeout=30)
    try:
        assert not thread.is_alive()
        expected = expected_usage(written)
        assert read_all(storage, expected) == expected
    finally:
        storage.close()
