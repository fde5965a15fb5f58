"""Fixtures of the fault suite: every process a test starts is stopped (by its PID) when the test ends."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.faults.harness import App, FaultRedis, Worker
from tests.faults.proxy import RedisProxy, Rule
from tests.faults.scenario import Scenario


@pytest.fixture
def cleanups() -> Iterator[ExitStack]:
    """What the test started, stopped at its end (the last started first), even if one stop fails."""
    with ExitStack() as stack:
        yield stack


@pytest.fixture
def make_redis(cleanups: ExitStack) -> Callable[..., FaultRedis]:
    """Start redis-server processes (``persistent=``, ``password=``), stopped and removed at the end."""

    def make(**options: Any) -> FaultRedis:
        server = FaultRedis(**options)
        cleanups.callback(server.cleanup)
        return server.start()

    return make


@pytest.fixture
def make_app(tmp_path: Path, cleanups: ExitStack) -> Callable[..., App]:
    """Metered app servers (not started yet), SIGKILLed at the end if still running."""
    numbers = itertools.count()

    def make(kind: str, env: dict[str, str], **options: Any) -> App:
        log_dir = tmp_path / f"{kind}-{next(numbers)}"
        log_dir.mkdir()
        app = App(kind, env, log_dir, **options)
        cleanups.callback(app.cleanup)
        return app

    return make


@pytest.fixture
def make_worker(tmp_path: Path, cleanups: ExitStack) -> Callable[..., Worker]:
    """Continuous rollup worker processes, SIGKILLed at the end if still running."""
    numbers = itertools.count()

    def make(env: dict[str, str], *options: str) -> Worker:
        worker = Worker(env, tmp_path / f"worker-{next(numbers)}.log", *options)
        cleanups.callback(worker.cleanup)
        return worker

    return make


@pytest.fixture
def make_proxy(cleanups: ExitStack) -> Callable[..., RedisProxy]:
    """Proxies in front of a Redis (``rule=``: what to do with each command), closed at the end."""

    def make(upstream_port: int, **options: Any) -> RedisProxy:
        proxy = RedisProxy(upstream_port, **options)
        cleanups.callback(proxy.close)
        return proxy

    return make


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
