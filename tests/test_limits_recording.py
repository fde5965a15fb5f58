"""``record()`` under a spend cap: what records cost counts with what calls cost, and never passes it."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meterware import Accounts, Config, Recorder, Refused
from meterware.rollup import RollupWorker


@pytest.fixture
def config(backend_url: str, tmp_path: Path) -> Config:
    return Config.from_dict(
        {
            "storage": {"url": backend_url, "shards": 4},
            "meters": {
                "calls": {"aggregation": "count", "source": "call"},
                "tokens": {"aggregation": "sum", "source": "handler"},
            },
            "plans": {
                # Postpaid: nothing stops a call but the cap (0.10 credits a period).
                "capped": {
                    "spend_cap": "0.10",
                    "meters": {"calls": {"price": "0.01"}, "tokens": {"price": "0.0001"}},
                }
            },
            "pipeline": {"flush_interval": 0.01, "spool_dir": str(tmp_path / "spool")},
            "policy": {"timeout": 5.0},
        }
    )


@pytest.fixture
def accounts(config: Config) -> Iterator[Accounts]:
    accounts = Accounts.open(config)
    yield accounts
    accounts.close()


def test_a_record_is_refused_past_the_spend_cap(config: Config, accounts: Accounts) -> None:
    """900 tokens (0.09) pass; 200 more (0.02) would pass 0.10 and are refused; 100 (0.01) reach it."""
    accounts.create_customer("acme", plan="capped")
    with Recorder(config) as recorder:
        recorder.record("acme", {"tokens": 900}, event_id="a")
        with pytest.raises(Refused) as refused:
            recorder.record("acme", {"tokens": 200}, event_id="b")
        assert refused.value.reason == "spend_cap_reached"
        recorder.record("acme", {"tokens": 100}, event_id="c")


@pytest.mark.parametrize("deal", [False, True], ids=["plan", "deal"])
def test_calls_and_records_share_the_spend_cap_without_passing_it(
    config: Config, accounts: Accounts, deal: bool
) -> None:
    """100 calls (0.01 each) through the WSGI middleware and 100 records (0.001 each) from 32 threads
    against a 0.10 cap: what is admitted costs at most 0.10 (refused only once less than a call was left),
    the refusals are spend_cap_reached, and the period's spend is exactly what was admitted. With a deal
    (the customer's own terms from the period's start: calls 0.005, tokens 0.00005; its own cap 0.05),
    the same at those prices under that cap."""
    from werkzeug.test import Client

    from meterware.wsgi import WSGIMeteringMiddleware

    def app(environ: Any, start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    accounts.create_customer("acme", plan="capped")
    call_price, record_price, cap = 10_000, 1_000, 100_000
    if deal:
        terms = {"calls.price": "0.005", "tokens.price": "0.00005"}
        accounts.set_overrides("acme", terms, effective_from="period_start", actor="sales")
        accounts.set_spend_cap("acme", "0.05")
        call_price, record_price, cap = 5_000, 500, 50_000
    recorder = Recorder(config)
    middleware = WSGIMeteringMiddleware(app, config, customer_getter=lambda environ: "acme")
    admitted = {"calls": 0, "records": 0}
    reasons: set[str] = set()
    lock = threading.Lock()
    jobs = sorted([("call", n) for n in range(100)] + [("record", n) for n in range(100)], key=lambda j: j[1])

    def worker(mine: list[tuple[str, int]]) -> None:
        client = Client(middleware)
        for kind, number in mine:
            if kind == "call":
                response = client.get("/v1/work", buffered=True)
                ok = response.status_code == 200
                reason = "" if ok else json.loads(response.get_data())["reason"]
            else:
                try:
                    recorder.record("acme", {"tokens": 10}, event_id=f"r-{number}-{uuid.uuid4().hex}")
                    ok, reason = True, ""
                except Refused as refused:
                    ok, reason = False, refused.reason
            with lock:
                admitted["calls" if kind == "call" else "records"] += ok
                if reason:
                    reasons.add(reason)

    threads = [threading.Thread(target=worker, args=(jobs[start::32],)) for start in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    spent = admitted["calls"] * call_price + admitted["records"] * record_price
    assert cap - call_price < spent <= cap
    assert reasons == {"spend_cap_reached"}
    middleware.drain()
    recorder.close()
    RollupWorker(accounts.storage, config).drain()
    assert accounts.usage("acme").spend == spent


def terms_config(backend_url: str, tmp_path: Path, token_price: str) -> Config:
    """A postpaid plan pricing tokens at ``token_price`` credits, capped at 1.00 credits a period."""
    return Config.from_dict(
        {
            "storage": {"url": backend_url, "shards": 4},
            "meters": {"tokens": {"aggregation": "sum", "source": "handler"}},
            "plans": {"metered": {"spend_cap": "1.00", "meters": {"tokens": {"price": token_price}}}},
            "pipeline": {"flush_interval": 0.01, "spool_dir": str(tmp_path / "spool")},
            "policy": {"timeout": 5.0},
        }
    )


@pytest.mark.parametrize(
    ("plan_price", "new_price", "records", "spent"),
    [
        # 0.60 charged at 1 µcredit a token; at 3: 100,000 tokens (0.30) pass where the units at the new
        # price (1.80) refused them, 50,000 more (0.15) would pass 1.00, 30,000 (0.09) reach 0.99.
        pytest.param(
            "0.000001",
            "0.000003",
            [(600_000, True), (100_000, True), (50_000, False), (30_000, True)],
            990_000,
            id="rise",
        ),
        # 0.90 charged at 3 µcredits a token; at 1: 200,000 tokens (0.20) are refused where the units at
        # the new price (0.30) let them through, 100,000 (0.10) reach 1.00 exactly, 1 token passes it.
        pytest.param(
            "0.000003",
            "0.000001",
            [(300_000, True), (200_000, False), (100_000, True), (1, False)],
            1_000_000,
            id="cut",
        ),
    ],
)
def test_new_terms_leave_what_the_cap_counted_as_charged(
    backend_url: str,
    tmp_path: Path,
    plan_price: str,
    new_price: str,
    records: list[tuple[int, bool]],
    spent: int,
) -> None:
    """A customer's records charged at the plan's token price, then their own terms in force from now
    (``Accounts.set_overrides``): the cap counts what each record was charged, whatever the price now."""
    config = terms_config(backend_url, tmp_path, plan_price)
    accounts = Accounts.open(config)
    hour = int(time.time()) // 3600 * 3600
    accounts.create_customer("acme", plan="metered", anchor=hour)  # the period starts at a whole hour
    (tokens, served), *later = records
    with Recorder(config) as recorder:
        assert recorder.record("acme", {"tokens": tokens}, event_id="first").recorded == served
    accounts.set_overrides("acme", {"tokens.price": new_price}, effective_from=hour, actor="sales")
    with Recorder(config) as recorder:
        for number, (tokens, served) in enumerate(later):
            if served:
                recorder.record("acme", {"tokens": tokens}, event_id=f"r-{number}")
            else:
                with pytest.raises(Refused) as refused:
                    recorder.record("acme", {"tokens": tokens}, event_id=f"r-{number}")
                assert refused.value.reason == "spend_cap_reached"
    RollupWorker(accounts.storage, config).drain()
    assert accounts.usage("acme").spend == spent
    accounts.close()
