"""What a process remembers of presented keys: their hashes, their resolutions, and the unknown ones; and
of the customers an app authenticated itself (``customer_getter``), the same way."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Final, NewType

from meterware import keys
from meterware.config import Policy
from meterware.errors import StorageError
from meterware.metering.admission import Decision
from meterware.metering.cache import LRUCache
from meterware.metering.logs import ThrottledWarning
from meterware.metering.records import KeyInfo
from meterware.metering.responses import Problem, problem
from meterware.storage._keyspace import CUSTOMER_ID_RE

#: Unknown keys are remembered for a shorter time than known ones, so a new key works almost at once.
NEGATIVE_CACHE_SECONDS: Final = 1.0
KEY_CACHE_MAX_ENTRIES: Final = 100_000
#: Unknown key hashes remembered at most (apart from known keys: no number of them evicts a known key).
UNKNOWN_KEY_CACHE_MAX_ENTRIES: Final = 10_000


#: A key hash the cache cannot answer for: the backend must resolve it (``resolve_key``). A plain ``str``
#: at run time (the caches' dicts stay the fast all-``str`` kind), told apart by ``isinstance(_, str)``.
NeedsLookup = NewType("NeedsLookup", str)

#: How a customer's entry is named in the caches of keys (key hashes are hex: no name is both).
_CUSTOMER_ENTRY: Final = "customer "


@dataclass(frozen=True, slots=True)
class NeedsCustomer:
    """A customer the cache cannot answer for: the backend must resolve it (``resolve_customer``), and
    the core be told under ``entry``."""

    customer_id: str
    entry: str


class KeyCache:
    """Presented keys to their resolutions, briefly; unknown keys even more briefly, in a cache of their
    own, so no number of them makes the process forget a known key."""

    def __init__(self, policy: Policy, outage: ThrottledWarning) -> None:
        self.policy = policy
        self._outage = outage
        #: Known keys by hash: until when the resolution is fresh, and the key (kept past that for outages).
        self._keys: LRUCache[str, tuple[float, KeyInfo]] = LRUCache(KEY_CACHE_MAX_ENTRIES)
        #: Unknown key hashes: until when they are refused without a lookup.
        self.unknown: LRUCache[str, float] = LRUCache(UNKNOWN_KEY_CACHE_MAX_ENTRIES)
        #: Presented keys already hashed (a key's calls skip the SHA-256 and the shape check).
        self._hashes: LRUCache[str, NeedsLookup] = LRUCache(KEY_CACHE_MAX_ENTRIES)

    def lookup(self, presented: str | None) -> KeyInfo | NeedsLookup | Problem:
        """The presented key's cached resolution, its hash to look up, or a refusal.

        Absent and malformed keys are refused before any lookup (and without hashing a huge value).
        """
        if not presented:
            return problem("missing_key")
        key_hash = self._hashes.get(presented)
        if key_hash is None:
            if not keys.is_well_formed(presented):
                return problem("malformed_key")
            key_hash = NeedsLookup(keys.hash_key(presented))
            self._hashes.put(presented, key_hash)
        now = time.monotonic()
        entry = self._keys.get(key_hash)
        if entry is not None and now <= entry[0]:
            return entry[1]
        unknown_until = self.unknown.get(key_hash)
        if unknown_until is not None and now <= unknown_until:
            return problem("unknown_key")
        return key_hash

    def lookup_customer(self, customer_id: object) -> KeyInfo | NeedsCustomer | Problem:
        """The cached resolution of a customer the app authenticated (a key without a key id), the
        customer to look up, or a refusal (an id no customer can have is never looked up)."""
        if not isinstance(customer_id, str) or CUSTOMER_ID_RE.match(customer_id) is None:
            return problem("unknown_customer")
        entry = _CUSTOMER_ENTRY + customer_id
        now = time.monotonic()
        cached = self._keys.get(entry)
        if cached is not None and now <= cached[0]:
            return cached[1]
        unknown_until = self.unknown.get(entry)
        if unknown_until is not None and now <= unknown_until:
            return problem("unknown_customer")
        return NeedsCustomer(customer_id, entry)

    def resolved(self, key_hash: str, key: KeyInfo | None) -> KeyInfo | Problem:
        """Remember what the backend said about a key hash (or a customer's entry)."""
        now = time.monotonic()
        if key is None:
            self._keys.pop(key_hash)
            self.unknown.put(key_hash, now + min(NEGATIVE_CACHE_SECONDS, self.policy.key_cache_ttl))
            return problem("unknown_customer" if key_hash.startswith(_CUSTOMER_ENTRY) else "unknown_key")
        self.unknown.pop(key_hash)
        self._keys.put(key_hash, (now + self.policy.key_cache_ttl, key))
        return key

    def lookup_failed(self, error: StorageError, key_hash: str) -> KeyInfo | Problem:
        """The backend failed to resolve a key: without it an unknown key cannot be told from a known one.

        Failing open, a key this process resolved before is served as it was last resolved (its admission
        fails open too), so an outage longer than ``key_cache_ttl`` does not turn into refusals.
        """
        entry = self._keys.get(key_hash)
        if self.policy.on_backend_error == "open" and entry is not None:
            self._outage.warn("key lookup failed (%s); serving keys as last seen", error)
            return entry[1]
        self._outage.warn("key lookup failed (%s); refusing keys not seen before", error)
        return problem("backend_unavailable", Decision(allowed=False, retry_after=1))
