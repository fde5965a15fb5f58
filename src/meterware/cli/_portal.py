"""``meterware portal link``: a sign-in link to a customer's portal."""

from __future__ import annotations

import argparse

from meterware.cli._common import Commands, duration, emit, load_config, utc_time


def cmd_portal_link(args: argparse.Namespace) -> int:
    from meterware.portal.tokens import issue_link

    config = load_config(args)
    seconds = config.portal.link_seconds if args.ttl is None else duration(args.ttl, "--ttl")
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
