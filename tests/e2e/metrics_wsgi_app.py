"""A Flask app under a real gunicorn with several worker processes, in the multiprocess metrics test.

Configured like a deployment: ``METERWARE_CONFIG``, ``METERWARE_STORAGE`` and ``PROMETHEUS_MULTIPROC_DIR``
in the environment; ``/metrics`` is mounted with one line and sums every worker's values.
"""

from __future__ import annotations

import os

from flask import Flask
from werkzeug.middleware.dispatcher import DispatcherMiddleware

import meterware
from meterware import metrics
from meterware.wsgi import WSGIMeteringMiddleware

flask = Flask(__name__)


@flask.get("/v1/pid")
def pid() -> dict[str, int]:
    meterware.usage.add("tokens", 2)
    return {"pid": os.getpid()}


flask.wsgi_app = WSGIMeteringMiddleware(  # type: ignore[method-assign]
    DispatcherMiddleware(flask.wsgi_app, {"/metrics": metrics.wsgi_app()})
)
