"""Customers: their plan, status and ids at billing providers."""

from __future__ import annotations

import time

from meterware.billing.accounts._base import LATEST_ANCHOR, AccountsBase
from meterware.config import EXPORT_PROVIDERS
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
        if plan not in self.config.plans:
            raise ConfigError("plan", f"{plan!r} is not defined (known: {', '.join(self.config.plans)})")
