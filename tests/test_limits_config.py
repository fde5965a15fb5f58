"""The plan limits of issue 18 in the configuration, a key's and a customer's through the CLI."""

from __future__ import annotations

from typing import Any

import pytest

from meterware.config import Config, RateLimit
from meterware.errors import ConfigError
from meterware.metering.admission import CONCURRENCY_METER, meter_holds


def test_a_plan_parses_route_limits_concurrency_and_a_spend_cap() -> None:
    """[plans.X.routes."<glob>"] rate_limits, concurrency and spend_cap (credits, exact)."""
    config = Config.from_dict(
        {
            "plans": {
                "pro": {
                    "rate_limits": ["100/second"],
                    "routes": {
                        "/v1/chat": {"rate_limits": ["10/second"]},
                        "/v1/images/*": {"rate_limits": ["5/minute", "100/hour"]},
                    },
                    "concurrency": 20,
                    "spend_cap": "50.00",
                }
            }
        }
    )
    plan = config.plan("pro")
    assert plan.route_limits == (
        ("/v1/chat", (RateLimit(10, 1),)),
        ("/v1/images/*", (RateLimit(5, 60), RateLimit(100, 3600))),
    )
    assert (plan.concurrency, plan.spend_cap) == (20, 50_000_000)
    assert [plan.route_of(path) for path in ("/v1/chat", "/v1/images/1", "/v1/other")] == [0, 1, -1]
    concurrency = meter_holds(plan, config.meters, 1, True)[-1]
    assert (concurrency.meter, concurrency.quota, concurrency.hold) == (CONCURRENCY_METER, 20, 1)


def test_a_plan_without_them_holds_nothing_more() -> None:
    """No route limits, no concurrency hold, no spend cap: the request path sends nothing more."""
    plan = Config.from_dict({"plans": {"free": {}}}).plan("free")
    assert (plan.route_limits, plan.concurrency, plan.spend_cap) == ((), 0, None)
    assert meter_holds(plan, {}, 1, True) == ()


@pytest.mark.parametrize(
    ("plan", "field", "message"),
    [
        pytest.param({"routes": {"v1": {"rate_limits": ["1/day"]}}}, "routes.v1", "path glob", id="glob"),
        pytest.param({"routes": {"/v1": {"rate_limits": ["often"]}}}, "rate_limits[0]", "a rate", id="rate"),
        pytest.param({"routes": {"/v1": {"limits": []}}}, "plans.p.routes", "limits", id="unknown-key"),
        pytest.param({"concurrency": -1}, "plans.p.concurrency", "at least 0", id="concurrency"),
        pytest.param({"spend_cap": "1.0000001"}, "plans.p.spend_cap", "6 decimals", id="spend-cap-inexact"),
        pytest.param({"spend_cap": "-5"}, "plans.p.spend_cap", "negative", id="spend-cap-negative"),
    ],
)  # fmt: skip
def test_bad_plan_limits_are_refused(plan: dict[str, Any], field: str, message: str) -> None:
    """Each mistake is a ConfigError naming its field."""
    with pytest.raises(ConfigError, match=message) as raised:
        Config.from_dict({"plans": {"p": plan}})
    assert field in str(raised.value)
