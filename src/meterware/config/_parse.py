"""Parsing each section of a configuration table into its value, with one error naming the field."""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from typing import Any, Final, get_args
from urllib.parse import urlsplit

from meterware._redact import redact_url
from meterware.billing.pricing import DEFAULT_CURRENCY, parse_currency, parse_money, parse_price
from meterware.config._credits import MAX_CALL_COST, MAX_UNITS, format_credits, parse_credits
from meterware.config._routes import DEFAULT_EXCLUDE, Routes, has_dot_segments
from meterware.config._sections import (
    DEFAULT_KEY_HEADERS,
    EXPORT_PROVIDERS,
    Admission,
    Aggregation,
    AlertRules,
    Alerts,
    ExportTarget,
    ExportWindow,
    FailureMode,
    Meter,
    MeterTerms,
    Period,
    Pipeline,
    Plan,
    Policy,
    Portal,
    RateLimit,
    Rollup,
)
from meterware.config._table import Section, check_name, shown_url, toml_key
from meterware.dimensions import (
    MAX_SUBMETERS,
    Dimensions,
    base_of,
    canonical,
    count_submeters,
    filtered,
    split,
    submeter,
)
from meterware.errors import ConfigError
from meterware.storage import check_url
from meterware.storage.base import ReplicaWait

_SOURCES = ("call", "handler", "response_bytes", "request_bytes", "duration_ms")
_HEADER_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+\Z")


def parse_storage(
    root: Section, default_url: str, default_shards: int
) -> tuple[str, int, bool, ReplicaWait | None]:
    """The storage URL, shard count, ``allow_eviction`` and the wait for replicas (``storage = "URL"`` or a
    ``[storage]`` table)."""
    storage = root.get("storage", (str, dict), default_url)
    shards = default_shards
    allow_eviction = False
    replica_wait = None
    if isinstance(storage, dict):
        table = Section(storage, "storage")
        shards = table.integer("shards", shards, minimum=1)
        allow_eviction = table.get("allow_eviction", bool, False)
        url = table.get("url", str, default_url)
        replicas = table.integer("wait_replicas", 0)
        wait_timeout = table.number("wait_timeout", 1.0)
        if replicas > 0:
            if url.startswith("memory://"):
                raise ConfigError(
                    "storage.wait_replicas", "needs a Redis storage (memory:// has no replicas)"
                )
            replica_wait = ReplicaWait(replicas, wait_timeout)
        table.done()
    else:
        url = storage
    if "://" not in url:
        raise ConfigError(
            "storage.url", f"must be a URL like 'memory://' or 'redis://host:6379/0', got {shown_url(url)!r}"
        )
    try:
        check_url(url)  # an unknown scheme, or a URL the driver refuses, fails here, not on the first call
    except ValueError as error:
        raise ConfigError("storage.url", str(error).removeprefix("storage URL: ")) from None
    if shards > 1024:
        raise ConfigError("storage.shards", f"must be at most 1024, got {shards}")
    return url, shards, allow_eviction, replica_wait


def parse_meter(name: str, raw: Any) -> Meter:
    section = Section(raw, f"meters.{toml_key(check_name(name, f'meters.{toml_key(name)}'))}")
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
    dimensions = parse_dimensions(section, aggregation, source)
    section.done()
    return Meter(name, aggregation, source, reserve, dimensions)  # type: ignore[arg-type]  # choice() checked it


def parse_dimensions(section: Section, aggregation: str, source: str) -> Dimensions:
    """A meter's ``dimensions`` table: dimension -> its declared values, bounded by MAX_SUBMETERS."""
    table = section.section("dimensions")
    if not table.data:
        return ()
    if aggregation != "sum" or source != "handler":
        raise ConfigError(table.path, "only a 'sum' meter with source 'handler' is grouped by dimensions")
    dimensions = []
    for key in table.data:
        values = table.strings(check_name(key, table.name(key)), ())
        for value in values:
            check_name(value, table.name(key))
        if not values or len(set(values)) != len(values):
            raise ConfigError(table.name(key), "must list its values, each once")
        dimensions.append((key, values))
    table.done()
    if count_submeters(tuple(dimensions)) > MAX_SUBMETERS:
        raise ConfigError(
            table.path,
            f"makes {count_submeters(tuple(dimensions))} combinations of values (each dimension also left "
            f"out); at most {MAX_SUBMETERS}",
        )
    return tuple(dimensions)


def parse_filter(where: str, name: str, meters: Mapping[str, Meter]) -> str:
    """A plan's terms key naming dimension values of a meter (``tokens{model=large}``), canonical."""
    try:
        base, pairs = split(name)
        meter = meters.get(base)
        if meter is None or not meter.dimensions:
            raise ValueError(f"{base!r} is not a meter with dimensions")
        if len(dict(pairs)) != len(pairs):
            raise ValueError("names a dimension twice")
        return canonical(base, meter.dimensions, pairs)
    except ValueError as error:
        raise ConfigError(where, str(error)) from None


def check_filters(plan: str, terms: Mapping[str, MeterTerms], meters: Mapping[str, Meter]) -> None:
    """Refuse filters of a plan that would price one sub-meter equally specifically."""
    priced = frozenset(name for name in terms if "{" in name)
    for base in filtered(priced):
        dimensions = meters[base].dimensions
        choices = [[(key, value) for value in values] + [None] for key, values in dimensions]
        for combination in itertools.product(*choices):
            own = frozenset(pair for pair in combination if pair is not None)
            matches = [name for name in priced if base_of(name) == base and set(split(name)[1]) <= own]
            widest = max((len(split(name)[1]) for name in matches), default=0)
            tied = sorted(name for name in matches if len(split(name)[1]) == widest)
            if len(tied) > 1:
                raise ConfigError(
                    f"plans.{toml_key(plan)}.meters",
                    f"{tied[0]!r} and {tied[1]!r} both price {submeter(base, filter(None, combination))!r}: "
                    f"give terms for it (the most specific filter wins)",
                )


def parse_rate_limits(section: Section, meters: Mapping[str, Meter] | None = None) -> tuple[RateLimit, ...]:
    """The ``rate_limits`` list of a plan or of one of its routes (``meters``: it may limit a ``sum``
    meter)."""
    limits: list[RateLimit] = []
    for index, text in enumerate(section.strings("rate_limits", ())):
        try:
            limits.append(RateLimit.parse(text, meters))
        except ValueError as error:
            raise ConfigError(f"{section.name('rate_limits')}[{index}]", str(error)) from None
    return tuple(limits)


def parse_plan_limits(section: Section, meters: Mapping[str, Meter]) -> dict[str, Any]:
    """A plan's limits beyond its rate limits: ``routes`` (whose limits may count a meter too),
    ``concurrency`` and ``spend_cap``."""
    route_limits = []
    routes = section.section("routes")
    for glob, route_raw in routes.data.items():
        routes.seen.add(glob)
        table = Section(route_raw, routes.name(glob))
        if not glob.startswith("/"):
            raise ConfigError(routes.name(glob), "must be a path glob like '/v1/chat' or '/v1/*'")
        route_limits.append((glob, parse_rate_limits(table, meters)))
        table.done()
    spend_cap = None
    if "spend_cap" in section.data:
        section.seen.add("spend_cap")
        spend_cap = parse_credits(section.data["spend_cap"], section.name("spend_cap"))
    return {
        "route_limits": tuple(route_limits),
        "concurrency": section.integer("concurrency", 0),
        "spend_cap": spend_cap,
    }


def parse_plan(name: str, raw: Any, meters: Mapping[str, Meter]) -> Plan:
    section = Section(raw, f"plans.{toml_key(check_name(name, f'plans.{toml_key(name)}'))}")
    limits = parse_rate_limits(section, meters)
    more_limits = parse_plan_limits(section, meters)
    period = section.choice("period", get_args(Period), "month")
    prepaid = section.get("prepaid", bool, False)
    terms: dict[str, MeterTerms] = {}
    meter_tables = section.section("meters")
    for meter_name, meter_raw in meter_tables.data.items():
        meter_tables.seen.add(meter_name)
        where = meter_tables.name(meter_name)
        if "{" in meter_name:
            meter_name = parse_filter(where, meter_name, meters)
        elif meter_name not in meters:
            known = ", ".join(sorted(meters))
            raise ConfigError(where, f"names no meter defined under [meters] (known: {known})")
        table = Section(meter_raw, where)
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
        if "{" in meter_name and quota is not None:
            raise ConfigError(table.name("quota"), "a quota counts all values: give it to the meter")
        aggregation = meters[base_of(meter_name)].aggregation
        if meters[base_of(meter_name)].level:
            _check_level_terms(table, aggregation, prepaid, quota)
        elif aggregation == "unique":
            model = "package" if "package" in table.data else "tiers"
            for name, value in (("quota", quota), ("included", included), ("price", price), (model, pricing)):
                if value:
                    raise ConfigError(table.name(name), f"a 'unique' meter cannot carry a {name}")
        terms[meter_name] = MeterTerms(quota, hard, included, price, pricing)
    check_filters(name, terms, meters)
    currency = parse_currency(section.get("currency", str, DEFAULT_CURRENCY), section.name("currency"))
    section.seen.update(("base_fee", "minimum"))
    base_fee, minimum = (
        parse_money(section.data.get(key, 0), section.name(key)) for key in ("base_fee", "minimum")
    )
    section.done()
    return Plan(name, limits, period, prepaid, terms, currency, base_fee, minimum, **more_limits)  # type: ignore[arg-type]


def _check_level_terms(table: Section, aggregation: str, prepaid: bool, quota: int | None) -> None:
    """A ``max`` or ``last`` meter's value in a period is known only when the period ends: it is priced on
    the invoice (the request path holds nothing of it) and never limited or charged call by call."""
    if quota is not None:
        raise ConfigError(
            table.name("quota"), f"a '{aggregation}' meter cannot carry a quota (its units do not add up)"
        )
    given = next((name for name in ("price", "package", "tiers") if name in table.data), None)
    if given is not None and prepaid:
        raise ConfigError(
            table.name(given),
            f"a '{aggregation}' meter is priced on invoices, when its period ends; a prepaid plan charges "
            "credits call by call: price it on an invoiced plan (prepaid = false)",
        )


def check_call_costs(plans: Mapping[str, Plan], meters: Mapping[str, Meter], heaviest: int) -> None:
    """Refuse a plan whose price of a call itself, at the heaviest route weight, passes MAX_CALL_COST."""
    for plan in plans.values():
        costs = {
            name: terms.price * (heaviest if meters[name].aggregation == "sum" else 1)
            for name, terms in plan.meters.items()
            if meters[base_of(name)].source == "call"
        }
        total = sum(costs.values())
        if total > MAX_CALL_COST:
            priciest = max(costs, key=costs.__getitem__)
            raise ConfigError(
                f"plans.{toml_key(plan.name)}.meters.{toml_key(priciest)}.price",
                f"a call may cost at most {format_credits(MAX_CALL_COST)} credits, "
                f"one would cost {format_credits(total)} here (at route weight {heaviest})",
            )


def parse_routes(root: Section) -> Routes:
    """The ``[routes]`` section."""
    routes = root.section("routes")
    exclude = routes.strings("exclude", DEFAULT_EXCLUDE)
    weights_table = routes.section("weights")
    weights: list[tuple[str, int]] = []
    for glob in weights_table.data:
        weights.append((glob, weights_table.integer(glob, 1, minimum=0)))
    live_only = routes.strings("live_only", ())
    mounts: dict[str, str | None] = {}
    for name, example in (("account", "/v1/account"), ("portal", "/portal"), ("admin", "/admin")):
        raw = routes.get(name, str, None)
        mount = mounts[name] = None if raw is None else raw.rstrip("/")
        if mount is not None and (not mount.startswith("/") or has_dot_segments(mount)):
            raise ConfigError(routes.name(name), f"must be a path like {example}, got {raw!r}")
    templates = routes.strings("templates", ())
    routes.done()
    return Routes(exclude, tuple(weights), live_only, templates=templates, **mounts)


def parse_policy(root: Section) -> Policy:
    """The ``[policy]`` section."""
    defaults = Policy()
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
        timeout=policy.number("timeout", defaults.timeout),
        reservation_timeout=policy.number("reservation_timeout", defaults.reservation_timeout),
        key_cache_ttl=policy.number("key_cache_ttl", defaults.key_cache_ttl, positive=False),
        strip_usage_headers=policy.get("strip_usage_headers", bool, True),
        admission=policy.choice("admission", get_args(Admission), "strict"),  # type: ignore[arg-type]
        lease_calls=policy.integer("lease_calls", defaults.lease_calls, minimum=1),
        lease_seconds=policy.number("lease_seconds", defaults.lease_seconds),
        balance_header=policy.get("balance_header", str, defaults.balance_header),
    )
    if parsed_policy.balance_header and not _HEADER_RE.match(parsed_policy.balance_header.lower()):
        raise ConfigError(
            "policy.balance_header", f"{parsed_policy.balance_header!r} is not a valid header name"
        )
    if parsed_policy.key_cache_ttl < 0:
        raise ConfigError("policy.key_cache_ttl", "must not be negative")
    policy.done()
    return parsed_policy


def parse_pipeline(root: Section) -> Pipeline:
    """The ``[pipeline]`` section."""
    defaults = Pipeline()
    pipeline = root.section("pipeline")
    parsed_pipeline = Pipeline(
        batch_size=pipeline.integer("batch_size", defaults.batch_size, minimum=1),
        flush_interval=pipeline.number("flush_interval", defaults.flush_interval),
        flush_timeout=pipeline.number("flush_timeout", defaults.flush_timeout),
        buffer_size=pipeline.integer("buffer_size", defaults.buffer_size, minimum=1),
        spool_dir=pipeline.get("spool_dir", str, defaults.spool_dir),
        spool_max_bytes=pipeline.integer("spool_max_bytes", defaults.spool_max_bytes),
    )
    pipeline.done()
    return parsed_pipeline


def parse_rollup(root: Section) -> Rollup:
    """The ``[rollup]`` section."""
    defaults = Rollup()
    rollup = root.section("rollup")
    parsed_rollup = Rollup(
        batch_size=rollup.integer("batch_size", defaults.batch_size, minimum=1),
        lease_seconds=rollup.number("lease_seconds", defaults.lease_seconds),
        retention_seconds=rollup.number("retention_seconds", defaults.retention_seconds),
    )
    rollup.done()
    return parsed_rollup


_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")


def parse_portal(root: Section) -> Portal:
    """The ``[portal]`` section."""
    defaults = Portal()
    section = root.section("portal")
    names = {}
    for key in ("secret_env", "admin_token_env"):
        names[key] = section.get(key, str, getattr(defaults, key))
        if not _ENV_NAME_RE.match(names[key]):
            raise ConfigError(section.name(key), f"must name an environment variable, got {names[key]!r}")
    base_url = section.get("base_url", str, defaults.base_url).rstrip("/")
    if base_url and not _is_http_url(base_url):
        raise ConfigError(section.name("base_url"), f"must be an http:// or https:// URL, got {base_url!r}")
    seconds = {}
    for key, most in (("link_seconds", 7 * 86_400), ("session_seconds", 30 * 86_400)):
        seconds[key] = float(section.number(key, getattr(defaults, key)))
        if not 1 <= seconds[key] <= most:
            raise ConfigError(section.name(key), f"must be from 1 to {most} seconds, got {seconds[key]:g}")
    secure = section.get("secure_cookies", bool, defaults.secure_cookies)
    section.done()
    return Portal(
        names["secret_env"],
        names["admin_token_env"],
        base_url,
        seconds["link_seconds"],
        seconds["session_seconds"],
        secure,
    )


def parse_alert_rules(section: Section) -> AlertRules:
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


def parse_alerts(root: Section, plans: Mapping[str, Plan]) -> Alerts:
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
        table = Section(raw, plan_tables.name(name))
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


def parse_export(root: Section, meters: Mapping[str, Meter]) -> dict[str, ExportTarget]:
    targets: dict[str, ExportTarget] = {}
    providers = root.section("export")
    for provider, raw in providers.data.items():
        providers.seen.add(provider)
        if provider not in EXPORT_PROVIDERS:
            raise ConfigError(
                providers.name(provider), f"is not a known provider ({', '.join(EXPORT_PROVIDERS)})"
            )
        section = Section(raw, providers.name(provider))
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
            problem = f"must be an http:// or https:// URL, got {shown_url(base_url)!r}"
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
        taken = {targets[provider].value_key, targets[provider].customer_key}
        for meter in names:
            clash = taken.intersection(dimension for dimension, _ in meters[meter].dimensions)
            if clash:
                raise ConfigError(
                    section.name("meters"),
                    f"meter {meter!r} has a dimension named {clash.pop()!r}, a key the events already use",
                )
        section.done()
    return targets


def _export_key(section: Section, key: str, default: str) -> str:
    value: str = section.get(key, str, default)
    if not 1 <= len(value) <= 100 or any(c.isspace() for c in value):
        raise ConfigError(section.name(key), f"must be 1-100 characters without spaces, got {value!r}")
    return value
