"""Old import path of :class:`meterware.metering.cache.LRUCache`."""

from meterware.metering.cache import LRUCache

__all__ = ["LRUCache"]
