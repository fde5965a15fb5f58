"""Run the whole benchmark suite: ``python -m benchmarks [--quick]`` (see benchmarks/README.md).

Starts its own redis-server and app servers on loopback ports, measures every framework bare, behind its
peers (other libraries' middleware) and behind meterware in interleaved rounds (``benchmarks.throughput``),
then the event pipeline and the rollup (``benchmarks.pipeline``), and prints the medians, the ratios to the
bare app of the same round and the targets of issue 5 next to them. About 12 minutes by default, about 4
with ``--quick``. ``--baseline REV`` adds meterware's modes served by another revision's ``src/`` to the
same rounds (a before/after table from one run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

from benchmarks import pipeline, throughput
from benchmarks._harness import (
    LOAD_CPU,
    OthersClock,
    RedisServer,
    Retries,
    Server,
    checkout,
    child_env,
    load_average,
    machine,
    pin_process,
    rss_mib,
    short_commit,
    wrk,
)
from benchmarks.apps import config_text, create_customer
from benchmarks.pipeline import PipelineRun
from benchmarks.throughput import FRAMEWORKS, REDIS_MODES, Baseline, Row, Settings, missing_packages
from meterware import Accounts, Config

LABELS = {framework.name: framework.label for framework in FRAMEWORKS}
PEER_LABELS = {peer.mode: peer.label for framework in FRAMEWORKS for peer in framework.peers}
MODE_LABELS = {
    "bare": "bare",
    "memory": "+ meterware memory://",
    "strict": "+ meterware strict (Redis)",
    "lease": "+ meterware lease (Redis)",
}


def _progress(line: str) -> None:
    print(f"  {line}", file=sys.stderr, flush=True)


def _ratio(value: float) -> str:
    return f"{value:.2f}x"


def _label(mode: str) -> str:
    kind, _, revision = mode.partition("@")
    label = PEER_LABELS.get(kind) or MODE_LABELS[kind]
    return f"{label} @{revision}" if revision else label


def http_table(rows: Sequence[Row], baseline: str = "") -> list[str]:
    lines = [
        "| variant | req/s | x bare (range) | p99 ms | p99 x bare | server busy | server us/req added"
        " | Redis us/req | RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for framework in FRAMEWORKS:
        mine = {row.mode: row for row in rows if row.framework == framework.name}
        for row in (mine[mode] for mode in framework.modes(True, baseline) if mode in mine):
            name = f"{framework.label} {_label(row.mode)}"
            ratio = f"{_ratio(row.ratio)} ({row.ratio_low:.2f}-{row.ratio_high:.2f})"
            added = f"{row.server_us_added:+.0f}"
            if row.mode == "bare":
                ratio, added = "1.00x", ""
            if row.charged_ok is False:
                name += " (NOT every call counted in Redis!)"
            redis_us = "" if row.redis_us is None else f"{row.redis_us:.0f}"
            lines.append(
                f"| {name} | {row.requests_per_second:,.0f} | {ratio} | {row.p99_ms:.2f} |"
                f" {_ratio(row.p99_ratio)} | {row.server_busy:.0%} | {added} | {redis_us} |"
                f" {row.rss_start_mib:.1f} -> {row.rss_end_mib:.1f} |"
            )
    return lines


def pipeline_table(result: PipelineRun) -> list[str]:
    scaling = result.rollup_two / result.rollup_one
    return [
        "| pipeline | events/s |",
        "|---|---:|",
        f"| flusher -> Redis, one process, `flush_sync` (WSGI thread) | {result.flush_sync:,.0f} |",
        f"| flusher -> Redis, one process, `flush_async` (ASGI task, uvloop) | {result.flush_async:,.0f} |",
        f"| rollup, 1 worker process, {pipeline.SHARDS} shards | {result.rollup_one:,.0f} |",
        f"| rollup, 2 worker processes, {2 * pipeline.SHARDS} shards (total) |"
        f" {result.rollup_two:,.0f} ({scaling:.2f}x one worker) |",
    ]


def _verdict(measured: float, target: float, *, at_most: bool = False, unit: str = "") -> str:
    if (measured <= target) if at_most else (measured >= target):
        return "met"
    factor = measured / target if at_most else target / measured
    gap = f"{abs(measured - target):,.0f} {unit}" if unit else f"{abs(measured - target):.2f}"
    return f"missed by {gap}: {factor:.1f}x short"


def targets_table(rows: Sequence[Row], result: PipelineRun | None) -> list[str]:
    lines = ["| issue 5 target | measured | verdict |", "|---|---:|---|"]
    by = {(row.framework, row.mode): row for row in rows}
    for framework in ("starlette", "fastapi"):
        strict, memory, lease = (by.get((framework, mode)) for mode in ("strict", "memory", "lease"))
        label = LABELS[framework]
        if strict is None and memory is None:
            continue
        if strict is not None:
            lines.append(
                f"| {label} strict >= 0.60x bare | {_ratio(strict.ratio)} | {_verdict(strict.ratio, 0.6)} |"
            )
            lines.append(
                f"| {label} strict p99 <= 1.5x bare p99 | {_ratio(strict.p99_ratio)} |"
                f" {_verdict(strict.p99_ratio, 1.5, at_most=True)} |"
            )
        if lease is not None:
            lines.append(
                f"| {label} lease >= 0.85x bare | {_ratio(lease.ratio)} | {_verdict(lease.ratio, 0.85)} |"
            )
        if memory is not None:
            verdict = _verdict(memory.ratio, 0.85)
            lines.append(f"| {label} memory:// >= 0.85x bare | {_ratio(memory.ratio)} | {verdict} |")
    for framework in ("flask-sync", "flask-gthread"):
        for mode in ("memory", "strict", "lease"):
            row = by.get((framework, mode))
            if row is not None:
                lines.append(
                    f"| {LABELS[framework]} {mode} >= 0.75x bare Flask | {_ratio(row.ratio)} |"
                    f" {_verdict(row.ratio, 0.75)} |"
                )
    if result is not None:
        best = max(result.flush_sync, result.flush_async)
        lines.append(
            f"| pipeline >= 300k events/s from one process | {best:,.0f} |"
            f" {_verdict(best, 300_000, unit='events/s')} |"
        )
        lines.append(
            f"| rollup >= 250k events/s per worker process | {result.rollup_one:,.0f} |"
            f" {_verdict(result.rollup_one, 250_000, unit='events/s')} |"
        )
        scaling = result.rollup_two / result.rollup_one
        lines.append(
            f"| rollup grows with shards and workers | 2 workers: {scaling:.2f}x one |"
            f" {'met' if scaling > 1 else 'missed'} |"
        )
    metered = [row for row in rows if row.mode in REDIS_MODES]
    if metered:
        growth = max(row.rss_end_mib - row.rss_start_mib for row in metered)
        lines.append(
            f"| memory bounded (strict: RSS over a measured run) | {growth:+.1f} MiB at most |"
            f" {'flat' if growth < 1.0 else 'grows: run --soak to see whether it levels off'} |"
        )
    return lines


def soak(seconds: int, redis_url: str, workdir: Path) -> list[str]:
    """One long Starlette strict run, the server's RSS sampled every few seconds."""
    config = workdir / "soak.toml"
    config.write_text(config_text(storage=redis_url, spool=workdir / "spool", admission="strict"))
    accounts = Accounts.open(Config.from_file(config))
    _, key = create_customer(accounts)
    accounts.close()
    server = Server.uvicorn("benchmarks.apps:starlette_metered", child_env(METERWARE_CONFIG=str(config)))
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        began = time.monotonic()
        while not stop.wait(min(10.0, max(1.0, seconds / 12))):
            samples.append((time.monotonic() - began, rss_mib(server.pid)))

    try:
        wrk(server.url("/v1/hello"), 2, key=key)
        samples.append((0.0, rss_mib(server.pid)))
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        result = wrk(server.url("/v1/hello"), seconds, key=key)
        stop.set()
        sampler.join()
        samples.append((float(seconds), rss_mib(server.pid)))
    finally:
        server.stop()
    trace = ", ".join(f"{at:.0f}s {rss:.1f}" for at, rss in samples)
    return [
        f"soak: Starlette strict for {seconds}s, {result.requests:,} requests"
        f" ({result.requests_per_second:,.0f} req/s); RSS MiB: {trace}"
    ]


def _wait_quiet(minutes: float) -> None:
    """Wait (up to ``minutes``) until the machine is quiet: others' test suites skew every number."""
    deadline = time.monotonic() + minutes * 60
    while (load := load_average()[0]) >= 1.0 and time.monotonic() < deadline:
        print(f"load average {load:.2f}: waiting for it to fall below 1.0", file=sys.stderr, flush=True)
        time.sleep(30)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 short rounds and a small pipeline (~4 min)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds of the HTTP variants (4)")
    parser.add_argument("--seconds", type=int, help="seconds of each measured wrk run (5)")
    parser.add_argument("--warmup", type=int, help="seconds of wrk warm-up of each server (1)")
    parser.add_argument("--events", type=int, help="events per flush measurement (100000)")
    parser.add_argument("--pipeline-rounds", type=int, help="rounds of the pipeline measurements (3)")
    parser.add_argument(
        "--frameworks",
        default=",".join(framework.name for framework in FRAMEWORKS),
        help="comma-separated subset of: %(default)s",
    )
    parser.add_argument(
        "--peers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure the frameworks' peers (limits, Flask-Limiter...) in the same rounds (default: yes)",
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also measure meterware's modes served by REV's src/ (a temporary git worktree), in the same"
        " rounds, with this checkout's apps and configuration",
    )
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--soak", type=int, default=0, help="then a Starlette strict run this long (RSS)")
    parser.add_argument("--json", type=Path, help="also write every run's numbers to this file")
    parser.add_argument(
        "--max-others",
        type=float,
        default=0.2,
        metavar="CORES",
        help="measure a run again if other processes used more CPU meanwhile (%(default)s; a budget of"
        " a fifth of the runs)",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="MINUTES",
        help="first wait up to this long for the 1-minute load average to fall below 1.0",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    names = args.frameworks.split(",")
    if unknown := set(names) - set(LABELS):
        parser.error(f"unknown frameworks: {', '.join(sorted(unknown))}")
    frameworks = tuple(framework for framework in FRAMEWORKS if framework.name in names)
    if args.peers and not args.skip_http and (missing := missing_packages(frameworks)):
        parser.error(
            f"the peers need {', '.join(missing)}: run benchmarks/run (it installs them), or"
            " pip install -r benchmarks/requirements.txt, or pass --no-peers"
        )
    if args.baseline:
        try:
            short_commit(args.baseline)
        except RuntimeError as error:
            parser.error(f"--baseline: {error}")
    rounds = args.rounds or (2 if quick else 4)
    per_round = sum(len(framework.modes(args.peers, args.baseline or "")) for framework in frameworks)
    # Re-measuring up to a fifth of the runs (a tenth with --quick) keeps the suite bounded in time.
    budget = rounds * per_round // (10 if quick else 5)
    retries = Retries(budget, args.max_others)
    settings = Settings(
        rounds=rounds,
        seconds=args.seconds or (2 if quick else 5),
        warmup=args.warmup or 1,
        frameworks=frameworks,
        retries=retries,
        peers=args.peers,
    )
    events = args.events or (20_000 if quick else 100_000)
    pipeline_rounds = args.pipeline_rounds or (1 if quick else 3)

    if args.wait_quiet:
        _wait_quiet(args.wait_quiet)
    facts = machine()
    before = load_average()
    others = OthersClock()
    started = time.monotonic()
    print("meterware benchmarks:", ", ".join(f"{name} {value}" for name, value in facts.items()))
    print(f"load average at start: {before[0]:.2f} {before[1]:.2f} {before[2]:.2f}")
    if before[0] > 1.0:
        print("warning: the machine is busy (load > 1.0); the numbers will be noisy", file=sys.stderr)

    workdir = Path(tempfile.mkdtemp(prefix="mw-bench-"))
    server = RedisServer().start()
    assert server.process is not None
    rows: list[Row] = []
    revision = ""
    runs: list[throughput.Run] = []
    pipeline_runs: list[PipelineRun] = []
    extra: list[str] = []
    try:
        if not args.skip_http:
            print(
                f"HTTP: {settings.rounds} rounds of {per_round} runs",
                file=sys.stderr,
            )
            pin_process(server.process.pid, str(LOAD_CPU))
            with contextlib.ExitStack() as stack:
                if args.baseline:
                    revision, src = stack.enter_context(checkout(args.baseline))
                    print(f"baseline: the meterware of {revision}, from {src}", file=sys.stderr)
                    settings = replace(settings, baseline=Baseline(revision, src))
                runs = throughput.run_rounds(settings, server, workdir, _progress)
            rows = throughput.summarize(runs)
        if not args.skip_pipeline:
            print(f"pipeline: {pipeline_rounds} rounds of {events:,} events", file=sys.stderr)
            pin_process(server.process.pid, "0,1")
            pipeline_runs = pipeline.run_rounds(server.url, events, pipeline_rounds, retries, _progress)
        if args.soak:
            pin_process(server.process.pid, str(LOAD_CPU))
            extra = soak(args.soak, server.url, workdir)
    finally:
        server.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)

    result = pipeline.medians(pipeline_runs) if pipeline_runs else None
    after = load_average()
    busy = others.cores()
    print()
    if rows:
        noise = statistics.median(run.others_cores for run in runs)
        print(
            f"HTTP: medians of {settings.rounds} rounds of {settings.seconds}s"
            f" (wrk -t1 -c{throughput.CONNECTIONS} --latency); ratios to the bare app of the same round;"
            f" other processes used {noise:.2f} cores during the median run,"
            f" {max(row.others_max for row in rows):.2f} at most"
        )
        print("\n".join(http_table(rows, revision)))
        print()
    if result is not None:
        print(
            f"pipeline: medians of {pipeline_rounds} rounds, {events:,} events per flush measurement;"
            f" other processes used {result.others_cores:.2f} cores at most during a round"
        )
        print("\n".join(pipeline_table(result)))
        print()
    print("\n".join(targets_table(rows, result)))
    for line in extra:
        print(line)
    elapsed = time.monotonic() - started
    print(
        f"\nruns measured again because other processes used more than {args.max_others} cores:"
        f" {budget - retries.left}"
    )
    print(
        f"load average at end: {after[0]:.2f} {after[1]:.2f} {after[2]:.2f} (the suite's own included);"
        f" other processes used {busy:.2f} cores on average during the run; took {elapsed / 60:.1f} min"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": facts,
                    "load_average": {"start": before, "end": after},
                    "others_cores": busy,
                    "settings": {
                        "rounds": settings.rounds,
                        "seconds": settings.seconds,
                        "events": events,
                        "peers": settings.peers,
                        "baseline": revision or None,
                    },
                    "runs": [asdict(run) for run in runs],
                    "rows": [asdict(row) for row in rows],
                    "pipeline": [asdict(run) for run in pipeline_runs],
                    "soak": extra,
                    "elapsed_seconds": elapsed,
                },
                indent=2,
            )
        )
    return 0 if all(row.charged_ok is not False for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
