"""``meterware credits`` and ``meterware events`` (corrections and backfills)."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

from meterware.cli._common import Commands, actor, emit, open_accounts, utc_time
from meterware.config import format_credits
from meterware.errors import MeterwareError


def cmd_credits_grant(args: argparse.Namespace) -> int:
    expires_at = None
    if args.expires:
        try:
            when = datetime.fromisoformat(args.expires)
        except ValueError:
            raise MeterwareError(f"--expires must be an ISO 8601 time, got {args.expires!r}") from None
        expires_at = (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
    balance = open_accounts(args).grant_credits(
        args.customer,
        args.amount,
        kind=args.kind,
        priority=args.priority,
        expires_at=expires_at,
        reason=args.reason,
        actor=actor(args),
    )
    data = {"customer": args.customer, "balance_micros": balance.balance, "reserved_micros": balance.reserved}
    return emit(args, data, f"{args.customer}: balance {format_credits(balance.balance)} credits")


def cmd_credits_show(args: argparse.Namespace) -> int:
    balance = open_accounts(args).balance(args.customer)
    data = {
        "customer": args.customer,
        "balance": format_credits(balance.balance),
        "reserved": format_credits(balance.reserved),
        "available": format_credits(balance.available),
        "balance_micros": balance.balance,
        "reserved_micros": balance.reserved,
    }
    text = (
        f"{args.customer}: balance {format_credits(balance.balance)}, "
        f"reserved {format_credits(balance.reserved)}, available {format_credits(balance.available)} credits"
    )
    return emit(args, data, text)


def cmd_credits_adjust(args: argparse.Namespace) -> int:
    accounts = open_accounts(args)
    balance = accounts.adjust_credits(args.customer, args.amount, reason=args.reason, actor=actor(args))
    data = {"customer": args.customer, "balance_micros": balance.balance, "reserved_micros": balance.reserved}
    return emit(args, data, f"{args.customer}: balance {format_credits(balance.balance)} credits")


def cmd_credits_ledger(args: argparse.Namespace) -> int:
    accounts = open_accounts(args)
    entries = accounts.ledger(args.customer)
    lots = accounts.grants(args.customer)
    data = {
        "customer": args.customer,
        "entries": [
            {
                "id": e.id,
                "at_ms": e.at_ms,
                "kind": e.kind,
                "amount": format_credits(e.amount),
                "amount_micros": e.amount,
                "grant": e.grant,
                "actor": e.actor,
                "reason": e.reason,
                "ref": e.ref,
            }
            for e in entries
        ],
        "grants": [lot.as_dict() for lot in lots],
        "balance_micros": sum(e.amount for e in entries),
    }
    lines = [
        f"{utc_time(e.at_ms // 1000)}  {e.kind:<10} {format_credits(e.amount):>18}  "
        + "  ".join(part for part in (e.grant, e.ref, e.actor, e.reason) if part)
        for e in entries
    ]
    lines.append(f"balance {format_credits(sum(e.amount for e in entries))} credits")
    for lot in lots:
        expires = f", expires {utc_time(lot.expires_ms // 1000)}" if lot.expires_ms else ""
        state = " (expired)" if lot.expired else ""
        lines.append(
            f"  {lot.kind} {lot.id}: {format_credits(lot.remaining)} of {format_credits(lot.amount)} left, "
            f"priority {lot.priority}{expires}{state}"
        )
    return emit(args, data, "\n".join(lines))


def cmd_credits_expire(args: argparse.Namespace) -> int:
    expired = open_accounts(args).expire_credits(customer_id=args.customer, actor=actor(args))
    data = [{"customer": c, "grant": g, "expired_micros": m} for c, g, m in expired]
    lines = [f"{c}: grant {g} expired, {format_credits(m)} credits removed" for c, g, m in expired]
    return emit(args, data, "\n".join(lines) or "no grant to expire")


def cmd_events_void(args: argparse.Namespace) -> int:
    result = open_accounts(args).void_event(
        args.event_id, reason=args.reason, actor=actor(args), customer_id=args.customer
    )
    refunded = f" ({format_credits(result.credit)} credits refunded)" if result.credit else ""
    return emit(args, result.as_dict(), result.message + refunded)


def cmd_events_amend(args: argparse.Namespace) -> int:
    units: dict[str, int] = {}
    for pair in args.units:
        meter, equals, value = pair.partition("=")
        if not equals or not value.isdigit():
            raise MeterwareError(f"--units must be METER=N (a whole number), got {pair!r}")
        units[meter] = int(value)
    result = open_accounts(args).amend_event(
        args.event_id, units=units, reason=args.reason, actor=actor(args), customer_id=args.customer
    )
    moved = f" ({format_credits(result.credit)} credits back)" if result.credit else ""
    return emit(args, result.as_dict(), result.message + moved)


def cmd_events_import(args: argparse.Namespace) -> int:
    result = open_accounts(args).import_events(args.file, fmt=args.format)
    text = f"{args.file}: {result.imported} events imported, {result.skipped} imported before (skipped)"
    return emit(args, result.as_dict(), text)


def add_credits(commands: Commands) -> None:
    credits = commands.group("credits", "prepaid credit balances")
    sub = credits.command("grant", cmd_credits_grant, "add credits")
    sub.add_argument("customer")
    sub.add_argument("amount", help="credits, e.g. 25 or 0.50")
    sub.add_argument(
        "--kind", choices=["grant", "purchase"], default="grant", help="promotional grant or paid purchase"
    )
    sub.add_argument("--priority", type=int, help="burn order, lower first (default: grant 10, purchase 50)")
    sub.add_argument("--expires", metavar="ISO", help="when what is left of it expires, e.g. 2026-12-31")
    sub.add_argument("--reason", default="", help="why (kept in the ledger)")
    sub.add_argument("--actor", help="who (default: the OS user)")
    sub = credits.command("adjust", cmd_credits_adjust, "move the balance by a signed amount")
    sub.add_argument("customer")
    sub.add_argument("amount", help="credits, e.g. -2.50 or 1")
    sub.add_argument("--reason", required=True, help="why (kept in the ledger)")
    sub.add_argument("--actor", help="who (default: the OS user)")
    sub = credits.command("ledger", cmd_credits_ledger, "every movement of the balance, and the grants")
    sub.add_argument("customer")
    sub = credits.command("expire", cmd_credits_expire, "expire the grants whose time has come")
    sub.add_argument("--customer", help="only this customer")
    sub.add_argument("--actor", help="who (default: the OS user)")

    credits.command("show", cmd_credits_show, "show balance and reserved credits").add_argument("customer")


def add_events(commands: Commands) -> None:
    events = commands.group("events", "correct and backfill usage events")
    for name, handler, help_text in (
        ("void", cmd_events_void, "take an event back (rollup and credits), once"),
        ("amend", cmd_events_amend, "change an event's sum meters (rollup and credits follow), once"),
    ):
        sub = events.command(name, handler, help_text)
        sub.add_argument("event_id")
        sub.add_argument("--reason", required=True, help="why (kept in the ledger)")
        sub.add_argument("--actor", help="who (default: the OS user)")
        sub.add_argument("--customer", help="the event's customer (searches only its shard)")
        if name == "amend":
            sub.add_argument(
                "--units", action="append", required=True, metavar="METER=N", help="the event's new units"
            )
    sub = events.command("import", cmd_events_import, "backfill events from a JSONL or CSV file, once")
    sub.add_argument("file")
    sub.add_argument("--format", choices=["jsonl", "csv"], help="default: from the file's suffix")
