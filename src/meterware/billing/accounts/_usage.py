"""The usage record: a period's report, the events still waiting for the rollup, corrections and
backfills."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Final

from meterware.billing._asdict import fields_dict
from meterware.billing.accounts._base import AccountsBase
from meterware.billing.corrections import (
    CorrectionResult,
    ImportResult,
    correct_event,
    import_events,
    parse_import,
)
from meterware.events import OUTCOMES
from meterware.metering.periods import period_bounds
from meterware.rollup.aggregate import parse_columns
from meterware.storage._keyspace import shard_of

#: Stream entries read at most to count the events waiting for the rollup (about batch_size events each).
PENDING_SCAN: Final = 10_000


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
        return fields_dict(self, spend="spend_micros")


class Usage(AccountsBase):
    """Read a customer's usage, and correct or backfill the events it is made of."""

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
