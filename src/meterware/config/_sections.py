"""The sections of a configuration, as frozen values: meters, plans and their terms, policy, pipeline,
rollup, alerts and exports (routes have their own module: they match paths)."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from fnmatch import translate
from typing import Final, Literal

from meterware.billing.pricing import DEFAULT_CURRENCY, PlanPrices, Price
from meterware.dimensions import Dimensions

__all__ = [
    "DEFAULT_KEY_HEADERS",
    "EXPORT_PROVIDERS",
    "Admission",
    "Aggregation",
    "AlertRules",
    "Alerts",
    "ExportTarget",
    "ExportWindow",
    "FailureMode",
    "Meter",
    "MeterTerms",
    "Period",
    "Pipeline",
    "Plan",
    "Policy",
    "Portal",
    "RateLimit",
    "Rollup",
]

Aggregation = Literal["count", "sum", "max", "last", "unique"]
Period = Literal["month", "week", "day"]
FailureMode = Literal["open", "closed"]
Admission = Literal["strict", "lease"]

DEFAULT_KEY_HEADERS = ("authorization", "x-api-key")
_UNIT_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
_RATE_RE = re.compile(
    r"^\s*([0-9]+)\s*(?:([A-Za-z0-9][A-Za-z0-9_.-]*)\s*)??(?:/|per)\s*([0-9]*)\s*(second|minute|hour|day)s?\s*\Z"
)


@functools.cache
def _glob_re(glob: str) -> re.Pattern[str]:
    return re.compile(translate(glob))


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
    #: The dimensions its units are grouped by, each with its declared values (:mod:`meterware.dimensions`).
    dimensions: Dimensions = ()

    @property
    def chargeable(self) -> bool:
        """Whether units of this meter add up, so they can carry a quota and a price."""
        return self.aggregation in ("count", "sum")

    @property
    def level(self) -> bool:
        """Whether a period's units are a level, not a sum (its peak, or its value at the end): priced on
        invoices only, never charged or limited call by call."""
        return self.aggregation in ("max", "last")

    @property
    def header(self) -> str | None:
        """The response header the units are read from, lower-cased, if the source is a header."""
        return self.source[7:].lower() if self.source.startswith("header:") else None


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``amount`` calls (or units of a ``sum`` meter) per ``seconds``, enforced with GCRA (bursts
    up to ``amount``)."""

    amount: int
    seconds: int
    #: The ``sum`` meter whose units are limited ("": calls).
    meter: str = ""
    #: Units a call takes at admission: 1 for calls; a meter's ``reserve`` (at least 1), corrected by the
    #: call's actual units when it is settled.
    estimate: int = 1

    @classmethod
    def parse(cls, text: str, meters: Mapping[str, Meter] | None = None) -> RateLimit:
        """Parse ``"10/second"``, ``"600/minute"``, ``"1000 per 5 minutes"``, or a ``sum`` meter's
        ``"100000 tokens/minute"`` (only where ``meters`` are given)."""
        match = _RATE_RE.match(text)
        if not match:
            raise ValueError(f"expected a rate like '10/second' or '600/minute', got {text!r}")
        amount, meter, multiple, unit = int(match[1]), match[2] or "", int(match[3] or 1), match[4]
        if amount <= 0 or multiple <= 0:
            raise ValueError(f"rate must be positive, got {text!r}")
        if not meter:
            return cls(amount, multiple * _UNIT_SECONDS[unit])
        if meters is None:
            raise ValueError(
                f"only a plan's, a route's or a key's rate_limits may limit a meter, got {text!r}"
            )
        found = meters.get(meter)
        if found is None or found.aggregation != "sum":
            known = ", ".join(sorted(name for name, m in meters.items() if m.aggregation == "sum")) or "none"
            raise ValueError(f"{meter!r} in {text!r} is not a 'sum' meter (sum meters: {known})")
        if found.reserve > amount:
            raise ValueError(
                f"{meter!r} reserves {found.reserve} units a call, more than {text!r} lets through in a "
                "period: no call could be admitted (lower the meter's reserve or raise the limit)"
            )
        return cls(amount, multiple * _UNIT_SECONDS[unit], meter, max(1, found.reserve))

    def __str__(self) -> str:
        return (
            f"{self.amount} {self.meter}/{self.seconds}s" if self.meter else f"{self.amount}/{self.seconds}s"
        )


@dataclass(frozen=True, slots=True)
class MeterTerms:
    """What a plan grants and charges for one meter (or one filter of its dimension values, e.g.
    ``tokens{model=large}``: no quota then), per billing period."""

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
    #: Rate limits of some routes only, ``(glob, limits)``: a call counts in the first glob its path matches
    #: (as ``[routes.weights]``), per customer and route.
    route_limits: tuple[tuple[str, tuple[RateLimit, ...]], ...] = ()
    #: Most calls of a customer in flight at once (0: no cap).
    concurrency: int = 0
    #: Most micro-credits a customer's live calls may cost per period, held and charged (None: no cap).
    spend_cap: int | None = None

    @property
    def meter_limited(self) -> bool:
        """Whether a rate limit of the plan or of one of its routes counts a meter's units (calls then
        settle their units; so do a key's own limits on a meter)."""
        return any(limit.meter for limit in self.rate_limits) or any(
            limit.meter for _, limits in self.route_limits for limit in limits
        )

    def route_of(self, path: str) -> int:
        """The index in ``route_limits`` of the first glob ``path`` matches, or -1."""
        for index, (glob, _) in enumerate(self.route_limits):
            if _glob_re(glob).match(path):
                return index
        return -1

    def prices(self) -> PlanPrices:
        """What prices the plan's invoices: per meter its package or tiers, or its per-unit price."""
        meters = {
            name: terms.pricing or Price.unit(Decimal(terms.price).scaleb(-6), included=terms.included)
            for name, terms in self.meters.items()
        }
        return PlanPrices(self.currency, self.base_fee, self.minimum, meters)


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
class Portal:
    """The ``[portal]`` section: the customer portal's sign-in links and sessions."""

    #: The environment variable holding the secret that signs links, sessions and forms (never the file).
    secret_env: str = "METERWARE_PORTAL_SECRET"
    #: The environment variable holding the operator view's admin token (when no auth hook is given).
    admin_token_env: str = "METERWARE_ADMIN_TOKEN"
    #: Where the portal is mounted, e.g. ``https://api.example.com/portal``: the base of the links issued.
    base_url: str = ""
    #: How long a sign-in link works (it works once).
    link_seconds: float = 900.0
    #: How long a session lasts after sign-in; then a new link is needed.
    session_seconds: float = 3600.0
    #: Whether cookies are ``Secure`` (sent over HTTPS only); false only for local http.
    secure_cookies: bool = True


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
