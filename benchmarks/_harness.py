"""What every benchmark needs around the code it measures: cores, servers, wrk, RSS and the machine."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from tests.servers import RedisServer, free_port, gunicorn_command, wait_for_port

from benchmarks import ROOT, SRC

__all__ = [
    "LOAD_CPU",
    "SERVER_CPU",
    "OthersClock",
    "RedisServer",
    "Retries",
    "Server",
    "WrkResult",
    "checkout",
    "child_env",
    "cpu_seconds",
    "cpu_times",
    "free_port",
    "load_average",
    "machine",
    "pin_process",
    "pinned",
    "rss_mib",
    "short_commit",
    "tree_cpu_seconds",
    "wrk",
]

_TICK = os.sysconf("SC_CLK_TCK")
#: The core the measured server runs on, and the one the load generator (and Redis) run on.
SERVER_CPU = 0
LOAD_CPU = 1
LIBRARIES = (
    "starlette",
    "fastapi",
    "uvicorn",
    "uvloop",
    "httptools",
    "flask",
    "werkzeug",
    "gunicorn",
    "redis",
    "hiredis",
    "msgpack",
    "prometheus-client",
    "py-spy",
    "limits",
    "flask-limiter",
    "prometheus-fastapi-instrumentator",
)


def _can_pin() -> bool:
    try:
        cores = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return False
    return shutil.which("taskset") is not None and {SERVER_CPU, LOAD_CPU} <= cores


CAN_PIN = _can_pin()


def pinned(cpu: int) -> list[str]:
    """The command prefix that runs a program on ``cpu`` (nothing where pinning is impossible)."""
    return ["taskset", "-c", str(cpu)] if CAN_PIN else []


def pin_process(pid: int, cpus: str) -> None:
    """Move a running process (all its threads) to ``cpus``, e.g. ``"1"`` or ``"0,1"``."""
    if CAN_PIN:
        subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], check=True, capture_output=True)


def child_env(src: Path = SRC, **extra: str) -> dict[str, str]:
    """The environment of a server process: the meterware of ``src`` (this tree's by default) and this
    tree's benchmarks first, whatever is installed."""
    path = os.pathsep.join(filter(None, [str(src), str(ROOT), os.environ.get("PYTHONPATH")]))
    return {
        **os.environ,
        "PYTHONPATH": path,
        "PYTHONDONTWRITEBYTECODE": "1",
        "BENCH_METERWARE_SRC": str(src),
        **extra,
    }


@contextlib.contextmanager
def checkout(revision: str) -> Iterator[tuple[str, Path]]:
    """A temporary ``git worktree`` of ``revision`` of this repository: its short hash and its ``src/``."""
    short = short_commit(revision)
    tree = Path(tempfile.mkdtemp(prefix=f"mw-baseline-{short}-"))
    _git("worktree", "add", "--detach", str(tree), short)
    try:
        yield short, tree / "src"
    finally:
        _git("worktree", "remove", "--force", str(tree))
        shutil.rmtree(tree, ignore_errors=True)


def short_commit(revision: str) -> str:
    """The short hash of ``revision`` of this repository (RuntimeError if there is no such commit)."""
    return _git("rev-parse", "--short", f"{revision}^{{commit}}")


def _git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


# -- wrk ---------------------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
#: A wrk script whose requests take turns through ``keys`` (Lua strings) in their Authorization header.
_TURNS = """\
local keys = {{{keys}}}
local turn = 0
request = function()
  turn = turn % #keys + 1
  return wrk.format(nil, nil, {{["Authorization"] = keys[turn]}})
end
"""


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests_per_second: float
    #: The 99th percentile of wrk's latency distribution, in milliseconds.
    p99_ms: float
    requests: int


def wrk(
    url: str, seconds: int, *, key: str | None = None, keys: Sequence[str] = (), connections: int = 32
) -> WrkResult:
    """Load ``url`` with ``wrk -t1 -cN --latency`` on the load core; fail on any error or non-2xx answer.

    ``key``: every request bears it; ``keys``: the requests take turns through them (many customers).
    """
    args = [*pinned(LOAD_CPU), "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if key:
        args += ["-H", f"Authorization: Bearer {key}"]
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        if keys:
            script.write(_TURNS.format(keys=", ".join(f'"Bearer {one}"' for one in keys)))
            script.flush()
            args += ["-s", script.name]
        output = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
    if match := re.search(r"Non-2xx or 3xx responses: (\d+)", output):
        raise RuntimeError(f"{match[1]} refused or failed responses in a benchmark run:\n{output}")
    if match := re.search(r"Socket errors: (.*)", output):
        raise RuntimeError(f"socket errors in a benchmark run ({match[1]}):\n{output}")
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
    count = re.search(r"(\d+) requests in", output)
    if not (rate and p99 and count):
        raise RuntimeError(f"cannot read wrk's output:\n{output}")
    return WrkResult(float(rate[1]), float(p99[1]) * _UNITS[p99[2]], int(count[1]))


# -- server processes --------------------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    """Resident set size of a process, in MiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU time a process (all its threads) has used so far, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def cpu_seconds(pid: int) -> float:
    """CPU time a process (all its threads) has used so far."""
    return sum(cpu_times(pid))


def tree_cpu_seconds(pid: int) -> float:
    """CPU time a process and its living descendants have used so far."""
    total, pending = 0.0, [pid]
    while pending:
        one = pending.pop()
        with contextlib.suppress(FileNotFoundError):
            total += cpu_seconds(one)
        pending += _children(one)
    return total


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(child) for child in text.split()]


class Server:
    """One server process on a loopback port, pinned to the server core; stopped gracefully.

    ``pid`` is the process that serves (gunicorn's worker, not its arbiter), whose RSS is measured.
    """

    def __init__(
        self, args: Sequence[str], port: int, env: dict[str, str], *, forks_worker: bool, pin: bool = True
    ) -> None:
        self.port = port
        prefix = pinned(SERVER_CPU) if pin else []
        self.process = subprocess.Popen([*prefix, *args], env=env, cwd=ROOT)
        try:
            wait_for_port(port, timeout=30)
            self.pid = self.process.pid
            if forks_worker:
                deadline = time.monotonic() + 10
                while not (children := _children(self.process.pid)):
                    if time.monotonic() > deadline:
                        raise RuntimeError("the server started no worker process")
                    time.sleep(0.02)
                self.pid = children[0]
        except BaseException:
            self.stop()
            raise

    @classmethod
    def uvicorn(cls, factory: str, env: dict[str, str], *, workers: int = 1, pin: bool = True) -> Server:
        """uvicorn as a production user runs it: uvloop, httptools, no access log, ``workers`` processes
        (more than one: ``pid`` is their parent; ``tree_cpu_seconds`` counts them all)."""
        port = free_port()
        args = [sys.executable, "-m", "uvicorn", "--factory", factory, "--port", str(port)]
        args += ["--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"]
        if workers > 1:
            args += ["--workers", str(workers)]
        return cls(args, port, env, forks_worker=False, pin=pin)

    @classmethod
    def gunicorn(cls, factory: str, worker_class: str, threads: int, env: dict[str, str]) -> Server:
        """gunicorn with one worker of ``worker_class`` (sync or gthread)."""
        port = free_port()
        options = ["--workers", "1", "--worker-class", worker_class, "--threads", str(threads)]
        options += ["--bind", f"127.0.0.1:{port}", "--log-level", "warning"]
        return cls(gunicorn_command(f"{factory}()", *options), port, env, forks_worker=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str, key: str | None = None) -> tuple[int, dict[str, str], str]:
        """One request from this process: status, headers (lower-case names) and body."""
        request = urllib.request.Request(self.url(path))
        if key:
            request.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                headers = {name.lower(): value for name, value in response.headers.items()}
                return response.status, headers, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, {}, error.read().decode()

    def stop(self) -> None:
        """SIGTERM, so the server drains its buffered events the way it would in production."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# -- the machine -------------------------------------------------------------------------------------


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


class OthersClock:
    """CPU used by processes other than this one and its descendants, in cores, since the clock started.

    The load average cannot tell: the suite itself keeps both cores busy. Interrupt time is left out
    (loopback traffic is accounted there, and belongs to nobody); time stolen by the hypervisor counts.
    """

    def __init__(self) -> None:
        self.started = time.monotonic()
        self._busy, self._ours = _busy_seconds(), _tree_seconds()

    def cores(self) -> float:
        """Cores' worth of CPU used by others on average so far (0.0 on a quiet machine)."""
        others = (_busy_seconds() - self._busy) - (_tree_seconds() - self._ours)
        return max(0.0, others / (time.monotonic() - self.started))


class Retries:
    """A run disturbed by other processes is measured again, twice at most, within a budget for the
    whole suite (so it stays bounded in time)."""

    def __init__(self, budget: int, max_others: float) -> None:
        self.left = budget
        self.max_others = max_others

    def again(self, others_cores: float, attempt: int) -> bool:
        if others_cores <= self.max_others or attempt >= 2 or self.left <= 0:
            return False
        self.left -= 1
        return True


def _busy_seconds() -> float:
    with open("/proc/stat") as stat:
        user, nice, system, _idle, _iowait, _irq, _softirq, steal = map(int, stat.readline().split()[1:9])
    return (user + nice + system + steal) / _TICK


def _tree_seconds() -> float:
    """CPU time of this process and all its descendants, those that ended and were waited for included."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    pending = _children(os.getpid())
    while pending:
        pid = pending.pop()
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except FileNotFoundError:
            continue
        # utime, stime, cutime, cstime (what it used, and what its waited-for children used)
        total += sum(int(value) for value in fields[11:15]) / _TICK
        pending += _children(pid)
    return total


def _cpu_model() -> str:
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    match = re.search(r"^Model name:\s+(.+)$", output, re.MULTILINE)
    return match[1].strip() if match else "unknown"


def _memory_gib() -> float:
    with open("/proc/meminfo") as meminfo:
        return int(meminfo.readline().split()[1]) / 1024**2


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "-"


def _redis_version() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        return "-"
    output = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"v=(\S+)", output)
    return match[1] if match else output.strip()


def _wrk_version() -> str:
    output = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout
    return output.split(" [")[0].strip() or "-"


def _commit() -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "-"
    return done.stdout.strip()


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    facts = {
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "memory": f"{_memory_gib():.0f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pinning": f"server on CPU {SERVER_CPU}, wrk and Redis on CPU {LOAD_CPU}" if CAN_PIN else "none",
        "redis-server": _redis_version(),
        "wrk": _wrk_version(),
        "meterware": _commit(),
    }
    facts.update((name, _version(name)) for name in LIBRARIES)
    return facts
