"""``meterware usage``, ``invoice`` and ``periods``: billing periods and what they cost."""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime

from meterware.billing.accounts import UsageHistory
from meterware.cli._common import Commands, emit, open_accounts, utc_time
from meterware.config import format_credits
from meterware.errors import MeterwareError
from meterware.events import OUTCOMES
from meterware.rollup.aggregate import REFUSAL_REASONS


def cmd_usage(args: argparse.Namespace) -> int:
    if args.window is not None:
        return _usage_history(args)
    if args.start is not None or args.end is not None or args.csv:
        raise MeterwareError("--from, --to and --csv need --window (minute, hour or day)")
    accounts = open_accounts(args)
    at = time.time()
    if args.period == "previous":
        current = accounts.usage(args.customer, live=not args.test, at=at)
        at = current.period_start - 1
    elif args.period not in (None, "current"):
        try:
            when = datetime.fromisoformat(args.period)
            at = (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
        except ValueError:
            raise MeterwareError(
                f"--period must be current, previous or a date like 2026-11-01, got {args.period!r}"
            ) from None
    report = accounts.usage(args.customer, live=not args.test, at=at)
    width = max([20, *map(len, report.meters)])  # sub-meters (``tokens{model=large}``) are longer
    lines = [
        f"{report.customer} ({'live' if report.live else 'test'}) "
        f"{utc_time(report.period_start)} .. {utc_time(report.period_end)}",
        *(f"  {meter:<{width}} {value:>14}" for meter, value in report.meters.items()),
        "  calls: " + ", ".join(f"{outcome} {count}" for outcome, count in report.calls.items()),
        *_refusals_line(report.refusals),
        f"  spend: {format_credits(report.spend)} credits",
    ]
    pending, complete = accounts.pending_events(args.customer)
    lines += _pending_note(args.customer, pending, complete)
    data = {**report.as_dict(), "pending_events": pending, "pending_events_complete": complete}
    return emit(args, data, "\n".join(lines))


def _refusals_line(refusals: dict[str, int]) -> list[str]:
    """A line with the rejected calls per reason, if any were rejected."""
    if not refusals:
        return []
    return ["  rejected by reason: " + ", ".join(f"{reason} {count}" for reason, count in refusals.items())]


def _pending_note(customer_id: str, pending: int, complete: bool) -> list[str]:
    """A line saying how many events wait for the rollup, if any (usage is the rollup's)."""
    if not pending:
        return []
    return [
        f"  {'' if complete else 'at least '}{pending} events on {customer_id}'s shard wait for "
        "the rollup (meterware rollup): the figures above are behind"
    ]


def _usage_history(args: argparse.Namespace) -> int:
    if args.period is not None:
        raise MeterwareError("--period and --window exclude each other (--from and --to choose the range)")
    if args.json and args.csv:
        raise MeterwareError("choose one of --json and --csv")
    start = None if args.start is None else _instant(args.start, "--from")
    end = None if args.end is None else _instant(args.end, "--to")
    accounts = open_accounts(args)
    history = accounts.usage_history(
        args.customer, window=args.window, start=start, end=end, live=not args.test
    )
    if args.csv:
        print(history.to_csv(), end="")
        return 0
    text = ""
    if not args.json:
        note = _pending_note(args.customer, *accounts.pending_events(args.customer))
        text = "\n".join([_history_table(history), *note])
    return emit(args, history.as_dict(), text)


def _history_table(history: UsageHistory) -> str:
    """A title, then one row per window: its start, each meter, the calls per outcome, the rejected calls
    per reason (a column per reason that occurred in the range) and the spend."""
    title = (
        f"{history.customer} ({'live' if history.live else 'test'}) by {history.window}, "
        f"{utc_time(history.start)} .. {utc_time(history.end)}"
    )
    shape = "%Y-%m-%d" if history.window == "day" else "%Y-%m-%d %H:%M"
    reasons = [reason for reason in REFUSAL_REASONS if any(p.refusals.get(reason) for p in history.points)]
    meters = history.points[0].meters if history.points else ()
    header = ["start (UTC)", *meters, *OUTCOMES, *(f"rejected:{reason}" for reason in reasons), "spend"]
    rows = [
        [
            datetime.fromtimestamp(point.start, UTC).strftime(shape),
            *map(str, point.meters.values()),
            *map(str, point.calls.values()),
            *(str(point.refusals.get(reason, 0)) for reason in reasons),
            format_credits(point.spend),
        ]
        for point in history.points
    ]
    widths = [max(map(len, column)) for column in zip(header, *rows, strict=True)]
    lines = [title]
    for row in (header, *rows):
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def _instant(text: str, option: str) -> float:
    """Epoch seconds, or an ISO date or time (UTC unless it names its zone)."""
    try:
        return float(int(text))
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise MeterwareError(
            f"{option} must be epoch seconds or a date like 2026-11-01, got {text!r}"
        ) from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def cmd_invoice(args: argparse.Namespace) -> int:
    if args.json and args.csv:
        raise MeterwareError("choose one of --json and --csv")
    accounts = open_accounts(args)
    if args.period in ("current", "previous"):
        invoice = accounts.invoice(args.customer)
        if args.period == "previous":
            invoice = accounts.invoice(args.customer, at=invoice.period_start - 1)
    else:
        invoice = accounts.invoice(args.customer, at=_instant(args.period, "--period"))
    if args.csv:
        print(invoice.to_csv(), end="")
        return 0
    return emit(args, invoice.as_dict(), invoice.to_text())


def cmd_periods_close(args: argparse.Namespace) -> int:
    at = time.time() - args.grace if args.at is None else _instant(args.at, "--at")
    closed = open_accounts(args).close_periods(at=at, customer_id=args.customer)
    lines = [
        f"closed {invoice.id}: {utc_time(invoice.period_start)} .. {utc_time(invoice.period_end)}, "
        f"total {invoice.as_dict()['total']} {invoice.currency}"
        for invoice in closed
    ]
    return emit(args, [invoice.as_dict() for invoice in closed], "\n".join(lines) or "(no period to close)")


def add_usage(commands: Commands) -> None:
    sub = commands.command("usage", cmd_usage, "usage of a billing period")
    sub.add_argument("customer")
    sub.add_argument("--period", help="current (the default), previous, or a date inside the period")
    sub.add_argument("--test", action="store_true", help="sandbox (test key) usage")
    sub.add_argument(
        "--window",
        choices=("minute", "hour", "day"),
        help="print the history window by window (default range: 2 hours, 48 hours, 90 days to now)",
    )
    sub.add_argument("--from", dest="start", metavar="WHEN", help="with --window: from then (epoch or date)")
    sub.add_argument(
        "--to", dest="end", metavar="WHEN", help="with --window: up to then, exclusive (default: now)"
    )
    sub.add_argument("--csv", action="store_true", help="with --window: print CSV, one row per window")


def add_invoice(commands: Commands) -> None:
    sub = commands.command("invoice", cmd_invoice, "a billing period's invoice (running or closed)")
    sub.add_argument("customer")
    sub.add_argument(
        "--period", default="current", help="current, previous, or a date or epoch seconds inside the period"
    )
    sub.add_argument("--csv", action="store_true", help="print CSV: one row per line, then the totals")


def add_periods(commands: Commands) -> None:
    periods = commands.group("periods", "billing periods")
    sub = periods.command("close", cmd_periods_close, "freeze the invoices of the periods that ended")
    sub.add_argument("--customer", help="only this customer (default: every customer)")
    sub.add_argument(
        "--grace",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="close only periods that ended this long ago",
    )
    sub.add_argument("--at", metavar="WHEN", help="close the periods that ended by then (epoch or date)")
