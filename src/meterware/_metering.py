"""Old import path of the request path's facade and types (now in :mod:`meterware.metering`)."""

from meterware.metering.calls import UNMATCHED_ROUTE, Call, header_map
from meterware.metering.core import KeyGetter
from meterware.metering.facade import Metering
from meterware.metering.keycache import (
    KEY_CACHE_MAX_ENTRIES,
    NEGATIVE_CACHE_SECONDS,
    UNKNOWN_KEY_CACHE_MAX_ENTRIES,
)

__all__ = [
    "KEY_CACHE_MAX_ENTRIES",
    "NEGATIVE_CACHE_SECONDS",
    "UNKNOWN_KEY_CACHE_MAX_ENTRIES",
    "UNMATCHED_ROUTE",
    "Call",
    "KeyGetter",
    "Metering",
    "header_map",
]
