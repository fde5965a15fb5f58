"""The operator's page of one customer: grant credits, suspend or reactivate, each with a reason the
ledger keeps (only the operator view routes here)."""

from __future__ import annotations

from typing import Final

from markupsafe import Markup

from meterware.errors import MeterwareError
from meterware.portal import html
from meterware.portal.http import PortalRequest, PortalResponse, redirect

#: What a successful post did, by the ``done`` the page is redirected with.
DONE: Final = {
    "grant": "The credits were granted.",
    "suspended": "The customer is now suspended.",
    "active": "The customer is now active.",
}


def manage(ctx: html.PageContext, request: PortalRequest) -> PortalResponse:
    """Grant credits, suspend or reactivate, each with a reason the ledger keeps. A successful post is
    redirected to this page (reloading the page does not grant the credits again)."""
    accounts, customer = ctx.accounts, ctx.customer
    done = Markup("")
    if request.query.get("done") in DONE:
        done = html.notice(DONE[request.query["done"]], kind="ok")
    if request.method == "POST":
        action, reason = request.form.get("action", ""), request.form.get("reason", "").strip()
        actor = f"portal:{ctx.operator}"
        try:
            if not reason:
                raise MeterwareError("a reason is required")
            if action == "grant":
                accounts.grant_credits(
                    customer.id, request.form.get("amount", ""), reason=reason, actor=actor
                )
            elif action in ("suspended", "active"):
                accounts.set_status(customer.id, action, reason=reason, actor=actor)
            else:
                raise MeterwareError("unknown action")
            return redirect(ctx.url("/manage", done=action))
        except MeterwareError as error:
            done = html.notice(str(error), kind="error")
    grant = html.form(
        ctx,
        "/manage",
        Markup('<input type="hidden" name="action" value="grant">')
        + html.field_row(
            "Amount",
            Markup('<input id="amount" name="amount" inputmode="decimal" required>'),
            hint="Credits, e.g. 25.00",
        )
        + html.field_row(
            "Reason",
            Markup('<input id="reason" name="reason" required>'),
            hint="Kept in the customer's ledger.",
        ),
        "Grant credits",
        name="grant",
    )
    target = "active" if customer.status == "suspended" else "suspended"
    status = html.form(
        ctx,
        "/manage",
        Markup('<input type="hidden" name="action" value="{}">').format(target)
        + html.field_row(
            "Reason for the change", Markup('<input id="reason-for-the-change" name="reason" required>')
        ),
        "Reactivate" if target == "active" else "Suspend",
        danger=target == "suspended",
        name="status",
    )
    balance = accounts.storage.get_balance(customer.id)  # the customer was read with the page
    body = Markup(
        "<h1>Credits and status</h1>{}{}<h2>Grant credits</h2>{}<h2>Status</h2><p>Now: {}.</p>{}"
    ).format(
        done,
        html.definition_list(
            {"Balance": html.data("credits.balance", html.credits(balance.balance), balance.balance)}
        ),
        grant,
        Markup('<span class="status-{}" data-field="status">{}</span>').format(
            customer.status, customer.status
        ),
        status,
    )
    return html.page(ctx, title="Credits and status", current="", body=body)
