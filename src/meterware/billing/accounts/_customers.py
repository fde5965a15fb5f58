"""Customers and their API keys."""

from __future__ import annotations

import time

from meterware.billing.accounts._base import LATEST_ANCHOR, AccountsBase
from meterware.config import EXPORT_PROVIDERS
from meterware.errors import ConfigError, NotFoundError, UsageError
from meterware.keys import NewKey, generate_key
from meterware.metering.records import Customer, KeyRecord
from meterware.storage._keyspace import check_customer_id
from meterware.storage.base import LedgerEntry


class Customers(AccountsBase):
    """Create customers, change their plan, status and external ids; issue, revoke and rotate keys."""

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

    # -- keys

    def create_key(self, customer_id: str, *, live: bool = True) -> NewKey:
        """Issue a key; its plaintext exists only in the returned object."""
        self.customer(customer_id)
        new = generate_key(live=live)
        record = KeyRecord(new.key_id, customer_id, new.prefix, live, "active", int(time.time()))
        self.storage.add_key(record, new.hash)
        return new

    def list_keys(self, customer_id: str) -> list[KeyRecord]:
        self.customer(customer_id)
        return self.storage.list_keys(customer_id)

    def key(self, key_id: str) -> KeyRecord:
        record = self.storage.get_key(key_id)
        if record is None:
            raise NotFoundError(f"no key {key_id!r}")
        return record

    def revoke_key(self, key_id: str) -> None:
        """Stop a key at once (the next admission refuses it, whatever the caches hold)."""
        self.key(key_id)
        self.storage.set_key_state(key_id, status="revoked")

    def rotate_key(self, key_id: str, *, grace_seconds: float = 0) -> NewKey:
        """Issue a replacement key; the old one keeps working for ``grace_seconds``, then expires."""
        old = self.key(key_id)
        if old.status != "active":
            raise UsageError(f"key {key_id} is revoked and cannot be rotated")
        new = self.create_key(old.customer, live=old.live)
        expires_ms = int((time.time() + max(0.0, grace_seconds)) * 1000)
        if old.expires_ms:
            expires_ms = min(expires_ms, old.expires_ms)  # never past the original expiry
        self.storage.set_key_state(key_id, expires_ms=expires_ms)
        return new
