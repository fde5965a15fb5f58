"""Real servers for the test suite: redis-server processes started and stopped by the tests themselves."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Self

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")


def child_env(**settings: str) -> dict[str, str]:
    """The environment of a process a test starts: this interpreter's import path, ``settings``, and no
    ``METERWARE_*`` or ``PROMETHEUS_*`` variable from outside."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("METERWARE_", "PROMETHEUS_"))}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    env.update(settings)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s") from None
            time.sleep(0.02)


def gunicorn_command(app: str, *options: str) -> list[str]:
    """The command line of a gunicorn serving ``app`` (``module:name`` or ``module:factory()``)."""
    from gunicorn.config import KNOWN_SETTINGS

    # Recent gunicorn opens a control socket at a fixed path in $HOME: concurrent servers would share it.
    if any(setting.name == "control_socket_disable" for setting in KNOWN_SETTINGS):
        options += ("--no-control-socket",)
    return [sys.executable, "-m", "gunicorn", *options, app]


class ServerProcess:
    """A real server process (uvicorn, gunicorn...) on a loopback port, its output in a file."""

    def __init__(self, args: list[str], env: dict[str, str], port: int, log: Path) -> None:
        self.port = port
        self.log = log
        # Output goes to a file: a pipe nobody reads would block the server once it fills up.
        with open(log, "wb") as output:
            self.process = subprocess.Popen(args, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            wait_for_port(port, timeout=20)
        except TimeoutError:
            self.stop(signal.SIGKILL)
            raise RuntimeError(f"server did not start:\n{self.output()}") from None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM) -> str:
        """Stop the server (SIGTERM: graceful, the lifespan drains the buffer) and return its output."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        self.process.wait(timeout=30)
        return self.output()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class RedisServer:
    """One redis-server process on a loopback port, in its own temporary directory."""

    def __init__(self, *extra: str, port: int | None = None, config: str | None = None) -> None:
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not installed (the README's test command installs it)")
        self.binary = REDIS_SERVER
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="mw-redis-"))
        self.extra = extra
        #: Text of a config file given first on the command line (a sentinel needs one it can rewrite).
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Self:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        if self.config is not None:
            config = self.dir / "redis.conf"
            config.write_text(self.config)
            args.insert(1, str(config))
        args += ["--save", "", "--appendonly", "no", *self.extra]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def redis_server(*extra: str) -> Iterator[RedisServer]:
    server = RedisServer(*extra).start()
    try:
        yield server
    finally:
        server.cleanup()


def redis_cli(*args: str, timeout: float = 30.0) -> str:
    if REDIS_CLI is None:
        raise RuntimeError("redis-cli is not installed (it comes with redis-server)")
    done = subprocess.run([REDIS_CLI, *args], capture_output=True, text=True, timeout=timeout, check=True)
    return done.stdout


def info_fields(text: str) -> dict[str, str]:
    """The ``name:value`` lines of an ``INFO`` or ``CLUSTER INFO`` reply, as redis-cli prints it."""
    return dict(line.strip().split(":", 1) for line in text.splitlines() if ":" in line)


class RedisClusterServers:
    """A real Redis Cluster: ``size`` primaries holding the slots, each with ``replicas`` replicas."""

    def __init__(self, size: int = 3, replicas: int = 0) -> None:
        self.replicas = replicas
        self.nodes = [
            RedisServer(
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "5000",
                "--cluster-port", str(free_port()),  # port + 10000 may be out of range
                "--repl-diskless-sync-delay", "0",  # replicas sync at once, not after 5 s
            )
            for _ in range(size * (1 + replicas))
        ]  # fmt: skip

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def start(self, timeout: float = 30.0) -> RedisClusterServers:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        redis_cli(
            "--cluster", "create", *addresses, "--cluster-replicas", str(self.replicas), "--cluster-yes"
        )
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            while not self._ready(node):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the cluster is not ready after {timeout}s")
                time.sleep(0.05)
        return self

    def _ready(self, node: RedisServer) -> bool:
        """Whether ``node`` sees the whole cluster up and, as a replica, holds its primary's data."""
        cluster = info_fields(redis_cli("-p", str(node.port), "cluster", "info"))
        if cluster["cluster_state"] != "ok" or cluster["cluster_known_nodes"] != str(len(self.nodes)):
            return False
        replication = info_fields(redis_cli("-p", str(node.port), "info", "replication"))
        if replication["role"] == "master":
            return replication["connected_slaves"] == str(self.replicas)
        return replication["master_link_status"] == "up" and replication["master_sync_in_progress"] == "0"

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()


@contextmanager
def redis_cluster(size: int = 3, replicas: int = 0) -> Iterator[RedisClusterServers]:
    """A Redis Cluster of ``size`` primaries with ``replicas`` replicas each (none by default), created
    with ``redis-cli --cluster create``: every replica is connected and in sync when it is yielded."""
    cluster = RedisClusterServers(size, replicas)
    try:
        yield cluster.start()
    finally:
        cluster.cleanup()


@contextmanager
def redis_sentinel(master: RedisServer, service: str = "mymaster") -> Iterator[RedisServer]:
    """A Redis Sentinel watching ``master`` as ``service`` (quorum 1)."""
    config = f"sentinel monitor {service} 127.0.0.1 {master.port} 1\n"
    server = RedisServer("--sentinel", config=config).start()
    try:
        yield server
    finally:
        server.cleanup()
