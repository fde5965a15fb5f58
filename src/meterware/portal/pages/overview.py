"""The overview: this period's usage against what the plan includes and allows, spend so far and where
the period is heading, the credit balance, the spend cap, the customer's own terms, the rate limits and
the latest alerts. It reloads itself."""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Final

from markupsafe import Markup

from meterware.billing.pricing import money
from meterware.config._overrides import in_force, load_versions, plan_value
from meterware.metering.admission import rate_limit_name
from meterware.portal import html
from meterware.portal.http import PortalRequest, PortalResponse
from meterware.portal.pages import spend_cap
from meterware.portal.pages.alerts import fired_row

#: Seconds between the page's reloads (the rollup's lag is a few seconds).
REFRESH_SECONDS: Final = 30
#: Alerts listed on the overview (the Alerts page lists more).
LATEST_ALERTS: Final = 5


def projected_quantities(
    used: dict[str, int], hard_quotas: dict[str, int], start: int, end: int, now: float
) -> dict[str, int]:
    """Usage at the period's end if it goes on at the pace so far (the usage itself before a minute in),
    never past a hard quota: calls beyond it are refused, so never billed."""
    elapsed = now - start
    if elapsed < 60 or now >= end:
        return dict(used)
    factor = (end - start) / elapsed
    projected = {meter: round(units * factor) for meter, units in used.items()}
    return {meter: min(units, hard_quotas.get(meter, units)) for meter, units in projected.items()}


def show(ctx: html.PageContext, request: PortalRequest) -> PortalResponse:
    """The overview of the period running now."""
    accounts, customer = ctx.accounts, ctx.customer
    plan = ctx.config.plan_for(customer)
    report = accounts.usage(customer.id)
    now = time.time()
    period = Markup("{} to {}, {} days left").format(
        html.day(report.period_start),
        html.day(report.period_end),
        max(0, int((report.period_end - now) // 86_400)),
    )
    cards = []
    for meter, used in report.meters.items():
        terms = plan.meters.get(meter)
        limit = terms.quota if terms is not None else None
        included = terms.included if terms is not None else 0
        lines = [Markup("{} used").format(html.data(f"usage.{meter}.used", html.number(used), used))]
        if included:
            lines.append(
                Markup("{} included").format(
                    html.data(f"usage.{meter}.included", html.number(included), included)
                )
            )
        gauge = Markup("")
        if limit is not None:
            mode = "hard" if terms is not None and terms.hard else "soft"
            lines.append(
                Markup("quota {} ({})").format(
                    html.data(f"usage.{meter}.quota", html.number(limit), limit), mode
                )
            )
            gauge = Markup(
                '<meter min="0" max="{}" value="{}" aria-label="{} used of the quota">{}%</meter>'
            ).format(limit, min(used, limit), meter, round(100 * used / limit) if limit else 100)
        cards.append(
            Markup(
                '<section class="card"><h3>{}</h3><div class="big">{}</div>{}'
                '<div class="sub">{}</div></section>'
            ).format(meter, html.number(used), gauge, Markup("<br>").join(lines))
        )
    invoice = accounts.invoice(customer.id) if report.period_end > customer.anchor else None
    money_cards = []
    if invoice is not None:
        hard = {
            meter: terms.quota
            for meter, terms in plan.meters.items()
            if terms.hard and terms.quota is not None
        }
        at_pace = projected_quantities(report.meters, hard, report.period_start, report.period_end, now)
        projected = plan.prices().lines(at_pace)
        projection = sum((line.amount for line in projected), Decimal(0))
        money_cards.append(
            Markup(
                '<section class="card"><h3>Spend this period</h3><div class="big">{} {}</div>'
                '<div class="sub">projected for the period: {} {}</div></section>'
            ).format(
                html.data("invoice.subtotal", money(invoice.subtotal, invoice.decimals)),
                invoice.currency,
                html.data("invoice.projected", money(projection, invoice.decimals)),
                invoice.currency,
            )
        )
    if plan.prepaid:
        balance = accounts.storage.get_balance(customer.id)  # the customer was read with the page
        money_cards.append(
            Markup(
                '<section class="card"><h3>Credit balance</h3><div class="big">{}</div>'
                '<div class="sub">{} reserved by calls in flight, {} available</div></section>'
            ).format(
                html.data("credits.balance", html.credits(balance.balance), balance.balance),
                html.data("credits.reserved", html.credits(balance.reserved), balance.reserved),
                html.data("credits.available", html.credits(balance.available), balance.available),
            )
        )
    money_cards.append(
        Markup(
            '<section class="card"><h3>Charged from credits</h3><div class="big">{}</div>'
            '<div class="sub">credits spent on calls this period</div></section>'
        ).format(html.data("spend", html.credits(report.spend), report.spend))
    )
    money_cards.append(spend_cap.card(ctx, report.spend))
    outcome_rows = []
    for outcome, n in report.calls.items():
        outcome_rows.append((outcome.replace("_", " "), html.data(f"calls.{outcome}", html.number(n), n)))
        if outcome == "rejected":
            outcome_rows += [
                (
                    Markup('<span class="reason">rejected: {}</span>').format(reason.replace("_", " ")),
                    html.data(f"refusals.{reason}", html.number(refused), refused),
                )
                for reason, refused in report.refusals.items()
            ]
    calls = html.table(
        "Calls this period by outcome", ["Outcome", "Calls"], outcome_rows, numeric=[1], name="calls"
    )
    limits = html.table(
        "Rate limits",
        ["Limit", "Calls", "Per"],
        [
            (rate_limit_name(limit.seconds), html.number(limit.amount), f"{limit.seconds:g} s")
            for limit in plan.rate_limits
        ],
        numeric=[1, 2],
        name="rate-limits",
        empty="No rate limits on this plan.",
    )
    own_terms = _terms_section(ctx, now)
    fired = reversed(accounts.alerts(customer.id, limit=LATEST_ALERTS))
    alerts = html.table(
        "Latest alerts",
        ["When", "Alert", "Threshold", "Value", "Billing period from"],
        [fired_row(alert) for alert in fired],
        name="alerts",
        empty="No alert has fired.",
    )
    status = Markup("")
    if customer.status != "active":
        status = html.notice(
            "This account is suspended: calls are refused. Contact the seller.", kind="error"
        )
    body = Markup(
        '<h1>Overview</h1>{}<p class="period">Billing period: {}. As of {} (updates every {} seconds; usage '
        "trails calls by the rollup's few seconds).</p>"
        '<h2>Usage</h2><div class="cards">{}</div><h2>Money</h2><div class="cards">{}</div>{}{}{}{}'
    ).format(
        status,
        period,
        html.when(now),
        REFRESH_SECONDS,
        Markup("").join(cards),
        Markup("").join(money_cards),
        own_terms,
        calls,
        limits,
        alerts,
    )
    return html.page(ctx, title="Overview", current="/", body=body, refresh=REFRESH_SECONDS)


def _terms_section(ctx: html.PageContext, now: float) -> Markup:
    """The customer's negotiated terms in force now, each next to the plan's (nothing without any)."""
    version, _ = in_force(load_versions(ctx.customer.terms), now)
    if version is None or not version.overrides:
        return Markup("")
    plan = ctx.config.plan(ctx.customer.plan)
    rows = [
        (field, html.data(f"terms.{field}", value), plan_value(plan, field))
        for field, value in sorted(version.overrides.items())
    ]
    return html.table(
        f"Your terms (in force since {html.when(version.effective_from)})",
        ["Term", "Yours", "Plan's"],
        rows,
        name="terms",
    )
