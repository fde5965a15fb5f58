"""Scale-out on a real Redis Cluster: ``python -m benchmarks.scaleout [--quick] [--json FILE]``.

It starts a 3-primary Redis Cluster on loopback (``tests.servers.RedisClusterServers``) and measures:

* **rollup**: for 16, 64 and 256 shards, customers are created through ``Accounts`` (a key and credits
  each), then for 1, 2 and 4 workers in turn the shard streams are filled with ``--events`` more events
  by the real flush pass (``benchmarks.pipeline.flush_sync``: the buffer a busy app holds, taken 16
  batches at a time, grouped per shard), and that many ``meterware rollup`` processes (each with its
  metrics port, as deployed) drain them. The workers start while a gate holds every shard's claim; the
  gate lets go once all listen, and the clock runs from the first commit seen (an idle worker looks
  again within a second) until every shard's committed offset is its stream's last entry. Then every
  customer's period window must hold exactly the events written for it, and the run exits 1 if one
  does not.
* **per primary**: the events each primary's shards received, and the CPU each redis-server used, during
  each drain and each flush: Redis CPU per event, from which a primary's capacity follows.
* **memory**: ``INFO memory`` ``used_memory`` of the primaries before and after creating the customers
  and writing the events (bytes per customer, per retained event), and ``MEMORY USAGE`` of a sample of
  usage windows (what one rollup window costs).
* **request path**: the metered Starlette app (``benchmarks.apps``) under ``uvicorn --workers 1, 2, 4``,
  strict and lease admission on the cluster, loaded by ``wrk`` taking turns through 64 customers' keys
  (so admissions spread over the primaries), with the script runs per request and Redis's time in them
  (``INFO commandstats``); afterwards the customers must have been charged for every call answered.

Nothing is pinned: the processes of a configuration share the machine's cores as they would share a
host. Other processes' CPU is measured during every run (``OthersClock``) and printed with it.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import redis
from redis.cluster import RedisCluster
from tests.servers import RedisClusterServers, wait_for_port

from benchmarks import ROOT, pipeline
from benchmarks._harness import (
    OthersClock,
    Server,
    child_env,
    cpu_seconds,
    free_port,
    machine,
    tree_cpu_seconds,
    wrk,
)
from benchmarks.apps import CREDITS_MICROS, config_text, create_customer
from benchmarks.throughput import CONNECTIONS, charged_ok
from meterware import Accounts, Config
from meterware.metering.periods import period_bounds
from meterware.storage import _keyspace as ks
from meterware.storage import open_storage

SHARDS = (16, 64, 256)
WORKERS = (1, 2, 4)
APP_PROCESSES = (1, 2, 4)
ADMISSIONS = ("strict", "lease")
#: Customers of the rollup runs (about 8 per shard at 256 shards) and of the request path.
CUSTOMERS = 2000
HTTP_CUSTOMERS = 64
#: Events built and flushed at a time (the buffer of one busy process, bounded in memory here).
CHUNK = 100_000
GATE = "bench-gate"
STREAMS = "mw:{s*}:events"
LEDGERS = "mw:{s*}:ledger:*"
DRAIN_TIMEOUT = 300.0


@dataclass(frozen=True, slots=True)
class RollupRun:
    shards: int
    workers: int
    events: int
    #: The flush that filled the streams (one process, ``flush_sync``), events per second.
    flush_events_per_second: float
    #: From the gate's release to a first commit (the workers sleep up to a second while idle), and from
    #: there to the last shard caught up: the events/s.
    wake_seconds: float
    seconds: float
    events_per_second: float
    #: Events each worker committed (from its ``meterware_rollup_events_total``).
    per_worker: tuple[int, ...]
    #: Shards each worker held once the backlog was drained (most first): who keeps them from then on.
    shards_held: tuple[int, ...]
    #: The shards one more worker, started then, took within 3.5 s (-1: not tried in this run).
    late_worker_shards: int
    #: Per primary: events its shards received, and its redis-server's CPU in cores during the drain.
    primary_events: tuple[int, ...]
    primary_cores: tuple[float, ...]
    #: Redis CPU (all primaries) per event, microseconds: of the flush, and of the rollup.
    flush_redis_us: float
    rollup_redis_us: float
    #: The workers' own CPU per event, microseconds.
    worker_us: float
    others_cores: float
    exact: bool


@dataclass(frozen=True, slots=True)
class Memory:
    shards: int
    customers: int
    bytes_per_customer: float
    events: int
    #: ``used_memory`` per event written, all of it: the stream entry, and the customers' ledger entries.
    bytes_per_event: float
    #: Of which the event streams (trimmed once rolled up and ``rollup.retention_seconds`` old).
    stream_bytes_per_event: float
    #: Credits-ledger entries (one per prepaid customer and flushed batch, kept for good) per event, and
    #: what one more costs in a long ledger (``ledger_entry_bytes``).
    ledger_entries_per_event: float
    bytes_per_ledger_entry: float
    #: ``MEMORY USAGE`` of one usage window per kind (a hash: calls by outcome, spend, each meter).
    window_bytes: dict[str, float]


@dataclass(frozen=True, slots=True)
class HttpRun:
    processes: int
    admission: str
    requests_per_second: float
    p99_ms: float
    #: CPU cores the app processes and the primaries used during the run.
    app_cores: float
    primary_cores: tuple[float, ...]
    redis_us_per_request: float
    #: Script runs per request, and the time Redis spent in them per request (microseconds).
    scripts_per_request: float
    script_us_per_request: float
    others_cores: float
    charged: int
    answered: int
    exact: bool
    #: Why the run failed twice (then it has no numbers).
    error: str = ""


# -- the cluster -------------------------------------------------------------------------------------


class Cluster:
    """The started cluster: its URL, a client, the primaries' processes, and shards' homes."""

    def __init__(self, servers: RedisClusterServers) -> None:
        self.servers = servers
        self.url = servers.url
        first = servers.nodes[0]
        self.client = RedisCluster(host="127.0.0.1", port=first.port)
        self.nodes = [redis.Redis(port=node.port) for node in servers.nodes]

    def empty(self) -> None:
        for node in self.nodes:
            node.flushall()

    def used_memory(self) -> int:
        return sum(int(node.info("memory")["used_memory"]) for node in self.nodes)

    def cpu(self) -> list[float]:
        pids = [node.process.pid for node in self.servers.nodes if node.process is not None]
        return [cpu_seconds(pid) for pid in pids]

    def scripts(self) -> tuple[int, int]:
        """Script runs and their microseconds so far, all primaries (``INFO commandstats``)."""
        runs = usec = 0
        for node in self.nodes:
            stats = node.info("commandstats").get("cmdstat_evalsha", {})
            runs, usec = runs + int(stats.get("calls", 0)), usec + int(stats.get("usec", 0))
        return runs, usec

    def sizes(self, pattern: str) -> tuple[int, int]:
        """The keys matching ``pattern`` (streams): their entries and their ``MEMORY USAGE``, summed."""
        entries = size = 0
        for node in self.nodes:
            pipe = node.pipeline(transaction=False)
            for key in node.scan_iter(match=pattern, count=1000):
                pipe.xlen(key)
                pipe.memory_usage(key, samples=0)
            values = pipe.execute()
            entries += sum(values[0::2])
            size += sum(value or 0 for value in values[1::2])
        return entries, size

    def primary_of(self, shard: int) -> int:
        """The index of the primary that holds ``shard`` (its hash slot)."""
        port = self.client.get_node_from_key(ks.events(shard)).port
        return [node.port for node in self.servers.nodes].index(port)

    def stream_ends(self, shards: int) -> list[str]:
        pipe = self.client.pipeline()
        for shard in range(shards):
            pipe.xrevrange(ks.events(shard), count=1)
        return [entries[0][0].decode() if entries else "0-0" for entries in pipe.execute()]

    def offsets(self, shards: Sequence[int]) -> list[str]:
        pipe = self.client.pipeline()
        for shard in shards:
            pipe.get(ks.offset(shard))
        return [value.decode() if value else "0-0" for value in pipe.execute()]

    def close(self) -> None:
        self.client.close()
        for node in self.nodes:
            node.close()


@contextmanager
def cluster() -> Iterator[Cluster]:
    servers = RedisClusterServers(3)
    try:
        started = Cluster(servers.start())
        for node in started.nodes:  # as production runs it: the money survives a restart
            node.config_set("appendonly", "yes")
        try:
            yield started
        finally:
            started.close()
    finally:
        servers.cleanup()


def _cores(before: Sequence[float], after: Sequence[float], seconds: float) -> tuple[float, ...]:
    return tuple(round((end - start) / seconds, 3) for start, end in zip(before, after, strict=True))


# -- rollup ------------------------------------------------------------------------------------------


def _write_config(workdir: Path, url: str, shards: int, admission: str = "strict") -> Path:
    path = workdir / f"scaleout-{shards}-{admission}.toml"
    path.write_text(config_text(url, workdir / "spool", admission, shards))
    return path


def _customers(config: Path, count: int) -> list[tuple[str, str]]:
    """``count`` new benchmark customers, each with a key and credits: (id, key)."""
    accounts = Accounts.open(Config.from_file(config))
    try:
        return [create_customer(accounts) for _ in range(count)]
    finally:
        accounts.close()


def _fill(
    cluster: Cluster, shards: int, customers: list[str], events: int
) -> tuple[float, collections.Counter[str]]:
    """Write ``events`` through the flusher, ``CHUNK`` at a time: events/s, and the events per customer."""
    written: collections.Counter[str] = collections.Counter()
    seconds = 0.0
    for start in range(0, events, CHUNK):
        items = pipeline.pending(min(CHUNK, events - start), customers, shards)
        written.update(item.settlement.customer for item in items if item.settlement)
        seconds += len(items) / pipeline.flush_sync(cluster.url, items, shards)
    return events / seconds, written


@contextmanager
def _gated(cluster: Cluster, shards: int) -> Iterator[Callable[[], None]]:
    """Hold every shard's claim while inside, until the function yielded is called."""
    storage = open_storage(cluster.url, shards=shards, timeout=30)
    try:
        for shard in range(shards):
            if storage.claim_shard(shard, GATE, 600_000) is None:
                raise RuntimeError(f"shard {shard} is claimed by someone else")

        def release() -> None:
            for shard in range(shards):
                storage.release_shard(shard, GATE)

        yield release
    finally:
        storage.close()


def _start_workers(
    config: Path, count: int, workdir: Path, name: str = "worker"
) -> list[tuple[subprocess.Popen[bytes], int]]:
    """``count`` ``meterware rollup`` processes, each serving its metrics; returned once all listen."""
    workers = []
    env = child_env(METERWARE_CONFIG=str(config))
    for number in range(count):
        port = free_port()
        command = [sys.executable, "-m", "meterware", "rollup", "--metrics-port", str(port)]
        with open(workdir / f"{name}-{number}.log", "wb") as log:  # the process keeps its own copy
            workers.append((subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=log), port))
    try:
        for _, port in workers:
            wait_for_port(port, timeout=60)
    except TimeoutError:
        _stop_workers(workers)
        raise RuntimeError(f"a rollup worker did not start:\n{_logs(workdir)}") from None
    return workers


def _logs(workdir: Path) -> str:
    return "\n".join(path.read_text(errors="replace") for path in sorted(workdir.glob("worker-*.log")))


def _workers_cpu(workers: list[tuple[subprocess.Popen[bytes], int]]) -> float:
    return sum(cpu_seconds(process.pid) for process, _ in workers)


def _committed(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith("meterware_rollup_events_total "):
            return int(float(line.split()[1]))
    return 0


def _stop_workers(workers: list[tuple[subprocess.Popen[bytes], int]]) -> None:
    for process, _ in workers:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process, _ in workers:
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_drained(cluster: Cluster, ends: list[str], workers: list[subprocess.Popen[bytes]]) -> float:
    """Return when every shard's committed offset is its stream's last entry: when (``perf_counter``) a
    first offset was seen to move. Polled every 0.1 s: a poll reads every shard left (pipelined)."""
    left = [shard for shard, end in enumerate(ends) if end != "0-0"]
    initial = dict(zip(left, cluster.offsets(left), strict=True))
    first = None
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while left:
        offsets = dict(zip(left, cluster.offsets(left), strict=True))
        if first is None and any(offset != initial[shard] for shard, offset in offsets.items()):
            first = time.perf_counter()
        left = [shard for shard, offset in offsets.items() if offset != ends[shard]]
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(left)} shards not rolled up after {DRAIN_TIMEOUT:.0f}s")
        if any(process.poll() is not None for process in workers):
            raise RuntimeError("a rollup worker stopped before the streams were rolled up")
        if left:
            time.sleep(0.1)
    return first if first is not None else time.perf_counter()


def _holders(url: str, shards: int) -> collections.Counter[str]:
    """How many shards each worker (by its claims' owner name: host, pid, nonce) holds a claim on."""
    storage = open_storage(url, shards=shards, timeout=30)
    try:
        return collections.Counter(
            holder[0] for shard in range(shards) if (holder := storage.shard_holder(shard)) is not None
        )
    finally:
        storage.close()


def _settled_holders(url: str, shards: int, timeout: float = 10.0) -> collections.Counter[str]:
    """:func:`_holders` once every shard is held again: a shard a worker gives back above its share is
    unclaimed until the next step of another (about a second when idle), or after ``timeout``."""
    deadline = time.monotonic() + timeout
    while sum((holders := _holders(url, shards)).values()) < shards and time.monotonic() < deadline:
        time.sleep(0.2)
    return holders


def _late_worker_shards(cluster: Cluster, config: Path, shards: int, workdir: Path) -> int:
    """The shards a worker started after the others caught up takes within three idle rounds of theirs."""
    [(late, port)] = _start_workers(config, 1, workdir, "late")
    try:
        time.sleep(3.5)
        return sum(n for owner, n in _holders(cluster.url, shards).items() if f":{late.pid}:" in owner)
    finally:
        _stop_workers([(late, port)])


def _exact(cluster: Cluster, shards: int, expected: collections.Counter[str]) -> bool:
    """Whether every customer's period window counts exactly the events written for it."""
    storage = open_storage(cluster.url, shards=shards, timeout=30)
    period = period_bounds(0, "month", time.time())[0]
    try:
        wrong = [
            customer
            for customer, count in expected.items()
            if storage.read_usage(customer, True, "period", period).get("calls", 0) != count
        ]
    finally:
        storage.close()
    return not wrong


def rollup_runs(
    cluster: Cluster,
    events: int,
    workdir: Path,
    progress: Callable[[str], None],
    *,
    shard_counts: Sequence[int] = SHARDS,
    worker_counts: Sequence[int] = WORKERS,
    customer_count: int = CUSTOMERS,
) -> tuple[list[RollupRun], list[Memory]]:
    runs: list[RollupRun] = []
    memories: list[Memory] = []
    for shards in shard_counts:
        cluster.empty()
        config = _write_config(workdir, cluster.url, shards)
        before = cluster.used_memory()
        customers = [name for name, _ in _customers(config, customer_count)]
        after_customers = cluster.used_memory()
        written: collections.Counter[str] = collections.Counter()
        ledgers_before = cluster.sizes(LEDGERS)
        homes = [cluster.primary_of(shard) for shard in range(shards)]
        for count in worker_counts:
            cpu_before = cluster.cpu()
            flush_rate, chunk = _fill(cluster, shards, customers, events)
            flush_cpu = sum(cluster.cpu()) - sum(cpu_before)
            written.update(chunk)
            after_events = cluster.used_memory()
            if count == worker_counts[0]:
                streams, ledgers = cluster.sizes(STREAMS), cluster.sizes(LEDGERS)
            per_primary = collections.Counter[int]()
            for name, written_now in chunk.items():
                per_primary[homes[ks.shard_of(name, shards)]] += written_now
            primary_events = tuple(per_primary[primary] for primary in range(len(cluster.nodes)))
            ends = cluster.stream_ends(shards)
            with _gated(cluster, shards) as release:
                workers = _start_workers(config, count, workdir)
                try:
                    cpu_before, workers_before = cluster.cpu(), _workers_cpu(workers)
                    others, started = OthersClock(), time.perf_counter()
                    release()
                    try:
                        first = _wait_drained(cluster, ends, [process for process, _ in workers])
                    except RuntimeError as error:
                        raise RuntimeError(f"{error}\n{_logs(workdir)}") from error
                    finished = time.perf_counter()
                    cpu_after, workers_after = cluster.cpu(), _workers_cpu(workers)
                    others_cores = others.cores()
                    per_worker = tuple(_committed(port) for _, port in workers)
                    held = tuple(sorted(_settled_holders(cluster.url, shards).values(), reverse=True))
                    late = -1
                    if count == worker_counts[-1]:
                        late = _late_worker_shards(cluster, config, shards, workdir)
                finally:
                    _stop_workers(workers)
            run = RollupRun(
                shards,
                count,
                events,
                round(flush_rate),
                round(first - started, 2),
                round(finished - first, 3),
                round(events / (finished - first)),
                per_worker,
                held,
                late,
                primary_events,
                _cores(cpu_before, cpu_after, finished - started),
                round(flush_cpu / events * 1e6, 2),
                round((sum(cpu_after) - sum(cpu_before)) / events * 1e6, 2),
                round((workers_after - workers_before) / events * 1e6, 2),
                round(others_cores, 2),
                _exact(cluster, shards, written),
            )
            progress(
                f"rollup {shards:>3} shards, {count} worker(s): {run.events_per_second:>9,} events/s"
                f" ({run.seconds:.2f} s; per worker {run.per_worker}; flush {run.flush_events_per_second:,}"
                f" events/s); shards held {run.shards_held} (a late worker: {run.late_worker_shards});"
                f" primaries' cores {run.primary_cores};"
                f" others {run.others_cores:.2f} cores;"
                f" {'exact' if run.exact else 'NOT EXACT'}"
            )
            runs.append(run)
            if count == worker_counts[0]:
                memories.append(
                    Memory(
                        shards,
                        customer_count,
                        round((after_customers - before) / customer_count, 1),
                        events,
                        round((after_events - after_customers) / events, 1),
                        round(streams[1] / events, 1),
                        round((ledgers[0] - ledgers_before[0]) / events, 3),
                        0.0,
                        window_bytes(cluster),
                    )
                )
        memories[-1] = replace(
            memories[-1], bytes_per_ledger_entry=ledger_entry_bytes(cluster, config, shards, events // 100)
        )
    return runs, memories


def ledger_entry_bytes(cluster: Cluster, config: Path, shards: int, calls: int) -> float:
    """What one more entry costs in a long ledger: a new customer's ``calls`` (at least 1,000) flushed one
    per batch.

    (A stream's first node is allocated whole, so a few entries more show no growth at all.)
    """
    (name, _), *_ = _customers(config, 1)
    pattern = ks.ledger(ks.shard_of(name, shards), name)
    entries, size = cluster.sizes(pattern)
    items = pipeline.pending(max(1000, calls), [name], shards)
    pipeline.flush_sync(cluster.url, items, shards, batch_size=1)
    entries_after, size_after = cluster.sizes(pattern)
    return round((size_after - size) / (entries_after - entries), 1)


def window_bytes(cluster: Cluster) -> dict[str, float]:
    """The median ``MEMORY USAGE`` of the usage windows of each kind, on a sample of keys."""
    sizes: dict[str, list[int]] = collections.defaultdict(list)
    for node in cluster.nodes:
        for key in node.scan_iter(match="mw:{s*}:u:live:*", count=1000):
            kind = key.decode().split(":")[-2]
            if len(sizes[kind]) < 200:
                sizes[kind].append(int(node.memory_usage(key) or 0))
    return {kind: statistics.median(values) for kind, values in sorted(sizes.items())}


# -- the request path --------------------------------------------------------------------------------


def http_runs(
    cluster: Cluster,
    seconds: int,
    warmup: int,
    workdir: Path,
    progress: Callable[[str], None],
    *,
    process_counts: Sequence[int] = APP_PROCESSES,
) -> list[HttpRun]:
    """Each admission mode from 1, 2 and 4 app processes; a run that fails (a 503: on a crowded machine
    a Redis call can outlast the storage timeout) is measured once more, then left out as failed."""
    cluster.empty()
    runs = []
    for admission in ADMISSIONS:
        config = _write_config(workdir, cluster.url, 16, admission)
        customers = _customers(config, HTTP_CUSTOMERS)
        for processes in process_counts:
            for attempt in (1, 2):
                try:
                    run = _http_run(cluster, config, customers, processes, admission, seconds, warmup)
                except RuntimeError as error:
                    progress(
                        f"request path, {admission}, {processes} app process(es), try {attempt}: {error}"
                    )
                    run = HttpRun(processes, admission, 0, 0, 0, (), 0, 0, 0, 0, 0, 0, False, str(error))
                    continue
                break
            progress(
                f"request path, {admission}, {processes} app process(es):"
                f" {run.requests_per_second:>7,} req/s,"
                f" p99 {run.p99_ms:.1f} ms; app {run.app_cores:.2f} cores, primaries {run.primary_cores};"
                f" Redis {run.redis_us_per_request:.0f} us/req; charged {run.charged:,} of {run.answered:,};"
                f" others {run.others_cores:.2f} cores"
            )
            runs.append(run)
    return runs


def _http_run(
    cluster: Cluster,
    config: Path,
    customers: list[tuple[str, str]],
    processes: int,
    admission: str,
    seconds: int,
    warmup: int,
) -> HttpRun:
    keys = [key for _, key in customers]
    charged_before = _charged(config, customers)
    env = child_env(METERWARE_CONFIG=str(config))
    server = Server.uvicorn("benchmarks.apps:starlette_metered", env, workers=processes, pin=False)
    try:
        answered = 0
        for key in keys:  # every customer's key resolved once, in whichever process answers
            status, _, body = server.get("/v1/hello", key)
            if status != 200:
                raise RuntimeError(f"unexpected first answer {status}: {body}")
            answered += 1
        answered += wrk(server.url("/v1/hello"), warmup, keys=keys, connections=CONNECTIONS).requests
        others = OthersClock()
        app_before, cpu_before = tree_cpu_seconds(server.pid), cluster.cpu()
        scripts_before = cluster.scripts()
        began = time.monotonic()
        result = wrk(server.url("/v1/hello"), seconds, keys=keys, connections=CONNECTIONS)
        elapsed = time.monotonic() - began
        app_cores = (tree_cpu_seconds(server.pid) - app_before) / elapsed
        cpu_after, scripts_after = cluster.cpu(), cluster.scripts()
        others_cores = others.cores()
        answered += result.requests
    finally:
        server.stop()
    charged = _charged(config, customers) - charged_before
    return HttpRun(
        processes,
        admission,
        round(result.requests_per_second),
        result.p99_ms,
        round(app_cores, 2),
        _cores(cpu_before, cpu_after, elapsed),
        round((sum(cpu_after) - sum(cpu_before)) / result.requests * 1e6, 1),
        round((scripts_after[0] - scripts_before[0]) / result.requests, 3),
        round((scripts_after[1] - scripts_before[1]) / result.requests, 1),
        round(others_cores, 2),
        charged,
        answered,
        charged_ok(answered, [charged]),
    )


def _charged(config: Path, customers: list[tuple[str, str]]) -> int:
    """What the customers were charged so far, in micro-credits (one per call)."""
    accounts = Accounts.open(Config.from_file(config))
    try:
        return sum(CREDITS_MICROS - accounts.balance(name).balance for name, _ in customers)
    finally:
        accounts.close()


# -- the command -------------------------------------------------------------------------------------


def rollup_table(runs: Sequence[RollupRun]) -> list[str]:
    lines = [
        "| shards | workers | events | events/s | x 1 worker | events per worker | shards held after"
        " | primaries' cores | Redis us/event (flush, rollup) | worker us/event | others (cores) | exact |",
        "|---:|---:|---:|---:|---:|---|---|---|---|---:|---:|---|",
    ]
    one = {run.shards: run.events_per_second for run in runs if run.workers == 1}
    for run in runs:
        ratio = run.events_per_second / one[run.shards] if run.shards in one else float("nan")
        lines.append(
            f"| {run.shards} | {run.workers} | {run.events:,} | {run.events_per_second:,} | {ratio:.2f}x"
            f" | {' / '.join(f'{n:,}' for n in run.per_worker)}"
            f" | {' / '.join(map(str, run.shards_held))}"
            f"{f'; a late worker: {run.late_worker_shards}' if run.late_worker_shards >= 0 else ''}"
            f" | {' / '.join(f'{c:.2f}' for c in run.primary_cores)}"
            f" | {run.flush_redis_us:.2f}, {run.rollup_redis_us:.2f} | {run.worker_us:.2f}"
            f" | {run.others_cores:.2f}"
            f" | {'yes' if run.exact else '**NO**'} |"
        )
    return lines


def primary_table(runs: Sequence[RollupRun]) -> list[str]:
    lines = ["| shards | events per primary (share) |", "|---:|---|"]
    seen = set()
    for run in runs:
        if run.shards in seen:
            continue
        seen.add(run.shards)
        total = sum(run.primary_events)
        shares = " / ".join(f"{n:,} ({n / total:.0%})" for n in run.primary_events)
        lines.append(f"| {run.shards} | {shares} |")
    return lines


def memory_table(memories: Sequence[Memory]) -> list[str]:
    kinds = sorted({kind for memory in memories for kind in memory.window_bytes})
    lines = [
        "| shards | bytes per customer (key, credits) | bytes per event written | of which its stream"
        " | ledger entries per event | bytes per ledger entry | "
        + " | ".join(f"{kind} window bytes" for kind in kinds)
        + " |",
        "|---:|---:|---:|---:|---:|---:|" + "---:|" * len(kinds),
    ]
    for memory in memories:
        windows = " | ".join(f"{memory.window_bytes.get(kind, 0):,.0f}" for kind in kinds)
        lines.append(
            f"| {memory.shards} | {memory.bytes_per_customer:,.0f} | {memory.bytes_per_event:,.1f}"
            f" | {memory.stream_bytes_per_event:,.1f} | {memory.ledger_entries_per_event:.3f}"
            f" | {memory.bytes_per_ledger_entry:,.1f} | {windows} |"
        )
    return lines


def http_table(runs: Sequence[HttpRun]) -> list[str]:
    lines = [
        "| admission | app processes | req/s (= events/s) | x 1 process | p99 ms | app cores"
        " | primaries' cores | Redis us/req | script runs/req | script us/req | charged / answered"
        " | others (cores) |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---:|",
    ]
    one = {run.admission: run.requests_per_second for run in runs if run.processes == 1 and not run.error}
    for run in runs:
        if run.error:
            lines.append(f"| {run.admission} | {run.processes} | failed twice: {run.error.splitlines()[0]} |")
            continue
        lines.append(
            f"| {run.admission} | {run.processes} | {run.requests_per_second:,}"
            f" | {run.requests_per_second / one.get(run.admission, math.nan):.2f}x | {run.p99_ms:.1f}"
            f" | {run.app_cores:.2f}"
            f" | {' / '.join(f'{c:.2f}' for c in run.primary_cores)} | {run.redis_us_per_request:.0f}"
            f" | {run.scripts_per_request:.3f} | {run.script_us_per_request:.0f}"
            f" | {run.charged:,} / {run.answered:,}{'' if run.exact else ' **NOT EXACT**'}"
            f" | {run.others_cores:.2f} |"
        )
    return lines


def _counts(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scaleout", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="fewer events, shorter HTTP runs (~3 minutes)")
    parser.add_argument("--events", type=int, help="events per rollup run (default 500,000; 150,000 quick)")
    parser.add_argument("--seconds", type=int, help="seconds of each measured HTTP run (default 5; 3 quick)")
    parser.add_argument("--skip-http", action="store_true", help="the rollup and memory only")
    parser.add_argument("--shards", type=_counts, default=SHARDS, help="shard counts (default 16,64,256)")
    parser.add_argument("--workers", type=_counts, default=WORKERS, help="rollup workers (default 1,2,4)")
    parser.add_argument(
        "--processes", type=_counts, default=APP_PROCESSES, help="app processes (default 1,2,4)"
    )
    parser.add_argument(
        "--customers", type=int, default=CUSTOMERS, help="customers of the rollup runs (2,000)"
    )
    parser.add_argument(
        "--json", metavar="FILE", help="also write every run's numbers and the machine as JSON"
    )
    args = parser.parse_args(argv)
    events = args.events or (150_000 if args.quick else 500_000)
    seconds = args.seconds or (3 if args.quick else 5)
    warmup = 1 if args.quick else 2
    for program in ("redis-server", "redis-cli", *(() if args.skip_http else ("wrk",))):
        if shutil.which(program) is None:
            print(f"{program} is not installed (benchmarks/run installs it)", file=sys.stderr)
            return 2

    def progress(text: str) -> None:
        print(f"  {text}", file=sys.stderr, flush=True)

    facts = machine()
    began, start_load = time.monotonic(), os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="mw-scaleout-"))
    try:
        with cluster() as running:
            rollups, memories = rollup_runs(
                running,
                events,
                workdir,
                progress,
                shard_counts=args.shards,
                worker_counts=args.workers,
                customer_count=args.customers,
            )
            https = []
            if not args.skip_http:
                https = http_runs(running, seconds, warmup, workdir, progress, process_counts=args.processes)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    minutes = (time.monotonic() - began) / 60
    facts.pop("pinning", None)
    print(
        f"meterware {facts['meterware']} on {facts['cpu']} ({facts['cores']} cores), redis-server"
        f" {facts['redis-server']}, 3 primaries on loopback;"
        f" {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())},"
        f" {minutes:.1f} minutes, load average {start_load:.2f} at the start"
    )
    sections = [
        ("Rollup: events/s from the first commit until every shard is caught up", rollup_table(rollups)),
        ("Events per primary (the shards each primary holds)", primary_table(rollups)),
        ("Memory (INFO used_memory of the primaries; MEMORY USAGE of windows)", memory_table(memories)),
    ]
    if https:
        sections.append(("Request path: uvicorn --workers N, wrk over 64 customers' keys", http_table(https)))
    for title, lines in sections:
        print(f"\n{title}\n")
        print("\n".join(lines))
    if args.json:
        document = {
            "machine": facts,
            "events": events,
            "rollup": [asdict(run) for run in rollups],
            "memory": [asdict(memory) for memory in memories],
            "http": [asdict(run) for run in https],
        }
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    exact = all(run.exact for run in rollups) and all(run.exact for run in https if not run.error)
    if not exact:
        print("\nFAILED: a run's totals are not exact (see the tables)", file=sys.stderr)
    failed = [run for run in https if run.error]
    if failed:
        print(f"\nFAILED: {len(failed)} request-path run(s) failed twice (see the table)", file=sys.stderr)
    return 0 if exact and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
