"""The Flask apps the benchmarks serve: the same trivial JSON endpoint, bare, behind meterware, and
behind Flask-Limiter (a peer).

Factories, for gunicorn's ``module:factory()``; ``benchmarks.apps`` says what ``/bench/key`` is for.
"""

from __future__ import annotations

import os

from flask import Flask

import meterware
from benchmarks.apps import create_customer
from meterware import Accounts, Config
from meterware.wsgi import WSGIMeteringMiddleware


def flask_bare() -> Flask:
    app = Flask(__name__)

    @app.get("/v1/hello")
    def hello() -> dict[str, str]:
        return {"hello": "world"}

    return app


def flask_metered() -> Flask:
    app = flask_bare()

    @app.get("/bench/key")
    def new_key() -> str:
        _, key = create_customer(Accounts.open(Config.load(os.environ["METERWARE_CONFIG"])))
        return key

    @app.get("/bench/where")
    def where() -> str:
        return str(meterware.__file__)

    app.wsgi_app = WSGIMeteringMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, config=os.environ["METERWARE_CONFIG"]
    )
    return app


def flask_limiter() -> Flask:
    """The bare app behind Flask-Limiter: a fixed window of 1,000,000/second per Authorization header, on
    the suite's Redis (``BENCH_REDIS_URL``): one script in Redis per call, 429 when over."""
    from flask import request
    from flask_limiter import Limiter

    app = flask_bare()
    Limiter(
        lambda: request.headers["Authorization"],
        app=app,
        default_limits=["1000000/second"],
        storage_uri=os.environ["BENCH_REDIS_URL"],
    )
    return app
