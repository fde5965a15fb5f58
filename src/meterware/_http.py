"""What meterware's outgoing HTTP clients (exporters, alert webhooks) share: reading ``Retry-After`` and
an opener that never follows redirects."""

from __future__ import annotations

import re
import time
import urllib.request
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any, Final

#: RFC 9110 delta-seconds: ASCII digits only (``str.isdigit`` also takes ``²``, which ``int`` refuses).
_DELTA_SECONDS: Final = re.compile(r"[0-9]+")
#: A delay past what anyone can represent counts as this (RFC 9111's 2**31 for delta-seconds).
MAX_DELTA_SECONDS: Final = 2.0**31
#: An HTTP date is at most 29 characters (IMF-fixdate); what is much longer is not one.
_MAX_DATE_LENGTH: Final = 64


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait: delta-seconds or an HTTP date (past: 0).

    None when absent or anything else (negative, fractional, non-ASCII digits, garbage): the caller's
    own backoff applies. Never raises; the result is at most :data:`MAX_DELTA_SECONDS`.
    """
    if not value:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        return min(float(value), MAX_DELTA_SECONDS)  # float(): int() refuses more than 4300 digits
    if len(value) > _MAX_DATE_LENGTH or not value.isascii():
        return None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": UTC with no claim about the local zone (RFC 5322)
        when = when.replace(tzinfo=UTC)
    seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(0.0, seconds), MAX_DELTA_SECONDS)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Hand every 3xx back as an ``HTTPError``: urllib would follow a 301/302/303 (as a GET without the
    body), replaying ``Authorization`` to whatever host it names."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def no_redirects_opener() -> urllib.request.OpenerDirector:
    """A urllib opener that never follows a redirect."""
    return urllib.request.build_opener(_NoRedirects)
