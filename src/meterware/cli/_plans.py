"""``meterware plans``: the config file's plans, and those stored in the backend (set, list, show)."""

from __future__ import annotations

import argparse
import sys
import tomllib
from typing import Any

from meterware.billing.accounts import Accounts
from meterware.cli._common import Commands, actor, emit, load_config, open_accounts, utc_time
from meterware.config import Config, Plan, format_credits
from meterware.config._stored import PlanVersion
from meterware.errors import MeterwareError, StorageError


def _more_limits(plan: Plan, data: dict[str, Any]) -> str:
    """A plan's route limits, concurrency cap and spend cap: into ``data`` and as text (only those set)."""
    text = ""
    if plan.route_limits:
        data["route_limits"] = {glob: [str(limit) for limit in limits] for glob, limits in plan.route_limits}
        for glob, limits in plan.route_limits:
            text += f", {glob} " + " ".join(map(str, limits))
    if plan.concurrency:
        data["concurrency"] = plan.concurrency
        text += f", {plan.concurrency} in flight"
    if plan.spend_cap is not None:
        data["spend_cap"] = format_credits(plan.spend_cap)
        text += f", spend cap {format_credits(plan.spend_cap)}"
    return text


def _describe(plan: Plan, note: str = "") -> tuple[dict[str, Any], list[str]]:
    """A plan as data and as text lines (``note``: said after its first line)."""
    data: dict[str, Any] = {
        "period": plan.period,
        "prepaid": plan.prepaid,
        "rate_limits": [str(limit) for limit in plan.rate_limits],
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
    limits = ", ".join(map(str, plan.rate_limits)) or "no rate limit"
    limits += _more_limits(plan, data)
    billing = "prepaid" if plan.prepaid else "invoiced"
    lines = [f"{plan.name}: per {plan.period}, {billing}, {limits}{note}"]
    for name, terms in plan.meters.items():
        quota = (
            "no quota" if terms.quota is None else f"{'hard' if terms.hard else 'soft'} quota {terms.quota}"
        )
        pricing = terms.pricing.describe() if terms.pricing else f"{format_credits(terms.price)} per unit"
        lines.append(f"  {name}: {quota}, {terms.included} included, {pricing}")
    return data, lines


def _stored(config: Config) -> Accounts | None:
    """The accounts to read stored plans with; None (said on stderr) when the backend cannot be read."""
    if config.storage.startswith("memory://"):
        return None  # nothing outlives a process there
    accounts = Accounts.open(config)
    try:
        accounts.refresh_plans(force=True)
    except StorageError as error:
        print(f"meterware: note: stored plans not read ({error})", file=sys.stderr)
        accounts.close()
        return None
    return accounts


def _version_note(version: PlanVersion, number: int) -> str:
    return f" (stored, version {number} by {version.actor} at {utc_time(version.recorded_at)})"


def cmd_plans_list(args: argparse.Namespace) -> int:
    config = load_config(args)
    data: dict[str, Any] = {}
    lines: list[str] = []
    for plan in config.plans.values():
        data[plan.name], text = _describe(plan)
        lines += text
    accounts = _stored(config)
    if accounts is not None:
        for name, plan in sorted(config.stored.plans.items()):
            try:
                history = accounts.plan_history(name)
            except MeterwareError as error:  # a record spoiled since: the last good plan is shown
                history = []
                print(f"meterware: note: {error}", file=sys.stderr)
            note = _version_note(history[-1], len(history)) if history else " (stored)"
            data[name], text = _describe(plan, note)
            data[name]["stored"] = history[-1].as_dict() | {"version": len(history)} if history else {}
            lines += text
        accounts.close()
    return emit(args, data, "\n".join(lines))


def cmd_plans_show(args: argparse.Namespace) -> int:
    accounts = open_accounts(args)
    config = accounts.config
    if args.plan in config.plans:
        data, lines = _describe(config.plans[args.plan], " (config file)")
        return emit(args, {"name": args.plan, "source": "config", "plan": data}, "\n".join(lines))
    history = accounts.plan_history(args.plan)
    plan = accounts.stored_plans().get(args.plan)
    data, lines = _describe(plan, _version_note(history[-1], len(history))) if plan else ({}, [])
    if plan is None:
        lines.append(f"{args.plan}: the stored record does not parse (see the log); its history:")
    lines.append("  history:")
    for number, version in enumerate(history, 1):
        lines.append(
            f"    {number}. {utc_time(version.recorded_at)} by {version.actor}: {dict(version.table)}"
        )
    shown = {"name": args.plan, "source": "stored", "plan": data, "history": [v.as_dict() for v in history]}
    return emit(args, shown, "\n".join(lines))


def cmd_plans_set(args: argparse.Namespace) -> int:
    try:
        with open(args.file, "rb") as file:
            table = tomllib.load(file)
    except OSError as error:
        raise MeterwareError(f"{args.file}: cannot be read ({error.strerror})") from None
    except ValueError as error:
        raise MeterwareError(f"{args.file}: is not valid TOML ({error})") from None
    accounts = open_accounts(args)
    version = accounts.set_plan(args.plan, table, actor=actor(args))
    number = len(accounts.plan_history(args.plan))
    text = f"stored plan {args.plan} (version {number}, by {version.actor}); processes see it within "
    text += f"{accounts.config.policy.key_cache_ttl:g}s (policy.key_cache_ttl)"
    return emit(args, version.as_dict() | {"name": args.plan, "version": number}, text)


def add_plans(commands: Commands) -> None:
    plans = commands.group("plans", "the config file's plans and the stored ones")
    plans.command("list", cmd_plans_list, "list plans, limits and prices")
    plans.command("show", cmd_plans_show, "show a plan (a stored one with its history)").add_argument("plan")
    sub = plans.command("set", cmd_plans_set, "store a new version of a plan (no restart needed)")
    sub.add_argument("plan")
    sub.add_argument(
        "--file",
        required=True,
        metavar="PLAN.toml",
        help="the plan's table, as under [plans.NAME] in the config file (prepaid = true, [meters.calls])",
    )
    sub.add_argument("--actor", help="who (default: the OS user)")
