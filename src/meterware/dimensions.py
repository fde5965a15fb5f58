"""Dimensions: a meter's units split by declared values, as sub-meters like ``tokens{model=large}``.

A meter declares the dimensions it groups by and the values of each (``dimensions = {model = ["small",
"large"], direction = ["input", "output"]}``). A report names values of some or all of them; its units
count towards the meter (its total: what a quota counts) and towards one sub-meter, named by the meter and
the values in the order the dimensions are declared: ``tokens{model=large,direction=output}``. Sub-meters
are ordinary names in an event's units, so the rollup keeps windows per sub-meter, and usage reads,
exports and invoices read them like meters. A value that is not declared is refused (never an unbounded
name), and the number of sub-meters a meter may have is capped (:data:`MAX_SUBMETERS`).

Plans price sub-meters with filters: terms under ``tokens{model=large}`` price the units of every
sub-meter whose values include ``model=large``. The most specific filter wins (the one naming most
dimensions; a plan where two equally specific filters would price the same sub-meter is refused), and
units no filter matches are priced by the base meter's terms. Included units count per filter.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Iterable, Mapping
from typing import Final

logger = logging.getLogger("meterware.usage")

#: Sub-meters (combinations of values, each dimension also left out) one meter may have.
MAX_SUBMETERS: Final = 1000
#: Suffix of the request path's counter of a meter's units that no filter of the plan prices.
REMAINDER: Final = "{}"

#: A meter's dimensions: ``(dimension, its values)`` in the order declared.
Dimensions = tuple[tuple[str, tuple[str, ...]], ...]
Pairs = tuple[tuple[str, str], ...]


def submeter(meter: str, pairs: Iterable[tuple[str, str]]) -> str:
    """The name of ``meter``'s sub-meter of ``pairs`` (given in the meter's order)."""
    return meter + "{" + ",".join(f"{key}={value}" for key, value in pairs) + "}"


def base_of(name: str) -> str:
    """The meter a (sub-)meter name belongs to."""
    return name.partition("{")[0]


def split(name: str) -> tuple[str, Pairs]:
    """A sub-meter name's meter and ``(dimension, value)`` pairs (``ValueError`` if it is not one)."""
    base, brace, rest = name.partition("{")
    if not brace:
        return name, ()
    if not rest.endswith("}") or rest == "}":
        raise ValueError(f"{name!r} is not a sub-meter name like 'tokens{{model=large}}'")
    pairs = []
    for item in rest[:-1].split(","):
        key, equals, value = item.partition("=")
        if not equals or not key or not value:
            raise ValueError(f"{name!r} is not a sub-meter name like 'tokens{{model=large}}'")
        pairs.append((key.strip(), value.strip()))
    return base, tuple(pairs)


def count_submeters(dimensions: Dimensions) -> int:
    """How many sub-meters ``dimensions`` make (every combination, each dimension also left out)."""
    return math.prod(len(values) + 1 for _, values in dimensions) - 1


def canonical(meter: str, dimensions: Dimensions, pairs: Iterable[tuple[str, object]]) -> str:
    """The sub-meter of ``pairs`` in the meter's order; ``ValueError`` saying which pair is not declared."""
    given = dict(pairs)
    for key, value in given.items():
        declared = dict(dimensions).get(key)
        if declared is None:
            known = ", ".join(name for name, _ in dimensions) or "none"
            raise ValueError(f"meter {meter!r} has no dimension {key!r} (declared: {known})")
        if not isinstance(value, str) or value not in declared:
            raise ValueError(f"value {value!r:.40} of dimension {key!r} of meter {meter!r} is not declared")
    return submeter(meter, ((key, str(given[key])) for key, _ in dimensions if key in given))


#: Sub-meter names remembered by the values given (only declared ones: bounded by the configuration).
_NAMES_KEPT: Final = 10_000
_names: dict[tuple[str, Dimensions, tuple[tuple[str, object], ...]], str] = {}


def named(meter: str, dimensions: Dimensions, values: Mapping[str, object]) -> str:
    """:func:`canonical` for a handler's report, remembered (a handler reports the same few values)."""
    key = (meter, dimensions, tuple(values.items()))
    try:
        return _names[key]
    except (KeyError, TypeError):  # TypeError: an unhashable value, refused by canonical()
        pass
    name = canonical(meter, dimensions, values.items())
    if len(_names) < _NAMES_KEPT:
        _names[key] = name
    return name


#: Refused dimension values repeat on every call: each meter's are warned of at most once per minute.
REFUSAL_WARNING_SECONDS: Final = 60.0
_next_warning: dict[str, float] = {}


def warn_refused(meter: str, problem: str) -> None:
    """Log a refused dimension value, at most once per meter per :data:`REFUSAL_WARNING_SECONDS`."""
    now = time.monotonic()
    if now < _next_warning.get(meter, 0.0):
        return
    _next_warning[meter] = now + REFUSAL_WARNING_SECONDS
    logger.warning("meterware: ignored usage for meter %r: %s (said at most once a minute)", meter, problem)


@functools.cache
def _filters(priced: frozenset[str]) -> dict[str, tuple[tuple[frozenset[tuple[str, str]], str], ...]]:
    """Per meter, its filters among ``priced`` as ``(pairs, name)``, most specific first."""
    by_meter: dict[str, list[tuple[frozenset[tuple[str, str]], str]]] = {}
    for name in priced:
        if "{" in name and not name.endswith(REMAINDER):
            base, pairs = split(name)
            by_meter.setdefault(base, []).append((frozenset(pairs), name))
    return {base: tuple(sorted(found, key=lambda item: -len(item[0]))) for base, found in by_meter.items()}


def filtered(priced: frozenset[str]) -> frozenset[str]:
    """The meters that some filter among ``priced`` prices per dimension value."""
    return frozenset(_filters(priced))


def matching_filter(name: str, priced: frozenset[str]) -> str | None:
    """The filter among ``priced`` that prices the sub-meter ``name``: the most specific that matches."""
    base, pairs = split(name)
    own = set(pairs)
    for wanted, filter_name in _filters(priced).get(base, ()):
        if wanted <= own:
            return filter_name
    return None


#: Sub-meter names a :class:`Pricing` remembers the filter of (they come from events: bounded anyway).
_ROUTES_KEPT: Final = 10_000


class Pricing:
    """How an event's units price a set of names (meters, filters, remainders ``meter{}``): made once per
    set (:func:`pricing`), with each sub-meter's filter found once."""

    __slots__ = ("_filters", "_remainders", "_routes", "_zeros", "filtered", "names")

    def __init__(self, priced: frozenset[str]) -> None:
        self.names = tuple(sorted(priced))
        self._zeros = dict.fromkeys(self.names, 0)
        self._filters = _filters(priced)
        #: Whether some name is a filter of values (else an event's units price the names as they are).
        self.filtered = bool(self._filters)
        self._remainders = {
            meter: meter + REMAINDER for meter in self._filters if meter + REMAINDER in priced
        }
        #: sub-meter -> (its filter, its meter's remainder or None); None: no filter prices it.
        self._routes: dict[str, tuple[str, str | None] | None] = {}

    def units(self, units: Mapping[str, int | str]) -> dict[str, int]:
        """The units of each name from an event's ``units`` (meters and their sub-meters): a filter adds up
        the sub-meters it prices, a remainder the units of its meter that no filter prices."""
        # Once per call with dimensions: a copy, and the routes read in line (micro: Metering.finish).
        out = self._zeros.copy()
        remainders, routes = self._remainders, self._routes
        for name, value in units.items():
            if type(value) is not int:
                continue
            if "{" in name:
                route = routes[name] if name in routes else self._route(name)
                if route is not None:
                    out[route[0]] += value
                    if route[1] is not None:
                        out[route[1]] -= value
                continue
            if name in out:
                out[name] = value
            remainder = remainders.get(name)
            if remainder is not None:
                out[remainder] += value
        return out

    def _route(self, name: str) -> tuple[str, str | None] | None:
        try:
            return self._routes[name]
        except KeyError:
            pass
        base = base_of(name)
        route = None
        if base in self._filters:
            chosen = matching_filter(name, frozenset(self.names))
            route = None if chosen is None else (chosen, self._remainders.get(base))
        if len(self._routes) < _ROUTES_KEPT:
            self._routes[name] = route
        return route


@functools.cache
def pricing(priced: frozenset[str]) -> Pricing:
    """The :class:`Pricing` of ``priced`` (sets come from the configuration: a bounded cache)."""
    return Pricing(priced)


def priced_units(units: Mapping[str, int | str], priced: frozenset[str]) -> dict[str, int]:
    """The units of each name in ``priced`` from an event's ``units``: see :meth:`Pricing.units`."""
    return pricing(priced).units(units)
