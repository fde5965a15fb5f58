"""Showing a URL without its secrets (a leaf: the configuration quotes URLs in its errors with it, and
must not load the HTTP client to do so)."""

from __future__ import annotations

from urllib.parse import urlsplit


def redact_url(url: str) -> str:
    """``url`` as logs and messages show it: scheme, host, port and path; userinfo and query values hidden."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unreadable URL>"
    _, at, host = parts.netloc.rpartition("@")
    shown = f"{parts.scheme}://" if parts.scheme else ""
    shown += ("***@" if at else "") + host + parts.path
    if parts.query:
        # A bare item (``?s3cret``) may be the token itself: only names before an ``=`` are shown.
        items = (item.partition("=") for item in parts.query.split("&"))
        shown += "?" + "&".join(f"{name}=***" if eq else "***" for name, eq, _ in items)
    return shown


def redact_text(text: str, url: str) -> str:
    """``text`` (an error message) with the secret parts of ``url`` it may quote hidden."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return text.replace(url, "<URL>")
    text = text.replace(url, redact_url(url))
    userinfo = parts.netloc.rpartition("@")[0]
    for secret in (userinfo, parts.query, parts.fragment):
        if secret:
            text = text.replace(secret, "***")
    return text
