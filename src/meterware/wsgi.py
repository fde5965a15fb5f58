"""The WSGI middleware: one line in Flask or around any WSGI app.

    app.wsgi_app = WSGIMeteringMiddleware(app.wsgi_app)        # Flask
    application = WSGIMeteringMiddleware(application)           # any WSGI app

Admission happens before the app runs, with a synchronous client and short timeouts. The call's event is
completed in the response iterable's ``close()``, which every WSGI server calls (PEP 3333) whether the
response finished, failed while iterating, or the client went away; so streamed responses are timed to
their end, never buffered, and errors during iteration count as failures. Events are flushed by a
background thread started lazily in each process, after any fork (gunicorn ``--preload`` works).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from meterware.config import UNMATCHED_ROUTE, Config, resolve_config
from meterware.metering.calls import Call
from meterware.metering.core import CustomerGetter, KeyGetter
from meterware.metering.facade import Metering
from meterware.metering.responses import Problem
from meterware.metering.serving import (
    Clients,
    EnvironCredentials,
    MeteredBody,
    bytes_headers,
    str_headers,
    take_usage_headers,
)
from meterware.usage import reporting_to

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
    from prometheus_client import CollectorRegistry

    from meterware.metering.flushers import ThreadFlusher
    from meterware.storage.base import Storage


class WSGIMeteringMiddleware:
    """Meter a WSGI app: authenticate keys, enforce plans, record usage.

    :param app: the WSGI application to wrap.
    :param config: a :class:`~meterware.Config`, a path to a TOML file, a dict shaped like the file, or
        ``None`` to load ``METERWARE_CONFIG`` or ``./meterware.toml`` (neither found: a ``ConfigError``,
        unless ``METERWARE_CONFIG=defaults``).
    :param key_getter: optional callable taking the WSGI environ and returning the presented key (or None).
    :param customer_getter: optional callable taking the WSGI environ and returning the id of the customer
        your app has already authenticated (JWT, session), or None: such a call is metered for that
        customer without an API key (admission, quota and credits as usual); None falls back to the key.
    :param storage: the storage URL, overriding the configuration's (the shard count is kept).
    :param registry: the prometheus-client registry of its metrics (the global ``REGISTRY`` by default).
    """

    def __init__(
        self,
        app: WSGIApplication,
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
        self.clients = Clients(self.metering)
        self._credentials = EnvironCredentials(self.metering.policy.key_headers)

    @property
    def storage(self) -> Storage:
        """The backend client, made on first use (never at import: safe with pre-fork servers)."""
        return self.clients.storage

    @property
    def flusher(self) -> ThreadFlusher:
        return self.clients.flusher

    def drain(self) -> None:
        """Flush every buffered event now (also done at interpreter exit)."""
        self.clients.drain()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        # By hand, not with werkzeug's Request, Response or Headers: on every call (and every refusal)
        # they would cost 3 to 10 times what these few lookups do.
        path = environ.get("PATH_INFO", "") or "/"
        if self.metering.routes.is_excluded(path):
            return self.app(environ, start_response)
        headers, query = self._credentials.read(environ)
        method = environ.get("REQUEST_METHOD", "GET")
        call = self.metering.start(self.clients.storage, environ, headers, query, method, path)
        if isinstance(call, Problem):
            self.clients.flusher.ensure_running()  # a refused call of a known customer is an event too
            return _refuse(start_response, call)
        self.clients.started(call)
        return self._serve(environ, start_response, call)

    def _serve(self, environ: WSGIEnvironment, start_response: StartResponse, call: Call) -> Iterable[bytes]:
        metering = self.metering
        extra_headers = str_headers(metering.response_headers(call))

        def metered_start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            call.status = int(status[:3])
            # Flask clears its request from the environ when its context ends: read the route now.
            call.route = self._route(environ, call)
            call.ttfb_ns = time.perf_counter_ns()
            if metering.usage_headers:
                raw = bytes_headers(headers)
                if (sent := take_usage_headers(metering, call, raw)) is not raw:
                    headers = str_headers(sent)
            return start_response(status, headers + extra_headers, exc_info)

        scope = reporting_to(call.usage)  # one per call: made once, entered for the app, each chunk, close()
        try:
            with scope:
                iterable = self.app(environ, metered_start_response)
        except BaseException:
            self.clients.finished(call, call.route or self._route(environ, call), failed=True)
            raise
        return _MeteredResponse(iterable, MeteredBody(call, scope), environ, self)

    def _route(self, environ: WSGIEnvironment, call: Call) -> str:
        """The route template: Flask leaves the matched rule on its request; a bare WSGI app has no router
        (``routes.templates`` may name its routes)."""
        request = environ.get("werkzeug.request")
        rule = getattr(request, "url_rule", None)
        template = getattr(rule, "rule", None)
        if isinstance(template, str):
            return str(environ.get("SCRIPT_NAME", "")) + template
        if request is not None and hasattr(request, "url_rule"):
            return UNMATCHED_ROUTE
        return self.metering.routes.route_of(call.path)


class _MeteredResponse:
    """Wraps the app's response iterable: counts bytes, keeps ``usage`` reachable, finishes in ``close()``."""

    def __init__(
        self,
        iterable: Iterable[bytes],
        body: MeteredBody,
        environ: WSGIEnvironment,
        owner: WSGIMeteringMiddleware,
    ) -> None:
        self.iterable = iterable
        self.body = body
        self.call = body.call
        self.environ = environ
        self.owner = owner

    def __iter__(self) -> Iterator[bytes]:
        # A generator of this module, not the helper's own: SIGTERM waits while one of the adapters' modules
        # is on the main thread's stack (``flusher.exit_on_sigterm``), a streamed body's too.
        yield from self.body.chunks(self.iterable)

    def close(self) -> None:
        call = self.call
        try:
            close: Callable[[], None] | None = getattr(self.iterable, "close", None)
            if close is not None:
                # Work the response runs when closed (werkzeug's ``call_on_close``) reports units of the call.
                with self.body.scope:
                    close()
        finally:
            # Not iterated to the end and no error: the server stopped early, the client went away (charged if
            # a chunk of the response had reached it).
            body, owner = self.body, self.owner
            route = call.route or owner._route(self.environ, call)
            owner.clients.finished(call, route, failed=body.failed, aborted=body.aborted)


def _refuse(start_response: StartResponse, refusal: Problem) -> list[bytes]:
    start_response(
        f"{refusal.status} {HTTPStatus(refusal.status).phrase}", str_headers(refusal.response_headers())
    )
    return [refusal.body()]
