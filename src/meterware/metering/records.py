"""The stored records the request path reads: customers and their API keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from meterware.config import RateLimit

CustomerStatus = Literal["active", "suspended"]


@dataclass(frozen=True, slots=True)
class Customer:
    """A paying (or sandboxed) user of the API."""

    id: str
    plan: str
    status: CustomerStatus = "active"
    #: Billing-period anchor, epoch seconds: periods start at this instant and every period after it.
    anchor: int = 0
    #: The customer's own terms over the plan's: the versions of its overrides as stored (JSON), or ""
    #: for none (:mod:`meterware.config._overrides`).
    terms: str = ""
    #: The customer's own spend cap per period in micro-credits, in place of the plan's (None: the plan's).
    spend_cap: int | None = None


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What the request path knows about a presented key once it is resolved (cached briefly)."""

    key_id: str
    customer: Customer
    live: bool
    prefix: str
    #: Whether the key has a count of remaining uses (its calls are admitted one by one, never leased).
    counts_uses: bool = False
    #: What the seller lets the key do, for the app to check (``meterware.current_call().scopes``).
    scopes: tuple[str, ...] = ()
    #: The key's own rate limits (counting its calls, or a meter's units), on top of its plan's.
    rate_limits: tuple[RateLimit, ...] = ()


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A key as listed to its owner (never the plaintext)."""

    key_id: str
    customer: str
    prefix: str
    live: bool
    status: Literal["active", "revoked"]
    created: int
    #: Epoch milliseconds after which the key stops working (0: never), e.g. a rotated key's grace end.
    expires_ms: int = 0
    #: Epoch milliseconds of the newest call made with the key that the rollup has seen (0: none yet).
    last_used_ms: int = 0
    #: What the seller calls the key (at most 100 characters).
    name: str = ""
    #: The seller's own notes on the key, never read by meterware (a few short strings).
    metadata: dict[str, str] = field(default_factory=dict)
    #: Calls the key may still make (each admitted call takes one), or None for no such limit.
    remaining: int | None = None
    #: What the seller lets the key do (read by the app, never by meterware).
    scopes: tuple[str, ...] = ()
    #: The key's own rate limits (counting its calls, or a meter's units), on top of its plan's.
    rate_limits: tuple[RateLimit, ...] = ()
