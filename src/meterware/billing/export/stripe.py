"""Stripe Billing meter events through the official SDK (``pip install 'meterware[stripe]'``).

``POST /v1/billing/meter_events`` (form-encoded), one event per request: ``event_name``, ``payload``
(``stripe_customer_id`` and ``value``, or the keys the meter overrides), ``identifier`` (Stripe dedupes it
for at least 24 hours) and ``timestamp`` (Unix seconds, at most 35 days old, 5 minutes ahead). The
identifier is also sent as the ``Idempotency-Key``. Values are whole numbers of at most 15 digits.
Stripe allows 1,000 calls per second and one concurrent call per customer and meter: the run is
sequential, and backs off on 429 as Stripe advises. The SDK's ``requests`` session would follow a
redirect (and count whatever answers there as Stripe's answer): here it follows none, a 3xx fails the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from meterware._http import retry_after_seconds
from meterware.billing.export import (
    SendResult,
    UsageRecord,
    header,
    missing_sdk,
    one_line,
    status_failure,
)
from meterware.config import ExportTarget

#: Stripe takes meter events of the past 35 calendar days.
MAX_AGE: Final = 35 * 86_400
#: Stripe rejects values of more than 15 significant digits.
MAX_VALUE: Final = 10**15 - 1
DEFAULT_BASE_URL: Final = "https://api.stripe.com"


class StripeExporter:
    """Meter events for Stripe Billing, one per request (see the module doc)."""

    name = "stripe"
    max_batch = 1
    max_age: float | None = MAX_AGE
    #: ``identifier`` is at most 100 characters.
    max_id_length: int | None = 100

    def __init__(self, target: ExportTarget, api_key: str) -> None:
        try:
            import requests
            import stripe
        except ImportError:
            raise missing_sdk("Stripe", "stripe", "stripe") from None

        class NoRedirects(requests.Session):
            def get_redirect_target(self, resp: Any) -> None:
                return None

        self.target = target
        self._stripe: Any = stripe
        self._session = NoRedirects()
        # Retries are ours (429 included, which the SDK does not retry), so the SDK makes none.
        self.client: Any = stripe.StripeClient(
            api_key,
            base_addresses={"api": target.base_url or DEFAULT_BASE_URL},
            max_network_retries=0,
            http_client=stripe.RequestsClient(session=self._session),
        )

    def params(self, record: UsageRecord) -> dict[str, Any]:
        """The meter event's parameters."""
        return {
            "event_name": record.name,
            "identifier": record.event_id,
            "timestamp": record.timestamp,
            "payload": {
                self.target.customer_key: record.external_id,
                **record.dimensions,
                self.target.value_key: str(record.value),
            },
        }

    def send(self, records: Sequence[UsageRecord]) -> SendResult:
        (record,) = records
        if record.value > MAX_VALUE:
            return SendResult(rejected={record.event_id: "Stripe takes values of at most 15 digits"})
        try:
            self.client.v1.billing.meter_events.create(
                self.params(record), {"idempotency_key": record.event_id}
            )
        except self._stripe.StripeError as error:
            status = getattr(error, "http_status", None)
            reason = one_line(getattr(error, "user_message", None) or error)
            wait = retry_after_seconds(header(getattr(error, "headers", None), "retry-after"))
            return status_failure(records, status, reason, wait)
        return SendResult(delivered=[record.event_id])

    def close(self) -> None:
        self._session.close()
