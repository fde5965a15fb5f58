"""Where a metered request's time goes: ``python -m benchmarks.profile {memory,strict}``.

Serves the metered Starlette app of the benchmarks in-process, driven by a minimal ASGI client (no HTTP
server, no sockets but Redis's) with 32 concurrent callers on uvloop, for a bounded number of requests:

1. times bare Starlette and the metered app without a profiler: CPU microseconds per request, and the
   time spent in the cyclic garbage collector (the collector stays off while py-spy samples);
2. samples the metered app with py-spy, attached after the warm-up, twice:

   * ``--nonblocking``: py-spy reads the stack of the running process. Unbiased, but most stacks come
     out torn, so only their top frame is used: **self time** by function (``profile-<mode>.self``);
   * blocking: py-spy stops the process for each sample. Whole stacks, but a stop takes effect where
     the process next returns from the kernel, so samples shift towards functions that make system
     calls; fine for the **inclusive** time of the phases, and for the flame graph
     (``profile-<mode>.collapsed``, ``profile-<mode>.svg``).

The shares of the samples are turned into microseconds with the CPU time per request measured without a
profiler, and written to ``profile-<mode>.txt`` in ``--out``. ``--profiler pyinstrument`` writes
pyinstrument's HTML and text reports instead.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks import ROOT
from benchmarks._harness import LOAD_CPU, RedisServer, child_env, pin_process
from benchmarks.apps import config_text, create_customer, starlette_bare, starlette_metered
from meterware import Accounts, Config

OUT = ROOT / "benchmarks" / "profiles"
WARMUP_REQUESTS = 2000
SPY = ["py-spy", "record", "--nolineno"]

# -- the child: the app, in-process --------------------------------------------------------------------

Message = dict[str, Any]


async def _call(app: Any, headers: list[tuple[bytes, bytes]], failures: list[int]) -> None:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/v1/hello",
        "raw_path": b"/v1/hello",
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }

    # Like uvicorn: the body first; then receive() waits until the response is complete (or the client
    # leaves) and says http.disconnect.
    requested = False
    complete = asyncio.Event()

    async def receive() -> Message:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await complete.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            if message["status"] != 200:
                failures.append(message["status"])
        elif not message.get("more_body", False):
            complete.set()

    await app(scope, receive, send)


async def _caller(app: Any, headers: list[tuple[bytes, bytes]], count: int, failures: list[int]) -> None:
    for _ in range(count):
        # A server gets each request from the event loop: without this, an app that never waits would
        # run a caller's calls back to back, and nothing else (the flusher) would run meanwhile.
        await asyncio.sleep(0)
        await _call(app, headers, failures)


async def drive(app: Any, key: str | None, requests: int, concurrency: int) -> None:
    """``requests`` calls of GET /v1/hello from ``concurrency`` callers at once; every one must be a 200."""
    headers = [(b"host", b"bench")]
    if key:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    failures: list[int] = []
    share, rest = divmod(requests, concurrency)
    await asyncio.gather(*(_caller(app, headers, share + (n < rest), failures) for n in range(concurrency)))
    if failures:
        raise RuntimeError(f"{len(failures)} calls were not answered 200, e.g. {failures[0]}")


class Lifespan:
    """The ASGI lifespan of ``app``, as a server runs it (meterware drains its events at shutdown)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.events: asyncio.Queue[Message] = asyncio.Queue()
        self.replies: asyncio.Queue[Message] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    async def _send(self, message: Message) -> None:
        await self.replies.put(message)

    async def startup(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self.task = asyncio.create_task(self.app(scope, self.events.get, self._send))
        await self.events.put({"type": "lifespan.startup"})
        await self.replies.get()

    async def shutdown(self) -> None:
        await self.events.put({"type": "lifespan.shutdown"})
        await self.replies.get()
        assert self.task is not None
        await self.task


def _wait_for_start() -> None:
    """Block until the parent says go (py-spy is attached by then)."""
    print("ready", flush=True)
    sys.stdin.readline()


class CollectorClock:
    """Time spent in the cyclic garbage collector, and its collections per generation."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = [0, 0, 0]
        #: The longest collection (a pause of the event loop), in seconds.
        self.longest = 0.0
        self._began = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            pause = time.perf_counter() - self._began
            self.seconds += pause
            self.longest = max(self.longest, pause)
            self.collections[info["generation"]] += 1

    def __enter__(self) -> CollectorClock:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        gc.callbacks.remove(self)


async def _child(mode: str, requests: int, concurrency: int, wait: bool) -> dict[str, Any]:
    app = starlette_bare() if mode == "bare" else starlette_metered()
    lifespan = Lifespan(app)
    await lifespan.startup()
    key = os.environ.get("BENCH_KEY")
    if mode == "memory":
        _, key = create_customer(Accounts.open(Config.load(os.environ["METERWARE_CONFIG"])))
    await drive(app, key, WARMUP_REQUESTS, concurrency)
    if wait:
        # Under the profiler the collector stays off: its samples would land on whatever allocation set
        # it off (no cycle is left per request); its time is measured in the runs without a profiler.
        gc.disable()
        _wait_for_start()
    with CollectorClock() as collector:
        cpu, wall = time.process_time(), time.perf_counter()
        await drive(app, key, requests, concurrency)
        await lifespan.shutdown()  # the events still buffered are part of the requests' cost
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {
        "requests": requests,
        "cpu_us": cpu / requests * 1e6,
        "rate": requests / wall,
        "gc_us": collector.seconds / requests * 1e6,
        "gc_collections": collector.collections,
        "gc_longest_ms": collector.longest * 1e3,
    }


def child_main(mode: str, requests: int, concurrency: int, wait: bool, profiler: str | None) -> None:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        if profiler == "pyinstrument":
            from pyinstrument import Profiler

            session = Profiler(async_mode="disabled", interval=0.0005)
            result = runner.run(_profiled(session, mode, requests, concurrency))
        else:
            result = runner.run(_child(mode, requests, concurrency, wait))
    print(json.dumps(result), flush=True)


async def _profiled(session: Any, mode: str, requests: int, concurrency: int) -> dict[str, Any]:
    session.start()
    result = await _child(mode, requests, concurrency, False)
    session.stop()
    out = Path(os.environ["BENCH_PROFILE_OUT"])
    (out / f"profile-{mode}.pyinstrument.html").write_text(session.output_html())
    (out / f"profile-{mode}.pyinstrument.txt").write_text(session.output_text(unicode=True, show_all=False))
    return result


# -- the parent: setup, runs, py-spy and the report ----------------------------------------------------


def _run_child(mode: str, args: argparse.Namespace, env: dict[str, str]) -> Any:
    command = [sys.executable, "-m", "benchmarks.profile", mode, "--child"]
    command += ["--requests", str(args.requests), "--concurrency", str(args.concurrency)]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the {mode} run failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def _record(mode: str, args: argparse.Namespace, env: dict[str, str], output: Path, *options: str) -> Any:
    """One metered run under ``py-spy record``, attached once the child has warmed up."""
    command = [sys.executable, "-m", "benchmarks.profile", mode, "--child", "--wait"]
    command += ["--requests", str(args.requests), "--concurrency", str(args.concurrency)]
    child = subprocess.Popen(
        command, env=env, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdin is not None
    assert child.stdout is not None
    try:
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the {mode} run did not start")
        spy = subprocess.Popen(
            [*SPY, *options, "--pid", str(child.pid), "--rate", str(args.rate), "--output", str(output)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        time.sleep(1.0)  # py-spy attaches
        child.stdin.write("go\n")
        child.stdin.flush()
        result = json.loads(child.stdout.readline())
        child.wait(60)
        log, _ = spy.communicate(timeout=60)
        if spy.returncode or not output.exists():
            raise RuntimeError(f"py-spy failed:\n{log}")
        return result
    finally:
        if child.poll() is None:
            child.kill()


def _stacks(collapsed: Path) -> Iterator[tuple[list[tuple[str, str]], int]]:
    """The stacks of a py-spy raw profile, root first, as (function, file) frames, with their samples."""
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack.strip():
            continue
        frames = []
        for frame in stack.split(";"):
            function, _, where = frame.rpartition(" (")
            frames.append((function, where.rstrip(")")))
        # The child waiting for the go is idle, not part of any request.
        if not any(function == "_wait_for_start" for function, _ in frames):
            yield frames, int(count)


def _package(path: str) -> str:
    return path.split("/", 1)[0] if "/" in path else path.removesuffix(".py")


APP = "the app: Starlette routing, middleware, endpoint, JSON response"
DRIVER = "the driver (in-process ASGI client)"
#: Functions of this module at the bottom of every stack: not the driver's cost.
_ROOTS = frozenset({"<module>", "main", "child_main", "_profiled"})
#: What the top frame's package is called in the self-time summary.
LIBRARIES = {
    "meterware": "meterware",
    "redis": "redis-py (the client)",
    "asyncio": "asyncio (tasks, timeouts, streams)",
    "": "uvloop and other C code (no Python frame on top)",
    "starlette": APP,
    "json": APP,
    "fastapi": APP,
    "prometheus_client": "prometheus-client (metrics)",
    "msgpack": "msgpack (event codec)",
}


def _library(path: str) -> str:
    package = _package(path)
    if path.startswith("benchmarks/"):
        return APP if path == "benchmarks/apps.py" else DRIVER
    return LIBRARIES.get(package, "Python's standard library and the rest")


def _bucket(frames: list[tuple[str, str]]) -> str:
    """Who a sample is charged to: the innermost meterware function, the app, the driver, or the rest."""
    for function, path in reversed(frames):
        package = _package(path)
        if package == "meterware":
            return f"{function} ({path})"
        if package in ("starlette", "fastapi") or path == "benchmarks/apps.py":
            return APP
        if path == "benchmarks/profile.py" and function not in _ROOTS:
            return DRIVER
    # Callbacks and tasks the event loop runs with no meterware frame under them (a driver's own tasks).
    named = [_package(path) for _, path in frames if path and not path.startswith(("<", "benchmarks/"))]
    inner = next((name for name in reversed(named) if name != "asyncio"), None)
    if inner is None:
        return "the event loop (uvloop's C code, asyncio)"
    return f"{inner} in event-loop callbacks and tasks of its own"


Costs = list[tuple[str, float]]


def _scaled(counter: Counter[str], cpu_us: float) -> Costs:
    total = sum(counter.values())
    return [(name, count / total * cpu_us) for name, count in counter.most_common()]


def self_time(collapsed: Path, cpu_us: float) -> tuple[Costs, Costs]:
    """By library and by function: ``cpu_us`` spread over the top frames of a non-blocking profile."""
    libraries: Counter[str] = Counter()
    functions: Counter[str] = Counter()
    for frames, count in _stacks(collapsed):
        function, path = frames[-1]
        library = _library(path)
        libraries[library] += count
        functions[f"{function} ({path})" if path else "C code (no Python frame on top)"] += count
    return _scaled(libraries, cpu_us), _scaled(functions, cpu_us)


def whole_stacks(collapsed: Path, cpu_us: float) -> tuple[Costs, Costs]:
    """By innermost meterware function (libraries it calls included), and inclusive by meterware function
    (the app left out): ``cpu_us`` spread over the stacks of a blocking profile."""
    innermost: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for frames, count in _stacks(collapsed):
        total += count
        bucket = _bucket(frames)
        innermost[bucket] += count
        if bucket not in (APP, DRIVER):
            for name in {
                f"{function} ({path})" for function, path in frames if _package(path) == "meterware"
            }:
                inclusive[name] += count
    return _scaled(innermost, cpu_us), [
        (name, count / total * cpu_us) for name, count in inclusive.most_common()
    ]


def _gc(timing: dict[str, Any]) -> str:
    per_thousand = "/".join(f"{count * 1000 / timing['requests']:.1f}" for count in timing["gc_collections"])
    return (
        f"GC {timing['gc_us']:.1f} us (gen0/1/2 collections per 1000 requests: {per_thousand};"
        f" longest pause {timing.get('gc_longest_ms', 0):.1f} ms)"
    )


GC = "the cyclic garbage collector (measured without the profiler)"


def _lines(costs: Costs, top: int) -> list[str]:
    return [f"  {cost:8.2f} us  {name}" for name, cost in costs[:top]]


def report(mode: str, timings: dict[str, Any], out: Path, top: int) -> str:
    bare, metered = timings["bare"], timings["metered"]
    # py-spy slows the process down: its shares are applied to the time measured without it.
    sampled = metered["cpu_us"] - metered["gc_us"]
    gc_line = (GC, metered["gc_us"])
    libraries, functions = self_time(out / f"profile-{mode}.self", sampled)
    innermost, inclusive = whole_stacks(out / f"profile-{mode}.collapsed", sampled)
    libraries = sorted([*libraries, gc_line], key=lambda item: -item[1])
    functions = sorted([*functions, gc_line], key=lambda item: -item[1])
    innermost = sorted([*innermost, gc_line], key=lambda item: -item[1])
    lines = [
        f"meterware profile, mode {mode}: {metered['requests']:,} requests from 32 concurrent callers",
        "",
        "CPU time per request without a profiler, the app driven in-process (no HTTP server):",
        f"  bare Starlette      {bare['cpu_us']:7.1f} us  ({bare['rate']:,.0f} req/s); {_gc(bare)}",
        f"  metered ({mode:<6})    {metered['cpu_us']:7.1f} us  ({metered['rate']:,.0f} req/s);"
        f" {_gc(metered)}",
        f"  meterware adds      {metered['cpu_us'] - bare['cpu_us']:7.1f} us",
        "",
        f"Self time per request by library ({metered['cpu_us']:.1f} us; py-spy --nonblocking, the GC off):",
        *_lines(libraries, top),
        "",
        "Self time per request by function (py-spy --nonblocking):",
        *_lines(functions, top),
        "",
        "Per request by innermost meterware function on the stack, the libraries it calls included",
        "(py-spy blocking: whole stacks, but samples drift towards system calls):",
        *_lines(innermost, top),
        "",
        "Inclusive time per request of meterware functions (py-spy blocking; the app left out):",
        *_lines(inclusive, top),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["memory", "strict", "lease", "bare"])
    parser.add_argument("--requests", type=int, default=30_000, help="requests per run (%(default)s)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rate", type=int, default=1000, help="py-spy samples per second (%(default)s)")
    parser.add_argument("--top", type=int, default=20, help="lines of each top list (%(default)s)")
    parser.add_argument("--out", type=Path, default=OUT, help="where the reports go (%(default)s)")
    parser.add_argument("--profiler", choices=["py-spy", "pyinstrument"], default="py-spy")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the report from the files of the last run"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--wait", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        profiler = os.environ.get("BENCH_PROFILER")
        child_main(args.mode, args.requests, args.concurrency, args.wait, profiler)
        return 0
    if args.mode == "bare":
        parser.error("profile a metered mode: memory or strict")
    if args.report_only:
        timings = json.loads((args.out / f"profile-{args.mode}.json").read_text())
        text = report(args.mode, timings, args.out, args.top)
        (args.out / f"profile-{args.mode}.txt").write_text(text)
        print(text)
        return 0
    if args.profiler == "py-spy" and shutil.which("py-spy") is None:
        parser.error("py-spy is not installed (pip install py-spy), or use --profiler pyinstrument")
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="mw-profile-"))
    redis = RedisServer().start() if args.mode in ("strict", "lease") else None
    try:
        return _profile(args, workdir, redis)
    finally:
        if redis is not None:
            redis.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


def _profile(args: argparse.Namespace, workdir: Path, redis: RedisServer | None) -> int:
    config = workdir / "profile.toml"
    config.write_text(
        config_text(
            storage=redis.url if redis else "memory://",
            spool=workdir / "spool",
            admission="lease" if args.mode == "lease" else "strict",
        )
    )
    env = child_env(METERWARE_CONFIG=str(config), BENCH_PROFILE_OUT=str(args.out))
    if redis is not None:
        assert redis.process is not None
        pin_process(redis.process.pid, str(LOAD_CPU))
        accounts = Accounts.open(Config.from_file(config))
        env["BENCH_KEY"] = create_customer(accounts)[1]
        accounts.close()
    say: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    say(f"timing bare Starlette and the metered app ({args.mode}), {args.requests:,} requests each")
    timings = {"bare": _run_child("bare", args, env), "metered": _run_child(args.mode, args, env)}
    if args.profiler == "pyinstrument":
        say("profiling with pyinstrument")
        _run_child(args.mode, args, {**env, "BENCH_PROFILER": "pyinstrument"})
        say(f"wrote {args.out}/profile-{args.mode}.pyinstrument.html and .txt")
        return 0
    name = args.out / f"profile-{args.mode}"
    say("profiling with py-spy: non-blocking, blocking, then the flame graph")
    _record(args.mode, args, env, name.with_suffix(".self"), "--nonblocking", "--format", "raw")
    _record(args.mode, args, env, name.with_suffix(".collapsed"), "--format", "raw")
    _record(args.mode, args, env, name.with_suffix(".svg"), "--format", "flamegraph")
    name.with_suffix(".json").write_text(json.dumps(timings, indent=2))
    text = report(args.mode, timings, args.out, args.top)
    name.with_suffix(".txt").write_text(text)
    print(text)
    say(f"wrote {name}.txt, .svg (flame graph), .self and .collapsed (raw stacks), .json (timings)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
