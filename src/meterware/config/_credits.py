"""Credit amounts: exact micro-credits, and the largest numbers the backends keep exact."""

from __future__ import annotations

import re
from typing import Any, Final

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
#: A credit amount as text: ASCII digits (``[0-9]`` matches no other script's), an optional fraction.
_AMOUNT: Final = re.compile(r"([0-9]+)(?:\.([0-9]+))?")
#: Whole credits' digits an amount may have (the largest, 9,007,199,254 credits, has 10).
_MAX_WHOLE_DIGITS: Final = len(str(MAX_MICROS // MICROS_PER_CREDIT))


def parse_credits(value: Any, field_name: str) -> int:
    """Turn a credit amount (``"0.002"``, ``5``) into exact micro-credits; never through a float.

    A string is ASCII digits with an optional fraction: what Python's ``Decimal`` also reads (other
    scripts' digits, exponents, underscores, signs, ``NaN``) is refused, so every surface (the config, the
    CLI, ``Accounts``, the portal) reads an amount the same way."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(
            field_name, f'must be a decimal string like "0.002" or an integer, got {kind_of(value)}'
        )
    if isinstance(value, int) and abs(value) > MAX_MICROS:
        # Out of range, and never shown whole: str() raises ValueError on an int of over 4,300 digits.
        problem = (
            "must not be negative"
            if value < 0
            else f"must be at most {MAX_MICROS // MICROS_PER_CREDIT} credits"
        )
        raise ConfigError(
            field_name, f"{problem}, got an integer of {len(format(abs(value), 'x'))} hex digits"
        )
    text = str(value).strip(" \t")
    shown = repr(text if len(text) <= 40 else text[:40] + "...")
    if text.startswith("-"):
        raise ConfigError(field_name, f"must not be negative, got {shown}")
    matched = _AMOUNT.fullmatch(text)
    if matched is None:
        raise ConfigError(field_name, f"must be a number of credits, got {shown}")
    whole, fraction = matched[1].lstrip("0"), (matched[2] or "").rstrip("0")
    if len(fraction) > 6:
        raise ConfigError(field_name, f"must be a number of credits with at most 6 decimals, got {shown}")
    too_large = ConfigError(
        field_name, f"must be at most {MAX_MICROS // MICROS_PER_CREDIT} credits, got {shown}"
    )
    if len(whole) > _MAX_WHOLE_DIGITS:  # refused before a long run of digits is read as a number
        raise too_large
    micros = int(whole or "0") * MICROS_PER_CREDIT + int(fraction.ljust(6, "0"))
    if micros > MAX_MICROS:
        raise too_large
    return micros


def format_credits(micros: int) -> str:
    """Micro-credits as a decimal string with six places (``1500000`` -> ``"1.500000"``)."""
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), MICROS_PER_CREDIT)
    return f"{sign}{whole}.{fraction:06d}"
