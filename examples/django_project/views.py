"""Views of the example Django project: a token-metered chat and a token-metered stream."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator

from django.core.handlers.asgi import ASGIRequest
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.http import require_GET, require_POST

import meterware


def complete(prompt: str) -> list[str]:
    """Stand in for a language model: the reply, word by word."""
    return ["You", "said:", *prompt.split()]


@require_GET
def health(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"status": "ok"})  # excluded in meterware.toml: no key, not metered


@require_POST
def chat(request: HttpRequest) -> HttpResponse:
    prompt = str(json.loads(request.body)["prompt"])
    words = complete(prompt)
    meterware.usage.add("tokens", len(prompt.split()) + len(words))  # charged if the call succeeds
    return JsonResponse({"reply": " ".join(words)})


@require_GET
def stream(request: HttpRequest) -> HttpResponse:
    """Server-sent events, one word each; every word is a token."""
    words = complete(request.GET.get("prompt", "hello"))

    def events() -> Iterator[str]:
        for word in words:
            meterware.usage.add("tokens", 1)
            yield f"data: {word}\n\n"
            time.sleep(0.05)

    async def async_events() -> AsyncIterator[str]:
        for word in words:
            meterware.usage.add("tokens", 1)
            yield f"data: {word}\n\n"
            await asyncio.sleep(0.05)

    # Each server kind streams its own kind of iterator without a thread: async under ASGI.
    body = async_events() if isinstance(request, ASGIRequest) else events()
    return StreamingHttpResponse(body, content_type="text/event-stream")
