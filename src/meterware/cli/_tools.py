"""``meterware config``, ``export``, ``rollup`` and ``demo``: checking, exporting, running."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

from meterware.cli._common import Commands, emit, load_config, open_accounts, utc_time
from meterware.config import EXPORT_PROVIDERS, Config
from meterware.errors import MeterwareError
from meterware.rollup.metrics import add_metrics_arguments


def cmd_config_check(args: argparse.Namespace) -> int:
    path = args.file or args.config
    config = Config.load(path)
    text = (
        f"{path or 'configuration'}: ok ({len(config.meters)} meters, {len(config.plans)} plans, "
        f"storage {config.storage.split('://')[0]}://)"
    )
    return emit(args, {"ok": True, "meters": sorted(config.meters), "plans": sorted(config.plans)}, text)


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

    accounts = open_accounts(args)
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
            f"  {r.event_id}  {r.name}  {r.external_id}  {r.value}  {utc_time(r.timestamp)}"
            for r in report.sent
        ]
        text = "\n".join([text, *lines])
    emit(args, report.as_dict(), text)
    return 2 if report.rejected else 0


def cmd_rollup(args: argparse.Namespace) -> int:
    from meterware.rollup import run_worker
    from meterware.rollup.metrics import metrics_options

    return run_worker(load_config(args), once=args.once, metrics=metrics_options(args))


def cmd_demo(args: argparse.Namespace) -> int:
    from meterware.demo import run_demo

    return run_demo(storage=args.storage, serve=args.serve, port=args.port)


def add_config(commands: Commands) -> None:
    config = commands.group("config", "configuration files")
    config.command("check", cmd_config_check, "validate a configuration file").add_argument("file", nargs="?")


def add_export(commands: Commands) -> None:
    sub = commands.command("export", cmd_export, "push usage to a billing provider ([export.PROVIDER])")
    sub.add_argument("provider", choices=EXPORT_PROVIDERS)
    sub.add_argument("--since", help="first window to read (date, ISO time or epoch s; default: the cursor)")
    sub.add_argument("--until", help="read windows ending by then (default: now - settle_seconds)")
    sub.add_argument("--dry-run", action="store_true", help="print the events, send and record nothing")


def add_rollup(commands: Commands) -> None:
    sub = commands.command("rollup", cmd_rollup, "run the rollup worker")
    sub.add_argument("--once", action="store_true", help="drain the streams, then exit")
    add_metrics_arguments(sub)


def add_demo(commands: Commands) -> None:
    sub = commands.command("demo", cmd_demo, "run the demo: an API, customers, traffic, usage")
    sub.add_argument(
        "--serve",
        action="store_true",
        help="then keep the API, the rollup and the portal running, with links",
    )
    sub.add_argument(
        "--port", type=int, default=0, help="the port to serve on with --serve (default: a free one)"
    )
