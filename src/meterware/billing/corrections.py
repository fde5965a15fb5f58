"""Corrections of single events (void, amend) and idempotent backfill imports.

A correction finds the event in its shard's stream, then appends a *correction entry* through one atomic
script (``correct.lua``): the rollup subtracts the event (its call, ``count``/``sum`` units and cost, see
:mod:`meterware.rollup.aggregate`) and, for an amendment, adds the amended version; the credits the event
was charged are refunded with a ``refund`` ledger entry in the same script. The event's correction state
is kept for good under a key derived from its id, and the script applies only if that state is still the
one the correction was computed from: repeating a correction, or racing it, applies it once.

Events are found by time: their UUIDv7 id holds the millisecond they were made, and the batch that holds
them was appended shortly after. The stream is trimmed after ``rollup.retention_seconds``: older events
can no longer be corrected. Backfilled events are indexed by id when imported, so they are found at once.
"""

from __future__ import annotations

import csv
import json
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

from meterware.billing._asdict import fields_dict
from meterware.config import Config
from meterware.errors import NotFoundError, StorageError, UsageError
from meterware.events import EventDecodeError, UsageEvent, decode_batch, encode_batch
from meterware.metering.periods import period_bounds
from meterware.metering.records import Customer
from meterware.rollup.aggregate import MAX_VALUE
from meterware.storage._keyspace import shard_of
from meterware.storage.base import Correction, LedgerEntry, Storage

#: How long after an event's own time its batch may have been flushed (spooled batches come later).
DEFAULT_WITHIN_SECONDS: Final = 86_400
#: How far before its own time an event's batch may sit in the stream (clocks of app hosts and Redis).
CLOCK_SKEW_MS: Final = 60_000
#: Events backfilled per stream entry.
IMPORT_BATCH: Final = 500
_READ: Final = 200
_ATTEMPTS: Final = 5


@dataclass(frozen=True, slots=True)
class Found:
    """An event found in its shard's stream."""

    shard: int
    entry_id: str
    batch_id: str
    event: UsageEvent
    #: Micro-credits its settlement computed (charged if the plan charges credits, else accrued).
    cost: int


@dataclass(frozen=True, slots=True)
class CorrectionResult:
    """What a void or an amendment did."""

    event_id: str
    customer: str
    action: Literal["void", "amend"]
    #: False if it changed nothing (the same correction was applied before).
    applied: bool
    message: str
    #: Micro-credits refunded (positive) or charged (negative) to the balance.
    credit: int = 0

    def as_dict(self) -> dict[str, Any]:
        return fields_dict(self, credit="credit_micros")


@dataclass(frozen=True, slots=True)
class ImportResult:
    """What an import wrote: events new to the backend, and those imported before (skipped)."""

    imported: int
    skipped: int

    def as_dict(self) -> dict[str, int]:
        return {"imported": self.imported, "skipped": self.skipped}


def event_time_ms(event_id: str) -> int:
    """The millisecond a UUIDv7 event id was made; ``UsageError`` if it is not one."""
    try:
        value = uuid.UUID(event_id)
    except ValueError:
        raise UsageError(f"event id {event_id!r} is not a UUID") from None
    if value.version != 7:
        raise UsageError(f"event id {event_id!r} is not a UUIDv7 (it carries no time)")
    return value.int >> 80


def _after(entry_id: str) -> str:
    """The id just before ``entry_id`` (reads are exclusive of the id they start after)."""
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq) - 1}" if int(seq or 0) else f"{int(ms) - 1}-18446744073709551615"


def _match(shard: int, entry_id: str, fields: Mapping[bytes, bytes], raw: bytes) -> Found | None:
    payload = fields.get(b"b", b"")
    if raw not in payload or b"n" in fields:  # cheap test before decoding; corrections are not events
        return None
    try:
        events = decode_batch(payload)
        costs = [int(cost) for cost in fields.get(b"c", b"").split(b",")] if events else []
    except (EventDecodeError, ValueError):
        return None
    for event, cost in zip(events, costs, strict=False):
        if event.id == raw:
            return Found(shard, entry_id, fields.get(b"i", b"").decode(errors="replace"), event, cost)
    return None


def find_event(
    storage: Storage,
    event_id: str,
    *,
    customer: str | None = None,
    within_seconds: float = DEFAULT_WITHIN_SECONDS,
) -> Found:
    """Find an event by id in the shard streams (only its customer's shard when ``customer`` is given)."""
    at_ms = event_time_ms(event_id)
    raw = uuid.UUID(event_id).bytes
    shards = [shard_of(customer, storage.shards)] if customer else list(range(storage.shards))
    for shard in shards:
        entry_id = storage.imported_entries(shard, [event_id]).get(event_id)
        if entry_id is not None:
            for entry in storage.read_stream(shard, _after(entry_id), 1):
                found = _match(shard, entry.entry_id, entry.fields, raw)
                if found is not None:
                    return found
    end_ms = at_ms + int(within_seconds * 1000)
    for shard in shards:
        after = f"{max(0, at_ms - CLOCK_SKEW_MS)}-0"
        while True:
            entries = storage.read_stream(shard, after, _READ)
            for entry in entries:
                if int(entry.entry_id.partition("-")[0]) > end_ms:
                    break
                found = _match(shard, entry.entry_id, entry.fields, raw)
                if found is not None:
                    return found
            else:
                if len(entries) == _READ:
                    after = entries[-1].entry_id
                    continue
            break
    raise NotFoundError(
        f"no event {event_id} in the streams within {within_seconds:g}s after its time "
        "(streams are trimmed after rollup.retention_seconds)"
    )


# -- corrections ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _State:
    """An event as its corrections left it ("" in the backend: as it was flushed)."""

    voided: bool
    units: dict[str, int | str]
    cost: int
    charged: bool
    revision: int

    def dump(self) -> str:
        return json.dumps(
            {
                "voided": self.voided,
                "units": self.units,
                "cost": self.cost,
                "charged": self.charged,
                "revision": self.revision,
            },
            sort_keys=True,
        )


def _charged(storage: Storage, found: Found) -> bool:
    """Whether the event's batch charged its customer's credits (its ledger holds the batch's charge)."""
    if found.cost == 0 or found.batch_id.startswith("import:"):
        return False
    ms = int(found.entry_id.partition("-")[0])
    nearby = storage.read_ledger(found.event.customer, str(max(0, ms - 1000)), str(ms + 1000))
    return any(entry.kind == "charge" and entry.ref == found.batch_id for entry in nearby)


def _state(storage: Storage, found: Found, raw: str) -> _State:
    if not raw:
        return _State(False, dict(found.event.units), found.cost, _charged(storage, found), 0)
    data = json.loads(raw)
    return _State(data["voided"], data["units"], data["cost"], data["charged"], data["revision"])


def _check_meters(config: Config, event_id: str, units: Iterable[str]) -> None:
    for name in units:
        meter = config.meters.get(name)
        if meter is not None and meter.aggregation not in ("count", "sum"):
            raise UsageError(
                f"event {event_id}: meter {name!r} is a {meter.aggregation} meter; only count and sum "
                "meters can be corrected (a maximum, last or distinct value cannot be taken back)"
            )


def _price(config: Config, plan: str, meter: str) -> int:
    found = config.plans.get(plan) or config.stored.plans.get(plan)
    terms = found.meters.get(meter) if found is not None else None
    return terms.price if terms is not None else 0


def correct_event(
    storage: Storage,
    config: Config,
    event_id: str,
    *,
    units: Mapping[str, int] | None,
    reason: str,
    actor: str,
    customer: str | None = None,
    within_seconds: float = DEFAULT_WITHIN_SECONDS,
) -> CorrectionResult:
    """Void an event (``units=None``) or amend its ``sum`` meters to ``units``, exactly once."""
    action: Literal["void", "amend"] = "void" if units is None else "amend"
    found = find_event(storage, event_id, customer=customer, within_seconds=within_seconds)
    event = found.event
    for _ in range(_ATTEMPTS):
        raw = storage.correction_state(found.shard, event_id)
        state = _state(storage, found, raw)
        if state.voided:
            message = f"event {event_id} is already voided" + (
                "" if units is None else "; a voided event cannot be amended"
            )
            if units is not None:
                raise UsageError(message)
            return CorrectionResult(event_id, event.customer, action, False, message)
        _check_meters(config, event_id, state.units)
        current = replace(event, units=dict(state.units))
        if units is None:
            new = replace(state, voided=True, revision=state.revision + 1)
            events = [current]
            costs: tuple[int, ...] = (state.cost,)
            signs: tuple[int, ...] = (-1,)
            credit = state.cost if state.charged else 0
            spent = -state.cost
        else:
            amended = dict(state.units)
            for name, value in units.items():
                meter = config.meters.get(name)
                if meter is None or meter.aggregation != "sum":
                    raise UsageError(
                        f"units: {name!r} is not a sum meter (void the event to take a call back)"
                    )
                if meter.dimensions:  # its sub-meters and their prices would no longer add up
                    raise UsageError(f"units: {name!r} has dimensions: void the event and record it again")
                if type(value) is not int or not 0 <= value < MAX_VALUE:
                    raise UsageError(f"units: {name} must be a whole number from 0, got {value!r}")
                amended[name] = value
            if amended == state.units:
                message = f"event {event_id} already has these units"
                return CorrectionResult(event_id, event.customer, action, False, message)
            delta = sum(
                _price(config, event.plan, name) * (int(value) - int(state.units.get(name, 0)))
                for name, value in amended.items()
            )
            cost = max(0, state.cost + delta) if event.billable else state.cost
            new = replace(state, units=amended, cost=cost, revision=state.revision + 1)
            events = [current, replace(event, units=amended)]
            costs, signs = (state.cost, cost), (-1, 1)
            credit = state.cost - cost if state.charged else 0
            spent = cost - state.cost
        entry = None
        if credit:
            kind = "refund" if credit > 0 else "charge"
            entry = LedgerEntry(kind, credit, actor=actor, reason=reason, ref=f"{action}:{event_id}")
        correction = Correction(
            found.shard,
            event.customer,
            event_id,
            raw,
            new.dump(),
            encode_batch(events),
            costs,
            signs,
            entry,
            # The period's spend counted the event's cost (charged or not): it moves with it.
            spent=spent,
            live=event.live,
            period_start=event.period_start,
        )
        if storage.correct_event(correction):
            done = "voided" if units is None else "amended"
            return CorrectionResult(
                event_id, event.customer, action, True, f"event {event_id} {done}", credit
            )
    raise StorageError(f"event {event_id}: its corrections kept changing; try again")


# -- backfill -----------------------------------------------------------------------------------------------

_JSON_FIELDS: Final = frozenset({"id", "timestamp", "customer", "units", "live", "route", "method"})
_CSV_FIELDS: Final = frozenset({"id", "timestamp", "customer", "live", "route", "method"})


def _where(path: Path, line: int, field: str) -> str:
    return f"{path}:{line}: {field}"


def _records(path: Path, fmt: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` of each line; the record's units are under ``units``."""
    with path.open(encoding="utf-8", newline="") as file:
        if fmt == "jsonl":
            for number, line in enumerate(file, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise UsageError(f"{path}:{number}: not a JSON object ({error.msg})") from None
                if not isinstance(record, dict):
                    raise UsageError(f"{path}:{number}: not a JSON object")
                unknown = sorted(set(record) - _JSON_FIELDS)
                if unknown:
                    raise UsageError(f"{_where(path, number, unknown[0])}: unknown field")
                yield number, record
            return
        reader = csv.DictReader(file)
        for row in reader:
            number = reader.line_num
            if None in row or None in row.values():
                raise UsageError(f"{path}:{number}: not as many cells as the header has columns")
            found: dict[str, Any] = {name: row[name] for name in _CSV_FIELDS & set(row) if row[name] != ""}
            units: dict[str, Any] = {}
            for name, cell in row.items():
                if name in _CSV_FIELDS or cell == "":
                    continue
                units[name] = int(cell) if cell.lstrip("-").isdigit() else cell
            found["units"] = units
            if "live" in found:
                found["live"] = {"true": True, "1": True, "false": False, "0": False}.get(
                    found["live"].lower(), found["live"]
                )
            if "timestamp" in found and found["timestamp"].isdigit():
                found["timestamp"] = int(found["timestamp"])
            yield number, found


def _timestamp(value: Any, where: str) -> int:
    if type(value) is int and value >= 0:
        return value
    if isinstance(value, str):
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            return int((when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp() * 1000)
    raise UsageError(f"{where}: must be epoch milliseconds or an ISO 8601 time, got {value!r:.40}")


def parse_import(
    path: str | Path,
    config: Config,
    customer_of: Callable[[str], Customer | None],
    *,
    fmt: str | None = None,
) -> list[UsageEvent]:
    """Read and validate a backfill file (JSONL or CSV): every line, or a ``UsageError`` naming file:line.

    A line holds ``id`` (a UUID; a UUIDv7 gives the time when ``timestamp`` is absent), ``customer``,
    ``units`` (meter -> value; in CSV, one column per meter), and optionally ``timestamp`` (epoch ms or
    ISO 8601), ``live`` (default true), ``route`` and ``method``.
    """
    path = Path(path)
    fmt = fmt or ("csv" if path.suffix.lower() == ".csv" else "jsonl")
    if fmt not in ("jsonl", "csv"):
        raise UsageError(f"format must be jsonl or csv, got {fmt!r}")
    events: list[UsageEvent] = []
    seen: dict[bytes, int] = {}
    customers: dict[str, Customer | None] = {}
    for number, record in _records(path, fmt):

        def where(field: str, number: int = number) -> str:
            return _where(path, number, field)

        raw_id = record.get("id")
        try:
            event_id = uuid.UUID(raw_id) if isinstance(raw_id, str) else None
        except ValueError:
            event_id = None
        if event_id is None:
            raise UsageError(f"{where('id')}: must be a UUID, got {raw_id!r:.40}")
        if event_id.bytes in seen:
            raise UsageError(f"{where('id')}: {event_id} repeats line {seen[event_id.bytes]}")
        seen[event_id.bytes] = number
        if "timestamp" in record:
            timestamp_ms = _timestamp(record["timestamp"], where("timestamp"))
        elif event_id.version == 7:
            timestamp_ms = event_id.int >> 80
        else:
            raise UsageError(f"{where('timestamp')}: missing (the id is not a UUIDv7, so it carries no time)")
        customer_id = record.get("customer")
        if not isinstance(customer_id, str):
            raise UsageError(f"{where('customer')}: must be a customer id, got {customer_id!r:.40}")
        if customer_id not in customers:
            customers[customer_id] = customer_of(customer_id)
        customer = customers[customer_id]
        if customer is None:
            raise UsageError(f"{where('customer')}: no customer {customer_id!r}")
        units = record.get("units")
        if not isinstance(units, dict) or not units:
            raise UsageError(f"{where('units')}: must map meters to values, got {units!r:.40}")
        for name, value in units.items():
            meter = config.meters.get(name)
            if meter is None:
                raise UsageError(f"{where('units.' + name)}: unknown meter")
            if meter.aggregation == "unique":
                if type(value) not in (int, str):
                    raise UsageError(f"{where('units.' + name)}: must be a value, got {value!r:.40}")
            elif type(value) is not int or not 0 <= value < MAX_VALUE:
                raise UsageError(
                    f"{where('units.' + name)}: must be a whole number from 0, got {value!r:.40}"
                )
        live = record.get("live", True)
        if type(live) is not bool:
            raise UsageError(f"{where('live')}: must be true or false, got {live!r:.40}")
        route, method = record.get("route", "import"), record.get("method", "")
        for name, text in (("route", route), ("method", method)):
            if not isinstance(text, str):
                raise UsageError(f"{where(name)}: must be text, got {text!r:.40}")
        plan = config.plans.get(customer.plan) or config.stored.plans.get(customer.plan)
        period = plan.period if plan is not None else "month"
        start, _ = period_bounds(customer.anchor, period, timestamp_ms / 1000)
        events.append(
            UsageEvent(
                id=event_id.bytes,
                timestamp_ms=timestamp_ms,
                customer=customer_id,
                key_id="import",
                plan=customer.plan,
                route=route,
                method=method,
                status=200,
                outcome="success",
                duration_us=0,
                ttfb_us=0,
                units=dict(units),
                billable=True,
                live=live,
                period_start=start,
            )
        )
    return events


def import_events(storage: Storage, events: Iterable[UsageEvent]) -> ImportResult:
    """Append events to their shards' streams, each at most once ever (backfill ids are remembered)."""
    by_shard: dict[int, list[UsageEvent]] = {}
    for event in events:
        by_shard.setdefault(shard_of(event.customer, storage.shards), []).append(event)
    imported = skipped = 0
    for shard, shard_events in by_shard.items():
        for first in range(0, len(shard_events), IMPORT_BATCH):
            chunk = shard_events[first : first + IMPORT_BATCH]
            for _ in range(_ATTEMPTS):
                ids = [str(uuid.UUID(bytes=event.id)) for event in chunk]
                known = storage.imported_entries(shard, ids)
                new = [event for event, event_id in zip(chunk, ids, strict=True) if event_id not in known]
                if not new:
                    skipped += len(chunk)
                    break
                new_ids = [event_id for event_id in ids if event_id not in known]
                if storage.import_events(shard, new_ids, encode_batch(new)):
                    imported += len(new)
                    skipped += len(chunk) - len(new)
                    break
            else:
                raise StorageError("an import kept racing another import of the same events; try again")
    return ImportResult(imported, skipped)
