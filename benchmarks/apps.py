"""The ASGI apps the benchmarks serve: one trivial JSON endpoint, bare and behind meterware.

Factories, for ``uvicorn --factory``: the metered ones read ``METERWARE_CONFIG`` (written by the suite).
``/bench/key`` (excluded from metering) creates a customer with effectively unlimited credits and quota
inside the server process and returns its key: a ``memory://`` store lives in the process that serves.
``/bench/where`` (excluded too) answers the path of the meterware the server imported, which the suite
checks before it measures (``--baseline`` serves another revision's).
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from tests.helpers import new_customer

import meterware
from meterware import Accounts, Config, MeteringMiddleware

#: The plan of the benchmark customer: a rate limit, a hard quota and prepaid credits, all checked on
#: every call (so the whole admission runs) and none ever reached (so every call is admitted).
PLAN = "bench"
CREDITS = "1000000"
CREDITS_MICROS = 1_000_000 * 1_000_000
CONFIG = """\
[storage]
url = "{storage}"
shards = {shards}

[meters.calls]
aggregation = "count"

[plans.bench]
prepaid = true
rate_limits = ["1000000/second"]
[plans.bench.meters.calls]
price = "0.000001"
quota = 1000000000000
quota_mode = "hard"

[routes]
exclude = ["/bench/*"]

[policy]
# A backend error must show up as a failed run (503), never as a call served without the backend.
on_backend_error = "closed"
admission = "{admission}"

[pipeline]
spool_dir = "{spool}"
"""


def config_text(storage: str, spool: str | Path, admission: str = "strict", shards: int = 16) -> str:
    """The benchmark's configuration file: ``storage``, the spool directory, the admission mode, shards."""
    return CONFIG.format(storage=storage, spool=spool, admission=admission, shards=shards)


def create_customer(accounts: Accounts) -> tuple[str, str]:
    """A new benchmark customer with unlimited credits: its id and its key's plaintext."""
    customer = f"bench-{uuid.uuid4().hex[:12]}"
    return customer, new_customer(accounts, customer, CREDITS, plan=PLAN).plaintext


async def hello(request: Request) -> JSONResponse:
    return JSONResponse({"hello": "world"})


async def new_key(request: Request) -> PlainTextResponse:
    _, key = create_customer(Accounts.open(Config.load(os.environ["METERWARE_CONFIG"])))
    return PlainTextResponse(key)


async def where(request: Request) -> PlainTextResponse:
    return PlainTextResponse(str(meterware.__file__))


def starlette_bare() -> Starlette:
    return Starlette(routes=[Route("/v1/hello", hello)])


def starlette_busy() -> Starlette:
    """The bare app, whose handler first burns ``BENCH_WORK_US`` microseconds of CPU (the ruler's app)."""
    work = float(os.environ.get("BENCH_WORK_US", "0")) / 1e6

    async def busy_hello(request: Request) -> JSONResponse:
        deadline = time.perf_counter() + work
        while time.perf_counter() < deadline:
            pass
        return JSONResponse({"hello": "world"})

    return Starlette(routes=[Route("/v1/hello", busy_hello)])


def starlette_metered() -> Starlette:
    routes = [Route("/v1/hello", hello), Route("/bench/key", new_key), Route("/bench/where", where)]
    app = Starlette(routes=routes)
    app.add_middleware(MeteringMiddleware, config=os.environ["METERWARE_CONFIG"])
    return app


def fastapi_bare() -> FastAPI:
    app = FastAPI()

    @app.get("/v1/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    return app


def fastapi_metered() -> FastAPI:
    app = fastapi_bare()
    app.add_api_route("/bench/key", new_key, response_class=PlainTextResponse)
    app.add_api_route("/bench/where", where, response_class=PlainTextResponse)
    app.add_middleware(MeteringMiddleware, config=os.environ["METERWARE_CONFIG"])
    return app
