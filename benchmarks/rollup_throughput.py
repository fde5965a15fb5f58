"""Rollup throughput: events per second of ``RollupWorker.drain()`` on memory:// and on a real Redis.

    python benchmarks/rollup_throughput.py [--events 100000] [--batch 1000] [--shards 16] [--spread 300]
        [--customers 200] [--redis URL]

Without ``--redis`` a throw-away redis-server is started on a free port (if one is installed). The events
are flushed first (not timed), then one worker drains them; the time of the drain alone is reported.
"""

from __future__ import annotations

import argparse
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from meterware.config import Config
from meterware.events import UsageEvent, encode_batch, new_event_id
from meterware.rollup import RollupWorker
from meterware.storage import open_storage
from meterware.storage._keyspace import shard_of
from meterware.storage.base import Batch, Settlement, Storage

CONFIG = Config.from_dict(
    {
        "meters": {
            "calls": {},
            "tokens": {"aggregation": "sum", "source": "handler"},
            "users": {"aggregation": "unique", "source": "handler"},
        }
    }
)


def make_events(count: int, customers: int, spread_ms: int) -> list[UsageEvent]:
    rng = random.Random(7)
    now = int(time.time() * 1000)
    return [
        UsageEvent(
            id=new_event_id(now),
            timestamp_ms=now - rng.randrange(spread_ms),
            customer=f"customer-{rng.randrange(customers)}",
            key_id="key",
            plan="default",
            route="/v1/complete",
            method="POST",
            status=200,
            outcome="success",
            duration_us=1000,
            ttfb_us=500,
            units={"calls": 1, "tokens": rng.randrange(2000), "users": f"u{rng.randrange(100)}"},
            billable=True,
            period_start=1_772_323_200,
        )
        for _ in range(count)
    ]


def flush_all(storage: Storage, events: list[UsageEvent], batch: int) -> None:
    by_shard: dict[int, list[UsageEvent]] = {}
    for event in events:
        by_shard.setdefault(shard_of(event.customer, storage.shards), []).append(event)
    for shard, shard_events in by_shard.items():
        for start in range(0, len(shard_events), batch):
            chunk = shard_events[start : start + batch]
            settlements = tuple(
                Settlement(e.customer, True, e.period_start, "", True, False, (("calls", 1, 100, 0),))
                for e in chunk
            )
            storage.flush(Batch(shard, f"b{shard}-{start}", encode_batch(chunk), settlements))


def measure(name: str, storage: Storage, events: list[UsageEvent], batch: int) -> None:
    flush_all(storage, events, batch)
    worker = RollupWorker(storage, CONFIG)
    started = time.perf_counter()
    committed = worker.drain()
    elapsed = time.perf_counter() - started
    assert committed == len(events), (committed, len(events))
    print(f"{name:>8}: {committed} events in {elapsed:.2f}s = {committed / elapsed:,.0f} events/s")


@contextmanager
def redis_server() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed; pass --redis URL")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    directory = tempfile.mkdtemp(prefix="mw-bench-")
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", directory, "--save", ""]
    process = subprocess.Popen([*args, "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000, help="events per flushed batch (stream entry)")
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--customers", type=int, default=200)
    parser.add_argument("--spread", type=float, default=300, help="seconds the event timestamps span")
    parser.add_argument("--redis", help="URL of a Redis to use (it is flushed!)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-redis", action="store_true")
    args = parser.parse_args()
    events = make_events(args.events, args.customers, max(1, int(args.spread * 1000)))
    if not args.skip_memory:
        measure("memory", open_storage("memory://bench", shards=args.shards), events, args.batch)
    if args.skip_redis:
        return
    with redis_server() if args.redis is None else _given(args.redis) as url:
        storage = open_storage(url, shards=args.shards, timeout=30)
        try:
            measure("redis", storage, events, args.batch)
        finally:
            storage.close()


@contextmanager
def _given(url: str) -> Iterator[str]:
    import redis

    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    yield url


if __name__ == "__main__":
    main()
