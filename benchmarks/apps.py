"""The apps the benchmarks serve: the same trivial JSON endpoint, bare and behind meterware."""

from __future__ import annotations

import os
import uuid

from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from meterware import Accounts, Config, MeteringMiddleware


async def hello(request: object) -> JSONResponse:
    return JSONResponse({"hello": "world"})


def starlette_bare() -> Starlette:
    return Starlette(routes=[Route("/v1/hello", hello)])


async def new_key(request: object) -> PlainTextResponse:
    """Create a customer with credits inside this process (memory:// lives in the server process)."""
    accounts = Accounts.open(Config.load(os.environ["METERWARE_CONFIG"]))
    customer = f"bench-{uuid.uuid4().hex[:8]}"
    accounts.create_customer(customer, plan="payg")
    accounts.grant_credits(customer, "1000000")
    return PlainTextResponse(accounts.create_key(customer).plaintext)


def starlette_metered() -> Starlette:
    app = Starlette(routes=[Route("/v1/hello", hello), Route("/bench/key", new_key)])
    app.add_middleware(MeteringMiddleware, config=os.environ["METERWARE_CONFIG"])
    return app


bare = starlette_bare()
metered = starlette_metered() if "METERWARE_CONFIG" in os.environ else None
