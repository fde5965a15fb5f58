"""Billing periods: a period's invoice (running or frozen), and closing the periods that ended."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from meterware.billing.accounts._base import AccountsBase
from meterware.billing.invoices import Invoice, close, periods_to_close, preview
from meterware.errors import UsageError
from meterware.metering.periods import period_bounds


class Invoicing(AccountsBase):
    """Show a period's invoice; freeze the invoices of the periods that ended."""

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
        return preview(self.storage, customer, plan, bounds, self.config.meters)

    def close_periods(self, *, at: float | None = None, customer_id: str | None = None) -> list[Invoice]:
        """Freeze the invoice of every period that ended by ``at`` (default: now) and is not closed yet,
        for one customer or all; return the invoices this call froze (none the second time)."""
        at = time.time() if at is None else at
        closed = []
        for name in [customer_id] if customer_id else self.storage.list_customers():
            customer = self.customer(name)
            plan = self.config.plan(customer.plan)
            for bounds in periods_to_close(self.storage, customer, plan, at):
                invoice, froze = close(self.storage, customer, plan, bounds, self.config.meters, int(at))
                if froze:
                    closed.append(invoice)
        return closed
