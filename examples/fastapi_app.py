"""An API sold by the token, metered by meterware with one line (FastAPI).

    METERWARE_CONFIG=examples/meterware.toml uvicorn examples.fastapi_app:app

``examples/README.md`` shows how to create a customer and a key, and how to call it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

import meterware
from meterware import MeteringMiddleware

app = FastAPI()
app.add_middleware(MeteringMiddleware)  # reads $METERWARE_CONFIG (or ./meterware.toml)


class Prompt(BaseModel):
    prompt: str


def complete(prompt: str) -> list[str]:
    """Stand in for a language model: the reply, word by word."""
    return ["You", "said:", *prompt.split()]


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}  # excluded in meterware.toml: no key, not metered


@app.post("/v1/chat")
async def chat(body: Prompt) -> dict[str, str]:
    words = complete(body.prompt)
    meterware.usage.add("tokens", len(body.prompt.split()) + len(words))  # charged if the call succeeds
    return {"reply": " ".join(words)}


@app.get("/v1/stream")
async def stream(prompt: str = "hello") -> StreamingResponse:
    """Server-sent events, one word each; every word is a token."""

    async def events() -> AsyncIterator[str]:
        for word in complete(prompt):
            meterware.usage.add("tokens", 1)
            yield f"data: {word}\n\n"
            await asyncio.sleep(0.05)

    return StreamingResponse(events(), media_type="text/event-stream")
