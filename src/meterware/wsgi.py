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

from meterware.config import Config, resolve_config
from meterware.metering.calls import UNMATCHED_ROUTE, Call, header_map
from meterware.metering.core import KeyGetter
from meterware.metering.facade import Metering
from meterware.metering.flushers import ThreadFlusher, exit_on_sigterm
from meterware.metering.responses import Problem
from meterware.storage.base import Storage
from meterware.usage import _current

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
    from prometheus_client import CollectorRegistry


class WSGIMeteringMiddleware:
    """Meter a WSGI app: authenticate keys, enforce plans, record usage.

    :param app: the WSGI application to wrap.
    :param config: a :class:`~meterware.Config`, a path to a TOML file, a dict shaped like the file, or
        ``None`` to load ``METERWARE_CONFIG`` or ``./meterware.toml`` (neither found: a ``ConfigError``,
        unless ``METERWARE_CONFIG=defaults``).
    :param key_getter: optional callable taking the WSGI environ and returning the presented key (or None).
    :param storage: the storage URL, overriding the configuration's (the shard count is kept).
    :param registry: the prometheus-client registry of its metrics (the global ``REGISTRY`` by default).
    """

    def __init__(
        self,
        app: WSGIApplication,
        config: Config | str | os.PathLike[str] | dict[str, Any] | None = None,
        *,
        key_getter: KeyGetter | None = None,
        storage: str | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.app = app
        overrides = {"storage": storage} if storage else {}
        self.metering = Metering(resolve_config(config, overrides), key_getter=key_getter, registry=registry)
        exit_on_sigterm()  # here: the first call may come on a server's worker thread
        self._storage: Storage | None = None
        self._flusher: ThreadFlusher | None = None
        self._header_keys = tuple(
            (name.encode("latin-1"), "HTTP_" + name.upper().replace("-", "_"))
            for name in self.metering.policy.key_headers
        )

    @property
    def storage(self) -> Storage:
        """The backend client, made on first use (never at import: safe with pre-fork servers)."""
        if self._storage is None:
            self._storage = self.metering.backend()
        return self._storage

    @property
    def flusher(self) -> ThreadFlusher:
        if self._flusher is None:
            self._flusher = ThreadFlusher(self.metering.pipeline, self.metering.backend(flushing=True))
        return self._flusher

    def drain(self) -> None:
        """Flush every buffered event now (also done at interpreter exit)."""
        self.flusher.drain()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "") or "/"
        if self.metering.routes.is_excluded(path):
            return self.app(environ, start_response)
        headers = [
            (name, value.encode("latin-1")) for name, env in self._header_keys if (value := environ.get(env))
        ]
        query = environ.get("QUERY_STRING", "").encode("latin-1")
        method = environ.get("REQUEST_METHOD", "GET")
        call = self.metering.start(self.storage, environ, headers, query, method, path)
        if isinstance(call, Problem):
            self.flusher.ensure_running()  # a refused call of a known customer is an event too
            return _refuse(start_response, call)
        return self._serve(environ, start_response, call)

    def _serve(self, environ: WSGIEnvironment, start_response: StartResponse, call: Call) -> Iterable[bytes]:
        metering = self.metering
        extra_headers = [
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in metering.response_headers(call)
        ]
        usage_headers = metering.usage_headers
        strip = metering.policy.strip_usage_headers and bool(usage_headers)

        def metered_start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            call.status = int(status[:3])
            # Flask clears its request from the environ when its context ends: read the route now.
            call.route = _route(environ, call)
            call.ttfb_ns = time.perf_counter_ns()
            if usage_headers:
                raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
                call.header_units = header_map(raw, usage_headers)
                if strip and call.header_units:
                    headers = [(k, v) for k, v in headers if k.lower().encode("latin-1") not in usage_headers]
            return start_response(status, headers + extra_headers, exc_info)

        token = _current.set(call.usage)
        try:
            iterable = self.app(environ, metered_start_response)
        except BaseException:
            metering.finish(call, call.route or _route(environ, call), failed=True)
            self.flusher.ensure_running()
            raise
        finally:
            _current.reset(token)
        return _MeteredResponse(iterable, call, environ, self)


class _MeteredResponse:
    """Wraps the app's response iterable: counts bytes, keeps ``usage`` reachable, finishes in ``close()``."""

    def __init__(
        self, iterable: Iterable[bytes], call: Call, environ: WSGIEnvironment, owner: WSGIMeteringMiddleware
    ) -> None:
        self.iterable = iterable
        self.call = call
        self.environ = environ
        self.owner = owner
        self.failed = False
        self.completed = False

    def __iter__(self) -> Iterator[bytes]:
        call = self.call
        iterator = iter(self.iterable)
        while True:
            # A streamed body runs the handler's code lazily: keep its usage reachable meanwhile.
            token = _current.set(call.usage)
            try:
                chunk = next(iterator)
            except StopIteration:
                self.completed = True
                return
            except BaseException:
                self.failed = True
                raise
            finally:
                _current.reset(token)
            call.response_bytes += len(chunk)
            yield chunk
            # The server wrote it and came back for more: a client that leaves now was served.
            call.responded = True

    def close(self) -> None:
        call = self.call
        # Work the response runs when it is closed (werkzeug's ``call_on_close``) reports units of the call.
        token = _current.set(call.usage)
        try:
            close: Callable[[], None] | None = getattr(self.iterable, "close", None)
            if close is not None:
                close()
        finally:
            _current.reset(token)
            # Not iterated to the end and no error: the server stopped early, the client went away (charged if
            # a chunk of the response had reached it).
            aborted = not self.completed and not self.failed
            route = call.route or _route(self.environ, call)
            self.owner.metering.finish(call, route, failed=self.failed, aborted=aborted)
            self.owner.flusher.ensure_running()


def _route(environ: WSGIEnvironment, call: Call) -> str:
    """The route template: Flask leaves the matched rule on its request; a bare WSGI app has no router."""
    request = environ.get("werkzeug.request")
    rule = getattr(request, "url_rule", None)
    template = getattr(rule, "rule", None)
    if isinstance(template, str):
        return str(environ.get("SCRIPT_NAME", "")) + template
    if request is not None and hasattr(request, "url_rule"):
        return UNMATCHED_ROUTE
    return call.path


def _refuse(start_response: StartResponse, refusal: Problem) -> list[bytes]:
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in refusal.response_headers()]
    start_response(f"{refusal.status} {HTTPStatus(refusal.status).phrase}", headers)
    return [refusal.body()]
