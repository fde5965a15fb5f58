"""Real servers for the test suite: redis-server processes started and stopped by the tests themselves."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Self

import redis

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


class ReplicationLink:
    """A TCP relay on loopback carrying a replica's replication stream from its primary.

    ``stall()`` holds back what the primary sends from then on (the replica falls behind while both stay
    up, as over a slow link); ``cut()`` closes every connection and drops what was held back, as the
    primary's unsent output buffer dies with it.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._stalled = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._cut = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.held_bytes = 0
        threading.Thread(target=self._accept, name="replication-link", daemon=True).start()

    def stall(self) -> None:
        self._stalled.set()

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            sockets, self._sockets = [*self._sockets, self._listener], set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                replica, _ = self._listener.accept()
            except OSError:
                return  # cut
            try:
                primary = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                replica.close()  # the primary is gone: the replica will try again
                continue
            with self._lock:
                if self._cut:
                    replica.close()
                    primary.close()
                    return
                self._sockets |= {replica, primary}
            threading.Thread(target=self._pump, args=(primary, replica, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(replica, primary, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, stallable: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if stallable and self._stalled.is_set():
                    self.held_bytes += len(data)
                    continue
                target.sendall(data)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_RDWR)


class RedisSentinelGroup:
    """A real Sentinel deployment: a primary, one replica of it (through a :class:`ReplicationLink`) and
    three sentinels (quorum 2) watching it as ``service``, each sentinel with a config file it rewrites.

    ``down_after`` (ms): how long the primary may not answer before a sentinel thinks it down;
    ``failover_timeout`` (ms): as Sentinel's ``failover-timeout``. Every wait is bounded.
    """

    def __init__(
        self, service: str = "mymaster", *, down_after: int = 1000, failover_timeout: int = 5000
    ) -> None:
        self.service = service
        self.primary = self._node()
        self.link = ReplicationLink(self.primary.port)
        self.replica = self._node("--replicaof", "127.0.0.1", str(self.link.port))
        self._dead: list[RedisServer] = []
        settings = (
            f"sentinel monitor {service} 127.0.0.1 {self.primary.port} 2\n"
            f"sentinel down-after-milliseconds {service} {down_after}\n"
            f"sentinel failover-timeout {service} {failover_timeout}\n"
        )
        self.sentinels = [RedisServer("--sentinel", config=settings) for _ in range(3)]

    @staticmethod
    def _node(*options: str) -> RedisServer:
        # Diskless full syncs wait 5 s by default for more replicas to join: there is only one.
        return RedisServer("--repl-diskless-sync-delay", "0", *options)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}/0"

    def start(self, timeout: float = 30.0) -> Self:
        """Start the primary and the replica, wait until it is in sync, then the sentinels, and wait until
        each knows the replica and the two other sentinels."""
        deadline = time.monotonic() + timeout
        self.primary.start()
        self.replica.start()
        _wait(self.in_sync, deadline, "the replica is not in sync")
        for sentinel in self.sentinels:
            sentinel.start()

        def ready() -> bool:
            for sentinel in self.sentinels:
                with _client(sentinel.port) as client:
                    if len(client.execute_command("SENTINEL", "SENTINELS", self.service)) != 2:
                        return False
                    if len(client.execute_command("SENTINEL", "REPLICAS", self.service)) != 1:
                        return False
            return True

        _wait(ready, deadline, "the sentinels do not see each other and the replica")
        return self

    def in_sync(self) -> bool:
        """Whether the replica's link is up and it has everything the primary had written when asked."""
        with _client(self.primary.port) as primary, _client(self.replica.port) as replica:
            written = primary.info("replication")["master_repl_offset"]
            info = replica.info("replication")
        return bool(info.get("master_link_status") == "up" and info.get("slave_repl_offset", -1) >= written)

    def primary_address(self, sentinel: RedisServer) -> tuple[str, int] | None:
        """The primary as ``sentinel`` names it (``SENTINEL GET-MASTER-ADDR-BY-NAME``)."""
        with _client(sentinel.port) as client:
            address = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        return None if address is None else (address[0].decode(), int(address[1]))

    def kill_primary(self) -> int:
        """SIGKILL the primary (no shutdown, no save) and cut its replication link; return its PID."""
        assert self.primary.process is not None
        pid = self.primary.process.pid
        os.kill(pid, signal.SIGKILL)
        self.primary.process.wait(timeout=10)
        self.primary.process = None
        self.link.cut()
        return pid

    def wait_for_failover(self, timeout: float = 30.0) -> float:
        """Wait until every sentinel names the replica as the primary and it acts as one, then swap the
        roles (``replica`` is now the dead node); return the seconds it took."""
        began = time.monotonic()
        promoted = ("127.0.0.1", self.replica.port)

        def done() -> bool:
            if any(self.primary_address(sentinel) != promoted for sentinel in self.sentinels):
                return False
            with _client(self.replica.port) as client:
                return bool(client.info("replication")["role"] == "master")

        _wait(done, began + timeout, "no sentinel promoted the replica")
        self.primary, self.replica = self.replica, self.primary
        return time.monotonic() - began

    def rejoin(self, timeout: float = 30.0) -> None:
        """Start a new, empty node as a replica of the promoted one in place of the dead node (as a
        rebuilt node joins); wait until it is in sync.

        It gets a port of its own: the dead node's may have been taken meanwhile by another process.
        """
        assert self.replica.process is None, "the replica is running"
        self._dead.append(self.replica)
        self.replica = self._node("--replicaof", "127.0.0.1", str(self.primary.port)).start()
        _wait(self.in_sync, time.monotonic() + timeout, "the new replica is not in sync")

    def cleanup(self) -> None:
        self.link.cut()
        for server in (*self.sentinels, self.replica, self.primary, *self._dead):
            server.cleanup()


def _client(port: int) -> redis.Redis:
    return redis.Redis(port=port, socket_timeout=5, socket_connect_timeout=5)


def _wait(condition: Callable[[], bool], deadline: float, what: str) -> None:
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)
