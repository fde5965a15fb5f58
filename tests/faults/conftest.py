"""Fixtures of the fault suite: every process a test starts is stopped (by its PID) when the test ends."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.faults.harness import App, FaultRedis, Worker
from tests.faults.proxy import RedisProxy, Rule
from tests.faults.scenario import Scenario


@pytest.fixture
def make_redis() -> Iterator[Callable[..., FaultRedis]]:
    """Start redis-server processes (``persistent=``, ``password=``), stopped and removed at the end."""
    started: list[FaultRedis] = []

    def make(**options: Any) -> FaultRedis:
        server = FaultRedis(**options)
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.cleanup()


@pytest.fixture
def make_app(tmp_path: Path) -> Iterator[Callable[..., App]]:
    """Metered app servers (not started yet), SIGKILLed at the end if still running."""
    apps: list[App] = []

    def make(kind: str, env: dict[str, str], **options: Any) -> App:
        log_dir = tmp_path / f"{kind}-{len(apps)}"
        log_dir.mkdir()
        app = App(kind, env, log_dir, **options)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.cleanup()


@pytest.fixture
def make_worker(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Continuous rollup worker processes, SIGKILLed at the end if still running."""
    workers: list[Worker] = []

    def make(env: dict[str, str], *options: str) -> Worker:
        worker = Worker(env, tmp_path / f"worker-{len(workers)}.log", *options)
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        worker.cleanup()


@pytest.fixture
def make_proxy() -> Iterator[Callable[..., RedisProxy]]:
    proxies: list[RedisProxy] = []

    def make(upstream_port: int, **options: Any) -> RedisProxy:
        proxy = RedisProxy(upstream_port, **options)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()


@pytest.fixture
def make_scenario(
    tmp_path: Path,
    make_redis: Callable[..., FaultRedis],
    make_app: Callable[..., App],
    make_worker: Callable[..., Worker],
    make_proxy: Callable[..., RedisProxy],
) -> Callable[..., Scenario]:
    """Set up a fault test's deployment (a :class:`Scenario`): ``changes`` to the base configuration, a
    ``persistent`` or ``password``-protected Redis, and a ``proxy`` applying a rule in front of it."""

    def make(
        changes: Mapping[str, Any] | None = None,
        *,
        persistent: bool = False,
        password: str | None = None,
        proxy: Rule | None = None,
    ) -> Scenario:
        server = make_redis(persistent=persistent, password=password)
        relay = None if proxy is None else make_proxy(server.port, rule=proxy)
        return Scenario(tmp_path, server, relay, changes or {}, make_app, make_worker)

    return make
