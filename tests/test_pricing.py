"""Pricing models: hand-computed amounts at tier boundaries, packages, fees, minimum, rounding, config."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from meterware.billing.pricing import (
    Line,
    PlanPrices,
    Price,
    Tier,
    TierUse,
    minor_unit,
    parse_money,
    round_amount,
)
from meterware.config import Config, MeterTerms
from meterware.errors import ConfigError

D = Decimal
#: The README's tiers: 1-10,000 at 0.001; 10,001-100,000 at 0.0008 + 5 flat; then 0.0005.
TIERS = (Tier(10_000, D("0.001")), Tier(100_000, D("0.0008"), D("5")), Tier(None, D("0.0005")))
GRADUATED = Price.tiered("graduated", TIERS)
VOLUME = Price.tiered("volume", TIERS)


@pytest.mark.parametrize(
    ("quantity", "graduated", "volume"),
    [
        pytest.param(0, "0", "0", id="nothing"),
        pytest.param(1, "0.001", "0.001", id="first-unit"),
        pytest.param(10_000, "10.000", "10.000", id="at-first-up_to"),
        # graduated: 10 + 1 x 0.0008 + 5 flat; volume: all 10,001 at 0.0008, + 5 flat
        pytest.param(10_001, "15.0008", "13.0008", id="one-past-first-up_to"),
        # graduated: 10 + 90,000 x 0.0008 + 5; volume: 100,000 x 0.0008 + 5
        pytest.param(100_000, "87.0000", "85.0000", id="at-second-up_to"),
        pytest.param(100_001, "87.0005", "50.0005", id="one-past-second-up_to"),
        pytest.param(250_000, "162.0000", "125.0000", id="deep-in-last-tier"),
    ],
)
def test_graduated_and_volume_tiers(quantity: int, graduated: str, volume: str) -> None:
    """Graduated prices each unit in its own tier; volume prices all units at the tier the total reaches."""
    assert GRADUATED.charge(quantity).amount == D(graduated)
    assert VOLUME.charge(quantity).amount == D(volume)


def test_a_charge_explains_the_tiers_it_used() -> None:
    """A graduated charge lists each tier reached with its units; a volume charge the one tier used."""
    used = [(u.first, u.up_to, u.units, u.amount) for u in GRADUATED.charge(100_001).tiers]
    assert used == [
        (1, 10_000, 10_000, D("10")),
        (10_001, 100_000, 90_000, D("77")),
        (100_001, None, 1, D("0.0005")),
    ]
    (tier,) = VOLUME.charge(10_001).tiers
    assert (tier.first, tier.up_to, tier.units, tier.flat, tier.amount) == (
        10_001,
        100_000,
        10_001,
        D(5),
        D("13.0008"),
    )
    assert (
        GRADUATED.describe()
        == "graduated: 1-10000 at 0.001, 10001-100000 at 0.0008 + 5 flat, 100001+ at 0.0005"
    )


@pytest.mark.parametrize(
    ("quantity", "packages", "amount"),
    [
        pytest.param(0, 0, "0", id="nothing"),
        pytest.param(1, 1, "0.02", id="one-unit-is-a-package"),
        pytest.param(1000, 1, "0.02", id="exactly-one-package"),
        pytest.param(1001, 2, "0.04", id="one-past-rounds-up"),
        pytest.param(2500, 3, "0.06", id="partial-rounds-up"),
    ],
)
def test_package_pricing_rounds_partial_packages_up(quantity: int, packages: int, amount: str) -> None:
    """0.02 per 1,000 units: a started package is charged whole."""
    charge = Price.package(1000, D("0.02")).charge(quantity)
    assert (charge.packages, charge.amount) == (packages, D(amount))


@pytest.mark.parametrize(
    ("price", "quantity", "billable", "amount"),
    [
        pytest.param(Price.unit(D("0.0005"), included=100_000), 100_000, 0, "0", id="all-included"),
        pytest.param(Price.unit(D("0.0005"), included=100_000), 130_000, 30_000, "15.0000", id="overage"),
        # Included units come before the tiers: tier 1 starts at the first billable unit.
        pytest.param(
            Price.tiered("graduated", TIERS, included=1000), 11_001, 10_001, "15.0008", id="tiers-after"
        ),
        pytest.param(Price.package(1000, D("0.02"), included=500), 1501, 1001, "0.04", id="packages-after"),
    ],
)
def test_included_units_come_first(price: Price, quantity: int, billable: int, amount: str) -> None:
    """The included units are free; the model prices what is left."""
    charge = price.charge(quantity)
    assert (charge.billable, charge.amount) == (billable, D(amount))


@pytest.mark.parametrize(
    ("amount", "currency", "rounded"),
    [
        pytest.param("0.005", "USD", "0.01", id="half-rounds-up"),
        pytest.param("0.0049999", "USD", "0.00", id="below-half-rounds-down"),
        pytest.param("2.675", "USD", "2.68", id="no-float-error"),  # float(2.675) rounds to 2.67
        pytest.param("15.0008", "EUR", "15.00", id="two-decimals"),
        pytest.param("1234.5", "JPY", "1235", id="yen-has-none"),
        pytest.param("1.0005", "KWD", "1.001", id="dinar-has-three"),
    ],
)
def test_rounding_is_half_up_to_the_minor_unit(amount: str, currency: str, rounded: str) -> None:
    """Each line is computed exactly, then rounded once, half up, to the currency's minor unit."""
    result = round_amount(D(amount), minor_unit(currency))
    assert str(result) == rounded


def amounts(lines: list[Line]) -> list[tuple[str, str]]:
    return [(line.kind, str(line.amount)) for line in lines]


@pytest.mark.parametrize(
    ("calls", "expected"),
    [
        # 49 + 0 usage = 49: the minimum adds 51.
        pytest.param(100_000, [("base_fee", "49.00"), ("usage", "0.00"), ("minimum", "51.00")], id="lifted"),
        # 49 + 30,000 x 0.0005 = 64: the minimum adds 36.
        pytest.param(
            130_000, [("base_fee", "49.00"), ("usage", "15.00"), ("minimum", "36.00")], id="lifted-less"
        ),
        # 49 + 51 = 100: exactly the minimum, no line.
        pytest.param(202_000, [("base_fee", "49.00"), ("usage", "51.00")], id="exactly-minimum"),
        pytest.param(300_000, [("base_fee", "49.00"), ("usage", "100.00")], id="above-minimum"),
    ],
)
def test_base_fee_and_minimum(calls: int, expected: list[tuple[str, str]]) -> None:
    """The base fee is a line; the minimum commitment is a visible line only when it lifts the total."""
    prices = PlanPrices("USD", D("49.00"), D("100.00"), {"calls": Price.unit(D("0.0005"), included=100_000)})
    assert amounts(prices.lines({"calls": calls})) == expected


def test_each_line_is_rounded_then_summed() -> None:
    """Two lines of 0.004 each round to 0.00: the subtotal is the sum of rounded lines, not 0.01."""
    prices = PlanPrices(meters={"a": Price.unit(D("0.004")), "b": Price.unit(D("0.004"))})
    assert amounts(prices.lines({"a": 1, "b": 1})) == [("usage", "0.00"), ("usage", "0.00")]


def test_prices_and_lines_round_trip_through_json_data() -> None:
    """What a closed invoice stores reads back equal (amounts as strings, never floats)."""
    prices = PlanPrices(
        "EUR", D("49"), D("100"), {"calls": GRADUATED, "tokens": Price.package(1000, D("0.02"))}
    )
    assert PlanPrices.from_dict(prices.as_dict()) == prices
    for line in prices.lines({"calls": 100_001, "tokens": 2500}):
        assert Line.from_dict(line.as_dict()) == line


def test_a_quantity_is_never_negative() -> None:
    """Pricing a negative quantity is a bug, not a refund."""
    with pytest.raises(ValueError, match="at least 0"):
        GRADUATED.charge(-1)


# -- configuration ---------------------------------------------------------------------------------------


def config(plan: dict[str, Any], meters: dict[str, Any] | None = None) -> Config:
    meters = meters or {
        "calls": {},
        "tokens": {"aggregation": "sum", "source": "handler"},
        "peak": {"aggregation": "max", "source": "handler"},
    }
    return Config.from_dict({"meters": meters, "plans": {"scale": plan}})


def test_the_documented_pricing_config() -> None:
    """Currency, base fee, minimum, per unit, package and tiers arrive exactly as written."""
    plan = config(
        {
            "currency": "EUR",
            "base_fee": "49.00",
            "minimum": "100.00",
            "meters": {
                "calls": {
                    "included": 1000,
                    "tier_mode": "graduated",
                    "tiers": [
                        {"up_to": 10_000, "price": "0.001"},
                        {"up_to": 100_000, "price": "0.0008", "flat": "5"},
                        {"price": "0.0005"},
                    ],
                },
                "tokens": {"package": {"size": 1000, "price": "0.02"}},
            },
        }
    ).plans["scale"]
    assert (plan.currency, plan.base_fee, plan.minimum) == ("EUR", D("49.00"), D("100.00"))
    assert plan.meters["calls"] == MeterTerms(
        included=1000, pricing=Price.tiered("graduated", TIERS, included=1000)
    )
    assert plan.meters["tokens"] == MeterTerms(pricing=Price.package(1000, D("0.02")))
    assert plan.prices().meters["calls"] == Price.tiered("graduated", TIERS, included=1000)


def test_existing_plans_price_per_unit_in_usd() -> None:
    """A plan without the new settings keeps its terms: USD, no fee, its micro-credit price per unit."""
    plan = config({"meters": {"calls": {"included": 100, "price": "0.0005"}}}).plans["scale"]
    assert plan.meters["calls"] == MeterTerms(included=100, price=500)
    assert (plan.currency, plan.base_fee, plan.minimum) == ("USD", D(0), D(0))
    assert plan.prices().meters["calls"] == Price.unit(D("0.0005"), included=100)


TIER_OK: list[dict[str, Any]] = [{"up_to": 10, "price": "1"}, {"price": "0.5"}]
CALLS = "plans.scale.meters.calls"


def calls(**terms: Any) -> dict[str, Any]:
    """A plan whose ``calls`` meter has ``terms``."""
    return {"meters": {"calls": terms}}


def volume(*tiers: dict[str, Any]) -> dict[str, Any]:
    return calls(tier_mode="volume", tiers=list(tiers))


PACKAGE = {"size": 10, "price": "1"}


@pytest.mark.parametrize(
    ("plan", "field", "problem"),
    [
        pytest.param(calls(price="0.1", package=PACKAGE), f"{CALLS}.package",
                     "one of price, package or tiers", id="price-and-package"),
        pytest.param(calls(package=PACKAGE, tiers=TIER_OK, tier_mode="volume"), f"{CALLS}.tiers",
                     "one of price, package or tiers", id="package-and-tiers"),
        pytest.param(calls(tiers=TIER_OK), f"{CALLS}.tier_mode",
                     "must be 'graduated' or 'volume', got none", id="no-mode"),
        pytest.param(calls(tiers=TIER_OK, tier_mode="stairs"), f"{CALLS}.tier_mode", "got 'stairs'",
                     id="bad-mode"),
        pytest.param(calls(price="1", tier_mode="volume"), f"{CALLS}.tier_mode", "applies to tiers",
                     id="mode-without-tiers"),
        pytest.param(volume(), f"{CALLS}.tiers", "non-empty list", id="no-tiers"),
        pytest.param(volume({"up_to": 10, "price": "1"}, {"up_to": 10, "price": "1"}, {"price": "1"}),
                     f"{CALLS}.tiers[1].up_to", "must be at least 11, got 10", id="not-ascending"),
        pytest.param(volume({"up_to": 10, "price": "1"}, {"up_to": 20, "price": "1"}),
                     f"{CALLS}.tiers[1].up_to", "the last tier is open-ended", id="last-closed"),
        pytest.param(volume({"price": "1"}, {"price": "1"}), f"{CALLS}.tiers[0].up_to",
                     "required on every tier but the last", id="open-middle"),
        pytest.param(volume({"up_to": 0, "price": "1"}, {"price": "1"}), f"{CALLS}.tiers[0].up_to",
                     "must be at least 1", id="up_to-zero"),
        pytest.param(volume({"up_to": 5}, {"price": "1"}), f"{CALLS}.tiers[0].price", "is required",
                     id="tier-without-price"),
        pytest.param(volume({"price": "1", "cap": 3}), f"{CALLS}.tiers[0].cap", "is not a known setting",
                     id="tier-unknown-key"),
        pytest.param(volume({"price": 0.5}), f"{CALLS}.tiers[0].price", "floats are not exact",
                     id="float-price"),
        pytest.param(volume({"price": "-1"}), f"{CALLS}.tiers[0].price", "must not be negative",
                     id="negative-price"),
        pytest.param(volume({"price": "1", "flat": "x"}), f"{CALLS}.tiers[0].flat",
                     "must be a decimal amount, got 'x'", id="bad-flat"),
        pytest.param(calls(package={"size": 0, "price": "1"}), f"{CALLS}.package.size", "must be at least 1",
                     id="empty-package"),
        pytest.param(calls(package={"size": 10}), f"{CALLS}.package.price", "is required",
                     id="package-without-price"),
        pytest.param(calls(package="10 for 1"), f"{CALLS}.package", "must be a table", id="package-text"),
        pytest.param(calls(package={"size": 10, "price": "0.0000000000001"}), f"{CALLS}.package.price",
                     "at most 12 decimals", id="too-many-decimals"),
        pytest.param({"meters": {"peak": {"package": PACKAGE, "quota": 5}}}, "plans.scale.meters.peak.quota",
                     "a 'max' meter cannot carry a quota", id="max-meter"),
        pytest.param({"prepaid": True, **calls(package=PACKAGE)}, f"{CALLS}.package",
                     "a prepaid plan charges credits call by call", id="prepaid-package"),
        pytest.param({"prepaid": True, **volume(*TIER_OK)}, f"{CALLS}.tiers",
                     "need an invoiced plan (prepaid = false)", id="prepaid-tiers"),
        pytest.param({"base_fee": 49.0}, "plans.scale.base_fee", "floats are not exact", id="float-fee"),
        pytest.param({"minimum": "-5"}, "plans.scale.minimum", "must not be negative", id="negative-min"),
        pytest.param({"minimum": "NaN"}, "plans.scale.minimum", "must be a decimal amount", id="nan-min"),
        pytest.param({"base_fee": "1e15"}, "plans.scale.base_fee", "below 10^15", id="huge-fee"),
        pytest.param({"currency": "usd"}, "plans.scale.currency", "three capital letters", id="lowercase"),
        pytest.param({"currency": 840}, "plans.scale.currency", "must be a string", id="numeric-currency"),
        # The per-unit price is charged by the request path in micro-credits: still 6 decimals at most.
        pytest.param(calls(price="0.0000001"), f"{CALLS}.price", "at most 6 decimals", id="unit-7-decimals"),
    ],
)  # fmt: skip
def test_pricing_mistakes_name_their_field(plan: dict[str, Any], field: str, problem: str) -> None:
    """Every pricing mistake stops start-up with one line naming the field."""
    with pytest.raises(ConfigError) as caught:
        config(plan)
    assert caught.value.field == field
    assert problem in caught.value.problem
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("value", "amount"),
    [
        pytest.param("49.00", "49.00", id="string"),
        pytest.param(5, "5", id="integer"),
        pytest.param(" 0.5 ", "0.5", id="spaces"),
        pytest.param("1.500000000000000", "1.500000000000000", id="trailing-zeros-beyond-12"),
    ],
)
def test_money_is_parsed_exactly(value: Any, amount: str) -> None:
    """Amounts are decimal strings or integers, kept exactly as written."""
    assert str(parse_money(value, "x")) == amount


def test_tier_use_as_dict_keeps_field_order_with_amounts_as_text() -> None:
    """A tier's use as data: its fields in order, the amounts as strings."""
    use = TierUse(1, None, 3, D("0.50"), D("0"), D("1.5"))
    assert list(use.as_dict().items()) == [
        ("first", 1),
        ("up_to", None),
        ("units", 3),
        ("price", "0.5"),
        ("flat", "0"),
        ("amount", "1.5"),
    ]
