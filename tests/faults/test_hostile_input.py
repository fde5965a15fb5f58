"""Hostile and broken input against a real uvicorn process: keys, requests, and units reported by handlers.

Whatever comes in, a call is served and charged only with a valid live key (a test key: served, never
charged), every refusal is a problem document that echoes nothing of what was presented, and the books end
exact. Raw requests go through a socket, so nothing on the client side tidies them up first.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from meterware import keys as keys_module
from meterware.events import MAX_ROUTE_LENGTH
from meterware.keys import generate_key
from meterware.wsgi import WSGIMeteringMiddleware
from tests.faults.apps import HOSTILE_UNITS, HUGE_SUM, bare_wsgi
from tests.faults.books import Stream, assert_exact
from tests.faults.harness import CALL_PRICE, CUSTOMER, TOKEN_PRICE, Load, figures, stream_fields, wait_until
from tests.faults.proxy import Action
from tests.faults.scenario import Scenario

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


def get(
    port: int, path: str, *header_lines: bytes, method: bytes = b"GET", version: bytes = b"1.1"
) -> tuple[int, dict[str, str], bytes]:
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
def hostile(make_scenario: Callable[..., Scenario]) -> Scenario:
    """The hostile-input deployment: more excluded routes, a live-only one, keys cached briefly."""
    changes = {
        "routes": {"exclude": ["/health", "/metrics", "/docs*"], "live_only": ["/v1/live/*"]},
        "policy": {"key_cache_ttl": 0.2},
    }
    return make_scenario(changes)


def test_hostile_keys_are_refused_and_never_charged(hostile: Scenario) -> None:
    """Empty, huge, non-ASCII, wrong-prefix, unknown, revoked, expired keys; test keys on live-only routes."""
    app = hostile.app()
    accounts, live = hostile.accounts, hostile.new_key
    test_key = accounts.create_key(CUSTOMER, live=False)
    revoked = accounts.create_key(CUSTOMER)
    accounts.revoke_key(revoked.key_id)
    rotated = accounts.create_key(CUSTOMER)
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
    # Not meterware's shape but a bearer token (a custom prefix's, an imported key's): looked up.
    refused("unknown_key", "/v1/ok/8", bearer(b"sk_live_" + secret.encode()))
    refused("malformed_key", "/v1/ok/9", bearer(b"mw_prod_" + secret.encode()))
    refused("unknown_key", "/v1/ok/10", bearer(live.plaintext.upper().encode()))
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
    hostile.rollup_once()
    stream = hostile.stream()
    stream.assert_no_duplicates()
    ledger = hostile.books()
    assert stream.paths("success") - {"/v1/ok/22"} == set(served)
    assert ledger.calls["success"] == len(served)
    assert ledger.spend == ledger.charged == len(served) * CALL_PRICE
    assert ledger.reserved == 0
    sandbox = accounts.usage(CUSTOMER, live=False)
    assert sandbox.calls["success"] == 1
    assert sandbox.calls["rejected"] == 2  # the two live-only refusals of a known customer
    assert sandbox.spend == 0
    assert metrics['meterware_rejections_total{reason="test_key_not_allowed"}'] == 2
    assert metrics['meterware_rejections_total{reason="malformed_key"}'] == 6
    figures("hostile-keys", refused=Counter(refusals), served=len(served), charged_micros=ledger.charged)


class Recorder:
    """A proxy rule that records every command on its way to Redis."""

    #: What a client sends when it connects, before any command of its own.
    HANDSHAKE = frozenset({b"CLIENT", b"HELLO", b"AUTH", b"SELECT", b"PING"})

    def __init__(self) -> None:
        self.commands: list[list[bytes]] = []
        self._lock = threading.Lock()

    def __call__(self, command: list[bytes]) -> Action:
        with self._lock:
            self.commands.append(command)
        return Action.FORWARD

    def sent_since(self, start: int) -> list[list[bytes]]:
        """The commands recorded since the ``start``-th, but for connection handshakes."""
        with self._lock:
            return [command for command in self.commands[start:] if command[0].upper() not in self.HANDSHAKE]


#: The commands of the once-per-process check that Redis keeps the money.
STARTUP_CHECK = (b"INFO", b"CONFIG")
#: The read of the stored plans, once per key_cache_ttl per process whatever key comes.
PLANS_READ = [b"HGETALL", b"mw:plans"]


def test_unknown_and_known_keys_take_the_same_path_to_the_backend(
    make_scenario: Callable[..., Scenario], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No timing oracle: any well-formed key costs one hash and one lookup by hash; nothing compares it."""
    recorder = Recorder()
    # No flush while a call is measured: the commands the recorder sees meanwhile are the call's own.
    scenario = make_scenario({"pipeline": {"flush_interval": 60.0}}, proxy=recorder)
    accounts, known = scenario.accounts, scenario.key
    revoked = accounts.create_key(CUSTOMER)
    accounts.revoke_key(revoked.key_id)
    near_miss = known[:-1] + ("b" if known[-1] != "b" else "c")
    hashed: list[str] = []
    real_hash = keys_module.hash_key

    def hash_key(text: str) -> str:
        hashed.append(text)
        return real_hash(text)

    monkeypatch.setattr(keys_module, "hash_key", hash_key)

    def call(header: str, presented: str) -> tuple[int, list[list[bytes]]]:
        """One call through a new middleware (no key cached): its status and the commands it sent."""
        hashed.clear()
        middleware = WSGIMeteringMiddleware(bare_wsgi, config=scenario.config, registry=CollectorRegistry())
        start = len(recorder.commands)
        with httpx.Client(transport=httpx.WSGITransport(app=middleware), base_url="http://test") as client:
            status = client.get("/v1/ok/1", headers={header: presented}).status_code
        # A new middleware checks its Redis once first (INFO, CONFIG GET: storage/redis/_checks.py), and
        # the process reads the stored plans (config/_stored.py): neither depends on the key.
        sent = [
            command
            for command in recorder.sent_since(start)
            if command[0].upper() not in STARTUP_CHECK and command != PLANS_READ
        ]
        middleware.drain()  # its event, if any, goes out too (and is searched below)
        return status, sent

    presented_keys = {
        known: True,
        generate_key().plaintext: False,
        near_miss: False,
        revoked.plaintext: False,
        generate_key(live=False).plaintext: False,
    }
    for presented, served in presented_keys.items():
        status, sent = call("Authorization", f"Bearer {presented}")
        key_hash = hashlib.sha256(presented.encode()).hexdigest().encode()
        assert hashed == [presented]
        lookups = [command for command in sent if any(key_hash in argument for argument in command)]
        assert len(lookups) == 1, lookups
        assert sent[0] is lookups[0], "the lookup by hash is the call's first command"
        assert (status == 200) == served, status
    # The backend never sees a key itself, only its hash.
    keys = [presented.encode() for presented in presented_keys]
    assert not [command for command in recorder.commands if any(k in arg for k in keys for arg in command)]
    # Malformed keys are refused before any hash or lookup.
    status, sent = call("X-API-Key", "mw_live_" + "!" * 32)
    assert status == 401
    assert (hashed, sent) == ([], [])


def test_hostile_requests_are_metered_like_any_other(hostile: Scenario) -> None:
    """Huge and duplicated headers, no Host, odd methods, encoded paths: charged once or not at all."""
    app = hostile.app()
    key = hostile.key.encode()
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
    hostile.rollup_once()

    stream = hostile.stream()
    stream.assert_no_duplicates()
    ledger = hostile.books()
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


def test_hostile_units_are_ignored_counted_and_never_charged(hostile: Scenario) -> None:
    """Negative, NaN, infinite, fractional, huge, costly, wrongly typed units and unknown meters: a warning
    and a metric each; the call is charged for itself and its valid units only."""
    app, key = hostile.app(), hostile.key
    kinds = [*HOSTILE_UNITS, "huge-sum"]
    with httpx.Client(base_url=app.url, headers={"Authorization": f"Bearer {key}"}, timeout=10) as client:
        for kind in kinds:
            assert client.get(f"/v1/units/{kind}?kind={kind}").status_code == 200, kind
    metrics = app.metrics()
    output = app.stop()
    hostile.rollup_once()

    rejected = len(kinds) - 1  # all but "valid"; "huge-sum" reports valid values whose total is not
    assert metrics["meterware_units_rejected_total"] == rejected
    assert output.count("meterware: ignored usage") == rejected, output
    stream = hostile.stream()
    stream.assert_no_duplicates()
    dead_letters = [
        dead for shard in range(4) for dead in stream_fields(hostile.server.client(), f"mw:{{s{shard}}}:dead")
    ]
    assert dead_letters == []
    units = {event.route: event.units for event in stream.events}
    valid_tokens = HOSTILE_UNITS["valid"][1]
    assert units["/v1/units/valid"] == {"calls": 1, "tokens": valid_tokens}
    assert units["/v1/units/huge-sum"] == {"calls": 1, "rows": HUGE_SUM[0]}
    assert all(
        units[f"/v1/units/{kind}"] == {"calls": 1} for kind in kinds if kind not in ("valid", "huge-sum")
    )
    ledger = hostile.books()
    assert ledger.calls["success"] == len(kinds)
    assert ledger.tokens == valid_tokens
    assert ledger.spend == ledger.charged == len(kinds) * CALL_PRICE + valid_tokens * TOKEN_PRICE
    assert ledger.reserved == 0
    figures("hostile-units", kinds=kinds, rejected=rejected, charged_micros=ledger.charged)


#: The size of each hostile method and path (the request line is twice that).
HOSTILE_FIELD_BYTES = 100_000
REFUSED_CALLS = 1_000


def test_refused_calls_with_huge_paths_and_methods_leave_redis_almost_untouched(
    make_scenario: Callable[..., Scenario],
) -> None:
    """1,000 calls refused for lack of credits, each with a 100 KB method and a 100 KB path, while another
    customer is served: once flushed and rolled up, Redis has grown by less than 1 MiB, every refusal is
    recorded with bounded fields, and the served customer is charged exactly."""
    # The default flush interval: each flush leaves a batch marker (24 h) per shard, and the suite's
    # 0.05 s would make their number, not the refusals, what grows with a slow machine's flood time.
    # A budget no loaded machine passes: an admission timing out fails open, and a refusal becomes a 200.
    scenario = make_scenario({"pipeline": {"flush_interval": 0.2}, "policy": {"timeout": 5.0}})
    redis_client = scenario.server.client()
    # A headroom like the one of the report (past it, admissions fail, and fail open: calls go free).
    redis_client.config_set("maxmemory", "64mb")
    accounts, served_key = scenario.accounts, scenario.key
    accounts.create_customer("broke", plan="payg")  # no credits: every call is refused with 402
    broke = b"Authorization: Bearer " + accounts.create_key("broke").plaintext.encode()
    # h11 (uvicorn's parser here) refuses a request line past 16 KiB by default: let these reach the app.
    app = scenario.app(options=("--h11-max-incomplete-event-size", str(4 * HOSTILE_FIELD_BYTES)))
    # Warm up (scripts loaded, streams and rollup state made), then measure from a flushed, rolled-up state.
    assert get(app.port, "/v1/ok/warm", b"Authorization: Bearer " + served_key.encode())[0] == 200
    assert get(app.port, "/v1/ok/warm-refused", broke)[0] == 402
    wait_until(lambda: len(Stream.read(redis_client).events) == 2, 10, "the warm-up events flushed")
    scenario.rollup_once()
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
    scenario.rollup_once()
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
    assert_exact(stream, scenario.books(), load.paths(200) | {"/v1/ok/warm"})
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
