"""Per-customer terms: overrides of the plan's prices, included units, quotas, rate limits and fees,
recorded as versions with an effective time (:mod:`meterware.config._overrides`)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Final, Literal

from meterware.billing.accounts._base import LATEST_ANCHOR, AccountsBase
from meterware.config import Config, Plan
from meterware.config._overrides import (
    MAX_ACTOR_LENGTH,
    MAX_VERSIONS,
    TermsVersion,
    check_overrides,
    dump_versions,
    effective_hour,
    in_force,
    load_versions,
    plan_with,
)
from meterware.config._parse import check_call_costs, check_filters
from meterware.errors import ConfigError, StorageError, UsageError
from meterware.metering.periods import period_bounds

#: Writes retried when another change of the same customer's terms lands in between.
SET_ATTEMPTS: Final = 10


class Terms(AccountsBase):
    """Give a customer its own terms over its plan's, and read them back with their history."""

    def set_overrides(
        self,
        customer_id: str,
        overrides: Mapping[str, Any],
        *,
        effective_from: float | Literal["period_start"] | None = None,
        actor: str = "api",
    ) -> TermsVersion:
        """Record a new version of the customer's overrides (a full set: ``{}`` goes back to the plan's).

        ``overrides`` maps ``<meter>.price`` (credits per unit), ``<meter>.included``, ``<meter>.quota``
        (a number or ``"none"``), ``<meter>.quota_mode`` (``hard``/``soft``), ``rate_limits``
        (``"100/second,5000/minute"`` or ``"none"``), ``base_fee`` and ``minimum`` to their values.
        ``effective_from`` (epoch seconds, default now) is rounded up to a whole hour; it may lie in the
        past only back to the start of the current billing period (closed invoices never change), which
        ``"period_start"`` names exactly (so terms agreed with a new customer hold from its first call).
        """
        try:
            checked = check_overrides(overrides, self.config.meters)
        except ConfigError as error:
            raise UsageError(f"override {error.field}: {error.problem}") from None
        actor = " ".join(str(actor).split())[:MAX_ACTOR_LENGTH] or "api"
        now = time.time()
        named = effective_from == "period_start"
        seconds = isinstance(effective_from, int | float) and 0 <= effective_from <= LATEST_ANCHOR
        if effective_from is not None and not (named or seconds):
            raise UsageError(
                f"effective_from must be epoch seconds or 'period_start', got {effective_from!r}"
            )
        for _ in range(SET_ATTEMPTS):
            customer = self.customer(customer_id)
            plan = self.config.plan(customer.plan)
            period_start = period_bounds(customer.anchor, plan.period, now)[0]
            if isinstance(effective_from, int | float):
                effective = effective_hour(effective_from)
            else:
                effective = period_start if named else effective_hour(now)
            if effective < period_start:
                raise UsageError(
                    f"effective_from may go back at most to the start of the current billing period "
                    f"({period_start}), got {effective}"
                )
            version = TermsVersion(effective, int(now), actor, checked)
            _check_call_cost(self.config, plan_with(plan, version, self.config.meters))
            versions = _pruned((*load_versions(customer.terms), version), period_start)
            if self.storage.swap_customer_terms(customer_id, customer.terms, dump_versions(versions)):
                return version
        raise StorageError(f"could not set {customer_id}'s terms: other changes kept landing")

    def overrides(self, customer_id: str) -> list[TermsVersion]:
        """Every kept version of the customer's overrides, in the order they were recorded."""
        return list(load_versions(self.customer(customer_id).terms))

    def terms(self, customer_id: str, *, at: float | None = None) -> Plan:
        """The customer's terms in force at ``at`` (default now): its plan with its overrides merged."""
        return self.config.plan_for(self.customer(customer_id), at)

    def terms_version(self, customer_id: str, *, at: float | None = None) -> TermsVersion | None:
        """The version of the customer's overrides in force at ``at`` (default now), or None."""
        versions = load_versions(self.customer(customer_id).terms)
        return in_force(versions, time.time() if at is None else at)[0]


def _check_call_cost(config: Config, plan: Plan) -> None:
    """Refuse terms under which one call would cost more than the rollup takes (as the config does)."""
    heaviest = max([1, *(weight for _, weight in config.routes.weights)])
    try:
        check_filters(plan.name, plan.meters, config.meters)  # an override's filter may tie the plan's
        check_call_costs({plan.name: plan}, config.meters, heaviest)
    except ConfigError as error:
        raise UsageError(f"override {error.field.rpartition('meters.')[2]}: {error.problem}") from None


def _pruned(versions: tuple[TermsVersion, ...], period_start: int) -> tuple[TermsVersion, ...]:
    """At most MAX_VERSIONS, dropping the oldest of those no longer in force in the current period."""
    if len(versions) <= MAX_VERSIONS:
        return versions
    kept = in_force(versions, period_start)[0]
    past = [v for v in versions if v.effective_from <= period_start and v is not kept]
    drop = {id(v) for v in past[: len(versions) - MAX_VERSIONS]}
    if len(versions) - len(drop) > MAX_VERSIONS:
        raise UsageError(
            f"at most {MAX_VERSIONS} versions of a customer's terms are kept, and all of them are in force "
            "in the current billing period: wait for the next period"
        )
    return tuple(v for v in versions if id(v) not in drop)
