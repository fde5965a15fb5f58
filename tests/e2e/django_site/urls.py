"""Views of the end-to-end Django site: async and sync views, failures, units, streams."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator

from django.core.handlers.asgi import ASGIRequest
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.urls import path

import meterware


async def hello(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"pid": os.getpid()})


def fail(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"error": "overloaded"}, status=503)


def boom(request: HttpRequest) -> HttpResponse:
    raise RuntimeError("boom")


def tokens(request: HttpRequest, count: int) -> HttpResponse:
    meterware.usage.add("tokens", count)
    return JsonResponse({"tokens": count})


def stream(request: HttpRequest, count: int) -> HttpResponse:
    """``count`` chunks, one token each, reported while the body streams (async under ASGI)."""

    def chunks() -> Iterator[bytes]:
        for index in range(count):
            meterware.usage.add("tokens", 1)
            yield f"chunk {index}\n".encode()
            time.sleep(0.001)

    async def async_chunks() -> AsyncIterator[bytes]:
        for index in range(count):
            meterware.usage.add("tokens", 1)
            yield f"chunk {index}\n".encode()
            await asyncio.sleep(0.001)

    body = async_chunks() if isinstance(request, ASGIRequest) else chunks()
    return StreamingHttpResponse(body, content_type="text/plain")


def slow_stream(request: HttpRequest) -> HttpResponse:
    """Up to 200 chunks, 10 ms apart: long enough for a client to go away in the middle."""

    def chunks() -> Iterator[bytes]:
        for index in range(200):
            yield f"chunk {index}\n".encode()
            time.sleep(0.01)

    async def async_chunks() -> AsyncIterator[bytes]:
        for index in range(200):
            yield f"chunk {index}\n".encode()
            await asyncio.sleep(0.01)

    body = async_chunks() if isinstance(request, ASGIRequest) else chunks()
    return StreamingHttpResponse(body, content_type="text/plain")


urlpatterns = [
    path("v1/hello", hello),
    path("v1/fail", fail),
    path("v1/boom", boom),
    path("v1/tokens/<int:count>", tokens),
    path("v1/stream/<int:count>", stream),
    path("v1/slow-stream", slow_stream),
]
