from __future__ import annotations

import gc
import uuid
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.conf import settings
from django.core.handlers.asgi import ASGIHandler
from django.test.utils import override_settings
from flask import Flask
from starlette.testclient import TestClient
from starlette.types import Receive, Scope, Send

from meterware import Accounts, Config, MeteringMiddleware
from meterware.django import MeteringMiddleware as DjangoMeteringMiddleware
from meterware.django import get_asgi_application
from meterware.events import UsageEvent, decode_batch
from meterware.metering.serving import Clients
from meterware.rollup import RollupWorker
from meterware.storage import open_storage
from meterware.wsgi import WSGIMeteringMiddleware
from tests.behaviour.apps import CALLS, FRAMEWORKS, configure_django


def api_config(storage: str, spool_dir: Path, **sections: Any) -> dict[str, Any]:
    """The configuration every behaviour test starts from (sections replace whole tables, except that
    the policy keeps a generous backend timeout: these tests are about behaviour, not a busy machine)."""
    policy = {"timeout": 5.0, **sections.pop("policy", {})}
    return {
        "storage": {"url": storage, "shards": 4},
        "meters": {
            "calls": {"aggregation": "count", "source": "call"},
            "weighted": {"aggregation": "sum", "source": "call"},
            "tokens": {"aggregation": "sum", "source": "handler"},
            "header_tokens": {"aggregation": "sum", "source": "header:X-Usage-Tokens"},
        },
        "plans": {
            "free": {"meters": {"calls": {"quota": 5}}},
            "payg": {
                "prepaid": True,
                "meters": {"calls": {"price": "0.01"}, "tokens": {"price": "0.0001"}},
            },
            "percall": {"prepaid": True, "meters": {"calls": {"price": "0.01"}}},
            "tokens": {"prepaid": True, "meters": {"tokens": {"price": "0.0001"}}},
            "starter": {"prepaid": True, "meters": {"calls": {"included": 5, "price": "0.01"}}},
            "pro": {"meters": {"calls": {"included": 3, "price": "0.5"}}},
            "tight": {"rate_limits": ["3/minute"]},
            "open": {},
        },
        "routes": {"exclude": ["/health"], "weights": {"/v1/heavy": 5}},
        "pipeline": {"flush_interval": 0.01, "spool_dir": str(spool_dir)},
        "policy": policy,
        **sections,
    }


class Api:
    """One framework app behind its meterware adapter, with the accounts and rollup around it.

    Every adapter is driven through an ``httpx``-compatible client, so the tests read the same responses.
    Subclasses say how to serve the app and how to drain what its middleware buffered.
    """

    def __init__(self, framework: str, config: Config, options: dict[str, Any] | None = None) -> None:
        self.framework = FRAMEWORKS[framework]
        self.config = config
        #: The middleware's keyword options (``customer_getter``); Django's are settings.
        self.options = options or {}
        self.storage = open_storage(config.storage, shards=config.shards)
        self.accounts = Accounts(self.storage, config)
        #: Let an app's exception reach the client (as a server would log it) instead of a 500 response.
        self.raise_server_exceptions = False
        self.build()
        self.client = self._client()
        CALLS.clear()

    def build(self) -> None:
        """Make the app and put the middleware in front of it (once per test)."""
        raise NotImplementedError

    def _client(self) -> Any:
        raise NotImplementedError

    def _stop(self) -> None:
        """Stop serving and flush every buffered event to the backend."""
        raise NotImplementedError

    def customer(self, plan: str, *, credits: str | None = None, live: bool = True) -> str:
        """Create a customer on ``plan`` and return a fresh key's plaintext."""
        customer_id = f"{plan}-{uuid.uuid4().hex[:8]}"
        self.accounts.create_customer(customer_id, plan=plan)
        if credits:
            self.accounts.grant_credits(customer_id, credits)
        return self.accounts.create_key(customer_id, live=live).plaintext

    def call(self, method: str, path: str, key: str | None = None, **kwargs: Any) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        return self.client.request(method, path, headers=headers, **kwargs)  # type: ignore[no-any-return]

    def settle(self) -> None:
        """Stop the app (its buffer is drained), roll up, and serve again."""
        self._stop()
        RollupWorker(self.storage, self.config).drain()
        self.client = self._client()

    def customer_of(self, key: str) -> str:
        from meterware.keys import hash_key

        info = self.storage.resolve_key(hash_key(key))
        assert info is not None
        return info.customer.id

    def usage(self, key: str, *, live: bool = True) -> Any:
        return self.accounts.usage(self.customer_of(key), live=live)

    def balance(self, key: str) -> Any:
        return self.accounts.balance(self.customer_of(key))

    def events(self) -> list[UsageEvent]:
        found: list[UsageEvent] = []
        for shard in range(self.config.shards):
            for entry in self.storage.read_stream(shard, "0-0", 10_000):
                found += decode_batch(entry.fields[b"b"])
        return found

    def close(self) -> None:
        self._stop()
        self.storage.close()


class AsgiApi(Api):
    """Starlette / FastAPI: ``app.add_middleware(MeteringMiddleware)``, served by Starlette's TestClient.

    The TestClient runs the lifespan, whose shutdown drains the buffer (as uvicorn does).
    """

    def build(self) -> None:
        self.app = self.framework.build()
        self.app.add_middleware(MeteringMiddleware, config=self.config, **self.options)

    def _client(self) -> TestClient:
        return TestClient(self.app, raise_server_exceptions=self.raise_server_exceptions).__enter__()

    def _stop(self) -> None:
        self.client.__exit__(None, None, None)


class WsgiApi(Api):
    """Flask (``app.wsgi_app = WSGIMeteringMiddleware(app.wsgi_app)``) or a bare WSGI app wrapped whole."""

    def build(self) -> None:
        app = self.framework.build()
        if isinstance(app, Flask):
            self.middleware = WSGIMeteringMiddleware(app.wsgi_app, config=self.config, **self.options)
            app.wsgi_app = self.middleware  # type: ignore[method-assign]
            self.app: Flask | WSGIMeteringMiddleware = app
        else:
            self.app = self.middleware = WSGIMeteringMiddleware(app, config=self.config, **self.options)

    def _client(self) -> httpx.Client:
        if isinstance(self.app, Flask):
            # Flask answers an exception with a 500 itself, unless told to let it through to the server.
            self.app.config["PROPAGATE_EXCEPTIONS"] = self.raise_server_exceptions
        return _wsgi_client(self.app, self.raise_server_exceptions)

    def _stop(self) -> None:
        self.client.close()
        self.middleware.drain()


class DjangoApi(Api):
    """Django with ``meterware.django.MeteringMiddleware`` in ``MIDDLEWARE``, configured per test.

    The settings are configured once per process; each test overrides ``METERWARE`` (its config) and the
    URLconf, then builds a fresh handler, which builds a fresh middleware from them.
    """

    def build(self) -> None:
        configure_django()
        self.overrides = override_settings(
            ROOT_URLCONF=self.framework.build(),
            METERWARE=self.config,
            METERWARE_CUSTOMER_GETTER=self.options.get("customer_getter"),
        )
        self.overrides.enable()
        self.handler = self._handler()

    def _handler(self) -> Any:
        raise NotImplementedError

    def _propagate_exceptions(self) -> None:
        # Django answers an exception with a 500 itself, unless told to let it through to the server.
        settings.DEBUG_PROPAGATE_EXCEPTIONS = self.raise_server_exceptions

    def close(self) -> None:
        super().close()
        self.overrides.disable()


class DjangoWsgiApi(DjangoApi):
    """Sync views under Django's WSGI handler: the middleware runs synchronously, a thread flushes."""

    def _handler(self) -> Any:
        from django.core.handlers.wsgi import WSGIHandler

        handler = WSGIHandler()
        # Django wraps each middleware with functools.wraps: the outermost wrapper leads to ours.
        self.middleware: DjangoMeteringMiddleware = handler._middleware_chain.__wrapped__
        assert isinstance(self.middleware, DjangoMeteringMiddleware)
        return handler

    def _client(self) -> httpx.Client:
        self._propagate_exceptions()
        return _wsgi_client(self.handler, self.raise_server_exceptions)

    def _stop(self) -> None:
        self.client.close()
        clients = self.middleware.clients
        assert isinstance(clients, Clients)
        clients.drain()


class DjangoAsgiApi(DjangoApi):
    """Async views under Django's ASGI handler: the middleware runs natively async, a task flushes.

    Served as ``meterware.django.get_asgi_application()``: Django's handler plus the ASGI lifespan,
    whose shutdown drains the buffer.
    """

    def _handler(self) -> Any:
        handler: Any = get_asgi_application()  # its Django handler is replaced below
        handler.app = _ClosingASGIHandler()
        return handler

    def _client(self) -> TestClient:
        self._propagate_exceptions()
        return TestClient(self.handler, raise_server_exceptions=self.raise_server_exceptions).__enter__()

    def _stop(self) -> None:
        self.client.__exit__(None, None, None)
        # Whatever the calls left unclosed warns now, in the test that left it (filterwarnings = error),
        # not whenever the collector happens to run.
        gc.collect()


ADAPTERS: dict[str, type[Api]] = {
    "asgi": AsgiApi,
    "wsgi": WsgiApi,
    "django-wsgi": DjangoWsgiApi,
    "django-asgi": DjangoAsgiApi,
}


def _wsgi_client(app: Any, raise_server_exceptions: bool) -> httpx.Client:
    transport = httpx.WSGITransport(app=_ServerErrors(app, raise_server_exceptions))
    return httpx.Client(transport=transport, base_url="http://testserver")


class _ServerErrors:
    """What a WSGI server does with an app's exception: a 500 response (or, in tests, re-raise it)."""

    def __init__(self, app: Any, raise_errors: bool) -> None:
        self.app = app
        self.raise_errors = raise_errors

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        try:
            body = self.app(environ, start_response)
        except Exception:
            if self.raise_errors:
                raise
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
            return [b"Internal Server Error"]
        return _Body(body, self.raise_errors)


class _Body:
    """A response body as a server sends it: an error ends it where it is; ``close()`` always follows."""

    def __init__(self, body: Iterable[bytes], raise_errors: bool) -> None:
        self.body = body
        self.raise_errors = raise_errors

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self.body
        except Exception:
            if self.raise_errors:
                raise

    def close(self) -> None:
        close = getattr(self.body, "close", None)
        if close is not None:
            close()


_BODY_FILES: ContextVar[list[Any]] = ContextVar("body_files")


class _ClosingASGIHandler(ASGIHandler):  # type: ignore[misc]
    """Django's ASGI handler, closing the request body's file when an exception propagates out of it.

    Django closes it on every other path, but when sending the response raises (a streamed body that
    breaks: the middleware re-raises, so the server cuts the connection) it leaves the file to the
    garbage collector, whose ResourceWarning then lands in whichever test runs at that moment. This
    happens without meterware as well (Django 5.2: ``ASGIHandler.handle`` catches only ``RequestAborted``
    and ``AssertionError`` around the response task).
    """

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        files: list[Any] = []
        token = _BODY_FILES.set(files)
        try:
            await super().handle(scope, receive, send)
        finally:
            _BODY_FILES.reset(token)
            for body_file in files:
                body_file.close()  # a second close() is a no-op

    async def read_body(self, receive: Receive) -> Any:
        body_file = await super().read_body(receive)
        _BODY_FILES.get().append(body_file)
        return body_file


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "redis":
        return str(request.getfixturevalue("redis_url"))
    return f"memory://{uuid.uuid4().hex}"


@pytest.fixture(params=sorted(FRAMEWORKS))
def framework(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_api(framework: str, backend: str, tmp_path: Path) -> Iterator[Any]:
    apis: list[Api] = []

    def make(*, options: dict[str, Any] | None = None, **sections: Any) -> Api:
        config = Config.from_dict(api_config(backend, tmp_path / "spool", **sections))
        api = ADAPTERS[FRAMEWORKS[framework].adapter](framework, config, options)
        apis.append(api)
        return api

    yield make
    for api in reversed(apis):  # Django's settings overrides unwind last in, first out
        api.close()


@pytest.fixture
def api(make_api: Any) -> Api:
    return make_api()  # type: ignore[no-any-return]
