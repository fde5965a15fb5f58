"""Where a customer wants its alerts to go: an email address and/or an https webhook URL it owns.

meterware never sends to them itself. The seller's alerts webhook (``[alerts] webhook_url``) carries them
in every alert as ``"notify": {"email": ..., "webhook_url": ...}``, and the seller's code emails the
customer or forwards the alert. So the rollup worker never opens a connection to an address a customer
typed (no server-side request forgery through it); a seller who forwards should still resolve the host
and refuse private addresses itself, since a public name can point anywhere.

The checks here refuse what is plainly not one mailbox or one public https endpoint: several addresses,
header-breaking characters, ``http://``, credentials in the URL, IP literals that are not public, and
``localhost``-like or single-label host names.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from meterware.errors import UsageError

logger = logging.getLogger("meterware.alerts")

#: RFC 5321's longest forward path, and a URL length every HTTP stack takes.
MAX_EMAIL_CHARS: Final = 254
MAX_URL_CHARS: Final = 2048

# One mailbox: dot-atom local part (RFC 5322, no quoted strings) at a host name with a dot.
_LOCAL_PART: Final = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_LABEL: Final = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_TOP_LABEL: Final = re.compile(r"[A-Za-z]{2,63}|xn--[A-Za-z0-9-]{1,59}")


@dataclass(frozen=True, slots=True)
class AlertDestinations:
    """A customer's own alert destinations (None: not given)."""

    email: str | None = None
    webhook_url: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        """The ``notify`` object of the alerts webhook."""
        return {"email": self.email, "webhook_url": self.webhook_url}


def _public_host_name(host: str) -> bool:
    labels = host.split(".")
    return (
        len(labels) >= 2
        and all(_LABEL.fullmatch(label) for label in labels)
        and bool(_TOP_LABEL.fullmatch(labels[-1]))
        and labels[-1].lower() not in {"localhost", "local", "internal", "localdomain"}
    )


def check_email(text: str) -> str:
    """``text`` as one plausible email address (surrounding spaces dropped), or UsageError saying why."""
    address = text.strip()
    if len(address) > MAX_EMAIL_CHARS:
        raise UsageError(f"the email address must be at most {MAX_EMAIL_CHARS} characters")
    local, at, domain = address.rpartition("@")
    if not at or not _LOCAL_PART.fullmatch(local) or len(local) > 64 or not _public_host_name(domain):
        raise UsageError(f"the email address must be one address like name@example.com, got {address!r}")
    return address


def check_webhook_url(text: str) -> str:
    """``text`` as an https URL of a public host, without credentials, or UsageError saying why."""
    url = text.strip()
    if len(url) > MAX_URL_CHARS:
        raise UsageError(f"the webhook URL must be at most {MAX_URL_CHARS} characters")
    if not url.isascii() or any(c.isspace() or not c.isprintable() for c in url):
        raise UsageError("the webhook URL must be one URL without spaces (encode other characters)")
    if not url.lower().startswith("https://"):
        raise UsageError("the webhook URL must start with https://")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # raises on a port that is not a number
    except ValueError:
        raise UsageError("the webhook URL has an invalid host or port") from None
    if "@" in parts.netloc:
        raise UsageError("the webhook URL must not carry a user name or password: put a token in its path")
    host = (parts.hostname or "").rstrip(".")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if "[" in parts.netloc or not _public_host_name(host):
            raise UsageError(
                f"the webhook URL must name a public host like hooks.example.com, got {host!r}"
            ) from None
    else:
        if not address.is_global:
            raise UsageError(f"the webhook URL must not point at a private or local address ({host})")
    return url


def destinations_to_json(destinations: AlertDestinations) -> str | None:
    """The destinations as stored in the backend (None: nothing to store)."""
    if destinations == AlertDestinations():
        return None
    return json.dumps(destinations.as_dict(), sort_keys=True)


def destinations_from_json(text: str | None) -> AlertDestinations:
    """Read back :func:`destinations_to_json`; what is unreadable counts as none."""
    if not text:
        return AlertDestinations()
    try:
        data = json.loads(text)
        email, url = data.get("email"), data.get("webhook_url")
        if not isinstance(email, str | None) or not isinstance(url, str | None):
            raise TypeError("not text")
        return AlertDestinations(email, url)
    except (ValueError, TypeError, AttributeError):
        logger.warning("ignoring unreadable alert destinations %r", text[:200])
        return AlertDestinations()
