"""gunicorn settings for a metered app whose Prometheus metrics add up over every worker process.

    export PROMETHEUS_MULTIPROC_DIR=/run/myapi-metrics     # one directory per app, set before gunicorn starts
    mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
    gunicorn -c gunicorn.conf.py myapi:app

Each worker writes its metric values to files in ``PROMETHEUS_MULTIPROC_DIR``; the ``/metrics`` endpoint
mounted with ``meterware.metrics.wsgi_app()`` (or ``asgi_app()`` under uvicorn workers) sums them, whichever
worker serves the scrape. Counters of exited workers stay in the totals; their live gauges (buffer depth and
capacity) are dropped by ``child_exit``.
"""

import os
import shutil

from meterware.metrics import child_exit  # noqa: F401  (a gunicorn hook: drops an exited worker's gauges)

workers = int(os.environ.get("WEB_CONCURRENCY", "4"))
# Recycling workers is fine: their counters outlive them.
max_requests = 10_000
max_requests_jitter = 1_000


def on_starting(server: object) -> None:
    """Empty the metrics directory before the first worker starts: files of a previous run would add up."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path, exist_ok=True)
