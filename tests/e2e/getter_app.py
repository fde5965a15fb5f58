"""A FastAPI app whose callers are authenticated by the app itself (here a trusted ``X-User`` header, where
a real app reads its verified JWT or session), metered by customer with ``customer_getter``."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

import meterware
from meterware import MeteringMiddleware


def customer_of(scope: Any) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-user":
            return str(value.decode("latin-1"))
    return None


app = FastAPI()
app.add_middleware(MeteringMiddleware, customer_getter=customer_of)


@app.get("/v1/hello")
async def hello() -> dict[str, Any]:
    call = meterware.current_call()
    return {"customer": call.customer if call else None}
