"""The customer's own account, behind their own key: usage, quotas, credits, rate limits and invoice so far.

Mount it with one line, with the configuration the middleware reads::

    app.mount("/v1/account", meterware.billing.selfservice.asgi_app())                 # Starlette / FastAPI
    app.wsgi_app = DispatcherMiddleware(                                       # Flask, any WSGI app
        app.wsgi_app, {"/v1/account": meterware.billing.selfservice.wsgi_app()}
    )

and name the mount path in the configuration, ``routes.account = "/v1/account"``: the middleware never
meters it (with or without a trailing slash, whatever ``routes.exclude`` says), so a customer out of
credits or over a hard quota reads their account, for free. An endpoint reached through a metered call
answers 500 (not charged) with the line to add, rather than bill the read.

A ``GET`` with the caller's key (the headers or query parameter of ``policy``, as the middleware reads
it) returns JSON; a missing, malformed, unknown, revoked or expired key gets the middleware's 401 problem
document. Usage comes from the rollup (the worker's lag behind), the balance and the key from the backend.

Unknown keys cost a bounded number of backend lookups: each is refused without one for a second once
looked up (as the middleware does), and lookups of keys this process has not seen resolve take a token
from one bucket per process (:data:`UNKNOWN_KEY_LOOKUPS_PER_SECOND`, :data:`UNKNOWN_KEY_LOOKUP_BURST`)
that only unknown keys spend; with the bucket empty such a key gets 429 with ``Retry-After``. The bucket
is global, not per client address: behind a proxy every client has the proxy's address.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from werkzeug.wrappers import Request, Response

from meterware.billing._apps import LazyAccounts, serve_lifespan
from meterware.billing.accounts import Accounts
from meterware.config import MICROS_PER_CREDIT, Config, resolve_config
from meterware.errors import NotFoundError, StorageError
from meterware.keys import hash_key, is_well_formed, key_from_headers
from meterware.metering.admission import Decision, Reason, rate_limit_name
from meterware.metering.cache import LRUCache
from meterware.metering.keycache import (
    KEY_CACHE_MAX_ENTRIES,
    NEGATIVE_CACHE_SECONDS,
    UNKNOWN_KEY_CACHE_MAX_ENTRIES,
)
from meterware.metering.responses import problem
from meterware.metering.serving import bytes_headers, str_headers
from meterware.usage import current

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment
    from starlette.types import Receive, Scope, Send

__all__ = ["AccountView", "SelfServiceApp", "SelfServiceWSGIApp", "asgi_app", "wsgi_app"]

logger = logging.getLogger("meterware.selfservice")

Headers = list[tuple[bytes, bytes]]
_JSON: Final = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
#: Lookups of keys that turn out unknown, per second and process (a typo'd key is one; a flood is capped).
UNKNOWN_KEY_LOOKUPS_PER_SECOND: Final = 10.0
UNKNOWN_KEY_LOOKUP_BURST: Final = 20
_OUT_OF_LOOKUPS: Final = Decision(allowed=False, retry_after=1)


def _credits(micros: int) -> str:
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), MICROS_PER_CREDIT)
    return f"{sign}{whole}.{fraction:06d}"


def _iso(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _refusal(reason: Reason, decision: Decision | None = None) -> tuple[int, Headers, bytes]:
    refused = problem(reason, decision)
    return refused.status, [*refused.response_headers(), (b"cache-control", b"no-store")], refused.body()


def _json(
    status: int, data: Mapping[str, Any], extra: Iterable[tuple[bytes, bytes]] = ()
) -> tuple[int, Headers, bytes]:
    body = json.dumps(data, separators=(",", ":"), sort_keys=True).encode()
    return status, [*_JSON, (b"content-length", str(len(body)).encode()), *extra], body


class _TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; safe to share between threads."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._at = time.monotonic()
        self._lock = threading.Lock()

    def take(self) -> bool:
        """Take a token if there is one."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens < 1:
                return False
            self._tokens -= 1
            return True

    def give_back(self) -> None:
        """Return a token taken for nothing."""
        with self._lock:
            self._tokens = min(self.burst, self._tokens + 1)


class AccountView:
    """The endpoint without a framework: a request's headers and query in, status, headers and body out.

    :param config: as the middleware takes it: a :class:`~meterware.config.Config`, a TOML path, a dict,
        or None (``meterware.toml`` / ``$METERWARE_CONFIG``); keyword overrides like ``storage="..."``.
    """

    def __init__(
        self, config: Config | str | os.PathLike[str] | Mapping[str, Any] | None = None, **overrides: Any
    ) -> None:
        self.config = resolve_config(config, overrides)
        self._accounts = LazyAccounts(self.config)
        #: Key hashes that resolved to a key: their lookups spend no token (their answer is not cached).
        self._known: LRUCache[str, bool] = LRUCache(KEY_CACHE_MAX_ENTRIES)
        #: Unknown key hashes: until when they are refused without a lookup.
        self._unknown: LRUCache[str, float] = LRUCache(UNKNOWN_KEY_CACHE_MAX_ENTRIES)
        self._lookups = _TokenBucket(UNKNOWN_KEY_LOOKUPS_PER_SECOND, UNKNOWN_KEY_LOOKUP_BURST)

    @property
    def accounts(self) -> Accounts:
        """The backend, opened on first use."""
        return self._accounts.get()

    def metered(self, mount: str) -> tuple[int, Headers, bytes]:
        """The answer when the middleware metered this request: a 500 (never charged) naming the fix."""
        line = f'routes.account = "{mount or "/"}"'
        detail = f"This endpoint is metered: set {line} in the configuration the middleware reads."
        logger.error("meterware: the account endpoint at %s is metered; set %s", mount or "/", line)
        return _json(500, {"title": "Account endpoint metered", "status": 500, "detail": detail})

    def respond(
        self, method: str, headers: Iterable[tuple[bytes, bytes]], query_string: bytes
    ) -> tuple[int, Headers, bytes]:
        """Answer one request."""
        if method not in ("GET", "HEAD"):
            data = {"title": "Method not allowed", "status": 405, "detail": "Use GET."}
            return _json(405, data, [(b"allow", b"GET, HEAD")])
        policy = self.config.policy
        presented = key_from_headers(headers, query_string, policy.key_headers, policy.key_query)
        if presented is None:
            return _refusal("missing_key")
        if not is_well_formed(presented):
            return _refusal("malformed_key")  # before any hash or lookup: it costs the backend nothing
        key_hash = hash_key(presented)
        unknown_until = self._unknown.get(key_hash)
        if unknown_until is not None and time.monotonic() <= unknown_until:
            return _refusal("unknown_key")
        spent = self._known.get(key_hash) is None
        if spent and not self._lookups.take():
            return _refusal("rate_limited", _OUT_OF_LOOKUPS)
        try:
            return self._account(key_hash, spent)
        except StorageError:
            return _refusal("backend_unavailable")

    def _account(self, key_hash: str, spent: bool) -> tuple[int, Headers, bytes]:
        """The account of the key with ``key_hash`` (``spent``: its lookup took a token)."""
        storage = self.accounts.storage
        info = storage.resolve_key(key_hash)
        record = None if info is None else storage.get_key(info.key_id)
        if info is None or record is None:
            return self._unknown_key(key_hash)
        self._known.put(key_hash, True)
        if spent:
            self._lookups.give_back()
        if record.status != "active":
            return _refusal("revoked_key")
        if record.expires_ms and time.time() * 1000 >= record.expires_ms:
            return _refusal("expired_key")
        try:
            data = self.account(info.customer.id, live=info.live)
        except NotFoundError:  # a key left behind by a customer that is gone
            return self._unknown_key(key_hash)
        data["key"] = {"id": record.key_id, "prefix": record.prefix, "live": record.live}
        return _json(200, data)

    def _unknown_key(self, key_hash: str) -> tuple[int, Headers, bytes]:
        """Refuse an unknown key, and keep refusing it without a lookup for a while."""
        self._known.pop(key_hash)
        self._unknown.put(key_hash, time.monotonic() + NEGATIVE_CACHE_SECONDS)
        return _refusal("unknown_key")

    def account(self, customer_id: str, *, live: bool = True) -> dict[str, Any]:
        """What the endpoint returns for ``customer_id`` (``live``: its live or its test usage)."""
        accounts = self.accounts
        customer = accounts.customer(customer_id)
        plan = self.config.plan_for(customer)
        report = accounts.usage(customer_id, live=live)
        usage: dict[str, Any] = {}
        for meter, used in report.meters.items():
            terms = plan.meters.get(meter)
            entry: dict[str, Any] = {"used": used}
            if terms is not None:
                entry["included"] = terms.included
                entry["quota"] = terms.quota
                if terms.quota is not None:
                    entry["quota_mode"] = "hard" if terms.hard else "soft"
                    entry["remaining"] = max(0, terms.quota - used)
            usage[meter] = entry
        balance = accounts.balance(customer_id)
        return {
            "customer": customer.id,
            "plan": plan.name,
            "status": customer.status,
            "live": live,
            "period": {
                "start": report.period_start,
                "end": report.period_end,
                "start_iso": _iso(report.period_start),
                "end_iso": _iso(report.period_end),
            },
            "usage": usage,
            "calls": report.calls,
            "credits": {
                "prepaid": plan.prepaid,
                "balance": _credits(balance.balance),
                "reserved": _credits(balance.reserved),
                "available": _credits(balance.available),
            },
            "rate_limits": [
                {
                    "name": rate_limit_name(limit.seconds, limit.meter),
                    "limit": limit.amount,
                    "window_seconds": limit.seconds,
                }
                for limit in plan.rate_limits
            ],
            # Test keys are never charged: their invoice would be the live one, so it is not shown.
            # Nor before the customer's first period (an anchor in the future): there is no invoice yet.
            "invoice": accounts.invoice(customer_id).as_dict()
            if live and report.period_end > customer.anchor
            else None,
            "as_of": int(time.time()),
        }

    def close(self) -> None:
        self._accounts.close()


class SelfServiceApp:
    """The endpoint as an ASGI app (backend reads run in a worker thread, off the event loop)."""

    def __init__(self, view: AccountView) -> None:
        self.view = view

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send, self.view.close)
            return
        if scope["type"] != "http":
            return
        method = scope["method"]
        if current() is not None:
            status, headers, body = self.view.metered(scope.get("root_path", ""))
        else:
            status, headers, body = await asyncio.to_thread(
                self.view.respond, method, scope["headers"], scope.get("query_string", b"")
            )
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})


def asgi_app(
    config: Config | str | os.PathLike[str] | Mapping[str, Any] | None = None, **overrides: Any
) -> SelfServiceApp:
    """The endpoint for Starlette / FastAPI / any ASGI router: ``app.mount("/v1/account", asgi_app())``."""
    return SelfServiceApp(AccountView(config, **overrides))


class SelfServiceWSGIApp:
    """The endpoint as a WSGI app (a werkzeug ``Response``: it answers ``HEAD`` without the body)."""

    def __init__(self, view: AccountView) -> None:
        self.view = view

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        request = Request(environ)
        if current() is not None:
            status, headers, body = self.view.metered(request.root_path)
        else:
            status, headers, body = self.view.respond(
                request.method, bytes_headers(request.headers.items()), request.query_string
            )
        return Response(body, status, str_headers(headers))(environ, start_response)


def wsgi_app(
    config: Config | str | os.PathLike[str] | Mapping[str, Any] | None = None, **overrides: Any
) -> SelfServiceWSGIApp:
    """The endpoint for Flask / any WSGI app (mount it with werkzeug's ``DispatcherMiddleware``)."""
    return SelfServiceWSGIApp(AccountView(config, **overrides))
