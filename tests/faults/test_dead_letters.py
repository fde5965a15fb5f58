"""Garbage in the event streams: each entry goes to the dead letters with its reason, is counted in the
worker's metrics, and never stops the worker, which rolls every valid event up exactly once meanwhile."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import httpx
import msgpack
import pytest
from redis.typing import EncodableT, FieldT

from meterware.events import encode_batch
from meterware.storage import _keyspace
from tests.faults.books import assert_exact, rolled_up
from tests.faults.harness import SHARDS, Load, figures, parse_metrics, stream_fields, wait_until
from tests.faults.scenario import Scenario
from tests.servers import free_port
from tests.test_events import sample_event

pytestmark = [pytest.mark.faults, pytest.mark.redis, pytest.mark.slow]

VALID = encode_batch([sample_event(), sample_event()])
#: Entries that are not event batches, and what the dead letter's reason must say about each.
GARBAGE: list[tuple[dict[FieldT, EncodableT], str]] = [
    ({b"b": b"\xc1 junk", b"c": b"0"}, "not a msgpack document"),
    ({b"b": VALID[: len(VALID) // 2], b"c": b"0,0"}, "not a msgpack document"),
    ({b"b": msgpack.packb([{"v": 99, "id": b"x" * 16}]), b"c": b"0"}, "unknown schema version 99"),
    ({b"b": msgpack.packb({"not": "a list"}), b"c": b""}, "expected a list of events"),
    ({b"c": b"0"}, "missing field 'b'"),
    ({b"b": VALID}, "missing field 'c'"),
    ({b"b": VALID, b"c": b"1"}, "1 costs for 2 events"),
    ({b"b": VALID, b"c": b"-5,1"}, "is not a non-negative integer"),
    ({b"b": VALID, b"c": b"1" * 16 + b",1"}, "is not a non-negative integer"),
    ({b"something": b"else"}, "missing field 'b'"),
    ({b"b": os.urandom(1 << 20), b"c": b"0"}, "field 'b'"),
]


def test_garbage_entries_become_counted_dead_letters_and_the_worker_goes_on(
    make_scenario: Callable[..., Scenario],
) -> None:
    """Garbage, truncated and unknown-version entries amid real traffic: dead letters with reasons."""
    scenario = make_scenario()
    app = scenario.app()
    metrics_port = free_port()
    worker = scenario.worker("--metrics-port", str(metrics_port))
    client = scenario.server.client()

    with Load(app.url, scenario.key, "/v1/ok/{}".format, threads=3) as load:
        for index, (fields, _) in enumerate(GARBAGE):
            client.xadd(_keyspace.events(index % SHARDS), fields)
            time.sleep(0.1)
        time.sleep(0.5)
    app.stop()
    wait_until(lambda: rolled_up(client), 20, "the worker stopped rolling up")
    assert worker.process.poll() is None, worker.output()
    worker_metrics = parse_metrics(httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text)
    assert worker.terminate() == 0

    dead = [
        fields for shard in range(SHARDS) for fields in stream_fields(client, _keyspace.dead_letters(shard))
    ]
    assert len(dead) == len(GARBAGE)
    reasons = sorted(fields[b"reason"].decode() for fields in dead)
    for _, expected in GARBAGE:
        match = next((reason for reason in reasons if expected in reason), None)
        assert match is not None, f"no dead letter says {expected!r}: {reasons}"
        reasons.remove(match)
    assert all(b"entry" in fields for fields in dead)
    assert worker_metrics["meterware_rollup_dead_letters_total"] == len(GARBAGE)
    assert worker.output().count("is a dead letter") == len(GARBAGE)

    valid = scenario.stream(valid_only=True)
    ledger = scenario.books()
    assert_exact(valid, ledger, load.paths(200))
    figures(
        "dead-letters",
        garbage_entries=len(GARBAGE),
        dead_letters=len(dead),
        dead_letters_metric=worker_metrics["meterware_rollup_dead_letters_total"],
        valid_events=len(valid.events),
        succeeded=len(load.paths(200)),
        charged_micros=ledger.charged,
    )
