"""``meterware customers``."""

from __future__ import annotations

import argparse
import time

from meterware.billing.accounts import Accounts
from meterware.cli._common import Commands, actor, emit, open_accounts, utc_time
from meterware.cli._tools import _epoch
from meterware.config import format_credits
from meterware.config._overrides import TermsVersion, in_force, load_versions, plan_value
from meterware.errors import MeterwareError


def cmd_customers_create(args: argparse.Namespace) -> int:
    accounts = open_accounts(args)
    customer = accounts.create_customer(args.customer, plan=args.plan, anchor=args.anchor)
    data = {"id": customer.id, "plan": customer.plan, "status": customer.status, "anchor": customer.anchor}
    return emit(args, data, f"created customer {customer.id} on plan {customer.plan}")


def cmd_customers_show(args: argparse.Namespace) -> int:
    accounts = open_accounts(args)
    customer = accounts.customer(args.customer)
    data = {"id": customer.id, "plan": customer.plan, "status": customer.status, "anchor": customer.anchor}
    anchor = utc_time(customer.anchor)
    text = f"{customer.id}: plan {customer.plan}, {customer.status}, periods anchored at {anchor}"
    cap = accounts.spend_cap(customer.id)
    if cap is not None:
        data["spend_cap"] = format_credits(cap)
        whose = "the customer's own" if customer.spend_cap is not None else "the plan's"
        text += f"\n  spend cap: {format_credits(cap)} credits per period ({whose})"
    external = accounts.external_ids(customer.id)
    if external:
        data["external_ids"] = external
        text += "\n  external ids: " + ", ".join(f"{p}={i}" for p, i in sorted(external.items()))
    terms, history = _terms(accounts, customer.id)
    if history:
        data["terms"], data["overrides"] = terms, [version.as_dict() for version in history]
        text += "\n" + _terms_text(terms, history)
    return emit(args, data, text)


def _terms(accounts: Accounts, customer_id: str) -> tuple[dict[str, dict[str, str]], list[TermsVersion]]:
    """The customer's terms in force now (field -> its value and the plan's) and every kept version."""
    customer = accounts.customer(customer_id)
    history = load_versions(customer.terms)
    version, _ = in_force(history, time.time())
    plan = accounts.config.plan(customer.plan)
    overrides = version.overrides if version else {}
    terms = {field: {"value": value, "plan": plan_value(plan, field)} for field, value in overrides.items()}
    return terms, list(history)


def _terms_text(terms: dict[str, dict[str, str]], history: list[TermsVersion]) -> str:
    rows = [f"  {field} = {term['value']} (plan: {term['plan']})" for field, term in sorted(terms.items())]
    lines = ["  terms in force: " + ("the plan's" if not rows else ""), *rows, "  override history:"]
    for version in history:
        what = ", ".join(f"{field}={value}" for field, value in sorted(version.overrides.items()))
        lines.append(
            f"    from {utc_time(version.effective_from)}: {what or '(the plan terms)'}"
            f"  [set {utc_time(version.recorded_at)} by {version.actor}]"
        )
    return "\n".join(line.rstrip() for line in lines)


def cmd_customers_list(args: argparse.Namespace) -> int:
    ids = open_accounts(args).storage.list_customers()
    return emit(args, ids, "\n".join(ids) or "(no customers)")


def cmd_customers_set(args: argparse.Namespace) -> int:
    accounts = open_accounts(args)
    for pair in args.external_id or ():
        provider, equals, external_id = pair.partition("=")
        if not equals:
            raise MeterwareError(f"--external-id must be PROVIDER=ID (empty ID removes it), got {pair!r}")
        accounts.set_external_id(args.customer, provider, external_id)
    if args.plan:
        accounts.change_plan(args.customer, args.plan)
    if args.spend_cap is not None:
        accounts.set_spend_cap(args.customer, None if args.spend_cap == "none" else args.spend_cap)
    if args.status:
        accounts.set_status(args.customer, args.status, reason=args.reason or "", actor="cli")
    if args.override is not None:
        overrides = {}
        for pair in args.override:
            field, equals, value = pair.partition("=")
            if not equals or not field.strip():
                raise MeterwareError(f"--override must be TERM=VALUE, e.g. tokens.price=0.5, got {pair!r}")
            overrides[field.strip()] = value.strip()
        if args.effective == "period-start":
            accounts.set_overrides(args.customer, overrides, effective_from="period_start", actor=actor(args))
        else:
            effective = _epoch(args.effective, "--effective")
            accounts.set_overrides(args.customer, overrides, effective_from=effective, actor=actor(args))
    elif args.effective:
        raise MeterwareError("--effective goes with --override (or --no-overrides)")
    return cmd_customers_show(args)


def add_customers(commands: Commands) -> None:
    customers = commands.group("customers", "create and inspect customers")
    sub = customers.command("create", cmd_customers_create, "create a customer")
    sub.add_argument("customer")
    sub.add_argument("--plan", help="plan name (default: the config's default_plan)")
    sub.add_argument("--anchor", type=int, help="billing-period anchor, epoch seconds (default: now)")
    customers.command("show", cmd_customers_show, "show a customer").add_argument("customer")
    customers.command("list", cmd_customers_list, "list customer ids")
    sub = customers.command("set", cmd_customers_set, "change a customer's plan, status or own terms")
    sub.add_argument("customer")
    sub.add_argument("--plan")
    sub.add_argument("--status", choices=["active", "suspended"])
    sub.add_argument("--reason", help="why the status changes (kept in the customer's ledger)")
    sub.add_argument(
        "--spend-cap",
        metavar="CREDITS",
        help="the customer's spend cap per period, e.g. 50.00, in place of the plan's (none: the plan's)",
    )
    sub.add_argument(
        "--external-id",
        action="append",
        metavar="PROVIDER=ID",
        help="the customer's id at a billing provider, e.g. stripe=cus_123 (repeatable; stripe= removes it)",
    )
    terms = sub.add_mutually_exclusive_group()
    terms.add_argument(
        "--override",
        action="append",
        metavar="TERM=VALUE",
        help="the customer's own terms (repeatable; a full new set replaces the last): <meter>.price "
        "(credits), <meter>.included, <meter>.quota (or none), <meter>.quota_mode (hard/soft), "
        "<meter>{dim=value}.price and .included, "
        "rate_limits (e.g. 100/second,5000/minute or none), base_fee, minimum",
    )
    terms.add_argument(
        "--no-overrides",
        dest="override",
        action="store_const",
        const=[],
        help="back to the plan's terms (recorded as a new, empty version)",
    )
    sub.add_argument(
        "--effective",
        metavar="WHEN",
        help="when the terms take effect: epoch seconds or ISO time, rounded up to the hour "
        "(default: now, i.e. the next full hour; back at most to the current period's start), "
        "or period-start (the current period's start exactly)",
    )
    sub.add_argument("--actor", help="who (default: the OS user)")
