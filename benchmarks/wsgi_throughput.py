"""Throughput of Flask behind WSGIMeteringMiddleware vs the bare Flask app, under gunicorn.

    python -m benchmarks.wsgi_throughput [--seconds 5] [--rounds 3] [--threads 4]

One gunicorn worker, sync and gthread, the same settings for every variant (bare, metered on memory://,
metered on a real Redis). Starts its own redis-server and gunicorn processes on loopback ports, pins
gunicorn to CPU 0 and wrk to CPU 1 where possible, and runs the variants in interleaved rounds so each
ratio compares runs made side by side. Bounded: every wrk run lasts --seconds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.servers import RedisServer, free_port, wait_for_port

from benchmarks.throughput import CONFIG, _memory_key, _pin, _wrk
from meterware import Accounts, Config


def _gunicorn(
    target: str, worker: str, threads: int, env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], str]:
    from gunicorn.config import KNOWN_SETTINGS

    port = free_port()
    args = [*_pin(0), sys.executable, "-m", "gunicorn", "--workers", "1", "--worker-class", worker]
    args += ["--threads", str(threads), "--bind", f"127.0.0.1:{port}", "--log-level", "error"]
    if any(setting.name == "control_socket_disable" for setting in KNOWN_SETTINGS):
        args.append("--no-control-socket")
    process = subprocess.Popen([*args, target], env=env)
    wait_for_port(port)
    return process, f"http://127.0.0.1:{port}/v1/hello"


def wsgi_rounds(
    seconds: float, rounds: int, threads: int, workdir: Path, redis_url: str
) -> dict[str, list[float]]:
    """Requests per second of each (worker class, variant), one list entry per round."""
    results: dict[str, list[float]] = {}
    variants = {
        "bare": ("memory://", "benchmarks.wsgi_apps:bare"),
        "memory": ("memory://", "benchmarks.wsgi_apps:metered"),
        "redis": (redis_url, "benchmarks.wsgi_apps:metered"),
    }
    for _ in range(rounds):
        for worker in ("sync", "gthread"):
            for name, (storage, target) in variants.items():
                config = workdir / f"{name}.toml"
                config.write_text(CONFIG.format(storage=storage, spool=workdir / "spool"))
                env = {**os.environ, "METERWARE_CONFIG": str(config), "PYTHONPATH": os.getcwd()}
                key = None
                if name == "redis":
                    accounts = Accounts.open(Config.from_file(config))
                    customer = f"bench-{time.monotonic_ns()}"
                    accounts.create_customer(customer, plan="payg")
                    accounts.grant_credits(customer, "1000000")
                    key = accounts.create_key(customer).plaintext
                process, url = _gunicorn(target, worker, threads, env)
                try:
                    if name == "memory":
                        key = _memory_key(url)
                    _wrk(url, 1, key)  # warm up
                    results.setdefault(f"{worker} {name}", []).append(_wrk(url, seconds, key))
                finally:
                    process.terminate()
                    process.wait(30)
    return results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=4, help="gunicorn --threads (of gthread workers)")
    args = parser.parse_args()
    server = RedisServer().start()
    workdir = Path(tempfile.mkdtemp(prefix="mw-bench-wsgi-"))
    try:
        results = wsgi_rounds(args.seconds, args.rounds, args.threads, workdir, server.url)
    finally:
        server.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"{'flask under gunicorn, 1 worker':<32} {'req/s (median)':>15} {'ratio to bare':>14}")
    for name, runs in results.items():
        bare = statistics.median(results[name.split()[0] + " bare"])
        median = statistics.median(runs)
        print(f"{name:<32} {median:>15,.0f} {median / bare:>14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
