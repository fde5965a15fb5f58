"""Calls this process has finished count at the next admission, flushed or not.

Every test here holds the flusher back (a flush interval of a minute), so what the backend knows is only
what admissions wrote: the finished calls' settlements all wait in the buffer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.behaviour.conftest import Api

ADMISSIONS = ["strict", "lease"]


@pytest.fixture(params=ADMISSIONS)
def held_back(request: pytest.FixtureRequest, make_api: Any, tmp_path: Path) -> Api:
    """An app whose flusher does not flush during the test, in each admission mode."""
    return make_api(  # type: ignore[no-any-return]
        pipeline={"flush_interval": 60, "spool_dir": str(tmp_path / "held-spool")},
        policy={"admission": request.param, "lease_calls": 10},
    )


def test_finished_failures_never_cause_a_refusal_of_credits(held_back: Api) -> None:
    """Three calls answered 502 hold nothing once they have finished: with 3 credits at 1 a call, the
    next three calls are served at once, and the fourth is refused."""
    key = held_back.customer("percall", credits="0.03")
    assert [held_back.call("GET", "/v1/fail", key).status_code for _ in range(3)] == [502] * 3
    statuses = [held_back.call("GET", "/v1/hello", key).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 402]
    held_back.settle()
    assert held_back.balance(key).balance == 0
    assert held_back.balance(key).reserved == 0


def test_finished_failures_never_cause_a_refusal_of_quota(held_back: Api) -> None:
    """Failed calls give their hold of a hard quota back at once: 5 failures, then 5 calls served."""
    key = held_back.customer("free")
    assert [held_back.call("GET", "/v1/fail", key).status_code for _ in range(5)] == [502] * 5
    statuses = [held_back.call("GET", "/v1/hello", key).status_code for _ in range(6)]
    assert statuses == [200] * 5 + [429]
    held_back.settle()
    assert held_back.usage(key).meters["calls"] == 5


def test_finished_calls_charges_count_before_they_are_flushed(held_back: Api) -> None:
    """On a plan priced by tokens the handler reports, 0.01 credits pay for 100 tokens: sequential calls
    of 60 tokens are served while the balance is positive after the finished ones, so exactly two."""
    key = held_back.customer("tokens", credits="0.01")
    statuses = [held_back.call("GET", "/v1/chat-sync?tokens=60", key).status_code for _ in range(20)]
    assert statuses == [200, 200] + [402] * 18
    held_back.settle()
    # The overspend is the second call's: it was admitted with 0.004 credits left and used 0.006.
    assert held_back.balance(key).balance == 10_000 - 2 * 60 * 100


def test_finished_calls_count_in_the_quota_headers(make_api: Any, tmp_path: Path) -> None:
    """What a response says is left of a hard quota counts the calls finished before it (each call
    admitted on its own: a lease's calls say what its block left when it was granted)."""
    api = make_api(pipeline={"flush_interval": 60, "spool_dir": str(tmp_path / "held-spool")})
    key = api.customer("free")
    api.call("GET", "/v1/hello", key)
    api.call("GET", "/v1/fail", key)
    header = api.call("GET", "/v1/hello", key).headers["ratelimit"]
    assert '"quota-calls";r=3' in header


def test_calls_across_the_included_units_never_overspend(held_back: Api) -> None:
    """5 calls included, then 0.01 credits each, 0.05 credits granted: calls on two routes (two leases
    under lease admission) are served while they are paid for, and the balance never goes below zero."""
    key = held_back.customer("starter", credits="0.05")
    statuses = [held_back.call("GET", ("/v1/hello", "/v1/heavy")[n % 2], key).status_code for n in range(14)]
    assert set(statuses) <= {200, 402}
    held_back.settle()
    balance = held_back.balance(key)
    assert balance.balance >= 0
    assert balance.reserved == 0
    served = statuses.count(200)
    assert balance.balance == 50_000 - max(0, served - 5) * 10_000
