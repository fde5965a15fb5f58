"""What the three adapters (ASGI, WSGI, Django) share around the app they meter.

The backend clients and the flusher, made on first use; the key headers read from a WSGI environ; the usage
headers read from a response (and stripped); a response body's chunks counted and made with the call's usage
in scope; the route of an app without a router. Each adapter only translates its framework's request and
response to these.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Any

from meterware.metering.calls import Call, header_map
from meterware.metering.facade import Metering
from meterware.metering.flushers import AsyncFlusher, ThreadFlusher, exit_on_sigterm
from meterware.usage import reporting_to

if TYPE_CHECKING:
    from meterware.storage.base import AsyncStorage, Storage

Headers = list[tuple[bytes, bytes]]


class _Clients(ABC):
    """What both twins do: stop on SIGTERM, and see that a flusher will send a finished call's event."""

    def __init__(self, metering: Metering) -> None:
        self.metering = metering
        exit_on_sigterm()  # here: the first call may come on a server's worker thread

    @property
    @abstractmethod
    def flusher(self) -> ThreadFlusher | AsyncFlusher:
        """The flusher, made on first use."""

    def started(self, call: Call) -> None:
        """An admitted call starts: while it runs, a flusher keeps its reservation alive (it may run past
        ``policy.reservation_timeout``, after which the worker would take its process for dead), and the
        exit drain waits for it."""
        metering = self.metering
        metering.batcher.in_flight.add(call)
        if not metering.exit_hooked:
            metering.hook_exit()
        if call.decision.reservation_id and call.lease is None:
            self.flusher.ensure_running()

    def finished(self, call: Call, route: str | None, *, failed: bool = False, aborted: bool = False) -> None:
        """Record a finished call and see that a flusher will send its event."""
        self.metering.finish(call, route, failed=failed, aborted=aborted)
        self.flusher.ensure_running()


class Clients(_Clients):
    """A synchronous middleware's backend client and flusher thread, made on first use in the serving
    process (never at import or construction: safe with pre-fork servers).

    Made in the middleware's constructor, which may run in the main thread: SIGTERM then leaves through
    the interpreter's exit, whose hooks drain the buffer.
    """

    @cached_property
    def storage(self) -> Storage:
        """The request path's client (short timeouts)."""
        return self.metering.backend()

    @cached_property
    def flusher(self) -> ThreadFlusher:
        return ThreadFlusher(self.metering.batcher, self.metering.backend(flushing=True))

    def drain(self) -> None:
        """Flush every buffered event now (also done at interpreter exit)."""
        self.flusher.drain()


class AsyncClients(_Clients):
    """The asyncio twin of :class:`Clients`: the clients belong to the loop that made them."""

    @cached_property
    def storage(self) -> AsyncStorage:
        """The request path's client (short timeouts; no I/O until its first call)."""
        return self.metering.async_backend()

    @cached_property
    def flusher(self) -> AsyncFlusher:
        return AsyncFlusher(self.metering.batcher, self.metering.async_backend(flushing=True))

    async def drain(self) -> None:
        """Flush every buffered event now."""
        await self.flusher.drain()

    async def aclose(self) -> None:
        """Flush every buffered event and close the clients made so far (at the loop's end, on that loop)."""
        made = vars(self)  # what cached_property has made
        if "flusher" in made:
            await self.flusher.drain()
            await self.flusher.storage.aclose()
        if "storage" in made:
            await self.storage.aclose()


class EnvironCredentials:
    """Where a WSGI environ (or Django's ``request.META``) holds the headers and query string that may
    carry the key: the adapters hand them to :meth:`Metering.start` as an ASGI server would."""

    def __init__(self, key_headers: tuple[str, ...]) -> None:
        self._names = tuple(
            (name.encode("latin-1"), "HTTP_" + name.upper().replace("-", "_")) for name in key_headers
        )

    def read(self, environ: Mapping[str, Any]) -> tuple[Headers, bytes]:
        """The key headers present (``(lower-case name, value)`` bytes) and the query string."""
        headers = [
            (name, value.encode("latin-1"))
            for name, variable in self._names
            if (value := environ.get(variable))
        ]
        return headers, environ.get("QUERY_STRING", "").encode("latin-1")


def str_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """``headers`` as WSGI and Django write them (latin-1 text)."""
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers]


def bytes_headers(headers: Iterable[tuple[str, str]]) -> Headers:
    """WSGI or Django ``headers`` as ASGI writes them (latin-1 bytes)."""
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]


def take_usage_headers(metering: Metering, call: Call, headers: Headers) -> Headers:
    """Note the usage headers among a response's ``headers`` on ``call`` (``header:`` meter sources); the
    headers to send: ``headers`` itself, or a copy without them when the policy strips them."""
    usage_headers = metering.usage_headers
    call.header_units = units = header_map(headers, usage_headers)
    if units and metering.policy.strip_usage_headers:
        return [(name, value) for name, value in headers if name.lower() not in usage_headers]
    return headers


class MeteredBody:
    """A response body as it goes out: each chunk counted on the call and made with the call's usage in
    scope (a streamed body runs the handler's code lazily), and how the iteration ended.

    ``scope``: the call's :class:`~meterware.usage.reporting_to`, when the adapter has one (one per call).
    """

    __slots__ = ("call", "completed", "failed", "scope")

    def __init__(self, call: Call, scope: reporting_to | None = None) -> None:
        self.call = call
        self.scope = scope or reporting_to(call.usage)
        self.completed = False
        self.failed = False

    @property
    def aborted(self) -> bool:
        """Neither iterated to the end nor failed: the server stopped early, the client went away."""
        return not self.completed and not self.failed

    def chunks(self, body: Iterable[bytes]) -> Iterator[bytes]:
        """The chunks of ``body``."""
        call, scope = self.call, self.scope
        iterator = iter(body)
        while True:
            try:
                with scope:
                    chunk = next(iterator)
            except StopIteration:
                self.completed = True
                return
            except BaseException:
                self.failed = True
                raise
            call.response_bytes += len(chunk)
            yield chunk
            # The server sent it and came back for more: a client that leaves now was served.
            call.responded = True

    async def achunks(self, body: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        """The asyncio twin of :meth:`chunks`."""
        call, scope = self.call, self.scope
        iterator = aiter(body)
        while True:
            try:
                with scope:
                    chunk = await anext(iterator)
            except StopAsyncIteration:
                self.completed = True
                return
            except Exception:  # not a cancellation: the server cancels a stream whose client went away
                self.failed = True
                raise
            call.response_bytes += len(chunk)
            yield chunk
            call.responded = True
