"""``meterware alerts``: a customer's own thresholds and destinations, and the alerts fired."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from meterware.billing.accounts import Accounts
from meterware.billing.destinations import AlertDestinations, check_email, check_webhook_url
from meterware.cli._common import Commands, emit, open_accounts, utc_time
from meterware.config import AlertRules, format_credits
from meterware.errors import MeterwareError


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


def _rules_text(customer: str, rules: AlertRules, notify: AlertDestinations) -> str:
    data = _rules_data(rules)
    percents = ", ".join(f"{p}%" for p in data["quota_percent"]) or "none"
    return (
        f"{customer}: quota at {percents}; credits below {', '.join(data['credits_below']) or 'none'}; "
        f"spend above {', '.join(data['spend_above']) or 'none'}; "
        f"notify email {notify.email or 'none'}, webhook {notify.webhook_url or 'none'}"
    )


def _emit_settings(args: argparse.Namespace, accounts: Accounts, rules: AlertRules) -> int:
    notify = accounts.alert_destinations(args.customer)
    data = {"customer": args.customer, **_rules_data(rules), "notify": notify.as_dict()}
    return emit(args, data, _rules_text(args.customer, rules, notify))


def cmd_alerts_set(args: argparse.Namespace) -> int:
    accounts = open_accounts(args)
    # Checked before anything is stored: a bad address leaves the thresholds as they were too.
    if args.email:
        check_email(args.email)
    if args.webhook_url:
        check_webhook_url(args.webhook_url)
    thresholds = (args.quota_percent, args.credits_below, args.spend_above)
    if args.clear or any(value is not None for value in thresholds):
        rules = accounts.set_alerts(
            args.customer,
            quota_percent=None if args.quota_percent is None else _percents(args.quota_percent),
            credits_below=None if args.credits_below is None else _amounts(args.credits_below),
            spend_above=None if args.spend_above is None else _amounts(args.spend_above),
            clear=args.clear,
        )
    else:
        rules = accounts.alert_rules(args.customer)
    if args.email is not None or args.webhook_url is not None:
        accounts.set_alert_destinations(args.customer, email=args.email, webhook_url=args.webhook_url)
    if not accounts.config.alerts.enabled:
        note = "meterware: note: the configuration has no [alerts] section: nothing is evaluated"
        print(note, file=sys.stderr)
    return _emit_settings(args, accounts, rules)


def cmd_alerts_show(args: argparse.Namespace) -> int:
    accounts = open_accounts(args)
    return _emit_settings(args, accounts, accounts.alert_rules(args.customer))


def cmd_alerts_list(args: argparse.Namespace) -> int:
    alerts = open_accounts(args).alerts(args.customer, limit=args.limit)
    lines = [f"{utc_time(alert.created)}  {alert.describe()}" for alert in alerts]
    return emit(args, [alert.as_dict() for alert in alerts], "\n".join(lines) or "(no alerts)")


def add_alerts(commands: Commands) -> None:
    alerts = commands.group("alerts", "alert thresholds and fired alerts")
    sub = alerts.command("set", cmd_alerts_set, "set a customer's own thresholds (each replaces its plan's)")
    sub.add_argument("customer")
    sub.add_argument("--quota-percent", metavar="P,P", help="percentages of each quota, e.g. 80,100")
    sub.add_argument("--credits-below", metavar="C,C", help="prepaid balances in credits, e.g. 5 or 10,1")
    sub.add_argument("--spend-above", metavar="C,C", help="period spend in credits, e.g. 100")
    sub.add_argument("--clear", action="store_true", help="drop the customer's own thresholds first")
    sub.add_argument(
        "--email", metavar="ADDRESS", help="where the customer wants alerts emailed ('' removes it)"
    )
    sub.add_argument(
        "--webhook-url",
        metavar="URL",
        help="the customer's own https endpoint for alerts ('' removes it); meterware never calls it: "
        "the alerts webhook carries both as notify",
    )
    sub = alerts.command("show", cmd_alerts_show, "the thresholds in force and destinations of a customer")
    sub.add_argument("customer")
    sub = alerts.command("list", cmd_alerts_list, "alerts fired, oldest first")
    sub.add_argument("--customer", help="only this customer's")
    sub.add_argument("--limit", type=int, default=50, help="at most this many, the latest (default 50)")
