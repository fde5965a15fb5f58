"""Dodo Payments usage events through the official SDK (``pip install 'meterware[dodo]'``).

``POST /events/ingest`` with ``{"events": [{"event_id", "customer_id", "event_name", "timestamp",
"metadata"}]}``, bearer-token auth. An ``event_id`` seen before is ignored (idempotent); a duplicate
inside one request fails the whole request (ours never repeat). Timestamps older than one hour or more
than five minutes ahead are rejected, so run the export at least every half hour. The API reference
allows 1,000 events per request, the usage-based billing guide 100: 100 it is. Metadata values are
scalars; the value goes under ``value_key`` (the Dodo meter's aggregation key). The SDK's httpx client
follows redirects by default (and counts whatever answers there as Dodo's answer): here it follows
none, a 3xx fails the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
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

#: Dodo rejects events older than one hour.
MAX_AGE: Final = 3600
MAX_BATCH: Final = 100
DEFAULT_BASE_URL: Final = "https://live.dodopayments.com"


class DodoExporter:
    """Usage events for Dodo Payments, up to 100 per request (see the module doc)."""

    name = "dodo"
    max_batch = MAX_BATCH
    max_age: float | None = MAX_AGE
    max_id_length: int | None = None

    def __init__(self, target: ExportTarget, api_key: str) -> None:
        try:
            import dodopayments
        except ImportError:
            raise missing_sdk("Dodo Payments", "dodopayments", "dodo") from None
        self.target = target
        self._sdk: Any = dodopayments
        # Retries are ours (bounded, Retry-After aware), so the SDK makes none.
        self.client: Any = dodopayments.DodoPayments(
            bearer_token=api_key,
            base_url=target.base_url or DEFAULT_BASE_URL,
            max_retries=0,
            http_client=dodopayments.DefaultHttpxClient(follow_redirects=False),
        )

    def event(self, record: UsageRecord) -> dict[str, Any]:
        """One usage event as ``usage_events.ingest`` takes it."""
        return {
            "event_id": record.event_id,
            "customer_id": record.external_id,
            "event_name": record.name,
            "timestamp": datetime.fromtimestamp(record.timestamp, UTC),
            "metadata": {**record.dimensions, self.target.value_key: record.value},
        }

    def send(self, records: Sequence[UsageRecord]) -> SendResult:
        try:
            self.client.usage_events.ingest(events=[self.event(record) for record in records])
        except self._sdk.APIStatusError as error:
            wait = retry_after_seconds(header(error.response.headers, "retry-after"))
            return status_failure(records, error.status_code, one_line(error.message), wait)
        except self._sdk.APIConnectionError as error:
            return status_failure(records, None, one_line(error), None)
        return SendResult(delivered=[record.event_id for record in records])

    def close(self) -> None:
        self.client.close()
