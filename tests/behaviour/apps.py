"""The same small API written for each framework; the behaviour suite runs against all of them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse

import meterware

#: Calls that reached an endpoint, by path (to prove refused calls never run the app).
CALLS: list[str] = []


def starlette_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request as StarletteRequest
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
        meterware.usage.add("tokens", body["tokens"])
        return JSONResponse({"ok": True})

    def chat_sync(request: StarletteRequest) -> JSONResponse:
        CALLS.append("chat-sync")
        meterware.usage.add("tokens", int(request.query_params["tokens"]))
        return JSONResponse({"ok": True})

    async def header_tokens(request: StarletteRequest) -> JSONResponse:
        CALLS.append("header-tokens")
        return JSONResponse({"ok": True}, headers={"X-Usage-Tokens": "42"})

    async def stream(request: StarletteRequest) -> StreamingResponse:
        CALLS.append("stream")
        return StreamingResponse(_chunks(), media_type="text/plain")

    async def heavy(request: StarletteRequest) -> JSONResponse:
        CALLS.append("heavy")
        return JSONResponse({"ok": True})

    async def health(request: StarletteRequest) -> JSONResponse:
        CALLS.append("health")
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/v1/hello", hello),
            Route("/v1/items/{item_id}", item),
            Route("/v1/fail", fail),
            Route("/v1/boom", boom),
            Route("/v1/bad", bad),
            Route("/v1/chat", chat, methods=["POST"]),
            Route("/v1/chat-sync", chat_sync),
            Route("/v1/header-tokens", header_tokens),
            Route("/v1/stream", stream),
            Route("/v1/heavy", heavy),
            Route("/health", health),
        ]
    )


async def _chunks() -> AsyncIterator[bytes]:
    for index in range(3):
        yield f"chunk {index}\n".encode()
        await asyncio.sleep(0.01)


def fastapi_app() -> Any:
    # FastAPI reads the endpoints' annotations, so its names are imported at module level.
    app = FastAPI()

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
        meterware.usage.add("tokens", body["tokens"])
        return {"ok": True}

    @app.get("/v1/chat-sync")
    def chat_sync(tokens: int) -> dict[str, bool]:
        CALLS.append("chat-sync")
        meterware.usage.add("tokens", tokens)
        return {"ok": True}

    @app.get("/v1/header-tokens")
    async def header_tokens() -> JSONResponse:
        CALLS.append("header-tokens")
        return JSONResponse({"ok": True}, headers={"X-Usage-Tokens": "42"})

    @app.get("/v1/stream")
    async def stream() -> StreamingResponse:
        CALLS.append("stream")
        return StreamingResponse(_chunks(), media_type="text/plain")

    @app.get("/v1/heavy")
    async def heavy() -> dict[str, bool]:
        CALLS.append("heavy")
        return {"ok": True}

    @app.get("/health")
    async def health() -> dict[str, str]:
        CALLS.append("health")
        return {"status": "ok"}

    return app


FRAMEWORKS = {"starlette": starlette_app, "fastapi": fastapi_app}
