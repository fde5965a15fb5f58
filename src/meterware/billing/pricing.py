"""Pricing models: what a period's quantity of one meter costs, in exact decimal arithmetic.

Pure and I/O-free. Amounts are :class:`~decimal.Decimal` in units of the plan's currency (1 credit = 1 unit);
nothing here ever goes through a float. Models, each after the meter's ``included`` units:

* ``unit``: every billable unit at ``price``;
* ``package``: ``price`` per started package of ``size`` units (a partial package is charged whole);
* ``graduated``: tiers priced in turn, each unit at the price of the tier it falls in;
* ``volume``: every unit at the price of the one tier the whole quantity falls in.

A tier covers the billable units up to and including ``up_to`` (the last tier has none); its ``flat`` fee
is charged once when at least one unit reaches it. A plan adds a ``base_fee`` per period and may raise the
invoice to a ``minimum`` (a visible "minimum commitment" line).

Rounding: each line is computed exactly, then rounded once to the currency's minor unit (2 decimals unless
the currency has none or 3, as ISO 4217 says) with ROUND_HALF_UP. The subtotal is the sum of rounded lines.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Context, Decimal, Inexact, InvalidOperation, Overflow
from typing import Any, Final, Literal

from meterware.billing._asdict import fields_dict
from meterware.dimensions import REMAINDER, filtered, priced_units
from meterware.errors import ConfigError

PriceModel = Literal["unit", "package", "graduated", "volume"]
TierMode = Literal["graduated", "volume"]
LineKind = Literal["usage", "base_fee", "minimum", "adjustment"]

ZERO: Final = Decimal(0)
#: Half a minor unit and more rounds away from zero (0.005 -> 0.01, 2.675 -> 2.68).
ROUNDING: Final = ROUND_HALF_UP
#: Decimals a price, fee or minimum may have off the request path (per-unit ``price`` keeps 6: micro-credits).
MAX_DECIMALS: Final = 12
#: Digits before the point of any configured amount.
MAX_WHOLE_DIGITS: Final = 15
DEFAULT_CURRENCY: Final = "USD"
# ISO 4217 currencies whose minor unit is not 2 decimals (the others, and unknown codes, have 2).
_MINOR_UNITS: Final[Mapping[str, int]] = {
    **dict.fromkeys(("BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"), 3),
    **dict.fromkeys(
        (
            "BIF",
            "CLP",
            "DJF",
            "GNF",
            "ISK",
            "JPY",
            "KMF",
            "KRW",
            "PYG",
            "RWF",
            "UGX",
            "VND",
            "VUV",
            "XAF",
            "XOF",
            "XPF",
        ),
        0,
    ),
}
_CURRENCY_RE: Final = re.compile(r"^[A-Z]{3}\Z")
# Products of a quantity (< 2**53) and an amount (15 + 12 digits) fit in 100 digits: exact, never rounded.
_EXACT: Final = Context(prec=100, rounding=ROUNDING, traps=[InvalidOperation, Inexact, Overflow])
_ROUND: Final = Context(prec=100, rounding=ROUNDING, traps=[InvalidOperation, Overflow])


def minor_unit(currency: str) -> int:
    """Decimals of ``currency``'s minor unit (``"USD"`` -> 2, ``"JPY"`` -> 0, ``"KWD"`` -> 3)."""
    return _MINOR_UNITS.get(currency, 2)


def round_amount(amount: Decimal, decimals: int) -> Decimal:
    """``amount`` rounded to ``decimals`` places, half up (the one rounding rule of invoices)."""
    return amount.quantize(Decimal(1).scaleb(-decimals), rounding=ROUNDING, context=_ROUND)


def text(amount: Decimal) -> str:
    """A decimal as plain text, no exponent, no trailing zeros (``Decimal("0.000500")`` -> ``"0.0005"``)."""
    return f"{amount.normalize(_EXACT):f}" if amount else "0"


def money(amount: Decimal, decimals: int) -> str:
    """An amount with exactly the currency's decimals (``12.3`` -> ``"12.30"``)."""
    return f"{round_amount(amount, decimals):f}"


@dataclass(frozen=True, slots=True)
class Tier:
    """Billable units up to and including ``up_to`` (None: all the rest), at ``price`` each, plus ``flat``."""

    up_to: int | None
    price: Decimal
    flat: Decimal = ZERO


@dataclass(frozen=True, slots=True)
class TierUse:
    """How one tier priced a quantity: its range of units, the units it priced, and what they cost."""

    first: int
    up_to: int | None
    units: int
    price: Decimal
    flat: Decimal
    amount: Decimal

    def as_dict(self) -> dict[str, Any]:
        amounts = {name: text(getattr(self, name)) for name in ("price", "flat", "amount")}
        return fields_dict(self) | amounts  # a replaced key keeps its place


@dataclass(frozen=True, slots=True)
class Charge:
    """What a quantity of one meter costs under a :class:`Price`, exactly (before rounding)."""

    quantity: int
    included: int
    billable: int
    amount: Decimal
    #: The tiers used (graduated: each tier reached; volume: the one tier); empty for other models.
    tiers: tuple[TierUse, ...] = ()
    #: Packages charged (package model), partial ones rounded up.
    packages: int = 0


@dataclass(frozen=True, slots=True)
class Price:
    """How one meter is priced per period: ``included`` units free, then one model.

    >>> Price.package(1000, Decimal("0.02")).charge(2500).amount
    Decimal('0.06')
    """

    model: PriceModel = "unit"
    #: ``unit``: per unit; ``package``: per package.
    price: Decimal = ZERO
    package_size: int = 1
    tiers: tuple[Tier, ...] = ()
    included: int = 0

    def __post_init__(self) -> None:
        _check_amount(self.price, "price")
        if self.included < 0:
            raise ValueError(f"included must be at least 0, got {self.included}")
        if self.model == "package" and self.package_size < 1:
            raise ValueError(f"a package holds at least 1 unit, got {self.package_size}")
        if self.model in ("graduated", "volume"):
            _check_tiers(self.tiers)
        elif self.tiers:
            raise ValueError(f"a {self.model} price has no tiers")

    @classmethod
    def unit(cls, price: Decimal, *, included: int = 0) -> Price:
        return cls("unit", price, included=included)

    @classmethod
    def package(cls, size: int, price: Decimal, *, included: int = 0) -> Price:
        return cls("package", price, package_size=size, included=included)

    @classmethod
    def tiered(cls, mode: TierMode, tiers: Iterable[Tier], *, included: int = 0) -> Price:
        return cls(mode, tiers=tuple(tiers), included=included)

    def charge(self, quantity: int) -> Charge:
        """Price ``quantity`` units of one period, exactly; the result says which tiers it used."""
        if quantity < 0:
            raise ValueError(f"a quantity is at least 0, got {quantity}")
        billable = max(0, quantity - self.included)
        base = Charge(quantity, self.included, billable, ZERO)
        if billable == 0:
            return base
        if self.model == "unit":
            return _replace(base, amount=_EXACT.multiply(self.price, billable))
        if self.model == "package":
            packages = -(-billable // self.package_size)  # partial packages are charged whole
            return _replace(base, amount=_EXACT.multiply(self.price, packages), packages=packages)
        uses = (
            _graduated(self.tiers, billable) if self.model == "graduated" else _volume(self.tiers, billable)
        )
        return _replace(base, amount=sum((use.amount for use in uses), ZERO), tiers=uses)

    def describe(self) -> str:
        """One line for an invoice: ``"0.0005 per unit"``, ``"graduated: 1-10000 at 0.001, ..."``."""
        if self.model == "unit":
            return f"{text(self.price)} per unit"
        if self.model == "package":
            return f"{text(self.price)} per {self.package_size} units (partial packages rounded up)"
        parts = []
        first = 1
        for tier in self.tiers:
            span = f"{first}+" if tier.up_to is None else f"{first}-{tier.up_to}"
            flat = f" + {text(tier.flat)} flat" if tier.flat else ""
            parts.append(f"{span} at {text(tier.price)}{flat}")
            first = (tier.up_to or 0) + 1
        return f"{self.model}: {', '.join(parts)}"

    def as_dict(self) -> dict[str, Any]:
        """The price as JSON-safe data (amounts as strings); :meth:`from_dict` reads it back."""
        data: dict[str, Any] = {"model": self.model, "included": self.included}
        if self.model in ("unit", "package"):
            data["price"] = text(self.price)
        if self.model == "package":
            data["size"] = self.package_size
        if self.tiers:
            data["tiers"] = [
                {"up_to": tier.up_to, "price": text(tier.price), "flat": text(tier.flat)}
                for tier in self.tiers
            ]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Price:
        tiers = tuple(
            Tier(tier["up_to"], Decimal(tier["price"]), Decimal(tier["flat"]))
            for tier in data.get("tiers", ())
        )
        return cls(
            data["model"],
            Decimal(data.get("price", "0")),
            int(data.get("size", 1)),
            tiers,
            int(data["included"]),
        )


def _replace(charge: Charge, **changes: Any) -> Charge:
    values = {name: getattr(charge, name) for name in Charge.__dataclass_fields__}
    return Charge(**(values | changes))


def _graduated(tiers: tuple[Tier, ...], billable: int) -> tuple[TierUse, ...]:
    uses = []
    below = 0  # units priced by the tiers before this one
    for tier in tiers:
        top = billable if tier.up_to is None else min(billable, tier.up_to)
        units = top - below
        amount = _EXACT.add(_EXACT.multiply(tier.price, units), tier.flat)
        uses.append(TierUse(below + 1, tier.up_to, units, tier.price, tier.flat, amount))
        below = top
        if below >= billable:
            break
    return tuple(uses)


def _volume(tiers: tuple[Tier, ...], billable: int) -> tuple[TierUse, ...]:
    first = 1
    for tier in tiers:
        if tier.up_to is None or billable <= tier.up_to:
            amount = _EXACT.add(_EXACT.multiply(tier.price, billable), tier.flat)
            return (TierUse(first, tier.up_to, billable, tier.price, tier.flat, amount),)
        first = tier.up_to + 1
    raise AssertionError("the last tier is open-ended")  # _check_tiers


def _check_amount(amount: Decimal, name: str) -> None:
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"{name} must be a non-negative number, got {amount}")


def _check_tiers(tiers: tuple[Tier, ...]) -> None:
    if not tiers:
        raise ValueError("needs at least one tier")
    previous = 0
    for index, tier in enumerate(tiers):
        _check_amount(tier.price, f"tier {index} price")
        _check_amount(tier.flat, f"tier {index} flat")
        last = index == len(tiers) - 1
        if tier.up_to is None and not last:
            raise ValueError(f"only the last tier is open-ended; tier {index} needs up_to")
        if tier.up_to is not None and last:
            raise ValueError("the last tier must be open-ended (no up_to)")
        if tier.up_to is not None and tier.up_to <= previous:
            raise ValueError(f"tier {index} up_to must be above {previous}, got {tier.up_to}")
        previous = tier.up_to or previous


# -- a plan's prices and one period's lines ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Line:
    """One line of an invoice, its amount already rounded to the currency's minor unit.

    Plain data, so a closed invoice is stored and read back as it was shown (:meth:`as_dict`,
    :meth:`from_dict`), whatever later versions of the pricing code would compute.
    """

    kind: LineKind
    description: str
    amount: Decimal
    meter: str | None = None
    #: Usage lines: the period's units, those included, those billed. Adjustments: the late units.
    quantity: int | None = None
    included: int | None = None
    billable: int | None = None
    price: Price | None = None
    #: The tiers used (graduated, volume).
    tiers: tuple[TierUse, ...] = ()
    #: Packages charged (package pricing).
    packages: int | None = None
    #: Adjustments: the closed period whose late usage the line bills.
    period_start: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe: amounts are strings."""
        return {
            "kind": self.kind,
            "description": self.description,
            "meter": self.meter,
            "quantity": self.quantity,
            "included": self.included,
            "billable": self.billable,
            "pricing": self.price.describe() if self.price else None,
            "price": self.price.as_dict() if self.price else None,
            "tiers": [use.as_dict() for use in self.tiers],
            "packages": self.packages,
            "period_start": self.period_start,
            "amount": f"{self.amount:f}",
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Line:
        tiers = tuple(
            TierUse(
                use["first"],
                use["up_to"],
                use["units"],
                Decimal(use["price"]),
                Decimal(use["flat"]),
                Decimal(use["amount"]),
            )
            for use in data["tiers"]
        )
        price = Price.from_dict(data["price"]) if data["price"] else None
        return cls(
            data["kind"],
            data["description"],
            Decimal(data["amount"]),
            data["meter"],
            data["quantity"],
            data["included"],
            data["billable"],
            price,
            tiers,
            data["packages"],
            data["period_start"],
        )


@dataclass(frozen=True, slots=True)
class PlanPrices:
    """Everything that prices one period of a plan: currency, base fee, minimum, and a price per meter."""

    currency: str = DEFAULT_CURRENCY
    base_fee: Decimal = ZERO
    minimum: Decimal = ZERO
    meters: Mapping[str, Price] = field(default_factory=dict)

    @property
    def decimals(self) -> int:
        return minor_unit(self.currency)

    def quantities(self, totals: Mapping[str, int]) -> dict[str, int]:
        """The units each price applies to, from a window's totals (meters and their sub-meters): a filter
        of dimension values (``tokens{model=large}``) takes the sub-meters it prices (the most specific
        filter that matches), and its meter the units no filter prices (:mod:`meterware.dimensions`)."""
        names = frozenset(self.meters)
        split = filtered(names)
        if not split:
            return {meter: int(totals.get(meter, 0)) for meter in self.meters}
        priced = priced_units(totals, names | {meter + REMAINDER for meter in split})
        return {meter: priced[meter + REMAINDER if meter in split else meter] for meter in self.meters}

    def lines(self, quantities: Mapping[str, int]) -> list[Line]:
        """The lines of one period: the base fee, one per priced meter, and the minimum if it lifts them."""
        decimals = self.decimals
        lines = []
        if self.base_fee:
            lines.append(Line("base_fee", "base fee", round_amount(self.base_fee, decimals)))
        for meter, price in self.meters.items():
            charge = price.charge(quantities.get(meter, 0))
            lines.append(
                Line(
                    "usage",
                    meter,
                    round_amount(charge.amount, decimals),
                    meter,
                    charge.quantity,
                    charge.included,
                    charge.billable,
                    price,
                    charge.tiers,
                    charge.packages if price.model == "package" else None,
                )
            )
        minimum = round_amount(self.minimum, decimals)
        below = minimum - sum((line.amount for line in lines), ZERO)
        if below > 0:
            lines.append(Line("minimum", f"minimum commitment of {money(minimum, decimals)}", below))
        return lines

    def as_dict(self) -> dict[str, Any]:
        return {
            "currency": self.currency,
            "base_fee": text(self.base_fee),
            "minimum": text(self.minimum),
            "meters": {name: price.as_dict() for name, price in self.meters.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlanPrices:
        meters = {name: Price.from_dict(price) for name, price in data["meters"].items()}
        return cls(data["currency"], Decimal(data["base_fee"]), Decimal(data["minimum"]), meters)


# -- configuration ---------------------------------------------------------------------------------------


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float):
        return "a number (floats are not exact: write the amount as a string)"
    return {int: "an integer", str: "a string", list: "a list"}.get(
        type(value), "a table" if isinstance(value, Mapping) else type(value).__name__
    )


def parse_money(value: Any, field_name: str, *, decimals: int = MAX_DECIMALS) -> Decimal:
    """An exact non-negative amount from a decimal string (``"49.00"``) or an integer; never a float."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(
            field_name, f'must be a decimal string like "0.002" or an integer, got {_kind(value)}'
        )
    try:
        amount = Decimal(value) if isinstance(value, int) else Decimal(value.strip())
    except InvalidOperation:
        raise ConfigError(field_name, f"must be a decimal amount, got {value!r}") from None
    if not amount.is_finite():
        raise ConfigError(field_name, f"must be a decimal amount, got {value!r}")
    if amount < 0:
        raise ConfigError(field_name, f"must not be negative, got {value!r}")
    exponent = amount.normalize(_EXACT).as_tuple().exponent
    # Trailing zeros are harmless ("1.50000000000000"); digits past the limit are not.
    if isinstance(exponent, int) and exponent < -decimals:
        raise ConfigError(field_name, f"must have at most {decimals} decimals, got {value!r}")
    if amount >= Decimal(10) ** MAX_WHOLE_DIGITS:
        raise ConfigError(field_name, f"must be below 10^{MAX_WHOLE_DIGITS}, got {value!r}")
    return amount


def parse_currency(value: Any, field_name: str) -> str:
    """An ISO 4217 code: three capital letters."""
    if not isinstance(value, str) or not _CURRENCY_RE.match(value):
        raise ConfigError(
            field_name, f"must be a currency code of three capital letters like 'USD', got {value!r}"
        )
    return value


def _units(value: Any, field_name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(field_name, f"must be an integer, got {_kind(value)}")
    if value < minimum:
        raise ConfigError(field_name, f"must be at least {minimum}, got {value}")
    return value


def _table(value: Any, field_name: str, known: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(field_name, f"must be a table, got {_kind(value)}")
    for key in value:
        if key not in known:
            raise ConfigError(f"{field_name}.{key}", "is not a known setting")
    return value


def parse_price(table: Mapping[str, Any], where: str, *, included: int, prepaid: bool) -> Price | None:
    """The ``package`` or ``tiers`` (+ ``tier_mode``) of a plan's meter table, or None if it has neither.

    ``where`` is the table's dotted path; errors name the field. A per-unit ``price`` stays with the
    config (micro-credits, the request path charges it); it cannot be combined with these.
    """
    given = [name for name in ("price", "package", "tiers") if name in table]
    if len(given) > 1:
        raise ConfigError(
            f"{where}.{given[1]}", f"a meter has one of price, package or tiers, not {' and '.join(given)}"
        )
    if "tier_mode" in table and "tiers" not in table:
        raise ConfigError(f"{where}.tier_mode", "applies to tiers, and this meter has none")
    if given in ([], ["price"]):
        return None
    name = given[0]
    if prepaid:
        raise ConfigError(
            f"{where}.{name}",
            "a prepaid plan charges credits call by call at a per-unit price; "
            "package and tier pricing need an invoiced plan (prepaid = false)",
        )
    if name == "package":
        package = _table(table["package"], f"{where}.package", ("size", "price"))
        for key in ("size", "price"):
            if key not in package:
                raise ConfigError(f"{where}.package.{key}", "is required")
        size = _units(package["size"], f"{where}.package.size", minimum=1)
        return Price.package(size, parse_money(package["price"], f"{where}.package.price"), included=included)
    mode = table.get("tier_mode")
    if mode not in ("graduated", "volume"):
        shown = "none" if mode is None else repr(mode)
        raise ConfigError(f"{where}.tier_mode", f"must be 'graduated' or 'volume', got {shown}")
    raw_tiers = table["tiers"]
    if not isinstance(raw_tiers, list) or not raw_tiers:
        raise ConfigError(f"{where}.tiers", f"must be a non-empty list of tables, got {_kind(raw_tiers)}")
    tiers = []
    previous = 0
    for index, raw in enumerate(raw_tiers):
        at = f"{where}.tiers[{index}]"
        tier = _table(raw, at, ("up_to", "price", "flat"))
        if "price" not in tier:
            raise ConfigError(f"{at}.price", "is required")
        last = index == len(raw_tiers) - 1
        up_to = None
        if "up_to" in tier:
            if last:
                raise ConfigError(f"{at}.up_to", "the last tier is open-ended: remove its up_to")
            up_to = _units(tier["up_to"], f"{at}.up_to", minimum=previous + 1)
            previous = up_to
        elif not last:
            raise ConfigError(f"{at}.up_to", "is required on every tier but the last")
        flat = parse_money(tier["flat"], f"{at}.flat") if "flat" in tier else ZERO
        tiers.append(Tier(up_to, parse_money(tier["price"], f"{at}.price"), flat))
    return Price.tiered(mode, tiers, included=included)
