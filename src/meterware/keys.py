"""API keys: their format, their hash, and how a request presents one.

A key looks like ``mw_live_7Hq2...`` (32 random base62 characters after the mode), or ``acme_live_7Hq2...``
with a seller's own prefix. Only its SHA-256 hash is stored; the plaintext is shown once, when the key is
created. Records and logs name a key by its id (``key_...``) and its visible prefix (``mw_live_7Hq2``),
never by the key itself. Keys imported from another system (by their hash) may have any shape of a
bearer token.
"""

from __future__ import annotations

import functools
import hashlib
import re
import secrets
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qsl

from meterware.config import Meter, RateLimit
from meterware.errors import UsageError

KEY_PREFIX = "mw_"
SECRET_LENGTH = 32
VISIBLE_SECRET_CHARS = 4
_ALPHABET = string.ascii_letters + string.digits
# \Z, not $: "$" also matches before a trailing newline.
_KEY_RE = re.compile(rf"^mw_(live|test)_[A-Za-z0-9]{{{SECRET_LENGTH}}}\Z")
# Longest value worth looking at: anything longer cannot be a key and is refused without hashing.
MAX_PRESENTED_LENGTH = 256
#: Shortest key not of meterware's own shape (a custom prefix's, an imported one) that is looked up.
MIN_FOREIGN_KEY_LENGTH: Final = 16
# RFC 6750's b64token: what a key made by another system (or with a custom prefix) may look like.
_FOREIGN_KEY_RE = re.compile(r"^[A-Za-z0-9._~+/-]+=*\Z")
#: A seller's own prefix for the keys it issues (``acme_live``); ``mw`` is meterware's.
_CUSTOM_PREFIX_RE = re.compile(r"^[a-z0-9_]{1,20}\Z")
_SHA256_HEX_RE = re.compile(r"^[0-9a-f]{64}\Z")
#: Bounds of what a seller may attach to a key (kept with the key record, listed, never on the hot path).
MAX_NAME_LENGTH: Final = 100
MAX_METADATA_ENTRIES: Final = 16
MAX_METADATA_KEY_LENGTH: Final = 40
MAX_METADATA_VALUE_LENGTH: Final = 200
MAX_SCOPES: Final = 32
#: A scope: 1-64 characters, no spaces (``read``, ``billing:write``, ``files/*``).
_SCOPE_RE = re.compile(r"^[A-Za-z0-9_.:/*-]{1,64}\Z")


@dataclass(frozen=True, slots=True)
class NewKey:
    """A freshly generated key: the plaintext exists only in this object."""

    plaintext: str
    key_id: str
    prefix: str
    hash: str
    live: bool


def generate_key(*, live: bool = True, prefix: str | None = None) -> NewKey:
    """Make a new random key for live or test (sandbox) traffic: ``mw_live_...`` / ``mw_test_...``, or
    ``<prefix>_...`` with a seller's own (checked) prefix."""
    head = f"{KEY_PREFIX}{'live' if live else 'test'}" if prefix is None else check_prefix(prefix)
    secret = "".join(secrets.choice(_ALPHABET) for _ in range(SECRET_LENGTH))
    plaintext = f"{head}_{secret}"
    return NewKey(
        plaintext=plaintext,
        key_id=f"key_{secrets.token_hex(8)}",
        prefix=plaintext[: len(head) + 1 + VISIBLE_SECRET_CHARS],
        hash=hash_key(plaintext),
        live=live,
    )


def hash_key(plaintext: str) -> str:
    """The stored form of a key: hex SHA-256 (keys carry 190 random bits, so no salt or KDF is needed)."""
    return hashlib.sha256(plaintext.encode("utf-8", "surrogatepass")).hexdigest()


def visible_prefix(plaintext: str) -> str:
    """The part of a key that may be shown in lists and logs (``mw_live_7Hq2``)."""
    mode_end = plaintext.index("_", len(KEY_PREFIX)) + 1
    return plaintext[: mode_end + VISIBLE_SECRET_CHARS]


def is_well_formed(presented: str) -> bool:
    """Whether ``presented`` has the shape of a key (checked before any lookup): meterware's own exactly,
    else (a custom prefix, a key imported from another system) 16-256 characters of a bearer token."""
    if presented.startswith(KEY_PREFIX):
        return len(presented) <= MAX_PRESENTED_LENGTH and _KEY_RE.match(presented) is not None
    return (
        MIN_FOREIGN_KEY_LENGTH <= len(presented) <= MAX_PRESENTED_LENGTH
        and _FOREIGN_KEY_RE.match(presented) is not None
    )


def check_prefix(prefix: str) -> str:
    """A seller's own key prefix, checked: 1-20 of ``[a-z0-9_]``, not meterware's ``mw``."""
    if not isinstance(prefix, str) or _CUSTOM_PREFIX_RE.match(prefix) is None:
        raise UsageError(f"a key prefix is 1-20 characters of a-z, 0-9 and _, got {prefix!r}")
    if prefix == "mw" or prefix.startswith(KEY_PREFIX):
        raise UsageError(f"the key prefix {prefix!r} is meterware's own; choose another")
    return prefix


def custom_prefix(visible: str) -> str | None:
    """The custom prefix a key's visible prefix (``acme_live_7Hq2``) was made with; None for meterware's
    own shape and for visible prefixes no custom prefix makes."""
    head = visible[: -(VISIBLE_SECRET_CHARS + 1)]
    if not head or visible[-(VISIBLE_SECRET_CHARS + 1)] != "_" or visible.startswith(KEY_PREFIX):
        return None
    return head if _CUSTOM_PREFIX_RE.match(head) and head != "mw" else None


def check_key_hash(key_hash: str) -> str:
    """An imported key's hash, checked: the hex SHA-256 of the key (lower case)."""
    normal = key_hash.lower() if isinstance(key_hash, str) else ""
    if _SHA256_HEX_RE.match(normal) is None:
        raise UsageError("key_hash must be the key's SHA-256 as 64 hexadecimal digits")
    return normal


def is_live(plaintext: str) -> bool:
    """Whether a well-formed key is a live key (as opposed to a test key)."""
    return plaintext.startswith("mw_live_")


def check_name(name: str) -> str:
    """A key's name, checked: one printable line of at most 100 characters ("" for none)."""
    if not isinstance(name, str) or len(name) > MAX_NAME_LENGTH or not name.isprintable():
        raise UsageError(f"a key's name must be printable text of at most {MAX_NAME_LENGTH} characters")
    return name


def check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """A key's metadata, checked: a flat dict of at most 16 printable strings to printable strings."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping) or len(metadata) > MAX_METADATA_ENTRIES:
        raise UsageError(f"a key's metadata must be a dict of at most {MAX_METADATA_ENTRIES} entries")
    checked: dict[str, str] = {}
    for name, value in metadata.items():
        if not (isinstance(name, str) and 0 < len(name) <= MAX_METADATA_KEY_LENGTH and name.isprintable()):
            raise UsageError(
                f"metadata names must be printable strings of 1-{MAX_METADATA_KEY_LENGTH} characters, "
                f"got {name!r}"
            )
        if not isinstance(value, str) or len(value) > MAX_METADATA_VALUE_LENGTH or not value.isprintable():
            raise UsageError(
                f"metadata {name!r} must be a printable string of at most {MAX_METADATA_VALUE_LENGTH} "
                "characters"
            )
        checked[name] = value
    return checked


#: Most rate limits a key may carry.
MAX_KEY_RATE_LIMITS = 4


def check_rate_limits(
    limits: Iterable[str | RateLimit], meters: Mapping[str, Meter] | None = None
) -> tuple[RateLimit, ...]:
    """A key's own rate limits, checked: at most 4, each a ``RateLimit`` or its text (``"5/second"``, or
    with ``meters`` a ``sum`` meter's ``"1000 tokens/minute"``)."""
    if isinstance(limits, str):
        raise UsageError("rate_limits must be a list of rates, not one string")
    checked = []
    for limit in limits:
        if isinstance(limit, str):
            try:
                limit = RateLimit.parse(limit, meters)
            except ValueError as error:
                raise UsageError(str(error)) from None
        if not isinstance(limit, RateLimit) or limit.amount <= 0 or limit.seconds <= 0:
            raise UsageError(f"a rate limit must be like '5/second', got {limit!r}")
        if limit.meter or limit.estimate != 1:
            # Given as a RateLimit, not parsed: what admission takes of a call must be a 'sum' meter's and
            # fit the limit (an estimate of 0 would divide a lease by zero).
            meter = (meters or {}).get(limit.meter)
            if meter is None or meter.aggregation != "sum" or not 1 <= limit.estimate <= limit.amount:
                raise UsageError(f"a key's rate limit must count calls or a 'sum' meter's units: {limit!r}")
        checked.append(limit)
    if len(checked) > MAX_KEY_RATE_LIMITS:
        raise UsageError(f"a key has at most {MAX_KEY_RATE_LIMITS} rate limits, got {len(checked)}")
    return tuple(checked)


def stored_rate_limits(limits: tuple[RateLimit, ...]) -> str:
    """A key's rate limits as stored: ``"5/1 100/60 1000/60/tokens/100"`` (amount/seconds, and for a
    meter's units the meter and the estimate a call takes: kept with the key, as admission and settlement
    must take the same)."""
    return " ".join(
        f"{limit.amount}/{limit.seconds}/{limit.meter}/{limit.estimate}"
        if limit.meter
        else f"{limit.amount}/{limit.seconds}"
        for limit in limits
    )


def rate_limits_from(text: str) -> tuple[RateLimit, ...]:
    """A key's rate limits from their stored text (:func:`stored_rate_limits`)."""
    limits = []
    for word in text.split():
        amount, seconds, *meter = word.split("/")  # a word that is none of them raises ValueError
        if meter:
            name, estimate = meter
            limits.append(RateLimit(int(amount), int(seconds), name, int(estimate)))
        else:
            limits.append(RateLimit(int(amount), int(seconds)))
    return tuple(limits)


def check_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    """A key's scopes, checked and without repeats (in the order given): at most 32 names of 1-64 of
    ``[A-Za-z0-9_.:/*-]``."""
    if isinstance(scopes, str):
        raise UsageError("scopes must be a list of names, not one string")
    given = list(scopes)
    for scope in given:
        if not isinstance(scope, str) or _SCOPE_RE.match(scope) is None:
            raise UsageError(f"a scope is 1-64 characters of letters, digits and _.:/*-, got {scope!r}")
    checked = tuple(dict.fromkeys(given))
    if len(checked) > MAX_SCOPES:
        raise UsageError(f"a key has at most {MAX_SCOPES} scopes, got {len(checked)}")
    return checked


@functools.cache
def _header_lookup(header_names: tuple[str, ...]) -> dict[bytes, str]:
    return {name.encode("latin-1"): name for name in header_names}


def key_from_headers(
    headers: Iterable[tuple[bytes, bytes]],
    query_string: bytes,
    header_names: tuple[str, ...],
    query: str | None,
) -> str | None:
    """Find the presented key: ``Authorization: Bearer``, then the other headers, then the query.

    ``header_names`` are lower-case; ``authorization`` is read as a Bearer credential.
    """
    wanted = _header_lookup(header_names)
    found: dict[str, bytes] = {}
    for raw_name, raw_value in headers:
        header = wanted.get(raw_name.lower())
        if header is not None and header not in found:
            found[header] = raw_value
    for name in header_names:
        raw = found.get(name)
        if raw is None:
            continue
        text = raw.decode("latin-1").strip()
        if name == "authorization":
            scheme, _, credential = text.partition(" ")
            if scheme.lower() != "bearer":
                continue
            text = credential.strip()
        if text:
            return text
    if query and query_string:
        for parameter, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=False):
            if parameter == query:
                return value
    return None
