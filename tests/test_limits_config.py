"""The plan limits of issue 18 in the configuration, a key's and a customer's through the CLI."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from meterware.config import Config, RateLimit
from meterware.config._overrides import TermsVersion, check_overrides, plan_with
from meterware.errors import ConfigError
from meterware.metering.admission import CONCURRENCY_METER, AdmitRequest, meter_holds, scoped_limits
from meterware.storage._admission import admit_template


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
        pytest.param({"rate_limits": ["9 words/day"]}, "p.rate_limits[0]", "not a 'sum'", id="rate-no-meter"),
        pytest.param({"rate_limits": ["9 calls/day"]}, "p.rate_limits[0]", "not a .sum", id="rate-count"),
        pytest.param({"routes": {"/v": {"rate_limits": ["9 calls/day"]}}}, "/v", "not a .s", id="rate-route"),
    ],
)  # fmt: skip
def test_bad_plan_limits_are_refused(plan: dict[str, Any], field: str, message: str) -> None:
    """Each mistake is a ConfigError naming its field."""
    meters = {"calls": {"aggregation": "count"}, "tokens": {"aggregation": "sum", "source": "handler"}}
    with pytest.raises(ConfigError, match=message) as raised:
        Config.from_dict({"meters": meters, "plans": {"p": plan}})
    assert field in str(raised.value)


def test_a_plan_may_limit_a_sum_meters_units() -> None:
    """``"100000 tokens/minute"``: a limit on the meter's units, whose call takes the meter's reserve (at
    least 1) at admission."""
    meters: dict[str, Any] = {"tokens": {"aggregation": "sum", "source": "handler", "reserve": 250}}
    config = Config.from_dict(
        {"meters": meters, "plans": {"p": {"rate_limits": ["600/minute", "100000 tokens/minute"]}}}
    )
    assert config.plan("p").rate_limits == (RateLimit(600, 60), RateLimit(100_000, 60, "tokens", 250))
    meters["tokens"]["reserve"] = 0
    config = Config.from_dict({"meters": meters, "plans": {"p": {"rate_limits": ["5 tokens per 2 hours"]}}})
    assert config.plan("p").rate_limits == (RateLimit(5, 7200, "tokens", 1),)


def test_a_meter_limit_below_the_meters_reserve_is_refused() -> None:
    """A call takes the meter's reserve at admission: a limit smaller than it could admit no call, ever."""
    meters = {"tokens": {"aggregation": "sum", "source": "handler", "reserve": 5000}}
    with pytest.raises(ConfigError, match="reserves 5000 units a call") as raised:
        Config.from_dict({"meters": meters, "plans": {"p": {"rate_limits": ["1000 tokens/minute"]}}})
    assert raised.value.field == "plans.p.rate_limits[0]"


def test_a_customers_own_rate_limits_may_limit_a_meter_too() -> None:
    """An override of ``rate_limits`` is a full set, so it may restate the plan's tokens limit; a stored
    one whose meter the configuration no longer has is left out (as overrides of such meters are)."""
    meters: dict[str, Any] = {"tokens": {"aggregation": "sum", "source": "handler", "reserve": 100}}
    config = Config.from_dict({"meters": meters, "plans": {"p": {"rate_limits": ["1000 tokens/minute"]}}})
    checked = check_overrides({"rate_limits": "1200/minute, 5000 tokens/minute"}, config.meters)
    merged = plan_with(config.plan("p"), TermsVersion(0, 0, "sales", checked), config.meters)
    assert merged.rate_limits == (RateLimit(1200, 60), RateLimit(5000, 60, "tokens", 100))
    merged = plan_with(config.plan("p"), TermsVersion(0, 0, "sales", checked), {})
    assert merged.rate_limits == (RateLimit(1200, 60),)


def test_each_limit_adds_to_the_admission_only_when_set() -> None:
    """admit.lua's template: a plan without the limits sends the keys and arguments it always did; a route
    limit adds its key and (amount, seconds), a concurrency cap one hold, a spend cap one argument."""
    config = Config.from_dict(
        {"plans": {"p": {"rate_limits": ["5/second"], "meters": {"calls": {"quota": 9}}}}}
    )
    plan = config.plan("p")

    def template(plan: Any, **more: Any) -> tuple[int, int]:
        request = AdmitRequest(
            0,
            "acme",
            "k1",
            True,
            plan,
            0,
            86_400,
            meter_holds(plan, config.meters, 1, True),
            "r",
            1000,
            **more,
        )
        keys, args = admit_template(request)
        return len(keys), len(args)

    # KEY_RECORD..DEADLINES + one rate key; 8 fixed arguments, (5, 1), the hold count and one hold of 7.
    assert template(plan) == (6, 8 + 2 + 1 + 7)
    route = scoped_limits((RateLimit(1, 60),), "r00000001", "route")
    assert template(plan, scoped_limits=route) == (7, 8 + 4 + 1 + 7)
    assert template(replace(plan, concurrency=3)) == (6, 8 + 2 + 1 + 14)
    assert template(plan, spend_cap=5) == (6, 8 + 2 + 1 + 7 + 1)
    # A meter's limit: its key and (amount, seconds), then the spend cap ("" without one) and each rate
    # limit's cost per call (the route's too).
    tokens = RateLimit(1000, 60, "tokens", 100)
    metered = replace(plan, rate_limits=(*plan.rate_limits, tokens))
    assert template(metered) == (7, 8 + 4 + 1 + 7 + 1 + 2)
    assert template(metered, spend_cap=5, scoped_limits=route) == (8, 8 + 6 + 1 + 7 + 1 + 3)
    keys, args = admit_template(
        AdmitRequest(
            0, "acme", "k1", True, metered, 0, 86_400, meter_holds(plan, config.meters, 1, True), "r", 1000
        )
    )
    assert keys[-1] == "mw:{s0}:rl:live:acme:60:mtokens"
    assert args[-3:] == ("", 1, 100)
