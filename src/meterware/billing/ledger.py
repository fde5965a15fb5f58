"""The credits ledger: every movement of a balance is an entry; grants, their burn order and expiry.

A customer's balance moves only by ledger entries, each appended in the same atomic call that moves it
(``grant_credits.lua``, ``flush.lua``, ``expire_grants.lua``, ``correct.lua``), so the balance always
equals the sum of the ledger. Reservations (holds) move ``reserved``, not the balance: they are not
entries.

Which grant a charge consumed is not recorded per event (the request path knows only the balance): it is
computed here by replaying the ledger, deterministically. Every positive entry opens a *lot*: grants and
purchases with their priority and expiry, refunds and positive adjustments as paid credits that never
expire. Charges, negative adjustments and expiries consume lots in burn order: lower priority number
first (promotional grants before paid ones), then earlier expiry (no expiry last), then older. What no
lot covers is a debt, which the next positive entry pays first.

A grant can be spent until its ``expiry`` entry is written (by ``meterware credits expire`` /
:meth:`meterware.Accounts.expire_credits`), which removes what is left of it at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

from meterware.errors import UsageError
from meterware.storage.base import GRANT_PRIORITY as GRANT_PRIORITY  # the grants' rules live with the records
from meterware.storage.base import LedgerEntry, LedgerStorage
from meterware.storage.base import default_grant as default_grant
from meterware.storage.base import new_grant_id as new_grant_id

Kind = Literal["grant", "purchase", "charge", "refund", "adjustment", "expiry"]
KINDS: Final[tuple[Kind, ...]] = ("grant", "purchase", "charge", "refund", "adjustment", "expiry")
#: Default burn priority of purchased credits, refunds and positive adjustments.
PURCHASE_PRIORITY: Final = 50


@dataclass(slots=True)
class Lot:
    """Credits that a positive entry added, and what is left of them."""

    id: str
    kind: str
    amount: int
    priority: int
    #: Epoch ms (0: never).
    expires_ms: int
    created_ms: int
    remaining: int
    actor: str = ""
    reason: str = ""
    #: An expiry entry has been written for it: nothing can consume it any more.
    expired: bool = False
    #: Position of the entry in the ledger (breaks ties: older first).
    position: int = 0

    def burn_key(self) -> tuple[int, float, int]:
        return (self.priority, self.expires_ms or math.inf, self.position)

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "kind": self.kind,
            "amount_micros": self.amount,
            "remaining_micros": self.remaining,
            "priority": self.priority,
            "expires_ms": self.expires_ms,
            "created_ms": self.created_ms,
            "expired": self.expired,
            "actor": self.actor,
            "reason": self.reason,
        }


@dataclass(slots=True)
class Replay:
    """The state of a ledger: its lots (in ledger order), the debt no lot covers, and the balance."""

    lots: list[Lot]
    debt: int
    balance: int
    #: The id of the last entry replayed ("0-0" for an empty ledger).
    last_id: str

    def due(self, now_ms: int) -> list[tuple[str, int]]:
        """``(grant id, -remaining)`` of every grant expired at ``now_ms`` without an expiry entry yet."""
        return [
            (lot.id, -lot.remaining)
            for lot in self.lots
            if lot.expires_ms and lot.expires_ms <= now_ms and not lot.expired
        ]


def replay(entries: Iterable[LedgerEntry]) -> Replay:
    """Replay ledger entries (in ledger order): each lot's remaining credits, the debt and the balance.

    Invariant: ``sum(lot.remaining) - debt == balance == sum(entry.amount)``.
    """
    lots: list[Lot] = []
    by_grant: dict[str, Lot] = {}
    debt = balance = 0
    last_id = "0-0"
    for position, entry in enumerate(entries):
        balance += entry.amount
        last_id = entry.id or last_id
        if entry.kind == "expiry":
            lot = by_grant.get(entry.grant)
            if lot is None:
                debt -= entry.amount  # an expiry of nothing we know: keep the sums true
                continue
            lot.expired = True
            lot.remaining += entry.amount
            if lot.remaining < 0:
                debt, lot.remaining = debt - lot.remaining, 0
            continue
        if entry.amount > 0:
            paid = min(debt, entry.amount)
            debt -= paid
            grant = entry.kind in ("grant", "purchase")
            lot = Lot(
                id=entry.grant if grant and entry.grant else entry.id,
                kind=entry.kind,
                amount=entry.amount,
                priority=entry.priority if grant else PURCHASE_PRIORITY,
                expires_ms=entry.expires_ms if grant else 0,
                created_ms=entry.at_ms,
                remaining=entry.amount - paid,
                actor=entry.actor,
                reason=entry.reason,
                position=position,
            )
            lots.append(lot)
            by_grant[lot.id] = lot
            continue
        owed = -entry.amount
        if owed:
            for lot in sorted((lot for lot in lots if lot.remaining and not lot.expired), key=Lot.burn_key):
                taken = min(owed, lot.remaining)
                lot.remaining -= taken
                owed -= taken
                if not owed:
                    break
            debt += owed
    return Replay(lots, debt, balance, last_id)


def expire_due_grants(
    storage: LedgerStorage, customers: Iterable[str], now_ms: int, actor: str
) -> list[tuple[str, str, int]]:
    """Expire what is left of each customer's grants whose time has come: ``(customer, grant id, micros
    removed)`` of each. Idempotent: the write only happens if the ledger has not moved since it was read
    (then it is read again), so a grant expires once, by what was actually left of it."""
    expired: list[tuple[str, str, int]] = []
    for customer in customers:
        for _ in range(5):
            state = replay(storage.read_ledger(customer))
            expiries = state.due(now_ms)
            if not expiries or storage.expire_grants(customer, state.last_id, expiries, actor):
                expired += [(customer, grant, -amount) for grant, amount in expiries]
                break
        else:
            raise UsageError(f"{customer}: the ledger kept moving while expiring grants; try again")
    return expired
