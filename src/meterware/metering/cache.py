"""A bounded in-process cache: what the request path remembers never grows with what clients send."""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """A mapping of at most ``max_size`` entries: adding one past it forgets the least recently used.

    Values are never None (``get`` answers None for a missing key). Safe to share between threads: each
    step is one operation on an ``OrderedDict`` (atomic under the GIL), and an entry another thread
    removed meanwhile is simply missing.
    """

    __slots__ = ("_entries", "max_size")

    def __init__(self, max_size: int) -> None:
        if max_size < 1:
            raise ValueError(f"LRUCache: max_size must be at least 1, got {max_size}")
        self.max_size = max_size
        self._entries: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        """The value of ``key`` (now the most recently used), or None."""
        # Read on every call, several times: one ``try`` and a subscript, not ``.get()`` (micro:
        # RequestCore.identify, Metering.finish).
        entries = self._entries
        try:
            entries.move_to_end(key)
            return entries[key]
        except KeyError:  # unknown, or removed by another thread meanwhile
            return None

    def put(self, key: K, value: V) -> None:
        """Remember ``value`` for ``key`` as the most recently used, forgetting the least if full."""
        entries = self._entries
        entries[key] = value
        try:
            entries.move_to_end(key)
            while len(entries) > self.max_size:
                entries.popitem(last=False)
        except KeyError:  # another thread removed it, or emptied the cache, meanwhile
            pass

    def pop(self, key: K) -> V | None:
        """Forget ``key``; its value, or None."""
        return self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries
