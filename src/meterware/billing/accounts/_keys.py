"""API keys: issue them (with a name, metadata, an expiry, uses, scopes, a prefix), import them by hash,
list, revoke and rotate them."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace

from meterware.billing.accounts._base import LATEST_ANCHOR, AccountsBase
from meterware.config import RateLimit
from meterware.errors import NotFoundError, UsageError
from meterware.keys import (
    NewKey,
    check_key_hash,
    check_metadata,
    check_name,
    check_rate_limits,
    check_scopes,
    custom_prefix,
    generate_key,
)
from meterware.metering.records import KeyRecord

#: Most uses a key may be given (exact in Lua's doubles, far below the counters' 2^62).
MAX_USES = 10**12
#: Longest visible beginning of an imported key (shown in lists in place of the prefix).
MAX_START_LENGTH = 20


class Keys(AccountsBase):
    """Issue, import, list, revoke and rotate a customer's API keys."""

    def create_key(
        self,
        customer_id: str,
        *,
        live: bool = True,
        name: str = "",
        metadata: Mapping[str, str] | None = None,
        expires_at: float | None = None,
        remaining: int | None = None,
        scopes: Iterable[str] = (),
        prefix: str | None = None,
        rate_limits: Iterable[str | RateLimit] = (),
    ) -> NewKey:
        """Issue a key; its plaintext exists only in the returned object.

        ``name`` and ``metadata`` (at most 16 short strings) are the seller's: listed, never read by
        meterware. A key with ``expires_at`` (epoch seconds) is refused from then on (401 ``expired_key``).
        A key with ``remaining`` uses gives one to each call admitted (in the same atomic admission, never
        given back, as Unkey's credits) and is refused once they are gone (403 ``key_exhausted``).
        ``scopes`` (at most 32 names) are for the app to check: ``meterware.current_call().scopes``.
        ``prefix`` (1-20 of ``[a-z0-9_]``, e.g. ``acme_live``) replaces ``mw_live``/``mw_test``.
        ``rate_limits`` (at most 4, ``"5/second"``, or a ``sum`` meter's ``"1000 tokens/minute"``) count the
        key's calls (or units) only, on top of its plan's (429 ``rate_limited``; a ``key-rate-<seconds>s``
        or ``key-tokens-rate-<seconds>s`` entry in the ``RateLimit`` headers).
        """
        new = generate_key(live=live, prefix=prefix)
        record = self._record(
            customer_id, new.key_id, new.prefix, live, name, metadata, expires_at, remaining, scopes
        )
        record = replace(record, rate_limits=check_rate_limits(rate_limits, self.config.meters))
        self.storage.add_key(record, new.hash)
        return new

    def import_key(
        self,
        customer_id: str,
        *,
        key_hash: str,
        live: bool = True,
        start: str = "",
        name: str = "",
        metadata: Mapping[str, str] | None = None,
        expires_at: float | None = None,
        remaining: int | None = None,
        scopes: Iterable[str] = (),
        rate_limits: Iterable[str | RateLimit] = (),
    ) -> KeyRecord:
        """Keep a key issued by another system working, from its hex SHA-256 (the plaintext is never
        needed); the other terms are :meth:`create_key`'s. ``start`` is the key's visible beginning
        (``sk_live_ab12``, at most 20 characters) shown in lists. The key must be 16-256 characters of a
        bearer token (letters, digits, ``-._~+/`` and trailing ``=``) to be looked up when presented.
        """
        key_hash = check_key_hash(key_hash)
        if not isinstance(start, str) or len(start) > MAX_START_LENGTH or not start.isprintable():
            raise UsageError(f"start must be printable text of at most {MAX_START_LENGTH} characters")
        record = self._record(
            customer_id,
            f"key_{secrets.token_hex(8)}",
            start,
            live,
            name,
            metadata,
            expires_at,
            remaining,
            scopes,
        )
        record = replace(record, rate_limits=check_rate_limits(rate_limits, self.config.meters))
        if self.storage.resolve_key(key_hash) is not None:
            raise UsageError("a key with this hash exists already")
        try:
            self.storage.add_key(record, key_hash)  # refuses a hash taken meanwhile (an import at once)
        except ValueError as error:
            raise UsageError(str(error)) from None
        return record

    def _record(
        self,
        customer_id: str,
        key_id: str,
        prefix: str,
        live: bool,
        name: str,
        metadata: Mapping[str, str] | None,
        expires_at: float | None,
        remaining: int | None,
        scopes: Iterable[str],
    ) -> KeyRecord:
        """A new key's record, its terms checked (the customer too)."""
        record = KeyRecord(
            key_id,
            customer_id,
            prefix,
            live,
            "active",
            int(time.time()),
            expires_ms=_expiry_ms(expires_at),
            name=check_name(name),
            metadata=check_metadata(metadata),
            remaining=_uses(remaining),
            scopes=check_scopes(scopes),
        )
        self.customer(customer_id)
        return record

    def list_keys(self, customer_id: str) -> list[KeyRecord]:
        self.customer(customer_id)
        return self.storage.list_keys(customer_id)

    def key(self, key_id: str) -> KeyRecord:
        record = self.storage.get_key(key_id)
        if record is None:
            raise NotFoundError(f"no key {key_id!r}")
        return record

    def revoke_key(self, key_id: str) -> None:
        """Stop a key at once (the next admission refuses it, whatever the caches hold)."""
        self.key(key_id)
        self.storage.set_key_state(key_id, status="revoked")

    def rotate_key(self, key_id: str, *, grace_seconds: float = 0) -> NewKey:
        """Issue a replacement key (with the old one's name, metadata, scopes and custom prefix); the old
        one keeps working for ``grace_seconds``, then expires.

        A key with remaining uses hands them to its replacement and stops at once (a grace period would
        let both keys spend them)."""
        old = self.key(key_id)
        if old.status != "active":
            raise UsageError(f"key {key_id} is revoked and cannot be rotated")
        if old.expires_ms and old.expires_ms <= time.time() * 1000:
            # Rotated before, or run out: a second replacement would get the uses handed over once.
            raise UsageError(f"key {key_id} has expired and cannot be rotated")
        original_expiry = old.expires_ms
        if old.remaining is not None and grace_seconds > 0:
            raise UsageError(f"key {key_id} counts its uses: it is rotated without a grace period")
        expires_ms = int((time.time() + max(0.0, grace_seconds)) * 1000)
        if old.expires_ms:
            expires_ms = min(expires_ms, old.expires_ms)  # never past the original expiry
        if old.remaining is not None:
            # Stopped and emptied at once: a rotation at the same time finds it expired, and takes nothing.
            uses = self.storage.take_key_uses(key_id, expires_ms)
            if uses is None:
                raise UsageError(f"key {key_id} has expired and cannot be rotated")
            old = replace(old, remaining=uses)
        new = self.create_key(
            old.customer,
            live=old.live,
            name=old.name,
            metadata=old.metadata,
            remaining=old.remaining,
            scopes=old.scopes,
            prefix=custom_prefix(old.prefix),
            rate_limits=old.rate_limits,
            expires_at=original_expiry / 1000 if original_expiry else None,  # a trial key stays one
        )
        self.storage.set_key_state(key_id, expires_ms=expires_ms)
        return new


def _expiry_ms(expires_at: float | None) -> int:
    """``expires_at`` (epoch seconds, in the future) in epoch milliseconds; 0 for never."""
    if expires_at is None:
        return 0
    if isinstance(expires_at, bool) or not isinstance(expires_at, int | float):
        raise UsageError(f"expires_at must be epoch seconds, got {expires_at!r}")
    if not time.time() < expires_at <= LATEST_ANCHOR:
        raise UsageError(f"expires_at must be epoch seconds in the future, got {expires_at!r}")
    return int(expires_at * 1000)


def _uses(remaining: int | None) -> int | None:
    """Remaining uses, checked: None (no count) or a whole number from 0 to ``MAX_USES``."""
    if remaining is not None and (
        isinstance(remaining, bool) or not isinstance(remaining, int) or not 0 <= remaining <= MAX_USES
    ):
        raise UsageError(f"remaining must be a whole number of uses from 0 to {MAX_USES}, got {remaining!r}")
    return remaining
