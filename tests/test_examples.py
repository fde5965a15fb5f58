"""The examples work: each app serves token-metered calls in-process, and the usage adds up.

``examples/README.md`` runs them under real servers; here each is imported as those servers import it,
with the example configuration and an in-process ``memory://`` store.
"""

from __future__ import annotations

import importlib
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import redis
from django.test.utils import override_settings
from starlette.testclient import TestClient

from meterware import Accounts, Config
from meterware.rollup import RollupWorker
from tests.behaviour.apps import configure_django

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
#: 3 prompt words + 5 reply words for the chat, 4 streamed words: 12 tokens at 0.00002 credits.
TOKENS = 12
SPEND = TOKENS * 20


@pytest.fixture
def storage_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """Configure the examples as the README does, on a fresh memory:// store."""
    url = f"memory://{uuid.uuid4().hex}"
    monkeypatch.setenv("METERWARE_CONFIG", str(EXAMPLES / "meterware.toml"))
    monkeypatch.setenv("METERWARE_STORAGE", url)
    monkeypatch.chdir(tmp_path)  # the example's spool directory is relative
    return url


@pytest.fixture
def accounts(storage_url: str) -> Accounts:
    return Accounts.open(Config.load())


@pytest.fixture
def key(accounts: Accounts) -> str:
    accounts.create_customer("acme", plan="tokens")
    accounts.grant_credits("acme", "1")
    return accounts.create_key("acme").plaintext


def fresh_import(name: str) -> ModuleType:
    """Import ``name`` anew, as a server process does (it reads the environment at import)."""
    sys.modules.pop(name, None)
    return importlib.import_module(name)


@pytest.fixture
def imported() -> Iterator[list[str]]:
    """Names of example modules a test imported, forgotten afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        sys.modules.pop(name, None)


def chat_and_stream(client: Any, key: str) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    assert client.get("/health").json() == {"status": "ok"}
    assert client.post("/v1/chat", json={"prompt": "hi"}).status_code == 401
    chat = client.post("/v1/chat", json={"prompt": "one two three"}, headers=headers)
    assert chat.json() == {"reply": "You said: one two three"}
    stream = client.get("/v1/stream", params={"prompt": "a b"}, headers=headers)
    assert stream.text == "data: You\n\ndata: said:\n\ndata: a\n\ndata: b\n\n"
    assert stream.headers["content-type"].startswith("text/event-stream")


def assert_charged(accounts: Accounts) -> None:
    RollupWorker(accounts.storage, accounts.config).drain()
    usage = accounts.usage("acme")
    assert (usage.calls["success"], usage.meters["tokens"], usage.spend) == (2, TOKENS, SPEND)
    assert accounts.balance("acme").balance == 1_000_000 - SPEND


def test_fastapi_example(accounts: Accounts, key: str, imported: list[str]) -> None:
    """examples/fastapi_app.py: the chat and the stream are metered by the token."""
    imported.append("examples.fastapi_app")
    app = fresh_import("examples.fastapi_app").app
    with TestClient(app) as client:  # its lifespan's shutdown drains the buffer
        chat_and_stream(client, key)
    assert_charged(accounts)


def test_flask_example(accounts: Accounts, key: str, imported: list[str]) -> None:
    """examples/flask_app.py: the chat and the stream are metered by the token."""
    imported.append("examples.flask_app")
    app = fresh_import("examples.flask_app").app
    transport = httpx.WSGITransport(app=app)
    with httpx.Client(transport=transport, base_url="http://localhost") as client:
        chat_and_stream(client, key)
    app.wsgi_app.drain()
    assert_charged(accounts)


@pytest.fixture
def django_example(imported: list[str]) -> Iterator[None]:
    """The example project's settings, over the suite's once-per-process Django configuration."""
    from django.conf import settings

    configure_django()
    imported += ["examples.django_project.asgi", "examples.django_project.wsgi"]
    example = fresh_import("examples.django_project.settings")
    # Settings the suite already has as the example wants them (DATABASES...) are not overridden.
    values = {name: getattr(example, name) for name in dir(example) if name.isupper()}
    with override_settings(**{name: v for name, v in values.items() if getattr(settings, name, None) != v}):
        yield


@pytest.mark.usefixtures("django_example")
def test_django_example_under_asgi(accounts: Accounts, key: str) -> None:
    """examples/django_project served by its asgi.py: metered by the token, drained at shutdown."""
    application = fresh_import("examples.django_project.asgi").application
    with TestClient(application, base_url="http://localhost") as client:
        chat_and_stream(client, key)
    assert_charged(accounts)


@pytest.mark.usefixtures("django_example")
def test_django_example_under_wsgi(accounts: Accounts, key: str) -> None:
    """examples/django_project served by its wsgi.py: metered by the token."""
    application = fresh_import("examples.django_project.wsgi").application
    transport = httpx.WSGITransport(app=application)
    with httpx.Client(transport=transport, base_url="http://localhost") as client:
        chat_and_stream(client, key)
    # A WSGI server drains at exit; here the middleware Django built is drained directly.
    middleware = application._middleware_chain.__wrapped__
    middleware.clients.drain()
    assert_charged(accounts)


@pytest.mark.usefixtures("django_example")
def test_django_example_under_the_django_test_client(accounts: Accounts, key: str) -> None:
    """Django's own test client goes through the middleware like a server (the users' test suites)."""
    from django.test import Client

    client = Client(headers={"Authorization": f"Bearer {key}"})
    chat = client.post("/v1/chat", {"prompt": "one two three"}, content_type="application/json")
    assert chat.json() == {"reply": "You said: one two three"}
    stream = client.get("/v1/stream", {"prompt": "a b"})
    assert b"".join(stream.streaming_content) == b"data: You\n\ndata: said:\n\ndata: a\n\ndata: b\n\n"
    stream.close()
    assert Client().get("/v1/stream").status_code == 401
    client.handler._middleware_chain.__wrapped__.clients.drain()
    assert_charged(accounts)


@pytest.mark.redis
def test_importing_the_flask_example_starts_no_thread_and_opens_no_connection(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, redis_url: str, imported: list[str]
) -> None:
    """gunicorn --preload imports the app before forking: meterware must not start a thread or connect then.

    After the first call (in the worker), the flusher thread and the connections exist.
    """
    monkeypatch.setenv("METERWARE_CONFIG", str(EXAMPLES / "meterware.toml"))
    monkeypatch.setenv("METERWARE_STORAGE", redis_url)
    monkeypatch.chdir(tmp_path)
    admin = redis.Redis.from_url(redis_url)

    def connections() -> int:
        return int(admin.info("stats")["total_connections_received"])

    accounts = Accounts.open(Config.load())
    accounts.create_customer("acme", plan="tokens")
    accounts.grant_credits("acme", "1")
    key = accounts.create_key("acme").plaintext
    threads, connected = threading.active_count(), connections()
    imported.append("examples.flask_app")
    app = fresh_import("examples.flask_app").app
    assert (threading.active_count(), connections()) == (threads, connected)

    transport = httpx.WSGITransport(app=app)
    with httpx.Client(transport=transport, base_url="http://localhost") as client:
        response = client.post("/v1/chat", json={"prompt": "hi"}, headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200
    assert threading.active_count() == threads + 1  # the flusher, started by the first call
    assert connections() > connected
    app.wsgi_app.drain()
    app.wsgi_app.flusher.storage.close()
    app.wsgi_app.storage.close()
    accounts.storage.close()
    admin.close()
