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


def priced_units(units: Mapping[str, int | str], priced: frozenset[str]) -> dict[str, int]:
    """The units of each name in ``priced`` (meters, filters, remainders ``meter{}``) from an event's
    ``units`` (meters and their sub-meters): a filter adds up the sub-meters it prices, a remainder the
    units of its meter that no filter prices."""
    filters = _filters(priced)
    out = dict.fromkeys(priced, 0)
    for name, value in units.items():
        if type(value) is not int:
            continue
        if name in out and "{" not in name:
            out[name] = value
        if name in filters:
            out[name + REMAINDER] = out.get(name + REMAINDER, 0) + value
        elif "{" in name and base_of(name) in filters:
            chosen = matching_filter(name, priced)
            if chosen is not None:
                out[chosen] += value
                remainder = base_of(name) + REMAINDER
                out[remainder] = out.get(remainder, 0) - value
    return {name: out[name] for name in priced}
