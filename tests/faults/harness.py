"""The fault suite's tools: Redis and app processes it can kill, and a load generator.

Every process here is started by the test that signals it, and every signal goes to a PID it holds.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import redis

from tests.helpers import paths_cycling
from tests.servers import RedisServer, ServerProcess, child_env, free_port, gunicorn_command

SHARDS = 4
CUSTOMER = "acme"
#: Price of one call and of one token on the ``payg`` plan, in micro-credits.
CALL_PRICE = 10_000
TOKEN_PRICE = 100
INITIAL_CREDITS = 1_000  # credits
INITIAL_MICROS = INITIAL_CREDITS * 1_000_000
#: The request path's budget for one backend call in every fault test (seconds).
TIMEOUT = 0.2
#: No request may take longer than this, whatever the fault (a correctness bound, not a benchmark).
LATENCY_BOUND = TIMEOUT * 4 + 1.0


def wait_until(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> float:
    """Poll ``condition`` until it holds; return the seconds it took, fail the test after ``timeout``."""
    began = time.monotonic()
    while not condition():
        if time.monotonic() - began > timeout:
            pytest.fail(f"after {timeout}s: {what}")
        time.sleep(interval)
    return time.monotonic() - began


def rss_kib(pid: int) -> int:
    """Resident memory of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    """PIDs of the live child processes of ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces: the fields after it follow the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return sorted(found)


# -- Redis ----------------------------------------------------------------------------------------------


class FaultRedis(RedisServer):
    """A redis-server the test may kill, pause and restart on the same port, with or without persistence.

    ``persistent``: an append-only file fsynced at every write, so a SIGKILL loses nothing it answered.
    """

    def __init__(self, *, persistent: bool = False, password: str | None = None) -> None:
        extra = ["--enable-debug-command", "yes"]
        if persistent:
            extra += ["--appendonly", "yes", "--appendfsync", "always"]
        if password:
            extra += ["--requirepass", password]
        super().__init__(*extra)
        self.extra = (*self.extra, "--logfile", str(self.dir / "redis.log"))
        self.password = password
        self.persistent = persistent

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self, timeout: float = 10.0) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password, socket_timeout=timeout)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no save."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process = None

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
        super().stop()

    def log(self) -> str:
        path = self.dir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""


# -- the app and the worker -------------------------------------------------------------------------------


def base_env(config_path: Path) -> dict[str, str]:
    """The environment of the app and worker processes, configured by ``config_path``."""
    return child_env(METERWARE_CONFIG=str(config_path))


class App:
    """The metered fault app under a real server, restartable on one port: ``uvicorn`` (one process) or
    ``gunicorn`` (``workers`` gthread workers of 4 threads); ``options``: more command-line options."""

    def __init__(
        self,
        kind: str,
        env: dict[str, str],
        log_dir: Path,
        *,
        workers: int = 2,
        options: tuple[str, ...] = (),
    ) -> None:
        self.kind = kind
        self.options = options
        self.env = dict(env)
        self.log_dir = log_dir
        self.workers = workers
        self.port = free_port()
        self.starts = 0
        self.server: ServerProcess | None = None
        if kind == "gunicorn":
            metrics_dir = log_dir / "prometheus"
            metrics_dir.mkdir(exist_ok=True)
            self.env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        if self.kind == "uvicorn":
            return [
                sys.executable, "-m", "uvicorn", "tests.faults.asgi_server:app",
                "--port", str(self.port), "--log-level", "warning", *self.options,
            ]  # fmt: skip
        return gunicorn_command(
            "tests.faults.wsgi_server:app",
            "--workers", str(self.workers), "--worker-class", "gthread", "--threads", "4",
            "--graceful-timeout", "10", "--bind", f"127.0.0.1:{self.port}", *self.options,
        )  # fmt: skip

    def start(self) -> App:
        self.starts += 1
        log = self.log_dir / f"{self.kind}-{self.starts}.log"
        self.server = ServerProcess(self.command(), self.env, self.port, log)
        return self

    @property
    def pid(self) -> int:
        assert self.server is not None
        return self.server.process.pid

    def stop(self, sig: int = signal.SIGTERM) -> str:
        """Stop the server (SIGTERM: graceful) and return its output."""
        assert self.server is not None
        output = self.server.stop(sig)
        self.server = None
        return output

    def kill(self) -> None:
        """SIGKILL the whole server: no shutdown, no exit hooks."""
        assert self.server is not None
        workers = children(self.pid)
        self.server.process.send_signal(signal.SIGKILL)
        self.server.process.wait(timeout=10)
        for pid in workers:  # gunicorn workers notice their master died, but not at once
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.server = None

    def rss_kib(self) -> int:
        """Resident memory of the server and its worker processes."""
        return sum(rss_kib(pid) for pid in [self.pid, *children(self.pid)])

    def metrics_text(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=5).text

    def metrics(self) -> dict[str, float]:
        """The app's /metrics, by sample and summed over labels (see :func:`parse_metrics`)."""
        return parse_metrics(self.metrics_text())

    def logs(self) -> str:
        return "".join(
            path.read_text(errors="replace") for path in sorted(self.log_dir.glob(f"{self.kind}-*.log"))
        )

    def cleanup(self) -> None:
        if self.server is not None and self.server.process.poll() is None:
            self.kill()


def stream_fields(client: redis.Redis | redis.RedisCluster, key: str) -> list[dict[bytes, bytes]]:
    """The fields of each entry of a stream (bytes: the suite's clients do not decode responses)."""
    return [cast("dict[bytes, bytes]", fields) for _, fields in client.xrange(key) or ()]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition: each sample as written (``name{labels}``), and each name summed over
    its labels."""
    samples: defaultdict[str, float] = defaultdict(float)
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        name = sample.split("{", 1)[0]
        if sample != name:
            samples[sample] += float(value)
        samples[name] += float(value)
    return dict(samples)


class Worker:
    """A continuously running rollup worker process (``python -m meterware.rollup``, which logs at INFO)."""

    def __init__(self, env: dict[str, str], log: Path, *options: str) -> None:
        self.log = log
        with open(log, "wb") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "meterware.rollup", *options],
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    def terminate(self, timeout: float = 20) -> int:
        """SIGTERM (graceful: it finishes its step and releases its leases); return the exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def cleanup(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def rollup_once(env: dict[str, str], log: Path) -> str:
    """Run the worker ``--once`` to the end (refunding due reservations on the way); return its output."""
    with open(log, "ab") as output:
        done = subprocess.run(
            [sys.executable, "-m", "meterware.rollup", "--once"],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            timeout=60,
        )
    text = log.read_text(errors="replace")
    assert done.returncode == 0, text
    return text


# -- load ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Result:
    """What the client saw of one request."""

    path: str
    status: int | None  # None: no response (connection refused or cut)
    seconds: float
    body: bytes = b""
    error: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    #: ``time.monotonic()`` when the answer (or the failure) came.
    at: float = 0.0


#: The usual traffic: half successes, a quarter failing handlers, a quarter calls reporting 3 tokens each.
MIXED_PATHS = paths_cycling(["/v1/ok/{}", "/v1/ok/{}", "/v1/fail/{}", "/v1/tokens/{}?n=3"])


def tokens_of(paths: Iterable[str], per_call: int = 3) -> int:
    """The tokens reported by the calls to ``/v1/tokens/`` among ``paths`` (``per_call`` each)."""
    return per_call * sum(1 for path in paths if path.startswith("/v1/tokens/"))


#: Request numbers, unique in the test process (so two loads never send the same path).
_SEQUENCE = itertools.count()


class Load:
    """Client threads sending requests with unique paths until stopped (or ``limit`` requests are sent).

    ``path_of(n)`` makes the path of a request from a number no other request of the process gets.
    ``rate``: requests per second in all (None: as fast as the server answers).
    """

    def __init__(
        self,
        url: str,
        key: str,
        path_of: Callable[[int], str],
        *,
        threads: int = 4,
        limit: int = 50_000,
        rate: float | None = None,
        timeout: float = 15.0,
    ) -> None:
        self.url = url
        self.key = key
        self.path_of = path_of
        self.threads = threads
        self.limit = limit
        self.rate = rate
        self.timeout = timeout
        self.results: list[Result] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self._sent = 0

    def __enter__(self) -> Load:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._stop.clear()
        self._workers = [
            threading.Thread(target=self._run, name=f"load-{index}", daemon=True)
            for index in range(self.threads)
        ]
        for worker in self._workers:
            worker.start()

    def stop(self) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(self.timeout + 5)
        self._workers = []

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}"}
        interval = self.threads / self.rate if self.rate else 0.0
        next_at = time.monotonic()
        with httpx.Client(base_url=self.url, headers=headers, timeout=self.timeout) as client:
            while not self._stop.is_set():
                with self._lock:
                    if self._sent >= self.limit:
                        return
                    self._sent += 1
                    number = next(_SEQUENCE)
                path = self.path_of(number)
                began = time.perf_counter()
                try:
                    response = client.get(path)
                    result = Result(
                        path, response.status_code, time.perf_counter() - began, response.content,
                        headers=dict(response.headers), at=time.monotonic(),
                    )  # fmt: skip
                except httpx.HTTPError as error:
                    seconds = time.perf_counter() - began
                    result = Result(path, None, seconds, error=repr(error), at=time.monotonic())
                with self._lock:
                    self.results.append(result)
                if result.status is None:
                    time.sleep(0.02)  # the server is away: don't spin
                if interval:
                    next_at += interval
                    time.sleep(max(0.0, next_at - time.monotonic()))

    def snapshot(self) -> list[Result]:
        with self._lock:
            return list(self.results)

    def paths(self, status: int | None) -> set[str]:
        """Paths (without the query, as events record them) of the requests answered with ``status``."""
        return {result.path.split("?")[0] for result in self.snapshot() if result.status == status}

    def statuses(self) -> Counter[int | None]:
        return Counter(result.status for result in self.snapshot())

    def slowest(self) -> Result:
        return max(self.snapshot(), key=lambda result: result.seconds)


def figures(name: str, **values: Any) -> None:
    """Record a test's figures for docs/reliability.md (to ``$METERWARE_FAULTS_REPORT``, if set)."""
    target = os.environ.get("METERWARE_FAULTS_REPORT")
    line = json.dumps({"test": name, **values}, sort_keys=True, default=str)
    print(f"\nfigures: {line}")
    if target:
        with open(target, "a", encoding="utf-8") as report:
            report.write(line + "\n")
