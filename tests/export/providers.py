"""Local stand-ins for the billing providers' ingestion APIs (127.0.0.1, one thread each).

Each server checks every request against the provider's documented shape (method, path, auth, content
type, idempotency fields, body and field types, batch size, lateness) and answers as the provider does:
a request that breaks the documented shape is answered 400 and recorded in ``invalid``, so a test that
ends with ``invalid == []`` proves every request was well formed. Accepted events are deduplicated the
provider's way; ``inject`` queues canned answers (429 with ``Retry-After``, 5xx) for the next requests;
``refuse_customers`` makes events of those customers fail validation.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Self
from urllib.parse import parse_qs

API_KEY = "test-key-123"
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)\Z")


class Invalid(Exception):
    """The request breaks the documented shape."""


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int = 0


@dataclass
class Answer:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


class Serving:
    """A threaded HTTP server on 127.0.0.1, serving while in a ``with`` block."""

    def serve(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


class ProviderServer(Serving):
    """The common part: a threaded HTTP server that records, validates and answers."""

    name: ClassVar[str]

    def __init__(self, now: float) -> None:
        #: The provider's clock (tests move time forward, the server moves with them).
        self.now = now
        self.requests: list[Recorded] = []
        self.invalid: list[str] = []
        #: Accepted events by their dedupe key.
        self.events: dict[Any, dict[str, Any]] = {}
        self.injected: list[Answer] = []
        self.refuse_customers: set[str] = set()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                record = Recorded(
                    "POST",
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    self.rfile.read(length),
                )
                with server.lock:
                    server.requests.append(record)
                    answer = server.injected.pop(0) if server.injected else None
                    if answer is None:
                        try:
                            server.check_auth(record)
                            answer = server.handle(record)
                        except Invalid as error:
                            server.invalid.append(f"{record.path}: {error}")
                            answer = Answer(400, server.error_body(str(error)))
                record.status = answer.status
                payload = b"" if answer.body is None else json.dumps(answer.body).encode()
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                if payload:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.serve(Handler)

    # -- what the tests read

    def inject(self, *answers: Answer) -> None:
        self.injected += answers

    def totals(self) -> dict[tuple[str, str], int]:
        """Units accepted per (customer, event name): what the provider would bill."""
        totals: dict[tuple[str, str], int] = {}
        for event in self.events.values():
            key = (event["customer"], event["name"])
            totals[key] = totals.get(key, 0) + event["value"]
        return totals

    def totals_by_dimensions(self) -> dict[tuple[str, str, tuple[tuple[str, Any], ...]], int]:
        """Values received per customer, event name and dimension values (sorted)."""
        totals: dict[tuple[str, str, tuple[tuple[str, Any], ...]], int] = {}
        for event in self.events.values():
            key = (event["customer"], event["name"], tuple(sorted(event.get("dimensions", {}).items())))
            totals[key] = totals.get(key, 0) + event["value"]
        return totals

    def ids(self) -> list[str]:
        return sorted(event["id"] for event in self.events.values())

    # -- what each provider defines

    def check_auth(self, record: Recorded) -> None:
        if record.headers.get("authorization") != f"Bearer {API_KEY}":
            raise Invalid(
                f"Authorization must be 'Bearer <key>', got {record.headers.get('authorization')!r}"
            )

    def handle(self, record: Recorded) -> Answer:
        raise NotImplementedError

    def error_body(self, message: str) -> Any:
        return {"message": message}

    def check_time(self, seconds: float, max_age: float | None, what: str) -> None:
        if seconds > self.now + 300:
            raise Invalid(f"{what} is more than 5 minutes in the future")
        if max_age is not None and seconds < self.now - max_age:
            raise Invalid(f"{what} is older than {max_age:.0f}s")


def _string(data: Any, key: str, where: str, limit: int | None = None) -> str:
    value = data.get(key) if isinstance(data, dict) else None
    if not isinstance(value, str) or not value:
        raise Invalid(f"{where}.{key} must be a non-empty string, got {value!r}")
    if limit is not None and len(value) > limit:
        raise Invalid(f"{where}.{key} is longer than {limit} characters")
    return value


def _json(record: Recorded, content_type: str) -> Any:
    if record.headers.get("content-type", "").split(";")[0].strip() != content_type:
        raise Invalid(f"Content-Type must be {content_type}, got {record.headers.get('content-type')!r}")
    try:
        return json.loads(record.body)
    except ValueError as error:
        raise Invalid(f"body is not JSON: {error}") from None


class StripeServer(ProviderServer):
    """``POST /v1/billing/meter_events``: form-encoded, one event, ``Idempotency-Key`` replayed."""

    name = "stripe"

    def __init__(self, now: float) -> None:
        super().__init__(now)
        self.replies: dict[str, Answer] = {}

    def error_body(self, message: str) -> Any:
        return {"error": {"type": "invalid_request_error", "message": message}}

    def handle(self, record: Recorded) -> Answer:
        if record.path != "/v1/billing/meter_events":
            raise Invalid(f"unknown path {record.path}")
        if record.headers.get("content-type") != "application/x-www-form-urlencoded":
            raise Invalid(f"Content-Type must be form-encoded, got {record.headers.get('content-type')!r}")
        key = record.headers.get("idempotency-key")
        if key in self.replies:  # Stripe replays the first answer to a reused key
            return self.replies[key]
        form = {k: v[0] for k, v in parse_qs(record.body.decode(), strict_parsing=True).items()}
        name = _string(form, "event_name", "params", 100)
        identifier = _string(form, "identifier", "params", 100)
        if key != identifier:
            raise Invalid("Idempotency-Key should be the identifier")
        if not form.get("timestamp", "").isdigit():
            raise Invalid(f"timestamp must be Unix seconds, got {form.get('timestamp')!r}")
        timestamp = int(form["timestamp"])
        self.check_time(timestamp, 35 * 86_400, "timestamp")
        customer = _string(form, "payload[stripe_customer_id]", "params")
        value = form.get("payload[value]", "")
        if not re.fullmatch(r"-?\d{1,15}", value):
            raise Invalid(f"payload[value] must be a whole number of at most 15 digits, got {value!r}")
        dimensions = {
            key[8:-1]: text
            for key, text in form.items()
            if re.fullmatch(r"payload\[[A-Za-z0-9_.-]+\]", key)
            and key not in ("payload[stripe_customer_id]", "payload[value]")
        }
        if (
            set(form)
            - {"event_name", "identifier", "timestamp", "payload[stripe_customer_id]", "payload[value]"}
            - {f"payload[{key}]" for key in dimensions}
        ):
            raise Invalid(f"unexpected parameters {sorted(form)}")
        if customer in self.refuse_customers:
            # Stripe keeps no idempotent result for a request that failed validation.
            return Answer(400, self.error_body(f"No such customer: '{customer}'"))
        else:
            if identifier not in self.events:  # identifiers are unique for at least 24 hours
                self.events[identifier] = {
                    "id": identifier,
                    "customer": customer,
                    "name": name,
                    "value": int(value),
                    "dimensions": dimensions,
                }
            body = {"object": "billing.meter_event", "event_name": name, "identifier": identifier}
            answer = Answer(
                200, body | {"livemode": False, "payload": {}, "timestamp": timestamp, "created": 0}
            )
        self.replies[identifier] = answer
        return answer


class DodoServer(ProviderServer):
    """``POST /events/ingest``: JSON, up to 1,000 events, ``event_id`` seen before ignored."""

    name = "dodo"

    def handle(self, record: Recorded) -> Answer:
        if record.path != "/events/ingest":
            raise Invalid(f"unknown path {record.path}")
        body = _json(record, "application/json")
        events = body.get("events") if isinstance(body, dict) else None
        if not isinstance(events, list) or not 1 <= len(events) <= 1000:
            raise Invalid("events must be a list of 1 to 1000 events")
        ids = [_string(event, "event_id", "events[]") for event in events]
        if len(set(ids)) != len(ids):
            raise Invalid("duplicate event_id in one request")
        parsed = []
        for index, event in enumerate(events):
            where = f"events[{index}]"
            if set(event) - {"event_id", "customer_id", "event_name", "timestamp", "metadata"}:
                raise Invalid(f"{where} has unknown fields {sorted(event)}")
            customer = _string(event, "customer_id", where)
            name = _string(event, "event_name", where)
            stamp = _string(event, "timestamp", where)
            if not RFC3339.match(stamp):
                raise Invalid(f"{where}.timestamp must be ISO 8601, got {stamp!r}")
            self.check_time(datetime.fromisoformat(stamp).timestamp(), 3600, f"{where}.timestamp")
            metadata = event.get("metadata")
            if not isinstance(metadata, dict) or len(metadata) > 50:
                raise Invalid(f"{where}.metadata must be an object of at most 50 keys")
            for key, value in metadata.items():
                if (
                    len(key) > 100
                    or isinstance(value, dict | list)
                    or (isinstance(value, str) and len(value) > 500)
                ):
                    raise Invalid(f"{where}.metadata.{key} must be a scalar")
            if not isinstance(metadata.get("value"), int):
                raise Invalid(f"{where}.metadata.value must be a number")
            if customer in self.refuse_customers:
                return Answer(422, {"code": "INVALID_REQUEST", "message": f"customer {customer} not found"})
            parsed.append(
                {
                    "id": event["event_id"],
                    "customer": customer,
                    "name": name,
                    "value": metadata["value"],
                    "dimensions": {key: text for key, text in metadata.items() if key != "value"},
                }
            )
        fresh = [event for event in parsed if event["id"] not in self.events]
        for event in fresh:
            self.events[event["id"]] = event
        return Answer(200, {"ingested_count": len(fresh)})


class OpenMeterServer(ProviderServer):
    """``POST /api/v1/events``: CloudEvents (batch), deduplicated by ``id`` + ``source``, 204."""

    name = "openmeter"

    def error_body(self, message: str) -> Any:
        return {"type": "about:blank", "title": "Bad Request", "status": 400, "detail": message}

    def handle(self, record: Recorded) -> Answer:
        if record.path != "/api/v1/events":
            raise Invalid(f"unknown path {record.path}")
        content_type = record.headers.get("content-type", "")
        if content_type == "application/cloudevents+json":
            events = [_json(record, content_type)]
        else:
            events = _json(record, "application/cloudevents-batch+json")
        if not isinstance(events, list) or not events:
            raise Invalid("a batch must be a non-empty JSON array")
        parsed = []
        for index, event in enumerate(events):
            where = f"[{index}]"
            if not isinstance(event, dict) or event.get("specversion") != "1.0":
                raise Invalid(f"{where}.specversion must be '1.0'")
            event_id, source = _string(event, "id", where), _string(event, "source", where)
            name, subject = _string(event, "type", where), _string(event, "subject", where)
            when = _string(event, "time", where)
            if not RFC3339.match(when):
                raise Invalid(f"{where}.time must be RFC 3339, got {when!r}")
            self.check_time(datetime.fromisoformat(when).timestamp(), None, f"{where}.time")
            data = event.get("data")
            if not isinstance(data, dict) or not isinstance(data.get("value"), int):
                raise Invalid(f"{where}.data.value must be a number")
            if subject in self.refuse_customers:
                raise Invalid(f"{where}.subject {subject} is not allowed")
            parsed.append(
                (
                    (event_id, source),
                    {
                        "id": event_id,
                        "customer": subject,
                        "name": name,
                        "value": data["value"],
                        "dimensions": {key: text for key, text in data.items() if key != "value"},
                    },
                )
            )
        for key, event in parsed:
            self.events.setdefault(key, event)
        return Answer(204)


class LagoServer(ProviderServer):
    """``POST /api/v1/events/batch``: up to 100 events, all or none; a known ``transaction_id`` is a 422."""

    name = "lago"

    def handle(self, record: Recorded) -> Answer:
        if record.path != "/api/v1/events/batch":
            raise Invalid(f"unknown path {record.path}")
        body = _json(record, "application/json")
        events = body.get("events") if isinstance(body, dict) else None
        if not isinstance(events, list) or not 1 <= len(events) <= 100:
            raise Invalid("events must be a list of 1 to 100 events")
        errors: dict[str, dict[str, list[str]]] = {}
        parsed = []
        for index, event in enumerate(events):
            where = f"events[{index}]"
            transaction = _string(event, "transaction_id", where)
            subscription = _string(event, "external_subscription_id", where)
            code = _string(event, "code", where)
            stamp = event.get("timestamp")
            if not (isinstance(stamp, int) or (isinstance(stamp, str) and stamp.isdigit())):
                raise Invalid(f"{where}.timestamp must be Unix seconds, got {stamp!r}")
            self.check_time(int(stamp), None, f"{where}.timestamp")
            properties = event.get("properties")
            if not isinstance(properties, dict) or not isinstance(properties.get("value"), int):
                raise Invalid(f"{where}.properties.value must be a number")
            if (subscription, transaction) in self.events:
                errors[str(index)] = {"transaction_id": ["value_already_exist"]}
            elif subscription in self.refuse_customers:
                errors[str(index)] = {"external_subscription_id": ["subscription_not_found"]}
            key = (subscription, transaction)
            parsed.append(
                (
                    key,
                    {
                        "id": transaction,
                        "customer": subscription,
                        "name": code,
                        "value": properties["value"],
                        "dimensions": {key: text for key, text in properties.items() if key != "value"},
                    },
                )
            )
        if errors:
            body = {"status": 422, "error": "Unprocessable Entity", "code": "validation_errors"}
            return Answer(422, body | {"error_details": errors})
        for key, event in parsed:
            self.events[key] = event
        return Answer(200, {"events": [event for _, event in parsed]})


SERVERS: dict[str, type[ProviderServer]] = {
    "stripe": StripeServer,
    "dodo": DodoServer,
    "openmeter": OpenMeterServer,
    "lago": LagoServer,
}


def all_names() -> Iterator[str]:
    yield from SERVERS


class _Server(Serving):
    """A threaded HTTP server on 127.0.0.1 that records every request and answers through ``answer``."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def handle_one(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                record = Recorded(
                    self.command,
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    self.rfile.read(length),
                )
                server.requests.append(record)
                status, headers, payload = server.answer(record)
                record.status = status
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_HEAD = handle_one

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.serve(Handler)

    def answer(self, record: Recorded) -> tuple[int, dict[str, str], bytes]:
        raise NotImplementedError


class Elsewhere(_Server):
    """Another host: takes whatever reaches it with a 200 every provider's client reads as a success."""

    def answer(self, record: Recorded) -> tuple[int, dict[str, str], bytes]:
        body = {"object": "billing.meter_event", "ingested_count": 1, "events": []}
        return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()

    def keys_received(self) -> list[str]:
        """The Authorization headers that arrived here."""
        return [r.headers["authorization"] for r in self.requests if "authorization" in r.headers]


class Redirector(_Server):
    """A provider address that moved: every request is answered ``status`` with a Location elsewhere."""

    def __init__(self, status: int, location: str) -> None:
        super().__init__()
        self.status = status
        self.location = location

    def answer(self, record: Recorded) -> tuple[int, dict[str, str], bytes]:
        return self.status, {"Location": self.location + record.path}, b""
