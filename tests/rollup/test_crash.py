"""Exactly once on real Redis: worker processes killed mid-work, paused past their lease, and racing.

The same events go to two databases of one redis-server. Database 1 is rolled up by one clean in-process
drain; database 0 by worker processes (``python -m meterware.rollup``) that are SIGKILLed mid-work and
restarted, then by two workers at once, each paused (SIGSTOP) past its lease in turn so the other takes
its shards over while it may be between a read and a commit. Both must give the totals of folding all
events at once, and move each garbage entry to the dead letters exactly once.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from meterware.events import UsageEvent
from meterware.rollup import RollupWorker
from meterware.storage import _keyspace, open_storage
from meterware.storage.base import Storage
from tests.rollup.helpers import METERS, config, expected_usage, random_events, read_all, write_events

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.faults]

SRC = Path(__file__).resolve().parents[2] / "src"
SHARDS = 6
LEASE_SECONDS = 0.4
FLUSH_BATCH = 40
# Long enough for the whole test: every bounded wait below fits in it many times over.
DEADLINE_SECONDS = 90


def config_file(path: Path, url: str) -> Path:
    meters = "\n".join(
        f'[meters.{name}]\naggregation = "{meter.aggregation}"\nsource = "{meter.source}"\n'
        for name, meter in METERS.items()
    )
    path.write_text(
        f'storage = {{ url = "{url}", shards = {SHARDS} }}\n\n{meters}\n'
        f"[pipeline]\nbatch_size = {FLUSH_BATCH}\n\n"
        # Trim as it goes, to show trimming never eats entries not yet rolled up.
        f"[rollup]\nbatch_size = 120\nlease_seconds = {LEASE_SECONDS}\nretention_seconds = 0.05\n"
    )
    return path


class Workers:
    """Worker processes started by this test, and only those: every signal goes to a PID we hold."""

    def __init__(self, config_path: Path, log_dir: Path) -> None:
        self.config_path = config_path
        self.log_dir = log_dir
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("METERWARE_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
        log = (self.log_dir / f"worker-{len(self.processes)}.log").open("wb")
        command = [sys.executable, "-m", "meterware.rollup", "--config", str(self.config_path)]
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.log_dir)
        log.close()
        self.processes.append(process)
        return process

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def stop(self, process: subprocess.Popen[bytes]) -> int:
        process.send_signal(signal.SIGCONT)
        process.send_signal(signal.SIGTERM)
        return process.wait(timeout=15)

    def cleanup(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=10)


@pytest.fixture
def workers(tmp_path: Path, redis_url: str) -> Iterator[Workers]:
    started = Workers(config_file(tmp_path / "meterware.toml", redis_url), tmp_path)
    try:
        yield started
    finally:
        started.cleanup()


def offsets(storage: Storage) -> list[str]:
    return [storage.committed_offset(shard) for shard in range(SHARDS)]


def backlog(storage: Storage) -> int:
    """Entries not yet rolled up, over all shards."""
    return sum(len(storage.read_stream(s, storage.committed_offset(s), 100_000)) for s in range(SHARDS))


def wait_for_progress(
    storage: Storage, before: list[str], deadline: float, running: list[subprocess.Popen[bytes]]
) -> None:
    """Return as soon as a worker has committed something since ``before``."""
    while offsets(storage) == before:
        for process in running:
            assert process.poll() is None, f"worker {process.pid} exited with {process.returncode}"
        assert time.monotonic() < deadline, "no worker committed anything"
        time.sleep(0.002)


def add_garbage(client: redis.Redis, shard: int, index: int) -> None:
    client.xadd(_keyspace.events(shard), {"b": b"\xc1 junk", "c": b"0", "i": f"junk-{index}".encode()})


def test_killed_paused_and_racing_workers_count_exactly_once(redis_url: str, workers: Workers) -> None:
    """SIGKILLed, restarted, paused and concurrent worker processes give the totals of one clean run."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    rng = random.Random(20_26)
    clean_url = redis_url.rsplit("/", 1)[0] + "/1"
    storage = open_storage(redis_url, shards=SHARDS, timeout=5)
    clean = open_storage(clean_url, shards=SHARDS, timeout=5)
    client, clean_client = redis.Redis.from_url(redis_url), redis.Redis.from_url(clean_url)
    written: list[tuple[UsageEvent, int]] = []
    garbage = 0

    def produce(count: int) -> None:
        nonlocal garbage
        events = random_events(rng, count)
        written.extend(write_events(storage, events, batch_size=FLUSH_BATCH, price=1500))
        write_events(clean, events, batch_size=FLUSH_BATCH, price=1500)
        for target in (client, clean_client):
            add_garbage(target, garbage % SHARDS, garbage)
        garbage += 1

    try:
        produce(6000)

        # 1. Killed mid-work, again and again, while events keep coming.
        mid_work_kills = 0
        for _ in range(6):
            before = offsets(storage)
            process = workers.start()
            wait_for_progress(storage, before, deadline, [process])
            time.sleep(rng.uniform(0, 0.03))
            workers.kill(process)
            mid_work_kills += backlog(storage) > 0
            produce(700)
        assert mid_work_kills >= 4, "the workers finished before they could be killed mid-work"

        # 2. Two workers at once; each paused past its lease in turn, so the other takes over its shards.
        pair = [workers.start(), workers.start()]
        produce(1500)
        for turn in range(6):
            paused = pair[turn % 2]
            before = offsets(storage)
            produce(500)
            wait_for_progress(storage, before, deadline, pair)
            paused.send_signal(signal.SIGSTOP)
            produce(500)
            time.sleep(LEASE_SECONDS * 2)
            paused.send_signal(signal.SIGCONT)

        # 3. Let them finish, then stop them gracefully.
        while backlog(storage):
            assert time.monotonic() < deadline, f"{backlog(storage)} entries never rolled up"
            time.sleep(0.05)
        assert [workers.stop(process) for process in pair] == [0, 0]

        # The clean run: one in-process drain over the same events.
        assert RollupWorker(clean, config(pipeline={"batch_size": FLUSH_BATCH})).drain() == len(written)

        expected = expected_usage(written)
        assert len(written) == 6000 + 6 * 700 + 1500 + 12 * 500
        assert read_all(clean, expected) == expected
        assert read_all(storage, expected) == expected
        dead = [client.xlen(_keyspace.dead_letters(s)) for s in range(SHARDS)]
        assert dead == [clean_client.xlen(_keyspace.dead_letters(s)) for s in range(SHARDS)]
        assert sum(dead) == garbage
    finally:
        for closable in (storage, clean):
            closable.close()
        client.close()
        clean_client.close()
