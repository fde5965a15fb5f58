"""Dimensions: units split by declared values, priced per value with included units per value, on memory,
Redis and the cluster; undeclared values refused and counted; the rollup windows per value."""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from werkzeug.test import Client

from meterware import Accounts, Config, Recorder, Refused, UsageError
from meterware.billing.pricing import PlanPrices, Price
from meterware.cli import main
from meterware.config import Meter
from meterware.dimensions import canonical, priced_units, split
from meterware.errors import ConfigError
from meterware.events import decode_batch, encode_batch
from meterware.ingest import wsgi_app
from meterware.rollup import RollupWorker
from meterware.rollup.aggregate import fold
from meterware.usage import CallUsage
from tests.rollup.helpers import T0_MS, event

DIMENSIONS = {"model": ["small", "large"], "direction": ["input", "output"]}
SMALL_IN = "tokens{model=small,direction=input}"
LARGE_OUT = "tokens{model=large,direction=output}"
LARGE_IN = "tokens{model=large,direction=input}"


def dimension_config(storage: str, spool_dir: Path | None = None) -> dict[str, Any]:
    """`small`: 1,000 included, then 1 micro-credit a token; `large`: 100 included, then 10; any other
    token (reported without a model): 2 micro-credits, none included."""
    return {
        "storage": {"url": storage, "shards": 4},
        "meters": {
            "calls": {"aggregation": "count", "source": "call"},
            "tokens": {"aggregation": "sum", "source": "handler", "dimensions": DIMENSIONS},
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
        "pipeline": {"flush_interval": 0.01, "spool_dir": str(spool_dir or ".meterware-spool")},
        "policy": {"timeout": 5.0},
    }


def config_with(**changes: Any) -> dict[str, Any]:
    data = dimension_config("memory://")
    for path, value in changes.items():
        table = data
        *parents, last = path.split("__")
        for parent in parents:
            table = table[parent]
        table[last] = value
    return data


# -- configuration -------------------------------------------------------------------------------------


def test_a_meter_declares_its_dimensions_in_order() -> None:
    """The dimensions and values are kept in the order written; a filter's key is made canonical."""
    config = Config.from_dict(
        config_with(plans__models__meters={"tokens{direction=output,model=large}": {"price": "0.00002"}})
    )
    assert config.meters["tokens"].dimensions == (
        ("model", ("small", "large")),
        ("direction", ("input", "output")),
    )
    assert list(config.plans["models"].meters) == [LARGE_OUT]


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        pytest.param(
            {"meters__tokens__dimensions": {f"d{i}": ["a", "b", "c"] for i in range(7)}},
            "meters.tokens.dimensions",
            f"makes {4**7 - 1} combinations of values (each dimension also left out); at most 1000",
            id="too-many-combinations",
        ),
        pytest.param(
            {"meters__calls__dimensions": {"model": ["small"]}},
            "meters.calls.dimensions",
            "only a 'sum' meter with source 'handler' is grouped by dimensions",
            id="call-meter",
        ),
        pytest.param(
            {"meters__tokens__dimensions": {"model": []}},
            "meters.tokens.dimensions.model",
            "must list its values, each once",
            id="no-values",
        ),
        pytest.param(
            {"meters__tokens__dimensions": {"model": ["a{b"]}},
            "meters.tokens.dimensions.model",
            "is not a valid name",
            id="bad-value",
        ),
        pytest.param(
            {"plans__models__meters": {"tokens{model=huge}": {"price": "1"}}},
            'plans.models.meters."tokens{model=huge}"',
            "value 'huge' of dimension 'model' of meter 'tokens' is not declared",
            id="undeclared-filter-value",
        ),
        pytest.param(
            {"plans__models__meters": {"calls{model=small}": {"price": "1"}}},
            'plans.models.meters."calls{model=small}"',
            "'calls' is not a meter with dimensions",
            id="filter-of-undimensioned-meter",
        ),
        pytest.param(
            {"plans__models__meters": {"tokens{model=small}": {"quota": 5}}},
            'plans.models.meters."tokens{model=small}".quota',
            "a quota counts all values: give it to the meter",
            id="quota-per-value",
        ),
        pytest.param(
            {
                "plans__models__meters": {
                    "tokens{model=small}": {"price": "1"},
                    "tokens{direction=input}": {"price": "2"},
                }
            },
            "plans.models.meters",
            "'tokens{direction=input}' and 'tokens{model=small}' both price "
            "'tokens{model=small,direction=input}'",
            id="ambiguous-filters",
        ),
        pytest.param(
            {"export": {"lago": {"meters": {"tokens": "llm_tokens"}, "value_key": "model"}}},
            "export.lago.meters",
            "meter 'tokens' has a dimension named 'model', a key the events already use",
            id="export-key-clash",
        ),
    ],
)
def test_a_bad_dimension_is_one_config_error_naming_the_field(
    change: dict[str, Any], field: str, message: str
) -> None:
    """Each mistake is refused at load, naming the field."""
    with pytest.raises(ConfigError) as raised:
        Config.from_dict(config_with(**change))
    assert raised.value.field == field
    assert message in str(raised.value)


# -- sub-meters and priced units -----------------------------------------------------------------------


def test_a_sub_meter_is_named_in_the_declared_order() -> None:
    """Whatever order the values come in, the name follows the meter's declaration; undeclared refused."""
    dimensions = (("model", ("small", "large")), ("direction", ("input", "output")))
    assert canonical("tokens", dimensions, {"direction": "output", "model": "large"}.items()) == LARGE_OUT
    assert canonical("tokens", dimensions, {"model": "large"}.items()) == "tokens{model=large}"
    assert split(LARGE_OUT) == ("tokens", (("model", "large"), ("direction", "output")))
    with pytest.raises(ValueError, match="value 'huge' of dimension 'model'"):
        canonical("tokens", dimensions, {"model": "huge"}.items())
    with pytest.raises(ValueError, match="has no dimension 'region'"):
        canonical("tokens", dimensions, {"region": "eu"}.items())


@pytest.mark.parametrize(
    ("units", "expected"),
    [
        pytest.param({"tokens": 7}, {"tokens": 7, "tokens{}": 7, "tokens{model=large}": 0}, id="no-values"),
        pytest.param(
            {"tokens": 10, LARGE_OUT: 6, SMALL_IN: 3},
            {"tokens": 10, "tokens{}": 4, "tokens{model=large}": 6},
            id="one-filter-matches",
        ),
        pytest.param(
            {"tokens": 5, "tokens{model=large}": 5},
            {"tokens": 5, "tokens{}": 0, "tokens{model=large}": 5},
            id="the-filter-itself",
        ),
    ],
)
def test_priced_units_add_up_the_sub_meters_a_filter_prices(
    units: dict[str, int], expected: dict[str, int]
) -> None:
    """A filter takes the sub-meters it matches, the remainder `tokens{}` the rest of the meter's units."""
    assert priced_units(units, frozenset(expected)) == expected


def test_the_most_specific_filter_wins() -> None:
    """`tokens{model=large,direction=output}` takes its own units before `tokens{model=large}`."""
    priced = frozenset({"tokens", "tokens{}", "tokens{model=large}", LARGE_OUT})
    units = {"tokens": 20, LARGE_OUT: 8, LARGE_IN: 5}
    assert priced_units(units, priced) == {
        "tokens": 20,
        "tokens{}": 7,
        "tokens{model=large}": 5,
        LARGE_OUT: 8,
    }


def test_invoice_lines_price_each_value_with_its_included_units() -> None:
    """small: 2,001,000 tokens, 1,000 included, 1 micro-credit each = 2.00; large: 150,100, 100 included,
    10 micro-credits = 1.50; 250,000 with no model at the meter's 2 micro-credits = 0.50."""
    prices = PlanPrices(
        meters={
            "tokens": Price.unit(Decimal("0.000002")),
            "tokens{model=small}": Price.unit(Decimal("0.000001"), included=1000),
            "tokens{model=large}": Price.unit(Decimal("0.00001"), included=100),
        }
    )
    totals = {"tokens": 2_401_100, SMALL_IN: 2_001_000, LARGE_OUT: 150_000, LARGE_IN: 100, "spend": 9}
    lines = prices.lines(prices.quantities(totals))
    assert [(line.meter, line.quantity, line.included, line.billable, line.amount) for line in lines] == [
        ("tokens", 250_000, 0, 250_000, Decimal("0.50")),
        ("tokens{model=small}", 2_001_000, 1000, 2_000_000, Decimal("2.00")),
        ("tokens{model=large}", 150_100, 100, 150_000, Decimal("1.50")),
    ]


# -- reporting from a handler ----------------------------------------------------------------------------


METERS = {"tokens": Meter("tokens", "sum", "handler", dimensions=(("model", ("small", "large")),))}


def test_usage_add_keeps_the_total_and_the_sub_meter() -> None:
    """Units with values count towards the meter and its sub-meter; without, towards the meter only."""
    call = CallUsage(METERS)
    call.add("tokens", 5, {"model": "large"})
    call.add("tokens", 3, {"model": "large"})
    call.add("tokens", 2)
    assert call.units == {"tokens": 10, "tokens{model=large}": 8}
    assert call.rejected == 0


def test_an_undeclared_value_is_refused_counted_and_warned_of_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A value past the declared set is never charged nor named anywhere; the warning is not repeated."""
    call = CallUsage(METERS)
    with caplog.at_level(logging.WARNING, logger="meterware.usage"):
        for _ in range(3):
            call.add("tokens", 5, {"model": f"huge-{uuid.uuid4().hex}"})
    call.add("tokens", 1, {"region": "eu"})
    assert call.units == {}
    assert call.rejected == 4
    warnings = [record for record in caplog.records if "is not declared" in record.getMessage()]
    assert len(warnings) <= 1  # once per meter per minute (an earlier test may have said it already)


# -- record(): charged per value on memory, Redis and the cluster ---------------------------------------


class Setup:
    def __init__(self, storage: str, spool_dir: Path) -> None:
        self.config = Config.from_dict(dimension_config(storage, spool_dir))
        self.accounts = Accounts.open(self.config)
        self.recorder = Recorder(self.config)
        # Under the owner name memory:// uses for its in-process rollup (whose lease would otherwise keep
        # the shards for a while); one worker for the whole test, for the same reason.
        self.worker = RollupWorker(self.accounts.storage, self.config, owner=f"in-process-{os.getpid()}")

    def customer(self, plan: str, credits: str | None = None) -> str:
        customer_id = f"{plan}-{uuid.uuid4().hex[:8]}"
        self.accounts.create_customer(customer_id, plan=plan)
        if credits:
            self.accounts.grant_credits(customer_id, credits)
        return customer_id

    def settle(self) -> None:
        self.recorder.flush()
        self.worker.drain()


@pytest.fixture
def setup(backend_url: str, tmp_path: Path) -> Iterator[Setup]:
    """On memory, a real redis-server, a real 3-node Redis Cluster (each empty)."""
    made = Setup(backend_url, tmp_path / "spool")
    yield made
    made.recorder.close()
    made.accounts.close()


def test_per_model_prices_with_included_units_per_value(setup: Setup) -> None:
    """Charged at flush, by hand: small 1,500 tokens (1,000 included) x 1 = 500; large 300 + 50 (100
    included) x 10 = 2,500; 20 tokens without a model x 2 = 40; 3,040 micro-credits of 10 credits. The
    rollup windows hold each value's units as the events do, and the invoice a line per priced value."""
    customer = setup.customer("models", credits="10")
    record = setup.recorder.record
    record(customer, {"tokens": 1500}, event_id="a", dimensions={"model": "small", "direction": "input"})
    record(customer, {"tokens": 300}, event_id="b", dimensions={"direction": "output", "model": "large"})
    record(customer, {"tokens": 50}, event_id="c", dimensions={"model": "large", "direction": "input"})
    record(customer, {"tokens": 20}, event_id="d")
    setup.settle()
    assert setup.accounts.balance(customer).balance == 10_000_000 - 3_040
    charges = [entry.amount for entry in setup.accounts.ledger(customer) if entry.kind == "charge"]
    assert sum(charges) == -3_040
    usage = setup.accounts.usage(customer)
    assert {name: value for name, value in usage.meters.items() if value} == {
        "tokens": 1870,
        SMALL_IN: 1500,
        LARGE_IN: 50,
        LARGE_OUT: 300,
    }
    assert usage.spend == 3_040
    minutes = setup.accounts.usage_history(customer, window="minute").points
    assert sum(point.meters.get(LARGE_OUT, 0) for point in minutes) == 300
    assert sum(point.meters.get(SMALL_IN, 0) for point in minutes) == 1500
    invoice = setup.accounts.invoice(customer)
    lines = {line.meter: (line.quantity, line.included, line.billable) for line in invoice.lines}
    assert lines == {
        "tokens": (20, 0, 20),
        "tokens{model=small}": (1500, 1000, 500),
        "tokens{model=large}": (350, 100, 250),
    }
    assert invoice.credits_charged == 3_040


def test_included_units_of_one_value_are_not_spent_by_another(setup: Setup) -> None:
    """1,000 large tokens cost (1,000 - 100) x 10 = 9,000 micro-credits: small's 1,000 included units
    stay unused, and a reservation holds the large price before the flush."""
    customer = setup.customer("models", credits="1")
    done = setup.recorder.record(customer, {"tokens": 1000}, event_id="x", dimensions={"model": "large"})
    assert done.reserved_credits == 9_000
    setup.settle()
    assert setup.accounts.balance(customer).balance == 1_000_000 - 9_000
    setup.recorder.record(customer, {"tokens": 1000}, event_id="y", dimensions={"model": "small"})
    setup.settle()
    assert setup.accounts.balance(customer).balance == 1_000_000 - 9_000


def test_a_hard_quota_on_the_meter_counts_every_value(setup: Setup) -> None:
    """A quota of 1,000 tokens: 600 small and 400 large fill it; one more token of either is refused."""
    customer = setup.customer("capped")
    setup.recorder.record(customer, {"tokens": 600}, event_id="s", dimensions={"model": "small"})
    setup.recorder.record(customer, {"tokens": 400}, event_id="l", dimensions={"model": "large"})
    with pytest.raises(Refused) as refused:
        setup.recorder.record(customer, {"tokens": 1}, event_id="one", dimensions={"model": "small"})
    assert refused.value.reason == "quota_exceeded"


def test_a_record_with_an_undeclared_value_is_refused_and_counted(setup: Setup) -> None:
    """Nothing is charged nor written; `meterware_units_rejected_total` counts it."""
    customer = setup.customer("models", credits="1")
    before = REGISTRY.get_sample_value("meterware_units_rejected_total") or 0
    with pytest.raises(UsageError, match="value 'huge' of dimension 'model'"):
        setup.recorder.record(customer, {"tokens": 10}, event_id="h", dimensions={"model": "huge"})
    assert REGISTRY.get_sample_value("meterware_units_rejected_total") == before + 1
    setup.settle()
    assert setup.accounts.balance(customer).balance == 1_000_000
    assert setup.accounts.usage(customer).meters["tokens"] == 0


def test_the_ingestion_endpoint_takes_dimension_values(setup: Setup) -> None:
    """Events with dimension values are charged per value (small 1,500 at 1 beyond 1,000 = 500; large 350
    at 10 beyond 100 = 2,500); an undeclared value is an invalid event, nothing recorded for it."""
    customer = setup.customer("models", credits="10")
    token = "t" * 40
    app = wsgi_app(setup.config, token=token)
    client = Client(app)
    events = [
        {
            "event_id": "i-1",
            "customer": customer,
            "units": {"tokens": 1500},
            "dimensions": {"model": "small"},
        },
        {"event_id": "i-2", "customer": customer, "units": {"tokens": 350}, "dimensions": {"model": "large"}},
        {"event_id": "i-3", "customer": customer, "units": {"tokens": 9}, "dimensions": {"model": "huge"}},
    ]
    answer = client.post("/", json={"events": events}, headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 202
    results = answer.get_json()["results"]
    assert [entry["status"] for entry in results] == ["recorded", "recorded", "invalid"]
    assert "value 'huge' of dimension 'model' of meter 'tokens' is not declared" in results[2]["reason"]
    app.close()
    setup.worker.drain()
    assert setup.accounts.balance(customer).balance == 10_000_000 - 3_000
    usage = setup.accounts.usage(customer).meters
    assert (usage["tokens"], usage["tokens{model=small}"], usage["tokens{model=large}"]) == (1850, 1500, 350)


# -- the rollup: windows per value ---------------------------------------------------------------------


def test_the_rollup_keeps_a_window_per_value_equal_to_the_events() -> None:
    """Events of four sub-meters over three minutes, through the wire format (version 2, unchanged) and
    the fold: every minute and the period hold, per sub-meter, the sum of its events, and the meter its
    total."""
    meters = {"tokens": Meter("tokens", "sum", "handler", dimensions=(("model", ("small", "large")),))}
    names = ["tokens{model=small}", "tokens{model=large}"]
    made = []
    for index in range(60):
        name = names[index % 2]
        value = 7 * index + 1
        units: dict[str, int | str] = {"tokens": value, name: value} if index % 3 else {"tokens": value}
        made.append(event(ts=T0_MS + index * 3_000, units=units))
    events = decode_batch(encode_batch(made))
    assert [e.units for e in events] == [e.units for e in made]
    totals = fold(events, [0] * len(events), meters)
    for window, window_totals in totals.items():
        inside = [e for e in made if window.start * 1000 <= e.timestamp_ms < window.start * 1000 + 60_000]
        if window.window == "period":
            inside = made
        elif window.window != "minute":
            continue
        for name in ["tokens", *names]:
            assert window_totals.sums.get(name, 0) == sum(int(e.units.get(name, 0)) for e in inside)
    assert {window.window for window in totals} == {"minute", "hour", "day", "period"}


CONFIG_TOML = """
[storage]
url = "{url}"
shards = 4

[meters.calls]
aggregation = "count"

[meters.tokens]
aggregation = "sum"
source = "handler"
dimensions = {{ model = ["small", "large"], direction = ["input", "output"] }}

[plans.models]
prepaid = true
[plans.models.meters.tokens]
price = "0.000002"
[plans.models.meters."tokens{{model=small}}"]
included = 1000
price = "0.000001"
[plans.models.meters."tokens{{model=large}}"]
included = 100
price = "0.00001"

[plans.capped.meters.tokens]
quota = 1000
"""


def test_meterware_usage_and_invoice_show_each_value(
    setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`meterware usage` lists the per-value totals; `meterware invoice` a line per priced value (and the
    TOML form of the configuration, quoted keys and an inline table, loads as the dict one does)."""
    path = tmp_path / "meterware.toml"
    path.write_text(CONFIG_TOML.format(url=setup.config.storage))
    assert Config.from_file(path).plans["models"] == setup.config.plans["models"]
    customer = setup.customer("models", credits="10")
    record = setup.recorder.record
    record(customer, {"tokens": 1500}, event_id="a", dimensions={"model": "small", "direction": "input"})
    record(customer, {"tokens": 350}, event_id="b", dimensions={"model": "large", "direction": "output"})
    setup.settle()
    capsys.readouterr()
    assert main(["usage", customer, "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"tokens\{model=small,direction=input\}\s+1500", out)
    assert re.search(r"tokens\{model=large,direction=output\}\s+350", out)
    assert main(["invoice", customer, "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "tokens{model=small}" in out
    assert "tokens{model=large}" in out


def test_an_event_of_a_meter_with_dimensions_is_voided_not_amended(setup: Setup) -> None:
    """Voiding takes back the meter and its values (windows and credits); amending is refused, since the
    sub-meters and their prices would no longer add up."""
    customer = setup.customer("models", credits="1")
    done = setup.recorder.record(customer, {"tokens": 1000}, event_id="v", dimensions={"model": "large"})
    setup.settle()
    assert setup.accounts.balance(customer).balance == 1_000_000 - 9_000
    with pytest.raises(UsageError, match="'tokens' has dimensions: void the event"):
        setup.accounts.amend_event(
            done.stream_event_id, units={"tokens": 5}, reason="x", customer_id=customer
        )
    setup.accounts.void_event(done.stream_event_id, reason="test", customer_id=customer)
    setup.settle()
    assert setup.accounts.balance(customer).balance == 1_000_000
    usage = setup.accounts.usage(customer).meters
    assert (usage["tokens"], usage.get("tokens{model=large}", 0)) == (0, 0)


def test_concurrent_records_spend_exactly_the_credits_per_value(setup: Setup) -> None:
    """200 concurrent records of 10 large tokens against 0.01 credits: the first 100 tokens are included,
    then each record costs 10 x 10 = 100 micro-credits, so exactly 10 + 100 are recorded and 90 refused
    (insufficient credits); the balance ends at 0, never below."""
    customer = setup.customer("models", credits="0.01")

    def one(index: int) -> str:
        try:
            setup.recorder.record(
                customer, {"tokens": 10}, event_id=f"c-{index}", dimensions={"model": "large"}
            )
        except Refused as refused:
            return refused.reason
        return "recorded"

    with ThreadPoolExecutor(max_workers=16) as pool:
        outcomes = Counter(pool.map(one, range(200)))
    assert outcomes == {"recorded": 110, "insufficient_credits": 90}
    setup.settle()
    assert setup.accounts.balance(customer).balance == 0
    assert setup.accounts.usage(customer).meters["tokens{model=large}"] == 1100
