"""Bare ASGI and WSGI apps for the fault suite, served metered by real uvicorn and gunicorn processes.

No framework router on purpose: an app without one leaves no route template, so each event records the
request's own path, and every path the load generator sends carries a unique id. The test can then say,
request by request, which calls have an event, which were charged, and which were lost.

``tests.faults.asgi_server:app`` and ``tests.faults.wsgi_server:app`` wrap them with one line each,
configured like a deployment: ``METERWARE_CONFIG`` and ``METERWARE_STORAGE`` in the environment.

Endpoints (``<id>`` is anything unique):

- ``/v1/ok/<id>``: 200;  ``/v1/fail/<id>``: 503;  ``/v1/boom/<id>``: the app raises;
- ``/v1/slow/<id>?s=0.4``: 200 after a pause (holds its reservation meanwhile);
- ``/v1/stream/<id>?n=20&delay=0.05``: ``n`` chunks, one token each; it never listens for a disconnect;
- ``/v1/tokens/<id>?n=5``: reports ``n`` tokens;  ``/v1/units/<id>?kind=nan``: reports hostile units;
- ``/v1/live/<id>``: a live-only route (``routes.live_only``);
- ``/health`` (excluded from metering), ``/metrics`` (the app's Prometheus metrics, excluded too).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs

from starlette.types import Receive, Scope, Send

import meterware
from meterware.metrics import asgi_app as metrics_asgi_app
from meterware.metrics import wsgi_app as metrics_wsgi_app

#: What ``/v1/units/<id>?kind=...`` reports: one valid value, and every kind of value that must be refused.
HOSTILE_UNITS: dict[str, tuple[str, Any]] = {
    "valid": ("tokens", 7),
    "negative": ("tokens", -5),
    "nan": ("tokens", math.nan),
    "infinite": ("tokens", math.inf),
    "fraction": ("tokens", 2.5),
    "huge": ("tokens", 2**60),
    # Valid units, but their price (0.0001 a token) is past what one call may cost: 10**9 credits.
    "costly": ("tokens", 10**13),
    "text": ("tokens", "12"),
    "none": ("tokens", None),
    "list": ("tokens", [1, 2]),
    "boolean": ("tokens", True),
    "unknown-meter": ("no-such-meter", 3),
}
#: Units of ``rows`` (unpriced) reported by a ``huge-sum`` call: each value is valid, their sum is not.
HUGE_SUM = (2**52, 2**52)


def _query(raw: bytes | str) -> dict[str, str]:
    text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    return {name: values[-1] for name, values in parse_qs(text).items()}


def _report_units(kind: str) -> None:
    if kind == "huge-sum":
        for value in HUGE_SUM:
            meterware.usage.add("rows", value)
        return
    meter, value = HOSTILE_UNITS[kind]
    meterware.usage.add(meter, value)


def _route(path: str) -> str:
    """The endpoint a path names: ``/v1/<route>/<id>``."""
    parts = path.split("/")
    return parts[2] if len(parts) > 3 and parts[1] == "v1" else ""


def _json(data: object) -> bytes:
    return json.dumps(data).encode()


# -- ASGI -----------------------------------------------------------------------------------------------


async def bare_asgi(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI app under the middleware."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    path: str = scope["path"]
    if path == "/metrics":
        await metrics_asgi_app()(scope, receive, send)
        return
    query = _query(scope.get("query_string", b""))
    route = _route(path)
    status, body = 200, _json({"path": path})
    if route == "fail":
        status = 503
    elif route == "boom":
        raise RuntimeError("boom")
    elif route == "slow":
        await asyncio.sleep(float(query.get("s", "0.4")))
    elif route == "tokens":
        meterware.usage.add("tokens", int(query.get("n", "5")))
    elif route == "units":
        _report_units(query.get("kind", "valid"))
    elif route == "stream":
        await _stream_asgi(send, int(query.get("n", "20")), float(query.get("delay", "0.05")))
        return
    elif path != "/health" and route not in ("ok", "live"):
        status = 404
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _stream_asgi(send: Callable[..., Any], count: int, delay: float) -> None:
    # Like many hand-written streams, this one never calls receive(): it cannot see the client leave.
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    for index in range(count):
        meterware.usage.add("tokens", 1)
        await send({"type": "http.response.body", "body": f"chunk {index}\n".encode(), "more_body": True})
        await asyncio.sleep(delay)
    await send({"type": "http.response.body", "body": b""})


# -- WSGI -----------------------------------------------------------------------------------------------


def bare_wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """The WSGI app under the middleware (the same endpoints)."""
    path: str = environ.get("PATH_INFO", "")
    if path == "/metrics":
        return metrics_wsgi_app()(environ, start_response)  # type: ignore[arg-type]
    query = _query(environ.get("QUERY_STRING", ""))
    route = _route(path)
    status, body = "200 OK", _json({"path": path})
    if route == "fail":
        status = "503 Service Unavailable"
    elif route == "boom":
        raise RuntimeError("boom")
    elif route == "slow":
        time.sleep(float(query.get("s", "0.4")))
    elif route == "tokens":
        meterware.usage.add("tokens", int(query.get("n", "5")))
    elif route == "units":
        _report_units(query.get("kind", "valid"))
    elif route == "stream":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _stream_wsgi(int(query.get("n", "20")), float(query.get("delay", "0.05")))
    elif path != "/health" and route not in ("ok", "live"):
        status = "404 Not Found"
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def _stream_wsgi(count: int, delay: float) -> Iterator[bytes]:
    for index in range(count):
        meterware.usage.add("tokens", 1)
        yield f"chunk {index}\n".encode()
        time.sleep(delay)
