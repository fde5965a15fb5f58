"""A FastAPI app metered with one line, served by a real uvicorn process in the end-to-end tests.

Configured like a deployment: ``METERWARE_CONFIG`` and ``METERWARE_STORAGE`` in the environment.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import BackgroundTasks, FastAPI, HTTPException
from fastapi.responses import StreamingResponse

import meterware
from meterware import MeteringMiddleware

app = FastAPI()
app.add_middleware(MeteringMiddleware)


@app.get("/v1/hello")
async def hello() -> dict[str, bool]:
    return {"ok": True}


@app.get("/v1/fail")
async def fail() -> None:
    raise HTTPException(status_code=503, detail="overloaded")


@app.get("/v1/boom")
async def boom() -> None:
    raise RuntimeError("boom")


@app.get("/v1/tokens/{count}")
def tokens(count: int) -> dict[str, int]:
    meterware.usage.add("tokens", count)
    return {"tokens": count}


@app.get("/v1/words/{count}")
def words(count: int) -> dict[str, int]:
    """Report ``count`` of the ``words`` meter (configured by the tests that use it)."""
    meterware.usage.add("words", count)
    return {"words": count}


@app.get("/v1/stream")
async def stream() -> StreamingResponse:
    """Send one chunk, wait until the client says it has it (a file appears), then send the rest."""
    flag = Path(os.environ["E2E_STREAM_FLAG"])

    async def chunks() -> AsyncIterator[bytes]:
        yield b"first\n"
        for _ in range(500):  # at most 10 s
            if flag.exists():
                break
            await asyncio.sleep(0.02)
        yield f"second flag-seen={flag.exists()}\n".encode()

    return StreamingResponse(chunks(), media_type="text/plain")


@app.get("/v1/slow")
async def slow() -> dict[str, bool]:
    """A call that takes a while (a model answering, say), sent in one message."""
    await asyncio.sleep(1.0)
    return {"ok": True}


@app.get("/v1/token-stream")
async def token_stream() -> StreamingResponse:
    """Up to 200 chunks, one token each, 10 ms apart: long enough for a client to go away in the middle."""

    async def chunks() -> AsyncIterator[bytes]:
        for index in range(200):
            meterware.usage.add("tokens", 1)
            yield f"chunk {index}\n".encode()
            await asyncio.sleep(0.01)

    return StreamingResponse(chunks(), media_type="text/plain")


@app.get("/v1/background/{count}")
async def background(count: int, tasks: BackgroundTasks) -> dict[str, int]:
    """Report ``count`` tokens from a background task, well after the response has gone."""
    tasks.add_task(_report_later, count)
    return {"tokens": count}


async def _report_later(count: int) -> None:
    await asyncio.sleep(0.2)
    meterware.usage.add("tokens", count)
