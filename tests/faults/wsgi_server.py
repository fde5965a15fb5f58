"""The bare WSGI app of the fault suite, metered by one line (served by gunicorn)."""

from meterware.wsgi import WSGIMeteringMiddleware
from tests.faults.apps import bare_wsgi

app = WSGIMeteringMiddleware(bare_wsgi)
