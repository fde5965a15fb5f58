"""Redis down at start-up, and killed mid-load then restarted, with and without persistence.

Fail-open: the app keeps serving (keys it resolved before the outage stay usable), events wait in the spool
and are replayed once Redis is back. Fail-closed: calls get a clear 503 problem document and the app
recovers by itself. Either way nothing is lost, nothing is counted or charged twice, and no request waits
longer than its timeout budget.

Without persistence the restarted Redis is empty: what it held is gone with it (that is what no persistence
means). What the app still held must reach the new Redis exactly once. To prove it, writes are paused
(``CLIENT PAUSE WRITE``) and the old Redis's streams read just before the kill; a proxy keeps the app away
from the new Redis until the customer and key are restored. Then every call the client saw succeed must be
in exactly one of the two lifetimes, and charged there.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest

from tests.faults.books import Stream, assert_exact, spool_bytes
from tests.faults.harness import (
    CALL_PRICE,
    CUSTOMER,
    INITIAL_MICROS,
    LATENCY_BOUND,
    MIXED_PATHS,
    TOKEN_PRICE,
    Load,
    Result,
    figures,
    tokens_of,
    wait_until,
)
from tests.faults.proxy import forward_all
from tests.faults.scenario import Scenario, restore

pytestmark = [pytest.mark.faults, pytest.mark.redis, pytest.mark.slow]

#: How long Redis stays away: longer than the key cache TTL below, so the outage outlives cached keys.
OUTAGE_SECONDS = 2.5
KEY_CACHE_TTL = 0.5


def reason(result: Result) -> str | None:
    """The ``reason`` of a meterware problem document, None for any other response."""
    if result.headers.get("content-type") != "application/problem+json":
        return None
    return str(json.loads(result.body)["reason"])


def outage_policy(policy: str) -> dict[str, dict[str, object]]:
    """The configuration's changes: the backend-error ``policy``, and keys cached for less than the outage."""
    return {"policy": {"on_backend_error": policy, "key_cache_ttl": KEY_CACHE_TTL}}


def check_refusals(load: Load, *, refusals: bool) -> None:
    """What the client saw: bounded latency; every 503 is the app's own, or (only if ``refusals`` are
    expected) a clear problem document with ``Retry-After``."""
    slowest = load.slowest()
    assert slowest.seconds <= LATENCY_BOUND, f"{slowest.path} took {slowest.seconds:.2f}s"
    for result in load.snapshot():
        assert result.status is not None, f"{result.path}: {result.error}"
        if result.status != 503:
            continue
        if reason(result) is None:
            assert result.path.startswith("/v1/fail/"), result
        else:
            assert refusals, f"{result.path} refused: {result.body!r}"
            assert reason(result) == "backend_unavailable"
            assert result.headers["retry-after"] == "1"


@pytest.mark.parametrize("policy", ["open", "closed"])
def test_redis_down_at_start_up_then_killed_mid_load_with_persistence(
    policy: str, make_scenario: Callable[..., Scenario]
) -> None:
    """App started without Redis, then Redis SIGKILLed under load and restarted (AOF): exact totals."""
    scenario = make_scenario(outage_policy(policy), persistent=True)
    server, key = scenario.server, scenario.key
    server.kill()

    # 1. Down at start-up: the app starts, refuses clearly (keys cannot be resolved), recovers by itself.
    app = scenario.app()
    with Load(app.url, key, MIXED_PATHS, threads=2) as startup:
        time.sleep(1.0)
        restarted = time.monotonic()  # answers before this came while Redis was down
        server.start()
        wait_until(
            lambda: any(r.at > restarted and r.status == 200 for r in startup.snapshot()), 10, "recovery"
        )
    refused = [r for r in startup.snapshot() if r.at < restarted]
    assert refused, "no call was made while Redis was down"
    assert {reason(r) for r in refused} == {"backend_unavailable"}, {r.status for r in refused}
    check_refusals(startup, refusals=True)

    # 2. Killed mid-load, restarted from its append-only file.
    with Load(app.url, key, MIXED_PATHS, threads=4) as load:
        time.sleep(1.5)
        server.kill()
        killed = time.monotonic()
        time.sleep(OUTAGE_SECONDS)
        server.start()
        back = time.monotonic()
        time.sleep(1.5)
    wait_until(lambda: spool_bytes(scenario.spool) == 0, 15, "the spool was never replayed")
    app.stop()
    assert spool_bytes(scenario.spool) == 0
    time.sleep(2.2)  # admissions applied just before the kill, reply lost: refunded after 2 s
    scenario.rollup_once()

    check_refusals(load, refusals=policy == "closed")
    during = [r for r in load.snapshot() if killed < r.at < back and r.path.startswith("/v1/ok/")]
    assert during, "no call was made during the outage"
    if policy == "open":
        assert all(r.status == 200 for r in during), "fail-open stopped serving during the outage"
    else:
        assert any(reason(r) == "backend_unavailable" for r in during)
    after = [r for r in load.snapshot() if r.at > back + 1.0 and r.path.startswith("/v1/ok/")]
    assert after, "no call was made after the outage"
    failed = [(r.path, r.status, reason(r), f"{r.at - back:+.2f}s") for r in after if r.status != 200]
    assert not failed, f"the app did not recover by itself: {failed[:5]}"

    stream = scenario.stream()
    ledger = scenario.books()
    succeeded = startup.paths(200) | load.paths(200)
    assert_exact(stream, ledger, succeeded, tokens=tokens_of(succeeded))
    # Refused calls of a known customer are recorded (never charged); refused lookups have no customer.
    # Both phases count: just after the restart a key can resolve and its admission still time out.
    everything = startup.snapshot() + load.snapshot()
    refused_paths = {r.path.split("?")[0] for r in everything if reason(r) == "backend_unavailable"}
    assert stream.paths("rejected") <= refused_paths
    app_failures = [r for r in everything if r.status == 503 and reason(r) is None]
    assert ledger.calls["server_error"] == len(app_failures)
    figures(
        f"redis-outage-aof-{policy}",
        requests=len(everything),
        succeeded=len(succeeded),
        refused_503=len(refused_paths),
        served_during_outage=sum(1 for r in during if r.status == 200),
        events=len(stream.events),
        charged_micros=ledger.charged,
        slowest_seconds=round(max(startup.slowest().seconds, load.slowest().seconds), 3),
    )


def test_redis_killed_mid_load_without_persistence_fail_open(make_scenario: Callable[..., Scenario]) -> None:
    """Redis without persistence SIGKILLed under load: what the app held reaches the new Redis once."""
    scenario = make_scenario(outage_policy("open"), proxy=forward_all)
    server, proxy = scenario.server, scenario.proxy
    assert proxy is not None
    customer = scenario.accounts.customer(CUSTOMER)
    app = scenario.app()

    with Load(app.url, scenario.key, MIXED_PATHS, threads=4) as load:
        time.sleep(1.5)
        # Freeze the old Redis's data: writes wait, replies of applied writes go out, then read it all.
        client = server.client()
        client.execute_command("CLIENT", "PAUSE", "10000", "WRITE")
        time.sleep(0.3)
        before = Stream.read(client)
        old_balance = scenario.open_accounts().balance(CUSTOMER)
        server.kill()
        killed = time.monotonic()
        proxy.block()  # the app cannot reach the new Redis until the customer is restored
        time.sleep(OUTAGE_SECONDS)
        server.start()
        restore(scenario.open_accounts(), customer, scenario.new_key)
        proxy.unblock()
        back = time.monotonic()
        time.sleep(1.5)
    wait_until(lambda: spool_bytes(scenario.spool) == 0, 15, "the spool was never replayed")
    app.stop()
    time.sleep(2.2)
    scenario.rollup_once()

    check_refusals(load, refusals=False)
    during = [r for r in load.snapshot() if killed < r.at < back and r.path.startswith("/v1/ok/")]
    assert during, "no call was made during the outage"
    assert all(r.status == 200 for r in during), "fail-open stopped serving during the outage"

    after = scenario.stream()
    ledger = scenario.books()
    after.assert_no_duplicates()
    before.assert_no_duplicates()
    succeeded = load.paths(200)
    old, new = before.paths("success"), after.paths("success")
    assert not old & new, f"{len(old & new)} calls are in both lifetimes of Redis"
    assert old | new == succeeded, f"{len(succeeded - old - new)} successes lost"
    old_charged = INITIAL_MICROS - old_balance.balance
    assert old_charged == before.charged()
    assert ledger.spend == after.charged() == ledger.charged
    assert ledger.calls["success"] == len(new)
    assert ledger.reserved == 0
    assert old_charged + ledger.charged == len(succeeded) * CALL_PRICE + tokens_of(succeeded) * TOKEN_PRICE
    figures(
        "redis-outage-none-open",
        requests=len(load.snapshot()),
        succeeded=len(succeeded),
        in_old_redis=len(old),
        replayed_into_new_redis=len(new),
        served_during_outage=len(during),
        charged_micros=old_charged + ledger.charged,
        slowest_seconds=round(load.slowest().seconds, 3),
    )
