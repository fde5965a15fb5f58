"""The ASGI middleware: one line in Starlette, FastAPI or around any ASGI app.

    app.add_middleware(MeteringMiddleware)            # Starlette / FastAPI
    app = MeteringMiddleware(app, config="meterware.toml")   # any ASGI app

A pure ASGI middleware (not ``BaseHTTPMiddleware``): the response streams through untouched except for the
``RateLimit`` headers added to its start message. The call is timed to its last body chunk, so streaming and
server-sent events are timed to their end, and its event is queued when the app returns, so units that
background tasks report after the response count against the call.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING, Any, Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from meterware.config import UNMATCHED_ROUTE, Config, Routes, resolve_config
from meterware.errors import StorageError, UnsafeStorageError
from meterware.metering.calls import Call
from meterware.metering.core import CustomerGetter, KeyGetter
from meterware.metering.facade import Metering
from meterware.metering.responses import Problem
from meterware.metering.serving import AsyncClients, take_usage_headers
from meterware.usage import reporting_to

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from meterware.metering.flushers import AsyncFlusher
    from meterware.storage.base import AsyncStorage

#: A call running this long gets a task watching for its client leaving (a streamed one, at once).
WATCH_AFTER_SECONDS: Final = 0.05


class SlowCalls:
    """Starts the disconnect watcher of each call still running after about ``WATCH_AFTER_SECONDS``.

    One timer for all the calls in flight, ticking while there are some: a timer per call would cost
    more than the rest of the middleware's work on a fast call. A call is watched from the second tick
    after it arrived, so after half to all of ``WATCH_AFTER_SECONDS``.
    """

    def __init__(self) -> None:
        self._young: dict[int, _Exchange] = {}
        self._old: dict[int, _Exchange] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, token: int, exchange: _Exchange) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # the first call in flight, or a new loop (the old one's timer is gone)
            self._loop, self._young, self._old = loop, {}, {}
            loop.call_later(WATCH_AFTER_SECONDS / 2, self._tick, loop)
        self._young[token] = exchange

    def discard(self, token: int) -> None:
        if self._young.pop(token, None) is None:
            self._old.pop(token, None)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is not loop:
            return
        due, self._old, self._young = self._old, self._young, {}
        try:
            for exchange in due.values():
                exchange.watch()
        finally:
            if self._old:
                loop.call_later(WATCH_AFTER_SECONDS / 2, self._tick, loop)
            else:
                self._loop = None


class MeteringMiddleware:
    """Meter an ASGI app: authenticate keys, enforce plans, record usage.

    :param app: the ASGI application to wrap.
    :param config: a :class:`~meterware.Config`, a path to a TOML file, a dict shaped like the file, or
        ``None`` to load ``METERWARE_CONFIG`` or ``./meterware.toml`` (neither found: a ``ConfigError``,
        unless ``METERWARE_CONFIG=defaults``).
    :param key_getter: optional callable taking the ASGI scope and returning the presented key (or None),
        replacing the header/query lookup.
    :param customer_getter: optional callable taking the ASGI scope and returning the id of the customer
        your app has already authenticated (JWT, session), or None: such a call is metered for that
        customer without an API key (admission, quota and credits as usual); None falls back to the key.
    :param storage: the storage URL, overriding the configuration's (the shard count is kept).
    :param registry: the prometheus-client registry of its metrics (the global ``REGISTRY`` by default).
    """

    def __init__(
        self,
        app: ASGIApp,
        config: Config | str | os.PathLike[str] | dict[str, Any] | None = None,
        *,
        key_getter: KeyGetter | None = None,
        customer_getter: CustomerGetter | None = None,
        storage: str | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.app = app
        overrides = {"storage": storage} if storage else {}
        self.metering = Metering(
            resolve_config(config, overrides),
            key_getter=key_getter,
            customer_getter=customer_getter,
            registry=registry,
        )
        self.clients = AsyncClients(self.metering)
        self._slow_calls = SlowCalls()

    @property
    def storage(self) -> AsyncStorage:
        """The backend client, made on first use (never at import or construction)."""
        return self.clients.storage

    @property
    def flusher(self) -> AsyncFlusher:
        return self.clients.flusher

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self._lifespan(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        metering = self.metering
        path = scope["path"]
        if metering.routes.is_excluded(path):
            await self.app(scope, receive, send)
            return
        query = scope.get("query_string", b"")
        clients = self.clients
        started = metering.astart(clients.storage, scope, scope["headers"], query, scope["method"], path)
        call = started if isinstance(started, Call | Problem) else await started
        if isinstance(call, Problem):
            clients.flusher.ensure_running()  # a refused call of a known customer is an event too
            await self._refuse(send, call)
            return
        clients.started(call)
        # Served here rather than in a method of its own: a coroutine per call is a cost on every call.
        exchange = _Exchange(metering, scope, receive, send, call)
        slow_calls = self._slow_calls
        slow_calls.add(id(call), exchange)
        try:
            with reporting_to(call.usage):
                await self.app(scope, exchange.receive, exchange.send)
        finally:
            slow_calls.discard(id(call))
            if exchange.watcher is not None:
                exchange.watcher.cancel()
            route = _route(scope, exchange.root_path, self.metering.routes)
            if call.ended_ns:
                # The response went out whole (then its background tasks ran, whatever they did).
                clients.finished(call, route, aborted=exchange.aborted)
            else:
                # The app raised, or returned without finishing its response: the client went away (charged
                # if its response had started), or the app gave up (not charged).
                clients.finished(call, route, failed=True, aborted=exchange.disconnected)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_after_draining(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                refusal = await self._refusal()
                if refusal is not None:
                    await self.clients.aclose()  # the server stops: no shut-down will close them
                    await send({"type": "lifespan.startup.failed", "message": refusal})
                    return
                # Replay what an earlier process left in the spool without waiting for traffic.
                self.flusher.ensure_running()
            elif message["type"] == "lifespan.shutdown.complete":
                await self.drain()
                await self.clients.aclose()  # connections belong to this loop, which is ending
            await send(message)

        await self.app(scope, receive, send_after_draining)

    async def _refusal(self) -> str | None:
        """Why the backend must not be used (an evicting Redis), checked at start-up."""
        try:
            await self.storage.ready()
        except UnsafeStorageError as error:
            return f"meterware refuses to start: {error}"
        except StorageError:
            pass  # unreachable: serve per policy.on_backend_error; checked when Redis is first reached
        return None

    async def drain(self) -> None:
        """Flush every buffered event now (called at lifespan shutdown; safe to call any time)."""
        await self.clients.drain()

    async def _refuse(self, send: Send, refusal: Problem) -> None:
        await send(
            {"type": "http.response.start", "status": refusal.status, "headers": refusal.response_headers()}
        )
        await send({"type": "http.response.body", "body": refusal.body()})


class _Exchange:
    """The messages of one metered call: the app's ``receive`` and ``send``, wrapped.

    ``send`` adds the call's headers to the response and notes when its last body chunk went out.

    Servers such as uvicorn drop what an app sends after the client left, without a word, and many apps
    never call receive() once they have the body: a watcher reads the next message itself, so a client
    that leaves before the end is noticed. It holds at most what it read (the last part of the body, then
    the disconnect) for the app, and steps aside while the app reads a longer body. It starts once the
    call has run about ``WATCH_AFTER_SECONDS`` (:class:`SlowCalls`) or its response streams: most calls
    end sooner, and need no task (a client gone meanwhile is still noticed: the server keeps its
    disconnect for the first read).
    """

    __slots__ = (
        "aborted",
        "arrived",
        "call",
        "disconnected",
        "early",
        "extra_headers",
        "from_server",
        "metering",
        "root_path",
        "scope",
        "to_server",
        "watcher",
    )

    def __init__(self, metering: Metering, scope: Scope, receive: Receive, send: Send, call: Call) -> None:
        self.metering = metering
        self.scope = scope
        self.from_server = receive
        self.to_server = send
        self.call = call
        self.extra_headers = metering.response_headers(call)
        self.root_path = scope.get("root_path", "")
        self.disconnected = False
        #: Whether the client had gone when the last body chunk was sent.
        self.aborted = False
        #: What the watcher read for the app.
        self.early: list[Message] = []
        #: Set when the watcher read a message (or stopped).
        self.arrived: asyncio.Event | None = None
        self.watcher: asyncio.Task[None] | None = None

    def watch(self) -> None:
        """Start watching, unless watching already (called when the call is slow or streams)."""
        if self.watcher is None:
            self._start_watching()

    def _start_watching(self) -> None:
        if not self.disconnected:
            self.arrived = self.arrived or asyncio.Event()
            self.watcher = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        arrived = self.arrived
        assert arrived is not None
        try:
            while True:
                message = await self.from_server()
                self.early.append(message)
                arrived.set()
                if message["type"] == "http.disconnect":
                    self.disconnected = True
                    return
                if message.get("more_body", False):
                    return  # the app reads the rest itself; watching resumes after it
        except Exception:
            return  # the app's own receive() meets the same trouble, and reports it
        finally:
            arrived.set()

    async def receive(self) -> Message:
        watcher, early = self.watcher, self.early
        if watcher is not None and not early and not watcher.done():
            assert self.arrived is not None
            self.arrived.clear()
            await self.arrived.wait()  # the watcher is reading the next message: that one is the app's
        message = early.pop(0) if early else await self.from_server()
        if message["type"] == "http.request":
            self.call.request_bytes += len(message.get("body", b""))
            if not message.get("more_body", False) and watcher is not None and watcher.done():
                self._start_watching()
        elif message["type"] == "http.disconnect":
            self.disconnected = True
        return message

    async def send(self, message: Message) -> None:
        call = self.call
        kind = message["type"]
        # A client gone before the last chunk did not get the whole response (whatever the server does with
        # this chunk); one that leaves once it has it got it.
        aborted = self.disconnected
        last = False
        if kind == "http.response.start":
            call.status = message["status"]
            call.ttfb_ns = time.perf_counter_ns()
            call.responded = not aborted
            headers = message.get("headers", ())
            if self.metering.usage_headers:
                headers = take_usage_headers(self.metering, call, list(headers))  # any iterable: a list
            message["headers"] = [*headers, *self.extra_headers]
        elif kind == "http.response.body":
            call.response_bytes += len(message.get("body", b""))
            last = not message.get("more_body", False)
            if not last:
                self.watch()  # the response streams
        try:
            await self.to_server(message)
        except OSError:  # the server could not write: the client is gone
            self.disconnected = True
            if kind == "http.response.start":
                call.responded = False
            raise
        if last:
            call.ended_ns = time.perf_counter_ns()
            self.aborted = aborted


def _route(scope: Scope, root_path: str, routes: Routes) -> str:
    """The route template that served the call (Starlette/FastAPI set ``scope["route"]``)."""
    route = scope.get("route")
    template = getattr(route, "path", None)
    if not isinstance(template, str):
        return UNMATCHED_ROUTE if scope.get("router") is not None else routes.route_of(scope["path"])
    mounted_at = scope.get("root_path", "")
    if mounted_at == root_path:
        return template
    return str(mounted_at)[len(root_path) :] + template
