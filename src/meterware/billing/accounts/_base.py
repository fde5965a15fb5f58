"""What every role of :class:`~meterware.billing.accounts.Accounts` stands on: the backend, the
configuration and the customer lookup."""

from __future__ import annotations

from meterware.config import Config
from meterware.errors import NotFoundError
from meterware.metering.records import Customer
from meterware.storage.base import Storage

#: 9999-12-31T23:59:59Z: billing periods are computed with datetime, which ends in year 9999.
LATEST_ANCHOR = 253_402_300_799


class AccountsBase:
    """A backend and the configuration its customers are billed by."""

    def __init__(self, storage: Storage, config: Config) -> None:
        self.storage = storage
        self.config = config

    def refresh_plans(self, *, force: bool = False) -> None:
        """Read the stored plans into ``config.stored`` once per ``policy.key_cache_ttl`` (``force``: now)."""
        self.config.stored.refresh(self.config, self.storage.stored_plans, force=force)

    def customer(self, customer_id: str) -> Customer:
        customer = self.storage.get_customer(customer_id)
        if customer is None:
            raise NotFoundError(f"no customer {customer_id!r}")
        # A plan name not known yet is a plan stored since the last read: read them now.
        self.refresh_plans(force=not self.config.knows_plan(customer.plan))
        return customer
