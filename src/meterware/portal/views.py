"""The customer's portal without a server: sign-in, sessions, form tokens and the routing to the pages.

Every page is a function ``(ctx, request, **arguments) -> PortalResponse`` of a module of
:mod:`meterware.portal.pages`, given a :class:`~meterware.portal.html.PageContext` of the session's own
customer: no URL names a customer, so no request can reach another customer's data. The operator view
(:mod:`meterware.portal.admin`) serves the same functions for the customer it names.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import urlsplit

from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.routing import Map, Rule

from meterware.billing._apps import LazyAccounts
from meterware.billing.accounts import Accounts
from meterware.config import Config
from meterware.errors import NotFoundError, StorageError
from meterware.portal import html
from meterware.portal.http import PortalRequest, PortalResponse, redirect
from meterware.portal.pages import alerts, billing, keys, overview, spend_cap, usage
from meterware.portal.tokens import Session, SessionKind, Signer, new_session, portal_secret

#: The customer session's cookie (its path is the mount, so the operator view's cookie never meets it).
SESSION_COOKIE: Final = "meterware_portal"
#: Whose name operator sessions' sign-out markers are kept under (a customer id cannot hold a space).
OPERATORS: Final = "operator sessions"

Page = Callable[..., PortalResponse]

#: Every page of a customer, by path inside the customer's pages.
PAGES: Final = Map(
    [
        Rule("/", endpoint=overview.show),
        Rule("/usage", endpoint=usage.show),
        Rule("/usage.csv", endpoint=usage.download),
        Rule("/invoices", endpoint=billing.invoices),
        Rule("/invoices/<period>", endpoint=billing.invoice),
        Rule("/invoices/<period>.<any(csv, json):fmt>", endpoint=billing.invoice_download),
        Rule("/credits", endpoint=billing.credits),
        Rule("/keys", endpoint=keys.index),
        Rule("/keys/new", endpoint=keys.create, methods=["GET", "POST"]),
        Rule("/keys/<key_id>/rotate", endpoint=keys.rotate, methods=["GET", "POST"]),
        Rule("/keys/<key_id>/revoke", endpoint=keys.revoke, methods=["GET", "POST"]),
        Rule("/alerts", endpoint=alerts.show, methods=["GET", "POST"]),
        Rule("/spend-cap", endpoint=spend_cap.show, methods=["GET", "POST"]),
    ],
    strict_slashes=False,
    merge_slashes=False,
)


def same_origin(request: PortalRequest, base_url: str) -> bool:
    """Whether a form post comes from the portal's own site, when the browser says (``Origin``): the host
    the request was sent to, or the one of ``portal.base_url`` (behind a proxy that rewrites ``Host``).
    The scheme is not compared: behind a TLS proxy the app sees http for an https page."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = urlsplit(origin).netloc
    return host in (request.host, urlsplit(base_url).netloc) and bool(host)


def render(ctx: html.PageContext, request: PortalRequest, path: str) -> PortalResponse:
    """The page at ``path`` (inside the customer's pages) for ``ctx``'s customer."""
    try:
        endpoint, arguments = PAGES.bind("", "/").match(path, method=request.method)
    except MethodNotAllowed:
        return html.message_page(ctx.root, 405, "Method not allowed", "This page does not take that method.")
    except HTTPException:
        return html.message_page(ctx.root, 404, "Not found", "There is no such page.")
    page: Page = endpoint
    try:
        return page(ctx, request, **arguments)
    except NotFoundError:
        return html.message_page(ctx.root, 404, "Not found", "There is no such page.")


class PortalCore:
    """What both views share: the configuration, the signer, the backend (opened on first use), their
    session cookie (``cookie``, signed as ``kind``) and the 503 when the backend fails."""

    cookie: str
    kind: SessionKind

    def __init__(self, config: Config) -> None:
        self.config = config
        # Read now, so a missing secret stops the app at start-up, not at the first customer's visit.
        self.signer = Signer(portal_secret(config.portal))
        self._accounts = LazyAccounts(config)

    @property
    def accounts(self) -> Accounts:
        """The backend, opened on first use."""
        return self._accounts.get()

    def __call__(self, request: PortalRequest) -> PortalResponse:
        try:
            return self.respond(request)
        except StorageError:
            return html.message_page(
                request.root,
                503,
                "Temporarily unavailable",
                "The account cannot be read right now. Retry soon.",
            )

    def respond(self, request: PortalRequest) -> PortalResponse:
        raise NotImplementedError

    # -- sessions

    def _signed_out_marker(self, session: Session) -> tuple[str, str]:
        """Where the backend marks ``session`` signed out: under its customer, or the operators' name."""
        return session.subject if self.kind == "customer" else OPERATORS, f"session:{session.id}"

    def session(self, request: PortalRequest) -> Session | None:
        """The request's session: signed for this view, unexpired, not signed out."""
        session = self.signer.open_session(request.cookies.get(self.cookie, ""), self.kind)
        if session is None or self.accounts.storage.is_used(*self._signed_out_marker(session)):
            return None
        return session

    def set_session(self, response: PortalResponse, session: Session, root: str) -> PortalResponse:
        return response.set_cookie(
            self.cookie,
            self.signer.session_cookie(session, self.kind),
            path=f"{root}/",
            max_age=max(1, int(session.expires - time.time())),
            secure=self.config.portal.secure_cookies,
        )

    def sign_out(self, response: PortalResponse, session: Session, root: str) -> PortalResponse:
        """End ``session`` in the backend (a copy of the cookie stops working too) and in the browser."""
        self.accounts.storage.use_once(*self._signed_out_marker(session), session.expires * 1000)
        return response.set_cookie(
            self.cookie, "", path=f"{root}/", max_age=0, secure=self.config.portal.secure_cookies
        )

    def context(
        self, session: Session, customer_id: str, root: str, base: str, **extra: Any
    ) -> html.PageContext:
        accounts = self.accounts
        return html.PageContext(
            accounts=accounts,
            config=self.config,
            customer=accounts.customer(customer_id),
            root=root,
            base=base,
            form_token=self.signer.form_token(session),
            **extra,
        )

    def checked_post(self, request: PortalRequest, session: Session) -> PortalResponse | None:
        """The refusal of a form post without the session's token or from another origin, else None."""
        if request.method != "POST":
            return None
        token = request.form.get("csrf", "")
        if not same_origin(request, self.config.portal.base_url) or not self.signer.check_form_token(
            session, token
        ):
            return html.message_page(
                request.root,
                403,
                "Form expired",
                "This form was not sent from your current session. Reload the page and try again.",
            )
        return None

    def close(self) -> None:
        self._accounts.close()


class CustomerPortal(PortalCore):
    """The customer's own pages, behind a session opened by a sign-in link."""

    cookie = SESSION_COOKIE
    kind = "customer"

    def respond(self, request: PortalRequest) -> PortalResponse:
        path, root = request.path, request.root
        if path == "/static/portal.css":
            return html.stylesheet()
        if path == "/login":
            return self.sign_in(request)
        session = self.session(request)
        if session is None:
            return html.message_page(
                root,
                401,
                "Signed out",
                "Your session has ended or you are not signed in. Open the portal with a new link.",
            )
        refused = self.checked_post(request, session)
        if refused is not None:
            return refused
        if path == "/logout" and request.method == "POST":
            return self.sign_out(
                html.message_page(root, 200, "Signed out", "You are signed out."), session, root
            )
        try:
            ctx = self.context(session, session.subject, root, root)
        except NotFoundError:  # the customer was removed since the session opened
            return html.message_page(root, 401, "Signed out", "This account no longer exists.")
        return render(ctx, request, path)

    def sign_in(self, request: PortalRequest) -> PortalResponse:
        """A link's page: GET (or HEAD) shows a button that posts the link back; the post opens the session.

        Only the post uses the link up, so a mail scanner or a preview that fetches it leaves it working;
        and its ``Origin`` must be the portal, so another site cannot sign a visitor in to its own account.
        """
        root = request.root
        token = request.form.get("token", "") if request.method == "POST" else request.query.get("token", "")
        opened = self.signer.open_link(token)
        refused = html.message_page(
            root,
            403,
            "This link does not work",
            "The sign-in link is invalid, has expired or was used already. Ask for a new one.",
        )
        if opened is None or (
            request.method == "POST" and not same_origin(request, self.config.portal.base_url)
        ):
            return refused
        customer_id, link_id, expires = opened
        storage = self.accounts.storage
        if storage.get_customer(customer_id) is None:
            return refused
        if request.method != "POST":  # the page says at once when the link was used already
            return (
                refused
                if storage.is_used(customer_id, link_id)
                else html.sign_in_page(root, customer_id, token)
            )
        if not storage.use_once(customer_id, link_id, expires * 1000):  # the one that marks it used wins
            return refused
        session = new_session(customer_id, self.config.portal.session_seconds)
        return self.set_session(redirect(f"{root}/"), session, root)
