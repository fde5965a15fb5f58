"""Django middleware: one line in ``MIDDLEWARE``.

    MIDDLEWARE = ["meterware.django.MeteringMiddleware", ...]
    METERWARE = {...}   # optional; otherwise METERWARE_CONFIG or ./meterware.toml

Sync- and async-capable: under WSGI it runs synchronously, under ASGI natively async, so it never costs a
thread hop. Put it near the top of ``MIDDLEWARE`` so refused calls skip the rest. The flusher starts
lazily on the first call and drains at interpreter exit (on ``runserver``'s SIGTERM too). Under an ASGI
server, serve :func:`get_asgi_application` instead of Django's: Django answers no ASGI lifespan, and
uvicorn ends on SIGTERM without running exit hooks, so the lifespan's shutdown is where the buffer is
drained.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse

from meterware.config import resolve_config
from meterware.metering.calls import UNMATCHED_ROUTE, Call, header_map
from meterware.metering.facade import Metering
from meterware.metering.flushers import AsyncFlusher, ThreadFlusher, exit_on_sigterm
from meterware.metering.responses import Problem
from meterware.storage.base import AsyncStorage, Storage
from meterware.usage import _current

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

GetResponse = Callable[[HttpRequest], Any]


def _refusal(refusal: Problem) -> HttpResponse:
    response = HttpResponse(refusal.body(), status=refusal.status, content_type="application/problem+json")
    for name, value in refusal.headers:
        response.headers[name.decode("latin-1")] = value.decode("latin-1")
    return response


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
        self.metering = Metering(
            resolve_config(getattr(settings, "METERWARE", None), {}, given_as="the METERWARE setting")
        )
        exit_on_sigterm()
        self._storage: Storage | None = None
        self._async_storage: AsyncStorage | None = None
        self._flusher: ThreadFlusher | AsyncFlusher | None = None
        config = self.metering.config
        self._header_keys = tuple(
            (name.encode("latin-1"), "HTTP_" + name.upper().replace("-", "_"))
            for name in config.policy.key_headers
        )
        if self.is_async:
            _async_middleware.add(self)

    # Storage and flusher are made on first use, in the serving process (never at import).

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            self._storage = self.metering.backend()
        return self._storage

    @property
    def async_storage(self) -> AsyncStorage:
        if self._async_storage is None:
            self._async_storage = self.metering.async_backend()
        return self._async_storage

    async def _shutdown(self) -> None:
        """Flush every buffered event and close the asyncio clients, on the loop that made them."""
        flusher = self._flusher
        if isinstance(flusher, AsyncFlusher):
            await flusher.drain()
            await flusher.storage.aclose()
        if self._async_storage is not None:
            await self._async_storage.aclose()

    def _ensure_flusher(self) -> None:
        if self._flusher is None:
            pipeline = self.metering.pipeline
            self._flusher = (
                AsyncFlusher(pipeline, self.metering.async_backend(flushing=True))
                if self.is_async
                else ThreadFlusher(pipeline, self.metering.backend(flushing=True))
            )
        self._flusher.ensure_running()

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self.__acall__(request)
        path = request.path_info
        if self.metering.routes.is_excluded(path):
            return self.get_response(request)
        headers, query = self._credentials(request)
        call = self.metering.start(self.storage, request, headers, query, request.method or "GET", path)
        if isinstance(call, Problem):
            self._ensure_flusher()
            return _refusal(call)
        token = _current.set(call.usage)
        try:
            response = self.get_response(request)
        except BaseException:
            self._failed(request, call)
            raise
        finally:
            _current.reset(token)
        return self._respond(request, call, response)

    async def __acall__(self, request: HttpRequest) -> Any:
        path = request.path_info
        if self.metering.routes.is_excluded(path):
            return await self.get_response(request)
        headers, query = self._credentials(request)
        started = self.metering.astart(
            self.async_storage, request, headers, query, request.method or "GET", path
        )
        call = started if isinstance(started, Call | Problem) else await started
        if isinstance(call, Problem):
            self._ensure_flusher()
            return _refusal(call)
        token = _current.set(call.usage)
        try:
            response = await self.get_response(request)
        except BaseException:
            self._failed(request, call)
            raise
        finally:
            _current.reset(token)
        return self._respond(request, call, response)

    def _credentials(self, request: HttpRequest) -> tuple[list[tuple[bytes, bytes]], bytes]:
        meta = request.META
        headers = [
            (name, value.encode("latin-1")) for name, env in self._header_keys if (value := meta.get(env))
        ]
        return headers, meta.get("QUERY_STRING", "").encode("latin-1")

    def _failed(self, request: HttpRequest, call: Call) -> None:
        """Record a call whose view raised through the middleware (``DEBUG_PROPAGATE_EXCEPTIONS``)."""
        self.metering.finish(call, _route(request, call), failed=True)
        self._ensure_flusher()

    def _respond(self, request: HttpRequest, call: Call, response: HttpResponseBase) -> HttpResponseBase:
        metering = self.metering
        call.status = response.status_code
        call.ttfb_ns = time.perf_counter_ns()
        call.route = _route(request, call)
        for name, value in metering.response_headers(call):
            response.headers[name.decode("latin-1")] = value.decode("latin-1")
        if metering.usage_headers:
            raw = [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in response.items()]
            call.header_units = header_map(raw, metering.usage_headers)
            if metering.policy.strip_usage_headers:
                for meter in call.header_units:
                    usage_header = metering.config.meters[meter].header
                    if usage_header is not None:
                        del response.headers[usage_header]
        if isinstance(response, StreamingHttpResponse):
            # Timed to the last chunk: Django closes the iterator we install when the response ends.
            if response.is_async:
                response.streaming_content = self._finish_after_async(call, response.streaming_content)
            else:
                response.streaming_content = self._finish_after(call, response.streaming_content)
        else:
            call.response_bytes = len(getattr(response, "content", b""))
            metering.finish(call, call.route)
            self._ensure_flusher()
        return response

    # A streamed body runs view code lazily: ``usage`` stays reachable while each chunk is made.

    def _finish_after(self, call: Call, chunks: Iterable[bytes]) -> Iterator[bytes]:
        completed = failed = False
        iterator = iter(chunks)
        try:
            while True:
                token = _current.set(call.usage)
                try:
                    chunk = next(iterator)
                except StopIteration:
                    completed = True
                    return
                finally:
                    _current.reset(token)
                call.response_bytes += len(chunk)
                yield chunk
                # The server sent it and came back for more: a client that leaves now was served.
                call.responded = True
        except Exception:
            failed = True
            raise
        finally:
            self.metering.finish(call, call.route, failed=failed, aborted=not completed and not failed)
            self._ensure_flusher()

    async def _finish_after_async(self, call: Call, chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        completed = failed = False
        iterator = aiter(chunks)
        try:
            while True:
                token = _current.set(call.usage)
                try:
                    chunk = await anext(iterator)
                except StopAsyncIteration:
                    completed = True
                    return
                finally:
                    _current.reset(token)
                call.response_bytes += len(chunk)
                yield chunk
                # The server sent it and came back for more: a client that leaves now was served.
                call.responded = True
        except Exception:
            failed = True
            raise
        finally:
            self.metering.finish(call, call.route, failed=failed, aborted=not completed and not failed)
            self._ensure_flusher()


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
                    await middleware._shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return
