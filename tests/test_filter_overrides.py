"""Per-customer overrides of a plan's terms for dimension values (``tokens{model=large}.price``): checked
like the plan's filters, charged and invoiced by hand-computed amounts on memory, Redis and the Cluster."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from meterware.config import Config
from meterware.config._overrides import check_overrides
from meterware.errors import ConfigError, UsageError
from tests.test_dimensions import LARGE_OUT, Setup, dimension_config


@pytest.fixture
def setup(backend_url: str, tmp_path: Path) -> Iterator[Setup]:
    """On memory, a real redis-server, a real 3-node Redis Cluster (each empty)."""
    made = Setup(backend_url, tmp_path / "spool")
    yield made
    made.recorder.close()
    made.accounts.close()


METERS = Config.from_dict(dimension_config("memory://")).meters


def test_a_filter_override_is_named_canonically() -> None:
    """Values in any order name the filter as the plan's terms do (the meter's declared order)."""
    checked = check_overrides({"tokens{direction=output,model=large}.price": "0.00002"}, METERS)
    assert checked == {f"{LARGE_OUT}.price": "0.000020"}


@pytest.mark.parametrize(
    ("field", "problem"),
    [
        pytest.param("tokens{model=huge}.price", "huge", id="undeclared-value"),
        pytest.param("tokens{colour=red}.price", "colour", id="undeclared-dimension"),
        pytest.param(
            "calls{model=large}.price", "'calls' is not a meter with dimensions", id="no-dimensions"
        ),
        pytest.param("tokens{model=large}.quota", "a quota counts all values", id="quota"),
    ],
)
def test_a_bad_filter_override_names_its_field(field: str, problem: str) -> None:
    """An undeclared value or dimension, a meter without dimensions, or a quota: refused, naming it."""
    with pytest.raises(ConfigError, match=problem) as refused:
        check_overrides({field: "1"}, METERS)
    assert refused.value.field == field


def test_a_filter_override_is_charged_and_invoiced_by_hand(setup: Setup) -> None:
    """The plan prices large tokens at 10 micro-credits past 100 included; the customer's terms (from
    the period's start) at 4 past 50. Large 300 + 50 = 350 tokens: (350 - 50) x 4 = 1,200; small 1,500
    (1,000 included) x 1 = 500 (the plan's); 20 tokens without a model x 2 = 40: 1,740 micro-credits
    charged, and the invoice's large line says 350 used, 50 included, 300 billed."""
    customer = setup.customer("models", credits="10")
    setup.accounts.set_overrides(
        customer,
        {"tokens{model=large}.price": "0.000004", "tokens{model=large}.included": 50},
        effective_from="period_start",
        actor="sales",
    )
    record = setup.recorder.record
    record(customer, {"tokens": 1500}, event_id="a", dimensions={"model": "small", "direction": "input"})
    record(customer, {"tokens": 300}, event_id="b", dimensions={"direction": "output", "model": "large"})
    record(customer, {"tokens": 50}, event_id="c", dimensions={"model": "large", "direction": "input"})
    record(customer, {"tokens": 20}, event_id="d")
    setup.settle()
    assert setup.accounts.balance(customer).balance == 10_000_000 - 1_740
    invoice = setup.accounts.invoice(customer)
    lines = {line.meter: (line.quantity, line.included, line.billable) for line in invoice.lines}
    assert lines == {
        "tokens": (20, 0, 20),
        "tokens{model=small}": (1500, 1000, 500),
        "tokens{model=large}": (350, 50, 300),
    }
    assert invoice.credits_charged == 1_740


def test_a_filter_override_that_ties_with_the_plans_is_refused(setup: Setup) -> None:
    """A filter on direction alone would price large output tokens as specifically as the plan's
    ``tokens{model=large}``: refused, nothing recorded."""
    customer = setup.customer("models")
    with pytest.raises(UsageError, match="both price"):
        setup.accounts.set_overrides(customer, {"tokens{direction=output}.price": "0.000003"})
    assert setup.accounts.overrides(customer) == []
