"""Lago usage events through the official SDK (``pip install 'meterware[lago]'``).

``POST /api/v1/events/batch`` with ``{"events": [{"transaction_id", "external_subscription_id", "code",
"timestamp", "properties"}]}``, bearer-token auth, at most 100 events per request. Lago dedupes by
``transaction_id`` (per subscription): a duplicate is refused with 422 ``value_already_exist``, which
here means "already delivered". A batch with any invalid event is refused whole, its ``error_details``
keyed by the event's index: the events it does not name are sent again without the others. The
customer mapping is the Lago subscription's external id (the SDK's events carry no customer id). Lago
documents no age limit (late events still count towards open or grace-period invoices).

The request goes through the SDK's own request functions rather than ``client.events.batch_create``:
in lago-python-client 1.55 that method does not pass the client's ``RateLimitRetryConfig`` on, so it
would retry 429s by itself (three times, sleeping) whatever the client was told; here retries are ours.
Redirects are not followed (``follow_redirects=False``, httpx's default, said out loud); a 3xx, which
the SDK would report as an unreadable 500, fails the run as what it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from meterware._http import retry_after_seconds
from meterware.billing.export import (
    SendResult,
    UsageRecord,
    header,
    mapping_of,
    missing_sdk,
    one_line,
    status_failure,
)
from meterware.config import ExportTarget

MAX_BATCH: Final = 100
DEFAULT_BASE_URL: Final = "https://api.getlago.com/"
ALREADY_EXISTS: Final = "value_already_exist"


class LagoExporter:
    """Batches of usage events for Lago (see the module doc)."""

    name = "lago"
    max_batch = MAX_BATCH
    max_age: float | None = None
    max_id_length: int | None = None

    def __init__(self, target: ExportTarget, api_key: str) -> None:
        try:
            import httpx
            from lago_python_client.client import Client
            from lago_python_client.exceptions import LagoApiError
            from lago_python_client.models.event import BatchEvent, Event
            from lago_python_client.services.json import to_json
            from lago_python_client.services.rate_limit import RateLimitRetryConfig
            from lago_python_client.services.request import make_headers, make_url, send_post_request
            from lago_python_client.services.response import verify_response
        except ImportError:
            raise missing_sdk("Lago", "lago-python-client", "lago") from None
        self.target = target
        self._errors: tuple[type[Exception], type[Exception]] = (LagoApiError, httpx.RequestError)
        self._event: Any = Event
        self._batch: Any = BatchEvent
        # Retries are ours (bounded, Retry-After aware), so the SDK makes none.
        self.client: Any = Client(
            api_key=api_key,
            api_url=target.base_url or DEFAULT_BASE_URL,
            max_retries=0,
            retry_on_rate_limit=False,
        )
        self._url = make_url(origin=self.client.base_api_url, path_parts=("events", "batch"))
        self._headers = make_headers(api_key=api_key)
        self._no_retries = RateLimitRetryConfig(max_retries=0, retry_on_rate_limit=False)
        self._post: Any = send_post_request
        self._verify: Any = verify_response
        self._to_json: Any = to_json

    def event(self, record: UsageRecord) -> Any:
        """One event as the SDK models it."""
        return self._event(
            transaction_id=record.event_id,
            external_subscription_id=record.external_id,
            code=record.name,
            timestamp=record.timestamp,
            precise_total_amount_cents=None,
            properties={**record.dimensions, self.target.value_key: record.value},
        )

    def send(self, records: Sequence[UsageRecord]) -> SendResult:
        try:
            batch = self._batch(events=[self.event(record) for record in records])
            response = self._post(
                self._url,
                content=self._to_json(batch.dict()),
                headers=self._headers,
                rate_limit_retry_config=self._no_retries,
                follow_redirects=False,
            )
            if 300 <= response.status_code < 400:
                return status_failure(records, response.status_code, one_line(response.reason_phrase), None)
            self._verify(response)
        except self._errors as error:
            status: int | None = getattr(error, "status_code", None)
            body = mapping_of(getattr(error, "response", None))
            if status == 422 and isinstance(body.get("error_details"), Mapping):
                return self._refused(records, body["error_details"])
            wait = retry_after_seconds(header(getattr(error, "headers", None), "retry-after"))
            return status_failure(records, status, one_line(body or error), wait)
        return SendResult(delivered=[record.event_id for record in records])

    def _refused(self, records: Sequence[UsageRecord], details: Mapping[str, Any]) -> SendResult:
        """Sort a refused batch: duplicates were delivered, invalid events are refused, the rest resent."""
        result = SendResult()
        rest: list[UsageRecord] = []
        for index, record in enumerate(records):
            errors = mapping_of(details.get(str(index)))
            if len(records) == 1 and not errors:
                errors = details  # a single event's details are not keyed by index
            codes = {str(code) for values in errors.values() for code in _listed(values)}
            if codes == {ALREADY_EXISTS}:
                result.delivered.append(record.event_id)
            elif errors:
                result.rejected[record.event_id] = "HTTP 422: " + one_line(dict(errors))
            else:
                rest.append(record)
        if rest:
            again = self.send(rest)
            result.delivered += again.delivered
            result.rejected |= again.rejected
        return result

    def close(self) -> None:
        pass


def _listed(values: Any) -> list[Any]:
    return list(values) if isinstance(values, list | tuple) else [values]
