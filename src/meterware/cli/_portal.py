"""``meterware portal link``: a sign-in link to a customer's portal."""

from __future__ import annotations

import argparse
import re

from meterware.cli._common import Commands, emit, load_config, utc_time
from meterware.errors import MeterwareError

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*\Z")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400}


def duration(text: str) -> float:
    """``"900"``, ``"15m"``, ``"2h"`` or ``"1d"`` in seconds."""
    match = _DURATION_RE.match(text)
    if match is None:
        raise MeterwareError(f"--ttl must be seconds or a number with s, m, h or d (15m), got {text!r}")
    return float(match[1]) * _UNIT_SECONDS[match[2]]


def cmd_portal_link(args: argparse.Namespace) -> int:
    from meterware.portal.tokens import issue_link

    config = load_config(args)
    seconds = config.portal.link_seconds if args.ttl is None else duration(args.ttl)
    url, expires = issue_link(config, args.customer, seconds, args.base_url)
    data = {"customer": args.customer, "url": url, "expires": expires}
    return emit(args, data, f"{url}\n(works once, until {utc_time(expires)})")


def add_portal(commands: Commands) -> None:
    portal = commands.group("portal", "the customer portal")
    sub = portal.command("link", cmd_portal_link, "print a one-use sign-in link to a customer's portal")
    sub.add_argument("customer")
    sub.add_argument(
        "--ttl", help="how long the link works: seconds, or 15m, 2h, 1d (default: portal.link_seconds)"
    )
    sub.add_argument("--base-url", help="where the portal is mounted (default: portal.base_url)")
