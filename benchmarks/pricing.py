"""Per-customer terms and dimensions on the request path: ``python -m benchmarks.pricing [--quick]``.

Issue 18's promise: the request path with dimensions and per-customer terms no slower than without them
by more than 10%, in the same run. Two variants of one Starlette app, each served by a fresh uvicorn
process (one worker, uvloop, httptools, pinned to the server core) on strict admission, the same Redis,
the same wrk, side by side in interleaved rounds (the order rotating from round to round):

* **plain**: a prepaid plan pricing a ``calls`` meter and a ``tokens`` meter (source ``handler``, with a
  ``reserve``); the handler reports 60 and 40 tokens (``usage.add("tokens", 60)``, then 40: the same two
  reports as **terms**, so the pair differs only in what meterware is configured with); the customer has
  no overrides;
* **terms**: the same, but ``tokens`` declares ``dimensions = {model = [...], direction = [...]}``, the
  plan prices ``tokens{model=large}`` and ``tokens{model=small}`` differently with included units, the
  handler reports 60 input and 40 output tokens of ``model=large``, and the customer has a version of
  overrides in force (another calls price, tokens price and included units, and rate limit).

``--memory`` adds the same pair on ``memory://`` (the customer made inside the server). Each run checks
its first answer (200, and the ``RateLimit-Policy`` of the customer's terms: the override's limit for
**terms**), and afterwards the customer's spend: it must be exactly what some number of calls costs by
the plan and the overrides (:func:`cost`, computed by hand below), and that number every call wrk saw
answered (a few more may be: calls in flight when wrk stopped counting). Exits 1 otherwise.

Each round also records the server's CPU per request, which moves less than req/s when other processes
load a shared machine. ``--in-process ROUNDS`` then measures the app's CPU per request without an HTTP
server (``benchmarks.profile``'s ASGI client in a fresh process on the server core), plain and terms
alternating, each run's spend checked too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

import meterware
from benchmarks import SRC
from benchmarks._harness import (
    LOAD_CPU,
    SERVER_CPU,
    OthersClock,
    RedisServer,
    Retries,
    Server,
    child_env,
    cpu_seconds,
    load_average,
    machine,
    pin_process,
    pinned,
    wrk,
)
from benchmarks.apps import CREDITS_MICROS, create_customer
from meterware import Accounts, Config, MeteringMiddleware

CONNECTIONS = 32
#: Tokens each call reports (60 input and 40 output in **terms**).
TOKENS = 100
#: Prices in micro-credits per unit, and included units; the plan's and the overrides'.
CALL_PRICE, TOKEN_PRICE = 1, 1
LARGE_PRICE, LARGE_INCLUDED = 3, 1000
SMALL_PRICE, SMALL_INCLUDED = 2, 500
OVERRIDE_CALL_PRICE, OVERRIDE_TOKEN_PRICE, OVERRIDE_TOKEN_INCLUDED = 2, 4, 2000
PLAN_LIMIT, OVERRIDE_LIMIT = 1_000_000, 900_000
OVERRIDES = {
    "calls.price": f"0.{OVERRIDE_CALL_PRICE:06d}",
    "tokens.price": f"0.{OVERRIDE_TOKEN_PRICE:06d}",
    "tokens.included": OVERRIDE_TOKEN_INCLUDED,
    "rate_limits": f"{OVERRIDE_LIMIT}/second",
}

CONFIG = """\
[storage]
url = "{storage}"
shards = 16

[meters.calls]
aggregation = "count"

[meters.tokens]
aggregation = "sum"
source = "handler"
reserve = {tokens}
{dimensions}
[plans.bench]
prepaid = true
rate_limits = ["{limit}/second"]
[plans.bench.meters.calls]
price = "0.{call_price:06d}"
quota = 1000000000000
quota_mode = "hard"
[plans.bench.meters.tokens]
price = "0.{token_price:06d}"
{filters}
[routes]
exclude = ["/bench/*"]

[policy]
# A backend error must show up as a failed run (503), never as a call served without the backend.
on_backend_error = "closed"
admission = "strict"
# On a shared machine a Redis starved of CPU may answer after the default 0.25 s: that slows a run (both
# variants alike), it must not fail it.
timeout = 5.0

[pipeline]
spool_dir = "{spool}"
"""
DIMENSIONS = 'dimensions = { model = ["small", "large"], direction = ["input", "output"] }\n'
FILTERS = f"""
[plans.bench.meters."tokens{{model=large}}"]
included = {LARGE_INCLUDED}
price = "0.{LARGE_PRICE:06d}"
[plans.bench.meters."tokens{{model=small}}"]
included = {SMALL_INCLUDED}
price = "0.{SMALL_PRICE:06d}"
"""


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    #: Dimensions, filters priced per value and a customer with overrides in force.
    terms: bool
    memory: bool = False

    def config(self, storage: str, spool: Path) -> str:
        return CONFIG.format(
            storage=storage,
            spool=spool,
            tokens=TOKENS,
            limit=PLAN_LIMIT,
            call_price=CALL_PRICE,
            token_price=TOKEN_PRICE,
            dimensions=DIMENSIONS if self.terms else "",
            filters=FILTERS if self.terms else "",
        )


PLAIN, TERMS = Variant("plain", False), Variant("terms", True)
PLAIN_MEMORY, TERMS_MEMORY = Variant("plain memory://", False, True), Variant("terms memory://", True, True)
LABELS = {
    PLAIN.name: "plain: calls + tokens priced, no overrides (Redis, strict)",
    TERMS.name: "terms + dimensions: tokens{model,direction}, filters, overrides (Redis, strict)",
    PLAIN_MEMORY.name: "plain (memory://)",
    TERMS_MEMORY.name: "terms + dimensions (memory://)",
}


def cost(terms: bool, calls: int) -> int:
    """What ``calls`` calls cost the customer, in micro-credits, computed by hand from the plan and overrides.

    plain: each call at the calls price and its 100 tokens at the tokens price, nothing included. terms:
    the override's calls price; every token is ``model=large``, so the ``tokens{model=large}`` filter
    prices all of them (its included units first) and the meter's own (overridden) price none.
    """
    if not terms:
        return calls * (CALL_PRICE + TOKENS * TOKEN_PRICE)
    return calls * OVERRIDE_CALL_PRICE + LARGE_PRICE * max(0, calls * TOKENS - LARGE_INCLUDED)


def calls_costing(terms: bool, charged: int, answered: int) -> int | None:
    """The number of calls, from ``answered`` to what two wrk runs may have had in flight beyond, that
    costs exactly ``charged`` (None: no such number)."""
    for calls in range(answered, answered + 2 * CONNECTIONS + 1):
        if cost(terms, calls) == charged:
            return calls
    return None


# -- the served app (``benchmarks.pricing:app``, a uvicorn factory) ----------------------------------------


async def plain_hello(request: Request) -> JSONResponse:
    meterware.usage.add("tokens", 60)
    meterware.usage.add("tokens", TOKENS - 60)
    return JSONResponse({"hello": "world"})


async def terms_hello(request: Request) -> JSONResponse:
    meterware.usage.add("tokens", 60, model="large", direction="input")
    meterware.usage.add("tokens", 40, model="large", direction="output")
    return JSONResponse({"hello": "world"})


def new_customer(accounts: Accounts, terms: bool) -> tuple[str, str]:
    """A benchmark customer on ``bench`` (with the overrides in force from its first call if ``terms``)."""
    customer, key = create_customer(accounts)
    if terms:
        accounts.set_overrides(customer, OVERRIDES, effective_from="period_start", actor="benchmark")
    return customer, key


async def _new_key(request: Request) -> PlainTextResponse:
    accounts = Accounts.open(Config.load(os.environ["METERWARE_CONFIG"]))
    customer, key = new_customer(accounts, os.environ["BENCH_PRICING"] == "terms")
    return PlainTextResponse(f"{customer} {key}")


async def _charged(request: Request) -> PlainTextResponse:
    accounts = Accounts.open(Config.load(os.environ["METERWARE_CONFIG"]))
    return PlainTextResponse(str(CREDITS_MICROS - accounts.balance(request.query_params["customer"]).balance))


async def _where(request: Request) -> PlainTextResponse:
    return PlainTextResponse(str(meterware.__file__))


def app() -> Starlette:
    """The metered app of ``BENCH_PRICING`` (plain or terms), configured by ``METERWARE_CONFIG``."""
    hello = terms_hello if os.environ["BENCH_PRICING"] == "terms" else plain_hello
    routes = [
        Route("/v1/hello", hello),
        Route("/bench/key", _new_key),
        Route("/bench/charged", _charged),
        Route("/bench/where", _where),
    ]
    served = Starlette(routes=routes)
    served.add_middleware(MeteringMiddleware, config=os.environ["METERWARE_CONFIG"])
    return served


# -- the runs ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Run:
    variant: str
    round: int
    requests_per_second: float
    p99_ms: float
    #: Calls wrk saw answered (the check request and the warm-up included), and the customer's spend.
    answered: int
    charged: int
    #: The number of calls whose cost is exactly ``charged`` (None: no number of calls costs that).
    calls_charged: int | None
    others_cores: float
    #: CPU microseconds per request of the serving process, and of Redis (None on memory://).
    server_us: float
    redis_us: float | None

    @property
    def charged_ok(self) -> bool:
        return self.calls_charged is not None


def run_once(
    variant: Variant, number: int, seconds: int, warmup: int, redis: RedisServer, workdir: Path
) -> Run:
    """Serve, check, warm up, measure and stop one server of ``variant``; then check what it charged."""
    assert redis.process is not None
    config = workdir / f"{variant.name.split()[0]}-{'memory' if variant.memory else 'redis'}.toml"
    config.write_text(variant.config("memory://" if variant.memory else redis.url, workdir / "spool"))
    env = child_env(METERWARE_CONFIG=str(config), BENCH_PRICING="terms" if variant.terms else "plain")
    customer = key = ""
    if not variant.memory:
        accounts = Accounts.open(Config.from_file(config))
        try:
            customer, key = new_customer(accounts, variant.terms)
        finally:
            accounts.close()
    server = Server.uvicorn("benchmarks.pricing:app", env)
    charged = -1
    try:
        status, _, where = server.get("/bench/where")
        if status != 200 or not Path(where).resolve().is_relative_to(SRC.resolve()):
            raise RuntimeError(f"the server runs the meterware at {where!r} ({status}), not the one in {SRC}")
        if variant.memory:
            customer, key = server.get("/bench/key")[2].split()
        status, headers, body = server.get("/v1/hello", key)
        limit = OVERRIDE_LIMIT if variant.terms else PLAN_LIMIT
        if status != 200 or f"q={limit};" not in headers.get("ratelimit-policy", "") + ";":
            raise RuntimeError(f"{variant.name}: unexpected first answer {status} {headers} {body}")
        warm = wrk(server.url("/v1/hello"), warmup, key=key, connections=CONNECTIONS)
        others = OthersClock()
        serving, storing = cpu_seconds(server.pid), cpu_seconds(redis.process.pid)
        result = wrk(server.url("/v1/hello"), seconds, key=key, connections=CONNECTIONS)
        serving, storing = cpu_seconds(server.pid) - serving, cpu_seconds(redis.process.pid) - storing
        others_cores = others.cores()
        answered = 1 + warm.requests + result.requests
        if variant.memory:
            charged = _settled(server, customer, cost(variant.terms, answered))
    finally:
        server.stop()
    if not variant.memory:
        accounts = Accounts.open(Config.from_file(config))
        try:
            charged = CREDITS_MICROS - accounts.balance(customer).balance
        finally:
            accounts.close()
    return Run(
        variant.name,
        number,
        result.requests_per_second,
        result.p99_ms,
        answered,
        charged,
        calls_costing(variant.terms, charged, answered),
        others_cores,
        serving / result.requests * 1e6,
        None if variant.memory else storing / result.requests * 1e6,
    )


def _settled(server: Server, customer: str, expected: int) -> int:
    """The memory:// customer's spend once the server's flusher has settled every answered call (10 s at
    most: then what it is)."""
    deadline = time.monotonic() + 10
    while True:
        charged = int(server.get(f"/bench/charged?customer={customer}")[2])
        if charged >= expected or time.monotonic() > deadline:
            # Calls in flight when wrk stopped may settle a moment later.
            time.sleep(0.5)
            return int(server.get(f"/bench/charged?customer={customer}")[2])
        time.sleep(0.1)


def run_rounds(
    variants: Sequence[Variant],
    rounds: int,
    seconds: int,
    warmup: int,
    retries: Retries,
    redis: RedisServer,
    workdir: Path,
) -> list[Run]:
    """Every variant once per round, the order rotating; a run others disturbed is measured again."""
    runs = []
    for number in range(rounds):
        shift = number % len(variants)
        for variant in [*variants[shift:], *variants[:shift]]:
            attempt = 0
            run = _measure(variant, number, seconds, warmup, redis, workdir)
            _progress(run, rounds)
            while retries.again(run.others_cores, attempt):
                attempt += 1
                print(
                    f"  other processes used {run.others_cores:.2f} cores: measuring it again",
                    file=sys.stderr,
                )
                run = _measure(variant, number, seconds, warmup, redis, workdir)
                _progress(run, rounds)
            runs.append(run)
    return runs


#: Runs that fail (a 503 when Redis, starved of CPU by others, answers after the client's timeout) are
#: measured again, this many times at most per variant and round.
FAILED_RUNS_AGAIN = 2


def _measure(
    variant: Variant, number: int, seconds: int, warmup: int, redis: RedisServer, workdir: Path
) -> Run:
    failures = 0
    while True:
        try:
            return run_once(variant, number, seconds, warmup, redis, workdir)
        except RuntimeError as error:
            if failures == FAILED_RUNS_AGAIN:
                raise RuntimeError(f"{variant.name}, round {number + 1}: {error}") from error
            failures += 1
            first = str(error).splitlines()[0]
            print(
                f"  {variant.name}, round {number + 1} failed ({first}): measuring it again", file=sys.stderr
            )


def _progress(run: Run, rounds: int) -> None:
    redis_us = "" if run.redis_us is None else f"  Redis {run.redis_us:.0f} us/req"
    print(
        f"  round {run.round + 1}/{rounds} {run.variant:<16} {run.requests_per_second:>7,.0f} req/s"
        f"  p99 {run.p99_ms:6.2f} ms  server {run.server_us:.0f} us/req{redis_us}"
        f"  others {run.others_cores:.2f} cores  charged {run.charged:,} micro-credits:"
        f" {run.calls_charged if run.charged_ok else 'NO number of'} calls of {run.answered:,} answered",
        file=sys.stderr,
        flush=True,
    )


def _spread(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


def table(runs: Sequence[Run], pairs: Sequence[tuple[Variant, Variant]]) -> list[str]:
    """Medians over the rounds; each terms run's ratios taken to the plain run of its round.

    The server's CPU per request moves less than req/s with other processes' load on a shared machine."""
    lines = [
        "| variant | req/s | x plain (range) | p99 ms | server us/req | x plain (range) | Redis us/req"
        " | every call charged |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for plain, terms in pairs:
        by_round = {run.round: run for run in runs if run.variant == plain.name}
        for variant in (plain, terms):
            mine = [run for run in runs if run.variant == variant.name]
            rates = [run.requests_per_second / by_round[run.round].requests_per_second for run in mine]
            cpus = [run.server_us / by_round[run.round].server_us for run in mine]
            redis = [run.redis_us for run in mine if run.redis_us is not None]
            rate = statistics.median(run.requests_per_second for run in mine)
            p99 = statistics.median(run.p99_ms for run in mine)
            cpu = statistics.median(run.server_us for run in mine)
            lines.append(
                f"| {LABELS[variant.name]} | {rate:,.0f} | {'1.00x' if variant is plain else _spread(rates)}"
                f" | {p99:.2f} | {cpu:.0f} | {'1.00x' if variant is plain else _spread(cpus)}"
                f" | {f'{statistics.median(redis):.0f}' if redis else ''}"
                f" | {'yes' if all(run.charged_ok for run in mine) else 'NO'} |"
            )
    return lines


# -- the server's CPU per request, in-process ----------------------------------------------------------

#: Requests of the warm-up of an in-process run (not counted).
WARMUP_REQUESTS = 2000


def _child(requests: int) -> None:
    """Serve ``requests`` calls of the app in this process (``benchmarks.profile``'s ASGI client, 32
    callers on uvloop, no HTTP server) after a warm-up; print the CPU microseconds per request."""
    import uvloop

    from benchmarks.profile import Lifespan, drive

    async def serve() -> float:
        served = app()
        lifespan = Lifespan(served)
        await lifespan.startup()
        key = os.environ["BENCH_KEY"]
        await drive(served, key, WARMUP_REQUESTS, CONNECTIONS)
        cpu = time.process_time()
        await drive(served, key, requests, CONNECTIONS)
        await lifespan.shutdown()  # the events still buffered are part of the requests' cost
        return (time.process_time() - cpu) / requests * 1e6

    print(json.dumps(uvloop.run(serve())))


def in_process(
    variant: Variant, requests: int, redis: RedisServer, workdir: Path, wrapper: Sequence[str]
) -> str:
    """Serve ``requests`` calls of ``variant`` in a fresh process (``--child``) run under ``wrapper`` (a
    command prefix: ``taskset``, ``valgrind``), check its customer's spend like a wrk run's; the last line
    the process printed."""
    config = workdir / f"cpu-{variant.name}-{requests}.toml"
    config.write_text(variant.config(redis.url, workdir / "spool"))
    accounts = Accounts.open(Config.from_file(config))
    try:
        customer, key = new_customer(accounts, variant.terms)
        pricing = "terms" if variant.terms else "plain"
        env = child_env(METERWARE_CONFIG=str(config), BENCH_PRICING=pricing, BENCH_KEY=key)
        command = [*wrapper, sys.executable, "-m", "benchmarks.pricing", "--child", str(requests)]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"in-process {variant.name}: {done.stderr.strip()}")
        charged = CREDITS_MICROS - accounts.balance(customer).balance
    finally:
        accounts.close()
    calls = WARMUP_REQUESTS + requests
    if cost(variant.terms, calls) != charged:
        raise RuntimeError(f"in-process {variant.name}: {charged} charged for {calls} calls")
    return done.stdout.strip().splitlines()[-1]


def cpu_rounds(rounds: int, requests: int, redis: RedisServer, workdir: Path) -> dict[str, list[float]]:
    """The app's CPU microseconds per request in-process, plain and terms on Redis in alternating order,
    each run a fresh process on the server core."""
    found: dict[str, list[float]] = {PLAIN.name: [], TERMS.name: []}
    for number in range(rounds):
        for variant in (PLAIN, TERMS) if number % 2 == 0 else (TERMS, PLAIN):
            found[variant.name].append(
                json.loads(in_process(variant, requests, redis, workdir, pinned(SERVER_CPU)))
            )
            print(
                f"  in-process {number + 1}/{rounds} {variant.name:<6} {found[variant.name][-1]:6.1f} us/req",
                file=sys.stderr,
                flush=True,
            )
    return found


#: Requests of the two in-process runs whose instruction counts' difference is counted (the process's
#: start, imports, warm-up and exit are the same in both, and cancel out).
INSTRUCTION_RUNS: Final = (500, 2500)


def instruction_counts(redis: RedisServer, workdir: Path) -> dict[str, float]:
    """Instructions per request in-process, plain and terms (valgrind's callgrind, the four runs two at a
    time): what other processes on a shared machine cannot move, as they move CPU time."""
    if shutil.which("valgrind") is None:
        raise RuntimeError("--instructions needs valgrind (apt-get install valgrind)")

    def count(variant: Variant, requests: int) -> int:
        out = workdir / f"callgrind-{variant.name}-{requests}.out"
        wrapper = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
        in_process(variant, requests, redis, workdir, wrapper)
        found = re.search(r"^summary: (\d+)$", out.read_text(), re.MULTILINE)
        if found is None:
            raise RuntimeError(f"no instruction count in {out}")
        return int(found[1])

    few, many = INSTRUCTION_RUNS
    with ThreadPoolExecutor(2) as pool:
        runs = {(v.name, n): pool.submit(count, v, n) for v in (PLAIN, TERMS) for n in INSTRUCTION_RUNS}
        return {
            v.name: (runs[v.name, many].result() - runs[v.name, few].result()) / (many - few)
            for v in (PLAIN, TERMS)
        }


def instruction_table(found: dict[str, float]) -> list[str]:
    plain, terms = found[PLAIN.name], found[TERMS.name]
    return [
        "| in-process, Redis, strict (callgrind) | instructions per request | x plain |",
        "|---|---:|---:|",
        f"| {LABELS[PLAIN.name]} | {plain / 1000:,.1f}k | 1.00x |",
        f"| {LABELS[TERMS.name]} | {terms / 1000:,.1f}k | {terms / plain:.3f}x |",
    ]


def cpu_table(found: dict[str, list[float]]) -> list[str]:
    ratios = [terms / plain for plain, terms in zip(found[PLAIN.name], found[TERMS.name], strict=True)]
    plain, terms = statistics.median(found[PLAIN.name]), statistics.median(found[TERMS.name])
    return [
        "| in-process, Redis, strict | CPU us/req | x plain (range) |",
        "|---|---:|---:|",
        f"| {LABELS[PLAIN.name]} | {plain:.1f} | 1.00x |",
        f"| {LABELS[TERMS.name]} | {terms:.1f} | {_spread(ratios)} |",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pricing", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 2 s runs (about a minute)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (6; 3 with --quick)")
    parser.add_argument("--seconds", type=int, help="seconds of each measured wrk run (10; 2 with --quick)")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of wrk warm-up of each server (1)")
    parser.add_argument("--memory", action="store_true", help="also the same pair on memory://")
    parser.add_argument(
        "--max-others",
        type=float,
        default=0.2,
        metavar="CORES",
        help="measure a run again if other processes used more CPU meanwhile (%(default)s; a budget of a"
        " fifth of the runs)",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="MINUTES",
        help="first wait up to this long for the 1-minute load average to fall below 1.0",
    )
    parser.add_argument(
        "--in-process",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="then this many rounds of the app's CPU per request in-process (no HTTP server)",
    )
    parser.add_argument(
        "--requests", type=int, default=40_000, help="requests of an in-process run (%(default)s)"
    )
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="then the instructions per request in-process, plain and terms (valgrind's callgrind; about"
        " 3 minutes)",
    )
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child)
        return 0
    deadline = time.monotonic() + args.wait_quiet * 60
    while (load := load_average()[0]) >= 1.0 and time.monotonic() < deadline:
        print(f"load average {load:.2f}: waiting for it to fall below 1.0", file=sys.stderr, flush=True)
        time.sleep(30)
    rounds = args.rounds or (3 if args.quick else 6)
    # Runs long enough for several full collections of the garbage collector: one comes every ~8,000
    # requests here, and a shorter run measures where they fall (benchmarks/README.md).
    seconds = args.seconds or (2 if args.quick else 10)
    pairs = [(PLAIN, TERMS)] + ([(PLAIN_MEMORY, TERMS_MEMORY)] if args.memory else [])
    variants = [variant for pair in pairs for variant in pair]
    retries = Retries(rounds * len(variants) // 5, args.max_others)

    facts = machine()
    before = load_average()
    print("meterware pricing benchmark:", ", ".join(f"{name} {value}" for name, value in facts.items()))
    print(f"load average at start: {before[0]:.2f} {before[1]:.2f} {before[2]:.2f}")
    others = OthersClock()
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="mw-bench-pricing-"))
    redis = RedisServer().start()
    assert redis.process is not None
    try:
        pin_process(redis.process.pid, str(LOAD_CPU))
        runs = run_rounds(variants, rounds, seconds, args.warmup, retries, redis, workdir)
        found = cpu_rounds(args.in_process, args.requests, redis, workdir) if args.in_process else None
        counted = instruction_counts(redis, workdir) if args.instructions else None
    finally:
        redis.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    after = load_average()
    print(
        f"\nStarlette under uvicorn, strict admission; medians of {rounds} interleaved rounds of {seconds}s"
        f" (wrk -t1 -c{CONNECTIONS}); ratios to the plain run of the same round; other processes used"
        f" {statistics.median(run.others_cores for run in runs):.2f} cores during the median run,"
        f" {max(run.others_cores for run in runs):.2f} at most"
    )
    print("\n".join(table(runs, pairs)))
    if found:
        print(
            f"\nThe app's CPU per request in-process (benchmarks.profile's ASGI client, {CONNECTIONS}"
            f" callers, no HTTP server), medians of {args.in_process} alternating runs of"
            f" {args.requests:,} requests"
        )
        print("\n".join(cpu_table(found)))
    if counted:
        few, many = INSTRUCTION_RUNS
        print(
            f"\nInstructions per request in-process (valgrind's callgrind): the difference between runs of"
            f" {many:,} and {few:,} requests, divided by {many - few:,}"
        )
        print("\n".join(instruction_table(counted)))
    print(
        f"\nruns measured again because other processes used more than {args.max_others} cores:"
        f" {rounds * len(variants) // 5 - retries.left}"
    )
    print(
        f"load average at end: {after[0]:.2f} {after[1]:.2f} {after[2]:.2f} (the benchmark's own included);"
        f" other processes used {others.cores():.2f} cores on average; took"
        f" {(time.monotonic() - started) / 60:.1f} min"
    )
    return 0 if all(run.charged_ok for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
