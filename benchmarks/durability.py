"""What ``[storage] wait_replicas`` costs: the WSGI flusher's pass (``flush_sync``) writing to a primary
with one replica, without and with waiting for it, side by side in each round.

Two batch sizes: ``pipeline.batch_size``'s default of 1000 events (a busy app: the wait is paid once per
1000 events) and 10 (a quiet one: about one wait per call). The replica runs on the same machine, so the
wait here is the replica's own work, not a network's round trip: on separate hosts add one round trip
between them per flushed batch. Run: ``python -m benchmarks.durability [--quick]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import redis

from benchmarks._harness import OthersClock, RedisServer
from benchmarks.pipeline import SHARDS, _customers, flush_sync, pending
from meterware.storage.base import ReplicaWait

WAIT = ReplicaWait(replicas=1, timeout=1.0)
#: (batch size, events flushed per run)
SIZES = ((1000, 100_000), (10, 5_000))


def replica_of(primary: RedisServer) -> RedisServer:
    """A replica of ``primary``, once it has confirmed a write."""
    replica = RedisServer("--replicaof", "127.0.0.1", str(primary.port)).start()
    client, primary_client = redis.Redis(port=replica.port), redis.Redis(port=primary.port)
    deadline = time.monotonic() + 30
    while client.info("replication").get("master_link_status") != "up":
        if time.monotonic() > deadline:
            raise TimeoutError("the replica did not connect within 30 s")
        time.sleep(0.05)
    primary_client.set("bench:replica-check", 1)
    if primary_client.wait(1, 10_000) != 1:
        raise TimeoutError("the replica did not confirm a write within 10 s")
    client.close()
    primary_client.close()
    return replica


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.durability", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 rounds of a tenth of the events")
    options = parser.parse_args(argv)
    rounds, scale = (2, 10) if options.quick else (options.rounds, 1)
    primary = RedisServer("--repl-diskless-sync-delay", "0").start()
    replica = replica_of(primary)
    results: dict[tuple[int, bool], list[float]] = {}
    others = OthersClock()
    try:
        customers = _customers(primary.url, SHARDS)
        for number in range(rounds):
            for batch_size, events in SIZES:
                for waiting in (False, True):
                    items = pending(events // scale, customers, SHARDS)
                    rate = flush_sync(
                        primary.url, items, batch_size=batch_size, replica_wait=WAIT if waiting else None
                    )
                    results.setdefault((batch_size, waiting), []).append(rate)
            print(f"round {number + 1}/{rounds} done", file=sys.stderr)
    finally:
        replica.cleanup()
        primary.cleanup()
    print(
        f"flush_sync to a primary with one replica; median of {rounds} rounds;"
        f" other processes used {others.cores():.2f} cores"
    )
    print(
        "| batch size | without wait (events/s) | with wait_replicas = 1 (events/s) | with / without"
        " | wait per batch |"
    )
    print("|---:|---:|---:|---:|---:|")
    for batch_size, _ in SIZES:
        off = statistics.median(results[(batch_size, False)])
        on = statistics.median(results[(batch_size, True)])
        per_batch_us = (batch_size / on - batch_size / off) * 1e6
        print(f"| {batch_size} | {off:,.0f} | {on:,.0f} | {on / off:.2f} | {per_batch_us:,.0f} us |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
