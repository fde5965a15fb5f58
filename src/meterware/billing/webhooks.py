"""Signed webhooks: the ``Meterware-Signature`` scheme (Stripe's) and a background sender with retries.

Each POST carries::

    Meterware-Signature: t=1767225600,v1=<hex HMAC-SHA256 of "1767225600.<body>" with the secret>
    Meterware-Event-Id: alrt_...        (the same for every attempt: receivers dedupe on it)

Verify it on the receiving side with :func:`verify_signature`. The alerts
(:mod:`meterware.billing.alerts`) are what is sent today.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import logging
import queue
import random
import re
import threading
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Final, Literal, Protocol
from urllib.parse import unquote, urlsplit, urlunsplit

from meterware.__about__ import __version__
from meterware._http import no_redirects_opener, retry_after_seconds
from meterware._redact import redact_text, redact_url

if TYPE_CHECKING:
    from meterware.rollup.metrics import RollupMetrics

# The alerts' logger: deliveries are part of what an alert does.
logger = logging.getLogger("meterware.alerts")

_Outcome = Literal["delivered", "refused", "retry"]
SIGNATURE_HEADER: Final = "Meterware-Signature"
EVENT_ID_HEADER: Final = "Meterware-Event-Id"
#: Alerts waiting for delivery at most; past it they stay on the stream only (and are counted).
QUEUE_SIZE: Final = 1000
#: Longest wait between two delivery attempts, in seconds (a longer Retry-After is cut to it).
MAX_RETRY_DELAY: Final = 60.0
_TIMESTAMP: Final = re.compile(r"[0-9]{1,12}")
_HEX_DIGEST: Final = re.compile(r"[0-9a-f]{64}")


class Payload(Protocol):
    """What a webhook carries: an id receivers dedupe on, and a JSON body."""

    @property
    def id(self) -> str: ...

    def body(self) -> bytes: ...


# -- signatures ---------------------------------------------------------------------------------------


def sign(body: bytes, secret: str, timestamp: int) -> str:
    """The ``Meterware-Signature`` header of ``body`` sent at ``timestamp`` (epoch seconds)."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify_signature(
    body: bytes | str,
    header: str | bytes | None,
    secret: str,
    tolerance: float = 300,
    *,
    now: float | None = None,
) -> bool:
    """Whether ``header`` (``Meterware-Signature``) signs ``body`` (the raw request body) with ``secret``.

    The timestamp must be within ``tolerance`` seconds of ``now``, so a captured request cannot be
    replayed later. Compare the raw bytes received, before any JSON parsing. Any ``v1`` entry may match
    (several appear while a secret is being rolled). Anything malformed (no or several ``t``, a ``t``
    that is not ASCII digits, a ``v1`` that is not 64 hex digits, a header that is not ASCII, a body
    that is neither bytes nor text, an empty secret) is False, never an exception.
    """
    if not isinstance(body, bytes | str) or not isinstance(header, bytes | str) or not secret:
        return False
    try:
        raw = body.encode() if isinstance(body, str) else body
        text = header.decode("ascii") if isinstance(header, bytes) else header
    except UnicodeError:  # a lone surrogate in the text; a bytes header that is not ASCII
        return False
    if not text.isascii():
        return False
    timestamps: list[str] = []
    candidates: list[str] = []
    for item in text.split(","):
        name, _, value = item.strip().partition("=")
        if name == "t":
            timestamps.append(value)
        elif name == "v1" and _HEX_DIGEST.fullmatch(value):
            candidates.append(value)
    # One t, of at most 12 digits (year 33658): the float arithmetic below cannot overflow.
    if len(timestamps) != 1 or not _TIMESTAMP.fullmatch(timestamps[0]) or not candidates:
        return False
    timestamp = int(timestamps[0])
    if not abs((time.time() if now is None else now) - timestamp) <= tolerance:  # NaN: not within
        return False
    expected = sign(raw, secret, timestamp).rpartition("v1=")[2]
    return any(hmac.compare_digest(expected, candidate) for candidate in candidates)


# -- delivery -----------------------------------------------------------------------------------------


class WebhookSender:
    """POST alerts to a URL from a background thread, signed, with retries; never blocks its caller.

    Connection errors, timeouts, 408, 429 and 5xx are retried up to ``attempts`` times in all, after
    ``base_delay * 2**n`` seconds (n = 0, 1, ...; at most :data:`MAX_RETRY_DELAY`) with jitter (half to
    the whole of it), or after the ``Retry-After`` the endpoint asked for. Other answers end the
    delivery. The queue holds :data:`QUEUE_SIZE` alerts; past it, and after the last attempt, an alert
    stays on the alerts stream only and ``failed`` counts it. So does an alert whose delivery raised
    anything else: the thread logs it and goes on with the next one.

    Redirects are never followed. Credentials in the URL (``https://user:pass@host/...``) are sent as
    Basic auth to that host; logs show the URL without them and without its query values.
    """

    def __init__(
        self,
        url: str,
        secret: str,
        *,
        attempts: int = 6,
        timeout: float = 5.0,
        base_delay: float = 0.5,
        queue_size: int = QUEUE_SIZE,
        metrics: RollupMetrics | None = None,
    ) -> None:
        self.url = url
        #: The URL as logs show it (:func:`meterware._http.redact_url`).
        self.shown_url = redact_url(url)
        self._endpoint, self._authorization = _split_credentials(url)
        self._secret = secret
        self.attempts = attempts
        self.timeout = timeout
        self.base_delay = base_delay
        self.metrics = metrics
        self.delivered = 0
        self.failed = 0
        self._queue: queue.Queue[Payload | None] = queue.Queue(queue_size)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._give_up = threading.Event()
        self._opener = no_redirects_opener()

    def submit(self, alert: Payload) -> bool:
        """Queue ``alert`` for delivery; False if the queue is full (it stays on the stream)."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._give_up.clear()
                self._thread = threading.Thread(target=self._run, name="meterware-webhooks", daemon=True)
                self._thread.start()
        try:
            self._queue.put_nowait(alert)
        except queue.Full:
            logger.warning("webhook queue full: alert %s stays on the alerts stream only", alert.id)
            self._count_failure()
            return False
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued within ``timeout`` seconds, then stop (what is left is counted failed)."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is None:
            return
        self._queue.put(None)
        thread.join(timeout)
        if thread.is_alive():
            self._give_up.set()
            thread.join(self.timeout + 1)

    def _run(self) -> None:
        while True:
            alert = self._queue.get()
            if alert is None:
                return
            if self._give_up.is_set():
                self._count_failure()
                continue
            try:
                self.deliver(alert)
            except Exception as error:  # one alert's bad luck must not end the deliveries of all others
                logger.warning(
                    "webhook for alert %s to %s failed: %s: %s",
                    alert.id,
                    self.shown_url,
                    type(error).__name__,
                    redact_text(str(error), self.url),
                )
                self._count_failure()

    def deliver(self, alert: Payload) -> bool:
        """Deliver one alert now, retrying as described; return whether the endpoint took it."""
        body = alert.body()
        for attempt in range(self.attempts):
            outcome, wait = self._attempt(alert.id, body)
            if outcome == "delivered":
                self.delivered += 1
                if self.metrics is not None:
                    self.metrics.webhooks_delivered.inc()
                return True
            if outcome == "refused" or attempt + 1 == self.attempts:
                break
            delay = min(MAX_RETRY_DELAY, self.base_delay * 2**attempt) * random.uniform(0.5, 1.0)
            if wait is not None:
                delay = min(MAX_RETRY_DELAY, wait)
            if self._give_up.wait(delay):
                break
        logger.warning("webhook for alert %s not delivered to %s", alert.id, self.shown_url)
        self._count_failure()
        return False

    def _attempt(self, event_id: str, body: bytes) -> tuple[_Outcome, float | None]:
        """One POST; for a retry, the seconds the endpoint asked to wait (``Retry-After``), if any."""
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"meterware/{__version__}",
            # Signed at each attempt: a retry an hour later still passes the receiver's tolerance.
            SIGNATURE_HEADER: sign(body, self._secret, int(time.time())),
            EVENT_ID_HEADER: event_id,
        }
        if self._authorization:
            headers["Authorization"] = self._authorization
        request = urllib.request.Request(self._endpoint, data=body, method="POST", headers=headers)
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                response.read()
            return "delivered", None
        except urllib.error.HTTPError as error:
            error.close()
            if error.code in (408, 429) or error.code >= 500:
                logger.info("webhook for %s: HTTP %d, retrying", event_id, error.code)
                return "retry", retry_after_seconds(error.headers.get("Retry-After"))
            logger.warning("webhook for %s refused with HTTP %d", event_id, error.code)
            return "refused", None
        except (OSError, http.client.HTTPException) as error:  # URLError, timeouts, resets
            logger.info("webhook for %s failed (%s), retrying", event_id, redact_text(str(error), self.url))
            return "retry", None

    def _count_failure(self) -> None:
        self.failed += 1
        if self.metrics is not None:
            self.metrics.webhooks_failed.inc()


def _split_credentials(url: str) -> tuple[str, str | None]:
    """``url`` without its userinfo, and the Basic ``Authorization`` the userinfo stands for (if any)."""
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at:
        return url, None
    user, _, password = userinfo.partition(":")
    token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode()
    return urlunsplit(parts._replace(netloc=host)), f"Basic {token}"
