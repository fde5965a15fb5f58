"""The ``meterware`` command line: customers, keys, credits, usage, plans, the rollup worker and the demo."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from meterware.__about__ import __version__
from meterware.billing.accounts import Accounts
from meterware.config import EXPORT_PROVIDERS, AlertRules, Config, format_credits
from meterware.errors import MeterwareError
from meterware.rollup.metrics import add_metrics_arguments

Handler = Callable[[argparse.Namespace], int]


def _when(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _load_config(args: argparse.Namespace) -> Config:
    overrides = {"storage": args.storage} if getattr(args, "storage", None) else {}
    return Config.load(getattr(args, "config", None), **overrides)


def _accounts(args: argparse.Namespace) -> Accounts:
    config = _load_config(args)
    if config.storage.startswith("memory://") and args.command not in ("demo",):
        print(
            "meterware: note: memory:// keeps data only inside one process; "
            "pass --storage redis://... (or set METERWARE_STORAGE) to manage a real deployment",
            file=sys.stderr,
        )
    return Accounts.open(config)


def _emit(args: argparse.Namespace, data: Any, text: str) -> int:
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else text)
    return 0


# -- commands -----------------------------------------------------------------------------------------


def cmd_customers_create(args: argparse.Namespace) -> int:
    accounts = _accounts(args)
    customer = accounts.create_customer(args.customer, plan=args.plan, anchor=args.anchor)
    data = {"id": customer.id, "plan": customer.plan, "status": customer.status, "anchor": customer.anchor}
    return _emit(args, data, f"created customer {customer.id} on plan {customer.plan}")


def cmd_customers_show(args: argparse.Namespace) -> int:
    accounts = _accounts(args)
    customer = accounts.customer(args.customer)
    data = {"id": customer.id, "plan": customer.plan, "status": customer.status, "anchor": customer.anchor}
    anchor = _when(customer.anchor)
    text = f"{customer.id}: plan {customer.plan}, {customer.status}, periods anchored at {anchor}"
    external = accounts.external_ids(customer.id)
    if external:
        data["external_ids"] = external
        text += "\n  external ids: " + ", ".join(f"{p}={i}" for p, i in sorted(external.items()))
    return _emit(args, data, text)


def cmd_customers_list(args: argparse.Namespace) -> int:
    ids = _accounts(args).storage.list_customers()
    return _emit(args, ids, "\n".join(ids) or "(no customers)")


def cmd_customers_set(args: argparse.Namespace) -> int:
    accounts = _accounts(args)
    for pair in args.external_id or ():
        provider, equals, external_id = pair.partition("=")
        if not equals:
            raise MeterwareError(f"--external-id must be PROVIDER=ID (empty ID removes it), got {pair!r}")
        accounts.set_external_id(args.customer, provider, external_id)
    if args.plan:
        accounts.change_plan(args.customer, args.plan)
    if args.status:
        accounts.set_status(args.customer, args.status)
    return cmd_customers_show(args)


def cmd_keys_create(args: argparse.Namespace) -> int:
    key = _accounts(args).create_key(args.customer, live=not args.test)
    data = {"key": key.plaintext, "key_id": key.key_id, "prefix": key.prefix, "live": key.live}
    text = f"{key.plaintext}\n\nkey id {key.key_id}; this key is shown once - store it now."
    return _emit(args, data, text)


def cmd_keys_list(args: argparse.Namespace) -> int:
    records = _accounts(args).list_keys(args.customer)
    data = [
        {
            "key_id": r.key_id,
            "prefix": r.prefix,
            "live": r.live,
            "status": r.status,
            "created": r.created,
            "expires_ms": r.expires_ms,
        }
        for r in records
    ]
    lines = []
    for r in records:
        expires = f", expires {_when(r.expires_ms // 1000)}" if r.expires_ms else ""
        lines.append(f"{r.key_id}  {r.prefix}...  {'live' if r.live else 'test'}  {r.status}{expires}")
    return _emit(args, data, "\n".join(lines) or "(no keys)")


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    _accounts(args).revoke_key(args.key_id)
    return _emit(args, {"key_id": args.key_id, "status": "revoked"}, f"revoked {args.key_id}")


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    key = _accounts(args).rotate_key(args.key_id, grace_seconds=args.grace)
    data = {"key": key.plaintext, "key_id": key.key_id, "prefix": key.prefix, "replaces": args.key_id}
    text = (
        f"{key.plaintext}\n\nkey id {key.key_id} replaces {args.key_id}, which stops working in "
        f"{args.grace:g}s; this key is shown once - store it now."
    )
    return _emit(args, data, text)


def _actor(args: argparse.Namespace) -> str:
    """Who does it: --actor, else the OS user."""
    if args.actor:
        return str(args.actor)
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "cli"


def cmd_credits_grant(args: argparse.Namespace) -> int:
    expires_at = None
    if args.expires:
        try:
            when = datetime.fromisoformat(args.expires)
        except ValueError:
            raise MeterwareError(f"--expires must be an ISO 8601 time, got {args.expires!r}") from None
        expires_at = (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
    balance = _accounts(args).grant_credits(
        args.customer,
        args.amount,
        kind=args.kind,
        priority=args.priority,
        expires_at=expires_at,
        reason=args.reason,
        actor=_actor(args),
    )
    data = {"customer": args.customer, "balance_micros": balance.balance, "reserved_micros": balance.reserved}
    return _emit(args, data, f"{args.customer}: balance {format_credits(balance.balance)} credits")


def cmd_credits_show(args: argparse.Namespace) -> int:
    balance = _accounts(args).balance(args.customer)
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
    return _emit(args, data, text)


def cmd_credits_adjust(args: argparse.Namespace) -> int:
    accounts = _accounts(args)
    balance = accounts.adjust_credits(args.customer, args.amount, reason=args.reason, actor=_actor(args))
    data = {"customer": args.customer, "balance_micros": balance.balance, "reserved_micros": balance.reserved}
    return _emit(args, data, f"{args.customer}: balance {format_credits(balance.balance)} credits")


def cmd_credits_ledger(args: argparse.Namespace) -> int:
    accounts = _accounts(args)
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
        f"{_when(e.at_ms // 1000)}  {e.kind:<10} {format_credits(e.amount):>18}  "
        + "  ".join(part for part in (e.grant, e.ref, e.actor, e.reason) if part)
        for e in entries
    ]
    lines.append(f"balance {format_credits(sum(e.amount for e in entries))} credits")
    for lot in lots:
        expires = f", expires {_when(lot.expires_ms // 1000)}" if lot.expires_ms else ""
        state = " (expired)" if lot.expired else ""
        lines.append(
            f"  {lot.kind} {lot.id}: {format_credits(lot.remaining)} of {format_credits(lot.amount)} left, "
            f"priority {lot.priority}{expires}{state}"
        )
    return _emit(args, data, "\n".join(lines))


def cmd_credits_expire(args: argparse.Namespace) -> int:
    expired = _accounts(args).expire_credits(customer_id=args.customer, actor=_actor(args))
    data = [{"customer": c, "grant": g, "expired_micros": m} for c, g, m in expired]
    lines = [f"{c}: grant {g} expired, {format_credits(m)} credits removed" for c, g, m in expired]
    return _emit(args, data, "\n".join(lines) or "no grant to expire")


def cmd_events_void(args: argparse.Namespace) -> int:
    result = _accounts(args).void_event(
        args.event_id, reason=args.reason, actor=_actor(args), customer_id=args.customer
    )
    refunded = f" ({format_credits(result.credit)} credits refunded)" if result.credit else ""
    return _emit(args, result.as_dict(), result.message + refunded)


def cmd_events_amend(args: argparse.Namespace) -> int:
    units: dict[str, int] = {}
    for pair in args.units:
        meter, equals, value = pair.partition("=")
        if not equals or not value.isdigit():
            raise MeterwareError(f"--units must be METER=N (a whole number), got {pair!r}")
        units[meter] = int(value)
    result = _accounts(args).amend_event(
        args.event_id, units=units, reason=args.reason, actor=_actor(args), customer_id=args.customer
    )
    moved = f" ({format_credits(result.credit)} credits back)" if result.credit else ""
    return _emit(args, result.as_dict(), result.message + moved)


def cmd_events_import(args: argparse.Namespace) -> int:
    result = _accounts(args).import_events(args.file, fmt=args.format)
    text = f"{args.file}: {result.imported} events imported, {result.skipped} imported before (skipped)"
    return _emit(args, result.as_dict(), text)


def cmd_usage(args: argparse.Namespace) -> int:
    accounts = _accounts(args)
    at = time.time()
    if args.period == "previous":
        current = accounts.usage(args.customer, live=not args.test, at=at)
        at = current.period_start - 1
    elif args.period != "current":
        try:
            when = datetime.fromisoformat(args.period)
            at = (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
        except ValueError:
            raise MeterwareError(
                f"--period must be current, previous or a date like 2026-11-01, got {args.period!r}"
            ) from None
    report = accounts.usage(args.customer, live=not args.test, at=at)
    pending, complete = accounts.pending_events(args.customer)
    lines = [
        f"{report.customer} ({'live' if report.live else 'test'}) "
        f"{_when(report.period_start)} .. {_when(report.period_end)}",
        *(f"  {meter:<20} {value:>14}" for meter, value in report.meters.items()),
        "  calls: " + ", ".join(f"{outcome} {count}" for outcome, count in report.calls.items()),
        f"  spend: {format_credits(report.spend)} credits",
    ]
    if pending:
        # Usage is the rollup's: events still in the stream (of this customer's shard) are not in it yet.
        lines.append(
            f"  {'' if complete else 'at least '}{pending} events on {report.customer}'s shard wait for "
            "the rollup (meterware rollup): the figures above are behind"
        )
    data = {**report.as_dict(), "pending_events": pending, "pending_events_complete": complete}
    return _emit(args, data, "\n".join(lines))


def cmd_plans_list(args: argparse.Namespace) -> int:
    config = _load_config(args)
    data = {}
    lines = []
    for plan in config.plans.values():
        data[plan.name] = {
            "period": plan.period,
            "prepaid": plan.prepaid,
            "rate_limits": [f"{limit.amount}/{limit.seconds}s" for limit in plan.rate_limits],
            "meters": {
                name: {
                    "quota": terms.quota,
                    "quota_mode": "hard" if terms.hard else "soft",
                    "included": terms.included,
                    "price": format_credits(terms.price),
                    "pricing": plan.prices().meters[name].describe(),
                }
                for name, terms in plan.meters.items()
            },
            "currency": plan.currency,
            "base_fee": f"{plan.base_fee:f}",
            "minimum": f"{plan.minimum:f}",
        }
        limits = (
            ", ".join(f"{limit.amount}/{limit.seconds}s" for limit in plan.rate_limits) or "no rate limit"
        )
        lines.append(f"{plan.name}: per {plan.period}, {'prepaid' if plan.prepaid else 'invoiced'}, {limits}")
        for name, terms in plan.meters.items():
            quota = (
                "no quota"
                if terms.quota is None
                else f"{'hard' if terms.hard else 'soft'} quota {terms.quota}"
            )
            pricing = terms.pricing.describe() if terms.pricing else f"{format_credits(terms.price)} per unit"
            lines.append(f"  {name}: {quota}, {terms.included} included, {pricing}")
    return _emit(args, data, "\n".join(lines))


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
    accounts = _accounts(args)
    if args.period in ("current", "previous"):
        invoice = accounts.invoice(args.customer)
        if args.period == "previous":
            invoice = accounts.invoice(args.customer, at=invoice.period_start - 1)
    else:
        invoice = accounts.invoice(args.customer, at=_instant(args.period, "--period"))
    if args.csv:
        print(invoice.to_csv(), end="")
        return 0
    return _emit(args, invoice.as_dict(), invoice.to_text())


def cmd_periods_close(args: argparse.Namespace) -> int:
    at = time.time() - args.grace if args.at is None else _instant(args.at, "--at")
    closed = _accounts(args).close_periods(at=at, customer_id=args.customer)
    lines = [
        f"closed {invoice.id}: {_when(invoice.period_start)} .. {_when(invoice.period_end)}, "
        f"total {invoice.as_dict()['total']} {invoice.currency}"
        for invoice in closed
    ]
    return _emit(args, [invoice.as_dict() for invoice in closed], "\n".join(lines) or "(no period to close)")


def cmd_config_check(args: argparse.Namespace) -> int:
    path = args.file or args.config
    config = Config.load(path)
    text = (
        f"{path or 'configuration'}: ok ({len(config.meters)} meters, {len(config.plans)} plans, "
        f"storage {config.storage.split('://')[0]}://)"
    )
    return _emit(args, {"ok": True, "meters": sorted(config.meters), "plans": sorted(config.plans)}, text)


def _epoch(text: str | None, option: str) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        problem = "must be a date, a time like 2026-11-01T10:00 or epoch seconds"
        raise MeterwareError(f"{option} {problem}, got {text!r}") from None
    return int((when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp())


def cmd_export(args: argparse.Namespace) -> int:
    from meterware.billing.export import export_usage

    accounts = _accounts(args)
    since, until = _epoch(args.since, "--since"), _epoch(args.until, "--until")
    try:
        report = export_usage(
            accounts.config, accounts.storage, args.provider, since=since, until=until, dry_run=args.dry_run
        )
    finally:
        accounts.close()
    text = report.summary()
    if args.dry_run:
        lines = [
            f"  {r.event_id}  {r.name}  {r.external_id}  {r.value}  {_when(r.timestamp)}" for r in report.sent
        ]
        text = "\n".join([text, *lines])
    _emit(args, report.as_dict(), text)
    return 2 if report.rejected else 0


def _percents(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise MeterwareError(f"--quota-percent must be whole numbers like 50,80,100, got {text!r}") from None


def _amounts(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _rules_data(rules: AlertRules) -> dict[str, list[Any]]:
    return {
        "quota_percent": list(rules.quota_percent or ()),
        "credits_below": [format_credits(micros) for micros in rules.credits_below or ()],
        "spend_above": [format_credits(micros) for micros in rules.spend_above or ()],
    }


def _rules_text(customer: str, rules: AlertRules) -> str:
    data = _rules_data(rules)
    percents = ", ".join(f"{p}%" for p in data["quota_percent"]) or "none"
    return (
        f"{customer}: quota at {percents}; credits below {', '.join(data['credits_below']) or 'none'}; "
        f"spend above {', '.join(data['spend_above']) or 'none'}"
    )


def cmd_alerts_set(args: argparse.Namespace) -> int:
    accounts = _accounts(args)
    rules = accounts.set_alerts(
        args.customer,
        quota_percent=None if args.quota_percent is None else _percents(args.quota_percent),
        credits_below=None if args.credits_below is None else _amounts(args.credits_below),
        spend_above=None if args.spend_above is None else _amounts(args.spend_above),
        clear=args.clear,
    )
    if not accounts.config.alerts.enabled:
        note = "meterware: note: the configuration has no [alerts] section: nothing is evaluated"
        print(note, file=sys.stderr)
    return _emit(args, {"customer": args.customer, **_rules_data(rules)}, _rules_text(args.customer, rules))


def cmd_alerts_show(args: argparse.Namespace) -> int:
    rules = _accounts(args).alert_rules(args.customer)
    return _emit(args, {"customer": args.customer, **_rules_data(rules)}, _rules_text(args.customer, rules))


def cmd_alerts_list(args: argparse.Namespace) -> int:
    alerts = _accounts(args).alerts(args.customer, limit=args.limit)
    lines = [f"{_when(alert.created)}  {alert.describe()}" for alert in alerts]
    return _emit(args, [alert.as_dict() for alert in alerts], "\n".join(lines) or "(no alerts)")


def cmd_rollup(args: argparse.Namespace) -> int:
    from meterware.rollup import run_worker
    from meterware.rollup.metrics import metrics_options

    return run_worker(_load_config(args), once=args.once, metrics=metrics_options(args))


def cmd_demo(args: argparse.Namespace) -> int:
    from meterware.demo import run_demo

    return run_demo(storage=args.storage)


# -- parser -------------------------------------------------------------------------------------------


def _common_options(default: Any) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="FILE",
        default=default,
        help="TOML configuration (default: $METERWARE_CONFIG or ./meterware.toml)",
    )
    common.add_argument(
        "--storage", metavar="URL", default=default, help="storage URL, e.g. redis://localhost:6379/0"
    )
    common.add_argument(
        "--json", action="store_true", default=default or False, help="print machine-readable JSON"
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    # The options work before and after the command. The command's copies have no defaults, or they would
    # overwrite what was given before the command (`meterware --storage URL keys list acme`).
    common = _common_options(argparse.SUPPRESS)
    parser = argparse.ArgumentParser(
        prog="meterware", description="Sell access to your API.", parents=[_common_options(None)]
    )
    parser.add_argument("--version", action="version", version=f"meterware {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def group(name: str, help_text: str) -> argparse._SubParsersAction[argparse.ArgumentParser]:
        sub = commands.add_parser(name, help=help_text, parents=[common])
        return sub.add_subparsers(dest="action", required=True, metavar="ACTION")

    def command(
        parent: argparse._SubParsersAction[argparse.ArgumentParser],
        name: str,
        handler: Handler,
        help_text: str,
    ) -> argparse.ArgumentParser:
        sub = parent.add_parser(name, help=help_text, parents=[common])
        sub.set_defaults(handler=handler)
        return sub

    customers = group("customers", "create and inspect customers")
    sub = command(customers, "create", cmd_customers_create, "create a customer")
    sub.add_argument("customer")
    sub.add_argument("--plan", help="plan name (default: the config's default_plan)")
    sub.add_argument("--anchor", type=int, help="billing-period anchor, epoch seconds (default: now)")
    command(customers, "show", cmd_customers_show, "show a customer").add_argument("customer")
    command(customers, "list", cmd_customers_list, "list customer ids")
    sub = command(customers, "set", cmd_customers_set, "change a customer's plan or status")
    sub.add_argument("customer")
    sub.add_argument("--plan")
    sub.add_argument("--status", choices=["active", "suspended"])
    sub.add_argument(
        "--external-id",
        action="append",
        metavar="PROVIDER=ID",
        help="the customer's id at a billing provider, e.g. stripe=cus_123 (repeatable; stripe= removes it)",
    )

    keys = group("keys", "issue, list, revoke and rotate API keys")
    sub = command(keys, "create", cmd_keys_create, "issue a key (printed once)")
    sub.add_argument("customer")
    sub.add_argument("--test", action="store_true", help="a sandbox key: metered separately, never charged")
    command(keys, "list", cmd_keys_list, "list a customer's keys").add_argument("customer")
    command(keys, "revoke", cmd_keys_revoke, "revoke a key at once").add_argument("key_id")
    sub = command(keys, "rotate", cmd_keys_rotate, "issue a replacement key")
    sub.add_argument("key_id")
    sub.add_argument(
        "--grace", type=float, default=0.0, metavar="SECONDS", help="how long the old key keeps working"
    )

    credits = group("credits", "prepaid credit balances")
    sub = command(credits, "grant", cmd_credits_grant, "add credits")
    sub.add_argument("customer")
    sub.add_argument("amount", help="credits, e.g. 25 or 0.50")
    sub.add_argument(
        "--kind", choices=["grant", "purchase"], default="grant", help="promotional grant or paid purchase"
    )
    sub.add_argument("--priority", type=int, help="burn order, lower first (default: grant 10, purchase 50)")
    sub.add_argument("--expires", metavar="ISO", help="when what is left of it expires, e.g. 2026-12-31")
    sub.add_argument("--reason", default="", help="why (kept in the ledger)")
    sub.add_argument("--actor", help="who (default: the OS user)")
    sub = command(credits, "adjust", cmd_credits_adjust, "move the balance by a signed amount")
    sub.add_argument("customer")
    sub.add_argument("amount", help="credits, e.g. -2.50 or 1")
    sub.add_argument("--reason", required=True, help="why (kept in the ledger)")
    sub.add_argument("--actor", help="who (default: the OS user)")
    sub = command(credits, "ledger", cmd_credits_ledger, "every movement of the balance, and the grants")
    sub.add_argument("customer")
    sub = command(credits, "expire", cmd_credits_expire, "expire the grants whose time has come")
    sub.add_argument("--customer", help="only this customer")
    sub.add_argument("--actor", help="who (default: the OS user)")

    events = group("events", "correct and backfill usage events")
    for name, handler, help_text in (
        ("void", cmd_events_void, "take an event back (rollup and credits), once"),
        ("amend", cmd_events_amend, "change an event's sum meters (rollup and credits follow), once"),
    ):
        sub = command(events, name, handler, help_text)
        sub.add_argument("event_id")
        sub.add_argument("--reason", required=True, help="why (kept in the ledger)")
        sub.add_argument("--actor", help="who (default: the OS user)")
        sub.add_argument("--customer", help="the event's customer (searches only its shard)")
        if name == "amend":
            sub.add_argument(
                "--units", action="append", required=True, metavar="METER=N", help="the event's new units"
            )
    sub = command(events, "import", cmd_events_import, "backfill events from a JSONL or CSV file, once")
    sub.add_argument("file")
    sub.add_argument("--format", choices=["jsonl", "csv"], help="default: from the file's suffix")
    command(credits, "show", cmd_credits_show, "show balance and reserved credits").add_argument("customer")

    sub = commands.add_parser("usage", help="usage of a billing period", parents=[common])
    sub.set_defaults(handler=cmd_usage)
    sub.add_argument("customer")
    sub.add_argument("--period", default="current", help="current, previous, or a date inside the period")
    sub.add_argument("--test", action="store_true", help="sandbox (test key) usage")

    sub = commands.add_parser(
        "invoice", help="a billing period's invoice (running or closed)", parents=[common]
    )
    sub.set_defaults(handler=cmd_invoice)
    sub.add_argument("customer")
    sub.add_argument(
        "--period", default="current", help="current, previous, or a date or epoch seconds inside the period"
    )
    sub.add_argument("--csv", action="store_true", help="print CSV: one row per line, then the totals")

    periods = group("periods", "billing periods")
    sub = command(periods, "close", cmd_periods_close, "freeze the invoices of the periods that ended")
    sub.add_argument("--customer", help="only this customer (default: every customer)")
    sub.add_argument(
        "--grace",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="close only periods that ended this long ago",
    )
    sub.add_argument("--at", metavar="WHEN", help="close the periods that ended by then (epoch or date)")

    plans = group("plans", "the configured plans")
    command(plans, "list", cmd_plans_list, "list plans, limits and prices")

    config = group("config", "configuration files")
    command(config, "check", cmd_config_check, "validate a configuration file").add_argument(
        "file", nargs="?"
    )

    sub = commands.add_parser(
        "export", help="push usage to a billing provider ([export.PROVIDER])", parents=[common]
    )
    sub.set_defaults(handler=cmd_export)
    sub.add_argument("provider", choices=EXPORT_PROVIDERS)
    sub.add_argument("--since", help="first window to read (date, ISO time or epoch s; default: the cursor)")
    sub.add_argument("--until", help="read windows ending by then (default: now - settle_seconds)")
    sub.add_argument("--dry-run", action="store_true", help="print the events, send and record nothing")

    alerts = group("alerts", "alert thresholds and fired alerts")
    sub = command(alerts, "set", cmd_alerts_set, "set a customer's own thresholds (each replaces its plan's)")
    sub.add_argument("customer")
    sub.add_argument("--quota-percent", metavar="P,P", help="percentages of each quota, e.g. 80,100")
    sub.add_argument("--credits-below", metavar="C,C", help="prepaid balances in credits, e.g. 5 or 10,1")
    sub.add_argument("--spend-above", metavar="C,C", help="period spend in credits, e.g. 100")
    sub.add_argument("--clear", action="store_true", help="drop the customer's own thresholds first")
    sub = command(alerts, "show", cmd_alerts_show, "the thresholds in force for a customer")
    sub.add_argument("customer")
    sub = command(alerts, "list", cmd_alerts_list, "alerts fired, oldest first")
    sub.add_argument("--customer", help="only this customer's")
    sub.add_argument("--limit", type=int, default=50, help="at most this many, the latest (default 50)")

    sub = commands.add_parser("rollup", help="run the rollup worker", parents=[common])
    sub.set_defaults(handler=cmd_rollup)
    sub.add_argument("--once", action="store_true", help="drain the streams, then exit")
    add_metrics_arguments(sub)

    sub = commands.add_parser(
        "demo", help="run the demo: an API, customers, traffic, usage", parents=[common]
    )
    sub.set_defaults(handler=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.handler(args)
        return result
    except MeterwareError as error:
        print(f"meterware: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
