"""Invoices (the running one and every earlier period's, line by line, CSV and JSON) and credits (the
balance, the grants still alive and the ledger, newest first, a page at a time).

The invoices list walks the customer's billing periods back from the current one, from the anchor and
the plan's period alone (no read), then reads only the invoices of the page shown: a customer with years
of daily periods costs a page what a customer with one period does.
"""

from __future__ import annotations

import json
import math
import time
from decimal import Decimal
from typing import Final

from markupsafe import Markup

from meterware.billing.invoices import Invoice
from meterware.billing.ledger import replay
from meterware.billing.pricing import Line, money
from meterware.errors import NotFoundError, UsageError
from meterware.metering.periods import period_bounds, period_count, period_starts
from meterware.portal import html
from meterware.portal.http import PortalRequest, PortalResponse
from meterware.storage.base import LedgerEntry

#: Invoices listed on a page of the invoices list (each is one invoice read).
INVOICES_PER_PAGE: Final = 12
#: Ledger entries listed on a page of the credits page.
LEDGER_PER_PAGE: Final = 50


# -- pages and periods -------------------------------------------------------------------------------------


def page_number(request: PortalRequest, pages: int) -> int:
    """The ``?page=`` asked for, 1 (the newest) by default; a page that does not exist is not found."""
    text = request.query.get("page", "1")
    canonical = text.isascii() and text.isdigit() and len(text) < 10 and text == str(int(text))
    if not canonical or not 1 <= int(text) <= pages:
        raise NotFoundError(f"no page {text!r:.40}")
    return int(text)


def pager(ctx: html.PageContext, path: str, number: int, pages: int) -> Markup:
    """Links to the newer and older pages, and where this one is."""
    if pages <= 1:
        return Markup("")
    newer = (
        Markup('<a href="{}" rel="prev">Newer</a>').format(ctx.url(path, page=number - 1))
        if number > 1
        else Markup("")
    )
    older = (
        Markup('<a href="{}" rel="next">Older</a>').format(ctx.url(path, page=number + 1))
        if number < pages
        else Markup("")
    )
    return Markup('<nav class="pager" aria-label="Pages">{}<span>Page {} of {}</span>{}</nav>').format(
        newer, number, pages, older
    )


def span(start: int, end: int) -> str:
    """A period for people: days when it runs midnight to midnight (UTC), minutes otherwise."""
    if start % 86_400 == 0 and end % 86_400 == 0:
        return f"{html.day(start)} to {html.day(end)}"
    return f"{html.when(start)} to {html.when(end)}"


def find_invoice(ctx: html.PageContext, period: str) -> Invoice:
    """The invoice of the period starting at ``period`` (epoch seconds) or of the ``current`` one: frozen
    if closed, else a preview. A period that has not started, or is not one, is not found."""
    try:
        if period == "current":
            return ctx.accounts.invoice(ctx.customer.id)
        # Only the canonical spelling: one URL per invoice, and no huge number reaches the calendar.
        if not (period.isascii() and period.isdigit() and len(period) < 15) or period != str(int(period)):
            raise NotFoundError(f"no period {period!r:.40}")
        if int(period) > time.time():
            raise NotFoundError(f"the period {period} has not started")
        return ctx.accounts.invoice(ctx.customer.id, period_start=int(period))
    except UsageError as error:  # before the anchor, or not the start of a period
        raise NotFoundError(str(error)) from None


# -- invoices ----------------------------------------------------------------------------------------------


def status_label(invoice: Invoice, now: float) -> str:
    if invoice.closed_at is not None:
        return f"closed {html.day(invoice.closed_at)}"
    return "running" if invoice.period_end > now else "ended, not closed yet"


def invoices(ctx: html.PageContext, request: PortalRequest) -> PortalResponse:
    customer = ctx.customer
    period = ctx.config.plan(customer.plan).period
    now = time.time()
    current_start, current_end = period_bounds(customer.anchor, period, now)
    # No period yet while the anchor is ahead (the current period would end by it).
    count = period_count(customer.anchor, period, current_start) if current_end > customer.anchor else 0
    pages = max(1, math.ceil(count / INVOICES_PER_PAGE))
    number = page_number(request, pages)
    skip = (number - 1) * INVOICES_PER_PAGE
    rows = []
    for start in period_starts(customer.anchor, period, current_start, skip, INVOICES_PER_PAGE):
        invoice = ctx.accounts.invoice(customer.id, period_start=start)
        data = invoice.as_dict()
        name = f"invoices.{start}"
        rows.append(
            (
                Markup('<a href="{}">{}</a>').format(
                    ctx.url(f"/invoices/{start}"), span(invoice.period_start, invoice.period_end)
                ),
                html.data(f"{name}.status", status_label(invoice, now), invoice.status),
                html.data(f"{name}.subtotal", data["subtotal"]),
                html.data(f"{name}.credits_applied", data["credits_applied"]),
                html.data(f"{name}.total", data["total"]),
                invoice.currency,
            )
        )
    body = Markup(
        "<h1>Invoices</h1><p>The invoice of the running period changes as you use the API until the "
        "period closes; a closed period's invoice never changes. Late usage of a closed period is "
        "billed on the next open invoice, as adjustments.</p>{}{}"
    ).format(
        html.table(
            "Your invoices, newest first",
            ["Period", "Status", "Subtotal", "Credits applied", "Total", "Currency"],
            rows,
            numeric=[2, 3, 4],
            name="invoices",
            empty=f"Your first billing period starts {html.when(customer.anchor)}.",
        ),
        pager(ctx, "/invoices", number, pages),
    )
    return html.page(ctx, title="Invoices", current="/invoices", body=body)


def _quantity(name: str, value: int | None) -> Markup | str:
    return "" if value is None else html.data(name, html.number(value), value)


def invoice(ctx: html.PageContext, request: PortalRequest, period: str) -> PortalResponse:
    found = find_invoice(ctx, period)
    data = found.as_dict()
    now = time.time()
    lines = [
        (
            line.description,
            _quantity(f"line.{i}.quantity", line.quantity),
            _quantity(f"line.{i}.included", line.included),
            _quantity(f"line.{i}.billable", line.billable),
            line.price.describe() if line.price else "",
            html.data(f"line.{i}.amount", shown["amount"]),
        )
        for i, (line, shown) in enumerate(zip(found.lines, data["lines"], strict=True))
    ]
    adjustments = [
        (
            line.description,
            _period_link(ctx, line),
            _quantity(f"adjustment.{i}.quantity", line.quantity),
            line.price.describe() if line.price else "",
            html.data(f"adjustment.{i}.amount", shown["amount"]),
        )
        for i, (line, shown) in enumerate(zip(found.adjustments, data["adjustments"], strict=True))
    ]
    applied = found.credits_applied
    adjusted = sum((line.amount for line in found.adjustments), Decimal(0))
    totals = html.definition_list(
        {
            "Subtotal": html.data("invoice.subtotal", data["subtotal"]),
            "Adjustments": html.data("invoice.adjustments", money(adjusted, found.decimals)),
            "Credits applied": Markup("{} ({} credits charged)").format(
                html.data(
                    "invoice.credits_applied",
                    money(-applied, found.decimals) if applied else data["credits_applied"],
                    data["credits_applied"],
                ),
                html.data("invoice.credits_charged", data["credits_charged"]),
            ),
            "Total": Markup("<strong>{}</strong> {}").format(
                html.data("invoice.total", data["total"]), found.currency
            ),
        }
    )
    facts = html.definition_list(
        {
            "Invoice": html.data("invoice.id", found.id),
            "Period": span(found.period_start, found.period_end),
            "Status": html.data("invoice.status", status_label(found, now), found.status),
            "Plan": found.plan,
            "Currency": html.data("invoice.currency", found.currency),
        }
    )
    running = Markup("")
    if found.status == "running":
        running = html.notice(
            "This period's invoice is not closed: it is priced from the usage so far and changes until it "
            "closes (usage trails calls by the rollup's few seconds)."
        )
    downloads = Markup(
        '<p class="downloads"><a href="{}" download>Download CSV</a><a href="{}" download>Download JSON</a>'
        '<a href="{}">All invoices</a></p>'
    ).format(
        ctx.url(f"/invoices/{found.period_start}.csv"),
        ctx.url(f"/invoices/{found.period_start}.json"),
        ctx.url("/invoices"),
    )
    body = Markup("<h1>Invoice {}</h1>{}{}{}<h2>Lines</h2>{}<h2>Adjustments</h2>{}<h2>Totals</h2>{}").format(
        found.id,
        running,
        facts,
        downloads,
        html.table(
            "What the period costs",
            ["Description", "Quantity", "Included", "Billable", "Pricing", "Amount"],
            lines,
            numeric=[1, 2, 3, 5],
            name="lines",
            empty="Nothing is billed for this period.",
        ),
        html.table(
            "Late usage of closed periods billed on this invoice",
            ["Description", "Of the period", "Late units", "Pricing", "Amount"],
            adjustments,
            numeric=[2, 4],
            name="adjustments",
            empty="No late usage is billed on this invoice.",
        ),
        totals,
    )
    return html.page(ctx, title=f"Invoice {found.id}", current="/invoices", body=body)


def _period_link(ctx: html.PageContext, line: Line) -> Markup | str:
    if line.period_start is None:
        return ""
    return Markup('<a href="{}">{}</a>').format(
        ctx.url(f"/invoices/{line.period_start}"), html.when(line.period_start)
    )


def invoice_download(ctx: html.PageContext, request: PortalRequest, period: str, fmt: str) -> PortalResponse:
    found = find_invoice(ctx, period)
    if fmt == "csv":
        body, content_type = found.to_csv(), "text/csv; charset=utf-8"
    else:  # the same document as ``meterware --json invoice``
        body, content_type = json.dumps(found.as_dict(), indent=2, sort_keys=True) + "\n", "application/json"
    # Customer ids are letters, digits and ``_.@-``: nothing to quote in the file name.
    disposition = f'attachment; filename="invoice-{found.id}.{fmt}"'
    return PortalResponse(200, body.encode(), content_type, headers=[("Content-Disposition", disposition)])


# -- credits -----------------------------------------------------------------------------------------------


def _details(entry: LedgerEntry) -> str:
    """What a ledger entry says beyond its amount: a grant's burn priority and expiry."""
    if entry.kind not in ("grant", "purchase"):
        return ""
    expiry = f"expires {html.when(entry.expires_ms / 1000)}" if entry.expires_ms else "never expires"
    return f"priority {entry.priority}, {expiry}"


def credits(ctx: html.PageContext, request: PortalRequest) -> PortalResponse:
    customer = ctx.customer
    plan = ctx.config.plan_for(customer)
    balance = ctx.accounts.storage.get_balance(customer.id)  # the customer was read with the page
    # One read of the ledger serves both the grants (a replay of it) and the page of entries.
    entries = ctx.accounts.ledger(customer.id)
    pages = max(1, math.ceil(len(entries) / LEDGER_PER_PAGE))
    number = page_number(request, pages)
    lots = sorted(
        (lot for lot in replay(entries).lots if lot.remaining > 0 and not lot.expired),
        key=lambda lot: lot.burn_key(),
    )
    grants = html.table(
        "Credits left, in the order they are spent",
        ["Added", "Kind", "Amount", "Remaining", "Priority", "Expires", "Reason"],
        [
            (
                html.when(lot.created_ms / 1000),
                lot.kind,
                html.data("grant.amount", html.credits(lot.amount), lot.amount),
                html.data("grant.remaining", html.credits(lot.remaining), lot.remaining),
                html.data("grant.priority", lot.priority),
                html.when(lot.expires_ms / 1000) if lot.expires_ms else "never",
                lot.reason,
            )
            for lot in lots
        ],
        numeric=[2, 3, 4],
        name="grants",
        empty="No credits are left.",
    )
    newest_first = entries[::-1][(number - 1) * LEDGER_PER_PAGE : number * LEDGER_PER_PAGE]
    # Who made a change is the seller's business: the operator view shows it, the customer's does not.
    headers = ["When", "Kind", "Credits", "Reason", "Details"] + (["By"] if ctx.operator else [])
    ledger = html.table(
        "Every movement of your balance, newest first",
        headers,
        [
            (
                html.when(entry.at_ms / 1000),
                html.data("ledger.kind", entry.kind),
                html.data("ledger.amount", html.credits(entry.amount), entry.amount),
                entry.reason,
                _details(entry),
                *([entry.actor] if ctx.operator else []),
            )
            for entry in newest_first
        ],
        numeric=[2],
        name="ledger",
        empty="No movement yet.",
    )
    how = (
        "Your plan is prepaid: calls with live keys are charged from this balance as they are made."
        if plan.prepaid
        else "Your plan is invoiced: calls are billed on your invoices, not charged from this balance."
    )
    facts = html.definition_list(
        {
            "Balance": html.data("credits.balance", html.credits(balance.balance), balance.balance),
            "Reserved by calls in flight": html.data(
                "credits.reserved", html.credits(balance.reserved), balance.reserved
            ),
            "Available": html.data("credits.available", html.credits(balance.available), balance.available),
        }
    )
    body = Markup("<h1>Credits</h1><p>{}</p>{}<h2>Credits left</h2>{}<h2>Ledger</h2>{}{}").format(
        how, facts, grants, ledger, pager(ctx, "/credits", number, pages)
    )
    return html.page(ctx, title="Credits", current="/credits", body=body)
