"""The credits ledger: burn order, expiry, and balance == sum(ledger) under a random mix and real traffic."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

import meterware
from meterware import Accounts, Config, MeteringMiddleware
from meterware.billing.ledger import GRANT_PRIORITY, PURCHASE_PRIORITY, replay
from meterware.errors import UsageError
from meterware.events import decode_batch, format_event_id
from meterware.rollup import RollupWorker
from meterware.storage import open_storage
from meterware.storage.base import LedgerEntry

CREDIT = 1_000_000


def entry(kind: str, amount: int, grant: str = "", priority: int = 0, expires_ms: int = 0) -> LedgerEntry:
    return LedgerEntry(kind, amount, grant=grant, priority=priority, expires_ms=expires_ms)


def grant(name: str, amount: int, priority: int = GRANT_PRIORITY, expires_ms: int = 0) -> LedgerEntry:
    return entry("grant", amount, name, priority, expires_ms)


@pytest.mark.parametrize(
    ("entries", "remaining", "debt"),
    [
        pytest.param(
            [grant("paid", 10, PURCHASE_PRIORITY), grant("promo", 10), entry("charge", -4)],
            {"paid": 10, "promo": 6},
            0,
            id="promotional-before-paid",
        ),
        pytest.param(
            [grant("late", 10, expires_ms=9000), grant("soon", 10, expires_ms=5000), entry("charge", -12)],
            {"late": 8, "soon": 0},
            0,
            id="earlier-expiry-first",
        ),
        pytest.param(
            [grant("never", 10), grant("expiring", 10, expires_ms=5000), entry("charge", -3)],
            {"never": 10, "expiring": 7},
            0,
            id="no-expiry-last",
        ),
        pytest.param(
            [grant("old", 10), grant("new", 10), entry("charge", -3)],
            {"old": 7, "new": 10},
            0,
            id="older-first-on-a-tie",
        ),
        pytest.param(
            [grant("a", 5), entry("charge", -8), grant("b", 10)],
            {"a": 0, "b": 7},
            0,
            id="a-debt-is-paid-by-the-next-grant",
        ),
        pytest.param(
            [grant("a", 5), entry("charge", -8)],
            {"a": 0},
            3,
            id="uncovered-charge-is-a-debt",
        ),
        pytest.param(
            [
                grant("a", 10, expires_ms=5000),
                entry("charge", -4),
                entry("expiry", -6, "a"),
                entry("charge", -1),
            ],
            {"a": 0},
            1,
            id="an-expired-grant-is-never-consumed",
        ),
        pytest.param(
            [grant("a", 10), entry("adjustment", -4), grant("b", 5, PURCHASE_PRIORITY)],
            {"a": 6, "b": 5},
            0,
            id="negative-adjustment-burns-like-a-charge",
        ),
    ],
)
def test_burn_order(entries: list[LedgerEntry], remaining: dict[str, int], debt: int) -> None:
    """Charges consume grants by priority, then expiry, then age; what nothing covers is a debt."""
    state = replay(entries)
    assert {lot.id: lot.remaining for lot in state.lots} == remaining
    assert state.debt == debt
    assert sum(lot.remaining for lot in state.lots) - state.debt == state.balance


@pytest.mark.parametrize(
    ("now_ms", "due"),
    [
        pytest.param(4999, [], id="before-expiry"),
        pytest.param(5000, [("soon", -7)], id="at-the-instant"),
        pytest.param(9000, [("soon", -7), ("late", -10)], id="both"),
    ],
)
def test_due_expiries(now_ms: int, due: list[tuple[str, int]]) -> None:
    """A grant is due at its expiry instant, for what is left of it."""
    state = replay(
        [grant("soon", 10, expires_ms=5000), grant("late", 10, expires_ms=9000), entry("charge", -3)]
    )
    assert state.due(now_ms) == due


# -- through the Accounts API, on memory and a real Redis -------------------------------------------------


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def storage_url(request: pytest.FixtureRequest) -> str:
    """A fresh memory store, or a real redis-server."""
    if request.param == "memory":
        return f"memory://ledger-{uuid.uuid4().hex}"
    url: str = request.getfixturevalue("redis_url")
    return url


def make_config(url: str, spool: Path) -> Config:
    return Config.from_dict(
        {
            "storage": {"url": url, "shards": 4},
            "meters": {
                "calls": {"aggregation": "count", "source": "call"},
                "tokens": {"aggregation": "sum", "source": "handler"},
                "peak": {"aggregation": "max", "source": "handler"},
            },
            "plans": {
                "payg": {
                    "prepaid": True,
                    "meters": {"calls": {"price": "0.01"}, "tokens": {"price": "0.0001"}},
                },
                "invoiced": {"meters": {"calls": {"price": "0.5"}}},
            },
            "pipeline": {"flush_interval": 0.01, "spool_dir": str(spool)},
            "policy": {"timeout": 5.0},
        }
    )


@pytest.fixture
def accounts(storage_url: str, tmp_path: Path) -> Iterator[Accounts]:
    config = make_config(storage_url, tmp_path / "spool")
    accounts = Accounts(open_storage(config.storage, shards=config.shards), config)
    yield accounts
    accounts.close()


def assert_balanced(accounts: Accounts, customer: str) -> None:
    """The balance is the sum of the ledger, and the grants' remainders minus the debt."""
    ledger = accounts.ledger(customer)
    balance = accounts.balance(customer).balance
    assert balance == sum(e.amount for e in ledger)
    state = replay(ledger)
    assert sum(lot.remaining for lot in state.lots) - state.debt == balance
    assert all(lot.remaining >= 0 for lot in state.lots)


def test_grants_record_who_why_and_burn_in_order(accounts: Accounts) -> None:
    """A purchase and a grant are ledger entries with actor and reason; the promotional grant burns first."""
    accounts.create_customer("acme", plan="payg")
    accounts.grant_credits("acme", "10", kind="purchase", reason="invoice 42", actor="alice")
    accounts.grant_credits("acme", "2", reason="welcome", actor="bob")
    accounts.adjust_credits("acme", "-0.5", reason="disputed", actor="carol")
    kinds = [(e.kind, e.amount, e.actor, e.reason) for e in accounts.ledger("acme")]
    assert kinds == [
        ("purchase", 10 * CREDIT, "alice", "invoice 42"),
        ("grant", 2 * CREDIT, "bob", "welcome"),
        ("adjustment", -CREDIT // 2, "carol", "disputed"),
    ]
    assert [(g.kind, g.remaining) for g in accounts.grants("acme")] == [
        ("purchase", 10 * CREDIT),
        ("grant", 3 * CREDIT // 2),
    ]
    assert_balanced(accounts, "acme")


def test_the_plain_grant_call_still_works(accounts: Accounts) -> None:
    """grant_credits(customer, amount) keeps working and is a ledger entry."""
    accounts.create_customer("acme", plan="payg")
    assert accounts.grant_credits("acme", "25.50").balance == 25_500_000
    assert [(e.kind, e.priority) for e in accounts.ledger("acme")] == [("grant", GRANT_PRIORITY)]


def test_expiry_removes_what_is_left_once(accounts: Accounts) -> None:
    """At its expiry instant, a grant loses what is left of it, with one expiry entry however often run."""
    accounts.create_customer("acme", plan="payg")
    accounts.grant_credits("acme", "5", expires_at=1000.0)
    accounts.grant_credits("acme", "3", kind="purchase")
    accounts.adjust_credits("acme", "-1", reason="used")
    assert accounts.expire_credits(at=999.9) == []
    [(customer, grant_id, removed)] = accounts.expire_credits(at=1000.0)
    assert (customer, removed) == ("acme", 4 * CREDIT)
    assert accounts.expire_credits(at=2000.0) == []
    assert accounts.expire_credits(at=2000.0, customer_id="acme") == []
    assert [e.kind for e in accounts.ledger("acme")] == ["grant", "purchase", "adjustment", "expiry"]
    assert accounts.balance("acme").balance == 3 * CREDIT
    assert [(g.id == grant_id, g.expired, g.remaining) for g in accounts.grants("acme")] == [
        (True, True, 0),
        (False, False, 3 * CREDIT),
    ]
    assert_balanced(accounts, "acme")


def test_the_rollup_worker_expires_due_grants_on_its_own(accounts: Accounts) -> None:
    """No cron needed: the worker's housekeeping expires a grant once its time has passed, once."""
    accounts.create_customer("acme", plan="payg")
    accounts.grant_credits("acme", "5", expires_at=time.time() - 1)
    accounts.grant_credits("acme", "3", kind="purchase")
    roll_up(accounts)
    roll_up(accounts)
    assert [e.kind for e in accounts.ledger("acme")] == ["grant", "purchase", "expiry"]
    assert accounts.balance("acme").balance == 3 * CREDIT
    assert_balanced(accounts, "acme")


def test_a_stale_expiry_is_refused_and_recomputed(accounts: Accounts) -> None:
    """An expiry computed before the ledger moved is not written (the ledger decides what was left)."""
    accounts.create_customer("acme", plan="payg")
    accounts.grant_credits("acme", "5", expires_at=1000.0)
    state = replay(accounts.ledger("acme"))
    accounts.adjust_credits("acme", "-2", reason="meanwhile")
    assert not accounts.storage.expire_grants("acme", state.last_id, state.due(1_000_000), "test")
    [(_, _, removed)] = accounts.expire_credits(at=1000.0)
    assert removed == 3 * CREDIT
    assert accounts.balance("acme").balance == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"amount": "0"}, "amount must be positive", id="zero"),
        pytest.param({"amount": "1", "kind": "gift"}, "kind must be", id="kind"),
        pytest.param({"amount": "1", "priority": -1}, "priority must be", id="priority"),
        pytest.param({"amount": "1", "expires_at": -5.0}, "expires_at must be", id="expiry"),
    ],
)
def test_bad_grants_are_refused(accounts: Accounts, kwargs: dict[str, Any], message: str) -> None:
    """A bad grant is refused with a message naming the field, and writes nothing."""
    accounts.create_customer("acme", plan="payg")
    with pytest.raises(UsageError, match=message):
        accounts.grant_credits("acme", **kwargs)
    assert accounts.ledger("acme") == []


# -- the invariant under real concurrent traffic --------------------------------------------------------


async def api(scope: Scope, receive: Receive, send: Send) -> None:
    """Report ``tokens`` units from the query string; fail with 500 on /fail."""
    query = dict(part.split("=") for part in scope["query_string"].decode().split("&") if part)
    meterware.usage.add("tokens", int(query.get("tokens", "0")))
    status = 500 if scope["path"] == "/fail" else 200
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def traffic(config: Config, keys: list[str], calls: int, seed: int) -> None:
    """Concurrent calls through the ASGI middleware, then drain the buffer and roll up."""
    rng = random.Random(seed)
    middleware = MeteringMiddleware(api, config=config)

    async def serve() -> None:
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            await asyncio.gather(
                *(
                    client.get(
                        rng.choice(["/ok", "/ok", "/fail"]),
                        params={"tokens": rng.randrange(0, 300)},
                        headers={"Authorization": f"Bearer {rng.choice(keys)}"},
                    )
                    for _ in range(calls)
                )
            )
        await middleware.drain()
        # Connections belong to this loop, which is ending (as the lifespan's shutdown does).
        await middleware.storage.aclose()
        await middleware.flusher.storage.aclose()

    asyncio.run(serve())


def roll_up(accounts: Accounts) -> None:
    """Roll up everything (under the owner name memory:// uses for its in-process rollup, whose lease
    would otherwise keep the shards for a while)."""
    RollupWorker(accounts.storage, accounts.config, owner=f"in-process-{os.getpid()}").drain()


def event_ids(accounts: Accounts, customer: str) -> list[str]:
    """Ids of the customer's billable events in the streams."""
    found = []
    for shard in range(accounts.storage.shards):
        for stream_entry in accounts.storage.read_stream(shard, "0-0", 10_000):
            if b"n" in stream_entry.fields or b"b" not in stream_entry.fields:
                continue
            for event in decode_batch(stream_entry.fields[b"b"]):
                if event.customer == customer and event.billable:
                    found.append(format_event_id(event.id))
    return found


def test_balance_equals_the_ledger_after_a_random_mix_and_concurrent_traffic(accounts: Accounts) -> None:
    """Grants, purchases, adjustments, expiries, corrections and concurrent calls interleaved at random:
    after each step every customer's balance is the sum of its ledger, and its grants account for it."""
    rng = random.Random(7)
    customers = ["acme", "globex"]
    keys = []
    for customer in customers:
        accounts.create_customer(customer, plan="payg", anchor=0)
        accounts.grant_credits(customer, "3", kind="purchase")
        keys.append(accounts.create_key(customer).plaintext)
    voided: set[str] = set()
    # Every kind of operation, twice, in a random order after some first traffic.
    actions = ["grant", "purchase", "adjust", "expire", "void", "amend", "traffic"] * 2
    rng.shuffle(actions)
    done: list[str] = []
    for step, action in enumerate(["traffic", *actions]):
        customer = rng.choice(customers)
        if action == "grant":
            expires = rng.choice([None, 1.0, 4e9])
            accounts.grant_credits(
                customer, f"{rng.randrange(1, 5)}.25", priority=rng.randrange(0, 60), expires_at=expires
            )
        elif action == "purchase":
            accounts.grant_credits(customer, str(rng.randrange(1, 5)), kind="purchase")
        elif action == "adjust":
            accounts.adjust_credits(customer, rng.choice(["-0.4", "0.7"]), reason="random")
        elif action == "expire":
            accounts.expire_credits()
        elif action in ("void", "amend"):
            candidates = [event for event in event_ids(accounts, customer) if event not in voided]
            if candidates:
                event_id = rng.choice(candidates)
                done.append(action)
                if action == "void":
                    accounts.void_event(event_id, reason="random", customer_id=customer)
                    voided.add(event_id)
                else:
                    accounts.amend_event(
                        event_id,
                        units={"tokens": rng.randrange(0, 300)},
                        reason="random",
                        customer_id=customer,
                    )
        else:
            traffic(accounts.config, keys, 40, seed=step)
        for name in customers:
            assert_balanced(accounts, name)
    assert sorted(done) == ["amend", "amend", "void", "void"]
    roll_up(accounts)
    for name in customers:
        assert_balanced(accounts, name)
        # The spend the rollup saw is what the ledger charged, less what corrections gave back.
        spend = accounts.usage(name).spend
        ledger = accounts.ledger(name)
        charged = -sum(e.amount for e in ledger if e.kind == "charge")
        refunded = sum(e.amount for e in ledger if e.kind == "refund")
        assert spend == charged - refunded


# -- the command line -----------------------------------------------------------------------------------


@pytest.mark.redis
def test_cli_grants_adjusts_expires_and_shows_the_ledger(
    redis_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`meterware credits grant/adjust/expire/ledger` write and show who/why; the JSON balance is the sum."""
    from meterware.cli import main
    from tests.test_cli import EXAMPLE

    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> str:
        assert main([*args, "--storage", redis_url, "--config", str(EXAMPLE)]) == 0
        return capsys.readouterr().out

    run("customers", "create", "acme", "--plan", "payg")
    run("credits", "grant", "acme", "10", "--kind", "purchase", "--reason", "order 7", "--actor", "alice")
    run("credits", "grant", "acme", "2", "--expires", "2020-01-01", "--priority", "1")
    run("credits", "adjust", "acme", "-0.5", "--reason", "goodwill reversal", "--actor", "bob")
    assert "removed" in run("credits", "expire")
    assert run("credits", "expire") == "no grant to expire\n"
    text = run("credits", "ledger", "acme")
    assert "purchase" in text
    assert "order 7" in text
    assert "balance 10.000000 credits" in text
    data = json.loads(run("credits", "ledger", "acme", "--json"))
    assert [e["kind"] for e in data["entries"]] == ["purchase", "grant", "adjustment", "expiry"]
    assert data["balance_micros"] == 10 * CREDIT
    assert [(g["kind"], g["remaining_micros"]) for g in data["grants"]] == [
        ("purchase", 10 * CREDIT),
        ("grant", 0),
    ]
