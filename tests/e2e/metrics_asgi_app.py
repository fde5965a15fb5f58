"""A Starlette app under a real uvicorn process in the metrics tests; ``/metrics`` is mounted with one line.

Configured like a deployment: ``METERWARE_CONFIG`` and ``METERWARE_STORAGE`` in the environment.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import meterware
from meterware import MeteringMiddleware, metrics


async def hello(request: Request) -> Response:
    return JSONResponse({"ok": True})


async def item(request: Request) -> Response:
    return JSONResponse({"id": request.path_params["id"]})


async def fail(request: Request) -> Response:
    return JSONResponse({"error": "overloaded"}, status_code=503)


async def boom(request: Request) -> Response:
    raise RuntimeError("boom")


def tokens(request: Request) -> Response:
    count = int(request.path_params["count"])
    meterware.usage.add("tokens", count)
    return JSONResponse({"tokens": count})


asgi = Starlette(
    routes=[
        Route("/v1/hello", hello),
        Route("/v1/items/{id}", item),
        Route("/v1/fail", fail),
        Route("/v1/boom", boom),
        Route("/v1/tokens/{count:int}", tokens),
        Route("/metrics", metrics.asgi_app()),
    ]
)
asgi.add_middleware(MeteringMiddleware)
