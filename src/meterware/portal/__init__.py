"""The customer portal: usage, spend, invoices, credits, API keys and alerts, in the browser.

Mount it next to the API with one line, on the configuration the middleware reads::

    app.mount("/portal", meterware.portal.asgi_app())                       # Starlette / FastAPI
    app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/portal": meterware.portal.wsgi_app()})  # Flask

and tell the middleware not to meter it, ``routes.portal = "/portal"``. Customers sign in with a link
that works once and for a short time (``portal.link_seconds``), issued by your app or the CLI::

    link = meterware.portal.sign_in_link("acme", base_url="https://api.example.com/portal")
    $ meterware portal link acme --base-url https://api.example.com/portal

The link opens a session (an HttpOnly, SameSite=Lax cookie, ``Secure`` unless ``portal.secure_cookies``
is false, for ``portal.session_seconds``) for that customer's pages only. Links, sessions and forms are
signed with the secret in ``$METERWARE_PORTAL_SECRET`` (``portal.secret_env``), the same in every
process. The operator view (:func:`admin_asgi_app`, :func:`admin_wsgi_app`) lists every customer and
opens any customer's pages; see :mod:`meterware.portal.admin`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from meterware.config import Config, resolve_config
from meterware.portal.admin import Authorize, OperatorView
from meterware.portal.http import PortalASGIApp, PortalRequest, PortalResponse, PortalWSGIApp
from meterware.portal.tokens import sign_in_link
from meterware.portal.views import CustomerPortal

__all__ = [
    "Authorize",
    "CustomerPortal",
    "OperatorView",
    "PortalRequest",
    "PortalResponse",
    "admin_asgi_app",
    "admin_wsgi_app",
    "asgi_app",
    "sign_in_link",
    "wsgi_app",
]

ConfigSource = Config | str | os.PathLike[str] | Mapping[str, Any] | None


def asgi_app(config: ConfigSource = None, **overrides: Any) -> PortalASGIApp:
    """The customer portal for Starlette / FastAPI / any ASGI router: ``app.mount("/portal", asgi_app())``."""
    portal = CustomerPortal(resolve_config(config, overrides))
    return PortalASGIApp(portal, "portal", portal.close)


def wsgi_app(config: ConfigSource = None, **overrides: Any) -> PortalWSGIApp:
    """The customer portal for Flask / any WSGI app (mount it with werkzeug's ``DispatcherMiddleware``)."""
    portal = CustomerPortal(resolve_config(config, overrides))
    return PortalWSGIApp(portal, "portal", portal.close)


def admin_asgi_app(
    config: ConfigSource = None, *, authorize: Authorize | None = None, **overrides: Any
) -> PortalASGIApp:
    """The operator view as an ASGI app; ``authorize`` is your own check (see :mod:`meterware.portal.admin`),
    else the admin token in ``$METERWARE_ADMIN_TOKEN`` signs operators in."""
    view = OperatorView(resolve_config(config, overrides), authorize=authorize)
    return PortalASGIApp(view, "admin", view.close)


def admin_wsgi_app(
    config: ConfigSource = None, *, authorize: Authorize | None = None, **overrides: Any
) -> PortalWSGIApp:
    """The operator view as a WSGI app."""
    view = OperatorView(resolve_config(config, overrides), authorize=authorize)
    return PortalWSGIApp(view, "admin", view.close)
