"""Units reported by handlers: aggregation per meter, and values that are refused with a warning."""

from __future__ import annotations

import contextvars
import logging
from typing import Any

import pytest

from meterware import usage
from meterware.config import Meter
from meterware.usage import CallUsage

METERS = {
    "tokens": Meter("tokens", "sum", "handler"),
    "requests": Meter("requests", "count", "handler"),
    "peak": Meter("peak", "max", "handler"),
    "latest": Meter("latest", "last", "handler"),
    "users": Meter("users", "unique", "handler"),
    "calls": Meter("calls", "count", "call"),
    "bytes": Meter("bytes", "sum", "response_bytes"),
    "header_tokens": Meter("header_tokens", "sum", "header:X-Usage-Tokens"),
}


@pytest.fixture
def call() -> CallUsage:
    return CallUsage(METERS)


@pytest.mark.parametrize(
    ("meter", "values", "expected"),
    [
        pytest.param("tokens", [3, 4, 0], 7, id="sum-adds"),
        pytest.param("tokens", [3.0, 2], 5, id="sum-whole-float"),
        pytest.param("tokens", [2**53 - 1], 2**53 - 1, id="sum-largest"),
        pytest.param("requests", [2, 3], 5, id="count-adds"),
        pytest.param("peak", [3, 9, 4], 9, id="max-keeps-largest"),
        pytest.param("peak", [0], 0, id="max-zero"),
        pytest.param("latest", [3, 9, 4], 4, id="last-keeps-latest"),
        pytest.param("users", ["u-1"], "u-1", id="unique-string"),
        pytest.param("users", [42], "42", id="unique-int-as-text"),
        pytest.param("users", ["u-1", "u-2"], "u-2", id="unique-latest-value"),
        pytest.param("users", ["x" * 256], "x" * 256, id="unique-256-chars"),
        pytest.param("users", [10**256 - 1], "9" * 256, id="unique-int-256-digits"),
    ],
)
def test_add_per_aggregation(call: CallUsage, meter: str, values: list[Any], expected: int | str) -> None:
    """Sums and counts add up, max keeps the largest, last the latest, unique records the value."""
    for value in values:
        call.add(meter, value)
    assert call.units == {meter: expected}
    assert type(call.units[meter]) is type(expected)
    assert call.rejected == 0


def test_meters_are_kept_apart(call: CallUsage) -> None:
    """Units of different meters of one call do not mix."""
    call.add("tokens", 10)
    call.add("peak", 3)
    call.add("tokens", 5)
    assert call.units == {"tokens": 15, "peak": 3}


@pytest.mark.parametrize(
    ("meter", "value", "problem"),
    [
        pytest.param("tokens", -1, "units must not be negative, got -1", id="negative"),
        pytest.param("tokens", -0.0 - 1, "units must not be negative", id="negative-float"),
        pytest.param("tokens", float("nan"), "units must be a whole number, got nan", id="nan"),
        pytest.param("tokens", float("inf"), "units must be a whole number, got inf", id="inf"),
        pytest.param("tokens", float("-inf"), "units must be a whole number", id="minus-inf"),
        pytest.param("tokens", 1.5, "units must be a whole number, got 1.5", id="fractional"),
        pytest.param("tokens", True, "units must be an integer, got bool", id="bool"),
        pytest.param("tokens", 2**53, "units are too large", id="huge"),
        pytest.param("tokens", 2**53 - 10, "the call's total would be too large", id="huge-total"),
        pytest.param("tokens", 1e300, "units are too large", id="huge-float"),
        pytest.param("tokens", "3", "units must be an integer, got str", id="string"),
        pytest.param("tokens", None, "units must be an integer, got NoneType", id="none"),
        pytest.param("tokens", [1], "units must be an integer, got list", id="list"),
        pytest.param("peak", -5, "units must not be negative", id="max-negative"),
        pytest.param("latest", 0.5, "units must be a whole number", id="last-fractional"),
        pytest.param("users", True, "a unique meter takes a string or integer", id="unique-bool"),
        pytest.param("users", "x" * 257, "at most 256 characters", id="unique-too-long"),
        pytest.param("users", 1.5, "a unique meter takes a string or integer", id="unique-float"),
        pytest.param("users", 10**256, "at most 256 characters", id="unique-int-257-digits"),
        pytest.param("users", 10**5000, "at most 256 characters", id="unique-int-5001-digits"),
        pytest.param("users", None, "a unique meter takes a string or integer", id="unique-none"),
        pytest.param("nope", 1, "no such meter is configured", id="unknown-meter"),
        pytest.param("calls", 1, "its source is 'call', not 'handler'", id="call-meter"),
        pytest.param("bytes", 1, "its source is 'response_bytes', not 'handler'", id="bytes-meter"),
        pytest.param("header_tokens", 1, "its source is 'header:X-Usage-Tokens'", id="header-meter"),
    ],
)
def test_rejected_values_are_ignored_with_a_warning(
    call: CallUsage, caplog: pytest.LogCaptureFixture, meter: str, value: Any, problem: str
) -> None:
    """A value that cannot be metered is never charged: it is counted in rejected and logged as a warning."""
    call.add("tokens", 10)
    with caplog.at_level(logging.WARNING, logger="meterware.usage"):
        call.add(meter, value)
    assert call.units == {"tokens": 10}
    assert call.rejected == 1
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert record.name == "meterware.usage"
    assert repr(meter) in record.getMessage()
    assert problem in record.getMessage()


def test_rejections_are_counted(call: CallUsage, caplog: pytest.LogCaptureFixture) -> None:
    """Each rejected value adds one to rejected; good values in between still count."""
    with caplog.at_level(logging.WARNING, logger="meterware.usage"):
        call.add("tokens", -1)
        call.add("tokens", 2)
        call.add("nope", 1)
    assert call.rejected == 2
    assert call.units == {"tokens": 2}
    assert len(caplog.records) == 2


def test_add_outside_a_call_is_a_warning_no_op(caplog: pytest.LogCaptureFixture) -> None:
    """usage.add outside a metered call logs a warning and changes nothing."""
    assert usage.current() is None
    with caplog.at_level(logging.WARNING, logger="meterware.usage"):
        usage.add("tokens", 5)
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "usage.add('tokens') outside a metered call was ignored" in record.getMessage()
    assert usage.current() is None


def test_add_inside_a_call_reaches_that_call() -> None:
    """usage.add reports to the CallUsage of the current context (what the middleware sets per call)."""
    first, second = CallUsage(METERS), CallUsage(METERS)

    def handler(call: CallUsage, tokens: int) -> None:
        with usage.reporting_to(call) as reporting:
            assert reporting is call
            assert usage.current() is call
            usage.add("tokens", tokens)
            usage.add("tokens", 1)

    contextvars.copy_context().run(handler, first, 5)
    contextvars.copy_context().run(handler, second, 100)
    assert first.units == {"tokens": 6}
    assert second.units == {"tokens": 101}
    assert usage.current() is None


def test_reporting_to_ends_with_its_block_and_nests() -> None:
    """Inside ``reporting_to`` units go to its call; after the block, to the call around it (or nowhere)."""
    outer, inner = CallUsage(METERS), CallUsage(METERS)
    scope = usage.reporting_to(outer)
    with scope:
        usage.add("tokens", 1)
        with usage.reporting_to(inner):
            usage.add("tokens", 10)
        usage.add("tokens", 2)
    assert usage.current() is None
    with scope:  # reusable, one block at a time
        usage.add("tokens", 4)
    assert outer.units == {"tokens": 7}
    assert inner.units == {"tokens": 10}


def test_reporting_to_ends_when_its_block_raises() -> None:
    """An exception leaving the block still ends the call's scope."""
    call = CallUsage(METERS)
    with pytest.raises(RuntimeError), usage.reporting_to(call):
        raise RuntimeError("the handler failed")
    assert usage.current() is None


def test_current_call_reads_the_admitted_key_and_is_none_outside_a_call() -> None:
    """current_call() is None outside a metered call (or for usage without a key), and inside one names
    the key's customer, plan, id, scopes and mode."""
    from meterware.metering.records import Customer, KeyInfo

    assert usage.current_call() is None
    with usage.reporting_to(CallUsage(METERS)):
        assert usage.current_call() is None
    key = KeyInfo("key_1", Customer("acme", "pro"), False, "mw_test_ab12", scopes=("read",))
    with usage.reporting_to(CallUsage(METERS, key=key)):
        assert usage.current_call() == usage.CurrentCall("acme", "pro", "key_1", ("read",), False)
    assert usage.current_call() is None
