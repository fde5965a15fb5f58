"""Throughput of the metered request path vs the bare app, and of the event pipeline.

    python -m benchmarks.throughput [--seconds 5] [--rounds 3]

Starts its own redis-server and uvicorn processes on loopback ports, pins the server to CPU 0 and wrk to
CPU 1 where possible, and runs the variants in interleaved rounds so each ratio compares runs made side by
side. Bounded: every wrk run lasts --seconds, every round runs each variant once.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
from tests.servers import RedisServer, free_port, wait_for_port

from meterware import Accounts, Config
from meterware.events import UsageEvent, new_event_id
from meterware.flusher import Pending, Pipeline
from meterware.rollup import RollupWorker
from meterware.storage import open_storage
from meterware.storage.base import Settlement

CONFIG = """
[storage]
url = "{storage}"
shards = 16
[meters.calls]
aggregation = "count"
[plans.payg]
prepaid = true
rate_limits = ["1000000/second"]
[plans.payg.meters.calls]
price = "0.000001"
[routes]
exclude = ["/bench/*"]
[pipeline]
spool_dir = "{spool}"
"""


def _pin(core: int) -> list[str]:
    return ["taskset", "-c", str(core)] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []


def _wrk(url: str, seconds: float, key: str | None) -> float:
    args = [*_pin(1), "wrk", "-t1", "-c32", f"-d{max(1, round(seconds))}s", "--latency", url]
    if key:
        args[-1:-1] = ["-H", f"Authorization: Bearer {key}"]
    output = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", output)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non2xx:
        raise RuntimeError(f"{non2xx[1]} failed responses in a benchmark run:\n{output}")
    assert match, output
    return float(match[1])


def _serve(target: str, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    args = [*_pin(0), sys.executable, "-m", "uvicorn", target, "--port", str(port), "--log-level", "error"]
    process = subprocess.Popen(args, env=env)
    wait_for_port(port)
    return process, f"http://127.0.0.1:{port}/v1/hello"


def http_rounds(seconds: float, rounds: int, workdir: Path, redis_url: str) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {}
    variants = {
        "bare": ("memory://", "benchmarks.apps:bare"),
        "memory": ("memory://", "benchmarks.apps:metered"),
    }
    variants["redis"] = (redis_url, "benchmarks.apps:metered")
    for _ in range(rounds):
        for name, (storage, target) in variants.items():
            config = workdir / f"{name}.toml"
            config.write_text(CONFIG.format(storage=storage, spool=workdir / "spool"))
            env = {**os.environ, "METERWARE_CONFIG": str(config), "PYTHONPATH": os.getcwd()}
            key = None
            if name != "bare" and storage != "memory://":
                accounts = Accounts.open(Config.from_file(config))
                customer = f"bench-{time.monotonic_ns()}"
                accounts.create_customer(customer, plan="payg")
                accounts.grant_credits(customer, "1000000")
                key = accounts.create_key(customer).plaintext
            process, url = _serve(target, env)
            try:
                if name == "memory":
                    key = _memory_key(url)
                _wrk(url, 1, key)  # warm up
                results.setdefault(name, []).append(_wrk(url, seconds, key))
            finally:
                process.terminate()
                process.wait(30)
    return results


def _memory_key(url: str) -> str:
    import httpx

    return httpx.get(url.replace("/v1/hello", "/bench/key")).text


def pipeline_throughput(redis_url: str, events: int) -> tuple[float, float]:
    """Events/s from one process's buffer into Redis, and through one rollup worker."""
    config = Config.from_dict(
        {"storage": {"url": redis_url, "shards": 16}, "pipeline": {"batch_size": 1000, "buffer_size": events}}
    )
    storage = open_storage(redis_url, shards=16)
    pipeline = Pipeline(config.pipeline)
    for index in range(events):
        customer = f"c{index % 1000}"
        event = UsageEvent(
            new_event_id(),
            0,
            customer,
            "key_x",
            "default",
            "/v1/hello",
            "GET",
            200,
            "success",
            100,
            50,
            {"calls": 1},
            True,
            True,
            0,
        )
        pipeline.put(Pending(index % 16, event, Settlement(customer, True, 0, "", True, False, ())))
    started = time.perf_counter()
    pipeline.flush_sync(storage)
    flushed = events / (time.perf_counter() - started)
    assert pipeline.stats.flushed_events == events
    worker = RollupWorker(storage, config)
    started = time.perf_counter()
    rolled = worker.drain()
    rollup = rolled / (time.perf_counter() - started)
    return flushed, rollup


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--events", type=int, default=200_000)
    args = parser.parse_args()
    server = RedisServer().start()
    workdir = Path(tempfile.mkdtemp(prefix="mw-bench-"))
    try:
        results = http_rounds(args.seconds, args.rounds, workdir, server.url)
        redis.Redis.from_url(server.url).flushall()
        flushed, rolled = pipeline_throughput(server.url, args.events)
    finally:
        server.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    bare = statistics.median(results["bare"])
    print(f"{'variant':<28} {'req/s (median)':>15} {'ratio to bare':>14}")
    for name, runs in results.items():
        median = statistics.median(runs)
        print(f"{'starlette ' + name:<28} {median:>15,.0f} {median / bare:>14.2f}")
    print(f"{'flusher -> Redis':<28} {flushed:>15,.0f} events/s")
    print(f"{'rollup worker (1 process)':<28} {rolled:>15,.0f} events/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
