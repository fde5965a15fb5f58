"""Whether Redis keeps the money: the pure check, the start-up refusal (app and worker) and `meterware
doctor`, against real redis-server processes started with the policy and persistence each test needs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client import CollectorRegistry

from meterware import Config, MeteringMiddleware
from meterware.cli import main
from meterware.errors import ConfigError, UnsafeStorageError
from meterware.keys import generate_key
from meterware.rollup.worker import run_worker
from meterware.storage.redis import _checks
from meterware.storage.redis._checks import Finding, NodeReport, findings
from meterware.wsgi import WSGIMeteringMiddleware
from tests.servers import RedisServer, ServerProcess, child_env, free_port, redis_server

KEY = {"Authorization": f"Bearer {generate_key().plaintext}"}  # unknown: its lookup reaches Redis
EVICTING = ("--maxmemory-policy", "allkeys-lru")
AOF = ("--appendonly", "yes")

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.redis


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each test is a new process for the once-per-process check, with no meterware settings around."""
    monkeypatch.setattr(_checks, "_checked", {})
    for name in ("METERWARE_CONFIG", "METERWARE_STORAGE", "METERWARE_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def evicting() -> Iterator[RedisServer]:
    """A Redis that evicts any key under memory pressure, with AOF on."""
    with redis_server(*EVICTING, *AOF) as server:
        yield server


@pytest.fixture(scope="module")
def safe() -> Iterator[RedisServer]:
    """A Redis as production needs it: noeviction, AOF on."""
    with redis_server("--maxmemory-policy", "noeviction", *AOF) as server:
        yield server


def _node(
    policy: str = "noeviction", *, aof: int = 1, save: str = "", version: str = "7.2.4", replicas: int = 0
) -> NodeReport:
    info = {
        "aof_enabled": aof,
        "redis_version": version,
        "maxmemory_policy": policy,
        "connected_slaves": replicas,
    }
    return NodeReport("10.0.0.1:6379", info, {"maxmemory-policy": policy, "save": save})


def _levels(found: list[Finding]) -> dict[str, str]:
    return {finding.check: finding.level for finding in found}


@pytest.mark.parametrize(
    ("node", "allow", "expected"),
    [
        pytest.param(_node(), False, {"policy": "ok", "persistence": "ok", "version": "ok"}, id="safe"),
        pytest.param(_node("allkeys-lru"), False, {"policy": "error"}, id="allkeys-evicts"),
        pytest.param(_node("volatile-lru"), False, {"policy": "error"}, id="volatile-evicts-ttl-keys"),
        pytest.param(_node("volatile-ttl"), True, {"policy": "warning"}, id="allowed-evicting"),
        pytest.param(_node(aof=0, save=""), False, {"persistence": "warning"}, id="no-persistence"),
        pytest.param(_node(aof=0, save="3600 1"), False, {"persistence": "ok"}, id="rdb-only"),
        pytest.param(_node(version="6.2.14"), False, {"version": "error"}, id="redis-6"),
        pytest.param(
            NodeReport(
                "n:1", {"maxmemory_policy": "allkeys-lfu", "aof_enabled": 0, "redis_version": "7.0"}, None
            ),
            False,
            {"config": "info", "policy": "error", "persistence": "warning"},
            id="config-refused-reads-info",
        ),
    ],
)
def test_findings(node: NodeReport, allow: bool, expected: dict[str, str]) -> None:
    """Any policy but noeviction is an error (a warning when allowed), no persistence a warning."""
    levels = _levels(findings([node], allow_eviction=allow))
    assert {check: levels[check] for check in expected} == expected


@pytest.mark.parametrize(
    ("replicas", "wait_replicas", "level", "message"),
    [
        (0, 0, "info", "no replica: if this node is lost, what it holds is lost with it"),
        (1, 0, "info", "1 replica(s), storage.wait_replicas off: a failover can lose the last writes"),
        (1, 1, "ok", "1 replica(s) connected; money writes wait for 1"),
        (1, 2, "warning", "1 replica(s) connected, storage.wait_replicas = 2: no flush is acknowledged"),
    ],
)
def test_the_replicas_are_weighed_against_wait_replicas(
    replicas: int, wait_replicas: int, level: str, message: str
) -> None:
    """Fewer replicas than ``wait_replicas`` warns (flushes wait); replicas without it is said to risk a
    failover's last writes."""
    (found,) = [
        f for f in findings([_node(replicas=replicas)], wait_replicas=wait_replicas) if f.check == "replicas"
    ]
    assert found.level == level
    assert found.message.startswith(message)


def test_a_volatile_policy_is_explained_by_the_keys_with_a_ttl() -> None:
    """The message says why volatile-* is not safe either: meterware's own keys carry TTLs."""
    (policy,) = [f for f in findings([_node("volatile-lru")]) if f.check == "policy"]
    assert "TTL" in policy.message
    assert "quota" in policy.message
    assert "allow_eviction = true" in policy.message


def _wsgi(url: str, **storage: Any) -> WSGIMeteringMiddleware:
    def app(environ: Any, start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    # A budget no loaded machine passes: a check timing out is a Redis down at start-up (the app starts).
    config = Config.from_dict({"storage": {"url": url, **storage}, "policy": {"timeout": 5.0}})
    return WSGIMeteringMiddleware(app, config, registry=CollectorRegistry())


def test_the_wsgi_app_refuses_an_evicting_redis_naming_the_policy_and_the_setting(
    evicting: RedisServer,
) -> None:
    """The first call that reaches Redis raises one line naming the policy and the setting (not served
    fail-open: a StorageError would be), and so does every later one."""
    middleware = _wsgi(evicting.url)
    with httpx.Client(transport=httpx.WSGITransport(app=middleware), base_url="http://test") as client:
        for _ in range(2):
            with pytest.raises(UnsafeStorageError, match=r"allkeys-lru.*\[storage\] allow_eviction = true"):
                client.get("/v1/hello", headers=KEY)


def test_allow_eviction_starts_with_one_warning(
    evicting: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """`[storage] allow_eviction = true` serves, and says so once in the log."""
    middleware = _wsgi(evicting.url, allow_eviction=True)
    with (
        caplog.at_level(logging.WARNING, logger="meterware.storage"),
        httpx.Client(transport=httpx.WSGITransport(app=middleware), base_url="http://test") as client,
    ):
        for _ in range(3):
            assert client.get("/v1/hello", headers=KEY).json()["reason"] == "unknown_key"
    warned = [r.getMessage() for r in caplog.records if "allkeys-lru" in r.getMessage()]
    assert len(warned) == 1
    assert "allowed by storage.allow_eviction" in warned[0]


def test_no_persistence_is_warned_about_once(redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """The suite's Redis keeps nothing on disk: one warning for the process, however many clients."""
    with caplog.at_level(logging.WARNING, logger="meterware.storage"):
        for _ in range(2):
            middleware = _wsgi(redis_url)
            with httpx.Client(
                transport=httpx.WSGITransport(app=middleware), base_url="http://test"
            ) as client:
                assert client.get("/v1/hello", headers=KEY).json()["reason"] == "unknown_key"
    warned = [r.getMessage() for r in caplog.records if "persistence" in r.getMessage()]
    assert len(warned) == 1
    assert "neither AOF nor RDB" in warned[0]


async def _lifespan(app: Any) -> list[dict[str, Any]]:
    """Drive the ASGI lifespan as a server does (start-up, then shut-down if it started); return what the
    app sent."""
    sent: list[dict[str, Any]] = []
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    answered = asyncio.Event()
    inbox.put_nowait({"type": "lifespan.startup"})

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        answered.set()

    task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get, send))
    await answered.wait()
    if sent[0]["type"] == "lifespan.startup.complete":
        inbox.put_nowait({"type": "lifespan.shutdown"})
        await task
    else:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return sent


async def _inner(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _asgi(url: str, **storage: Any) -> MeteringMiddleware:
    # A budget no loaded machine passes: a check timing out is a Redis down at start-up (the app starts).
    config = Config.from_dict({"storage": {"url": url, **storage}, "policy": {"timeout": 5.0}})
    return MeteringMiddleware(_inner, config, registry=CollectorRegistry())


def test_the_asgi_app_fails_its_startup_on_an_evicting_redis(evicting: RedisServer) -> None:
    """The lifespan start-up fails with the line (uvicorn then exits); allowed, it completes."""
    sent = asyncio.run(_lifespan(_asgi(evicting.url)))
    assert sent[0]["type"] == "lifespan.startup.failed"
    assert "allkeys-lru" in sent[0]["message"]
    assert "allow_eviction = true" in sent[0]["message"]
    sent = asyncio.run(_lifespan(_asgi(evicting.url, allow_eviction=True)))
    assert sent[0] == {"type": "lifespan.startup.complete"}


def test_an_unreachable_redis_at_startup_keeps_todays_behaviour() -> None:
    """Redis down at start-up: the app starts and answers per on_backend_error (here 503)."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    middleware = _asgi(url)
    assert asyncio.run(_lifespan(middleware))[0] == {"type": "lifespan.startup.complete"}

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/v1/hello", headers=KEY)

    assert asyncio.run(call()).json()["reason"] == "backend_unavailable"


def test_uvicorn_refuses_to_start_on_an_evicting_redis(evicting: RedisServer, tmp_path: Path) -> None:
    """A real uvicorn exits at start-up with the line; allowed (by config file), it serves."""
    refused, allowed = tmp_path / "refused.toml", tmp_path / "allowed.toml"
    refused.write_text(f'[storage]\nurl = "{evicting.url}"\n')
    allowed.write_text(f'[storage]\nurl = "{evicting.url}"\nallow_eviction = true\n')
    port = free_port()
    args = [sys.executable, "-m", "uvicorn", "tests.faults.asgi_server:app", "--port", str(port)]
    env = child_env(METERWARE_CONFIG=str(refused))
    done = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "meterware refuses to start" in done.stderr
    assert "allkeys-lru" in done.stderr
    assert "[storage] allow_eviction = true" in done.stderr

    server = ServerProcess(args, child_env(METERWARE_CONFIG=str(allowed)), port, tmp_path / "uvicorn.log")
    try:
        assert httpx.get(f"{server.url}/v1/hello", headers=KEY).json()["reason"] == "unknown_key"
    finally:
        output = server.stop()
    assert "allowed by storage.allow_eviction" in output


def test_a_redis_down_at_startup_is_checked_when_first_reached() -> None:
    """No refusal while Redis is away (the call fails per on_backend_error); once it answers, the
    check runs before anything is served from it."""
    port = free_port()
    middleware = _wsgi(f"redis://127.0.0.1:{port}/0")
    with httpx.Client(transport=httpx.WSGITransport(app=middleware), base_url="http://test") as client:
        assert client.get("/v1/hello", headers=KEY).json()["reason"] == "backend_unavailable"
        server = RedisServer(*EVICTING, port=port).start()
        try:
            with pytest.raises(UnsafeStorageError, match="allkeys-lru"):
                client.get("/v1/hello", headers=KEY)
        finally:
            server.cleanup()


def test_the_worker_refuses_an_evicting_redis(
    evicting: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """`meterware rollup` exits 1 with the line; allowed, it runs."""
    config = Config.from_dict({"storage": {"url": evicting.url, "shards": 2}})
    with caplog.at_level(logging.ERROR, logger="meterware"):
        assert run_worker(config, once=True) == 1
    assert any(
        "refusing to start" in r.getMessage() and "allkeys-lru" in r.getMessage() for r in caplog.records
    )
    allowed = Config.from_dict({"storage": {"url": evicting.url, "shards": 2, "allow_eviction": True}})
    assert run_worker(allowed, once=True) == 0


def _doctor(capsys: pytest.CaptureFixture[str], url: str, *more: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["doctor", "--storage", url, *more])
    return code, capsys.readouterr().out


def test_doctor_on_a_safe_redis(safe: RedisServer, capsys: pytest.CaptureFixture[str]) -> None:
    """Every check ok: exit 0."""
    code, out = _doctor(capsys, safe.url)
    assert code == 0
    assert "ok       policy" in out
    assert "maxmemory-policy noeviction" in out
    assert "AOF on" in out
    assert "status: ok" in out


def test_doctor_on_an_evicting_redis(evicting: RedisServer, capsys: pytest.CaptureFixture[str]) -> None:
    """An evicting policy is an error: exit 1; --json has every check."""
    code, out = _doctor(capsys, evicting.url, "--json")
    assert code == 1
    report = json.loads(out)
    assert report["status"] == "error"
    levels = {check["check"]: check["level"] for check in report["checks"]}
    assert levels == {"policy": "error", "persistence": "ok", "version": "ok", "replicas": "info"}


def test_doctor_on_an_unreachable_redis(capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing answers: exit 2, and a line saying so."""
    code, out = _doctor(capsys, f"redis://127.0.0.1:{free_port()}/0")
    assert code == 2
    assert out.startswith("unreachable")


def test_doctor_without_config_falls_back_to_info(capsys: pytest.CaptureFixture[str]) -> None:
    """CONFIG renamed away (as on managed Redis): the policy comes from INFO, the rest is said unchecked."""
    with redis_server("--rename-command", "CONFIG", "", "--maxmemory-policy", "volatile-lru") as server:
        code, out = _doctor(capsys, server.url, "--json")
        assert code == 1
        checks = {check["check"]: check for check in json.loads(out)["checks"]}
        assert checks["config"]["level"] == "info"
        assert checks["policy"]["level"] == "error"
        assert "volatile-lru" in checks["policy"]["message"]
        assert checks["persistence"]["level"] == "warning"
        # The start-up check falls back the same way instead of crashing.
        with (
            pytest.raises(UnsafeStorageError, match="volatile-lru"),
            httpx.Client(
                transport=httpx.WSGITransport(app=_wsgi(server.url)), base_url="http://test"
            ) as client,
        ):
            client.get("/v1/hello", headers=KEY)


def test_every_cluster_primary_is_checked(cluster_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Doctor lists each primary; one evicting primary among three is found, by the app too."""
    code, out = _doctor(capsys, cluster_url, "--json")
    assert code == 0
    nodes = {check["node"] for check in json.loads(out)["checks"] if check["check"] == "policy"}
    assert len(nodes) == 3
    last = sorted(nodes)[-1]
    host, _, port = last.rpartition(":")
    client = redis.Redis(host=host, port=int(port))
    try:
        client.config_set("maxmemory-policy", "allkeys-lru")
        code, out = _doctor(capsys, cluster_url)
        assert code == 1
        assert f"error    policy       {last}" in out
        with pytest.raises(UnsafeStorageError, match=last):
            asyncio.run(_lifespan_then_raise(cluster_url))
    finally:
        client.config_set("maxmemory-policy", "noeviction")
        client.close()


async def _lifespan_then_raise(url: str) -> None:
    sent = await _lifespan(_asgi(url))
    if sent[0]["type"] == "lifespan.startup.failed":
        raise UnsafeStorageError(sent[0]["message"])


def test_doctor_through_sentinel_checks_its_primary(
    sentinel_url: str, redis_process: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Through a Sentinel, the primary it names is checked (the suite's Redis: no persistence)."""
    code, out = _doctor(capsys, sentinel_url, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["status"] == "warning"
    assert {check["node"] for check in report["checks"]} == {f"127.0.0.1:{redis_process.port}"}


@pytest.mark.parametrize(
    ("table", "message"),
    [
        pytest.param({"allow_eviction": "yes"}, "storage.allow_eviction", id="not-a-boolean"),
        pytest.param({"allow_evictions": True}, "allow_evictions", id="misspelt"),
    ],
)
def test_allow_eviction_is_a_boolean_setting(table: dict[str, Any], message: str) -> None:
    """`[storage] allow_eviction` is checked as every setting is: the error names the field."""
    with pytest.raises(ConfigError, match=message):
        Config.from_dict({"storage": {"url": "memory://", **table}})
    assert Config.from_dict({"storage": {"url": "memory://", "allow_eviction": True}}).allow_eviction
