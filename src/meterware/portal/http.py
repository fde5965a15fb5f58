"""The portal's requests and responses without a server, and the two thin servers around them.

A view (:class:`~meterware.portal.views.CustomerPortal`, :class:`~meterware.portal.admin.OperatorView`)
takes a :class:`PortalRequest` and returns a :class:`PortalResponse`; :class:`PortalASGIApp` and
:class:`PortalWSGIApp` only translate, so Starlette, FastAPI and Flask serve the same pages.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final
from urllib.parse import parse_qsl

from werkzeug.http import HTTP_STATUS_CODES, dump_cookie, parse_cookie

from meterware.billing._apps import serve_lifespan
from meterware.usage import current

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment
    from starlette.types import Receive, Scope, Send

logger = logging.getLogger("meterware.portal")

#: Largest form body read; the portal's forms are a few short fields.
MAX_FORM_BYTES: Final = 16 * 1024
#: Query and form fields read at most (the rest of a hostile request is ignored).
MAX_FIELDS: Final = 32
#: Longest path served; longer ones get 404 without being looked at.
MAX_PATH: Final = 512

#: Sent with every page: nothing cached or framed, no script, no referrer to another origin (links carry
#: tokens). Not ``no-referrer``: browsers then send ``Origin: null`` with the page's own form posts, which
#: the same-origin check refuses.
SECURITY_HEADERS: Final = (
    ("Cache-Control", "no-store"),
    (
        "Content-Security-Policy",
        "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'",
    ),
    ("Referrer-Policy", "same-origin"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
)


@dataclass(frozen=True, slots=True)
class PortalRequest:
    """One request, as the views need it."""

    method: str
    #: The path inside the mount, starting with ``/``.
    path: str
    #: Where the app is mounted (``""`` at the root): the base of every link and the cookies' path.
    root: str
    query: Mapping[str, str] = field(default_factory=dict)
    form: Mapping[str, str] = field(default_factory=dict)
    cookies: Mapping[str, str] = field(default_factory=dict)
    #: Lower-case names; the last value of a repeated header.
    headers: Mapping[str, str] = field(default_factory=dict)
    #: The host the request was sent to (for the same-origin check of forms).
    host: str = ""


@dataclass(slots=True)
class PortalResponse:
    """One response: HTML by default, with the security headers."""

    status: int
    body: bytes
    content_type: str = "text/html; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)

    def set_cookie(
        self, name: str, value: str, *, path: str, max_age: int | None, secure: bool
    ) -> PortalResponse:
        cookie = dump_cookie(
            name, value, max_age=max_age, path=path, secure=secure, httponly=True, samesite="Lax"
        )
        self.headers.append(("Set-Cookie", cookie))
        return self

    def all_headers(self) -> list[tuple[str, str]]:
        return [
            ("Content-Type", self.content_type),
            ("Content-Length", str(len(self.body))),
            *SECURITY_HEADERS,
            *self.headers,
        ]


def redirect(location: str, *, status: int = 303) -> PortalResponse:
    """A redirect (303: after a form, the browser GETs ``location``)."""
    return PortalResponse(status, b"", headers=[("Location", location)])


def plain(status: int, text: str) -> PortalResponse:
    """A plain-text answer, for what comes before any page (a metered mount, a request too large)."""
    return PortalResponse(status, text.encode(), "text/plain; charset=utf-8")


Handler = Callable[[PortalRequest], PortalResponse]


def _fields(raw: bytes | str) -> dict[str, str]:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    try:
        pairs = parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_FIELDS)
    except ValueError:  # more fields than MAX_FIELDS: read none of them
        return {}
    return dict(pairs)


def build_request(
    method: str,
    path: str,
    root: str,
    query_string: bytes | str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
) -> PortalRequest:
    """A :class:`PortalRequest` from what any server gives (headers as ``(name, value)`` text pairs)."""
    header_map: dict[str, str] = {}
    cookies: list[str] = []
    for name, value in headers:
        name = name.lower()
        header_map[name] = value
        if name == "cookie":  # HTTP/2 servers may pass each cookie as a header of its own
            cookies.append(value)
    content_type = header_map.get("content-type", "").partition(";")[0].strip().lower()
    form = _fields(body) if content_type == "application/x-www-form-urlencoded" else {}
    return PortalRequest(
        method=method.upper(),
        path=path,
        root=root.rstrip("/"),
        query=_fields(query_string),
        form=form,
        cookies=dict(parse_cookie("; ".join(cookies))),
        headers=header_map,
        host=header_map.get("host", ""),
    )


def refusal(root: str, path: str, query_string: bytes | str, setting: str) -> PortalResponse | None:
    """What both servers answer before reading a request, if anything: the mount itself without its
    slash is sent to it (the cookies' path ends with one); a path too long is not found; and a request
    the middleware metered gets a 500 (never charged) naming the line to add."""
    if current() is not None:
        line = (
            f'routes.{setting} = "{root}"' if root else f"routes.{setting} = (the path where it is mounted)"
        )
        logger.error("meterware: the %s at %s is metered; set %s", setting, root or "/", line)
        return plain(500, f"This page is metered: set {line} in the configuration the middleware reads.")
    if not path:
        query = query_string.decode("latin-1") if isinstance(query_string, bytes) else query_string
        return redirect(f"{root}/" + (f"?{query}" if query else ""), status=308)
    if len(path) > MAX_PATH:
        return plain(404, "Not found.")
    return None


class PortalASGIApp:
    """A view as an ASGI app (the backend is read in a worker thread, off the event loop)."""

    def __init__(self, handler: Handler, setting: str, close: Callable[[], None]) -> None:
        self.handler = handler
        self.setting = setting
        self.close = close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send, self.close)
            return
        if scope["type"] != "http":
            return
        response = await self._respond(scope, receive)
        headers = [(name.lower().encode(), value.encode("latin-1")) for name, value in response.all_headers()]
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        body = b"" if scope["method"] == "HEAD" else response.body
        await send({"type": "http.response.body", "body": body})

    async def _respond(self, scope: Scope, receive: Receive) -> PortalResponse:
        root: str = scope.get("root_path", "")
        path: str = scope["path"]
        # Starlette's Mount keeps the whole path in "path" and the mount in "root_path".
        if root and path.startswith(root):
            path = path[len(root) :]
        refused = refusal(root, path, scope.get("query_string", b""), self.setting)
        if refused is not None:
            return refused
        body = b""
        more = scope["method"] == "POST"
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return plain(400, "The request ended early.")
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_FORM_BYTES:
                return plain(413, "The form is too large.")
        headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in scope["headers"]]
        request = build_request(
            scope["method"],
            path,
            root,
            scope.get("query_string", b""),
            headers,
            body,
        )
        return await asyncio.to_thread(self.handler, request)


class PortalWSGIApp:
    """A view as a WSGI app."""

    def __init__(self, handler: Handler, setting: str, close: Callable[[], None]) -> None:
        self.handler = handler
        self.setting = setting
        self.close = close

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        response = self._respond(environ)
        status = f"{response.status} {HTTP_STATUS_CODES.get(response.status, 'Unknown')}"
        start_response(status, response.all_headers())
        return [b"" if environ["REQUEST_METHOD"] == "HEAD" else response.body]

    def _respond(self, environ: WSGIEnvironment) -> PortalResponse:
        # PEP 3333: SCRIPT_NAME and PATH_INFO are bytes decoded as latin-1; the portal's paths are UTF-8.
        root = environ.get("SCRIPT_NAME", "").encode("latin-1").decode("utf-8", "replace")
        path = environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8", "replace")
        refused = refusal(root, path, environ.get("QUERY_STRING", ""), self.setting)
        if refused is not None:
            return refused
        body = b""
        if environ["REQUEST_METHOD"] == "POST":
            try:
                length = int(environ.get("CONTENT_LENGTH") or 0)
            except ValueError:
                return plain(400, "Bad Content-Length.")
            if length > MAX_FORM_BYTES:
                return plain(413, "The form is too large.")
            body = environ["wsgi.input"].read(length) if length > 0 else b""
        headers = [
            (name[5:].replace("_", "-"), value) for name, value in environ.items() if name.startswith("HTTP_")
        ]
        if environ.get("CONTENT_TYPE"):
            headers.append(("content-type", environ["CONTENT_TYPE"]))
        return self.handler(
            build_request(
                environ["REQUEST_METHOD"],
                path,
                root,
                environ.get("QUERY_STRING", ""),
                headers,
                body,
            )
        )
