"""Reading Retry-After and showing URLs without their secrets (the exporters' and webhooks' HTTP clients)."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from meterware._http import MAX_DELTA_SECONDS, retry_after_seconds
from meterware._redact import redact_text, redact_url

NOW = 1_800_000_000.0


def http_date(seconds: float) -> str:
    return format_datetime(datetime.fromtimestamp(seconds, UTC), usegmt=True)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        pytest.param(None, None, id="absent"),
        pytest.param("", None, id="empty"),
        pytest.param("2", 2.0, id="seconds"),
        pytest.param(" 7 ", 7.0, id="spaces-around"),
        pytest.param("0", 0.0, id="zero"),
        pytest.param("9" * 40, MAX_DELTA_SECONDS, id="huge-is-2**31"),
        pytest.param("9" * 5000, MAX_DELTA_SECONDS, id="more-digits-than-int-reads"),
        pytest.param(http_date(NOW + 30), 30.0, id="http-date"),
        pytest.param(http_date(NOW - 30), 0.0, id="past-http-date-is-now"),
        pytest.param("Mon, 01 Feb 2027 00:00:00 -0000", 1_440_000.0, id="date-without-zone-is-utc"),
        pytest.param("²", None, id="superscript-two"),
        pytest.param("٣", None, id="arabic-indic-three"),
        pytest.param("-3", None, id="negative"),
        pytest.param("1.5", None, id="fraction"),
        pytest.param("1e3", None, id="exponent"),
        pytest.param("1_000", None, id="underscores"),
        pytest.param("nan", None, id="nan"),
        pytest.param("inf", None, id="inf"),
        pytest.param("soon", None, id="garbage"),
        pytest.param("Mon, 99 Jan 2020 00:00:00 GMT", None, id="impossible-date"),
        pytest.param("Mon, 01 Jan 99999 00:00:00 GMT", None, id="year-99999"),
    ],
)
def test_retry_after(header: str | None, expected: float | None) -> None:
    """Retry-After is ASCII delta-seconds or an HTTP date; anything else is None (the caller's backoff)."""
    assert retry_after_seconds(header, now=NOW) == expected


@given(st.text())
@example("²")
@example("\x00")
@example("Mon, 01 Jan 0001 00:00:00 +2359")
def test_retry_after_never_raises(header: str) -> None:
    """Whatever a server sends, the answer is None or a wait from 0 to 2**31 seconds."""
    seconds = retry_after_seconds(header, now=NOW)
    assert seconds is None or 0 <= seconds <= MAX_DELTA_SECONDS


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        pytest.param("https://hooks.example.com/hook", "https://hooks.example.com/hook", id="plain"),
        pytest.param(
            "https://user:s3cret@hooks.example.com:8443/in?token=t0k3n&team=ops#frag",
            "https://***@hooks.example.com:8443/in?token=***&team=***",
            id="userinfo-query-fragment",
        ),
        pytest.param("http://h/x?s3cret", "http://h/x?***", id="bare-query-item"),
        pytest.param("hooks.example.com/x?token=t0k3n", "hooks.example.com/x?token=***", id="no-scheme"),
        pytest.param("http://[::1/x?token=t0k3n", "<unreadable URL>", id="unreadable"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    """Scheme, host, port and path are shown; userinfo, query values and the fragment are not."""
    assert redact_url(url) == shown


@given(st.text(), st.text(alphabet=st.characters(codec="ascii", exclude_characters="&=#@/?[]"), min_size=8))
def test_a_redacted_url_never_shows_its_query_value(prefix: str, secret: str) -> None:
    """Whatever the rest of the URL, a query value never survives redaction."""
    url = f"https://hooks.example.com/{prefix}?token={secret}"
    assert secret not in redact_url(url).partition("?")[2]


def test_redact_text_hides_the_url_secrets_an_error_message_quotes() -> None:
    """An exception quoting the URL (or a part of it) is shown without userinfo or query."""
    url = "https://user:pw@hooks.example.com/in?token=t0k3n"
    text = redact_text(f"unknown url type: {url!r}; query token=t0k3n; auth user:pw", url)
    assert "t0k3n" not in text
    assert "user:pw" not in text
    assert "hooks.example.com/in" in text
