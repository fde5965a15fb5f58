"""A ruler for the ratios: ``python -m benchmarks.ruler [--rounds N] [--seconds S]``.

What does "0.46x the bare app" cost a server? This serves the bare Starlette app of the benchmarks with a
handler that first burns N microseconds of CPU in pure Python (``benchmarks.apps:starlette_busy``), for a
few N, next to the bare app, in interleaved rounds measured as ``python -m benchmarks`` measures (one
uvicorn worker pinned to one core, ``wrk -t1 -c32`` on the other). It prints each one's throughput, its
ratio to the bare app of the same round, and the server's user and system CPU per request.

Read the main table against it: a metered variant at the ratio of "N us" costs the server what N
microseconds of handler work do. It also shows what the ratio alone hides: the kernel's time per request
(loopback TCP) grows as the server slows down, for the bare app as much as for a metered one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass

from benchmarks._harness import Server, child_env, cpu_times, wrk
from benchmarks.throughput import CONNECTIONS

#: Microseconds of handler work per request (0: the bare app).
WORK_US = (0, 10, 20, 40, 80)


@dataclass(frozen=True, slots=True)
class Run:
    work_us: int
    requests_per_second: float
    #: The server's CPU per request during the measured run, in microseconds.
    user_us: float
    system_us: float


def run_once(work_us: int, seconds: int, warmup: int) -> Run:
    server = Server.uvicorn("benchmarks.apps:starlette_busy", child_env(BENCH_WORK_US=str(work_us)))
    try:
        url = server.url("/v1/hello")
        wrk(url, warmup, connections=CONNECTIONS)
        user, system = cpu_times(server.pid)
        result = wrk(url, seconds, connections=CONNECTIONS)
        user_after, system_after = cpu_times(server.pid)
    finally:
        server.stop()
    per_request = 1e6 / result.requests
    return Run(
        work_us,
        result.requests_per_second,
        (user_after - user) * per_request,
        (system_after - system) * per_request,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ruler", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    runs: list[Run] = []
    for number in range(args.rounds):
        shift = number % len(WORK_US)
        for work_us in WORK_US[shift:] + WORK_US[:shift]:
            run = run_once(work_us, args.seconds, args.warmup)
            print(
                f"  round {number + 1}/{args.rounds} {work_us:>3} us {run.requests_per_second:>9,.0f} req/s",
                file=sys.stderr,
            )
            runs.append(run)
    bare = [run.requests_per_second for run in runs if run.work_us == 0]
    print("| handler work | req/s | x bare | server user us/req | server system us/req |")
    print("|---|---:|---:|---:|---:|")
    for work_us in WORK_US:
        mine = [run for run in runs if run.work_us == work_us]
        ratios = [run.requests_per_second / base for run, base in zip(mine, bare, strict=True)]
        label = "none (bare)" if work_us == 0 else f"{work_us} us"
        print(
            f"| {label} | {statistics.median(run.requests_per_second for run in mine):,.0f} |"
            f" {statistics.median(ratios):.2f}x | {statistics.median(run.user_us for run in mine):.1f} |"
            f" {statistics.median(run.system_us for run in mine):.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
