"""HTTP throughput and latency: each framework bare and behind meterware, in interleaved rounds.

Every run starts a fresh server process (one worker, pinned to the server core), asks one request to
check what it serves, warms it up with wrk, then measures it with ``wrk -t1 -c32 --latency`` on the other
core, and stops it with SIGTERM (so it drains its events the way it would in production). Modes:

* ``bare``: the app alone;
* ``memory``: behind meterware on ``memory://`` (everything in the server process, rollup included);
* ``strict``: behind meterware on Redis: every call admitted by one atomic script in Redis, its event
  flushed to Redis; afterwards the customer's balance must show every served call charged;
* ``lease``: the same, the calls reserved in blocks;
* the framework's peers (``benchmarks.peers``, ``benchmarks.wsgi_apps.flask_limiter``): the app behind
  another library's middleware; afterwards Redis must show a script run for every served call, and the
  reference's accounts and stream every served call charged and recorded;
* with ``--baseline REV``, ``memory@REV``, ``strict@REV`` and ``lease@REV``: meterware's modes again, the
  same apps and configuration of this checkout, but the servers import meterware from ``REV``'s ``src/``
  (checked before measuring) and the customer is created and read by that meterware too.

The order of the modes rotates from round to round, so no mode always runs first or last.
"""

from __future__ import annotations

import importlib.util
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import ROOT, SRC, peers
from benchmarks._harness import (
    OthersClock,
    RedisServer,
    Retries,
    Server,
    WrkResult,
    child_env,
    cpu_seconds,
    rss_mib,
    wrk,
)
from benchmarks.apps import config_text

MODES = ("bare", "memory", "strict", "lease")
#: Modes served by Redis (their customer lives there; wrk's calls must all be charged).
REDIS_MODES = ("strict", "lease")
CONNECTIONS = 32


@dataclass(frozen=True, slots=True)
class Peer:
    """The framework's app behind another library's middleware, measured in the same rounds."""

    #: Its name among the modes of a round.
    mode: str
    #: What the table says after the framework's name.
    label: str
    #: ``module:function``, the app factory.
    factory: str
    #: The module it needs installed (``benchmarks/requirements.txt``), or "".
    needs: str = ""
    #: Served with the suite's Redis: its Redis CPU is measured and every answered call must have run a
    #: script there.
    redis: bool = False
    #: The reference: its accounts must show every answered call charged, its stream every call recorded.
    reference: bool = False


NOOP = Peer("noop", "+ pure-ASGI no-op middleware", "benchmarks.peers:starlette_noop")
LIMITS = Peer(
    "limits", "+ limits (fixed window, Redis)", "benchmarks.peers:starlette_limits", "limits", redis=True
)
REFERENCE = Peer(
    "reference",
    "+ reference: EVALSHA per call + batched XADD",
    "benchmarks.peers:starlette_reference",
    redis=True,
    reference=True,
)
PIPELINED = Peer(
    "pipelined",
    "+ reference: EVALSHAs pipelined + batched XADD",
    "benchmarks.peers:starlette_reference_pipelined",
    redis=True,
    reference=True,
)
INSTRUMENTATOR = Peer(
    "instrumentator",
    "+ prometheus-fastapi-instrumentator",
    "benchmarks.peers:fastapi_instrumentator",
    "prometheus_fastapi_instrumentator",
)
FLASK_LIMITER = Peer(
    "flask-limiter",
    "+ Flask-Limiter (fixed window, Redis)",
    "benchmarks.wsgi_apps:flask_limiter",
    "flask_limiter",
    redis=True,
)


@dataclass(frozen=True, slots=True)
class Framework:
    name: str
    label: str
    #: ``module:prefix``: the factories ``<prefix>_bare`` and ``<prefix>_metered`` of the module.
    apps: str
    #: "uvicorn", or the gunicorn worker class ("sync", "gthread").
    server: str
    peers: tuple[Peer, ...] = ()

    def modes(self, with_peers: bool, baseline: str = "") -> tuple[str, ...]:
        """The modes of a round: the bare app, the peers, meterware's modes (then the baseline's)."""
        peer_modes = tuple(peer.mode for peer in self.peers) if with_peers else ()
        baseline_modes = tuple(f"{mode}@{baseline}" for mode in MODES[1:]) if baseline else ()
        return (MODES[0], *peer_modes, *MODES[1:], *baseline_modes)

    def peer(self, mode: str) -> Peer | None:
        return next((peer for peer in self.peers if peer.mode == mode), None)

    def factory(self, mode: str) -> str:
        if peer := self.peer(mode):
            return peer.factory
        return f"{self.apps}_{'bare' if mode == 'bare' else 'metered'}"

    def serve(self, mode: str, env: dict[str, str], threads: int) -> Server:
        if self.server == "uvicorn":
            return Server.uvicorn(self.factory(mode), env)
        return Server.gunicorn(self.factory(mode), self.server, threads, env)


FRAMEWORKS = (
    Framework(
        "starlette", "Starlette", "benchmarks.apps:starlette", "uvicorn", (NOOP, LIMITS, REFERENCE, PIPELINED)
    ),
    Framework("fastapi", "FastAPI", "benchmarks.apps:fastapi", "uvicorn", (INSTRUMENTATOR,)),
    Framework("flask-sync", "Flask sync", "benchmarks.wsgi_apps:flask", "sync", (FLASK_LIMITER,)),
    Framework("flask-gthread", "Flask gthread", "benchmarks.wsgi_apps:flask", "gthread", (FLASK_LIMITER,)),
)


def missing_packages(frameworks: Sequence[Framework]) -> list[str]:
    """The modules the peers of ``frameworks`` need that are not installed."""
    needed = {peer.needs for framework in frameworks for peer in framework.peers if peer.needs}
    return sorted(name for name in needed if importlib.util.find_spec(name) is None)


@dataclass(frozen=True, slots=True)
class Baseline:
    """Another revision's meterware (``--baseline``), measured in the same rounds."""

    #: Its short commit hash: the suffix of its modes (``strict@32f2214``).
    revision: str
    #: The ``src/`` of its temporary worktree.
    src: Path


@dataclass(frozen=True, slots=True)
class Settings:
    rounds: int
    seconds: int
    warmup: int
    #: gunicorn --threads of the gthread worker.
    threads: int = 4
    frameworks: tuple[Framework, ...] = FRAMEWORKS
    retries: Retries = field(default_factory=lambda: Retries(0, 1.0))
    #: Measure each framework's peers in the same rounds.
    peers: bool = True
    baseline: Baseline | None = None

    def modes(self, framework: Framework) -> tuple[str, ...]:
        return framework.modes(self.peers, self.baseline.revision if self.baseline else "")


@dataclass(frozen=True, slots=True)
class Run:
    """One measured wrk run of one server process."""

    framework: str
    mode: str
    round: int
    result: WrkResult
    #: RSS of the serving process after the warm-up and after the measured run.
    rss_start_mib: float
    rss_end_mib: float
    #: Strict mode: calls the customer was charged for, and calls wrk saw answered (warm-up included).
    #: The reference peers: credits their accounts lost (one a call).
    charged: int | None = None
    answered: int = 0
    #: CPU used by other processes during the measured run, in cores (a shared machine's noise).
    others_cores: float = 0.0
    #: Share of its core the serving process used during the measured run (1.0: it was the bottleneck).
    server_busy: float = 0.0
    #: Strict mode: CPU microseconds Redis spent per request during the measured run.
    redis_us: float | None = None
    #: Redis-backed peers: scripts Redis ran while the server lived (at least one per answered call).
    scripts: int | None = None
    #: The reference peers: usage events in their stream after the server stopped.
    streamed: int | None = None
    #: CPU microseconds the serving process spent per request during the measured run.
    server_us: float = 0.0


def run_once(
    framework: Framework, mode: str, number: int, settings: Settings, redis: RedisServer, workdir: Path
) -> Run:
    """Serve, check, warm up, measure and stop one server of ``framework`` in ``mode``."""
    peer = framework.peer(mode)
    # "strict@32f2214": strict mode, served by the baseline's meterware.
    kind, _, revision = mode.partition("@")
    src = settings.baseline.src if revision and settings.baseline else SRC
    uses_redis = kind in REDIS_MODES or (peer is not None and peer.redis)
    storage = redis.url if kind in REDIS_MODES else "memory://"
    assert redis.process is not None
    config = workdir / f"{mode}.toml"
    admission = "lease" if kind == "lease" else "strict"
    config.write_text(config_text(storage=storage, spool=workdir / "spool", admission=admission))
    env = child_env(src, METERWARE_CONFIG=str(config), BENCH_REDIS_URL=redis.url)
    customer = key = None
    if kind in REDIS_MODES:
        customer, key = _customers(env, "new").split()
    if peer is not None:
        key = f"bench-{uuid.uuid4().hex[:12]}"
        if peer.reference:
            peers.open_account(redis.url, f"Bearer {key}")
    scripts_before = peers.scripts_run(redis.url) if peer is not None and peer.redis else 0
    server = framework.serve(mode, env, settings.threads)
    try:
        metered = kind in MODES[1:]
        if metered:
            _check_serves(server, src)
        if kind == "memory":
            key = server.get("/bench/key")[2]
        status, headers, body = server.get("/v1/hello", key)
        if status != 200 or ("ratelimit" in headers) != metered:
            raise RuntimeError(f"{framework.name} {mode}: unexpected first answer {status} {headers} {body}")
        warm = wrk(server.url("/v1/hello"), settings.warmup, key=key, connections=CONNECTIONS)
        rss_start = rss_mib(server.pid)
        others, began = OthersClock(), time.monotonic()
        serving, storing = cpu_seconds(server.pid), cpu_seconds(redis.process.pid)
        result = wrk(server.url("/v1/hello"), settings.seconds, key=key, connections=CONNECTIONS)
        serving, storing = cpu_seconds(server.pid) - serving, cpu_seconds(redis.process.pid) - storing
        others_cores, elapsed = others.cores(), time.monotonic() - began
        rss_end = rss_mib(server.pid)
    finally:
        server.stop()
    charged = streamed = scripts = None
    if customer is not None:
        charged = int(_customers(env, "charged", customer))
    if peer is not None and peer.redis:
        scripts = peers.scripts_run(redis.url) - scripts_before
    if peer is not None and peer.reference:
        charged = peers.spent(redis.url, f"Bearer {key}")
        streamed = peers.take_streamed(redis.url)
    answered = 1 + warm.requests + result.requests
    redis_us = storing / result.requests * 1e6 if uses_redis else None
    return Run(
        framework.name,
        mode,
        number,
        result,
        rss_start,
        rss_end,
        charged,
        answered,
        others_cores,
        serving / elapsed,
        redis_us,
        scripts,
        streamed,
        serving / result.requests * 1e6,
    )


def _check_serves(server: Server, src: Path) -> None:
    """Fail unless the server imported the meterware of ``src``."""
    status, _, where = server.get("/bench/where")
    if status != 200 or not Path(where).resolve().is_relative_to(src.resolve()):
        raise RuntimeError(f"the server runs the meterware at {where!r} ({status}), not the one in {src}")


def _customers(env: dict[str, str], *args: str) -> str:
    """``python -m benchmarks.customers ARGS`` with the meterware the server of ``env`` runs."""
    command = [sys.executable, "-m", "benchmarks.customers", *args]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"benchmarks.customers {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def run_rounds(
    settings: Settings, redis: RedisServer, workdir: Path, progress: Callable[[str], None]
) -> list[Run]:
    """Every (framework, mode) once per round; the modes' order rotates from round to round."""
    runs: list[Run] = []
    for number in range(settings.rounds):
        for framework in settings.frameworks:
            modes = settings.modes(framework)
            shift = number % len(modes)
            for mode in modes[shift:] + modes[:shift]:
                attempt = 0
                run = _measure(framework, mode, number, settings, redis, workdir)
                progress(_describe(run, settings.rounds))
                while settings.retries.again(run.others_cores, attempt):
                    attempt += 1
                    progress(f"other processes used {run.others_cores:.2f} cores: measuring it again")
                    run = _measure(framework, mode, number, settings, redis, workdir)
                    progress(_describe(run, settings.rounds))
                runs.append(run)
    return runs


def _measure(
    framework: Framework, mode: str, number: int, settings: Settings, redis: RedisServer, workdir: Path
) -> Run:
    try:
        return run_once(framework, mode, number, settings, redis, workdir)
    except RuntimeError as error:
        raise RuntimeError(f"{framework.name} {mode}, round {number + 1}: {error}") from error


def _describe(run: Run, rounds: int) -> str:
    text = (
        f"round {run.round + 1}/{rounds} {run.framework:<13} {run.mode:<14}"
        f" {run.result.requests_per_second:>9,.0f} req/s  p99 {run.result.p99_ms:6.2f} ms"
        f"  RSS {run.rss_start_mib:.1f} -> {run.rss_end_mib:.1f} MiB  server busy {run.server_busy:.0%}"
        f"  others {run.others_cores:.2f} cores"
    )
    if run.redis_us is not None:
        text += f"  Redis {run.redis_us:.0f} us/request"
    if run.charged is not None:
        text += f"  charged {run.charged:,} of {run.answered:,} answered"
    if run.streamed is not None:
        text += f"  {run.streamed:,} events streamed"
    if run.scripts is not None:
        text += f"  {run.scripts:,} scripts run"
    return text


@dataclass(frozen=True, slots=True)
class Row:
    """The medians of one (framework, mode) over the rounds, ratios taken within each round."""

    framework: str
    mode: str
    rounds: int
    requests_per_second: float
    ratio: float
    ratio_low: float
    ratio_high: float
    p99_ms: float
    p99_ratio: float
    rss_start_mib: float
    rss_end_mib: float
    #: Whether Redis shows every answered call done (a few more may be: requests in flight when wrk
    #: stopped are answered to no one): charged (strict, lease, the reference), recorded in the stream
    #: (the reference), a script run (the Redis-backed peers). None where nothing is checked.
    charged_ok: bool | None
    #: The most CPU other processes used during one of the runs, in cores.
    others_max: float
    server_busy: float
    redis_us: float | None
    #: Server CPU per request beyond the bare app's in the same round, in microseconds.
    server_us_added: float


def summarize(runs: Sequence[Run]) -> list[Row]:
    by_key = {(run.framework, run.mode, run.round): run for run in runs}
    rows = []
    seen = dict.fromkeys((run.framework, run.mode) for run in runs)
    for framework, mode in seen:
        mine = [run for run in runs if (run.framework, run.mode) == (framework, mode)]
        pairs = [(run, by_key[(framework, "bare", run.round)]) for run in mine]
        ratios = [run.result.requests_per_second / bare.result.requests_per_second for run, bare in pairs]
        p99_ratios = [run.result.p99_ms / bare.result.p99_ms for run, bare in pairs]
        added = [run.server_us - bare.server_us for run, bare in pairs]
        checked = [run for run in mine if run.charged is not None or run.scripts is not None]
        rows.append(
            Row(
                framework,
                mode,
                len(mine),
                statistics.median(run.result.requests_per_second for run in mine),
                statistics.median(ratios),
                min(ratios),
                max(ratios),
                statistics.median(run.result.p99_ms for run in mine),
                statistics.median(p99_ratios),
                statistics.median(run.rss_start_mib for run in mine),
                statistics.median(run.rss_end_mib for run in mine),
                all(_charged_ok(run) for run in checked) if checked else None,
                max(run.others_cores for run in mine),
                statistics.median(run.server_busy for run in mine),
                statistics.median(redis_us) if (redis_us := _redis_us(mine)) else None,
                statistics.median(added),
            )
        )
    return rows


def _redis_us(runs: Sequence[Run]) -> list[float]:
    return [run.redis_us for run in runs if run.redis_us is not None]


def _charged_ok(run: Run) -> bool:
    counts = [count for count in (run.charged, run.streamed) if count is not None]
    return charged_ok(run.answered, counts) and (run.scripts is None or run.scripts >= run.answered)


def charged_ok(answered: int, counts: Sequence[int]) -> bool:
    """Whether each count (calls charged, events recorded) is every call answered, and at most what two
    wrk runs may have had in flight when they stopped counting (answered to no one) beyond."""
    return all(answered <= count <= answered + 2 * CONNECTIONS for count in counts)


if __name__ == "__main__":
    sys.exit("run the whole suite with: python -m benchmarks (see benchmarks/README.md)")
