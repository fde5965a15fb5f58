"""The ingestion endpoint: usage recorded by services in other languages, over HTTP.

Mount it next to your API (or serve it alone), with the configuration the middleware reads::

    app.mount("/ingest", meterware.ingest.asgi_app())                          # Starlette / FastAPI
    application = meterware.ingest.wsgi_app()                                  # any WSGI server

Mounted inside a metered app, add its path to ``routes.exclude``: the operator's token is not a key.
A ``POST`` with ``Authorization: Bearer <operator token>`` (``$METERWARE_ADMIN_TOKEN``, the portal's
``portal.admin_token_env``, or ``token=``; at least 32 characters) and a JSON body::

    {"events": [{"event_id": "job-1", "customer": "acme", "units": {"tokens": 1200},
                 "dimensions": {"model": "large"}}, ...]}

(``dimensions`` optional: the values of the meters' dimensions) records each event as
:func:`meterware.record` does (the same admission, settlement, refusals and deduplication by ``event_id``)
and answers ``202`` with one result per event, in order::

    {"results": [{"event_id": "job-1", "status": "recorded", "event": "0190..."},
                 {"event_id": "job-2", "status": "duplicate"},
                 {"event_id": "job-3", "status": "refused", "reason": "insufficient_credits"},
                 {"event_id": "job-4", "status": "invalid", "reason": "no such meter is configured: ..."},
                 {"event_id": "job-5", "status": "error", "reason": "backend unavailable; retry"}]}

``recorded`` means what ``Recorded(recorded=True)`` does (buffered; the id is charged once, also when the
process dies before its flush and the batch is sent again), ``duplicate`` charged before; ``error`` is
worth a retry with the same id, the others are not. A bad token gets 401, a body that is not such a
batch 400 (nothing recorded), more than :data:`MAX_EVENTS` events or :data:`MAX_BODY_BYTES` bytes 413,
another method 405.
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.wrappers import Request, Response

from meterware.config import Config, resolve_config
from meterware.errors import StorageError, UsageError
from meterware.portal.tokens import operator_token
from meterware.recording import Recorded, Recorder, Refused

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment
    from starlette.types import Receive, Scope, Send

__all__ = ["IngestApp", "IngestWSGIApp", "asgi_app", "wsgi_app"]

#: Events one request may carry, and the bytes of its body.
MAX_EVENTS: Final = 1000
MAX_BODY_BYTES: Final = 1 << 20
_JSON: Final = [("content-type", "application/json"), ("cache-control", "no-store")]


@dataclass(frozen=True, slots=True)
class Item:
    """One event of a batch, as sent (checked by the recorder)."""

    event_id: Any
    customer: Any
    units: Any
    dimensions: Any = None


class BadRequest(Exception):
    """The request is not a batch this endpoint takes: ``status`` and the reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def parse_batch(body: bytes) -> list[Item]:
    """The events of a request body; :class:`BadRequest` if it is not ``{"events": [{...}, ...]}``."""
    if len(body) > MAX_BODY_BYTES:
        raise BadRequest(413, f"the body is over {MAX_BODY_BYTES} bytes")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise BadRequest(400, "the body is not JSON") from None
    events = data.get("events") if isinstance(data, dict) else None
    if not isinstance(events, list) or not all(isinstance(event, dict) for event in events):
        raise BadRequest(400, 'the body must be {"events": [{"event_id", "customer", "units"}, ...]}')
    if len(events) > MAX_EVENTS:
        raise BadRequest(413, f"at most {MAX_EVENTS} events per request")
    return [
        Item(event.get("event_id"), event.get("customer"), event.get("units"), event.get("dimensions"))
        for event in events
    ]


def _checked(item: Item) -> tuple[str, str, Mapping[str, int]]:
    if not isinstance(item.customer, str) or not item.customer:
        raise UsageError("customer must be a non-empty string")
    if not isinstance(item.units, dict):
        raise UsageError("units must be an object of meter name to units")
    if not isinstance(item.event_id, str):
        raise UsageError("event_id must be a string")
    return item.customer, item.event_id, item.units


def result(item: Item, done: Recorded | BaseException) -> dict[str, str]:
    """One event's entry in the response."""
    event_id = item.event_id if isinstance(item.event_id, str) else ""
    if isinstance(done, Recorded):
        if done.recorded:
            return {"event_id": event_id, "status": "recorded", "event": done.stream_event_id}
        return {"event_id": event_id, "status": "duplicate"}
    if isinstance(done, Refused):
        return {"event_id": event_id, "status": "refused", "reason": done.reason}
    if isinstance(done, UsageError):
        return {"event_id": event_id, "status": "invalid", "reason": str(done).removeprefix("record(): ")}
    return {"event_id": event_id, "status": "error", "reason": "backend unavailable; retry"}


class _Ingest:
    """What both twins share: the configuration, the operator token, the recorder, the answers."""

    def __init__(self, config: Config, token: str | None) -> None:
        self._token = operator_token(config.portal, "the ingestion endpoint needs token= or", token)
        self.recorder = Recorder(config)

    def authorized(self, header: str) -> bool:
        scheme, _, presented = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), self._token)

    def refusal(self, method: str, authorization: str) -> tuple[int, dict[str, Any]] | None:
        """The answer to a request that is not a batch to record, or None."""
        if method != "POST":
            return 405, {"error": "POST a batch of events"}
        if not self.authorized(authorization):
            return 401, {"error": "an operator token is required: Authorization: Bearer <token>"}
        return None

    def record(self, item: Item, down: StorageError | None) -> Recorded | BaseException:
        """Record one event; once the backend has failed (``down``) the rest of the batch is not tried, so
        a request's work stays bounded."""
        if down is not None:
            return down
        try:
            customer, event_id, units = _checked(item)
            return self.recorder.record(customer, units, event_id=event_id, dimensions=item.dimensions)
        except (Refused, UsageError, StorageError) as error:
            return error

    async def arecord(self, item: Item, down: StorageError | None) -> Recorded | BaseException:
        if down is not None:
            return down
        try:
            customer, event_id, units = _checked(item)
            return await self.recorder.arecord(customer, units, event_id=event_id, dimensions=item.dimensions)
        except (Refused, UsageError, StorageError) as error:
            return error


def _body(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


class IngestWSGIApp(_Ingest):
    """The ingestion endpoint as a WSGI app (see the module's docstring)."""

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Any:
        request = Request(environ)
        request.max_content_length = MAX_BODY_BYTES  # a chunked body is not read past it
        status, data = self.answer(request)
        response = Response(_body(data), status=status, headers=_JSON)
        return response(environ, start_response)

    def answer(self, request: Request) -> tuple[int, dict[str, Any]]:
        refused = self.refusal(request.method, request.headers.get("Authorization", ""))
        if refused is not None:
            return refused
        if (request.content_length or 0) > MAX_BODY_BYTES:
            return 413, {"error": f"the body is over {MAX_BODY_BYTES} bytes"}
        try:
            items = parse_batch(request.get_data(cache=False))
        except BadRequest as error:
            return error.status, {"error": error.reason}
        except RequestEntityTooLarge:
            return 413, {"error": f"the body is over {MAX_BODY_BYTES} bytes"}
        results, down = [], None
        for item in items:
            done = self.record(item, down)
            down = done if isinstance(done, StorageError) else down
            results.append(result(item, done))
        return 202, {"results": results}

    def close(self) -> None:
        """Flush what was recorded and close the backend clients."""
        self.recorder.close()


class IngestApp(_Ingest):
    """The ingestion endpoint as a pure ASGI app (its lifespan's shutdown flushes what it recorded)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        headers = {name.lower(): value for name, value in scope["headers"]}
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        status, data = await self.answer(scope["method"], authorization, receive)
        body = _body(data)
        start = [(name.encode(), value.encode()) for name, value in _JSON]
        start.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": start})
        await send({"type": "http.response.body", "body": body})

    async def answer(
        self, method: str, authorization: str, receive: Callable[[], Awaitable[Any]]
    ) -> tuple[int, dict[str, Any]]:
        refused = self.refusal(method, authorization)
        if refused is not None:
            return refused
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return 400, {"error": "the client went away"}
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                return 413, {"error": f"the body is over {MAX_BODY_BYTES} bytes"}
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        try:
            items = parse_batch(b"".join(chunks))
        except BadRequest as error:
            return error.status, {"error": error.reason}
        results, down = [], None
        for item in items:
            done = await self.arecord(item, down)
            down = done if isinstance(done, StorageError) else down
            results.append(result(item, done))
        return 202, {"results": results}

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.recorder.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def aclose(self) -> None:
        """Flush what was recorded and close the backend clients."""
        await self.recorder.aclose()


def asgi_app(
    config: Config | str | os.PathLike[str] | dict[str, Any] | None = None, *, token: str | None = None
) -> IngestApp:
    """The ingestion endpoint for an ASGI server (``config`` as the middleware takes it)."""
    return IngestApp(resolve_config(config, {}), token)


def wsgi_app(
    config: Config | str | os.PathLike[str] | dict[str, Any] | None = None, *, token: str | None = None
) -> IngestWSGIApp:
    """The ingestion endpoint for a WSGI server (``config`` as the middleware takes it)."""
    return IngestWSGIApp(resolve_config(config, {}), token)
