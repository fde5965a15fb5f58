"""Configuration: meters, plans, routes and policy, parsed and validated once at start-up.

A configuration comes from a TOML file (``meterware.toml`` or the path in ``METERWARE_CONFIG``), a dict,
or keyword arguments. ``METERWARE_STORAGE`` (or ``METERWARE_REDIS_URL``) overrides the storage URL.
Every mistake raises one :class:`~meterware.errors.ConfigError` naming the field, e.g.
``meterware.toml: plans.pro.meters.tokens.price: must be a number of credits with at most 6 decimals``.
Nothing here does I/O except reading the file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Context, Decimal, Inexact, InvalidOperation, Overflow
from fnmatch import translate
from pathlib import Path
from typing import Any, Final, Literal, get_args
from urllib.parse import urlsplit

from meterware._http import redact_url
from meterware.billing.pricing import (
    DEFAULT_CURRENCY,
    PlanPrices,
    Price,
    parse_currency,
    parse_money,
    parse_price,
)
from meterware.errors import ConfigError

logger = logging.getLogger("meterware")

Aggregation = Literal["count", "sum", "max", "last", "unique"]
Period = Literal["month", "week", "day"]
FailureMode = Literal["open", "closed"]
Admission = Literal["strict", "lease"]

MICROS_PER_CREDIT = 1_000_000
#: Largest amount in micro-credits: the Lua scripts compute in doubles, exact only up to 2**53.
MAX_MICROS = 2**53 - 1
#: Largest number of units in a counter or a term (the same reason).
MAX_UNITS = 2**53 - 1
#: Micro-credits one call may cost at most: the rollup refuses a cost of 16 digits (its whole batch would
#: be a dead letter), and sums of a few such costs must stay exact.
MAX_CALL_COST = 10**15 - 1
DEFAULT_CONFIG_FILE = "meterware.toml"
#: ``METERWARE_CONFIG`` set to this runs on the defaults without a file, as an explicit choice.
DEFAULTS = "defaults"
DEFAULT_KEY_HEADERS = ("authorization", "x-api-key")
_SOURCES = ("call", "handler", "response_bytes", "request_bytes", "duration_ms")
_UNIT_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
_RATE_RE = re.compile(r"^\s*([0-9]+)\s*(?:/|per)\s*([0-9]*)\s*(second|minute|hour|day)s?\s*\Z")
# \Z, not $: "$" also matches before a trailing newline, which would let "free\n" through.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
_HEADER_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+\Z")
_BARE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+\Z")
# Credits are exact: an amount that would be rounded (a 7th decimal, a 29th digit) is refused, not rounded.
_EXACT = Context(traps=[InvalidOperation, Inexact, Overflow])


@dataclass(frozen=True, slots=True)
class Meter:
    """A quantity that is counted per call: the call itself, tokens, bytes, milliseconds..."""

    name: str
    aggregation: Aggregation = "count"
    #: ``call`` (the route weight), ``handler`` (``meterware.usage.add``), ``header:<Name>``,
    #: ``response_bytes``, ``request_bytes`` or ``duration_ms``.
    source: str = "call"
    #: Units held at admission for a value meter whose size is known only at the end of the call.
    reserve: int = 0

    @property
    def chargeable(self) -> bool:
        """Whether units of this meter add up, so they can carry a quota and a price."""
        return self.aggregation in ("count", "sum")

    @property
    def header(self) -> str | None:
        """The response header the units are read from, lower-cased, if the source is a header."""
        return self.source[7:].lower() if self.source.startswith("header:") else None


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``amount`` calls per ``seconds``, enforced with GCRA (bursts up to ``amount``)."""

    amount: int
    seconds: int

    @classmethod
    def parse(cls, text: str) -> RateLimit:
        """Parse ``"10/second"``, ``"600/minute"``, ``"1000 per 5 minutes"``."""
        match = _RATE_RE.match(text)
        if not match:
            raise ValueError(f"expected a rate like '10/second' or '600/minute', got {text!r}")
        amount, multiple, unit = int(match[1]), int(match[2] or 1), match[3]
        if amount <= 0 or multiple <= 0:
            raise ValueError(f"rate must be positive, got {text!r}")
        return cls(amount, multiple * _UNIT_SECONDS[unit])

    def __str__(self) -> str:
        return f"{self.amount}/{self.seconds}s"


@dataclass(frozen=True, slots=True)
class MeterTerms:
    """What a plan grants and charges for one meter, per billing period."""

    quota: int | None = None
    #: A hard quota refuses calls once used up; a soft one only reports the overage.
    hard: bool = True
    #: Units included in the period before the price applies.
    included: int = 0
    #: Price per unit beyond ``included``, in micro-credits (1 credit = 1,000,000).
    price: int = 0
    #: Package or tier pricing, priced on invoices only (``price`` is then 0: the request path charges
    #: nothing); None: ``price`` per unit (:mod:`meterware.billing.pricing`).
    pricing: Price | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    """Limits and prices that apply to every customer on the plan."""

    name: str
    rate_limits: tuple[RateLimit, ...] = ()
    period: Period = "month"
    #: Prepaid plans spend credits: a call is refused when the balance cannot cover it.
    prepaid: bool = False
    meters: Mapping[str, MeterTerms] = field(default_factory=dict)
    #: Invoices: the currency (1 credit = 1 unit of it), a fee per period, and a minimum per period.
    currency: str = DEFAULT_CURRENCY
    base_fee: Decimal = Decimal(0)
    minimum: Decimal = Decimal(0)

    def prices(self) -> PlanPrices:
        """What prices the plan's invoices: per meter its package or tiers, or its per-unit price."""
        meters = {
            name: terms.pricing or Price.unit(Decimal(terms.price).scaleb(-6), included=terms.included)
            for name, terms in self.meters.items()
        }
        return PlanPrices(self.currency, self.base_fee, self.minimum, meters)


#: Paths excluded when the configuration names none: the metrics endpoint (``meterware.metrics``).
DEFAULT_EXCLUDE: Final = ("/metrics", "/metrics/")


def _has_dot_segments(path: str) -> bool:
    return "/." in path and any(segment in (".", "..") for segment in path.split("/"))


def _without_dot_segments(path: str) -> str:
    """``path`` with its ``.`` and ``..`` segments resolved (RFC 3986 5.2.4)."""
    segments = path.split("/")
    kept: list[str] = []
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == "..":
            if len(kept) > 1:
                kept.pop()
        elif segment != ".":
            kept.append(segment)
            continue
        if last:
            kept.append("")
    return "/".join(kept)


def _globs(globs: tuple[str, ...]) -> re.Pattern[str] | None:
    """One pattern matching any of ``globs`` (None for none)."""
    return re.compile("|".join(f"(?:{translate(glob)})" for glob in globs)) if globs else None


@dataclass(frozen=True, slots=True)
class Routes:
    """Which paths are metered, and what a call to each costs in units of the ``call`` meters."""

    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    #: ``(glob, weight)`` pairs; the first matching glob wins, otherwise the weight is 1.
    weights: tuple[tuple[str, int], ...] = ()
    #: Globs of paths that serve live keys only: test keys get 403 ``test_key_not_allowed``.
    live_only: tuple[str, ...] = ()
    #: Where the customer's own account (:mod:`meterware.billing.selfservice`) is mounted, without a trailing
    #: slash: never metered, with or without the slash and below it, whatever ``exclude`` says.
    account: str | None = None
    #: Route templates of an app without a router (werkzeug rules, ``/v1/items/<id>``): its calls' events
    #: and metrics carry the template their path matches (:class:`meterware.metering.serving.RouteTemplates`).
    templates: tuple[str, ...] = ()
    _exclude_re: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)
    _live_only_re: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)
    _weight_res: tuple[tuple[re.Pattern[str], int], ...] = field(
        default=(), init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "_exclude_re", _globs(self.exclude))
        object.__setattr__(self, "_live_only_re", _globs(self.live_only))
        object.__setattr__(
            self, "_weight_res", tuple((re.compile(translate(glob)), w) for glob, w in self.weights)
        )

    def is_excluded(self, path: str) -> bool:
        """Whether calls to ``path`` (a route template or raw path) bypass metering entirely.

        A path with ``.`` or ``..`` segments is never excluded: a router that resolves them would serve
        ``/health/../v1/paid`` as ``/v1/paid``, one that does not would serve ``/v1/paid/../../health``
        from ``/v1/paid``; either way an exclusion could let a metered route through.
        """
        if _has_dot_segments(path):
            return False
        account = self.account
        if account is not None and (path == account or path.startswith(f"{account}/")):
            return True
        pattern = self._exclude_re
        return pattern is not None and pattern.match(path) is not None

    def is_live_only(self, path: str) -> bool:
        """Whether ``path`` refuses test keys (as written, or with its dot segments resolved)."""
        pattern = self._live_only_re
        if pattern is None:
            return False
        return pattern.match(path) is not None or (
            _has_dot_segments(path) and pattern.match(_without_dot_segments(path)) is not None
        )

    def weight(self, path: str) -> int:
        """Units of each ``call`` meter that one call to ``path`` counts for."""
        for pattern, weight in self._weight_res:
            if pattern.match(path):
                return weight
        return 1


@dataclass(frozen=True, slots=True)
class Policy:
    """How the request path behaves at its edges."""

    #: When the backend fails on admission: ``open`` serves the call (and meters it later),
    #: ``closed`` answers 503.
    on_backend_error: FailureMode = "open"
    #: Whether 4xx responses are charged (3xx, 5xx, exceptions and disconnects before the response never are).
    bill_client_errors: bool = False
    #: Whether a call whose client left after its (billable) response started is refunded; by default it is
    #: charged for the call and the units reported until the handler finished.
    refund_aborted_streams: bool = False
    key_headers: tuple[str, ...] = DEFAULT_KEY_HEADERS
    key_query: str | None = None
    #: Budget in seconds for one backend call on the request path.
    timeout: float = 0.25
    #: Seconds after which the rollup worker refunds a reservation that was never settled.
    reservation_timeout: float = 300.0
    #: Seconds a resolved key is cached in the process (revocation is still checked on every admit).
    key_cache_ttl: float = 10.0
    #: Remove usage headers (``header:`` meter sources) from responses before they reach the client.
    strip_usage_headers: bool = True
    #: ``strict``: every call is admitted by the backend. ``lease``: a process reserves calls of a key in
    #: blocks (one admission each) and serves them without a round trip (docs/architecture.md, "Leases").
    admission: Admission = "strict"
    #: Calls one lease reserves at most (fewer under a tight rate limit). A lease renewal comes back after a
    #: few turns of the event loop, each serving up to one call per connection: a block must outlast that.
    lease_calls: int = 1000
    #: Seconds a lease serves calls at most: how long a revocation or suspension may take to bite.
    lease_seconds: float = 1.0
    #: Response header with the credits left after the call's reservation (prepaid plans); "" for none.
    balance_header: str = "X-Credits-Remaining"


@dataclass(frozen=True, slots=True)
class Pipeline:
    """The event buffer, its flusher and the local spool used while the backend is away."""

    batch_size: int = 1000
    flush_interval: float = 0.2
    #: Budget in seconds for one flush (not on the request path, so longer than ``policy.timeout``).
    flush_timeout: float = 5.0
    buffer_size: int = 100_000
    spool_dir: str = ".meterware-spool"
    spool_max_bytes: int = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Rollup:
    """Rollup worker settings."""

    batch_size: int = 10_000
    lease_seconds: float = 10.0
    #: Stream entries older than this (and already committed) are trimmed.
    retention_seconds: float = 86_400.0


@dataclass(frozen=True, slots=True)
class AlertRules:
    """Thresholds that raise an alert, each at most once per customer and billing period.

    One scope (everyone, a plan, a customer); a ``None`` list inherits the wider scope's.
    """

    #: Percentages of every quota (hard or soft) of the plan, e.g. ``(50, 80, 100)``.
    quota_percent: tuple[int, ...] | None = None
    #: Prepaid balances (micro-credits) under which an alert fires.
    credits_below: tuple[int, ...] | None = None
    #: Period spend (micro-credits) above which an alert fires.
    spend_above: tuple[int, ...] | None = None

    def over(self, wider: AlertRules) -> AlertRules:
        """These rules, with what they leave unset taken from ``wider``."""
        return AlertRules(
            wider.quota_percent if self.quota_percent is None else self.quota_percent,
            wider.credits_below if self.credits_below is None else self.credits_below,
            wider.spend_above if self.spend_above is None else self.spend_above,
        )


@dataclass(frozen=True, slots=True)
class Alerts:
    """The ``[alerts]`` section: thresholds, and where fired alerts go (stream, log, webhook)."""

    #: Whether the rollup worker evaluates alerts (the section is present).
    enabled: bool = False
    #: Where to POST each alert (signed); None: the alerts stream and the log only.
    webhook_url: str | None = None
    #: The environment variable holding the webhook's HMAC secret (never the file).
    secret_env: str = "METERWARE_WEBHOOK_SECRET"
    #: Delivery attempts per alert, and the timeout of each, in seconds.
    webhook_attempts: int = 6
    webhook_timeout: float = 5.0
    rules: AlertRules = field(default_factory=AlertRules)
    #: Per-plan overrides of ``rules``.
    plans: Mapping[str, AlertRules] = field(default_factory=dict)

    def rules_for(self, plan: str) -> AlertRules:
        """The rules of customers on ``plan`` (before their own overrides)."""
        override = self.plans.get(plan)
        return self.rules if override is None else override.over(self.rules)


#: Billing providers usage can be exported to (``[export.<provider>]``, ``meterware export``).
EXPORT_PROVIDERS: Final = ("stripe", "dodo", "openmeter", "lago")
ExportWindow = Literal["minute", "hour", "day"]


@dataclass(frozen=True, slots=True)
class ExportTarget:
    """An ``[export.<provider>]`` section: where and how live usage is pushed to a billing provider."""

    provider: str
    #: meterware meter -> the provider's event name (Stripe ``event_name``, Dodo ``event_name``,
    #: OpenMeter CloudEvents ``type``, Lago ``code``). Only ``count`` and ``sum`` meters: their
    #: window totals add up, so a late change can be sent as a delta.
    meters: Mapping[str, str] = field(default_factory=dict)
    #: The environment variable holding the API key (never the file).
    api_key_env: str = ""
    #: The API's base URL; None: the provider's public one.
    base_url: str | None = None
    #: Rollup window each event covers.
    window: ExportWindow = "hour"
    #: ``external``: only customers with an external id for this provider; ``meterware``: fall back to
    #: the meterware customer id.
    customer_ids: Literal["external", "meterware"] = "external"
    #: A window is exported this long after it ends (the rollup's lag).
    settle_seconds: float = 120.0
    #: Windows this far back are read again on every run, to send late usage as revisions.
    recheck_seconds: float = 86_400.0
    #: Oldest event the provider accepts, in seconds; None: its documented limit.
    max_age_seconds: float | None = None
    #: Events per request; None: the provider's documented maximum.
    batch_size: int | None = None
    #: Attempts per request on 429, 5xx and network errors (with backoff).
    max_attempts: int = 5
    #: The property holding the value (Stripe payload, Dodo metadata, Lago properties, OpenMeter data).
    value_key: str = "value"
    #: Stripe: the payload key of the customer id (the meter's ``customer_mapping.event_payload_key``).
    customer_key: str = "stripe_customer_id"
    #: OpenMeter: the CloudEvents ``source`` (part of the dedupe key with ``id``).
    source: str = "meterware"


def _default_meters() -> Mapping[str, Meter]:
    return {"calls": Meter("calls")}


def _default_plans() -> Mapping[str, Plan]:
    return {"default": Plan("default")}


@dataclass(frozen=True, slots=True)
class Config:
    """The whole, validated configuration of meterware."""

    storage: str = "memory://"
    shards: int = 16
    meters: Mapping[str, Meter] = field(default_factory=_default_meters)
    plans: Mapping[str, Plan] = field(default_factory=_default_plans)
    #: Plan given to new customers when none is named.
    default_plan: str = "default"
    routes: Routes = field(default_factory=Routes)
    policy: Policy = field(default_factory=Policy)
    pipeline: Pipeline = field(default_factory=Pipeline)
    rollup: Rollup = field(default_factory=Rollup)
    alerts: Alerts = field(default_factory=Alerts)
    export: Mapping[str, ExportTarget] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str | None = None) -> Config:
        """Build a configuration from a dict shaped like the TOML file."""
        try:
            return _parse(data)
        except ConfigError as error:
            raise ConfigError(error.field, error.problem, source=source) from None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Config:
        """Read and validate a TOML file."""
        return cls.from_dict(_read_toml(path), source=str(path))

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, **overrides: Any) -> Config:
        """Load the file (explicit, ``METERWARE_CONFIG`` or ``./meterware.toml``), then apply overrides.

        Keyword overrides are top-level sections (``storage="redis://..."``, ``plans={...}``). The
        environment (``METERWARE_STORAGE`` or ``METERWARE_REDIS_URL``) wins over both for the storage URL.
        """
        path = path or os.environ.get("METERWARE_CONFIG")
        data: dict[str, Any] = {}
        source = "arguments"
        if path is None and Path(DEFAULT_CONFIG_FILE).is_file():
            path = DEFAULT_CONFIG_FILE
        if path is not None and path != DEFAULTS:
            source = str(path)
            data = _read_toml(path)
        return cls.from_dict(_with_overrides(data, overrides), source=source)

    def plan(self, name: str) -> Plan:
        """The plan called ``name``; unknown names fall back to the default plan."""
        return self.plans.get(name) or self.plans[self.default_plan]


def _with_overrides(data: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Overrides replace whole sections, except that a storage URL (keyword ``storage="..."``, then
    ``METERWARE_STORAGE`` or ``METERWARE_REDIS_URL``) keeps the shard count of a ``[storage]`` table."""
    merged = {**data, **overrides}
    for url in (
        overrides.get("storage"),
        os.environ.get("METERWARE_STORAGE") or os.environ.get("METERWARE_REDIS_URL"),
    ):
        if isinstance(url, str) and url:
            current = merged.get("storage", data.get("storage"))
            base = current if isinstance(current, dict) else data.get("storage")
            merged["storage"] = {**base, "url": url} if isinstance(base, dict) else url
    return merged


def _read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    where = str(path)
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError("file", "does not exist", source=where) from None
    except ValueError as error:  # TOMLDecodeError, or an integer too long to convert
        raise ConfigError("file", f"is not valid TOML ({error})", source=where) from None
    except OSError as error:
        raise ConfigError("file", f"cannot be read ({error.strerror})", source=where) from None


# -- parsing ------------------------------------------------------------------------------------------


class _Section:
    """A table of the config being read: typed getters that report the dotted path on error."""

    def __init__(self, data: Any, path: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(path or "config", f"must be a table, got {_kind(data)}")
        self.data: Mapping[str, Any] = data
        self.path = path
        self.seen: set[str] = set()

    def name(self, key: str) -> str:
        return f"{self.path}.{_key(key)}" if self.path else _key(key)

    def get(self, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        self.seen.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        # bool is an int in Python; a config that says `shards = true` is a mistake.
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise ConfigError(self.name(key), f"must be {_describe(kind)}, got a boolean")
        if not isinstance(value, kind):
            raise ConfigError(self.name(key), f"must be {_describe(kind)}, got {_kind(value)}")
        return value

    def integer(self, key: str, default: int, *, minimum: int = 0) -> int:
        value: int = self.get(key, int, default)
        if value < minimum:
            raise ConfigError(self.name(key), f"must be at least {minimum}, got {value}")
        return value

    def number(self, key: str, default: float, *, positive: bool = True) -> float:
        raw = self.get(key, (int, float), default)
        try:
            value = float(raw)
        except OverflowError:  # an integer too large for a float
            value = math.inf if raw > 0 else -math.inf
        if not math.isfinite(value) or (positive and value <= 0):
            raise ConfigError(self.name(key), f"must be a positive number of seconds, got {value}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value: str = self.get(key, str, default)
        if value not in choices:
            options = ", ".join(repr(c) for c in choices)
            raise ConfigError(self.name(key), f"must be one of {options}, got {value!r}")
        return value

    def section(self, key: str) -> _Section:
        self.seen.add(key)
        return _Section(self.data.get(key, {}), self.name(key))

    def strings(self, key: str, default: Sequence[str]) -> tuple[str, ...]:
        values = self.get(key, list, list(default))
        for index, value in enumerate(values):
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{self.name(key)}[{index}]", f"must be a non-empty string, got {value!r}")
        return tuple(values)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise ConfigError(self.name(unknown[0]), "is not a known setting")


def _key(key: str) -> str:
    """A key as TOML writes it in a dotted path: bare if it can be, quoted (on one line) otherwise."""
    return key if _BARE_KEY_RE.match(key) else json.dumps(key, ensure_ascii=False)


def _describe(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    names |= {list: "a list", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    return {int: "an integer", float: "a number", str: "a string", list: "a list"}.get(
        type(value), "a table" if isinstance(value, Mapping) else type(value).__name__
    )


def _shown(url: str) -> str:
    """A storage URL as error messages show it: without what comes before an ``@`` (credentials)."""
    return "***@" + url.rpartition("@")[2] if "@" in url else url


def _check_name(value: str, field_name: str) -> str:
    if not _NAME_RE.match(value):
        raise ConfigError(
            field_name, f"{value!r} is not a valid name (letters, digits, '_', '-', '.'; at most 64)"
        )
    return value


def parse_credits(value: Any, field_name: str) -> int:
    """Turn a credit amount (``"0.002"``, ``5``) into exact micro-credits; never through a float."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(
            field_name, f'must be a decimal string like "0.002" or an integer, got {_kind(value)}'
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


def _parse_meter(name: str, raw: Any) -> Meter:
    section = _Section(raw, f"meters.{_key(_check_name(name, f'meters.{_key(name)}'))}")
    aggregation = section.choice("aggregation", get_args(Aggregation), "count")
    source = section.get("source", str, "call")
    if source.startswith("header:"):
        if not _HEADER_RE.match(source[7:]):
            raise ConfigError(section.name("source"), f"{source!r} does not name a valid header")
    elif source not in _SOURCES:
        options = ", ".join(repr(s) for s in (*_SOURCES, "header:<Name>"))
        raise ConfigError(section.name("source"), f"must be one of {options}, got {source!r}")
    if aggregation == "unique" and source != "handler":
        raise ConfigError(section.name("source"), "a 'unique' meter counts values reported by the handler")
    reserve = section.integer("reserve", 0)
    if reserve and source == "call":
        raise ConfigError(
            section.name("reserve"), "only value meters hold an estimate; calls hold their weight"
        )
    section.done()
    return Meter(name, aggregation, source, reserve)  # type: ignore[arg-type]  # choice() checked it


def _parse_plan(name: str, raw: Any, meters: Mapping[str, Meter]) -> Plan:
    section = _Section(raw, f"plans.{_key(_check_name(name, f'plans.{_key(name)}'))}")
    limits: list[RateLimit] = []
    for index, text in enumerate(section.strings("rate_limits", ())):
        try:
            limits.append(RateLimit.parse(text))
        except ValueError as error:
            raise ConfigError(f"{section.name('rate_limits')}[{index}]", str(error)) from None
    period = section.choice("period", get_args(Period), "month")
    prepaid = section.get("prepaid", bool, False)
    terms: dict[str, MeterTerms] = {}
    meter_tables = section.section("meters")
    for meter_name, meter_raw in meter_tables.data.items():
        meter_tables.seen.add(meter_name)
        where = meter_tables.name(meter_name)
        if meter_name not in meters:
            known = ", ".join(sorted(meters))
            raise ConfigError(where, f"names no meter defined under [meters] (known: {known})")
        table = _Section(meter_raw, where)
        quota = table.get("quota", int, None)
        if quota is not None and quota < 0:
            raise ConfigError(table.name("quota"), f"must be at least 0, got {quota}")
        hard = table.choice("quota_mode", ("hard", "soft"), "hard") == "hard"
        included = table.integer("included", 0)
        if included > MAX_UNITS:
            raise ConfigError(table.name("included"), f"must be at most {MAX_UNITS}, got {included}")
        table.seen.update(("price", "package", "tiers", "tier_mode"))
        price = parse_credits(table.data["price"], table.name("price")) if "price" in table.data else 0
        pricing = parse_price(table.data, where, included=included, prepaid=prepaid)
        table.done()
        if not meters[meter_name].chargeable:
            aggregation = meters[meter_name].aggregation
            model = "package" if "package" in table.data else "tiers"
            for name, value in (("quota", quota), ("included", included), ("price", price), (model, pricing)):
                if value:
                    raise ConfigError(table.name(name), f"a '{aggregation}' meter cannot carry a {name}")
        terms[meter_name] = MeterTerms(quota, hard, included, price, pricing)
    currency = parse_currency(section.get("currency", str, DEFAULT_CURRENCY), section.name("currency"))
    section.seen.update(("base_fee", "minimum"))
    base_fee, minimum = (
        parse_money(section.data.get(key, 0), section.name(key)) for key in ("base_fee", "minimum")
    )
    section.done()
    return Plan(name, tuple(limits), period, prepaid, terms, currency, base_fee, minimum)  # type: ignore[arg-type]


def _check_call_costs(plans: Mapping[str, Plan], meters: Mapping[str, Meter], heaviest: int) -> None:
    """Refuse a plan whose price of a call itself, at the heaviest route weight, passes MAX_CALL_COST."""
    for plan in plans.values():
        costs = {
            name: terms.price * (heaviest if meters[name].aggregation == "sum" else 1)
            for name, terms in plan.meters.items()
            if meters[name].source == "call"
        }
        total = sum(costs.values())
        if total > MAX_CALL_COST:
            priciest = max(costs, key=costs.__getitem__)
            raise ConfigError(
                f"plans.{_key(plan.name)}.meters.{_key(priciest)}.price",
                f"a call may cost at most {format_credits(MAX_CALL_COST)} credits, "
                f"one would cost {format_credits(total)} here (at route weight {heaviest})",
            )


def format_credits(micros: int) -> str:
    """Micro-credits as a decimal string with six places (``1500000`` -> ``"1.500000"``)."""
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), MICROS_PER_CREDIT)
    return f"{sign}{whole}.{fraction:06d}"


def _parse(data: Mapping[str, Any]) -> Config:
    root = _Section(data, "")
    defaults = Config()

    storage = root.get("storage", (str, dict), defaults.storage)
    shards = defaults.shards
    if isinstance(storage, dict):
        table = _Section(storage, "storage")
        shards = table.integer("shards", shards, minimum=1)
        url = table.get("url", str, defaults.storage)
        table.done()
    else:
        url = storage
    if "://" not in url:
        raise ConfigError(
            "storage.url", f"must be a URL like 'memory://' or 'redis://host:6379/0', got {_shown(url)!r}"
        )
    scheme = url.split("://", 1)[0]
    if scheme not in ("memory", "redis", "rediss", "redis+sentinel", "redis+cluster", "unix"):
        raise ConfigError(
            "storage.url", f"unknown scheme {scheme!r} (memory, redis, rediss, redis+sentinel, redis+cluster)"
        )
    from meterware.storage import check_url  # imports the Redis driver for Redis URLs only

    try:
        check_url(url)  # a URL the driver refuses fails here, not on the first call
    except ValueError as error:
        raise ConfigError("storage.url", str(error).removeprefix("storage URL: ")) from None
    if shards > 1024:
        raise ConfigError("storage.shards", f"must be at most 1024, got {shards}")

    meters = {name: _parse_meter(name, raw) for name, raw in root.section("meters").data.items()}
    root.seen.add("meters")
    meters = meters or dict(defaults.meters)
    plans_raw = root.section("plans").data
    plans = {name: _parse_plan(name, raw, meters) for name, raw in plans_raw.items()} or dict(defaults.plans)
    default_plan = root.get("default_plan", str, next(iter(plans)))
    if default_plan not in plans:
        raise ConfigError("default_plan", f"names no plan defined under [plans] (known: {', '.join(plans)})")

    routes = root.section("routes")
    exclude = routes.strings("exclude", DEFAULT_EXCLUDE)
    weights_table = routes.section("weights")
    weights: list[tuple[str, int]] = []
    for glob in weights_table.data:
        weights.append((glob, weights_table.integer(glob, 1, minimum=0)))
    live_only = routes.strings("live_only", ())
    raw_account = routes.get("account", str, None)
    account = None if raw_account is None else raw_account.rstrip("/")
    if account is not None and (not account.startswith("/") or _has_dot_segments(account)):
        raise ConfigError(routes.name("account"), f"must be a path like /v1/account, got {raw_account!r}")
    templates = routes.strings("templates", ())
    routes.done()

    _check_call_costs(plans, meters, max([1, *(weight for _, weight in weights)]))

    policy = root.section("policy")
    key_headers = tuple(h.lower() for h in policy.strings("key_headers", DEFAULT_KEY_HEADERS))
    for index, header in enumerate(key_headers):
        if not _HEADER_RE.match(header):
            raise ConfigError(f"policy.key_headers[{index}]", f"{header!r} is not a valid header name")
    key_query = policy.get("key_query", str, None) or None
    parsed_policy = Policy(
        on_backend_error=policy.choice("on_backend_error", get_args(FailureMode), "open"),  # type: ignore[arg-type]
        bill_client_errors=policy.get("bill_client_errors", bool, False),
        refund_aborted_streams=policy.get("refund_aborted_streams", bool, False),
        key_headers=key_headers,
        key_query=key_query,
        timeout=policy.number("timeout", defaults.policy.timeout),
        reservation_timeout=policy.number("reservation_timeout", defaults.policy.reservation_timeout),
        key_cache_ttl=policy.number("key_cache_ttl", defaults.policy.key_cache_ttl, positive=False),
        strip_usage_headers=policy.get("strip_usage_headers", bool, True),
        admission=policy.choice("admission", get_args(Admission), "strict"),  # type: ignore[arg-type]
        lease_calls=policy.integer("lease_calls", defaults.policy.lease_calls, minimum=1),
        lease_seconds=policy.number("lease_seconds", defaults.policy.lease_seconds),
        balance_header=policy.get("balance_header", str, defaults.policy.balance_header),
    )
    if parsed_policy.balance_header and not _HEADER_RE.match(parsed_policy.balance_header.lower()):
        raise ConfigError(
            "policy.balance_header", f"{parsed_policy.balance_header!r} is not a valid header name"
        )
    if parsed_policy.key_cache_ttl < 0:
        raise ConfigError("policy.key_cache_ttl", "must not be negative")
    policy.done()

    pipeline = root.section("pipeline")
    parsed_pipeline = Pipeline(
        batch_size=pipeline.integer("batch_size", defaults.pipeline.batch_size, minimum=1),
        flush_interval=pipeline.number("flush_interval", defaults.pipeline.flush_interval),
        flush_timeout=pipeline.number("flush_timeout", defaults.pipeline.flush_timeout),
        buffer_size=pipeline.integer("buffer_size", defaults.pipeline.buffer_size, minimum=1),
        spool_dir=pipeline.get("spool_dir", str, defaults.pipeline.spool_dir),
        spool_max_bytes=pipeline.integer("spool_max_bytes", defaults.pipeline.spool_max_bytes),
    )
    pipeline.done()

    rollup = root.section("rollup")
    parsed_rollup = Rollup(
        batch_size=rollup.integer("batch_size", defaults.rollup.batch_size, minimum=1),
        lease_seconds=rollup.number("lease_seconds", defaults.rollup.lease_seconds),
        retention_seconds=rollup.number("retention_seconds", defaults.rollup.retention_seconds),
    )
    rollup.done()
    parsed_alerts = _parse_alerts(root, plans)
    parsed_export = _parse_export(root, meters)
    root.done()

    return Config(
        storage=url,
        shards=shards,
        meters=meters,
        plans=plans,
        default_plan=default_plan,
        routes=Routes(exclude, tuple(weights), live_only, account, templates),
        policy=parsed_policy,
        pipeline=parsed_pipeline,
        rollup=parsed_rollup,
        alerts=parsed_alerts,
        export=parsed_export,
    )


_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")


def parse_alert_rules(section: _Section) -> AlertRules:
    """Read the thresholds of one alert scope (unset lists stay None: inherited)."""
    percents: tuple[int, ...] | None = None
    if "quota_percent" in section.data:
        values = section.get("quota_percent", list, [])
        for index, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
                raise ConfigError(
                    f"{section.name('quota_percent')}[{index}]",
                    f"must be a whole percentage from 1 to 1000, got {value!r}",
                )
        percents = tuple(sorted(set(values)))

    def amounts(key: str) -> tuple[int, ...] | None:
        if key not in section.data:
            return None
        values = section.get(key, list, [])
        micros = {parse_credits(value, f"{section.name(key)}[{i}]") for i, value in enumerate(values)}
        return tuple(sorted(micros))

    return AlertRules(percents, amounts("credits_below"), amounts("spend_above"))


def _is_http_url(url: str) -> bool:
    if not re.match(r"^https?://[^\s/]+[^\s]*\Z", url):
        return False
    try:
        urlsplit(url).port  # noqa: B018  # raises on a port that is not a number, an unclosed "[" ...
    except ValueError:
        return False
    return True


def _parse_alerts(root: _Section, plans: Mapping[str, Plan]) -> Alerts:
    if "alerts" not in root.data:
        root.seen.add("alerts")
        return Alerts()
    section = root.section("alerts")
    url = section.get("webhook_url", str, "") or None
    if url is not None and not _is_http_url(url):
        raise ConfigError(
            "alerts.webhook_url", f"must be an http:// or https:// URL, got {redact_url(url)!r}"
        )
    defaults = Alerts()
    secret_env = section.get("secret_env", str, defaults.secret_env)
    if not _ENV_NAME_RE.match(secret_env):
        raise ConfigError("alerts.secret_env", f"must name an environment variable, got {secret_env!r}")
    attempts = section.integer("webhook_attempts", defaults.webhook_attempts, minimum=1)
    if attempts > 20:
        raise ConfigError("alerts.webhook_attempts", f"must be at most 20, got {attempts}")
    timeout = section.number("webhook_timeout", defaults.webhook_timeout)
    for key in ("quota_percent", "credits_below", "spend_above"):
        section.seen.add(key)
    rules = parse_alert_rules(section)
    overrides: dict[str, AlertRules] = {}
    plan_tables = section.section("plans")
    for name, raw in plan_tables.data.items():
        plan_tables.seen.add(name)
        if name not in plans:
            known = ", ".join(plans)
            raise ConfigError(plan_tables.name(name), f"names no plan defined under [plans] (known: {known})")
        table = _Section(raw, plan_tables.name(name))
        for key in ("quota_percent", "credits_below", "spend_above"):
            table.seen.add(key)
        overrides[name] = parse_alert_rules(table)
        table.done()
    section.done()
    return Alerts(True, url, secret_env, attempts, timeout, rules, overrides)


_EXPORT_KEY_ENVS: Final = {
    "stripe": "STRIPE_API_KEY",
    "dodo": "DODO_PAYMENTS_API_KEY",
    "openmeter": "OPENMETER_API_KEY",
    "lago": "LAGO_API_KEY",
}


def _parse_export(root: _Section, meters: Mapping[str, Meter]) -> dict[str, ExportTarget]:
    targets: dict[str, ExportTarget] = {}
    providers = root.section("export")
    for provider, raw in providers.data.items():
        providers.seen.add(provider)
        if provider not in EXPORT_PROVIDERS:
            raise ConfigError(
                providers.name(provider), f"is not a known provider ({', '.join(EXPORT_PROVIDERS)})"
            )
        section = _Section(raw, providers.name(provider))
        table = section.section("meters")
        names: dict[str, str] = {}
        for meter, event_name in table.data.items():
            where = table.name(meter)
            if meter not in meters:
                known = ", ".join(sorted(meters))
                raise ConfigError(where, f"names no meter defined under [meters] (known: {known})")
            if not meters[meter].chargeable:
                raise ConfigError(
                    where,
                    f"a '{meters[meter].aggregation}' meter cannot be exported: its window totals do not "
                    "add up, so a late change could not be sent as a delta",
                )
            bad = not isinstance(event_name, str) or event_name.strip() != event_name
            if bad or not 1 <= len(event_name) <= 100:
                problem = f"must be the provider's event name (1-100 characters), got {event_name!r}"
                raise ConfigError(where, problem)
            names[meter] = event_name
        if not names:
            raise ConfigError(table.path, "must map at least one meter to the provider's event name")
        api_key_env = section.get("api_key_env", str, _EXPORT_KEY_ENVS[provider])
        if not _ENV_NAME_RE.match(api_key_env):
            problem = f"must name an environment variable, got {api_key_env!r}"
            raise ConfigError(section.name("api_key_env"), problem)
        base_url = section.get("base_url", str, "") or None
        if base_url is not None and not re.match(r"^https?://[^\s/]+[^\s]*\Z", base_url):
            problem = f"must be an http:// or https:// URL, got {_shown(base_url)!r}"
            raise ConfigError(section.name("base_url"), problem)
        max_age = section.number("max_age_seconds", 1.0) if "max_age_seconds" in section.data else None
        batch_size = section.integer("batch_size", 1, minimum=1) if "batch_size" in section.data else None
        max_attempts = section.integer("max_attempts", 5, minimum=1)
        if max_attempts > 20:
            raise ConfigError(section.name("max_attempts"), f"must be at most 20, got {max_attempts}")
        defaults = ExportTarget(provider)
        targets[provider] = ExportTarget(
            provider=provider,
            meters=names,
            api_key_env=api_key_env,
            base_url=base_url,
            window=section.choice("window", get_args(ExportWindow), defaults.window),  # type: ignore[arg-type]
            customer_ids=section.choice("customer_ids", ("external", "meterware"), "external"),  # type: ignore[arg-type]
            settle_seconds=section.number("settle_seconds", defaults.settle_seconds, positive=False),
            recheck_seconds=section.number("recheck_seconds", defaults.recheck_seconds, positive=False),
            max_age_seconds=max_age,
            batch_size=batch_size,
            max_attempts=max_attempts,
            value_key=_export_key(section, "value_key", defaults.value_key),
            customer_key=_export_key(section, "customer_key", defaults.customer_key),
            source=_export_key(section, "source", defaults.source),
        )
        for key in ("settle_seconds", "recheck_seconds"):
            if getattr(targets[provider], key) < 0:
                raise ConfigError(section.name(key), "must not be negative")
        section.done()
    return targets


def _export_key(section: _Section, key: str, default: str) -> str:
    value: str = section.get(key, str, default)
    if not 1 <= len(value) <= 100 or any(c.isspace() for c in value):
        raise ConfigError(section.name(key), f"must be 1-100 characters without spaces, got {value!r}")
    return value


def resolve_config(
    config: Config | str | os.PathLike[str] | Mapping[str, Any] | None,
    overrides: Mapping[str, Any],
    *,
    given_as: str = "config=",
) -> Config:
    """The configuration an app starts with: an instance, a file path, a dict, or None (the file named by
    ``METERWARE_CONFIG``, else ``./meterware.toml``); logs which one, and the storage, in one line.

    Finding none is an error, unless ``METERWARE_CONFIG=defaults`` asks for the defaults: an app started
    from the wrong directory would otherwise run on an empty ``memory://`` and refuse every key.
    ``given_as``: how the caller names an explicit configuration (Django: its ``METERWARE`` setting).
    """
    if isinstance(config, Config):
        if overrides:
            raise TypeError("pass either a Config instance or keyword overrides, not both")
        resolved, origin = config, f"a Config instance ({given_as})"
    elif isinstance(config, Mapping):
        resolved = Config.from_dict(_with_overrides(config, overrides), source="arguments")
        origin = "a dict (config=)" if given_as == "config=" else given_as
    else:
        path, origin = _config_file(config, given_as)
        resolved = Config.load(path, **overrides)
    logger.info("meterware: config: %s; storage: %s", origin, redacted(resolved.storage))
    return resolved


def _config_file(path: str | os.PathLike[str] | None, given_as: str) -> tuple[str, str]:
    """The file a start-up reads (or ``defaults``), and how the log line names it."""
    if path is not None:
        return str(path), f"file {path}"
    named = os.environ.get("METERWARE_CONFIG")
    if named == DEFAULTS:
        return DEFAULTS, f"none, the defaults (METERWARE_CONFIG={DEFAULTS})"
    if named:
        return named, f"file {named} (METERWARE_CONFIG)"
    found = Path(DEFAULT_CONFIG_FILE).absolute()
    if found.is_file():
        return str(found), f"file {found} (the working directory)"
    error = ConfigError(
        f"no configuration found (searched: {given_as}, METERWARE_CONFIG, {found})",
        f"create the file, pass config=, or set METERWARE_CONFIG={DEFAULTS} to run on the defaults"
        " (memory://, one plan without limits)",
    )
    # Logged too: Starlette builds its middleware on the first ASGI message, the lifespan's, and uvicorn
    # takes a lifespan that raises for one the app does not support, without showing the error.
    logger.error("meterware: %s", error)
    raise error


def redacted(url: str) -> str:
    """A storage URL without its credentials (what comes between ``://`` and ``@``)."""
    scheme, separator, rest = url.partition("://")
    return f"{scheme}{separator}***@{rest.rpartition('@')[2]}" if "@" in rest else url
