"""Limits on what costs money, through the middleware: a route's and a key's rate limits, the concurrency
cap's header and the spend cap (a plan's, and a customer's set by the seller and lowered by the customer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from meterware.errors import UsageError
from tests.behaviour.conftest import Api


@pytest.fixture(params=["starlette", "flask"])
def framework(request: pytest.FixtureRequest) -> str:
    """An ASGI and a WSGI adapter (the limits are the request core's, shared by every adapter)."""
    return str(request.param)


PLANS = {
    "chatty": {
        "rate_limits": ["5/minute"],
        "routes": {"/v1/items/*": {"rate_limits": ["2/minute"]}},
    },
    "open": {},
    "capped": {"meters": {"calls": {"included": 1, "price": "0.5"}}, "spend_cap": "1.20"},
    "capped_prepaid": {"prepaid": True, "meters": {"calls": {"price": "0.5"}}, "spend_cap": "1.00"},
    "inflight": {"concurrency": 3},
}


def test_a_route_limit_applies_to_its_route_only(make_api: Any) -> None:
    """Plan 5/minute, /v1/items/* 2/minute: the third items call is refused for 30 s with its own entry,
    and /v1/hello still passes (counting in the plan's limit)."""
    api: Api = make_api(plans=PLANS)
    key = api.customer("chatty")
    first = api.call("GET", "/v1/items/1", key)
    assert first.status_code == 200
    assert first.headers["ratelimit-policy"] == '"rate-60s";q=5;w=60, "route-rate-60s";q=2;w=60'
    assert first.headers["ratelimit"] == '"rate-60s";r=4;t=12, "route-rate-60s";r=1;t=30'
    assert api.call("GET", "/v1/items/2", key).status_code == 200
    refused = api.call("GET", "/v1/items/3", key)
    assert refused.status_code == 429
    assert refused.json()["reason"] == "rate_limited"
    assert refused.headers["retry-after"] == "30"
    assert '"route-rate-60s";r=0;t=60' in refused.headers["ratelimit"]
    hello = api.call("GET", "/v1/hello", key)
    assert hello.status_code == 200
    assert hello.headers["ratelimit"] == '"rate-60s";r=2;t=36'


def test_a_key_limit_counts_that_keys_calls(make_api: Any) -> None:
    """A key created with 1/minute is refused on its second call; the customer's other key is not."""
    api: Api = make_api(plans=PLANS)
    api.accounts.create_customer("solo", plan="open")
    limited = api.accounts.create_key("solo", rate_limits=["1/minute"])
    other = api.accounts.create_key("solo")
    assert api.accounts.key(limited.key_id).rate_limits[0].seconds == 60
    assert api.call("GET", "/v1/hello", limited.plaintext).headers["ratelimit"] == '"key-rate-60s";r=0;t=60'
    refused = api.call("GET", "/v1/hello", limited.plaintext)
    assert (refused.status_code, refused.headers["retry-after"]) == (429, "60")
    assert api.call("GET", "/v1/hello", other.plaintext).status_code == 200
    assert "ratelimit" not in api.call("GET", "/v1/hello", other.plaintext).headers


def test_the_concurrency_cap_has_its_entry(make_api: Any) -> None:
    """A call under a cap of 3 is told how many slots were left for it (its own taken)."""
    api: Api = make_api(plans=PLANS)
    answer = api.call("GET", "/v1/hello", api.customer("inflight"))
    assert answer.status_code == 200
    assert answer.headers["ratelimit-policy"] == '"concurrency";q=3;w=1'
    assert answer.headers["ratelimit"] == '"concurrency";r=2;t=0'


def test_a_postpaid_plans_spend_cap_refuses_the_call_past_it(make_api: Any) -> None:
    """Cap 1.20 credits, 1 call included then 0.50: calls 1-3 pass (0, 0.50, 1.00), the fourth would make
    1.50 and is refused with 429 spend_cap_reached until the period ends."""
    api: Api = make_api(plans=PLANS)
    key = api.customer("capped")
    answers = [api.call("GET", "/v1/hello", key) for _ in range(4)]
    assert [answer.status_code for answer in answers] == [200, 200, 200, 429]
    assert answers[2].headers["ratelimit"].startswith('"spend-cap";r=200000;t=')
    refused = answers[3]
    assert refused.json()["reason"] == "spend_cap_reached"
    assert int(refused.headers["retry-after"]) > 0
    api.settle()
    usage = api.usage(key)
    assert (usage.meters["calls"], usage.spend) == (3, 1_000_000)


def test_a_customer_cap_in_place_of_the_plans(make_api: Any) -> None:
    """The seller raises a customer's cap over the plan's; the customer may lower it, never raise it."""
    api: Api = make_api(plans=PLANS)
    key = api.customer("capped_prepaid", credits="10")
    customer = api.customer_of(key)
    api.accounts.set_spend_cap(customer, "1.50")
    # A new process (the key cache holds the customer's record for policy.key_cache_ttl).
    assert api.accounts.spend_cap(customer) == 1_500_000
    with pytest.raises(UsageError, match="may only lower"):
        api.accounts.lower_spend_cap(customer, "2")
    api.accounts.lower_spend_cap(customer, "0.50")
    answers = [api.call("GET", "/v1/hello", key).status_code for _ in range(2)]
    assert answers == [200, 429]
    api.accounts.set_spend_cap(customer, None)
    assert api.accounts.spend_cap(customer) == 1_000_000


def test_leases_are_per_route_under_route_limits(make_api: Any) -> None:
    """With admission = "lease", a route limit of 40/minute serves exactly 40 calls to its route (leases of
    that route only), while calls to another route go on in leases of their own."""
    plans = {"leased": {"routes": {"/v1/items/*": {"rate_limits": ["40/minute"]}}}}
    api: Api = make_api(plans=plans, policy={"admission": "lease"})
    key = api.customer("leased")
    items = [api.call("GET", f"/v1/items/{n}", key).status_code for n in range(45)]
    assert (items.count(200), items.count(429)) == (40, 5)
    assert {api.call("GET", "/v1/hello", key).status_code for _ in range(20)} == {200}
    assert api.call("GET", "/v1/items/x", key).status_code == 429


@pytest.mark.parametrize("admission", ["strict", "lease"])
def test_a_finished_call_frees_its_concurrency_slot_before_any_flush(
    make_api: Any, tmp_path: Path, admission: str
) -> None:
    """Cap 1, the flusher held back a minute: sequential calls (served and failed) are all admitted, each
    finding the slot its finished predecessor left (counted free at admission, flushed or not)."""
    api: Api = make_api(
        plans={"single": {"concurrency": 1}},
        pipeline={"flush_interval": 60, "spool_dir": str(tmp_path / "held-spool")},
        policy={"admission": admission},
    )
    key = api.customer("single")
    statuses = [api.call("GET", ("/v1/hello", "/v1/fail")[n % 3 == 2], key).status_code for n in range(6)]
    assert statuses == [200, 200, 502, 200, 200, 502]
    assert api.call("GET", "/v1/hello", key).headers["ratelimit"] == '"concurrency";r=0;t=1'
