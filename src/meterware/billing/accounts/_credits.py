"""Prepaid credits: grants, adjustments, the ledger and expiries."""

from __future__ import annotations

import time

from meterware.billing.accounts._base import LATEST_ANCHOR, AccountsBase
from meterware.billing.ledger import (
    GRANT_PRIORITY,
    PURCHASE_PRIORITY,
    Lot,
    expire_due_grants,
    new_grant_id,
    replay,
)
from meterware.config import parse_credits
from meterware.errors import UsageError
from meterware.storage.base import Balance, LedgerEntry


def _one_line(text: str) -> str:
    return " ".join(text.split())[:500]


class Credits(AccountsBase):
    """Move a customer's prepaid balance and read it back, entry by entry."""

    def grant_credits(
        self,
        customer_id: str,
        amount: str | int,
        *,
        kind: str = "grant",
        priority: int | None = None,
        expires_at: float | None = None,
        reason: str = "",
        actor: str = "api",
    ) -> Balance:
        """Add ``amount`` credits (a decimal string like ``"25.50"``) to the prepaid balance, as a grant.

        ``kind`` is ``grant`` (promotional, burnt first: priority 10 by default) or ``purchase`` (paid:
        priority 50). Lower priorities burn first, then earlier expiries, then older grants. A grant with
        ``expires_at`` (epoch seconds) loses what is left of it then (see :meth:`expire_credits`).
        """
        if kind not in ("grant", "purchase"):
            raise UsageError(f"kind must be 'grant' or 'purchase', got {kind!r}")
        micros = parse_credits(amount, "amount")
        if micros <= 0:
            raise UsageError("amount must be positive")
        if priority is None:
            priority = GRANT_PRIORITY if kind == "grant" else PURCHASE_PRIORITY
        if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 1_000_000:
            raise UsageError(f"priority must be a whole number from 0 to 1000000, got {priority!r}")
        expires_ms = 0
        if expires_at is not None:
            expires_ms = int(expires_at * 1000)
            if not 0 < expires_ms <= LATEST_ANCHOR * 1000:
                raise UsageError(f"expires_at must be epoch seconds after 1970, got {expires_at!r}")
        self.customer(customer_id)
        entry = LedgerEntry(
            kind, micros, new_grant_id(), _one_line(actor), _one_line(reason), "", priority, expires_ms
        )
        return self.storage.move_credits(customer_id, entry)

    def adjust_credits(
        self, customer_id: str, amount: str | int, *, reason: str, actor: str = "api"
    ) -> Balance:
        """Move the balance by a signed ``amount`` of credits (``"-2.50"`` takes credits away)."""
        text = str(amount).strip()
        negative = text.startswith("-")
        micros = parse_credits(text[1:] if negative else text, "amount")
        if micros == 0:
            raise UsageError("amount must not be zero")
        if not reason.strip():
            raise UsageError("an adjustment needs a reason")
        self.customer(customer_id)
        entry = LedgerEntry(
            "adjustment", -micros if negative else micros, actor=_one_line(actor), reason=_one_line(reason)
        )
        return self.storage.move_credits(customer_id, entry)

    def ledger(self, customer_id: str) -> list[LedgerEntry]:
        """Every movement of the customer's balance, oldest first (their sum is the balance)."""
        self.customer(customer_id)
        return self.storage.read_ledger(customer_id)

    def grants(self, customer_id: str) -> list[Lot]:
        """The customer's grants (and refunds, adjustments) with what is left of each, from the ledger."""
        return replay(self.ledger(customer_id)).lots

    def expire_credits(
        self, *, at: float | None = None, customer_id: str | None = None, actor: str = "meterware"
    ) -> list[tuple[str, str, int]]:
        """Expire every grant whose time has come: ``(customer, grant id, micros removed)`` of each.

        Idempotent: a grant expires once (the ledger records it), and two runs at once never both write.
        """
        now_ms = int((time.time() if at is None else at) * 1000)
        if customer_id is not None:
            self.customer(customer_id)
            customers = [customer_id]
        else:
            shards = range(self.storage.shards)
            due = (self.storage.due_grant_expiries(shard, now_ms, 10_000) for shard in shards)
            customers = sorted({customer for found in due for customer, _ in found})
        return expire_due_grants(self.storage, customers, now_ms, actor)

    def balance(self, customer_id: str) -> Balance:
        self.customer(customer_id)
        return self.storage.get_balance(customer_id)
