"""The Flask apps the benchmarks serve: the same trivial JSON endpoint, bare and behind meterware.

Factories, for gunicorn's ``module:factory()``; ``benchmarks.apps`` says what ``/bench/key`` is for.
"""

from __future__ import annotations

import os

from flask import Flask

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

    app.wsgi_app = WSGIMeteringMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, config=os.environ["METERWARE_CONFIG"]
    )
    return app
