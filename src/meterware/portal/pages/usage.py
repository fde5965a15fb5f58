"""Usage over time: each meter by hour (48 hours), by day (90 days) and by billing period against the
plan's quota and included units; calls by outcome, and the refused calls by reason; a table of the same
numbers under each plot, and CSV.

Every number comes from the rollup's windows (:meth:`Accounts.usage_history`), so the page says what
``meterware usage CUSTOMER --window hour|day --json`` says.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Final

from markupsafe import Markup

from meterware.billing.accounts import UsageHistory
from meterware.events import OUTCOMES
from meterware.metering.periods import period_bounds, period_starts
from meterware.portal import html
from meterware.portal.charts import bar_chart
from meterware.portal.http import PortalRequest, PortalResponse
from meterware.rollup.aggregate import REFUSAL_REASONS

#: Billing periods plotted at most (their windows are kept for good).
PERIODS_SHOWN: Final = 12
WINDOWS: Final = {"hour": "by hour, last 48 hours", "day": "by day, last 90 days"}


def _table(
    caption: str, window: str, starts: Sequence[int], columns: dict[str, list[int]], name: str
) -> Markup:
    """The numbers of a plot, in a table folded under it (``<details>``: no script needed)."""
    label = html.when if window == "hour" else html.day
    rows = [
        (label(start), *(html.number(values[i]) for values in columns.values()))
        for i, start in enumerate(starts)
    ]
    table = html.table(
        caption, ["Start (UTC)", *columns], rows, numeric=range(1, len(columns) + 1), name=name
    )
    return Markup("<details><summary>Table: {}</summary>{}</details>").format(caption, table)


def _history_section(ctx: html.PageContext, history: UsageHistory) -> Markup:
    window = history.window
    starts = [point.start for point in history.points]
    parts = []
    for meter in ctx.config.meters:
        values = [point.meters[meter] for point in history.points]
        title = f"{meter} {WINDOWS[window]}"
        chart = bar_chart(
            title=title,
            unit=meter,
            window=window,
            starts=starts,
            series={meter: values},
            chart_id=f"{window}-{html.slug(meter) or 'meter'}",
        )
        parts.append(
            Markup('<figure class="chart" data-chart="{}-{}">{}</figure>{}').format(
                window, meter, chart, _table(title, window, starts, {meter: values}, f"{window}-{meter}")
            )
        )
    outcomes = {
        outcome.replace("_", " "): [point.calls[outcome] for point in history.points] for outcome in OUTCOMES
    }
    title = f"Calls by outcome {WINDOWS[window]}"
    chart = bar_chart(
        title=title,
        unit="calls",
        window=window,
        starts=starts,
        series=outcomes,
        chart_id=f"{window}-outcomes",
    )
    parts.append(
        Markup('<figure class="chart" data-chart="{}-outcomes">{}</figure>{}').format(
            window, chart, _table(title, window, starts, outcomes, f"{window}-outcomes")
        )
    )
    parts.append(_refusals_table(history))
    heading = "By hour" if window == "hour" else "By day"
    download = Markup('<p class="downloads"><a href="{}" download>Download CSV ({})</a></p>').format(
        ctx.url("/usage.csv", window=window), heading.lower()
    )
    return Markup("<h2>{}</h2>{}{}").format(heading, Markup("").join(parts), download)


def _refusals_table(history: UsageHistory) -> Markup:
    """The windows in which calls were refused, a column per reason that occurred (no plot: most windows
    have none, and the reasons are few)."""
    window = history.window
    reasons = [reason for reason in REFUSAL_REASONS if any(p.refusals.get(reason) for p in history.points)]
    label = html.when if window == "hour" else html.day
    rows = [
        (label(point.start), *(html.number(point.refusals.get(reason, 0)) for reason in reasons))
        for point in history.points
        if point.refusals
    ]
    return html.table(
        f"Refused calls by reason {WINDOWS[window]}",
        ["Start (UTC)", *(reason.replace("_", " ") for reason in reasons)],
        rows,
        numeric=range(1, len(reasons) + 1),
        name=f"{window}-refusals",
        empty="No call was refused in this range.",
    )


def _periods_section(ctx: html.PageContext) -> Markup:
    """Each chargeable meter per billing period, with the plan's quota and included units drawn."""
    customer = ctx.customer
    plan = ctx.config.plan_for(customer)
    current = period_bounds(customer.anchor, plan.period, time.time())[0]
    starts = period_starts(customer.anchor, plan.period, current, 0, PERIODS_SHOWN)[::-1]
    if not starts:  # the customer's first period is ahead
        return Markup("")
    windows = ctx.accounts.storage.read_usage_windows(customer.id, True, "period", starts)
    parts = []
    for meter, spec in ctx.config.meters.items():
        if not spec.chargeable:
            continue
        values = [totals.get(meter, 0) for totals in windows]
        terms = plan.meters.get(meter)
        lines: list[tuple[str, float]] = []
        if terms is not None and terms.quota is not None:
            lines.append(("quota", terms.quota))
        if terms is not None and terms.included:
            lines.append(("included", terms.included))
        title = f"{meter} per billing period"
        chart = bar_chart(
            title=title,
            unit=meter,
            window="day",
            starts=starts,
            series={meter: values},
            lines=lines,
            chart_id=f"period-{html.slug(meter) or 'meter'}",
            per="billing period",
        )
        parts.append(
            Markup('<figure class="chart" data-chart="period-{}">{}</figure>{}').format(
                meter, chart, _table(title, "day", starts, {meter: values}, f"period-{meter}")
            )
        )
    return Markup("<h2>By billing period</h2><p>The last bar is the period running now.</p>{}").format(
        Markup("").join(parts)
    )


def show(ctx: html.PageContext, request: PortalRequest) -> PortalResponse:
    """The plots and tables: per billing period, by hour, by day."""
    accounts = ctx.accounts
    hours = accounts.usage_history(ctx.customer.id, window="hour")
    days = accounts.usage_history(ctx.customer.id, window="day")
    body = Markup(
        "<h1>Usage over time</h1><p>Times are UTC. Usage trails calls by the rollup's few seconds.</p>{}{}{}"
    ).format(_periods_section(ctx), _history_section(ctx, hours), _history_section(ctx, days))
    return html.page(ctx, title="Usage", current="/usage", body=body)


def download(ctx: html.PageContext, request: PortalRequest) -> PortalResponse:
    """The hourly (48 hours) or daily (90 days) history as CSV, as ``meterware usage --csv`` writes it."""
    window = request.query.get("window", "hour")
    if window not in WINDOWS:
        return html.message_page(ctx.root, 400, "Bad request", "window must be hour or day.")
    history = ctx.accounts.usage_history(ctx.customer.id, window=window)
    filename = f"usage-{ctx.customer.id}-{window}.csv"
    return PortalResponse(
        200,
        history.to_csv().encode(),
        "text/csv; charset=utf-8",
        [("Content-Disposition", f'attachment; filename="{filename}"')],
    )
