"""Credit amounts: exact micro-credits, and the largest numbers the backends keep exact."""

from __future__ import annotations

from decimal import Context, Decimal, Inexact, InvalidOperation, Overflow
from typing import Any

from meterware.config._table import kind_of
from meterware.errors import ConfigError

MICROS_PER_CREDIT = 1_000_000
#: Largest amount in micro-credits: the Lua scripts compute in doubles, exact only up to 2**53.
MAX_MICROS = 2**53 - 1
#: Largest number of units in a counter or a term (the same reason).
MAX_UNITS = 2**53 - 1
#: Micro-credits one call may cost at most: the rollup refuses a cost of 16 digits (its whole batch would
#: be a dead letter), and sums of a few such costs must stay exact.
MAX_CALL_COST = 10**15 - 1
# Credits are exact: an amount that would be rounded (a 7th decimal, a 29th digit) is refused, not rounded.
_EXACT = Context(traps=[InvalidOperation, Inexact, Overflow])


def parse_credits(value: Any, field_name: str) -> int:
    """Turn a credit amount (``"0.002"``, ``5``) into exact micro-credits; never through a float."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(
            field_name, f'must be a decimal string like "0.002" or an integer, got {kind_of(value)}'
        )
    try:
        amount = Decimal(value) if isinstance(value, int) else Decimal(value.strip())
        micros = _EXACT.multiply(amount, MICROS_PER_CREDIT)
    except (InvalidOperation, Overflow):
        raise ConfigError(field_name, f"must be a number of credits, got {value!r}") from None
    except Inexact:
        raise ConfigError(
            field_name, f"must be a number of credits with at most 6 decimals, got {value!r}"
        ) from None
    if not amount.is_finite() or micros != micros.to_integral_value():
        raise ConfigError(field_name, f"must be a number of credits with at most 6 decimals, got {value!r}")
    if micros < 0:
        raise ConfigError(field_name, f"must not be negative, got {value!r}")
    if micros > MAX_MICROS:
        raise ConfigError(
            field_name, f"must be at most {MAX_MICROS // MICROS_PER_CREDIT} credits, got {value!r}"
        )
    return int(micros)


def format_credits(micros: int) -> str:
    """Micro-credits as a decimal string with six places (``1500000`` -> ``"1.500000"``)."""
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), MICROS_PER_CREDIT)
    return f"{sign}{whole}.{fraction:06d}"
