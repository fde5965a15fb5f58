"""A customer's own terms on the request path of every framework (Starlette, FastAPI, Flask, a bare WSGI
app, Django sync and async), on memory and a real Redis."""

from __future__ import annotations

from typing import Any

Api = Any


def test_calls_are_charged_and_limited_by_the_customers_own_terms(api: Api) -> None:
    """The plan charges 0.01 a call; the customer's terms (from its first period's start) 0.004 with a
    hard quota of 4 calls: 0.03 credits pay 4 calls (0.016), the 5th is refused 429 quota_exceeded."""
    key = api.customer("percall", credits="0.03")
    customer = api.customer_of(key)
    api.accounts.set_overrides(
        customer, {"calls.price": "0.004", "calls.quota": 4}, effective_from="period_start", actor="sales"
    )
    responses = [api.call("GET", "/v1/hello", key) for _ in range(5)]
    assert [r.status_code for r in responses] == [200, 200, 200, 200, 429]
    assert [r.headers.get("x-credits-remaining") for r in responses[:4]] == [
        "0.026000",
        "0.022000",
        "0.018000",
        "0.014000",
    ]
    assert responses[4].json()["reason"] == "quota_exceeded"
    api.settle()
    assert api.balance(key).balance == 30_000 - 4 * 4_000
    assert api.usage(key).spend == 16_000
