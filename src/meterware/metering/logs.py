"""The request path's logger, and warnings that repeat on every call said at most once per interval."""

from __future__ import annotations

import logging
import time
from typing import Final

logger = logging.getLogger("meterware")

#: During an outage every call fails the same way: say so at most once in this many seconds.
OUTAGE_WARNING_SECONDS: Final = 10.0
#: A bad usage header is the app's doing and repeats on every call: warn of each meter's at most this often.
BAD_USAGE_HEADER_WARNING_SECONDS: Final = 60.0


class ThrottledWarning:
    """A warning logged at most once per interval, with the count of the ones held back."""

    def __init__(self, interval: float, what: str = "backend failed: ") -> None:
        self.interval = interval
        self.what = what
        self._next = 0.0
        self._held = 0

    def warn(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self._held += 1
            return
        held, self._held, self._next = self._held, 0, now + self.interval
        suffix = f" ({held} more like it held back)" if held else ""
        logger.warning("meterware: " + self.what + message + suffix, *args)
