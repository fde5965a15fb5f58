"""Hostile and broken input against a real uvicorn process: keys, requests, and units reported by handlers.

Whatever comes in, a call is served and charged only with a valid live key (a test key: served, never
charged), every refusal is a problem document that echoes nothing of what was presented, and the books end
exact. Raw requests go through a socket, so nothing on the client side tidies them up first.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from meterware import keys as keys_module
from meterware.config import Config
from meterware.events import MAX_ROUTE_LENGTH
from meterware.keys import generate_key
from meterware.metering.facade import Metering
from meterware.metering.responses import Problem
from meterware.storage import open_storage
from tests.faults.apps import HOSTILE_UNITS, HUGE_SUM
from tests.faults.harness import (
    CALL_PRICE,
    TOKEN_PRICE,
    App,
    FaultRedis,
    Load,
    Stream,
    assert_exact,
    base_config,
    base_env,
    books,
    figures,
    merged,
    open_accounts,
    provision,
    rollup_once,
    to_toml,
    wait_until,
)

pytestmark = [pytest.mark.faults, pytest.mark.redis, pytest.mark.slow]


def raw_request(port: int, request: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are; return the status, headers and body of the answer (0 if none came)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head:
        return 0, {}, b""
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def get(port: int, path: str, *header_lines: bytes, method: bytes = b"GET", version: bytes = b"1.1") -> Any:
    lines = [
        method + b" " + path.encode("latin-1") + b" HTTP/" + version,
        *header_lines,
        b"Connection: close",
    ]
    if version == b"1.1":
        lines.insert(1, b"Host: localhost")
    return raw_request(port, b"\r\n".join(lines) + b"\r\n\r\n")


def problem_reason(status: int, headers: dict[str, str], body: bytes) -> str:
    assert headers.get("content-type") == "application/problem+json", (status, body)
    document = json.loads(body)
    assert document["status"] == status
    return str(document["reason"])


@pytest.fixture
def hostile_app(
    tmp_path: Path, make_redis: Callable[..., FaultRedis], make_app: Callable[..., App]
) -> tuple[App, FaultRedis, Path]:
    server = make_redis()
    config = tmp_path / "meterware.toml"
    changes = {
        "routes": {"exclude": ["/health", "/metrics", "/docs*"], "live_only": ["/v1/live/*"]},
        "policy": {"key_cache_ttl": 0.2},
    }
    config.write_text(to_toml(merged(base_config(server.url, tmp_path / "spool"), changes)))
    return make_app("uvicorn", base_env(config)).start(), server, config


def test_hostile_keys_are_refused_and_never_charged(hostile_app: tuple[App, FaultRedis, Path]) -> None:
    """Empty, huge, non-ASCII, wrong-prefix, unknown, revoked, expired keys; test keys on live-only routes."""
    app, server, config = hostile_app
    accounts = open_accounts(config)
    live = provision(accounts)
    test_key = accounts.create_key("acme", live=False)
    revoked = accounts.create_key("acme")
    accounts.revoke_key(revoked.key_id)
    rotated = accounts.create_key("acme")
    replacement = accounts.rotate_key(rotated.key_id, grace_seconds=1.0)
    port = app.port
    served: list[str] = []
    refusals: list[str] = []

    def bearer(value: bytes) -> bytes:
        return b"Authorization: Bearer " + value

    def refused(reason: str, path: str, *headers: bytes) -> None:
        status, response_headers, body = get(port, path, *headers)
        refusals.append(reason)
        assert problem_reason(status, response_headers, body) == reason, (path, headers)
        for header in headers:  # nothing presented is echoed back
            presented = header.partition(b":")[2].strip()
            if len(presented) > 8:
                assert presented not in body

    def ok(path: str, *headers: bytes) -> None:
        status, _, body = get(port, path, *headers)
        assert status == 200, body
        served.append(path)

    secret = "A" * keys_module.SECRET_LENGTH
    refused("missing_key", "/v1/ok/1")
    refused("missing_key", "/v1/ok/2", b"Authorization: Bearer ")
    refused("missing_key", "/v1/ok/3", b"Authorization: Basic " + live.plaintext.encode())
    refused("missing_key", "/v1/ok/4", b"X-API-Key:    ")
    refused("malformed_key", "/v1/ok/5", bearer(b"mw_live_" + b"A" * 10_000))
    refused("malformed_key", "/v1/ok/6", bearer(("mw_live_" + "\u00e9" * 32).encode("latin-1")))
    refused("malformed_key", "/v1/ok/7", bearer(("mw_live_" + "\u00e9" * 16).encode("utf-8")))
    refused("malformed_key", "/v1/ok/8", bearer(b"sk_live_" + secret.encode()))
    refused("malformed_key", "/v1/ok/9", bearer(b"mw_prod_" + secret.encode()))
    refused("malformed_key", "/v1/ok/10", bearer(live.plaintext.upper().encode()))
    refused("malformed_key", "/v1/ok/11", bearer(live.plaintext.encode() + b"x"))
    refused("malformed_key", "/v1/ok/12", bearer(live.plaintext[:-1].encode()))
    # A NUL byte in a header never gets past the HTTP parser.
    assert get(port, "/v1/ok/13", bearer(live.plaintext.encode() + b"\x00"))[0] == 400
    refused("unknown_key", "/v1/ok/14", bearer(generate_key().plaintext.encode()))
    near_miss = live.plaintext[:-1] + ("Z" if live.plaintext[-1] != "Z" else "Y")
    refused("unknown_key", "/v1/ok/15", bearer(near_miss.encode()))
    refused("revoked_key", "/v1/ok/16", bearer(revoked.plaintext.encode()))
    ok("/v1/ok/17", bearer(rotated.plaintext.encode()))  # within its grace
    ok("/v1/ok/18", bearer(replacement.plaintext.encode()))
    time.sleep(1.3)
    refused("expired_key", "/v1/ok/19", bearer(rotated.plaintext.encode()))
    refused("test_key_not_allowed", "/v1/live/20", bearer(test_key.plaintext.encode()))
    refused("test_key_not_allowed", "/v1/ok/../live/21", bearer(test_key.plaintext.encode()))
    status, _, _ = get(port, "/v1/ok/22", bearer(test_key.plaintext.encode()))  # test keys work elsewhere
    assert status == 200
    ok("/v1/live/23", bearer(live.plaintext.encode()))
    ok("/v1/ok/24", b"X-API-Key: " + live.plaintext.encode())
    # Duplicated headers: the first one counts, consistently.
    ok("/v1/ok/25", bearer(live.plaintext.encode()), bearer(generate_key().plaintext.encode()))
    refused(
        "unknown_key", "/v1/ok/26", bearer(generate_key().plaintext.encode()), bearer(live.plaintext.encode())
    )
    # Excluded routes cannot be borrowed to reach a metered one.
    refused("missing_key", "/docs/../v1/ok/27")
    refused("missing_key", "/v1/ok/28/../../../health")
    refused("missing_key", "/v1/ok/%2e%2e/%2e%2e/health")
    status, _, _ = get(port, "/health")
    assert status == 200

    metrics = app.metrics()
    app.stop()
    env = base_env(config)
    rollup_once(env, config.parent / "rollup.log")
    stream = Stream.read(server.client())
    stream.assert_no_duplicates()
    ledger = books(accounts)
    assert stream.paths("success") - {"/v1/ok/22"} == set(served)
    assert ledger.calls["success"] == len(served)
    assert ledger.spend == ledger.charged == len(served) * CALL_PRICE
    assert ledger.reserved == 0
    sandbox = accounts.usage("acme", live=False)
    assert sandbox.calls["success"] == 1
    assert sandbox.calls["rejected"] == 2  # the two live-only refusals of a known customer
    assert sandbox.spend == 0
    assert metrics['meterware_rejections_total{reason="test_key_not_allowed"}'] == 2
    assert metrics['meterware_rejections_total{reason="malformed_key"}'] == 8
    figures("hostile-keys", refused=Counter(refusals), served=len(served), charged_micros=ledger.charged)


class CountingStorage:
    """A storage that records the arguments of every call made on it."""

    def __init__(self, storage: Any) -> None:
        self.storage = storage
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.storage, name)

        def recorded(*args: Any) -> Any:
            self.calls.append((name, args))
            return method(*args)

        return recorded


def test_unknown_and_known_keys_take_the_same_path_to_the_backend(
    tmp_path: Path, make_redis: Callable[..., FaultRedis], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No timing oracle: any well-formed key costs one hash and one lookup by hash; nothing compares it."""
    server = make_redis()
    config_path = tmp_path / "meterware.toml"
    config_path.write_text(to_toml(base_config(server.url, tmp_path / "spool")))
    config = Config.from_file(config_path)
    accounts = open_accounts(config_path)
    known = provision(accounts).plaintext
    revoked = accounts.create_key("acme")
    accounts.revoke_key(revoked.key_id)
    near_miss = known[:-1] + ("b" if known[-1] != "b" else "c")
    hashed: list[str] = []
    real_hash = keys_module.hash_key
    monkeypatch.setattr(keys_module, "hash_key", lambda text: hashed.append(text) or real_hash(text))
    storage = open_storage(server.url, shards=config.shards, timeout=5)

    for presented, found in [
        (known, True),
        (generate_key().plaintext, False),
        (near_miss, False),
        (revoked.plaintext, True),
        (generate_key(live=False).plaintext, False),
    ]:
        hashed.clear()
        counting = CountingStorage(storage)
        metering = Metering(config, registry=CollectorRegistry())
        headers = [(b"authorization", f"Bearer {presented}".encode())]
        result = metering.start(counting, None, headers, b"", "GET", "/v1/ok/1")  # type: ignore[arg-type]
        assert hashed == [presented]
        lookups = [args for name, args in counting.calls if name == "resolve_key"]
        assert lookups == [(hashlib.sha256(presented.encode()).hexdigest(),)]
        assert counting.calls[0][0] == "resolve_key"
        # The backend never sees the key itself, only its hash.
        assert all(presented not in repr(args) for _, args in counting.calls)
        assert isinstance(result, Problem) != found or presented == revoked.plaintext
    # Malformed keys are refused before any hash or lookup.
    hashed.clear()
    counting = CountingStorage(storage)
    metering = Metering(config, registry=CollectorRegistry())
    malformed = [(b"x-api-key", b"mw_live_" + b"!" * 32)]
    result = metering.start(counting, None, malformed, b"", "GET", "/")  # type: ignore[arg-type]
    assert isinstance(result, Problem)
    assert (hashed, counting.calls) == ([], [])


def test_hostile_requests_are_metered_like_any_other(hostile_app: tuple[App, FaultRedis, Path]) -> None:
    """Huge and duplicated headers, no Host, odd methods, encoded paths: charged once or not at all."""
    app, server, config = hostile_app
    accounts = open_accounts(config)
    key = provision(accounts).plaintext.encode()
    auth = b"Authorization: Bearer " + key
    port = app.port
    answers: dict[str, int] = {}

    def send(path: str, *headers: bytes, **options: Any) -> int:
        status, _, _ = get(port, path, *headers, **options)
        answers[path] = status
        return status

    assert send("/v1/ok/h1", auth, *[f"X-Filler-{i}: {'v' * 100}".encode() for i in range(100)]) == 200
    assert send("/v1/ok/h2", auth, b"X-Huge: " + b"v" * 200_000) in (200, 400, 431)
    assert send("/v1/ok/h3", auth, auth, auth) == 200
    assert send("/v1/ok/h4", auth, b"X-Dup: 1", b"X-Dup: 2", b"X-Dup: 3") == 200
    assert send("/v1/ok/h5", auth, version=b"1.0") == 200  # HTTP/1.0: no Host header at all
    assert send("/v1/ok/h6", auth, method=b"PROPFIND") == 200
    assert send("/v1/ok/h7", auth, method=b"M-SEARCH") == 200
    assert send("/v1/ok/h8", auth, method=b"X" * 500) in (200, 400)
    assert send("/v1/ok/h9", auth, method=b"HEAD") == 200
    assert send("/v1/ok/h10%20with%20spaces%00nul", auth) in (200, 400)
    assert send("/v1/ok/h11/%F0%9F%92%A5/%ff%fe", auth) in (200, 400)
    assert send("/v1/ok/h12?" + "q=" + "x" * 5000, auth) == 200
    assert send("//v1//ok//h13", auth) == 404
    assert send("/v1/ok/h14/" + "a/" * 2000, auth) in (200, 400, 414)
    metrics = app.metrics()
    app.stop()
    rollup_once(base_env(config), config.parent / "rollup.log")

    stream = Stream.read(server.client())
    stream.assert_no_duplicates()
    ledger = books(accounts)
    succeeded = sum(1 for status in answers.values() if status == 200)
    assert len(stream.paths("success")) == ledger.calls["success"] == succeeded
    assert ledger.calls["client_error"] == sum(1 for status in answers.values() if status == 404)
    assert ledger.spend == ledger.charged == succeeded * CALL_PRICE
    assert ledger.reserved == 0
    # Odd methods share one label: the metric's cardinality stays bounded.
    methods = {sample.split('method="')[1].split('"')[0] for sample in metrics if 'method="' in sample}
    assert methods <= {"GET", "HEAD", "PROPFIND", "<other>"}
    answered = {path[:40]: status for path, status in answers.items()}
    figures("hostile-requests", answers=answered, succeeded=succeeded, charged_micros=ledger.charged)


def test_hostile_units_are_ignored_counted_and_never_charged(
    hostile_app: tuple[App, FaultRedis, Path],
) -> None:
    """Negative, NaN, infinite, fractional, huge, costly, wrongly typed units and unknown meters: a warning
    and a metric each; the call is charged for itself and its valid units only."""
    app, server, config = hostile_app
    accounts = open_accounts(config)
    key = provision(accounts).plaintext
    kinds = [*HOSTILE_UNITS, "huge-sum"]
    with httpx.Client(base_url=app.url, headers={"Authorization": f"Bearer {key}"}, timeout=10) as client:
        for kind in kinds:
            assert client.get(f"/v1/units/{kind}?kind={kind}").status_code == 200, kind
    metrics = app.metrics()
    output = app.stop()
    rollup_once(base_env(config), config.parent / "rollup.log")

    rejected = len(kinds) - 1  # all but "valid"; "huge-sum" reports valid values whose total is not
    assert metrics["meterware_units_rejected_total"] == rejected
    assert output.count("meterware: ignored usage") == rejected, output
    stream = Stream.read(server.client())
    stream.assert_no_duplicates()
    assert [dead for shard in range(4) for dead in server.client().xrange(f"mw:{{s{shard}}}:dead")] == []
    units = {event.route: event.units for event in stream.events}
    valid_tokens = HOSTILE_UNITS["valid"][1]
    assert units["/v1/units/valid"] == {"calls": 1, "tokens": valid_tokens}
    assert units["/v1/units/huge-sum"] == {"calls": 1, "rows": HUGE_SUM[0]}
    assert all(
        units[f"/v1/units/{kind}"] == {"calls": 1} for kind in kinds if kind not in ("valid", "huge-sum")
    )
    ledger = books(accounts)
    assert ledger.calls["success"] == len(kinds)
    assert ledger.tokens == valid_tokens
    assert ledger.spend == ledger.charged == len(kinds) * CALL_PRICE + valid_tokens * TOKEN_PRICE
    assert ledger.reserved == 0
    figures("hostile-units", kinds=kinds, rejected=rejected, charged_micros=ledger.charged)


#: The size of each hostile method and path (the request line is twice that).
HOSTILE_FIELD_BYTES = 100_000
REFUSED_CALLS = 1_000


def test_refused_calls_with_huge_paths_and_methods_leave_redis_almost_untouched(
    tmp_path: Path, make_redis: Callable[..., FaultRedis], make_app: Callable[..., App]
) -> None:
    """1,000 calls refused for lack of credits, each with a 100 KB method and a 100 KB path, while another
    customer is served: once flushed and rolled up, Redis has grown by less than 1 MiB, every refusal is
    recorded with bounded fields, and the served customer is charged exactly."""
    server = make_redis()
    redis_client = server.client()
    # A headroom like the one of the report (past it, admissions fail, and fail open: calls go free).
    redis_client.config_set("maxmemory", "64mb")
    config = tmp_path / "meterware.toml"
    # The default flush interval: each flush leaves a batch marker (24 h) per shard, and the suite's
    # 0.05 s would make their number, not the refusals, what grows with a slow machine's flood time.
    changes = {"pipeline": {"flush_interval": 0.2}}
    config.write_text(to_toml(merged(base_config(server.url, tmp_path / "spool"), changes)))
    accounts = open_accounts(config)
    served_key = provision(accounts).plaintext
    accounts.create_customer("broke", plan="payg")  # no credits: every call is refused with 402
    broke = b"Authorization: Bearer " + accounts.create_key("broke").plaintext.encode()
    # h11 (uvicorn's parser here) refuses a request line past 16 KiB by default: let these reach the app.
    options = ("--h11-max-incomplete-event-size", str(4 * HOSTILE_FIELD_BYTES))
    app = make_app("uvicorn", base_env(config), options=options).start()
    env = base_env(config)
    # Warm up (scripts loaded, streams and rollup state made), then measure from a flushed, rolled-up state.
    assert get(app.port, "/v1/ok/warm", b"Authorization: Bearer " + served_key.encode())[0] == 200
    assert get(app.port, "/v1/ok/warm-refused", broke)[0] == 402
    wait_until(lambda: len(Stream.read(redis_client).events) == 2, 10, "the warm-up events flushed")
    rollup_once(env, tmp_path / "rollup.log")
    before = int(redis_client.info("memory")["used_memory"])

    def refused_call(number: int) -> str:
        path = f"/v1/ok/refused-{number}-".encode() + b"a" * HOSTILE_FIELD_BYTES
        request = b"X" * HOSTILE_FIELD_BYTES + b" " + path + b" HTTP/1.1\r\nHost: localhost\r\n"
        status, headers, body = raw_request(app.port, request + broke + b"\r\nConnection: close\r\n\r\n")
        return problem_reason(status, headers, body)

    began = time.monotonic()
    served = Load(app.url, served_key, lambda n: f"/v1/ok/served-{n}", threads=2, limit=400)
    with served as load, ThreadPoolExecutor(max_workers=8) as pool:
        reasons = Counter(pool.map(refused_call, range(REFUSED_CALLS)))
    flood_seconds = time.monotonic() - began
    app.stop()
    rollup_once(env, tmp_path / "rollup.log")
    grown = int(redis_client.info("memory")["used_memory"]) - before

    assert reasons == {"insufficient_credits": REFUSED_CALLS}
    assert load.statuses() == {200: len(load.results)}
    stream = Stream.read(redis_client)
    rejected = [event for event in stream.events if event.outcome == "rejected"]
    assert len(rejected) == REFUSED_CALLS + 1
    assert {event.method for event in rejected} == {"<other>", "GET"}
    assert max(len(event.route) for event in rejected) <= MAX_ROUTE_LENGTH
    assert accounts.usage("broke").calls["rejected"] == REFUSED_CALLS + 1
    assert accounts.balance("broke").balance == 0
    assert_exact(stream, books(accounts), load.paths(200) | {"/v1/ok/warm"})
    assert grown < 1 << 20, f"Redis grew by {grown} bytes"
    figures(
        "hostile-refusals",
        refused=REFUSED_CALLS,
        request_line_bytes=2 * HOSTILE_FIELD_BYTES,
        redis_growth_bytes=grown,
        bytes_per_refusal=grown // REFUSED_CALLS,
        served=len(load.results),
        flood_seconds=round(flood_seconds, 1),
    )
