"""Dimensions on the request path: a handler's ``usage.add("tokens", n, model=...)`` charged per value at
flush, with included units per value, on each framework and backend (memory, real Redis)."""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY

Api = Any

SECTIONS: dict[str, Any] = {
    "meters": {
        "calls": {"aggregation": "count", "source": "call"},
        "tokens": {
            "aggregation": "sum",
            "source": "handler",
            "dimensions": {"model": ["small", "large"], "direction": ["input", "output"]},
        },
    },
    "plans": {
        "models": {
            "prepaid": True,
            "meters": {
                "tokens": {"price": "0.000002"},
                "tokens{model=small}": {"included": 1000, "price": "0.000001"},
                "tokens{model=large}": {"included": 100, "price": "0.00001"},
            },
        },
        "capped": {"meters": {"tokens": {"quota": 1000}}},
    },
}


def chat(api: Api, key: str, tokens: int, **dimensions: str) -> int:
    body: dict[str, Any] = {"tokens": tokens, "dimensions": dimensions}
    return int(api.call("POST", "/v1/chat", key, json=body).status_code)


def test_a_handler_s_tokens_are_charged_per_model(make_api: Any) -> None:
    """By hand: small 1,500 (1,000 included) x 1 = 500; large 300 + 50 (100 included) x 10 = 2,500; 20
    tokens without a model x 2 = 40: 3,040 micro-credits. A value past the declared set is served, but its
    units are refused, counted and never charged."""
    api = make_api(**SECTIONS)
    key = api.customer("models", credits="10")
    rejected = REGISTRY.get_sample_value("meterware_units_rejected_total") or 0
    assert chat(api, key, 1500, model="small", direction="input") == 200
    assert chat(api, key, 300, direction="output", model="large") == 200
    assert chat(api, key, 50, model="large", direction="input") == 200
    assert chat(api, key, 20) == 200
    assert chat(api, key, 999, model="huge") == 200
    assert REGISTRY.get_sample_value("meterware_units_rejected_total") == rejected + 1
    api.settle()
    assert api.balance(key).balance == 10_000_000 - 3_040
    assert api.balance(key).reserved == 0
    usage = api.usage(key)
    assert {name: value for name, value in usage.meters.items() if value} == {
        "calls": 5,
        "tokens": 1870,
        "tokens{model=small,direction=input}": 1500,
        "tokens{model=large,direction=input}": 50,
        "tokens{model=large,direction=output}": 300,
    }
    assert usage.spend == 3_040
    invoice = api.accounts.invoice(api.customer_of(key))
    assert {line.meter: (line.quantity, line.billable) for line in invoice.lines} == {
        "tokens": (20, 20),
        "tokens{model=small}": (1500, 500),
        "tokens{model=large}": (350, 250),
    }


def test_a_quota_on_the_meter_counts_every_model(make_api: Any) -> None:
    """600 small and 400 large tokens use up a quota of 1,000: the next call is refused (429)."""
    api = make_api(**SECTIONS)
    key = api.customer("capped")
    assert chat(api, key, 600, model="small") == 200
    assert chat(api, key, 400, model="large") == 200
    api.settle()
    refused = api.call("POST", "/v1/chat", key, json={"tokens": 1, "dimensions": {"model": "small"}})
    assert refused.status_code == 429
    assert refused.json()["reason"] == "quota_exceeded"
