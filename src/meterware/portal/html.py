"""The portal's HTML: the page around every view, and the pieces pages are made of.

Pages are built with :class:`markupsafe.Markup` (werkzeug's own dependency): every value formatted into
markup is escaped, so a customer id, a meter name or a ledger reason can never become HTML.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.resources import files
from typing import TYPE_CHECKING, Final
from urllib.parse import urlencode

from markupsafe import Markup

from meterware.config import MICROS_PER_CREDIT
from meterware.portal.http import PortalResponse

if TYPE_CHECKING:
    from meterware.billing.accounts import Accounts
    from meterware.config import Config
    from meterware.metering.records import Customer

#: The stylesheet, served at ``<mount>/static/portal.css`` (the pages allow no inline style).
STYLESHEET: Final = files("meterware.portal").joinpath("static/portal.css").read_bytes()

#: The customer's pages, in the order of the navigation: (path, label).
NAVIGATION: Final = (
    ("/", "Overview"),
    ("/usage", "Usage"),
    ("/invoices", "Invoices"),
    ("/credits", "Credits"),
    ("/keys", "API keys"),
    ("/alerts", "Alerts"),
)


@dataclass(frozen=True, slots=True)
class PageContext:
    """What every page of one customer is rendered with."""

    accounts: Accounts
    config: Config
    customer: Customer
    #: Where the app is mounted (the stylesheet and sign-out live there).
    root: str
    #: The URL prefix of this customer's pages: the mount in the portal, a customer's folder in the
    #: operator view.
    base: str
    #: The token every form carries (see :mod:`meterware.portal.tokens`).
    form_token: str
    #: The operator looking, in the operator view; "" in the customer's own portal.
    operator: str = ""
    #: Extra links before the navigation (the operator view's way back).
    banner: Markup = field(default_factory=Markup)

    def url(self, path: str, **query: str | int) -> str:
        """The URL of one of this customer's pages (``path`` starts with ``/``)."""
        url = f"{self.base}{path}"
        return f"{url}?{urlencode(query)}" if query else url


def credits(micros: int) -> str:
    """Micro-credits for people: at least two decimals, more only when they matter (``12.50``,
    ``0.000125``), thousands grouped."""
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), MICROS_PER_CREDIT)
    decimals = f"{fraction:06d}".rstrip("0").ljust(2, "0")
    return f"{sign}{whole:,}.{decimals}"


def number(value: int | float) -> str:
    """A count with its thousands grouped (``1,234``); a float with two decimals."""
    return f"{value:,}" if isinstance(value, int) else f"{value:,.2f}"


def when(epoch: float | None) -> str:
    """A UTC time to the minute, or an em dash for none."""
    if not epoch:
        return "\u2014"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M UTC")


def day(epoch: float) -> str:
    """A UTC date (``2026-12-07``)."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d")


def data(name: str, shown: object, value: object = None) -> Markup:
    """A value shown on the page, marked with its name and its exact value (``data-field``,
    ``data-value``: micro-credits, units), for scripts and tests to read what people read."""
    exact = shown if value is None else value
    return Markup('<span data-field="{}" data-value="{}">{}</span>').format(name, exact, shown)


def table(
    caption: str,
    headers: Sequence[str],
    rows: Iterable[Sequence[object]],
    *,
    numeric: Iterable[int] = (),
    name: str = "",
    empty: str = "Nothing yet.",
) -> Markup:
    """A table with a caption; ``numeric`` columns are right-aligned; ``name`` becomes its ``data-table``."""
    right = set(numeric)
    head = Markup("").join(
        Markup('<th scope="col"{}>{}</th>').format(Markup(' class="num"') if i in right else "", h)
        for i, h in enumerate(headers)
    )
    body = Markup("").join(
        Markup("<tr>{}</tr>").format(
            Markup("").join(
                Markup("<td{}>{}</td>").format(Markup(' class="num"') if i in right else "", cell)
                for i, cell in enumerate(row)
            )
        )
        for row in rows
    )
    if not body:
        body = Markup('<tr><td colspan="{}" class="empty">{}</td></tr>').format(len(headers), empty)
    return Markup(
        '<div class="table-wrap"><table data-table="{}"><caption>{}</caption><thead><tr>{}</tr></thead>'
        "<tbody>{}</tbody></table></div>"
    ).format(name, caption, head, body)


def form(
    ctx: PageContext,
    action: str,
    fields: Markup,
    submit: str,
    *,
    danger: bool = False,
    name: str = "",
) -> Markup:
    """A POST form to ``action`` (a page path) with the session's form token."""
    return Markup(
        '<form method="post" action="{}" data-form="{}">'
        '<input type="hidden" name="csrf" value="{}">{}'
        '<button type="submit"{}>{}</button></form>'
    ).format(
        ctx.url(action), name, ctx.form_token, fields, Markup(' class="danger"') if danger else "", submit
    )


def field_row(label: str, control: Markup, *, hint: str = "") -> Markup:
    """A labelled form control (``control`` must carry ``id`` = the slug of ``label``)."""
    hint_html = Markup('<span class="hint">{}</span>').format(hint) if hint else Markup("")
    return Markup('<div class="field"><label for="{}">{}</label>{}{}</div>').format(
        slug(label), label, control, hint_html
    )


def slug(text: str) -> str:
    """``text`` as an HTML id: lower case, anything but letters and digits a dash."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def notice(text: str, *, kind: str = "info") -> Markup:
    """A status line (``kind``: info, ok, warn or error), announced to screen readers."""
    return Markup('<p class="notice {}" role="status">{}</p>').format(kind, text)


def page(
    ctx: PageContext,
    *,
    title: str,
    current: str,
    body: Markup,
    refresh: int | None = None,
    status: int = 200,
) -> PortalResponse:
    """A whole page of one customer: the header, the navigation (``current`` is the active path), the body."""
    nav = Markup("").join(
        Markup('<a href="{}"{}>{}</a>').format(
            ctx.url(path), Markup(' aria-current="page"') if path == current else "", label
        )
        for path, label in NAVIGATION
    )
    customer = ctx.customer
    sign_out = Markup("") if ctx.operator else sign_out_form(ctx.root, ctx.form_token)
    header = Markup(
        '{}<header><div class="brand">{}</div><div class="who"><span data-field="customer">{}</span> '
        '<span class="plan" data-field="plan">{}</span>{}</div></header>'
        '<nav aria-label="Account">{}</nav>'
    ).format(ctx.banner, "API account", customer.id, customer.plan, sign_out, nav)
    return document(
        ctx.root,
        f"{title} \u00b7 {customer.id}",
        header + Markup("<main>{}</main>").format(body),
        refresh,
        status,
    )


def sign_out_form(root: str, form_token: str) -> Markup:
    """The header's sign-out button (the view's ``/logout`` at the mount)."""
    return Markup(
        '<form method="post" action="{}/logout" class="sign-out">'
        '<input type="hidden" name="csrf" value="{}"><button type="submit">Sign out</button></form>'
    ).format(root, form_token)


def sign_in_page(root: str, customer_id: str, token: str) -> PortalResponse:
    """What a sign-in link opens: a button that posts the link back (the post signs in)."""
    content = Markup(
        '<main class="message"><h1>Sign in</h1>'
        '<p>Open the account of <strong data-field="customer">{}</strong>.</p>'
        '<form method="post" action="{}/login" data-form="sign-in">'
        '<input type="hidden" name="token" value="{}">'
        '<button type="submit">Continue to the account</button></form></main>'
    ).format(customer_id, root, token)
    return document(root, "Sign in", content)


def document(
    root: str, title: str, content: Markup, refresh: int | None = None, status: int = 200
) -> PortalResponse:
    """The HTML document around ``content``."""
    meta = Markup('<meta http-equiv="refresh" content="{}">').format(refresh) if refresh else Markup("")
    html = Markup(
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">{}'
        '<title>{}</title><link rel="stylesheet" href="{}/static/portal.css"></head>'
        "<body>{}</body></html>"
    ).format(meta, title, root, content)
    return PortalResponse(status, str(html).encode())


def message_page(root: str, status: int, title: str, detail: str) -> PortalResponse:
    """A page outside any session: a sign-in problem, a page not found."""
    content = Markup('<main class="message"><h1>{}</h1><p>{}</p></main>').format(title, detail)
    return document(root, title, content, status=status)


def stylesheet() -> PortalResponse:
    """The portal's stylesheet."""
    return PortalResponse(200, STYLESHEET, "text/css; charset=utf-8")


def definition_list(items: Mapping[str, Markup | str]) -> Markup:
    """Labelled facts side by side (balance, reserved, available...)."""
    return Markup('<dl class="facts">{}</dl>').format(
        Markup("").join(Markup("<div><dt>{}</dt><dd>{}</dd></div>").format(k, v) for k, v in items.items())
    )
