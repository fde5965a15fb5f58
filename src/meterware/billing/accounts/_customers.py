"""Customers: their plan, status and ids at billing providers."""

from __future__ import annotations

import time

from meterware.billing.accounts._base import LATEST_ANCHOR, AccountsBase
from meterware.config import EXPORT_PROVIDERS, format_credits, parse_credits
from meterware.errors import ConfigError, UsageError
from meterware.metering.records import Customer
from meterware.storage._keyspace import check_customer_id
from meterware.storage.base import LedgerEntry


class Customers(AccountsBase):
    """Create customers, change their plan, status and external ids."""

    def create_customer(
        self, customer_id: str, *, plan: str | None = None, anchor: int | None = None
    ) -> Customer:
        """Create a customer on ``plan`` whose billing periods start at ``anchor`` (default: now)."""
        try:
            check_customer_id(customer_id)
        except ValueError as error:
            raise UsageError(str(error)) from None
        plan = plan or self.config.default_plan
        self._check_plan(plan)
        anchor = int(time.time()) if anchor is None else anchor
        if not 0 <= anchor <= LATEST_ANCHOR:
            raise UsageError(f"anchor must be epoch seconds between 0 and {LATEST_ANCHOR}, got {anchor}")
        customer = Customer(customer_id, plan, "active", anchor)
        try:
            self.storage.create_customer(customer)
        except ValueError as error:  # the backends' "already exists"
            raise UsageError(str(error)) from None
        return customer

    def change_plan(self, customer_id: str, plan: str) -> None:
        self._check_plan(plan)
        self.customer(customer_id)
        self.storage.update_customer(customer_id, plan=plan)

    def set_status(self, customer_id: str, status: str, *, reason: str = "", actor: str = "api") -> None:
        """Suspend (calls refused) or reactivate a customer. A ``reason`` is kept in the ledger, as an entry
        of kind ``status`` that moves no credits, so the customer's history says why and who."""
        if status not in ("active", "suspended"):
            raise UsageError(f"status must be 'active' or 'suspended', got {status!r}")
        self.customer(customer_id)
        self.storage.update_customer(customer_id, status=status)
        reason = " ".join(reason.split())[:500]
        if reason:
            actor = " ".join(actor.split())[:500]
            self.storage.move_credits(
                customer_id, LedgerEntry("status", 0, actor=actor, reason=f"{status}: {reason}")
            )

    def set_spend_cap(self, customer_id: str, cap: int | str | None) -> None:
        """Set the customer's spend cap per billing period, in credits (``"50.00"``), in place of their
        plan's; None removes it (the plan's applies again). The seller's call: it may raise the cap.

        Calls that would take the period's spend (charged and held) past it are refused (429
        ``spend_cap_reached``). Processes see the change within ``policy.key_cache_ttl`` seconds.
        """
        self.customer(customer_id)
        micros = -1 if cap is None else _cap_micros(cap)
        self.storage.update_customer(customer_id, spend_cap=micros)

    def lower_spend_cap(self, customer_id: str, cap: int | str) -> None:
        """The customer's own call: set a spend cap no higher than the one in force (theirs or their plan's),
        e.g. from the portal; raising it is the seller's (:meth:`set_spend_cap`)."""
        micros = _cap_micros(cap)
        current = self.spend_cap(customer_id)
        if current is not None and micros > current:
            raise UsageError(
                f"a customer may only lower the spend cap, now {format_credits(current)} credits"
            )
        self.storage.update_customer(customer_id, spend_cap=micros)

    def spend_cap(self, customer_id: str) -> int | None:
        """The spend cap in force for the customer, micro-credits per period (theirs, else their plan's)."""
        customer = self.customer(customer_id)
        if customer.spend_cap is not None:
            return customer.spend_cap
        return self.config.plan(customer.plan).spend_cap

    def set_external_id(self, customer_id: str, provider: str, external_id: str | None) -> None:
        """Record the customer's id at a billing provider (``None`` or ``""`` removes it)."""
        if provider not in EXPORT_PROVIDERS:
            raise UsageError(f"provider must be one of {', '.join(EXPORT_PROVIDERS)}, got {provider!r}")
        if external_id and (len(external_id) > 255 or not external_id.isprintable() or " " in external_id):
            raise UsageError(f"external id {external_id!r} must be 1-255 printable characters without spaces")
        self.customer(customer_id)
        self.storage.set_external_id(customer_id, provider, external_id or None)

    def external_ids(self, customer_id: str) -> dict[str, str]:
        """The customer's ids at billing providers, by provider."""
        self.customer(customer_id)
        return self.storage.get_external_ids(customer_id)

    def _check_plan(self, plan: str) -> None:
        """Refuse a plan neither the config file nor the backend (read now) holds."""
        if plan not in self.config.plans:
            self.refresh_plans(force=True)
        if plan not in self.config.plans and plan not in self.config.stored.plans:
            known = ", ".join((*self.config.plans, *sorted(self.config.stored.plans)))
            raise ConfigError("plan", f"{plan!r} is not defined (known: {known})")


def _cap_micros(cap: int | str) -> int:
    """A spend cap in credits (``"50.00"``, ``50``) as micro-credits."""
    try:
        micros = parse_credits(cap, "spend_cap")
    except ConfigError as error:
        raise UsageError(str(error)) from None
    if micros < 0:
        raise UsageError(f"spend_cap must be at least 0 credits, got {cap!r}")
    return micros
