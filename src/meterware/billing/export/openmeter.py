"""OpenMeter CloudEvents over plain HTTP (the standard library: no stable official SDK).

``POST /api/v1/events`` with ``Content-Type: application/cloudevents-batch+json``: a JSON array of
CloudEvents 1.0 (``specversion``, ``id``, ``source``, ``type`` = the meter's event type, ``subject`` = the
customer's subject key, ``time`` RFC 3339, ``data`` holding the value under ``value_key``), bearer-token
auth; 204 when accepted, and only a 204 marks the events delivered. A redirect is never followed
(urllib would replay the ``Authorization`` header to whatever host a 301/302/303 names): a 3xx fails
the run. OpenMeter dedupes by ``id`` + ``source`` (32 days by default), so ``source`` stays fixed
(``export.openmeter.source``). No age limit is documented; batches of 100.

On PyPI, ``openmeter`` has only pre-releases of its 1.0 SDK (and a yanked 2.0.0) pulling in aiohttp and
corehttp, so the request is built here: it is one POST.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final

from meterware._http import no_redirects_opener, retry_after_seconds
from meterware.billing.export import ExportError, SendResult, UsageRecord, one_line, status_failure
from meterware.config import ExportTarget

MAX_BATCH: Final = 100
DEFAULT_BASE_URL: Final = "https://openmeter.cloud"
BATCH_CONTENT_TYPE: Final = "application/cloudevents-batch+json"
TIMEOUT: Final = 30.0
#: The one answer OpenMeter documents for accepted events.
ACCEPTED: Final = 204


class OpenMeterExporter:
    """Batches of CloudEvents for OpenMeter (see the module doc)."""

    name = "openmeter"
    max_batch = MAX_BATCH
    max_age: float | None = None
    max_id_length: int | None = None

    def __init__(self, target: ExportTarget, api_key: str) -> None:
        self.target = target
        self.url = (target.base_url or DEFAULT_BASE_URL).rstrip("/") + "/api/v1/events"
        self._api_key = api_key
        self._opener = no_redirects_opener()

    def cloudevent(self, record: UsageRecord) -> dict[str, Any]:
        """One CloudEvent (structured mode)."""
        when = datetime.fromtimestamp(record.timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {
            "specversion": "1.0",
            "id": record.event_id,
            "source": self.target.source,
            "type": record.name,
            "subject": record.external_id,
            "time": when,
            "datacontenttype": "application/json",
            "data": {**record.dimensions, self.target.value_key: record.value},
        }

    def send(self, records: Sequence[UsageRecord]) -> SendResult:
        body = json.dumps([self.cloudevent(record) for record in records]).encode()
        request = urllib.request.Request(
            self.url,
            data=body,
            method="POST",
            headers={
                "Authorization": f"Bearer {self._api_key}",
                "Content-Type": BATCH_CONTENT_TYPE,
                "Accept": "application/json, application/problem+json",
            },
        )
        try:
            with self._opener.open(request, timeout=TIMEOUT) as response:
                response.read()
                status = response.status
        except urllib.error.HTTPError as error:
            detail = one_line(error.read().decode(errors="replace") or error.reason)
            wait = retry_after_seconds(error.headers.get("Retry-After"))
            error.close()
            return status_failure(records, error.code, detail, wait)
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            return status_failure(records, None, one_line(error), None)
        if status != ACCEPTED:
            # Something answered that is not OpenMeter taking the events (a proxy, a wrong base_url).
            raise ExportError(
                f"openmeter answered HTTP {status} where it answers {ACCEPTED} when it takes events: "
                "nothing recorded as delivered (is base_url OpenMeter's API?)"
            )
        return SendResult(delivered=[record.event_id for record in records])

    def close(self) -> None:
        pass
