"""The overspend bound on plans priced by what the handler reports, under a real server on real Redis.

A call's tokens are known only when it ends, so a call is admitted while the balance stays positive after
what every finished call of the process used (flushed or not): the balance can go below zero only by the
tokens of the calls in flight at that instant. With 50 client connections, at most 50 calls are in flight.
One server process (gunicorn: one gthread worker), as the bound is per process: another process's finished
calls count once they are flushed. The backend is given time (this is about the bound, not an outage:
fail-open serves a call the backend could not admit in time).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.faults.harness import TOKEN_PRICE, Load, figures
from tests.faults.scenario import Scenario
from tests.helpers import new_customer, paths_cycling

pytestmark = [pytest.mark.faults, pytest.mark.redis, pytest.mark.slow]

CONCURRENCY = 50
TOKENS_PER_CALL = 60
CREDITS = "0.01"  # 10,000 micro-credits: 100 tokens' worth


@pytest.mark.parametrize("kind", ["uvicorn", "gunicorn"])
def test_concurrent_token_calls_overspend_at_most_the_calls_in_flight(
    kind: str, make_scenario: Callable[..., Scenario]
) -> None:
    """1,000 calls of 60 tokens from 50 connections against 0.01 credits: the balance ends at or above
    -(50 x 60 tokens), every call served is charged, and the rest are refused with 402."""
    plans = {"tokens": {"prepaid": True, "meters": {"tokens": {"price": "0.0001"}}}}
    policy = {"timeout": 5.0, "on_backend_error": "closed"}
    # Flushes half a second apart (the default is 0.2 s): finished calls wait a while to be written.
    scenario = make_scenario({"plans": plans, "policy": policy, "pipeline": {"flush_interval": 0.5}})
    app = scenario.app(kind, workers=1)
    accounts = scenario.accounts
    key = new_customer(accounts, "thin", CREDITS, plan="tokens").plaintext
    traffic = paths_cycling([f"/v1/tokens/{{}}?n={TOKENS_PER_CALL}"])

    with Load(app.url, key, traffic, threads=CONCURRENCY, limit=1_000) as load:
        deadline = time.monotonic() + 60
        while len(load.snapshot()) < 1_000 and time.monotonic() < deadline:
            time.sleep(0.05)
    app.stop()
    scenario.rollup_once()
    statuses = load.statuses()
    balance = accounts.balance("thin")
    served = statuses[200]
    figures(
        f"overspend[{kind}]",
        requests=sum(statuses.values()),
        served=served,
        refused=statuses[402],
        balance=balance.balance,
        bound=-CONCURRENCY * TOKENS_PER_CALL * TOKEN_PRICE,
    )
    assert sum(statuses.values()) == 1_000
    assert set(statuses) <= {200, 402}, statuses
    assert balance.balance == 10_000 - served * TOKENS_PER_CALL * TOKEN_PRICE
    assert balance.balance >= -CONCURRENCY * TOKENS_PER_CALL * TOKEN_PRICE
    assert balance.reserved == 0
    assert accounts.usage("thin").meters["tokens"] == served * TOKENS_PER_CALL
