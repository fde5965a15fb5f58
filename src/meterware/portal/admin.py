"""The operator view: every customer with plan, status, balance, period usage and spend (searchable,
sortable); any customer's portal pages; granting credits and suspending with a reason kept in the ledger.

Who may use it is your call, in one of two ways:

* ``authorize``: a function of the :class:`~meterware.portal.http.PortalRequest` (headers, cookies) that
  returns the operator's name, or None to refuse, e.g. reading the session of your own admin site;
* otherwise the admin token in ``$METERWARE_ADMIN_TOKEN`` (``portal.admin_token_env``, at least 32
  characters): sent as ``Authorization: Bearer <token>``, or typed once into the sign-in form, which opens
  an operator session.

Forms carry the operator session's token, as the customer's pages do.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlencode

from markupsafe import Markup

from meterware.billing.accounts import Accounts
from meterware.config import Config
from meterware.errors import NotFoundError
from meterware.portal import html
from meterware.portal.http import PortalRequest, PortalResponse, redirect
from meterware.portal.pages.manage import manage
from meterware.portal.tokens import Session, new_session, operator_token
from meterware.portal.views import PortalCore, render, same_origin

#: Your own check of a request: the operator's name, or None to refuse.
Authorize = Callable[[PortalRequest], str | None]

SESSION_COOKIE: Final = "meterware_admin"
#: Operator sessions last this long at most (or ``portal.session_seconds`` if shorter).
OPERATOR_SESSION_SECONDS: Final = 8 * 3600
#: Customers listed per page.
PAGE_SIZE: Final = 50
SORTS: Final = ("id", "plan", "status", "balance", "calls", "spend")


@dataclass(frozen=True, slots=True)
class CustomerRow:
    id: str
    plan: str
    status: str
    balance: int
    calls: int
    spend: int


def summaries(accounts: Accounts) -> list[CustomerRow]:
    """One row per customer: a few reads each (the list is for thousands of customers, not millions)."""
    rows = []
    for customer_id in accounts.storage.list_customers():
        try:
            customer = accounts.customer(customer_id)
            report = accounts.usage(customer_id)
            balance = accounts.storage.get_balance(customer_id)
        except NotFoundError:
            continue
        calls = sum(report.calls.values()) - report.calls.get("rejected", 0)
        rows.append(
            CustomerRow(customer.id, customer.plan, customer.status, balance.balance, calls, report.spend)
        )
    return rows


class OperatorView(PortalCore):
    """The operator view without a server (see :mod:`meterware.portal.admin`)."""

    cookie = SESSION_COOKIE
    kind = "operator"

    def __init__(self, config: Config, *, authorize: Authorize | None = None) -> None:
        super().__init__(config)
        self.authorize = authorize
        self._token = b""
        if authorize is None:
            self._token = operator_token(config.portal, "the operator view needs an authorize= hook or")

    def _token_matches(self, presented: str) -> bool:
        return bool(self._token) and hmac.compare_digest(presented.encode(), self._token)

    def _bearer(self, request: PortalRequest) -> bool:
        """Whether the request carries the admin token itself (a script: no session, no form token)."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and self._token_matches(token.strip())

    def _key(self) -> str:
        """The admin token's fingerprint: the sessions it opened end when it changes."""
        return self.signer.fingerprint(self._token.decode()) if self._token else ""

    def respond(self, request: PortalRequest) -> PortalResponse:
        root, path = request.root, request.path
        if path == "/static/portal.css":
            return html.stylesheet()
        if self.authorize is not None:
            named = self.authorize(request)
            if not named or not isinstance(named, str):  # None, "" or anything else: refused
                return html.message_page(
                    root, 403, "Not allowed", "You are not allowed to use the operator view."
                )
            return self._as(request, named)
        if path == "/login":
            return self.sign_in(request)
        if self._bearer(request):
            return self.route(request, new_session("admin", 60, key=self._key()))
        session = self.session(request)
        if session is None or session.key != self._key():
            return redirect(f"{root}/login")
        return self._with_session(request, session)

    def _as(self, request: PortalRequest, named: str) -> PortalResponse:
        """A request the hook let in as ``named``: its session (for the form token) is made when needed."""
        session = self.session(request)
        if session is not None and session.subject == named:
            return self._with_session(request, session)
        session = new_session(named, self._session_seconds())
        refused = self.checked_post(request, session)  # a post can't carry a session it never had
        return refused or self.set_session(self.route(request, session), session, request.root)

    def _with_session(self, request: PortalRequest, session: Session) -> PortalResponse:
        refused = self.checked_post(request, session)
        if refused is not None:
            return refused
        if request.path == "/logout" and request.method == "POST":
            after = (
                redirect(f"{request.root}/login")
                if self.authorize is None
                else html.message_page(request.root, 200, "Signed out", "You are signed out.")
            )
            return self.sign_out(after, session, request.root)
        return self.route(request, session)

    def _session_seconds(self) -> float:
        return min(OPERATOR_SESSION_SECONDS, self.config.portal.session_seconds)

    def sign_in(self, request: PortalRequest) -> PortalResponse:
        """The admin token's form: a post with the token opens an operator session."""
        root = request.root
        problem = Markup("")
        if request.method == "POST":
            if self._token_matches(request.form.get("token", "")) and same_origin(
                request, self.config.portal.base_url
            ):
                session = new_session("admin", self._session_seconds(), key=self._key())
                return self.set_session(redirect(f"{root}/"), session, root)
            problem = html.notice("That token is not the admin token.", kind="error")
        content = Markup(
            '<main class="message"><h1>Operator sign-in</h1>{}<form method="post" action="{}/login">'
            '<div class="field"><label for="token">Admin token</label>'
            '<input id="token" name="token" type="password" autocomplete="current-password" required></div>'
            '<button type="submit">Sign in</button></form></main>'
        ).format(problem, root)
        return html.document(root, "Operator sign-in", content, status=403 if problem else 200)

    def route(self, request: PortalRequest, session: Session) -> PortalResponse:
        """The page asked for, for the operator of ``session``."""
        root, path = request.root, request.path
        if path in ("", "/"):
            return self.customers(request, session)
        prefix = "/customers/"
        if not path.startswith(prefix):
            return html.message_page(root, 404, "Not found", "There is no such page.")
        customer_id, _, rest = path[len(prefix) :].partition("/")
        base = f"{root}/customers/{customer_id}"
        try:
            ctx = self.context(
                session,
                customer_id,
                root,
                base,
                operator=session.subject,
                banner=Markup(
                    '<div class="banner" role="note">Operator view ({}) of customer {}. '
                    '<a href="{}/">All customers</a> \u00b7 <a href="{}/manage">Credits and status</a></div>'
                ).format(session.subject, customer_id, root, base),
            )
        except (NotFoundError, ValueError):
            return html.message_page(root, 404, "Not found", "There is no such customer.")
        if rest == "manage":
            return manage(ctx, request)
        return render(ctx, request, f"/{rest}")

    def customers(self, request: PortalRequest, session: Session) -> PortalResponse:
        root, query = request.root, request.query
        search = query.get("q", "").strip()[:128]
        sort = query.get("sort", "id") if query.get("sort") in SORTS else "id"
        descending = query.get("order") == "desc"
        needle = search.lower()
        rows = [
            row for row in summaries(self.accounts) if needle in f"{row.id} {row.plan} {row.status}".lower()
        ]
        rows.sort(key=lambda row: (getattr(row, sort), row.id), reverse=descending)
        pages = max(1, (len(rows) + PAGE_SIZE - 1) // PAGE_SIZE)
        asked = query.get("page", "1")
        page_number = min(pages, int(asked)) if asked.isascii() and asked.isdigit() and len(asked) < 10 else 1
        page_number = max(1, page_number)
        shown = rows[(page_number - 1) * PAGE_SIZE : page_number * PAGE_SIZE]

        def heading(column: str, label: str) -> Markup:
            order = "desc" if sort == column and not descending else "asc"
            href = f"{root}/?{urlencode({'q': search, 'sort': column, 'order': order})}"
            return Markup('<a href="{}">{}</a>').format(href, label)

        table = html.table(
            f"{len(rows)} customers" + (f" matching \u201c{search}\u201d" if search else ""),
            [
                heading(c, label)
                for c, label in zip(
                    SORTS,
                    ("Customer", "Plan", "Status", "Balance", "Calls this period", "Spend this period"),
                    strict=True,
                )
            ],
            [
                (
                    Markup('<a href="{}/customers/{}/">{}</a>').format(root, row.id, row.id),
                    row.plan,
                    Markup('<span class="status-{}">{}</span>').format(row.status, row.status),
                    html.data(f"{row.id}.balance", html.credits(row.balance), row.balance),
                    html.data(f"{row.id}.calls", html.number(row.calls), row.calls),
                    html.data(f"{row.id}.spend", html.credits(row.spend), row.spend),
                )
                for row in shown
            ],
            numeric=[3, 4, 5],
            name="customers",
            empty="No customer matches.",
        )
        pager = Markup("")
        if pages > 1:

            def step(label: str, number: int) -> Markup:
                order = query.get("order", "asc")
                link = urlencode({"q": search, "sort": sort, "order": order, "page": number})
                return Markup(' \u00b7 <a href="{}/?{}">{}</a>').format(root, link, label)

            pager = Markup('<p class="pager">Page {} of {}{}{}</p>').format(
                page_number,
                pages,
                step("Previous", page_number - 1) if page_number > 1 else "",
                step("Next", page_number + 1) if page_number < pages else "",
            )
        search_form = Markup(
            '<form method="get" action="{}/" role="search"><div class="field">'
            '<label for="q">Search customers</label><input id="q" name="q" type="search" value="{}"></div>'
            '<button type="submit">Search</button></form>'
        ).format(root, search)
        sign_out = html.sign_out_form(root, self.signer.form_token(session))
        content = Markup(
            '<header><div class="brand">Operator view</div><div class="who">{}{}</div></header>'
            "<main><h1>Customers</h1>{}{}{}</main>"
        ).format(session.subject, sign_out, search_form, table, pager)
        return html.document(root, "Customers \u00b7 operator view", content)
