"""An API metered by meterware with the customer portal at ``/portal`` and the operator view at ``/admin``,
as a Starlette app (served by uvicorn) and as a Flask app (served by gunicorn), for the browser tests.

Configured like a deployment: ``METERWARE_CONFIG`` names the TOML file, ``METERWARE_PORTAL_SECRET`` and
``METERWARE_ADMIN_TOKEN`` are in the environment. Both apps answer the same API:

- ``/v1/hello``: 200; ``/v1/tokens/<n>``: 200, reporting ``n`` units of the ``tokens`` meter;
- ``/v1/fail``: 503; any other path: 404.
"""

from __future__ import annotations

from flask import Flask
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from werkzeug.middleware.dispatcher import DispatcherMiddleware

import meterware
import meterware.portal
from meterware.asgi import MeteringMiddleware
from meterware.wsgi import WSGIMeteringMiddleware


async def hello(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


async def tokens(request: Request) -> JSONResponse:
    count = int(request.path_params["count"])
    meterware.usage.add("tokens", count)
    return JSONResponse({"tokens": count})


async def fail(request: Request) -> JSONResponse:
    return JSONResponse({"error": "overloaded"}, status_code=503)


def starlette_app() -> Starlette:
    """The API and, next to it, the portal and the operator view, all behind the metering middleware
    (which leaves ``routes.portal`` and ``routes.admin`` alone)."""
    app = Starlette(
        routes=[
            Route("/v1/hello", hello),
            Route("/v1/tokens/{count:int}", tokens),
            Route("/v1/fail", fail),
            Mount("/portal", meterware.portal.asgi_app()),
            Mount("/admin", meterware.portal.admin_asgi_app()),
        ]
    )
    app.add_middleware(MeteringMiddleware)
    return app


def flask_app() -> Flask:
    """The same API in Flask; the portal and the operator view mounted with werkzeug's dispatcher."""
    app = Flask(__name__)

    @app.get("/v1/hello")
    def flask_hello() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/v1/tokens/<int:count>")
    def flask_tokens(count: int) -> dict[str, int]:
        meterware.usage.add("tokens", count)
        return {"tokens": count}

    @app.get("/v1/fail")
    def flask_fail() -> tuple[dict[str, str], int]:
        return {"error": "overloaded"}, 503

    mounted = DispatcherMiddleware(
        app.wsgi_app,
        {"/portal": meterware.portal.wsgi_app(), "/admin": meterware.portal.admin_wsgi_app()},
    )
    app.wsgi_app = WSGIMeteringMiddleware(mounted)  # type: ignore[method-assign]
    return app
