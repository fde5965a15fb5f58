"""What the commands share: the options' results, the accounts, output as text or JSON, and how the
commands are declared."""

from __future__ import annotations

import argparse
import getpass
import json
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from meterware.billing.accounts import Accounts
from meterware.config import Config
from meterware.errors import MeterwareError

Handler = Callable[[argparse.Namespace], int]

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*\Z")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400}


class Commands:
    """Subcommands being declared; each takes the options every command takes (``common``)."""

    def __init__(
        self, commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
    ) -> None:
        self._commands = commands
        self._common = common

    def group(self, name: str, help_text: str) -> Commands:
        """A command whose actions are subcommands of their own (``meterware keys create``)."""
        sub = self._commands.add_parser(name, help=help_text, parents=[self._common])
        return Commands(sub.add_subparsers(dest="action", required=True, metavar="ACTION"), self._common)

    def command(self, name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        """A command run by ``handler``; add its arguments to the parser returned."""
        sub = self._commands.add_parser(name, help=help_text, parents=[self._common])
        sub.set_defaults(handler=handler)
        return sub


def duration(text: str, option: str) -> float:
    """``"900"``, ``"15m"``, ``"2h"`` or ``"30d"`` in seconds (``option`` names it in the error)."""
    match = _DURATION_RE.match(text)
    if match is None:
        raise MeterwareError(f"{option} must be seconds or a number with s, m, h or d (15m), got {text!r}")
    return float(match[1]) * _UNIT_SECONDS[match[2]]


def utc_time(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def load_config(args: argparse.Namespace) -> Config:
    overrides = {"storage": args.storage} if getattr(args, "storage", None) else {}
    return Config.load(getattr(args, "config", None), **overrides)


def open_accounts(args: argparse.Namespace) -> Accounts:
    config = load_config(args)
    if config.storage.startswith("memory://") and args.command not in ("demo",):
        print(
            "meterware: note: memory:// keeps data only inside one process; "
            "pass --storage redis://... (or set METERWARE_STORAGE) to manage a real deployment",
            file=sys.stderr,
        )
    return Accounts.open(config)


def emit(args: argparse.Namespace, data: Any, text: str) -> int:
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else text)
    return 0


def actor(args: argparse.Namespace) -> str:
    """Who does it: --actor, else the OS user."""
    if args.actor:
        return str(args.actor)
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "cli"
