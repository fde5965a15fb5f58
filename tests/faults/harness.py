"""The fault suite's tools: Redis and app processes it can kill, a load generator, and the books.

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
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from meterware import Accounts, Config
from meterware.events import UsageEvent, decode_batch
from meterware.keys import NewKey
from meterware.metering.records import Customer, KeyRecord
from meterware.metering.spool import Spool
from meterware.rollup.aggregate import parse_entry
from meterware.storage import _keyspace, open_storage
from tests.e2e.conftest import ServerProcess
from tests.servers import RedisServer, free_port

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


def base_config(url: str, spool_dir: Path) -> dict[str, Any]:
    """The configuration the fault tests start from (tests replace single settings)."""
    return {
        "storage": {"url": url, "shards": SHARDS},
        "meters": {
            "calls": {"aggregation": "count"},
            "tokens": {"aggregation": "sum", "source": "handler"},
            "rows": {"aggregation": "sum", "source": "handler"},  # counted, never priced
        },
        "plans": {
            "payg": {
                "prepaid": True,
                "meters": {"calls": {"price": "0.01"}, "tokens": {"price": "0.0001"}},
            },
        },
        "routes": {"exclude": ["/health", "/metrics"]},
        "policy": {
            "on_backend_error": "open",
            "timeout": TIMEOUT,
            "reservation_timeout": 2.0,
            "key_cache_ttl": 10.0,
        },
        "pipeline": {
            "flush_interval": 0.05,
            "flush_timeout": 1.0,
            "batch_size": 200,
            "spool_dir": str(spool_dir),
        },
        "rollup": {"lease_seconds": 1.0},
    }


def merged(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with the settings of ``changes`` (one level deep: sections are merged, not replaced)."""
    result = dict(base)
    for section, values in changes.items():
        if isinstance(values, Mapping) and isinstance(result.get(section), Mapping):
            result[section] = {**result[section], **values}
        else:
            result[section] = values
    return result


def to_toml(data: Mapping[str, Any]) -> str:
    """A TOML document for a configuration (tables of tables, strings, numbers, booleans, lists)."""
    lines: list[str] = []

    def value(item: Any) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, int | float):
            return repr(item)
        if isinstance(item, str):
            return json.dumps(item)
        if isinstance(item, list):
            return "[" + ", ".join(value(element) for element in item) + "]"
        raise TypeError(f"cannot write {item!r} as TOML")

    def table(prefix: str, content: Mapping[str, Any]) -> None:
        scalars = {k: v for k, v in content.items() if not isinstance(v, Mapping)}
        if prefix:
            lines.append(f"[{prefix}]")
        lines.extend(f"{json.dumps(k)} = {value(v)}" for k, v in scalars.items())
        for key, sub in content.items():
            if isinstance(sub, Mapping):
                table(f"{prefix}.{json.dumps(key)}" if prefix else json.dumps(key), sub)

    table("", data)
    return "\n".join(lines) + "\n"


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


def base_env(config_path: Path, **extra: str) -> dict[str, str]:
    """The environment of the app and worker processes (no METERWARE_* from outside leaks in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("METERWARE_", "PROMETHEUS_"))}
    env["METERWARE_CONFIG"] = str(config_path)
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    env.update(extra)
    return env


def _gunicorn(*options: str) -> list[str]:
    from gunicorn.config import KNOWN_SETTINGS

    # Recent gunicorn opens a control socket at a fixed path in $HOME: concurrent servers would share it.
    if any(setting.name == "control_socket_disable" for setting in KNOWN_SETTINGS):
        options += ("--no-control-socket",)
    return [sys.executable, "-m", "gunicorn", *options]


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
        return _gunicorn(
            "--workers", str(self.workers), "--worker-class", "gthread", "--threads", "4",
            "--graceful-timeout", "10",
            "--bind", f"127.0.0.1:{self.port}", *self.options, "tests.faults.wsgi_server:app",
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


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition: each sample as written (``name{labels}``), and each name summed over
    its labels."""
    samples: dict[str, float] = Counter()
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


# -- the books ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Stream:
    """Every event in the shard streams of a Redis database, with its cost and batch id."""

    events: list[UsageEvent]
    costs: list[int]
    entries: int
    batch_ids: list[str]

    @classmethod
    def read(cls, client: redis.Redis, *, valid_only: bool = False) -> Stream:
        """Decode every entry (``valid_only``: every entry the rollup would accept; skip the others)."""
        events: list[UsageEvent] = []
        costs: list[int] = []
        batch_ids: list[str] = []
        entries = 0
        for shard in range(SHARDS):
            for _, fields in client.xrange(_keyspace.events(shard)):
                if valid_only and isinstance(parse_entry(fields, {}), str):
                    continue
                entries += 1
                batch = decode_batch(fields[b"b"])
                events += batch
                costs += [int(cost) for cost in fields[b"c"].split(b",")] if fields[b"c"] else []
                batch_ids.append(fields[b"i"].decode())
        return cls(events, costs, entries, batch_ids)

    def assert_no_duplicates(self) -> None:
        """Each batch appended once, each event once, each request (unique path) recorded once."""
        assert len(set(self.batch_ids)) == len(self.batch_ids), "a batch was appended twice"
        ids = Counter(event.id for event in self.events)
        assert not [i for i, n in ids.items() if n > 1], "an event is in the stream twice"
        paths = Counter(event.route for event in self.events)
        assert not [p for p, n in paths.items() if n > 1], "a request has two events"

    def paths(self, outcome: str) -> set[str]:
        return {event.route for event in self.events if event.outcome == outcome}

    def charged(self) -> int:
        return sum(self.costs)


def spooled_events(spool_dir: Path) -> list[UsageEvent]:
    """Events waiting in a spool directory (read without replaying them)."""
    spool = Spool(spool_dir, 1 << 40)
    events: list[UsageEvent] = []
    for path in spool.pending():
        batch = spool.read(path)
        if batch is not None:
            events += decode_batch(batch.payload)
    return events


def spool_bytes(spool_dir: Path) -> int:
    """Bytes waiting in a spool that the app may be replaying meanwhile (a listed file may be gone)."""
    total = 0
    for path in spool_dir.glob("*.batch") if spool_dir.exists() else ():
        with contextlib.suppress(FileNotFoundError):
            total += path.stat().st_size
    return total


@dataclass(slots=True)
class Books:
    """What the backend says about the customer once everything is rolled up."""

    calls: dict[str, int]
    tokens: int
    spend: int
    charged: int
    reserved: int


def books(accounts: Accounts, customer: str = CUSTOMER) -> Books:
    usage = accounts.usage(customer)
    balance = accounts.balance(customer)
    return Books(
        calls=usage.calls,
        tokens=usage.meters.get("tokens", 0),
        spend=usage.spend,
        charged=INITIAL_MICROS - balance.balance,
        reserved=balance.reserved,
    )


def assert_exact(stream: Stream, ledger: Books, succeeded: set[str], *, tokens: int = 0) -> None:
    """The promise: client-seen successes == successful calls in the rollup == calls charged, once each."""
    stream.assert_no_duplicates()
    assert stream.paths("success") == succeeded, (
        f"{len(succeeded - stream.paths('success'))} successes without an event, "
        f"{len(stream.paths('success') - succeeded)} events of calls the client did not see succeed"
    )
    assert ledger.calls["success"] == len(succeeded)
    expected = len(succeeded) * CALL_PRICE + tokens * TOKEN_PRICE
    assert ledger.spend == stream.charged() == ledger.charged == expected
    assert ledger.reserved == 0, "reservations left open"


# -- customers ---------------------------------------------------------------------------------------------


def open_accounts(config_path: Path, url: str | None = None) -> Accounts:
    """Accounts on the configured backend, or on ``url`` (Redis itself, when the app goes through a proxy)."""
    config = Config.from_file(config_path)
    return Accounts(open_storage(url or config.storage, shards=config.shards, timeout=10), config)


def provision(accounts: Accounts, customer: str = CUSTOMER) -> NewKey:
    """A customer on the ``payg`` plan with credits, and a live key."""
    accounts.create_customer(customer, plan="payg")
    accounts.grant_credits(customer, str(INITIAL_CREDITS))
    return accounts.create_key(customer)


def restore(accounts: Accounts, customer: Customer, key: NewKey) -> None:
    """Provision the same customer and key again on an empty backend (as a restore from backup would)."""
    accounts.storage.create_customer(customer)
    accounts.grant_credits(customer.id, str(INITIAL_CREDITS))
    record = KeyRecord(key.key_id, customer.id, key.prefix, key.live, "active", int(time.time()))
    accounts.storage.add_key(record, key.hash)


def figures(name: str, **values: Any) -> None:
    """Record a test's figures for docs/reliability.md (to ``$METERWARE_FAULTS_REPORT``, if set)."""
    target = os.environ.get("METERWARE_FAULTS_REPORT")
    line = json.dumps({"test": name, **values}, sort_keys=True, default=str)
    print(f"\nfigures: {line}")
    if target:
        with open(target, "a", encoding="utf-8") as report:
            report.write(line + "\n")
