"""A Flask app metered with one line, served by real gunicorn processes in the end-to-end tests.

Configured like a deployment: ``METERWARE_CONFIG`` and ``METERWARE_STORAGE`` in the environment.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import NoReturn

from flask import Flask, Response

import meterware
from meterware.wsgi import WSGIMeteringMiddleware

app = Flask(__name__)
app.wsgi_app = WSGIMeteringMiddleware(app.wsgi_app)  # type: ignore[method-assign]


@app.get("/v1/hello")
def hello() -> dict[str, int]:
    return {"pid": os.getpid()}


@app.get("/v1/fail")
def fail() -> tuple[dict[str, str], int]:
    return {"error": "overloaded"}, 503


@app.get("/v1/boom")
def boom() -> NoReturn:
    raise RuntimeError("boom")


@app.get("/v1/tokens/<int:count>")
def tokens(count: int) -> dict[str, int]:
    meterware.usage.add("tokens", count)
    return {"tokens": count}


@app.get("/v1/stream/<int:count>")
def stream(count: int) -> Response:
    """``count`` chunks, one token each, reported while the body streams."""

    def chunks() -> Iterator[bytes]:
        for index in range(count):
            meterware.usage.add("tokens", 1)
            yield f"chunk {index}\n".encode()
            time.sleep(0.001)

    return Response(chunks(), mimetype="text/plain")


@app.get("/v1/slow-stream")
def slow_stream() -> Response:
    """Up to 200 chunks, 10 ms apart: long enough for a client to go away in the middle."""

    def chunks() -> Iterator[bytes]:
        for index in range(200):
            yield f"chunk {index}\n".encode()
            time.sleep(0.01)

    return Response(chunks(), mimetype="text/plain")


@app.get("/v1/closing/<int:count>")
def closing(count: int) -> Response:
    """A response whose work when closed (after its body went out) takes half a second, then reports
    ``count`` tokens."""
    response = Response("done\n", mimetype="text/plain")

    @response.call_on_close
    def finish_work() -> None:
        time.sleep(0.5)
        meterware.usage.add("tokens", count)

    return response


if __name__ == "__main__":  # `python flask_app.py`: Flask's own development server (werkzeug's run_simple)
    app.run(host="127.0.0.1", port=int(os.environ["PORT"]))
