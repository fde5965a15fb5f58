"""Django middleware: one line in ``MIDDLEWARE``.

    MIDDLEWARE = ["meterware.django.MeteringMiddleware", ...]
    METERWARE = {...}   # optional; otherwise METERWARE_CONFIG or ./meterware.toml
    METERWARE_CUSTOMER_GETTER = "myapp.auth.customer_of"   # optional: see below

Sync- and async-capable: under WSGI it runs synchronously, under ASGI natively async, so it never costs a
thread hop. Put it near the top of ``MIDDLEWARE`` so refused calls skip the rest. The flusher starts
lazily on the first call and drains at interpreter exit (on ``runserver``'s SIGTERM too). Under an ASGI
server, serve :func:`get_asgi_application` instead of Django's: Django answers no ASGI lifespan, and
uvicorn ends on SIGTERM without running exit hooks, so the lifespan's shutdown is where the buffer is
drained.

``METERWARE_CUSTOMER_GETTER`` (a callable or its dotted path) takes the ``HttpRequest`` and returns the id
of the customer your project has already authenticated (session, JWT), or None: such a call is metered
for that customer without an API key; None falls back to the key. It reads what the middleware above it
set (``request.user`` needs ``AuthenticationMiddleware`` before meterware's).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse
from django.utils.module_loading import import_string

from meterware.config import UNMATCHED_ROUTE, resolve_config
from meterware.metering.calls import Call
from meterware.metering.facade import Metering
from meterware.metering.responses import Problem
from meterware.metering.serving import (
    AsyncClients,
    Clients,
    EnvironCredentials,
    MeteredBody,
    bytes_headers,
    str_headers,
    take_usage_headers,
)
from meterware.usage import reporting_to

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

GetResponse = Callable[[HttpRequest], Any]


def _refusal(refusal: Problem) -> HttpResponse:
    return HttpResponse(
        refusal.body(), status=refusal.status, headers=str_headers(refusal.response_headers())
    )


def _route(request: HttpRequest, call: Call) -> str:
    """The URL pattern that served the call (``/items/<int:pk>/``)."""
    match = getattr(request, "resolver_match", None)
    if match is None:
        return UNMATCHED_ROUTE
    route = getattr(match, "route", None)
    return f"/{route}" if isinstance(route, str) and route else call.path


class MeteringMiddleware:
    """Meter a Django project: authenticate keys, enforce plans, record usage."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: GetResponse) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)
        getter = getattr(settings, "METERWARE_CUSTOMER_GETTER", None)
        self.metering = Metering(
            resolve_config(getattr(settings, "METERWARE", None), {}, given_as="the METERWARE setting"),
            customer_getter=import_string(getter) if isinstance(getter, str) else getter,
        )
        # Made on first use, in the serving process (never at import); asyncio ones under ASGI.
        self.clients = AsyncClients(self.metering) if self.is_async else Clients(self.metering)
        self._credentials = EnvironCredentials(self.metering.policy.key_headers)
        if self.is_async:
            _async_middleware.add(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self.__acall__(request)
        path = request.path_info
        if self.metering.routes.is_excluded(path):
            return self.get_response(request)
        headers, query = self._credentials.read(request.META)
        clients = self.clients
        assert isinstance(clients, Clients)
        call = self.metering.start(clients.storage, request, headers, query, request.method or "GET", path)
        if isinstance(call, Problem):
            clients.flusher.ensure_running()
            return _refusal(call)
        clients.started(call)
        scope = reporting_to(call.usage)
        try:
            with scope:
                response = self.get_response(request)
        except BaseException:
            self._failed(request, call)
            raise
        return self._respond(request, call, response, scope)

    async def __acall__(self, request: HttpRequest) -> Any:
        path = request.path_info
        if self.metering.routes.is_excluded(path):
            return await self.get_response(request)
        headers, query = self._credentials.read(request.META)
        clients = self.clients
        assert isinstance(clients, AsyncClients)
        started = self.metering.astart(
            clients.storage, request, headers, query, request.method or "GET", path
        )
        call = started if isinstance(started, Call | Problem) else await started
        if isinstance(call, Problem):
            clients.flusher.ensure_running()
            return _refusal(call)
        clients.started(call)
        scope = reporting_to(call.usage)
        try:
            with scope:
                response = await self.get_response(request)
        except BaseException:
            self._failed(request, call)
            raise
        return self._respond(request, call, response, scope)

    def _failed(self, request: HttpRequest, call: Call) -> None:
        """Record a call whose view raised through the middleware (``DEBUG_PROPAGATE_EXCEPTIONS``)."""
        self.clients.finished(call, _route(request, call), failed=True)

    def _respond(
        self, request: HttpRequest, call: Call, response: HttpResponseBase, scope: reporting_to
    ) -> HttpResponseBase:
        metering = self.metering
        call.status = response.status_code
        call.ttfb_ns = time.perf_counter_ns()
        call.route = _route(request, call)
        for name, value in str_headers(metering.response_headers(call)):
            response.headers[name] = value
        if metering.usage_headers:
            raw = bytes_headers((name, str(value)) for name, value in response.items())
            sent = take_usage_headers(metering, call, raw)
            for stripped in {name for name, _ in raw}.difference(name for name, _ in sent):
                del response.headers[stripped.decode("latin-1")]
        if isinstance(response, StreamingHttpResponse):
            # Timed to the last chunk: Django closes the iterator we install when the response ends.
            body, content = MeteredBody(call, scope), response.streaming_content
            response.streaming_content = (
                self._finish_after_async(body, content)
                if response.is_async
                else self._finish_after(body, content)
            )
        else:
            call.response_bytes = len(getattr(response, "content", b""))
            self.clients.finished(call, call.route)
        return response

    def _finish_after(self, body: MeteredBody, chunks: Iterable[bytes]) -> Iterator[bytes]:
        try:
            yield from body.chunks(chunks)
        finally:
            self._finished(body)

    async def _finish_after_async(
        self, body: MeteredBody, chunks: AsyncIterable[bytes]
    ) -> AsyncIterator[bytes]:
        try:
            async for chunk in body.achunks(chunks):
                yield chunk
        finally:
            self._finished(body)

    def _finished(self, body: MeteredBody) -> None:
        call = body.call
        self.clients.finished(call, call.route, failed=body.failed, aborted=body.aborted)


#: The middleware serving this process under ASGI, drained by the lifespan of get_asgi_application().
_async_middleware: weakref.WeakSet[MeteringMiddleware] = weakref.WeakSet()


def get_asgi_application() -> ASGIApp:
    """Django's ASGI application, answering the ASGI lifespan: its shutdown drains meterware's buffer.

    Use it in ``asgi.py`` in place of ``django.core.asgi.get_asgi_application``::

        from meterware.django import get_asgi_application

        application = get_asgi_application()
    """
    from django.core.asgi import get_asgi_application as django_asgi_application

    return _Lifespan(django_asgi_application())


class _Lifespan:
    """The ASGI lifespan in front of Django (which refuses it); shutdown drains the metering buffers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for middleware in list(_async_middleware):
                    if isinstance(middleware.clients, AsyncClients):
                        await middleware.clients.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return
