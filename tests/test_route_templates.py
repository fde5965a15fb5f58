"""``routes.templates``: the routes of an app without a router, in its metrics and events (WSGI and ASGI)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING

import pytest
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient
from werkzeug.test import Client

from meterware import Accounts, Config, ConfigError, MeteringMiddleware
from meterware.config import Routes
from meterware.wsgi import WSGIMeteringMiddleware

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment
    from starlette.types import Receive, Scope, Send

TEMPLATES = ("/v1/items/<int:item>", "/v1/items/<int:item>/parts/<part>", "/v1/files/<path:name>")


@pytest.mark.parametrize(
    ("templates", "path", "route"),
    [
        pytest.param(TEMPLATES, "/v1/items/7", "/v1/items/<int:item>", id="converter"),
        pytest.param(TEMPLATES, "/v1/items/7/parts/a", "/v1/items/<int:item>/parts/<part>", id="two-parts"),
        pytest.param(TEMPLATES, "/v1/files/a/b/c.txt", "/v1/files/<path:name>", id="path-converter"),
        pytest.param(TEMPLATES, "/v1/items/7/", "/v1/items/<int:item>", id="trailing-slash"),
        pytest.param(TEMPLATES, "/v1/items/seven", "<unmatched>", id="converter-refuses"),
        pytest.param(TEMPLATES, "/v1/other", "<unmatched>", id="no-template"),
        pytest.param((), "/v1/items/7", "/v1/items/7", id="none-declared-raw-path"),
    ],
)
def test_a_path_is_recorded_as_the_template_it_matches(
    templates: tuple[str, ...], path: str, route: str
) -> None:
    """The template a path matches; ``<unmatched>`` when none does; the path itself when none are declared."""
    assert Routes(templates=templates).route_of(path) == route


@pytest.mark.parametrize(
    "template",
    [
        pytest.param("v1/items", id="no-leading-slash"),
        pytest.param("/v1/items/<nope:item>", id="unknown-converter"),
        pytest.param("/v1/items/<item", id="malformed"),
    ],
)
def test_a_template_werkzeug_refuses_stops_the_start_naming_it(template: str) -> None:
    """A bad template is a ConfigError naming ``routes.templates[index]`` as the configuration is read, so
    ``meterware config check`` finds it before any process starts."""
    with pytest.raises(ConfigError, match=r"^routes\.templates\[1\]: "):
        Config.from_dict({"storage": {"url": "memory://"}, "routes": {"templates": ["/ok", template]}})


def _wsgi_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


async def _asgi_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


def _config(templates: tuple[str, ...]) -> tuple[Config, str]:
    config = Config.from_dict(
        {
            "storage": {"url": f"memory://templates-{uuid.uuid4().hex}"},
            "routes": {"templates": list(templates)},
            "pipeline": {"spool_dir": ""},
        }
    )
    accounts = Accounts.open(config)
    accounts.create_customer("acme")
    return config, accounts.create_key("acme").plaintext


def _calls(registry: CollectorRegistry, route: str) -> float:
    labels = {"route": route, "method": "GET", "outcome": "success", "plan": "default"}
    return registry.get_sample_value("meterware_requests_total", labels) or 0.0


PATHS = ["/v1/items/1", "/v1/items/2", "/v1/items/2/parts/x", "/v1/nope"]
EXPECTED = {"/v1/items/<int:item>": 2.0, "/v1/items/<int:item>/parts/<part>": 1.0, "<unmatched>": 1.0}


def test_a_bare_wsgi_apps_metrics_carry_its_templates() -> None:
    """Under WSGI, a call's metric series is its template's, not its raw path's."""
    config, key = _config(TEMPLATES)
    registry = CollectorRegistry()
    middleware = WSGIMeteringMiddleware(_wsgi_app, config=config, registry=registry)
    client = Client(middleware)
    for path in PATHS:
        assert client.get(path, headers={"Authorization": f"Bearer {key}"}, buffered=True).status_code == 200
    middleware.drain()
    assert {route: _calls(registry, route) for route in EXPECTED} == EXPECTED
    assert _calls(registry, "/v1/items/1") == 0


def test_a_bare_asgi_apps_metrics_carry_its_templates() -> None:
    """Under ASGI too (an app with no router: no ``scope["route"]``)."""
    config, key = _config(TEMPLATES)
    registry = CollectorRegistry()
    with TestClient(MeteringMiddleware(_asgi_app, config=config, registry=registry)) as client:
        for path in PATHS:
            assert client.get(path, headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert {route: _calls(registry, route) for route in EXPECTED} == EXPECTED


def test_without_templates_a_bare_app_records_raw_paths() -> None:
    """As before the setting existed: each path is its own route (bounded in length by the event)."""
    config, key = _config(())
    registry = CollectorRegistry()
    middleware = WSGIMeteringMiddleware(_wsgi_app, config=config, registry=registry)
    Client(middleware).get("/v1/items/1", headers={"Authorization": f"Bearer {key}"}, buffered=True)
    middleware.drain()
    assert _calls(registry, "/v1/items/1") == 1
