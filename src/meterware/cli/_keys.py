"""``meterware keys``: issue, import, list, show, revoke and rotate API keys."""

from __future__ import annotations

import argparse
import time
from typing import Any

from meterware.cli._common import Commands, duration, emit, open_accounts, utc_time
from meterware.errors import MeterwareError
from meterware.metering.records import KeyRecord


def _terms(args: argparse.Namespace) -> dict[str, Any]:
    """The terms of a key given by the options of ``keys create`` and ``keys import``."""
    metadata = {}
    for pair in args.meta or ():
        name, equals, value = pair.partition("=")
        if not equals:
            raise MeterwareError(f"--meta must be NAME=VALUE, got {pair!r}")
        metadata[name] = value
    if args.expires_in is not None and args.expires_at is not None:
        raise MeterwareError("give --expires-in or --expires-at, not both")
    expires_at = args.expires_at
    if args.expires_in is not None:
        expires_at = time.time() + duration(args.expires_in, "--expires-in")
    return {
        "live": not args.test,
        "name": args.name or "",
        "metadata": metadata,
        "expires_at": expires_at,
        "remaining": args.remaining,
        "scopes": args.scope or (),
        "rate_limits": args.rate_limit or (),
    }


def cmd_keys_create(args: argparse.Namespace) -> int:
    key = open_accounts(args).create_key(args.customer, prefix=args.prefix, **_terms(args))
    data = {"key": key.plaintext, "key_id": key.key_id, "prefix": key.prefix, "live": key.live}
    text = f"{key.plaintext}\n\nkey id {key.key_id}; this key is shown once - store it now."
    return emit(args, data, text)


def _key_data(record: KeyRecord) -> dict[str, Any]:
    return {
        "key_id": record.key_id,
        "customer": record.customer,
        "name": record.name,
        "prefix": record.prefix,
        "live": record.live,
        "status": record.status,
        "created": record.created,
        "expires_ms": record.expires_ms,
        "last_used_ms": record.last_used_ms,
        "metadata": record.metadata,
        "remaining": record.remaining,
        "scopes": list(record.scopes),
        "rate_limits": [str(limit) for limit in record.rate_limits],
    }


def _key_line(record: KeyRecord) -> str:
    expires = f", expires {utc_time(record.expires_ms // 1000)}" if record.expires_ms else ""
    used = f"last used {utc_time(record.last_used_ms // 1000)}" if record.last_used_ms else "never used"
    mode = "live" if record.live else "test"
    uses = "" if record.remaining is None else f", {record.remaining} uses left"
    if record.rate_limits:
        uses += ", limited to " + " and ".join(map(str, record.rate_limits))
    name = f"  {record.name!r}" if record.name else ""
    return f"{record.key_id}  {record.prefix}...  {mode}  {record.status}{expires}{uses}  {used}{name}"


def cmd_keys_import(args: argparse.Namespace) -> int:
    record = open_accounts(args).import_key(
        args.customer, key_hash=args.hash, start=args.start or "", **_terms(args)
    )
    text = f"imported key {record.key_id} for {record.customer}"
    return emit(args, _key_data(record), text)


def cmd_keys_list(args: argparse.Namespace) -> int:
    records = open_accounts(args).list_keys(args.customer)
    data = [_key_data(record) for record in records]
    return emit(args, data, "\n".join(map(_key_line, records)) or "(no keys)")


def cmd_keys_show(args: argparse.Namespace) -> int:
    record = open_accounts(args).key(args.key_id)
    lines = [_key_line(record), f"  customer {record.customer}, created {utc_time(record.created)}"]
    if record.scopes:
        lines.append(f"  scopes: {' '.join(record.scopes)}")
    lines += [f"  {name} = {value}" for name, value in sorted(record.metadata.items())]
    return emit(args, _key_data(record), "\n".join(lines))


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    open_accounts(args).revoke_key(args.key_id)
    return emit(args, {"key_id": args.key_id, "status": "revoked"}, f"revoked {args.key_id}")


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    key = open_accounts(args).rotate_key(args.key_id, grace_seconds=args.grace)
    data = {"key": key.plaintext, "key_id": key.key_id, "prefix": key.prefix, "replaces": args.key_id}
    text = (
        f"{key.plaintext}\n\nkey id {key.key_id} replaces {args.key_id}, which stops working in "
        f"{args.grace:g}s; this key is shown once - store it now."
    )
    return emit(args, data, text)


def add_keys(commands: Commands) -> None:
    keys = commands.group("keys", "issue, import, list, revoke and rotate API keys")
    sub = keys.command("create", cmd_keys_create, "issue a key (printed once)")
    sub.add_argument("customer")
    sub.add_argument("--prefix", help="your own key prefix instead of mw_live/mw_test: 1-20 of a-z, 0-9, _")
    _add_terms(sub)
    sub = keys.command("import", cmd_keys_import, "keep a key issued by another system working")
    sub.add_argument("customer")
    sub.add_argument("--hash", required=True, metavar="SHA256", help="the key's SHA-256, 64 hex digits")
    sub.add_argument("--start", help="the key's visible beginning, shown in lists (at most 20 characters)")
    _add_terms(sub)
    keys.command("list", cmd_keys_list, "list a customer's keys").add_argument("customer")
    keys.command("show", cmd_keys_show, "show a key (never its plaintext)").add_argument("key_id")
    keys.command("revoke", cmd_keys_revoke, "revoke a key at once").add_argument("key_id")
    sub = keys.command("rotate", cmd_keys_rotate, "issue a replacement key")
    sub.add_argument("key_id")
    sub.add_argument(
        "--grace", type=float, default=0.0, metavar="SECONDS", help="how long the old key keeps working"
    )


def _add_terms(sub: argparse.ArgumentParser) -> None:
    """The options of a key's terms (``keys create`` and ``keys import``)."""
    sub.add_argument("--test", action="store_true", help="a sandbox key: metered separately, never charged")
    sub.add_argument("--name", help="what you call the key (at most 100 characters)")
    sub.add_argument(
        "--meta", action="append", metavar="NAME=VALUE", help="your note on the key (repeatable, up to 16)"
    )
    sub.add_argument("--expires-in", metavar="DURATION", help="the key stops working after 3600, 12h, 30d...")
    sub.add_argument("--expires-at", type=float, metavar="EPOCH", help="the key stops working at this time")
    sub.add_argument(
        "--scope", action="append", help="what the key may do, for your app to check (repeatable)"
    )
    sub.add_argument(
        "--remaining", type=int, metavar="N", help="the key serves N calls, then 403 key_exhausted"
    )
    sub.add_argument(
        "--rate-limit",
        action="append",
        metavar="RATE",
        help="the key's own rate limit, e.g. 5/second (repeatable, up to 4; on top of its plan's)",
    )
