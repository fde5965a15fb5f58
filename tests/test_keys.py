"""API keys: their shape, their stored hash, and where a request presents one."""

from __future__ import annotations

import hashlib
import re

import pytest

from meterware.errors import UsageError
from meterware.keys import (
    check_prefix,
    custom_prefix,
    generate_key,
    hash_key,
    is_live,
    is_well_formed,
    key_from_headers,
    visible_prefix,
)

SECRET = "7Hq2" + "a" * 28
LIVE = f"mw_live_{SECRET}"
TEST = f"mw_test_{SECRET}"
OTHER = "mw_live_" + "B" * 32
HEADER_NAMES = ("authorization", "x-api-key")


@pytest.mark.parametrize("live", [pytest.param(True, id="live"), pytest.param(False, id="test")])
def test_generated_key_shape(live: bool) -> None:
    """A new key is mw_<mode>_ + 32 base62 characters, with a key id, a visible prefix and its hash."""
    key = generate_key(live=live)
    mode = "live" if live else "test"
    assert re.fullmatch(rf"mw_{mode}_[A-Za-z0-9]{{32}}", key.plaintext)
    assert re.fullmatch(r"key_[0-9a-f]{16}", key.key_id)
    assert key.prefix == key.plaintext[:12]
    assert key.prefix == f"mw_{mode}_{key.plaintext[8:12]}"
    assert key.hash == hashlib.sha256(key.plaintext.encode()).hexdigest()
    assert key.live is live
    assert is_live(key.plaintext) is live
    assert is_well_formed(key.plaintext)


def test_generated_keys_are_unique() -> None:
    """Keys and key ids never repeat."""
    keys = [generate_key() for _ in range(200)]
    assert len({key.plaintext for key in keys}) == 200
    assert len({key.key_id for key in keys}) == 200


def test_generated_key_uses_the_whole_alphabet() -> None:
    """Secrets draw from upper case, lower case and digits."""
    secrets = "".join(generate_key().plaintext[8:] for _ in range(50))
    assert re.search("[a-z]", secrets)
    assert re.search("[A-Z]", secrets)
    assert re.search("[0-9]", secrets)


def test_hash_is_sha256_hex_of_the_plaintext() -> None:
    """The stored form is the lower-case hex SHA-256 of the key's UTF-8 bytes (FIPS 180-2 vector)."""
    assert hash_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert hash_key(LIVE) == hashlib.sha256(LIVE.encode()).hexdigest()
    assert hash_key(LIVE) != hash_key(TEST)


@pytest.mark.parametrize(
    ("plaintext", "prefix"),
    [
        pytest.param(LIVE, "mw_live_7Hq2", id="live"),
        pytest.param(TEST, "mw_test_7Hq2", id="test"),
    ],
)
def test_visible_prefix(plaintext: str, prefix: str) -> None:
    """The visible prefix is the mode and the first four secret characters."""
    assert visible_prefix(plaintext) == prefix


@pytest.mark.parametrize(
    ("presented", "expected"),
    [
        pytest.param(LIVE, True, id="live"),
        pytest.param(TEST, True, id="test"),
        pytest.param("", False, id="empty"),
        pytest.param("mw_live_" + "a" * 100_000, False, id="huge"),
        pytest.param(LIVE + "a" * 300, False, id="over-max-length"),
        pytest.param("mw_live_" + "é" * 32, False, id="non-ascii-letters"),
        pytest.param("mw_live_" + "٣" * 32, False, id="non-ascii-digits"),
        pytest.param("mw_live_" + "\uff41" * 32, False, id="fullwidth"),
        pytest.param("mw_prod_" + SECRET, False, id="unknown-mode"),
        pytest.param("mw_" + SECRET, False, id="no-mode"),
        pytest.param(LIVE[:-1], False, id="31-chars"),
        pytest.param(LIVE + "a", False, id="33-chars"),
        pytest.param(LIVE + "\n", False, id="trailing-newline"),
        pytest.param(" " + LIVE, False, id="leading-space"),
        pytest.param("mw_live_" + "a" * 31 + "-", False, id="dash"),
        pytest.param("mw_live_" + "a" * 31 + "_", False, id="underscore"),
        pytest.param("Bearer " + LIVE, False, id="with-scheme"),
        # Not meterware's shape: a custom prefix's or an imported key's, any bearer token of 16-256.
        pytest.param("acme_live_" + SECRET, True, id="custom-prefix"),
        pytest.param("mk_live_" + SECRET, True, id="another-systems-prefix"),
        pytest.param("MW_LIVE_" + SECRET, True, id="upper-case-prefix-is-not-ours"),
        pytest.param("sk-proj.a~b+c/d-0123==", True, id="token68-characters"),
        pytest.param("a" * 16, True, id="16-chars"),
        pytest.param("a" * 15, False, id="15-chars"),
        pytest.param("a" * 256, True, id="256-chars"),
        pytest.param("a" * 257, False, id="257-chars"),
        pytest.param("legacy key 0123456789", False, id="space"),
        pytest.param("legacy_key_0123456789\n", False, id="foreign-trailing-newline"),
        pytest.param("legacy=key_0123456789", False, id="inner-equals"),
        pytest.param("l\u00e9gacy_key_0123456789", False, id="foreign-non-ascii"),
    ],
)
def test_is_well_formed(presented: str, expected: bool) -> None:
    """A key starting mw_ must be mw_live_/mw_test_ + exactly 32 ASCII letters or digits; any other is
    looked up if it is a bearer token (RFC 6750) of 16-256 characters."""
    assert is_well_formed(presented) is expected


@pytest.mark.parametrize(
    ("headers", "query_string", "header_names", "query", "expected"),
    [
        pytest.param(
            [(b"authorization", f"Bearer {LIVE}".encode())], b"", HEADER_NAMES, None, LIVE, id="bearer"
        ),
        pytest.param(
            [(b"authorization", f"bearer {LIVE}".encode())], b"", HEADER_NAMES, None, LIVE, id="bearer-lower"
        ),
        pytest.param(
            [(b"authorization", f"BEARER {LIVE}".encode())], b"", HEADER_NAMES, None, LIVE, id="bearer-upper"
        ),
        pytest.param(
            [(b"authorization", f"  Bearer   {LIVE}  ".encode())],
            b"",
            HEADER_NAMES,
            None,
            LIVE,
            id="bearer-spaces",
        ),
        pytest.param(
            [(b"Authorization", f"Bearer {LIVE}".encode())], b"", HEADER_NAMES, None, LIVE, id="name-case"
        ),
        pytest.param([(b"authorization", LIVE.encode())], b"", HEADER_NAMES, None, None, id="no-scheme"),
        pytest.param(
            [(b"authorization", b"Basic dXNlcjpwYXNz")], b"", HEADER_NAMES, None, None, id="basic-ignored"
        ),
        pytest.param([(b"authorization", b"Bearer ")], b"", HEADER_NAMES, None, None, id="empty-bearer"),
        pytest.param([(b"x-api-key", LIVE.encode())], b"", HEADER_NAMES, None, LIVE, id="x-api-key"),
        pytest.param([(b"X-API-Key", LIVE.encode())], b"", HEADER_NAMES, None, LIVE, id="x-api-key-case"),
        pytest.param(
            [(b"x-api-key", f" {LIVE} ".encode())], b"", HEADER_NAMES, None, LIVE, id="x-api-key-stripped"
        ),
        pytest.param([(b"x-api-key", b"")], b"", HEADER_NAMES, None, None, id="x-api-key-empty"),
        pytest.param(
            [(b"x-api-key", OTHER.encode()), (b"authorization", f"Bearer {LIVE}".encode())],
            b"",
            HEADER_NAMES,
            None,
            LIVE,
            id="authorization-before-x-api-key",
        ),
        pytest.param(
            [(b"authorization", f"Bearer {LIVE}".encode()), (b"x-api-key", OTHER.encode())],
            b"",
            ("x-api-key", "authorization"),
            None,
            OTHER,
            id="configured-order-wins",
        ),
        pytest.param(
            [(b"authorization", b"Basic dXNlcjpwYXNz"), (b"x-api-key", LIVE.encode())],
            b"",
            HEADER_NAMES,
            None,
            LIVE,
            id="basic-falls-through-to-x-api-key",
        ),
        pytest.param(
            [(b"x-api-key", LIVE.encode()), (b"x-api-key", OTHER.encode())],
            b"",
            HEADER_NAMES,
            None,
            LIVE,
            id="duplicate-x-api-key-first",
        ),
        pytest.param(
            [(b"authorization", f"Bearer {LIVE}".encode()), (b"authorization", f"Bearer {OTHER}".encode())],
            b"",
            HEADER_NAMES,
            None,
            LIVE,
            id="duplicate-authorization-first",
        ),
        pytest.param(
            [(b"authorization", b"Basic dXNlcjpwYXNz"), (b"authorization", f"Bearer {LIVE}".encode())],
            b"",
            HEADER_NAMES,
            None,
            None,
            id="duplicate-authorization-only-first-read",
        ),
        pytest.param(
            [(b"x-api-key", LIVE.encode())], b"", ("authorization",), None, None, id="header-not-configured"
        ),
        pytest.param(
            [(b"x-custom-key", LIVE.encode())], b"", ("x-custom-key",), None, LIVE, id="custom-header"
        ),
        pytest.param([], f"api_key={LIVE}&x=1".encode(), HEADER_NAMES, "api_key", LIVE, id="query"),
        pytest.param([], f"x=1&api_key={LIVE}".encode(), HEADER_NAMES, "api_key", LIVE, id="query-later"),
        pytest.param(
            [],
            f"api_key={LIVE}&api_key={OTHER}".encode(),
            HEADER_NAMES,
            "api_key",
            LIVE,
            id="query-duplicate-first",
        ),
        pytest.param(
            [], b"api_key=mw_live_a%2Bb", HEADER_NAMES, "api_key", "mw_live_a+b", id="query-decoded"
        ),
        pytest.param([], b"api_key=&x=1", HEADER_NAMES, "api_key", None, id="query-blank"),
        pytest.param([], f"api_key={LIVE}".encode(), HEADER_NAMES, None, None, id="query-not-configured"),
        pytest.param([], f"key={LIVE}".encode(), HEADER_NAMES, "api_key", None, id="query-other-name"),
        pytest.param(
            [(b"x-api-key", LIVE.encode())],
            f"api_key={OTHER}".encode(),
            HEADER_NAMES,
            "api_key",
            LIVE,
            id="header-before-query",
        ),
        pytest.param([(b"accept", b"*/*")], b"", HEADER_NAMES, None, None, id="no-key"),
    ],
)
def test_key_from_headers(
    headers: list[tuple[bytes, bytes]],
    query_string: bytes,
    header_names: tuple[str, ...],
    query: str | None,
    expected: str | None,
) -> None:
    """The key comes from the configured headers in order (Authorization as Bearer), then the query."""
    assert key_from_headers(headers, query_string, header_names, query) == expected


def test_a_key_with_a_custom_prefix() -> None:
    """A custom prefix replaces mw_live/mw_test: <prefix>_ + 32 base62 characters, well formed, and its
    visible prefix gives the custom prefix back (a replacement keeps it)."""
    key = generate_key(prefix="acme_live")
    assert re.fullmatch(r"acme_live_[A-Za-z0-9]{32}", key.plaintext)
    assert key.prefix == key.plaintext[:14]
    assert key.hash == hash_key(key.plaintext)
    assert is_well_formed(key.plaintext)
    assert custom_prefix(key.prefix) == "acme_live"
    assert custom_prefix(generate_key().prefix) is None
    assert custom_prefix("sk_live_ab12") == "sk_live"
    assert custom_prefix("Sk-Live-ab12") is None
    assert custom_prefix("") is None


@pytest.mark.parametrize(
    "prefix",
    [
        pytest.param("", id="empty"),
        pytest.param("a" * 21, id="21-chars"),
        pytest.param("Acme", id="upper-case"),
        pytest.param("acme-live", id="dash"),
        pytest.param("mw", id="meterwares"),
        pytest.param("mw_live", id="meterwares-mode"),
    ],
)
def test_bad_custom_prefixes_are_refused(prefix: str) -> None:
    """A custom prefix is 1-20 of [a-z0-9_] and not meterware's own mw."""
    with pytest.raises(UsageError):
        check_prefix(prefix)
    assert check_prefix("a" * 20) == "a" * 20
