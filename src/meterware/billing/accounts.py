"""Customers, keys, credits and usage reports: the operations behind the CLI (and your admin code).

accounts = Accounts.open()                  # config from meterware.toml / env
accounts.create_customer("acme", plan="pro")
key = accounts.create_key("acme")           # key.plaintext is shown once, never stored
accounts.grant_credits("acme", "25.00")
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from meterware.billing.alerts import Alert, read_alerts, rules_from_json, rules_to_json
from meterware.billing.corrections import (
    CorrectionResult,
    ImportResult,
    correct_event,
    import_events,
    parse_import,
)
from meterware.billing.invoices import Invoice, close, periods_to_close, preview
from meterware.billing.ledger import (
    GRANT_PRIORITY,
    PURCHASE_PRIORITY,
    Lot,
    expire_due_grants,
    new_grant_id,
    replay,
)
from meterware.config import EXPORT_PROVIDERS, AlertRules, Config, parse_credits
from meterware.errors import ConfigError, NotFoundError, UsageError
from meterware.events import OUTCOMES
from meterware.keys import NewKey, generate_key
from meterware.metering.periods import period_bounds
from meterware.metering.records import Customer, KeyRecord
from meterware.rollup.aggregate import parse_columns
from meterware.storage import open_storage
from meterware.storage._keyspace import check_customer_id, shard_of
from meterware.storage.base import Balance, LedgerEntry, Storage

__all__ = ["Accounts", "UsageReport"]


@dataclass(frozen=True, slots=True)
class UsageReport:
    """A customer's usage in one billing period, from the rollups."""

    customer: str
    live: bool
    period_start: int
    period_end: int
    #: Totals per meter (billable calls only).
    meters: dict[str, int]
    #: Calls per outcome: success, client_error, server_error, aborted, rejected.
    calls: dict[str, int]
    #: Micro-credits charged (prepaid) or accrued (invoiced) in the period.
    spend: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "customer": self.customer,
            "live": self.live,
            "period_start": self.period_start,
            "period_end": self.period_end,
            "meters": self.meters,
            "calls": self.calls,
            "spend_micros": self.spend,
        }


def _one_line(text: str) -> str:
    return " ".join(text.split())[:500]


#: 9999-12-31T23:59:59Z: billing periods are computed with datetime, which ends in year 9999.
LATEST_ANCHOR = 253_402_300_799
#: Stream entries read at most to count the events waiting for the rollup (about batch_size events each).
PENDING_SCAN: Final = 10_000


class Accounts:
    """Management operations over a backend (synchronous)."""

    def __init__(self, storage: Storage, config: Config) -> None:
        self.storage = storage
        self.config = config

    @classmethod
    def open(cls, config: Config | None = None) -> Accounts:
        """Connect to the backend named by ``config`` (loaded from file/env when omitted)."""
        config = config or Config.load()
        return cls(open_storage(config.storage, shards=config.shards), config)

    def close(self) -> None:
        self.storage.close()

    # -- customers

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

    def customer(self, customer_id: str) -> Customer:
        customer = self.storage.get_customer(customer_id)
        if customer is None:
            raise NotFoundError(f"no customer {customer_id!r}")
        return customer

    def change_plan(self, customer_id: str, plan: str) -> None:
        self._check_plan(plan)
        self.customer(customer_id)
        self.storage.update_customer(customer_id, plan=plan)

    def set_status(self, customer_id: str, status: str) -> None:
        if status not in ("active", "suspended"):
            raise UsageError(f"status must be 'active' or 'suspended', got {status!r}")
        self.customer(customer_id)
        self.storage.update_customer(customer_id, status=status)

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

    # -- credits

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

    # -- corrections

    def void_event(
        self, event_id: str, *, reason: str, actor: str = "api", customer_id: str | None = None
    ) -> CorrectionResult:
        """Take an event back: the rollup subtracts it and the credits it was charged are refunded, once."""
        return correct_event(
            self.storage, self.config, event_id, units=None, reason=reason, actor=actor, customer=customer_id
        )

    def amend_event(
        self,
        event_id: str,
        *,
        units: dict[str, int],
        reason: str,
        actor: str = "api",
        customer_id: str | None = None,
    ) -> CorrectionResult:
        """Change an event's ``sum`` units: the rollup and the credits follow the difference, once."""
        return correct_event(
            self.storage, self.config, event_id, units=units, reason=reason, actor=actor, customer=customer_id
        )

    def import_events(self, path: str, *, fmt: str | None = None) -> ImportResult:
        """Backfill events from a JSONL or CSV file: all lines valid or nothing written; each event once."""
        events = parse_import(path, self.config, self.storage.get_customer, fmt=fmt)
        return import_events(self.storage, events)

    def balance(self, customer_id: str) -> Balance:
        self.customer(customer_id)
        return self.storage.get_balance(customer_id)

    # -- alerts

    def set_alerts(
        self,
        customer_id: str,
        *,
        quota_percent: Sequence[int] | None = None,
        credits_below: Sequence[str | int] | None = None,
        spend_above: Sequence[str | int] | None = None,
        clear: bool = False,
    ) -> AlertRules:
        """Set the customer's own alert thresholds; return the ones now in force.

        Each list given replaces the plan's (an empty list: none of that kind); the others stay as they
        were. ``clear`` drops the customer's own thresholds first. Amounts are credits (``"2.50"``).
        """
        self.customer(customer_id)
        own = AlertRules() if clear else rules_from_json(self.storage.get_alert_rules(customer_id))
        if quota_percent is not None:
            for value in quota_percent:
                if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
                    raise UsageError(f"quota_percent must be whole percentages from 1 to 1000, got {value!r}")
            own = AlertRules(tuple(sorted(set(quota_percent))), own.credits_below, own.spend_above)
        if credits_below is not None:
            micros = sorted({parse_credits(value, "credits_below") for value in credits_below})
            own = AlertRules(own.quota_percent, tuple(micros), own.spend_above)
        if spend_above is not None:
            micros = sorted({parse_credits(value, "spend_above") for value in spend_above})
            own = AlertRules(own.quota_percent, own.credits_below, tuple(micros))
        empty = own == AlertRules()
        self.storage.set_alert_rules(customer_id, None if empty else rules_to_json(own))
        return self.alert_rules(customer_id)

    def alert_rules(self, customer_id: str) -> AlertRules:
        """The customer's thresholds in force: its own, over its plan's, over the configuration's."""
        customer = self.customer(customer_id)
        own = rules_from_json(self.storage.get_alert_rules(customer_id))
        return own.over(self.config.alerts.rules_for(customer.plan))

    def alerts(self, customer_id: str | None = None, *, limit: int = 100) -> list[Alert]:
        """The latest fired alerts (of one customer), oldest first, from the alerts streams."""
        return read_alerts(self.storage, customer=customer_id, limit=limit)

    # -- usage

    def usage(self, customer_id: str, *, live: bool = True, at: float | None = None) -> UsageReport:
        """Usage of the billing period containing ``at`` (default: now)."""
        customer = self.customer(customer_id)
        plan = self.config.plan(customer.plan)
        start, end = period_bounds(customer.anchor, plan.period, time.time() if at is None else at)
        totals = self.storage.read_usage(customer_id, live, "period", start)
        calls: dict[str, int] = {outcome: totals.get(f"n:{outcome}", 0) for outcome in OUTCOMES}
        meters = {name: totals.get(name, 0) for name in self.config.meters}
        return UsageReport(customer_id, live, start, end, meters, calls, totals.get("spend", 0))

    def pending_events(self, customer_id: str) -> tuple[int, bool]:
        """Events on the customer's shard flushed but not rolled up yet, and whether that is all of them.

        Usage reports lag by these. At most ``PENDING_SCAN`` stream entries are read (the count is then a
        lower bound: False).
        """
        storage = self.storage
        shard = shard_of(self.customer(customer_id).id, storage.shards)
        after = storage.committed_offset(shard)
        events = read = 0
        while read < PENDING_SCAN:
            entries = storage.read_stream(shard, after, min(1000, PENDING_SCAN - read))
            if not entries:
                return events, True
            read += len(entries)
            after = entries[-1].entry_id
            for entry in entries:
                parsed = parse_columns(entry.fields, self.config.meters)
                events += 0 if isinstance(parsed, str) else len(parsed[1])  # a dead letter holds none
        return events, not storage.read_stream(shard, after, 1)

    # -- invoices

    def invoice(
        self, customer_id: str, *, period_start: int | None = None, at: float | None = None
    ) -> Invoice:
        """The invoice of the period starting at ``period_start`` (default: the period containing ``at``,
        default now): frozen if the period was closed, otherwise a preview of its usage so far.

        A period that ends by the customer's billing anchor is refused: the customer had no plan then,
        so neither a base fee nor a minimum (periods_to_close never closes one either).
        """
        customer = self.customer(customer_id)
        plan = self.config.plan(customer.plan)
        instant = (time.time() if at is None else at) if period_start is None else period_start
        bounds = period_bounds(customer.anchor, plan.period, instant)
        if bounds[1] <= customer.anchor:
            first = datetime.fromtimestamp(customer.anchor, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
            raise UsageError(
                f"{customer_id} has no billing period before its first, which starts at "
                f"{first} ({customer.anchor})"
            )
        if period_start is not None and bounds[0] != period_start:
            raise UsageError(
                f"no billing period of {customer_id} starts at {period_start}; "
                f"the one around it starts at {bounds[0]}"
            )
        return preview(self.storage, customer, plan, bounds)

    def close_periods(self, *, at: float | None = None, customer_id: str | None = None) -> list[Invoice]:
        """Freeze the invoice of every period that ended by ``at`` (default: now) and is not closed yet,
        for one customer or all; return the invoices this call froze (none the second time)."""
        at = time.time() if at is None else at
        closed = []
        for name in [customer_id] if customer_id else self.storage.list_customers():
            customer = self.customer(name)
            plan = self.config.plan(customer.plan)
            for bounds in periods_to_close(self.storage, customer, plan, at):
                invoice, froze = close(self.storage, customer, plan, bounds, int(at))
                if froze:
                    closed.append(invoice)
        return closed
