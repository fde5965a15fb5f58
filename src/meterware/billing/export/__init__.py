"""Export live usage to billing providers: Stripe, Dodo Payments, OpenMeter and Lago.

The rollup windows are the source of truth. A run reads the completed windows (``hour`` by default) of
every customer with an id at the provider, and sends one event per meter and window:

* **Deterministic ids**: ``mw:<customer>:<meter>:<window>:<start>``, and ``...:r<n>`` for revision ``n``
  of a window that changed after it was exported (late events). A revision carries the *delta*, never the
  new total: the provider dedupes by id, so a new total under an old id would be dropped, and a new id
  with the total would count the window twice. Only ``count`` and ``sum`` meters are exported (their
  totals add up); a window whose total went down (a correction) is reported, not sent.
* **Marks, written ahead**: before an event is sent, its mark (window total, revision, value) is stored
  unconfirmed; once the provider took it, confirmed. A run that died in between sends the very same
  event again (same id, same value), which the provider dedupes. So nothing is counted twice or lost,
  within the provider's dedupe window (Stripe's is 24 hours).
* **Lateness**: events older than the provider accepts (Stripe 35 days, Dodo 1 hour) are not sent; they
  are counted in the report and logged, and the run goes on.
* **Limits**: batches of the provider's size; 429 (and 5xx, network errors) back off, honouring
  ``Retry-After``, else exponentially with jitter, for a bounded number of attempts; other 4xx are
  reported per event and not retried (a refused batch is split to find the culprits).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from meterware.billing._asdict import fields_dict
from meterware.config import EXPORT_PROVIDERS, Config, ExportTarget
from meterware.dimensions import base_of, split
from meterware.errors import MeterwareError
from meterware.rollup.aggregate import WINDOW_TTLS
from meterware.storage.base import ExportMark, Storage

__all__ = [
    "EXPORT_PROVIDERS",
    "ExportError",
    "ExportReport",
    "Exporter",
    "SendResult",
    "TransientError",
    "UsageRecord",
    "export_usage",
    "open_exporter",
]

log = logging.getLogger("meterware.export")

WINDOW_SECONDS: Final = {"minute": 60, "hour": 3600, "day": 86_400}
#: Seconds taken off a provider's lateness limit: our clock and theirs, and the time a run takes.
LATENESS_MARGIN: Final = 300
#: Customers whose events are gathered, sent and checkpointed together (bounds memory).
CUSTOMERS_PER_ROUND: Final = 200
BACKOFF_BASE: Final = 0.5
BACKOFF_CAP: Final = 30.0
#: Longest ``Retry-After`` honoured; a provider asking for more ends the run (it can be rerun later).
MAX_RETRY_AFTER: Final = 300.0


class ExportError(MeterwareError):
    """The export could not complete (the provider kept failing, or the setup is wrong)."""


class TransientError(Exception):
    """A request that may succeed if sent again: 429, 5xx, a network error."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One event to send: a meter's usage in one window (or its revision's delta)."""

    event_id: str
    customer: str
    #: The customer's id at the provider.
    external_id: str
    meter: str
    #: The provider's event name for the meter.
    name: str
    value: int
    window: str
    start: int
    #: The event's time, epoch seconds: the window's last second, so it falls inside the window.
    timestamp: int
    revision: int
    #: The values of the meter's dimensions (``meter`` is then a sub-meter, ``tokens{model=large}``),
    #: sent as the provider's properties next to the value; none for units reported without values.
    dimensions: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return fields_dict(self)


@dataclass(slots=True)
class SendResult:
    """What a provider did with one request: ids it took, and ids it refused with the reason."""

    delivered: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)


class Exporter(Protocol):
    """One provider's request shape (``meterware.billing.export.stripe`` ...)."""

    name: str
    #: Most events one request may carry (documented by the provider).
    max_batch: int
    #: Oldest event the provider accepts, in seconds (None: no documented limit).
    max_age: float | None
    #: Longest event id the provider accepts (None: no documented limit).
    max_id_length: int | None

    def send(self, records: Sequence[UsageRecord]) -> SendResult:
        """Send one batch. Raise :class:`TransientError` to be retried; a refused batch whose culprits
        the provider does not name may come back with every id rejected (it is then split)."""
        ...

    def close(self) -> None: ...


@dataclass(slots=True)
class ExportReport:
    """What one run did."""

    provider: str
    dry_run: bool = False
    windows_read: int = 0
    requests: int = 0
    retries: int = 0
    sent: list[UsageRecord] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    #: Events older than the provider accepts: not sent.
    too_late: list[UsageRecord] = field(default_factory=list)
    #: ``(event id base, old total, new total)`` of windows whose total went down since the export.
    decreased: list[tuple[str, int, int]] = field(default_factory=list)
    #: Customers skipped for lack of an id at the provider.
    unmapped: int = 0

    def as_dict(self) -> dict[str, Any]:
        decreased = [list(item) for item in self.decreased]
        return fields_dict(self, unmapped="unmapped_customers") | {"decreased": decreased}

    def summary(self) -> str:
        verb = "would send" if self.dry_run else "sent"
        units: dict[str, int] = defaultdict(int)
        for record in self.sent:
            units[record.meter] += record.value
        totals = ", ".join(f"{meter} {value}" for meter, value in sorted(units.items()))
        parts = [
            f"{self.provider}: {verb} {len(self.sent)} events" + (f" ({totals})" if totals else ""),
            f"{self.requests} requests, {self.retries} retried",
            f"{len(self.rejected)} rejected",
            f"{len(self.too_late)} too late",
        ]
        if self.decreased:
            parts.append(f"{len(self.decreased)} windows decreased")
        if self.unmapped:
            parts.append(f"{self.unmapped} customers without a {self.provider} id")
        return ", ".join(parts)


def event_id(customer: str, meter: str, window: str, start: int, revision: int, limit: int | None) -> str:
    """The deterministic id of a window's event (revision 1 has no suffix); hashed past ``limit``."""
    base = f"mw:{customer}:{meter}:{window}:{start}"
    full = base if revision == 1 else f"{base}:r{revision}"
    if limit is not None and len(full) > limit:
        return "mw:" + hashlib.sha256(full.encode()).hexdigest()[:40]
    return full


def backoff_delay(attempt: int, retry_after: float | None, rng: Callable[[], float] = random.random) -> float:
    """Seconds to wait before attempt ``attempt + 1``: ``Retry-After`` if given, else full jitter."""
    if retry_after is not None:
        return max(0.0, retry_after)
    return rng() * min(BACKOFF_CAP, BACKOFF_BASE * 2.0**attempt)


def open_exporter(target: ExportTarget, api_key: str | None = None) -> Exporter:
    """The exporter of ``target.provider``, with the API key from its environment variable."""
    key = api_key if api_key is not None else os.environ.get(target.api_key_env, "")
    if not key:
        raise ExportError(f"export.{target.provider}: set the API key in ${target.api_key_env}")
    if target.provider == "stripe":
        from meterware.billing.export.stripe import StripeExporter

        return StripeExporter(target, key)
    if target.provider == "dodo":
        from meterware.billing.export.dodo import DodoExporter

        return DodoExporter(target, key)
    if target.provider == "openmeter":
        from meterware.billing.export.openmeter import OpenMeterExporter

        return OpenMeterExporter(target, key)
    if target.provider == "lago":
        from meterware.billing.export.lago import LagoExporter

        return LagoExporter(target, key)
    raise ExportError(f"unknown provider {target.provider!r} ({', '.join(EXPORT_PROVIDERS)})")


def missing_sdk(provider: str, module: str, extra: str) -> ExportError:
    return ExportError(f"export to {provider} needs the {module!r} package: pip install 'meterware[{extra}]'")


# -- the run ------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    record: UsageRecord
    #: The mark to restore if the provider refuses the event (None: remove it).
    previous: ExportMark | None
    mark: ExportMark


def export_usage(
    config: Config,
    storage: Storage,
    provider: str,
    *,
    exporter: Exporter | None = None,
    since: int | None = None,
    until: int | None = None,
    dry_run: bool = False,
    customers: Sequence[str] | None = None,
    now: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> ExportReport:
    """Push the completed live windows of every mapped customer to ``provider``; see the module doc.

    ``since``/``until`` (epoch seconds) bound the windows read; by default a run reads from its last
    cursor (minus ``recheck_seconds``, for late usage) to the last window that ended ``settle_seconds``
    ago. Raises :class:`ExportError` when a request still fails after ``max_attempts``: what was
    delivered until then is checkpointed, and the next run resumes.
    """
    target = config.export.get(provider)
    if target is None:
        raise ExportError(f"no [export.{provider}] section in the configuration")
    own = exporter is None and not dry_run
    if exporter is None and not dry_run:
        exporter = open_exporter(target)
    try:
        run = _Run(target, storage, exporter, dry_run, time.time() if now is None else now, sleep)
        run.dimensioned = frozenset(meter for meter in target.meters if config.meters[meter].dimensions)
        for chunk in _chunks(list(customers or storage.list_customers()), CUSTOMERS_PER_ROUND):
            run.round(chunk, since, until)
        return run.report
    finally:
        if own and exporter is not None:
            exporter.close()


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for index in range(0, len(items), size):
        yield items[index : index + size]


class _Run:
    def __init__(
        self,
        target: ExportTarget,
        storage: Storage,
        exporter: Exporter | None,
        dry_run: bool,
        now: float,
        sleep: Callable[[float], None],
    ) -> None:
        self.target = target
        self.storage = storage
        self.exporter = exporter
        self.now = now
        self.sleep = sleep
        self.report = ExportReport(target.provider, dry_run=dry_run)
        self.length = WINDOW_SECONDS[target.window]
        # Marks outlive the rollup windows they describe, so a window is never taken for a new one.
        self.ttl = 2 * WINDOW_TTLS[target.window]
        documented = None if exporter is None else exporter.max_age
        self.max_age = target.max_age_seconds if target.max_age_seconds is not None else documented
        self.max_batch = min(target.batch_size or 10**9, exporter.max_batch if exporter else 10**9)
        self.id_limit = None if exporter is None else exporter.max_id_length
        #: Meters sent per sub-meter of dimension values.
        self.dimensioned: frozenset[str] = frozenset()

    # -- which windows

    def _bounds(self, customer: str, since: int | None, until: int | None) -> tuple[int, int]:
        length, target = self.length, self.target
        last = self.now - target.settle_seconds
        end = int(min(last, until) if until is not None else last) // length * length
        # Nothing older than the rollup keeps (its windows would read as empty).
        oldest = int(self.now - WINDOW_TTLS[target.window]) // length * length + length
        if since is None:
            cursor = self.storage.read_export_cursor(target.provider, customer, target.window)
            default = end - int(target.recheck_seconds)
            if cursor is None and self.max_age is not None:
                default = int(self.now - self.max_age)
            since = default if cursor is None else min(cursor, default)
        start = max(since // length * length, oldest)  # from the window that holds ``since``
        return start, end

    # -- one round of customers

    def round(self, customers: Sequence[str], since: int | None, until: int | None) -> None:
        pending: list[_Pending] = []
        ends: dict[str, int] = {}
        for customer in customers:
            external = self.storage.get_external_ids(customer).get(self.target.provider)
            if not external and self.target.customer_ids == "meterware":
                external = customer
            if not external:
                self.report.unmapped += 1
                continue
            start, end = self._bounds(customer, since, until)
            pending += self._collect(customer, external, start, end)
            ends[customer] = end
        if self.report.dry_run:
            self.report.sent += [item.record for item in pending]
            return
        self._save(pending, lambda item: item.mark)
        failed: set[str] = set()
        for batch in _chunks_of(pending, self.max_batch):
            result = self._deliver([item.record for item in batch])
            delivered = set(result.delivered)
            for item in batch:
                if item.record.event_id in delivered:
                    self.report.sent.append(item.record)
                elif item.record.event_id in result.rejected:
                    reason = result.rejected[item.record.event_id]
                    self.report.rejected[item.record.event_id] = reason
                    failed.add(item.record.customer)
                    log.warning("%s refused event %s: %s", self.target.provider, item.record.event_id, reason)
            done = [item for item in batch if item.record.event_id in delivered]
            self._save(done, lambda item: _confirmed(item.mark))
            refused = [item for item in batch if item.record.event_id in result.rejected]
            self._save(refused, lambda item: item.previous)
        for customer, end in ends.items():
            # A customer whose event was refused is read again from the same place next time.
            if customer not in failed:
                self.storage.write_export_cursor(self.target.provider, customer, self.target.window, end)

    def _collect(self, customer: str, external: str, start: int, end: int) -> list[_Pending]:
        target, length = self.target, self.length
        starts = list(range(start, end, length))
        usage = {s: self.storage.read_usage(customer, True, target.window, s) for s in starts}
        self.report.windows_read += len(starts)
        marks = self.storage.read_export_marks(target.provider, customer, target.window, starts)
        pending: list[_Pending] = []
        for window_start in starts:
            marked = marks.get(window_start, {})
            for meter, name, total, dimensions in self._totals(usage[window_start], marked):
                mark = marked.get(meter)
                record = self._record(customer, external, meter, name, window_start, total, mark, dimensions)
                if record is None:
                    continue
                if mark is not None and not mark.confirmed:
                    new_mark = mark  # the same event again: the provider dedupes it
                else:
                    new_mark = ExportMark(total, record.revision, record.value, confirmed=False)
                if self.max_age is not None and self.now - record.timestamp > self.max_age - LATENESS_MARGIN:
                    self.report.too_late.append(record)
                    log.warning(
                        "%s: event %s (%s %d) is older than the provider accepts; not sent",
                        target.provider,
                        record.event_id,
                        meter,
                        record.value,
                    )
                    continue
                pending.append(_Pending(record, mark, new_mark))
        return pending

    def _totals(
        self, totals: Mapping[str, int], marked: Mapping[str, object]
    ) -> Iterator[tuple[str, str, int, dict[str, str]]]:
        """Per exported (sub-)meter of a window: its name, the provider's event name, its total, its
        dimension values. A meter with dimensions is sent per sub-meter, and its units reported without
        values under its own name (so windows sent before it had dimensions are not sent again)."""
        for meter, name in self.target.meters.items():
            if meter not in self.dimensioned:
                yield meter, name, totals.get(meter, 0), {}
                continue
            found = {sub for sub in (*totals, *marked) if "{" in sub and base_of(sub) == meter}
            subs = 0
            for sub in sorted(found):
                subs += totals.get(sub, 0)
                yield sub, name, totals.get(sub, 0), dict(split(sub)[1])
            yield meter, name, totals.get(meter, 0) - subs, {}

    def _record(
        self,
        customer: str,
        external: str,
        meter: str,
        name: str,
        start: int,
        total: int,
        mark: ExportMark | None,
        dimensions: dict[str, str],
    ) -> UsageRecord | None:
        window = self.target.window
        if mark is not None and not mark.confirmed:
            revision, value = mark.revision, mark.value  # resend exactly what may have arrived
        else:
            exported = mark.total if mark else 0
            if total == exported:
                return None
            if total < exported:
                base = event_id(customer, meter, window, start, 1, None)
                self.report.decreased.append((base, exported, total))
                log.warning(
                    "%s: %s went down from %d to %d after its export; correct it at the provider",
                    self.target.provider,
                    base,
                    exported,
                    total,
                )
                return None
            revision, value = (mark.revision + 1 if mark else 1), total - exported
        identifier = event_id(customer, meter, window, start, revision, self.id_limit)
        timestamp = start + self.length - 1
        return UsageRecord(
            identifier, customer, external, meter, name, value, window, start, timestamp, revision, dimensions
        )

    def _save(self, items: Sequence[_Pending], mark_of: Callable[[_Pending], ExportMark | None]) -> None:
        grouped: dict[str, dict[int, dict[str, ExportMark | None]]] = defaultdict(lambda: defaultdict(dict))
        for item in items:
            grouped[item.record.customer][item.record.start][item.record.meter] = mark_of(item)
        for customer, marks in grouped.items():
            self.storage.write_export_marks(
                self.target.provider, customer, self.target.window, marks, self.ttl
            )

    # -- one request, with retries

    def _deliver(self, records: list[UsageRecord]) -> SendResult:
        assert self.exporter is not None
        for attempt in range(self.target.max_attempts):
            self.report.requests += 1
            try:
                result = self.exporter.send(records)
            except TransientError as error:
                if attempt + 1 >= self.target.max_attempts:
                    raise ExportError(
                        f"{self.target.provider}: {error} (gave up after {attempt + 1} attempts; "
                        f"{len(self.report.sent)} events delivered before, rerun to resume)"
                    ) from None
                if error.retry_after is not None and error.retry_after > MAX_RETRY_AFTER:
                    raise ExportError(
                        f"{self.target.provider}: asked to wait {error.retry_after:.0f}s; rerun later"
                    ) from None
                delay = backoff_delay(attempt, error.retry_after)
                log.info("%s: %s; retrying in %.2fs", self.target.provider, error, delay)
                self.report.retries += 1
                self.sleep(delay)
                continue
            if len(records) > 1 and len(result.rejected) == len(records):
                # The provider refused the batch without naming the culprits: find them one by one.
                return self._one_by_one(records)
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _one_by_one(self, records: list[UsageRecord]) -> SendResult:
        merged = SendResult()
        for record in records:
            result = self._deliver([record])
            merged.delivered += result.delivered
            merged.rejected |= result.rejected
        return merged


def _confirmed(mark: ExportMark) -> ExportMark:
    return ExportMark(mark.total, mark.revision, mark.value, confirmed=True)


def _chunks_of(items: Sequence[_Pending], size: int) -> Iterator[Sequence[_Pending]]:
    for index in range(0, len(items), size):
        yield items[index : index + size]


def rejected_all(records: Sequence[UsageRecord], reason: str) -> SendResult:
    """Every record refused with ``reason`` (a batch the provider refused as a whole)."""
    return SendResult(rejected={record.event_id: reason for record in records})


def status_failure(
    records: Sequence[UsageRecord], status: int | None, reason: str, retry_after: float | None
) -> SendResult:
    """Classify a failed request: raise :class:`TransientError` for 429/5xx/network, else refuse all."""
    if status is not None and 300 <= status < 400:
        # Following it would send the events, and perhaps the API key, to an address nobody configured;
        # and whatever answers there is not the provider saying it took them.
        raise ExportError(
            f"the provider answered HTTP {status} (a redirect), not followed: the API key goes to "
            f"base_url only; set base_url to the provider's API address ({reason})"
        )
    if status is None or status == 429 or status >= 500 or status == 409:
        raise TransientError(f"HTTP {status or 'error'}: {reason}", retry_after)
    if status in (401, 403):  # the key, not the events: nothing would get through
        raise ExportError(f"the provider refused the API key (HTTP {status}): {reason}")
    return rejected_all(records, f"HTTP {status}: {reason}")


def header(headers: Any, name: str) -> str | None:
    """A response header by case-insensitive name, from whatever mapping an SDK hands back."""
    if not headers:
        return None
    getter = getattr(headers, "get", None)
    value = getter(name) if getter is not None else None
    if value is None and getter is not None:
        value = next((v for k, v in dict(headers).items() if str(k).lower() == name.lower()), None)
    return None if value is None else str(value)


def one_line(text: Any, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def mapping_of(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}
