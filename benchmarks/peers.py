"""The peers meterware is measured against: the same Starlette/FastAPI app behind other middleware.

Factories for ``uvicorn --factory``, served exactly like ``benchmarks.apps``; the Redis-backed ones read
``BENCH_REDIS_URL`` (the suite's Redis). Every peer keys its work by the ``Authorization`` header and
refuses nothing under the benchmark's load (limits of 1,000,000 calls a second, 10^12 credits):

* ``starlette_noop``: a pure-ASGI middleware that only passes the call on (the floor of any middleware);
* ``starlette_limits``: the ``limits`` library's asyncio fixed-window limiter on Redis, one ``hit()`` per
  call (one script in Redis), 429 when refused: a rate limiter and nothing else;
* ``starlette_reference`` and ``starlette_reference_pipelined``: a minimal metering middleware, the
  reference: per call one EVALSHA of a script that counts the call in its rate-limit window and takes a
  credit from the key's balance (429 / 402 when over), then the call's usage event is appended to a list
  that a background task writes to a Redis stream as one XADD per batch (every 50 ms or 500 events). The
  pipelined variant sends the EVALSHAs of the calls that arrive while a round trip is in flight together,
  in one pipeline (two round trips in flight at most);
* ``fastapi_instrumentator``: prometheus-fastapi-instrumentator's default metrics (``instrument(app)``).

Flask-Limiter is in ``benchmarks.wsgi_apps``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import msgpack
import redis
import redis.asyncio
from fastapi import FastAPI
from redis.exceptions import NoScriptError
from starlette.applications import Starlette
from starlette.routing import Route

from benchmarks.apps import fastapi_bare, hello

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: The generous limit every limiting peer checks on every call (never reached by the benchmark).
RATE_LIMIT = 1_000_000
#: The reference's usage stream, and its accounts' key prefix (one hash per Authorization header).
USAGE_STREAM = "reference:usage"
ACCOUNT_PREFIX = "reference:account:"
RATE_PREFIX = "reference:rate:"
#: Credits of a new reference account (one credit a call).
CREDITS = 10**12
FLUSH_SECONDS = 0.05
FLUSH_EVENTS = 500
#: Round trips of the pipelined reference in flight at once.
IN_FLIGHT = 2

#: KEYS: the rate-limit window's counter, the key's account. ARGV: the limit, the window in seconds, the
#: price of a call. Returns the credits left, or -1 (rate limited) or -2 (out of credits).
ADMIT_SCRIPT = """
local calls = redis.call('INCR', KEYS[1])
if calls == 1 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
if calls > tonumber(ARGV[1]) then return -1 end
local price = tonumber(ARGV[3])
local left = redis.call('HINCRBY', KEYS[2], 'credits', -price)
if left < 0 then
  redis.call('HINCRBY', KEYS[2], 'credits', price)
  return -2
end
return left
"""
#: The limit, a window of one second, a credit a call.
ADMIT_ARGS = [RATE_LIMIT, 1, 1]
RATE_LIMITED = -1
NO_CREDITS = -2


def _redis_url() -> str:
    return os.environ["BENCH_REDIS_URL"]


def _authorization(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            return str(value.decode("latin-1"))
    return None


async def _refuse(send: Send, status: int) -> None:
    body = b'{"error":"refused"}'
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# -- the floor ---------------------------------------------------------------------------------------


class NoOpMiddleware:
    """Pass every call on, and do nothing else."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def starlette_noop() -> Starlette:
    app = Starlette(routes=[Route("/v1/hello", hello)])
    app.add_middleware(NoOpMiddleware)
    return app


# -- limits ------------------------------------------------------------------------------------------


class LimitsMiddleware:
    """Rate limit each Authorization header with ``limits``' asyncio fixed window on Redis; 429 if over."""

    def __init__(self, app: ASGIApp, storage_uri: str, limit: str) -> None:
        from limits import parse
        from limits.aio.storage import RedisStorage
        from limits.aio.strategies import FixedWindowRateLimiter

        self.app = app
        # redis.asyncio (with hiredis), the client meterware uses; limits' default client is coredis.
        self.limiter = FixedWindowRateLimiter(RedisStorage(storage_uri, implementation="redispy"))
        self.limit = parse(limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = _authorization(scope)
        if key is None:
            await _refuse(send, 401)
        elif await self.limiter.hit(self.limit, key):
            await self.app(scope, receive, send)
        else:
            await _refuse(send, 429)


def starlette_limits() -> Starlette:
    app = Starlette(routes=[Route("/v1/hello", hello)])
    storage = "async+" + _redis_url()
    app.add_middleware(LimitsMiddleware, storage_uri=storage, limit=f"{RATE_LIMIT}/second")
    return app


# -- the reference: one EVALSHA per call + batched XADD --------------------------------------------------


def _admit_keys(authorization: str) -> list[str]:
    return [f"{RATE_PREFIX}{authorization}:{int(time.time())}", ACCOUNT_PREFIX + authorization]


class PerCallAdmission:
    """One EVALSHA per call, awaited by the call (redis-py's registered script)."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.script = client.register_script(ADMIT_SCRIPT)

    async def start(self) -> None:
        pass

    async def admit(self, authorization: str) -> int:
        return int(await self.script(_admit_keys(authorization), ADMIT_ARGS))


class PipelinedAdmission:
    """The EVALSHAs of the calls waiting while a round trip is in flight go together in the next one."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.client = client
        self.sha = ""
        self.waiting: list[tuple[list[str], asyncio.Future[int]]] = []
        self.in_flight = 0
        # The loop keeps only weak references to tasks.
        self.senders: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.sha = await self.client.script_load(ADMIT_SCRIPT)

    async def admit(self, authorization: str) -> int:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.waiting.append((_admit_keys(authorization), future))
        if self.in_flight < IN_FLIGHT:
            self.in_flight += 1
            sender = asyncio.get_running_loop().create_task(self._send())
            self.senders.add(sender)
            sender.add_done_callback(self.senders.discard)
        return await future

    async def _send(self) -> None:
        """Send what is waiting, one round trip at a time, until nothing is."""
        try:
            while self.waiting:
                batch, self.waiting = self.waiting, []
                try:
                    replies: list[Any] = await self._run(batch)
                except Exception as error:
                    replies = [error] * len(batch)
                for (_, future), reply in zip(batch, replies, strict=True):
                    if future.done():  # its call was cancelled
                        continue
                    if isinstance(reply, Exception):
                        future.set_exception(reply)
                    else:
                        future.set_result(int(reply))
        finally:
            # In the same step as the last check of ``waiting``: a call queued after it starts a sender.
            self.in_flight -= 1

    async def _run(self, batch: list[tuple[list[str], asyncio.Future[int]]]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for keys, _ in batch:
            pipe.evalsha(self.sha, len(keys), *keys, *ADMIT_ARGS)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        if any(isinstance(reply, NoScriptError) for reply in replies):  # Redis restarted or flushed
            await self.start()
            return await self._run(batch)
        return replies


class UsageStream:
    """Usage events kept in a list, written to a Redis stream by a background task: one XADD per batch."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.client = client
        self.events: list[tuple[str, str, int, float]] = []
        self.full = asyncio.Event()

    def append(self, event: tuple[str, str, int, float]) -> None:
        self.events.append(event)
        if len(self.events) >= FLUSH_EVENTS:
            self.full.set()

    async def flush(self) -> None:
        while self.events:
            batch, self.events = self.events[:FLUSH_EVENTS], self.events[FLUSH_EVENTS:]
            await self.client.xadd(USAGE_STREAM, {"n": len(batch), "events": msgpack.packb(batch)})

    async def _flush_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.full.wait(), FLUSH_SECONDS)
            self.full.clear()
            await self.flush()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Flush in the background meanwhile, and what is left at the end."""
        task = asyncio.get_running_loop().create_task(self._flush_forever())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self.flush()


class ReferenceMiddleware:
    """Admit each call by one script in Redis (429 / 402 if refused), serve it, record its usage event."""

    def __init__(
        self, app: ASGIApp, admission: PerCallAdmission | PipelinedAdmission, usage: UsageStream
    ) -> None:
        self.app = app
        self.admission = admission
        self.usage = usage

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = _authorization(scope)
        if key is None:
            await _refuse(send, 401)
            return
        left = await self.admission.admit(key)
        if left < 0:
            await _refuse(send, 429 if left == RATE_LIMITED else 402)
            return
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, send_status)
        self.usage.append((key, scope["path"], status, time.time()))


def _reference(pipelined: bool) -> Starlette:
    client = redis.asyncio.Redis.from_url(_redis_url())
    admission = PipelinedAdmission(client) if pipelined else PerCallAdmission(client)
    usage = UsageStream(client)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await admission.start()
        async with usage.running():
            yield
        await client.aclose()

    app = Starlette(routes=[Route("/v1/hello", hello)], lifespan=lifespan)
    app.add_middleware(ReferenceMiddleware, admission=admission, usage=usage)
    return app


def starlette_reference() -> Starlette:
    return _reference(pipelined=False)


def starlette_reference_pipelined() -> Starlette:
    return _reference(pipelined=True)


def open_account(redis_url: str, authorization: str) -> None:
    """Give the key presented as ``authorization`` a reference account of ``CREDITS`` credits."""
    with redis.Redis.from_url(redis_url) as client:
        client.hset(ACCOUNT_PREFIX + authorization, "credits", CREDITS)


def spent(redis_url: str, authorization: str) -> int:
    """Credits the reference took from the key presented as ``authorization``: one per admitted call."""
    with redis.Redis.from_url(redis_url) as client:
        return CREDITS - int(client.hget(ACCOUNT_PREFIX + authorization, "credits") or 0)


def take_streamed(redis_url: str) -> int:
    """Usage events in the reference's stream (which is then deleted)."""
    with redis.Redis.from_url(redis_url) as client:
        entries = client.xrange(USAGE_STREAM)
        client.delete(USAGE_STREAM)
    return sum(int(fields[b"n"]) for _, fields in entries)


def scripts_run(redis_url: str) -> int:
    """Scripts Redis has run so far (EVAL and EVALSHA calls, pipelined or not)."""
    with redis.Redis.from_url(redis_url) as client:
        stats = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("eval", "evalsha"))


# -- FastAPI + prometheus-fastapi-instrumentator -------------------------------------------------------


def fastapi_instrumentator() -> FastAPI:
    from prometheus_fastapi_instrumentator import Instrumentator

    app = fastapi_bare()
    Instrumentator().instrument(app)
    return app
