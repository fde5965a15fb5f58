"""A bare WSGI app metered with one line, served by the standard library's ``wsgiref`` server.

``python wsgiref_app.py``: a single-threaded server whose main thread serves the calls. Configured like a
deployment: ``METERWARE_CONFIG`` and ``METERWARE_STORAGE`` in the environment, ``PORT`` for the port.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING
from wsgiref.simple_server import make_server

from meterware.wsgi import WSGIMeteringMiddleware

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment


def hello(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """``ok``; on ``/v1/slow``, after a second."""
    if environ["PATH_INFO"] == "/v1/slow":
        time.sleep(1.0)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


app = WSGIMeteringMiddleware(hello)

if __name__ == "__main__":
    with make_server("127.0.0.1", int(os.environ["PORT"]), app) as server:
        server.serve_forever()
