"""Customers, keys, credits and usage reports: the operations behind the CLI (and your admin code).

accounts = Accounts.open()                  # config from meterware.toml / env
accounts.create_customer("acme", plan="pro")
key = accounts.create_key("acme")           # key.plaintext is shown once, never stored
accounts.grant_credits("acme", "25.00")
"""

from __future__ import annotations

from meterware.billing.accounts._alerts import AlertThresholds
from meterware.billing.accounts._credits import Credits
from meterware.billing.accounts._customers import Customers
from meterware.billing.accounts._invoices import Invoicing
from meterware.billing.accounts._keys import Keys
from meterware.billing.accounts._plans import StoredPlanning
from meterware.billing.accounts._terms import Terms
from meterware.billing.accounts._usage import Usage, UsageHistory, UsagePoint, UsageReport
from meterware.config import Config
from meterware.storage import open_storage

__all__ = ["Accounts", "UsageHistory", "UsagePoint", "UsageReport"]


class Accounts(Customers, Terms, StoredPlanning, Keys, Credits, Usage, AlertThresholds, Invoicing):
    """Management operations over a backend (synchronous).

    Its methods come by role: customers, their own terms, stored plans, keys, credits, usage (reports,
    corrections, backfills), alert thresholds, and billing periods (invoices); each role is a class of its
    own module.
    """

    @classmethod
    def open(cls, config: Config | None = None) -> Accounts:
        """Connect to the backend named by ``config`` (loaded from file/env when omitted)."""
        config = config or Config.load()
        return cls(
            open_storage(config.storage, shards=config.shards, replica_wait=config.replica_wait), config
        )

    def close(self) -> None:
        self.storage.close()
