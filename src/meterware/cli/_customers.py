"""``meterware customers``."""

from __future__ import annotations

import argparse

from meterware.cli._common import Commands, emit, open_accounts, utc_time
from meterware.config import format_credits
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
    return emit(args, data, text)


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
    return cmd_customers_show(args)


def add_customers(commands: Commands) -> None:
    customers = commands.group("customers", "create and inspect customers")
    sub = customers.command("create", cmd_customers_create, "create a customer")
    sub.add_argument("customer")
    sub.add_argument("--plan", help="plan name (default: the config's default_plan)")
    sub.add_argument("--anchor", type=int, help="billing-period anchor, epoch seconds (default: now)")
    customers.command("show", cmd_customers_show, "show a customer").add_argument("customer")
    customers.command("list", cmd_customers_list, "list customer ids")
    sub = customers.command("set", cmd_customers_set, "change a customer's plan or status")
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
