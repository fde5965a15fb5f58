"""What the portal signs: sign-in links, session cookies and form tokens, each an HMAC-SHA256 under the
secret named by ``portal.secret_env``, with its purpose in the signature so no token passes for another.

A link carries its customer, its end and a random id; it works once (the backend marks the id used) and
opens a session. A session cookie carries its customer (or the operator, in the operator view), its end and
a random id, which the backend marks when the session signs out, and from which the form token is derived:
a form posted without the token of the session that loaded it is refused, so another site cannot post a
form in the customer's name (CSRF).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from meterware.config import Config, Portal
from meterware.errors import ConfigError, UsageError
from meterware.storage._keyspace import CUSTOMER_ID_RE

#: Shortest secret accepted: 32 characters of ``secrets.token_urlsafe`` carry 192 bits.
MIN_SECRET_LENGTH: Final = 32
#: Longest token read: anything longer is refused before it is decoded.
MAX_TOKEN_LENGTH: Final = 1024
#: Longest a sign-in link may last.
MAX_LINK_SECONDS: Final = 7 * 86_400
EXAMPLE_BASE: Final = "https://api.example.com/portal"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def portal_secret(portal: Portal) -> bytes:
    """The signing secret from the environment, or a :class:`ConfigError` saying how to set one."""
    secret = os.environ.get(portal.secret_env, "")
    if len(secret) < MIN_SECRET_LENGTH:
        problem = "is not set" if not secret else f"is shorter than {MIN_SECRET_LENGTH} characters"
        raise ConfigError(
            "portal.secret_env",
            f"${portal.secret_env} {problem}: set it to a random secret, the same in every process, e.g. "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))'",
        )
    return secret.encode()


def operator_token(portal: Portal, needs: str, given: str | None = None) -> bytes:
    """The operator token (``given``, else ``$portal.admin_token_env``), or a :class:`ConfigError` starting
    with what ``needs`` one."""
    name = portal.admin_token_env
    token = os.environ.get(name, "") if given is None else given
    if len(token) < MIN_SECRET_LENGTH:
        raise ConfigError(
            "portal.admin_token_env",
            f"{needs} ${name} set to a random token of at least {MIN_SECRET_LENGTH} characters",
        )
    return token.encode()


#: What a session cookie is signed for: a customer's, or an operator's (one never passes for the other).
SessionKind = Literal["customer", "operator"]


@dataclass(frozen=True, slots=True)
class Session:
    """Who a session is for (a customer id, or an operator's name), until when, and its random id. An
    operator signed in with the admin token carries the token's fingerprint (``key``): a new token ends
    the sessions of the old one."""

    subject: str
    expires: int
    id: str
    key: str = ""


class Signer:
    """Signs and checks the portal's tokens."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _mac(self, purpose: str, body: str) -> str:
        return _b64(hmac.new(self._secret, f"{purpose}.{body}".encode(), hashlib.sha256).digest())

    def sign(self, purpose: str, payload: dict[str, Any]) -> str:
        """``payload`` (with its end, ``x``, in epoch seconds) signed for ``purpose``."""
        body = _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
        return f"{body}.{self._mac(purpose, body)}"

    def open(self, purpose: str, token: str) -> dict[str, Any] | None:
        """The payload of a token signed for ``purpose`` that has not expired (its ``x``), else None."""
        if len(token) > MAX_TOKEN_LENGTH:
            return None
        body, _, mac = token.partition(".")
        if not hmac.compare_digest(mac.encode(), self._mac(purpose, body).encode()):
            return None
        try:
            payload = json.loads(_unb64(body))
        except (binascii.Error, ValueError):
            return None
        if not isinstance(payload, dict):
            return None
        expires = payload.get("x")
        if not isinstance(expires, int) or expires <= time.time():
            return None
        return dict(payload)

    # -- links, sessions, forms

    def link_token(self, customer: str, seconds: float) -> str:
        """A sign-in token for ``customer``, valid ``seconds`` (rounded up to a whole second)."""
        return self.link_token_until(customer, math.ceil(time.time() + seconds))

    def link_token_until(self, customer: str, expires: int) -> str:
        """A sign-in token for ``customer``, valid until ``expires`` (epoch seconds)."""
        if not CUSTOMER_ID_RE.match(customer):
            raise UsageError(f"customer id {customer!r:.150} is not one")
        return self.sign("link", {"c": customer, "x": expires, "n": secrets.token_urlsafe(16)})

    def open_link(self, token: str) -> tuple[str, str, int] | None:
        """``(customer, link id, expires)`` of a valid link token (its single use is checked elsewhere)."""
        payload = self.open("link", token)
        if payload is None:
            return None
        customer, link_id = payload.get("c"), payload.get("n")
        if not (isinstance(customer, str) and CUSTOMER_ID_RE.match(customer) and isinstance(link_id, str)):
            return None
        return customer, link_id, payload["x"]

    def session_cookie(self, session: Session, kind: SessionKind) -> str:
        """The cookie value of ``session``."""
        payload = {"c": session.subject, "x": session.expires, "s": session.id, "k": session.key}
        return self.sign(f"session:{kind}", payload)

    def open_session(self, cookie: str, kind: SessionKind) -> Session | None:
        """The session of a cookie of ``kind``, signed and unexpired; else None."""
        payload = self.open(f"session:{kind}", cookie)
        if payload is None:
            return None
        subject, session_id, key = payload.get("c"), payload.get("s"), payload.get("k", "")
        if not (isinstance(subject, str) and isinstance(session_id, str) and isinstance(key, str)):
            return None
        return Session(subject, payload["x"], session_id, key)

    def form_token(self, session: Session) -> str:
        """The token every form of ``session`` carries."""
        return self._mac("form", session.id)

    def check_form_token(self, session: Session, token: str) -> bool:
        """Whether ``token`` is the form token of ``session`` (compared in constant time)."""
        return hmac.compare_digest(token.encode(), self.form_token(session).encode())

    def fingerprint(self, secret: str) -> str:
        """A short keyed digest of another secret (the admin token), to tell it changed."""
        return self._mac("fingerprint", secret)[:16]


def new_session(subject: str, seconds: float, *, key: str = "") -> Session:
    """A session of ``subject`` for ``seconds``, with a fresh random id."""
    return Session(subject, int(time.time() + seconds), secrets.token_urlsafe(16), key)


def check_base_url(url: str) -> str:
    """``url`` without a trailing slash if it can be a link's base (http or https, no query or fragment)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise UsageError(
            f"the base URL must be an http(s) URL without a query, like {EXAMPLE_BASE}, got {url!r}"
        )
    return url.rstrip("/")


def issue_link(config: Config, customer_id: str, seconds: float, base_url: str | None) -> tuple[str, int]:
    """A sign-in link and its end (epoch seconds): see :func:`sign_in_link`."""
    from meterware.billing.accounts import Accounts  # the backend, only when a link is issued

    portal = config.portal
    base = portal.base_url if base_url is None else base_url
    if not base:
        raise UsageError("no base URL for the link: set portal.base_url or pass base_url (--base-url)")
    base = check_base_url(base)
    if not 1 <= seconds <= MAX_LINK_SECONDS:
        raise UsageError(f"a link lasts from 1 second to 7 days, got {seconds:g} seconds")
    signer = Signer(portal_secret(portal))
    accounts = Accounts.open(config)
    try:
        accounts.customer(customer_id)
    finally:
        accounts.close()
    expires = math.ceil(time.time() + seconds)
    return f"{base}/login?token={signer.link_token_until(customer_id, expires)}", expires


def sign_in_link(
    customer_id: str,
    *,
    config: Config | None = None,
    seconds: float | None = None,
    base_url: str | None = None,
) -> str:
    """A link that signs ``customer_id`` in to the portal once, within ``seconds`` (default
    ``portal.link_seconds``), at ``base_url`` (default ``portal.base_url``: where the portal is mounted).

    The customer must exist (checked in the backend). Give the link to the customer only: it opens their
    portal to whoever follows it first. It travels in a URL, so servers' access logs see it: it works once
    and briefly for that reason.
    """
    config = config or Config.load()
    return issue_link(
        config, customer_id, config.portal.link_seconds if seconds is None else seconds, base_url
    )[0]
