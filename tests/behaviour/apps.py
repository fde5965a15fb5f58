"""The same small API written for each framework; the behaviour suite runs against all of them.

ASGI (Starlette, FastAPI), WSGI (Flask, a bare werkzeug app) and Django (sync views under the WSGI
handler, async views under the ASGI handler). Each serves the same endpoints with the same responses.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import BackgroundTasks, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse

import meterware

#: Calls that reached an endpoint, by path (to prove refused calls never run the app).
CALLS: list[str] = []


def report_tokens(body: dict[str, Any]) -> None:
    """Report a chat body's tokens, with the dimension values it names if any."""
    meterware.usage.add("tokens", body["tokens"], **body.get("dimensions", {}))


def who_calls() -> dict[str, Any]:
    """What ``/v1/whoami`` answers: ``meterware.current_call()`` as JSON (``{}`` when there is none)."""
    call = meterware.current_call()
    return {} if call is None else dataclasses.asdict(call)


def starlette_app() -> Any:
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.requests import Request as StarletteRequest
    from starlette.responses import RedirectResponse
    from starlette.routing import Route

    async def hello(request: StarletteRequest) -> JSONResponse:
        CALLS.append("hello")
        return JSONResponse({"ok": True})

    async def item(request: StarletteRequest) -> JSONResponse:
        CALLS.append("item")
        return JSONResponse({"id": request.path_params["item_id"]})

    async def fail(request: StarletteRequest) -> JSONResponse:
        CALLS.append("fail")
        return JSONResponse({"error": "upstream"}, status_code=502)

    async def boom(request: StarletteRequest) -> JSONResponse:
        CALLS.append("boom")
        raise RuntimeError("boom")

    async def bad(request: StarletteRequest) -> JSONResponse:
        CALLS.append("bad")
        return JSONResponse({"error": "bad input"}, status_code=422)

    async def chat(request: StarletteRequest) -> JSONResponse:
        CALLS.append("chat")
        body = await request.json()
        report_tokens(body)
        return JSONResponse({"ok": True})

    def chat_sync(request: StarletteRequest) -> JSONResponse:
        CALLS.append("chat-sync")
        meterware.usage.add("tokens", int(request.query_params["tokens"]))
        return JSONResponse({"ok": True})

    async def header_tokens(request: StarletteRequest) -> JSONResponse:
        CALLS.append("header-tokens")
        return JSONResponse({"ok": True}, headers={"X-Usage-Tokens": request.query_params.get("value", "42")})

    async def moved(request: StarletteRequest) -> RedirectResponse:
        CALLS.append("moved")
        return RedirectResponse("/v1/hello", status_code=302)

    async def background(request: StarletteRequest) -> JSONResponse:
        CALLS.append("background")
        meterware.usage.add("tokens", BACKGROUND_TOKENS[0])
        return JSONResponse({"ok": True}, background=BackgroundTask(_report_later, BACKGROUND_TOKENS[1]))

    async def stream(request: StarletteRequest) -> StreamingResponse:
        CALLS.append("stream")
        return StreamingResponse(_chunks(), media_type="text/plain")

    async def stream_broken(request: StarletteRequest) -> StreamingResponse:
        CALLS.append("stream-broken")
        return StreamingResponse(_broken_chunks(), media_type="text/plain")

    async def heavy(request: StarletteRequest) -> JSONResponse:
        CALLS.append("heavy")
        return JSONResponse({"ok": True})

    async def health(request: StarletteRequest) -> JSONResponse:
        CALLS.append("health")
        return JSONResponse({"status": "ok"})

    async def whoami(request: StarletteRequest) -> JSONResponse:
        CALLS.append("whoami")
        return JSONResponse(who_calls())

    return Starlette(
        routes=[
            Route("/v1/whoami", whoami),
            Route("/v1/hello", hello),
            Route("/v1/items/{item_id}", item),
            Route("/v1/fail", fail),
            Route("/v1/boom", boom),
            Route("/v1/bad", bad),
            Route("/v1/chat", chat, methods=["POST"]),
            Route("/v1/chat-sync", chat_sync),
            Route("/v1/header-tokens", header_tokens),
            Route("/v1/moved", moved),
            Route("/v1/background", background),
            Route("/v1/stream", stream),
            Route("/v1/stream-broken", stream_broken),
            Route("/v1/heavy", heavy),
            Route("/health", health),
        ]
    )


#: Tokens the ``/v1/background`` endpoints report: in the handler, then in work run after the response.
BACKGROUND_TOKENS = (5, 7)


async def _report_later(tokens: int) -> None:
    await asyncio.sleep(0.01)
    meterware.usage.add("tokens", tokens)


def _report_later_sync(tokens: int) -> None:
    meterware.usage.add("tokens", tokens)


async def _chunks() -> AsyncIterator[bytes]:
    for index in range(3):
        yield f"chunk {index}\n".encode()
        await asyncio.sleep(0.01)


def _sync_chunks() -> Iterator[bytes]:
    for index in range(3):
        yield f"chunk {index}\n".encode()
        time.sleep(0.01)


async def _broken_chunks() -> AsyncIterator[bytes]:
    yield b"chunk 0\n"
    raise RuntimeError("broken stream")


def _sync_broken_chunks() -> Iterator[bytes]:
    yield b"chunk 0\n"
    raise RuntimeError("broken stream")


def fastapi_app() -> Any:
    # FastAPI reads the endpoints' annotations, so its names are imported at module level.
    app = FastAPI()

    @app.get("/v1/whoami")
    def whoami() -> dict[str, Any]:  # sync: FastAPI runs it in a worker thread
        CALLS.append("whoami")
        return who_calls()

    @app.get("/v1/hello")
    async def hello() -> dict[str, bool]:
        CALLS.append("hello")
        return {"ok": True}

    @app.get("/v1/items/{item_id}")
    async def item(item_id: str) -> dict[str, str]:
        CALLS.append("item")
        return {"id": item_id}

    @app.get("/v1/fail")
    async def fail() -> None:
        CALLS.append("fail")
        raise HTTPException(status_code=502, detail="upstream")

    @app.get("/v1/boom")
    async def boom() -> None:
        CALLS.append("boom")
        raise RuntimeError("boom")

    @app.get("/v1/bad")
    async def bad() -> None:
        CALLS.append("bad")
        raise HTTPException(status_code=422, detail="bad input")

    @app.post("/v1/chat")
    async def chat(request: Request) -> dict[str, bool]:
        CALLS.append("chat")
        body = await request.json()
        report_tokens(body)
        return {"ok": True}

    @app.get("/v1/chat-sync")
    def chat_sync(tokens: int) -> dict[str, bool]:
        CALLS.append("chat-sync")
        meterware.usage.add("tokens", tokens)
        return {"ok": True}

    @app.get("/v1/header-tokens")
    async def header_tokens(value: str = "42") -> JSONResponse:
        CALLS.append("header-tokens")
        return JSONResponse({"ok": True}, headers={"X-Usage-Tokens": value})

    @app.get("/v1/moved")
    async def moved() -> RedirectResponse:
        CALLS.append("moved")
        return RedirectResponse("/v1/hello", status_code=302)

    @app.get("/v1/background")
    async def background(tasks: BackgroundTasks) -> dict[str, bool]:
        CALLS.append("background")
        meterware.usage.add("tokens", BACKGROUND_TOKENS[0])
        tasks.add_task(_report_later_sync, BACKGROUND_TOKENS[1])  # a sync task: run in a thread
        return {"ok": True}

    @app.get("/v1/stream")
    async def stream() -> StreamingResponse:
        CALLS.append("stream")
        return StreamingResponse(_chunks(), media_type="text/plain")

    @app.get("/v1/stream-broken")
    async def stream_broken() -> StreamingResponse:
        CALLS.append("stream-broken")
        return StreamingResponse(_broken_chunks(), media_type="text/plain")

    @app.get("/v1/heavy")
    async def heavy() -> dict[str, bool]:
        CALLS.append("heavy")
        return {"ok": True}

    @app.get("/health")
    async def health() -> dict[str, str]:
        CALLS.append("health")
        return {"status": "ok"}

    return app


def flask_app() -> Any:
    from flask import Flask, Response, jsonify, redirect, request

    app = Flask(__name__)

    @app.get("/v1/whoami")
    def whoami() -> Any:
        CALLS.append("whoami")
        return who_calls()

    @app.get("/v1/hello")
    def hello() -> Any:
        CALLS.append("hello")
        return {"ok": True}

    @app.get("/v1/items/<item_id>")
    def item(item_id: str) -> Any:
        CALLS.append("item")
        return {"id": item_id}

    @app.get("/v1/fail")
    def fail() -> Any:
        CALLS.append("fail")
        return {"error": "upstream"}, 502

    @app.get("/v1/boom")
    def boom() -> Any:
        CALLS.append("boom")
        raise RuntimeError("boom")

    @app.get("/v1/bad")
    def bad() -> Any:
        CALLS.append("bad")
        return {"error": "bad input"}, 422

    @app.post("/v1/chat")
    async def chat() -> Any:  # Flask runs async views through asgiref
        CALLS.append("chat")
        report_tokens(request.get_json())
        return {"ok": True}

    @app.get("/v1/chat-sync")
    def chat_sync() -> Any:
        CALLS.append("chat-sync")
        meterware.usage.add("tokens", int(request.args["tokens"]))
        return {"ok": True}

    @app.get("/v1/header-tokens")
    def header_tokens() -> Any:
        CALLS.append("header-tokens")
        return {"ok": True}, 200, {"X-Usage-Tokens": request.args.get("value", "42")}

    @app.get("/v1/moved")
    def moved() -> Any:
        CALLS.append("moved")
        return redirect("/v1/hello", 302)

    @app.get("/v1/folder/")
    def folder() -> Any:
        CALLS.append("folder")
        return {"ok": True}

    @app.get("/v1/background")
    def background() -> Any:
        CALLS.append("background")
        meterware.usage.add("tokens", BACKGROUND_TOKENS[0])
        response = jsonify(ok=True)
        # Run by the server once the response is sent (in the response's close()).
        response.call_on_close(lambda: _report_later_sync(BACKGROUND_TOKENS[1]))
        return response

    @app.get("/v1/stream")
    def stream() -> Any:
        CALLS.append("stream")
        return Response(_sync_chunks(), mimetype="text/plain")

    @app.get("/v1/stream-broken")
    def stream_broken() -> Any:
        CALLS.append("stream-broken")
        return Response(_sync_broken_chunks(), mimetype="text/plain")

    @app.get("/v1/heavy")
    def heavy() -> Any:
        CALLS.append("heavy")
        return {"ok": True}

    @app.get("/health")
    def health() -> Any:
        CALLS.append("health")
        return {"status": "ok"}

    return app


def wsgi_app() -> Any:
    """A bare PEP 3333 app on werkzeug's Request, Response and URL map (no framework)."""
    from werkzeug.exceptions import HTTPException
    from werkzeug.routing import Map, Rule
    from werkzeug.utils import redirect
    from werkzeug.wrappers import Request, Response

    def reply(data: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        return Response(json.dumps(data), status=status, headers=headers, mimetype="application/json")

    def hello(request: Request) -> Response:
        return reply({"ok": True})

    def whoami(request: Request) -> Response:
        return reply(who_calls())

    def item(request: Request, item_id: str) -> Response:
        return reply({"id": item_id})

    def fail(request: Request) -> Response:
        return reply({"error": "upstream"}, 502)

    def boom(request: Request) -> Response:
        raise RuntimeError("boom")

    def bad(request: Request) -> Response:
        return reply({"error": "bad input"}, 422)

    def chat(request: Request) -> Response:
        # The units are reported from a coroutine the handler runs: the call's context goes with it.
        async def generate() -> None:
            report_tokens(request.get_json())

        asyncio.run(generate())
        return reply({"ok": True})

    def chat_sync(request: Request) -> Response:
        meterware.usage.add("tokens", int(request.args["tokens"]))
        return reply({"ok": True})

    def header_tokens(request: Request) -> Response:
        return reply({"ok": True}, headers={"X-Usage-Tokens": request.args.get("value", "42")})

    def moved(request: Request) -> Response:
        return redirect("/v1/hello", 302)

    def folder(request: Request) -> Response:
        return reply({"ok": True})

    def background(request: Request) -> Response:
        meterware.usage.add("tokens", BACKGROUND_TOKENS[0])
        response = reply({"ok": True})
        response.call_on_close(lambda: _report_later_sync(BACKGROUND_TOKENS[1]))
        return response

    def stream(request: Request) -> Response:
        return Response(_sync_chunks(), mimetype="text/plain")

    def stream_broken(request: Request) -> Response:
        return Response(_sync_broken_chunks(), mimetype="text/plain")

    def heavy(request: Request) -> Response:
        return reply({"ok": True})

    def health(request: Request) -> Response:
        return reply({"status": "ok"})

    urls = Map(
        [
            Rule("/v1/hello", endpoint=hello),
            Rule("/v1/whoami", endpoint=whoami),
            Rule("/v1/items/<item_id>", endpoint=item),
            Rule("/v1/fail", endpoint=fail),
            Rule("/v1/boom", endpoint=boom),
            Rule("/v1/bad", endpoint=bad),
            Rule("/v1/chat", endpoint=chat, methods=["POST"]),
            Rule("/v1/chat-sync", endpoint=chat_sync),
            Rule("/v1/header-tokens", endpoint=header_tokens),
            Rule("/v1/moved", endpoint=moved),
            Rule("/v1/folder/", endpoint=folder),
            Rule("/v1/background", endpoint=background),
            Rule("/v1/stream", endpoint=stream),
            Rule("/v1/stream-broken", endpoint=stream_broken),
            Rule("/v1/heavy", endpoint=heavy),
            Rule("/health", endpoint=health),
        ]
    )

    def app(environ: Any, start_response: Any) -> Any:
        request = Request(environ)
        try:
            endpoint, args = urls.bind_to_environ(environ).match()
        except HTTPException as error:
            return error(environ, start_response)
        CALLS.append(endpoint.__name__.replace("_", "-"))
        response: Response = endpoint(request, **args)
        return response(environ, start_response)

    return app


# Django: one site configured once per process; each mode has its own URLconf module.

DJANGO_URLCONFS = {
    "sync": "tests.behaviour.django_urls",
    "async": "tests.behaviour.django_async_urls",
}


def configure_django() -> None:
    """Configure Django's settings for this process (once; tests override what they need)."""
    import django
    from django.conf import settings

    if settings.configured:
        return
    settings.configure(
        DEBUG=False,
        SECRET_KEY="meterware-behaviour-tests",
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=DJANGO_URLCONFS["sync"],
        MIDDLEWARE=["meterware.django.MeteringMiddleware"],
        INSTALLED_APPS=[],
        DATABASES={},
        USE_TZ=True,
    )
    django.setup()


def django_urlpatterns(mode: Literal["sync", "async"]) -> list[Any]:
    """The API as Django views: sync views for the WSGI handler, async ones for the ASGI handler.

    Either way ``/v1/chat`` is async and ``/v1/chat-sync`` sync, so units are reported from both kinds.
    """
    from django.http import (
        HttpRequest,
        HttpResponse,
        HttpResponseRedirect,
        JsonResponse,
        StreamingHttpResponse,
    )
    from django.urls import path
    from django.views.decorators.http import require_POST

    def hello(request: HttpRequest) -> HttpResponse:
        CALLS.append("hello")
        return JsonResponse({"ok": True})

    def whoami(request: HttpRequest) -> HttpResponse:
        CALLS.append("whoami")
        return JsonResponse(who_calls())

    def item(request: HttpRequest, item_id: str) -> HttpResponse:
        CALLS.append("item")
        return JsonResponse({"id": item_id})

    def fail(request: HttpRequest) -> HttpResponse:
        CALLS.append("fail")
        return JsonResponse({"error": "upstream"}, status=502)

    def boom(request: HttpRequest) -> HttpResponse:
        CALLS.append("boom")
        raise RuntimeError("boom")

    def bad(request: HttpRequest) -> HttpResponse:
        CALLS.append("bad")
        return JsonResponse({"error": "bad input"}, status=422)

    @require_POST
    async def chat(request: HttpRequest) -> HttpResponse:
        CALLS.append("chat")
        report_tokens(json.loads(request.body))
        return JsonResponse({"ok": True})

    def chat_sync(request: HttpRequest) -> HttpResponse:
        CALLS.append("chat-sync")
        meterware.usage.add("tokens", int(request.GET["tokens"]))
        return JsonResponse({"ok": True})

    def header_tokens(request: HttpRequest) -> HttpResponse:
        CALLS.append("header-tokens")
        response = JsonResponse({"ok": True})
        response["X-Usage-Tokens"] = request.GET.get("value", "42")
        return response

    def moved(request: HttpRequest) -> HttpResponse:
        CALLS.append("moved")
        return HttpResponseRedirect("/v1/hello")

    def stream(request: HttpRequest) -> HttpResponse:
        CALLS.append("stream")
        return StreamingHttpResponse(_sync_chunks(), content_type="text/plain")

    async def async_stream(request: HttpRequest) -> HttpResponse:
        CALLS.append("stream")
        return StreamingHttpResponse(_chunks(), content_type="text/plain")

    def stream_broken(request: HttpRequest) -> HttpResponse:
        CALLS.append("stream-broken")
        return StreamingHttpResponse(_sync_broken_chunks(), content_type="text/plain")

    async def async_stream_broken(request: HttpRequest) -> HttpResponse:
        CALLS.append("stream-broken")
        return StreamingHttpResponse(_broken_chunks(), content_type="text/plain")

    def heavy(request: HttpRequest) -> HttpResponse:
        CALLS.append("heavy")
        return JsonResponse({"ok": True})

    def health(request: HttpRequest) -> HttpResponse:
        CALLS.append("health")
        return JsonResponse({"status": "ok"})

    views: dict[str, Callable[..., Any]] = {
        "v1/hello": hello,
        "v1/whoami": whoami,
        "v1/items/<str:item_id>": item,
        "v1/fail": fail,
        "v1/boom": boom,
        "v1/bad": bad,
        "v1/chat": chat,
        "v1/chat-sync": chat_sync,
        "v1/header-tokens": header_tokens,
        "v1/moved": moved,
        "v1/stream": stream,
        "v1/stream-broken": stream_broken,
        "v1/heavy": heavy,
        "health": health,
    }
    if mode == "async":
        views = {route: _as_async(view) for route, view in views.items() if view is not chat_sync}
        views["v1/chat-sync"] = chat_sync
        views["v1/stream"] = async_stream
        views["v1/stream-broken"] = async_stream_broken
    return [path(route, view) for route, view in views.items()]


def _as_async(view: Callable[..., Any]) -> Callable[..., Any]:
    """The same view as a coroutine function (Django then calls it on the event loop, no thread)."""
    from asgiref.sync import iscoroutinefunction

    if iscoroutinefunction(view):
        return view

    async def async_view(request: Any, **kwargs: Any) -> Any:
        return view(request, **kwargs)

    return async_view


@dataclass(frozen=True)
class Framework:
    """One way to serve the API, and what events name the route ``/v1/items/{id}`` by."""

    #: ``asgi``, ``wsgi``, ``django-wsgi`` or ``django-asgi``: how the harness serves it.
    adapter: Literal["asgi", "wsgi", "django-wsgi", "django-asgi"]
    #: Makes the app (for Django: names the URLconf).
    build: Callable[[], Any]
    #: The route events of ``GET /v1/items/12345`` carry: the framework's template syntax, or the path
    #: itself for a bare WSGI app (it has no router the middleware could read).
    item_route: str
    #: A path the router itself answers with a redirect (a trailing slash added or removed), if any.
    slash_redirect: str | None = None


FRAMEWORKS = {
    "starlette": Framework("asgi", starlette_app, "/v1/items/{item_id}", "/v1/hello/"),
    "fastapi": Framework("asgi", fastapi_app, "/v1/items/{item_id}", "/v1/hello/"),
    "flask": Framework("wsgi", flask_app, "/v1/items/<item_id>", "/v1/folder"),
    "wsgi": Framework("wsgi", wsgi_app, "/v1/items/12345", "/v1/folder"),
    "django-sync": Framework("django-wsgi", lambda: DJANGO_URLCONFS["sync"], "/v1/items/<str:item_id>"),
    "django-async": Framework("django-asgi", lambda: DJANGO_URLCONFS["async"], "/v1/items/<str:item_id>"),
}
