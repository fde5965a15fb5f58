"""Micro-benchmarks of the hot pieces: ``python -m benchmarks.micro [--quick] [--filter TEXT] [--no-redis]``.

Each piece is timed with ``timeit`` in repeated runs; the median run is reported, per call (and per
event for the batch pieces). Inputs are shaped like the HTTP benchmark's: the ``bench`` plan of
``benchmarks.apps`` (a rate limit, a hard quota, prepaid credits), a key presented in an
``Authorization`` header among a client's usual headers, batches of 1,000 events. The Redis pieces
(one admission round trip, one flush) run against a redis-server started here, on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import statistics
import sys
import tempfile
import time
import timeit
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import redis
from prometheus_client import CollectorRegistry

from benchmarks._harness import OthersClock, RedisServer
from benchmarks.apps import PLAN, config_text, create_customer
from meterware import Accounts, Config, keys
from meterware.config import Meter, MeterTerms
from meterware.config._overrides import TermsVersion, dump_versions
from meterware.events import (
    UsageEvent,
    decode_batch,
    decode_columns,
    encode_batch,
    encode_rows,
    new_event_id,
)
from meterware.metering.batching import Pending, make_batches
from meterware.metering.calls import Call
from meterware.metering.facade import Metering
from meterware.metering.records import KeyInfo
from meterware.metering.responses import limit_headers
from meterware.rollup.aggregate import Fold, fold, parse_columns, parse_entry
from meterware.storage import open_async_storage, open_storage
from meterware.storage._admission import decision_from_reply
from meterware.storage.base import Batch, Storage, Window, WindowTotals
from meterware.usage import CallUsage

BATCH = 1000
#: Headers a typical client sends, the key among them.
HEADERS = [
    (b"host", b"api.example.com"),
    (b"user-agent", b"python-httpx/0.28.1"),
    (b"accept", b"*/*"),
    (b"accept-encoding", b"gzip, deflate"),
    (b"connection", b"keep-alive"),
]


@dataclass(frozen=True, slots=True)
class Piece:
    """A named measurement, made only if it is selected."""

    name: str
    measure: Callable[[], float]
    events: int = 0


def timed(name: str, function: Callable[[], object], repeat: int, events: int = 0) -> Piece:
    """The median of ``repeat`` runs of ``function`` (each run sized by ``timeit``'s autorange)."""

    def measure() -> float:
        timer = timeit.Timer(function)
        number, _ = timer.autorange()
        return statistics.median(timer.repeat(repeat, number)) / number

    return Piece(name, measure, events)


def timed_once(name: str, prepare: Callable[[], Callable[[], int]], repeat: int, events: int = 0) -> Piece:
    """For pieces that consume their input: ``prepare()`` (untimed) returns a run, which says its count."""

    def measure() -> float:
        runs = []
        for _ in range(repeat):
            run = prepare()
            started = time.perf_counter()
            count = run()
            runs.append((time.perf_counter() - started) / count)
        return statistics.median(runs)

    return Piece(name, measure, events)


class Bench:
    """The inputs: a metered process on ``url`` with one customer and its cached key."""

    def __init__(self, url: str, workdir: Path) -> None:
        path = workdir / "micro.toml"
        path.write_text(config_text(storage=url, spool=workdir / "spool", admission="strict"))
        self.config = Config.from_file(path)
        self.storage: Storage = open_storage(url, shards=self.config.shards, timeout=5)
        accounts = Accounts(self.storage, self.config)
        self.customer, self.plaintext = create_customer(accounts)
        key_hash = keys.hash_key(self.plaintext)
        info = self.storage.resolve_key(key_hash)
        assert info is not None
        self.key: KeyInfo = info
        # The same customer with its own terms: one version, in force, overriding the call price.
        terms = dump_versions((TermsVersion(0, 0, "bench", {"calls.price": "0.000001"}),))
        self.key_with_terms = replace(info, customer=replace(info.customer, terms=terms))
        # The same customer on a stored plan of the bench plan's terms (read into the config's cache).
        accounts.set_plan("bench-stored", STORED_PLAN, actor="bench")
        self.key_on_stored_plan = replace(info, customer=replace(info.customer, plan="bench-stored"))
        self.metering = Metering(self.config, registry=CollectorRegistry())
        self.metering.core.keys.resolved(key_hash, info)
        self.headers = [*HEADERS, (b"authorization", f"Bearer {self.plaintext}".encode())]
        core = self.metering.core
        self.request = core.admit_request(self.key, core.call_terms(self.key, "/v1/hello", time.time()))
        self.decision = self.storage.admit(self.request)
        assert self.decision.allowed, self.decision

    def reply(self) -> list[int | bytes]:
        """What the admission script answers for the bench plan (one rate limit, one hard quota)."""
        return [1, b"", 0, 1, 999_999_999_999, 1, 999_999, 1, 999_999_999_999]

    def call(self) -> Call:
        call = self.metering.core.decide(self.key, self.request, self.decision, "GET", "/v1/hello")
        assert isinstance(call, Call)
        call.status, call.ttfb_ns, call.response_bytes = 200, call.started_ns + 100_000, 17
        return call

    def pending(self, count: int) -> list[Pending]:
        """``count`` finished calls, as the request path leaves them in the buffer."""
        pipeline = self.metering.batcher
        for _ in range(count):
            self.metering.finish(self.call(), "/v1/hello")
        return pipeline.buffer.take(count)

    def batches(self, count: int) -> list[Batch]:
        """``count`` batches of ``BATCH`` events of one shard each, every one with its own batch id."""
        template = self.pending(BATCH)
        return [batch for _ in range(count) for batch in make_batches(template)]


#: The bench plan's table, as a stored plan (``Accounts.set_plan``).
STORED_PLAN = {
    "prepaid": True,
    "rate_limits": ["1000000/second"],
    "meters": {"calls": {"price": "0.000001", "quota": 1_000_000_000_000, "quota_mode": "hard"}},
}


def events(count: int, customers: int = 200, spread_ms: int = 300_000) -> list[UsageEvent]:
    """Events with a summed and a unique meter besides the call, over a few minutes and customers."""
    now = int(time.time() * 1000)
    return [
        UsageEvent(
            id=new_event_id(now),
            timestamp_ms=now - (index * 7919) % spread_ms,
            customer=f"customer-{index % customers}",
            key_id="key_0123456789abcdef",
            plan="bench",
            route="/v1/complete",
            method="POST",
            status=200,
            outcome="success",
            duration_us=1000,
            ttfb_us=500,
            units={"calls": 1, "tokens": index % 2000, "users": f"u{index % 100}"},
            billable=True,
            period_start=1_772_323_200,
        )
        for index in range(count)
    ]


def core(bench: Bench, repeat: int) -> Iterator[Piece]:
    metering, key, request = bench.metering, bench.key, bench.request
    core = metering.core
    now = time.time()
    reply = bench.reply()
    yield timed(
        "keys.hash_key (SHA-256 of the presented key)", lambda: keys.hash_key(bench.plaintext), repeat
    )
    yield timed(
        "RequestCore.identify (cached key, 6 headers)",
        lambda: core.identify(None, bench.headers, b""),
        repeat,
    )
    yield timed(
        "RequestCore.call_terms + admit_request",
        lambda: core.admit_request(key, core.call_terms(key, "/v1/hello", now)),
        repeat,
    )
    with_terms = bench.key_with_terms
    yield timed(
        "RequestCore.call_terms + admit_request (customer with own terms)",
        lambda: core.admit_request(with_terms, core.call_terms(with_terms, "/v1/hello", now)),
        repeat,
    )
    on_stored = bench.key_on_stored_plan
    yield timed(
        "RequestCore.call_terms + admit_request (customer on a stored plan)",
        lambda: core.admit_request(on_stored, core.call_terms(on_stored, "/v1/hello", now)),
        repeat,
    )
    yield timed("decision_from_reply", lambda: decision_from_reply(request, reply, now), repeat)
    yield timed(
        "RequestCore.decide (the admitted Call)",
        lambda: core.decide(key, request, bench.decision, "GET", "/v1/hello"),
        repeat,
    )
    yield timed("limit_headers (RateLimit headers)", lambda: limit_headers(bench.decision.limits), repeat)
    metrics = metering.metrics
    yield timed(
        "AppMetrics.call (counter + histogram)",
        lambda: metrics.call("/v1/hello", "GET", "success", "bench", 0.0002),
        repeat,
    )
    yield timed("events.new_event_id", new_event_id, repeat)

    def finish() -> Callable[[], int]:
        calls = [bench.call() for _ in range(BATCH)]

        def run() -> int:
            for call in calls:
                metering.finish(call, "/v1/hello")
            metering.batcher.buffer.take(len(calls))
            return len(calls)

        return run

    yield timed_once("Metering.finish (event + settlement into the buffer)", finish, repeat)


def tokens_bench(bench: Bench, dimensioned: bool, *, filters: bool = True) -> Bench:
    """``bench`` with a ``tokens`` handler meter on its plan: one price, or (``dimensioned``) with
    dimensions, priced per model with included units per model (unless not ``filters``)."""
    meter = Meter("tokens", "sum", "handler")
    terms = {"calls": bench.config.plan(PLAN).meters["calls"], "tokens": MeterTerms(price=2)}
    if dimensioned:
        meter = replace(meter, dimensions=(("model", ("small", "large")), ("direction", ("input", "output"))))
    if dimensioned and filters:
        terms["tokens{model=small}"] = MeterTerms(included=1000, price=1)
        terms["tokens{model=large}"] = MeterTerms(included=100, price=10)
    plan = replace(bench.config.plan(PLAN), meters=terms)
    config = replace(
        bench.config,
        meters={**bench.config.meters, "tokens": meter},
        plans={**bench.config.plans, PLAN: plan},
    )
    made = copy.copy(bench)
    made.config = config
    made.metering = Metering(config, registry=CollectorRegistry())
    made.metering.core.keys.resolved(keys.hash_key(bench.plaintext), bench.key)
    core = made.metering.core
    made.request = core.admit_request(bench.key, core.call_terms(bench.key, "/v1/hello", time.time()))
    made.decision = bench.storage.admit(made.request)
    return made


def dimensions(bench: Bench, repeat: int) -> Iterator[Piece]:
    """A handler's tokens, with and without dimension values: reported, then measured at the end."""
    plain, priced = tokens_bench(bench, False), tokens_bench(bench, True)
    declared = tokens_bench(bench, True, filters=False)
    usage = CallUsage(priced.config.meters)
    yield timed("CallUsage.add (no dimension values)", lambda: usage.add("tokens", 5), repeat)
    values = {"model": "large", "direction": "output"}
    yield timed("CallUsage.add (two dimension values)", lambda: usage.add("tokens", 5, values), repeat)

    def finish(made: Bench, values: dict[str, str] | None) -> Callable[[], Callable[[], int]]:
        def prepare() -> Callable[[], int]:
            calls = [made.call() for _ in range(BATCH)]
            for call in calls:
                call.usage.add("tokens", 1500, values)

            def run() -> int:
                for call in calls:
                    made.metering.finish(call, "/v1/hello")
                made.metering.batcher.buffer.take(len(calls))
                return len(calls)

            return run

        return prepare

    yield timed_once("Metering.finish, tokens (no dimensions)", finish(plain, None), repeat)
    yield timed_once(
        "Metering.finish, tokens with dimensions, one price (2 values)", finish(declared, values), repeat
    )
    yield timed_once("Metering.finish, tokens priced per model (no values)", finish(priced, None), repeat)
    yield timed_once("Metering.finish, tokens priced per model (2 values)", finish(priced, values), repeat)


def codec(bench: Bench, repeat: int) -> Iterator[Piece]:
    pending = bench.pending(BATCH)
    rows = [item.row for item in pending]
    payload = encode_rows(rows)
    yield timed(f"events.encode_rows ({BATCH} events)", lambda: encode_rows(rows), repeat, BATCH)
    yield timed(f"events.decode_batch ({BATCH} events)", lambda: decode_batch(payload), repeat, BATCH)
    yield timed(f"events.decode_columns ({BATCH} events)", lambda: decode_columns(payload), repeat, BATCH)
    yield timed(
        f"batching.make_batches ({BATCH} events, 1 shard)", lambda: make_batches(pending), repeat, BATCH
    )
    spread = [replace(item, shard=index % 16) for index, item in enumerate(pending)]
    yield timed(
        f"batching.make_batches ({BATCH} events, 16 shards)", lambda: make_batches(spread), repeat, BATCH
    )


def rollup(bench: Bench, repeat: int) -> Iterator[Piece]:
    meters = Config.from_dict(
        {
            "meters": {
                "calls": {},
                "tokens": {"aggregation": "sum", "source": "handler"},
                "users": {"aggregation": "unique", "source": "handler"},
            }
        }
    ).meters
    sample = events(10 * BATCH)
    costs = [1] * len(sample)
    yield timed(
        f"rollup.aggregate.fold ({len(sample):,} events, 200 customers, 3 meters)",
        lambda: fold(sample, costs, meters),
        repeat,
        len(sample),
    )
    calls_only = [replace(event, units={"calls": 1}, customer="customer-0") for event in sample]
    yield timed(
        f"rollup.aggregate.fold ({len(sample):,} events of one customer, calls only)",
        lambda: fold(calls_only, costs, meters),
        repeat,
        len(sample),
    )
    entry = {b"b": encode_batch(sample[:BATCH]), b"c": b",".join([b"1"] * BATCH), b"i": b"batch"}
    yield timed(
        f"rollup.aggregate.parse_entry ({BATCH} events)", lambda: parse_entry(entry, meters), repeat, BATCH
    )

    # What the worker does with one read of 10 entries: decode each as columns, fold them all, then the
    # windows (the same events as the fold pieces above).
    entries = [
        {b"b": encode_batch(sample[start : start + BATCH]), b"c": b",".join([b"1"] * BATCH)}
        for start in range(0, len(sample), BATCH)
    ]

    def worker_read() -> dict[Window, WindowTotals]:
        folding = Fold(meters)
        for fields in entries:
            parsed = parse_columns(fields, meters)
            assert not isinstance(parsed, str)
            folding.add(*parsed)
        return folding.totals()

    yield timed(
        f"rollup: parse_columns + Fold ({len(sample):,} events in {len(entries)} entries; the worker's path)",
        worker_read,
        repeat,
        len(sample),
    )


def storage(name: str, bench: Bench, repeat: int) -> Iterator[Piece]:
    """One admission and one flush of a batch, on a backend (memory:// or a real Redis)."""
    store, request = bench.storage, bench.request
    yield timed(f"{name}: Storage.admit (one call, sync)", lambda: store.admit(request), repeat)

    def flush() -> Callable[[], int]:
        batches = bench.batches(20)

        def run() -> int:
            for batch in batches:
                if not store.flush(batch):
                    raise RuntimeError("a batch was not applied")
            return len(batches)

        return run

    yield timed_once(f"{name}: Storage.flush (one batch of {BATCH} events)", flush, repeat, BATCH)


def redis_side(url: str, bench: Bench, repeat: int) -> Iterator[Piece]:
    """The time Redis itself spends in the admission and flush scripts (``INFO commandstats``)."""
    client = redis.Redis.from_url(url)

    def script_time(run: Callable[[], object], count: int) -> float:
        client.config_resetstat()
        run()
        stats = client.info("commandstats")["cmdstat_evalsha"]
        if stats["calls"] != count:
            raise RuntimeError(f"expected {count} script calls, Redis saw {stats['calls']}")
        return float(stats["usec_per_call"]) / 1e6

    def admits() -> None:
        for _ in range(1000):
            bench.storage.admit(bench.request)

    def flushes() -> Callable[[], None]:
        batches = bench.batches(20)
        return lambda: [bench.storage.flush(batch) for batch in batches]

    yield Piece(
        "redis-server: time in the admission script, per call",
        lambda: statistics.median(script_time(admits, 1000) for _ in range(repeat)),
    )
    yield Piece(
        f"redis-server: time in the flush script, per batch of {BATCH} events",
        lambda: statistics.median(script_time(flushes(), 20) for _ in range(repeat)),
        BATCH,
    )


def async_admit(url: str, bench: Bench, repeat: int) -> Iterator[Piece]:
    """Sequential admissions through the asyncio client on uvloop (the ASGI request path's round trip)."""
    import uvloop

    count = 2000

    async def run() -> float:
        store = open_async_storage(url, shards=bench.config.shards, timeout=5)
        for _ in range(200):
            await store.admit(bench.request)
        started = time.perf_counter()
        for _ in range(count):
            await store.admit(bench.request)
        elapsed = time.perf_counter() - started
        await store.aclose()
        return elapsed / count

    def measure() -> float:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return statistics.median(runner.run(run()) for _ in range(repeat))

    yield Piece("redis: AsyncStorage.admit (one call, awaited alone, uvloop)", measure)


@contextmanager
def redis_url(given: str | None, skip: bool) -> Iterator[str | None]:
    if skip:
        yield None
        return
    if given:
        yield given
        return
    server = RedisServer().start()
    try:
        yield server.url
    finally:
        server.cleanup()


def _line(piece: Piece, seconds: float) -> str:
    text = f"| {piece.name} | {seconds * 1e6:,.2f} | {1 / seconds:,.0f} |"
    if piece.events:
        per_event = seconds / piece.events
        return text + f" {per_event * 1e9:,.0f} ns ({1 / per_event:,.0f} events/s) |"
    return text + " |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.micro", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 runs per piece instead of 7")
    parser.add_argument("--filter", default="", help="only the pieces whose name contains this text")
    parser.add_argument("--redis", help="the URL of a Redis to use (default: start one)")
    parser.add_argument("--no-redis", action="store_true", help="skip the Redis pieces")
    args = parser.parse_args(argv)
    repeat = 3 if args.quick else 7
    others = OthersClock()
    print("| piece | us per call | calls/s | per event |")
    print("|---|---:|---:|---:|")
    with (
        tempfile.TemporaryDirectory(prefix="mw-micro-") as directory,
        redis_url(args.redis, args.no_redis) as url,
    ):
        workdir = Path(directory)
        bench = Bench("memory://micro", workdir)
        groups = [
            core(bench, repeat),
            dimensions(bench, repeat),
            codec(bench, repeat),
            rollup(bench, repeat),
            storage("memory", bench, repeat),
        ]
        if url is not None:
            remote = Bench(url, workdir)
            groups += [
                storage("redis", remote, repeat),
                async_admit(url, remote, repeat),
                redis_side(url, remote, repeat),
            ]
        for group in groups:
            for piece in group:
                if args.filter.lower() in piece.name.lower():
                    print(_line(piece, piece.measure()), flush=True)
        # Nothing is left in the inputs' buffer to drain at exit.
        bench.metering.batcher.buffer.take(10**9)
    print(f"\nother processes used {others.cores():.2f} cores on average meanwhile")
    return 0


if __name__ == "__main__":
    sys.exit(main())
