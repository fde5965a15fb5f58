"""The Flask apps the WSGI benchmark serves: the same trivial JSON endpoint, bare and behind meterware."""

from __future__ import annotations

import os
import uuid

from flask import Flask

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
        """Create a customer with credits inside this worker (memory:// lives in the server process)."""
        accounts = Accounts.open(Config.load(os.environ["METERWARE_CONFIG"]))
        customer = f"bench-{uuid.uuid4().hex[:8]}"
        accounts.create_customer(customer, plan="payg")
        accounts.grant_credits(customer, "1000000")
        return accounts.create_key(customer).plaintext

    app.wsgi_app = WSGIMeteringMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    return app


bare = flask_bare()
metered = flask_metered() if "METERWARE_CONFIG" in os.environ else None
