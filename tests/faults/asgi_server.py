"""The bare ASGI app of the fault suite, metered by one line (served by uvicorn)."""

from meterware import MeteringMiddleware
from tests.faults.apps import bare_asgi

app = MeteringMiddleware(bare_asgi)
