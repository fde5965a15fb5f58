"""Per-customer terms: versions of overrides over a plan, each in force from its effective time.

A customer's terms are stored with the customer, as JSON (:attr:`Customer.terms`): a list of versions, each
a full set of overrides (``{"tokens.price": "0.000001", "tokens.included": "1000"}``), the time it takes
effect, when it was recorded and by whom. A version is never edited: a change appends one. The version in
force at an instant is the last recorded of those with the latest effective time not after it; none in
force (or an empty set): the plan's own terms. :func:`plan_with` merges a version over the plan.

Effective times are whole hours (UTC), rounded up: an invoice splits its period at them and reads each
part's usage from the rollup's hour windows, which it can only read whole.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any, Final

from meterware.billing.pricing import parse_money
from meterware.config._credits import MAX_UNITS, format_credits, parse_credits
from meterware.config._parse import parse_filter
from meterware.config._sections import Meter, MeterTerms, Plan, RateLimit
from meterware.dimensions import base_of
from meterware.errors import ConfigError

#: Versions kept per customer: past ones no longer in force in the current period are pruned first.
MAX_VERSIONS: Final = 100
#: Seconds effective times are rounded up to (the rollup's hour windows price each part exactly).
EFFECTIVE_GRANULARITY: Final = 3600
#: Characters of an actor kept.
MAX_ACTOR_LENGTH: Final = 200
#: What each meter of a plan can be given (a filter of its dimension values, ``tokens{model=large}``:
#: price and included), and what the plan itself can.
METER_FIELDS: Final = ("price", "included", "quota", "quota_mode")
PLAN_FIELDS: Final = ("rate_limits", "base_fee", "minimum")


@dataclass(frozen=True, slots=True)
class TermsVersion:
    """One recorded set of overrides: from when it is in force, when and by whom it was set, and what."""

    effective_from: int
    recorded_at: int
    actor: str
    #: Field (``tokens.price``, ``rate_limits``...) -> its value, as checked text.
    overrides: Mapping[str, str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "effective_from": self.effective_from,
            "recorded_at": self.recorded_at,
            "actor": self.actor,
            "overrides": dict(self.overrides),
        }


def effective_hour(instant: float) -> int:
    """``instant`` rounded up to a whole hour (one already whole stays)."""
    return math.ceil(instant / EFFECTIVE_GRANULARITY) * EFFECTIVE_GRANULARITY


@functools.lru_cache(maxsize=256)
def load_versions(terms: str) -> tuple[TermsVersion, ...]:
    """The versions stored in a customer's ``terms`` (``""``: none), in the order they were recorded."""
    if not terms:
        return ()
    return tuple(
        TermsVersion(int(v["effective_from"]), int(v["recorded_at"]), str(v["actor"]), dict(v["overrides"]))
        for v in json.loads(terms)
    )


def dump_versions(versions: tuple[TermsVersion, ...]) -> str:
    return json.dumps([v.as_dict() for v in versions], separators=(",", ":"), sort_keys=True)


def in_force(versions: tuple[TermsVersion, ...], at: float) -> tuple[TermsVersion | None, float]:
    """The version in force at ``at`` (None: the plan's terms), and when the next one takes over (inf)."""
    current: TermsVersion | None = None
    following = math.inf
    for version in versions:
        if version.effective_from <= at:
            if current is None or version.effective_from >= current.effective_from:
                current = version
        else:
            following = min(following, version.effective_from)
    return current, following


def changes(
    versions: tuple[TermsVersion, ...], start: int, end: int
) -> list[tuple[int, TermsVersion | None]]:
    """The parts of ``[start, end)`` with their terms: (part start, version in force), in time order."""
    cuts = sorted({v.effective_from for v in versions if start < v.effective_from < end})
    return [(cut, in_force(versions, cut)[0]) for cut in [start, *cuts]]


def check_overrides(overrides: Mapping[str, Any], meters: Mapping[str, Meter]) -> dict[str, str]:
    """Check a set of overrides (field -> value) and return it as canonical text, or raise ConfigError."""
    checked: dict[str, str] = {}
    for field, value in overrides.items():
        name, _, what = field.rpartition(".")
        if not name:
            if field not in PLAN_FIELDS:
                known = ", ".join((*PLAN_FIELDS, *(f"<meter>.{f}" for f in METER_FIELDS)))
                raise ConfigError(field, f"is not a term that can be overridden (known: {known})")
            checked[field] = _check_plan_field(field, value, meters)
            continue
        meter = meters.get(name)
        if meter is None and "{" in name:  # a filter of dimension values, as a plan's terms name it
            if what in ("quota", "quota_mode"):
                raise ConfigError(field, "a quota counts all values of a meter: give it to the meter")
            name = parse_filter(field, name, meters)
            meter, field = meters[base_of(name)], f"{name}.{what}"
        if meter is None:
            raise ConfigError(field, f"names no meter defined under [meters] (known: {', '.join(meters)})")
        if what not in METER_FIELDS:
            raise ConfigError(field, f"a meter's term is one of {', '.join(METER_FIELDS)}")
        if meter.aggregation == "unique":
            raise ConfigError(field, "a 'unique' meter has no terms")
        if meter.level and what in ("quota", "quota_mode"):
            raise ConfigError(field, f"a '{meter.aggregation}' meter has no quota (its units do not add up)")
        checked[field] = _check_meter_field(field, what, value)
    return checked


def _check_meter_field(field: str, what: str, value: Any) -> str:
    text = str(value).strip()
    if what == "price":
        return format_credits(parse_credits(value, field))
    if what == "quota_mode":
        if text not in ("hard", "soft"):
            raise ConfigError(field, f"must be 'hard' or 'soft', got {value!r}")
        return text
    if what == "quota" and text.lower() == "none":
        return "none"
    if isinstance(value, bool) or not text.isdigit() or int(text) > MAX_UNITS:
        extra = " or 'none'" if what == "quota" else ""
        raise ConfigError(field, f"must be a whole number from 0 to {MAX_UNITS}{extra}, got {value!r}")
    return str(int(text))


def _check_plan_field(field: str, value: Any, meters: Mapping[str, Meter]) -> str:
    if field == "rate_limits":
        texts = value if isinstance(value, list | tuple) else str(value).split(",")
        texts = [str(text).strip() for text in texts if str(text).strip() and str(text).strip() != "none"]
        for text in texts:
            try:
                RateLimit.parse(text, meters)
            except ValueError as error:
                raise ConfigError(field, str(error)) from None
        return ",".join(texts) or "none"
    return f"{parse_money(value, field):f}"


def plan_with(plan: Plan, version: TermsVersion | None, meters: Mapping[str, Meter]) -> Plan:
    """The plan's terms with ``version``'s overrides merged over them (the one merge, used everywhere).

    Overrides of meters (or dimension values) no longer configured are ignored. A price override on a
    package or tiered meter prices it per unit. A ``max`` or ``last`` meter's terms are ignored on a
    prepaid plan (they price invoices only, which a prepaid plan's credits pay call by call).
    """
    if version is None or not version.overrides:
        return plan
    overrides = version.overrides
    terms = dict(plan.meters)
    for field, value in overrides.items():
        name, _, what = field.rpartition(".")
        base = meters.get(base_of(name))
        if base is None or base.aggregation == "unique" or (base.level and plan.prepaid):
            continue
        if name != base.name and not _declared(name, meters):
            continue
        current = terms.get(name, MeterTerms())
        if what == "price":
            current = replace(current, price=parse_credits(value, field), pricing=None)
        elif what == "included":
            pricing = current.pricing and replace(current.pricing, included=int(value))
            current = replace(current, included=int(value), pricing=pricing)
        elif what == "quota":
            current = replace(current, quota=None if value == "none" else int(value))
        elif what == "quota_mode":
            current = replace(current, hard=value == "hard")
        terms[name] = current
    rate_limits = plan.rate_limits
    if "rate_limits" in overrides:
        texts = overrides["rate_limits"]
        rate_limits = () if texts == "none" else _stored_limits(texts, meters)
    return replace(
        plan,
        meters=terms,
        rate_limits=rate_limits,
        base_fee=Decimal(overrides.get("base_fee", plan.base_fee)),
        minimum=Decimal(overrides.get("minimum", plan.minimum)),
    )


def _declared(name: str, meters: Mapping[str, Meter]) -> bool:
    """Whether a filter of dimension values still names values its meter declares."""
    try:
        return parse_filter(name, name, meters) == name
    except ConfigError:
        return False


def _stored_limits(texts: str, meters: Mapping[str, Meter]) -> tuple[RateLimit, ...]:
    """A version's rate limits, less any whose meter the configuration no longer has (or no longer fits:
    a meter's reserve raised past the limit), as overrides of meters no longer configured are ignored."""
    limits = []
    for text in texts.split(","):
        try:
            limits.append(RateLimit.parse(text, meters))
        except ValueError:
            continue
    return tuple(limits)


def plan_value(plan: Plan, field: str) -> str:
    """What ``plan`` itself says of an overridable ``field``, as text (to show next to an override)."""
    name, _, what = field.rpartition(".")
    if not name:
        if field == "rate_limits":
            return ", ".join(str(limit) for limit in plan.rate_limits) or "none"
        return f"{plan.base_fee if field == 'base_fee' else plan.minimum:f}"
    terms = plan.meters.get(name, MeterTerms())
    if what == "price":
        return terms.pricing.describe() if terms.pricing else format_credits(terms.price)
    if what == "included":
        return str(terms.included)
    if what == "quota":
        return "none" if terms.quota is None else str(terms.quota)
    return "hard" if terms.hard else "soft"
