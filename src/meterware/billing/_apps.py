"""What the apps served next to the API share (the self-service endpoint, the portal): the backend opened
on first use and closed once, and the ASGI lifespan whose shutdown closes it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from meterware.billing.accounts import Accounts
from meterware.config import Config

if TYPE_CHECKING:
    from starlette.types import Receive, Send


class LazyAccounts:
    """:class:`Accounts` of ``config``, opened by the first thread that needs them (memory:// is the
    process's own store, as the middleware's)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._accounts: Accounts | None = None
        self._lock = threading.Lock()

    def get(self) -> Accounts:
        if self._accounts is None:
            with self._lock:
                if self._accounts is None:
                    self._accounts = Accounts.open(self.config)
        return self._accounts

    def close(self) -> None:
        with self._lock:
            accounts, self._accounts = self._accounts, None
        if accounts is not None:
            accounts.close()


async def serve_lifespan(receive: Receive, send: Send, close: Callable[[], None]) -> None:
    """Answer an ASGI lifespan: start-up at once; shutdown after ``close`` (run in a thread)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await asyncio.to_thread(close)
            await send({"type": "lifespan.shutdown.complete"})
            return
