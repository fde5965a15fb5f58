"""The ``meterware`` command line: customers, keys, credits, usage, plans, portal links, the rollup worker,
the Redis checks (doctor) and the demo."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from meterware.__about__ import __version__
from meterware.cli._alerts import add_alerts
from meterware.cli._billing import add_invoice, add_periods, add_usage
from meterware.cli._common import Commands
from meterware.cli._credits import add_credits, add_events
from meterware.cli._customers import add_customers
from meterware.cli._doctor import add_doctor
from meterware.cli._keys import add_keys
from meterware.cli._plans import add_plans
from meterware.cli._portal import add_portal
from meterware.cli._tools import add_config, add_demo, add_export, add_rollup
from meterware.errors import MeterwareError

__all__ = ["build_parser", "main"]


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
    commands = Commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"), common)
    for add in (
        add_customers,
        add_keys,
        add_credits,
        add_events,
        add_usage,
        add_invoice,
        add_periods,
        add_plans,
        add_config,
        add_export,
        add_alerts,
        add_portal,
        add_rollup,
        add_doctor,
        add_demo,
    ):
        add(commands)
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
