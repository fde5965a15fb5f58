"""The whole configuration, :class:`Config`, and where it comes from: a TOML file, a dict, keyword
overrides and the environment."""

from __future__ import annotations

import logging
import os
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meterware.config._overrides import in_force, load_versions, plan_with
from meterware.config._parse import (
    check_call_costs,
    parse_alerts,
    parse_export,
    parse_meter,
    parse_pipeline,
    parse_plan,
    parse_policy,
    parse_portal,
    parse_rollup,
    parse_routes,
    parse_storage,
)
from meterware.config._routes import Routes
from meterware.config._sections import Alerts, ExportTarget, Meter, Pipeline, Plan, Policy, Portal, Rollup
from meterware.config._stored import StoredPlans
from meterware.config._table import Section
from meterware.errors import ConfigError
from meterware.storage.base import DEFAULT_TIMEOUT, ReplicaWait

if TYPE_CHECKING:
    from meterware.metering.records import Customer

logger = logging.getLogger("meterware")

DEFAULT_CONFIG_FILE = "meterware.toml"
#: ``METERWARE_CONFIG`` set to this runs on the defaults without a file, as an explicit choice.
DEFAULTS = "defaults"


def _default_meters() -> Mapping[str, Meter]:
    return {"calls": Meter("calls")}


def _default_plans() -> Mapping[str, Plan]:
    return {"default": Plan("default")}


@dataclass(frozen=True, slots=True)
class Config:
    """The whole, validated configuration of meterware."""

    storage: str = "memory://"
    shards: int = 16
    #: Run on a Redis whose ``maxmemory-policy`` evicts keys (start-up refuses it otherwise).
    allow_eviction: bool = False
    #: ``[storage] wait_replicas`` and ``wait_timeout``: acknowledge money writes once replicas have them.
    replica_wait: ReplicaWait | None = None
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
    portal: Portal = field(default_factory=Portal)
    #: Plans stored in the backend, as this process last read them (:mod:`meterware.config._stored`).
    stored: StoredPlans = field(default_factory=StoredPlans, compare=False, repr=False)

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
        """The plan called ``name``: the config file's, else a stored one; unknown names fall back to the
        default plan."""
        return self.plans.get(name) or self.stored.plans.get(name) or self.plans[self.default_plan]

    def knows_plan(self, name: str) -> bool:
        """Whether ``name`` is a plan of the config file or a stored one this process has read."""
        return name in self.plans or name in self.stored.plans

    def plan_for(self, customer: Customer, at: float | None = None) -> Plan:
        """The terms of ``customer`` at ``at`` (default: now): its plan, with its own overrides in force
        then merged over it (:mod:`meterware.config._overrides`)."""
        plan = self.plan(customer.plan)
        if not customer.terms:
            return plan
        version, _ = in_force(load_versions(customer.terms), time.time() if at is None else at)
        return plan_with(plan, version, self.meters)


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


def _parse(data: Mapping[str, Any]) -> Config:
    root = Section(data, "")
    defaults = Config()
    url, shards, allow_eviction, replica_wait = parse_storage(root, defaults.storage, defaults.shards)

    meters = {name: parse_meter(name, raw) for name, raw in root.section("meters").data.items()}
    root.seen.add("meters")
    meters = meters or dict(defaults.meters)
    plans_raw = root.section("plans").data
    plans = {name: parse_plan(name, raw, meters) for name, raw in plans_raw.items()} or dict(defaults.plans)
    default_plan = root.get("default_plan", str, next(iter(plans)))
    if default_plan not in plans:
        raise ConfigError("default_plan", f"names no plan defined under [plans] (known: {', '.join(plans)})")

    routes = parse_routes(root)
    check_call_costs(plans, meters, max([1, *(weight for _, weight in routes.weights)]))
    policy = parse_policy(root)
    pipeline = parse_pipeline(root)
    # The flush, the worker's and the tools' calls each bound a script and its wait together.
    call_timeout = min(pipeline.flush_timeout, DEFAULT_TIMEOUT)
    if replica_wait is not None and replica_wait.timeout >= call_timeout:
        raise ConfigError(
            "storage.wait_timeout",
            f"must be below {call_timeout:g}s (pipeline.flush_timeout, and the worker's and the CLI's call"
            f" timeout of {DEFAULT_TIMEOUT:g}s), got {replica_wait.timeout:g}",
        )
    rollup = parse_rollup(root)
    alerts = parse_alerts(root, plans)
    export = parse_export(root, meters)
    portal = parse_portal(root)
    root.done()

    return Config(
        storage=url,
        shards=shards,
        allow_eviction=allow_eviction,
        replica_wait=replica_wait,
        meters=meters,
        plans=plans,
        default_plan=default_plan,
        routes=routes,
        policy=policy,
        pipeline=pipeline,
        rollup=rollup,
        alerts=alerts,
        export=export,
        portal=portal,
    )


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
