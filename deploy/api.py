"""The example API compose.yaml runs: ``examples/fastapi_app.py`` with its Prometheus metrics at
``/metrics`` and the customer portal at ``/portal`` (both excluded from metering in deploy/meterware.toml).

    uvicorn --app-dir /srv/app api:app --host 0.0.0.0 --port 8000
"""

from __future__ import annotations

from fastapi_app import app  # examples/fastapi_app.py, mounted next to this file

import meterware.metrics
import meterware.portal

app.add_route("/metrics", meterware.metrics.endpoint)
app.mount("/portal", meterware.portal.asgi_app())

__all__ = ["app"]
