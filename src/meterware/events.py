"""Usage events and their wire format.

One event per metered call. Events travel in batches: a batch is one msgpack document holding a list of
events; one batch is one entry of a shard's Redis stream, so the stream's throughput is counted in
batches, not events. An event is an array whose first item is its schema version (2: the fields in the
order of ``_FIELDS``); version 1 events, maps with short keys and ``v``, are still read (spools and
streams written before). Arrays encode and decode about twice as fast and take a fifth less room.
Decoding is strict: anything that is not a well-formed event of a known version raises
:class:`EventDecodeError` with the reason, so the worker can move it aside instead of crashing on it.
"""

from __future__ import annotations

import asyncio
import operator
import random
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, starmap
from typing import Any, Final, Literal

import msgpack

SCHEMA_VERSION: Final = 2
#: Events written as maps (``{"v": 1, ...}``), still decoded.
MAP_SCHEMA_VERSION: Final = 1
Outcome = Literal["success", "client_error", "server_error", "aborted", "rejected"]
OUTCOMES: Final[tuple[Outcome, ...]] = ("success", "client_error", "server_error", "aborted", "rejected")
Units = Mapping[str, int | str]


#: An event's route holds at most this many characters (a raw path is cut: the client chose its length).
MAX_ROUTE_LENGTH: Final = 256
#: The methods an event names; any other becomes :data:`OTHER_METHOD` (the client chose it).
HTTP_METHODS: Final = frozenset(
    ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT")
)
OTHER_METHOD: Final = "<other>"


def bounded_route(route: str) -> str:
    """``route`` as an event holds it: cut to :data:`MAX_ROUTE_LENGTH` characters, ending in an ellipsis."""
    return route if len(route) <= MAX_ROUTE_LENGTH else route[: MAX_ROUTE_LENGTH - 1] + "\u2026"


def bounded_method(method: str) -> str:
    """``method`` as an event holds it: a standard one, or :data:`OTHER_METHOD`."""
    return method if method in HTTP_METHODS else OTHER_METHOD


class EventDecodeError(ValueError):
    """A stream entry is not a valid batch of events; the message says why."""


def new_event_id(now_ms: int | None = None) -> bytes:
    """A UUIDv7 (RFC 9562) as 16 bytes: sortable by time, unique across processes."""
    ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    # One draw for both random fields (it runs for every call); the variant bits are cleared from it, then
    # set. `random` is reseeded in forked children, so pre-fork workers never share a sequence.
    value = (ms & 0xFFFF_FFFF_FFFF) << 80 | random.getrandbits(76) & _RANDOM_FIELDS | _VERSION_AND_VARIANT
    return value.to_bytes(16, "big")


#: Where a UUIDv7's random bits go (``rand_a``: 12 bits, ``rand_b``: 62), and its version and variant.
_RANDOM_FIELDS: Final = 0xFFF << 64 | (1 << 62) - 1
_VERSION_AND_VARIANT: Final = 0x7 << 76 | 0b10 << 62


def format_event_id(event_id: bytes) -> str:
    """The canonical text form of an event id."""
    return str(uuid.UUID(bytes=event_id))


@dataclass(slots=True)
class UsageEvent:
    """What happened on one call, as recorded for billing."""

    id: bytes
    timestamp_ms: int
    customer: str
    key_id: str
    plan: str
    route: str
    method: str
    status: int
    outcome: Outcome
    duration_us: int
    ttfb_us: int
    #: Units per meter; a ``unique`` meter holds the observed value (a string). A meter with dimensions
    #: also has its units under one sub-meter of the values reported (``tokens{model=large}``).
    units: dict[str, int | str] = field(default_factory=dict)
    #: Whether the call is charged (successes; client errors if the policy says so).
    billable: bool = False
    live: bool = True
    #: Start of the customer's billing period the call belongs to (epoch seconds).
    period_start: int = 0
    #: Why the call was refused, for rejected calls.
    reason: str = ""
    #: Credits charged for the call, in micro-credits (filled in when the event is settled and read back).
    cost: int = 0
    #: -1 for an event a correction subtracts (set by the rollup from its stream entry; never encoded).
    sign: int = 1


_FIELDS: Final = (
    ("id", "id", bytes),
    ("ts", "timestamp_ms", int),
    ("c", "customer", str),
    ("k", "key_id", str),
    ("p", "plan", str),
    ("r", "route", str),
    ("m", "method", str),
    ("s", "status", int),
    ("o", "outcome", str),
    ("d", "duration_us", int),
    ("f", "ttfb_us", int),
    ("u", "units", dict),
    ("b", "billable", bool),
    ("l", "live", bool),
    ("ps", "period_start", int),
    ("x", "reason", str),
)


#: An event as written: its schema version, then its fields in the order of ``_FIELDS``. The request path
#: builds rows directly (no :class:`UsageEvent` per call), and a batch of rows encodes in one C call.
EventRow = list[Any]


def make_row(
    id: bytes,
    timestamp_ms: int,
    customer: str,
    key_id: str,
    plan: str,
    route: str,
    method: str,
    status: int,
    outcome: Outcome,
    duration_us: int,
    ttfb_us: int,
    units: Units,
    billable: bool,
    live: bool,
    period_start: int,
    reason: str,
) -> EventRow:
    """The row of an event with these fields (what :func:`encode_rows` writes); the one place that knows
    their order, besides ``_FIELDS``."""
    return [
        SCHEMA_VERSION,
        id,
        timestamp_ms,
        customer,
        key_id,
        plan,
        route,
        method,
        status,
        outcome,
        duration_us,
        ttfb_us,
        units,
        billable,
        live,
        period_start,
        reason,
    ]


def event_row(event: UsageEvent) -> EventRow:
    """The row of ``event`` (what :func:`encode_rows` writes)."""
    return make_row(
        event.id,
        event.timestamp_ms,
        event.customer,
        event.key_id,
        event.plan,
        event.route,
        event.method,
        event.status,
        event.outcome,
        event.duration_us,
        event.ttfb_us,
        event.units,
        event.billable,
        event.live,
        event.period_start,
        event.reason,
    )


def encode_rows(rows: Sequence[EventRow]) -> bytes:
    """Encode event rows as one batch (one msgpack document)."""
    return msgpack.packb(rows, use_bin_type=True)


def encode_batch(events: Sequence[UsageEvent]) -> bytes:
    """Encode events as one batch."""
    return encode_rows([event_row(event) for event in events])


async def encode_rows_async(rows: Sequence[EventRow], slice_size: int = 1000) -> bytes:
    """:func:`encode_rows` on an event loop: the same bytes, encoded a slice at a time with a yield in
    between (a msgpack array is its header followed by its items), so a big batch never holds the loop."""
    if len(rows) <= slice_size:
        return encode_rows(rows)
    parts = [msgpack.Packer().pack_array_header(len(rows))]
    for start in range(0, len(rows), slice_size):
        if start:
            await asyncio.sleep(0)
        # Each slice is packed as one array; its header is cut off, leaving the slice's items.
        chunk = rows[start : start + slice_size]
        packed = msgpack.packb(chunk, use_bin_type=True)
        parts.append(packed[len(msgpack.Packer().pack_array_header(len(chunk))) :])
    return b"".join(parts)


#: A decoded batch as columns: one tuple per field, in the order of ``_FIELDS``, each holding a value per
#: event. The rollup folds columns: no :class:`UsageEvent` per event.
EventColumns = tuple[tuple[Any, ...], ...]
#: The position of each field's column in :data:`EventColumns`, by attribute name.
COLUMN: Final = {name: position for position, (_, name, _) in enumerate(_FIELDS)}

# The rollup decodes every event: the happy path checks a whole batch column by column, in C, and only a
# batch that fails it (or holds version 1 maps) is checked event by event, which names what is wrong.
_KEYS: Final = tuple(short for short, _, _ in _FIELDS)
_TYPES: Final = tuple(kind for _, _, kind in _FIELDS)
_values_of: Final = operator.itemgetter(*_KEYS)
_OUTCOME_SET: Final = frozenset(OUTCOMES)
_ROW_LENGTH: Final = len(_FIELDS) + 1
_TEXT_COLUMNS: Final = tuple(position + 1 for position, kind in enumerate(_TYPES) if kind is str)
_TYPED_COLUMNS: Final = tuple(
    (position + 1, {kind}) for position, kind in enumerate(_TYPES) if kind is not str
)
_ID: Final = COLUMN["id"] + 1
_OUTCOME: Final = COLUMN["outcome"] + 1
_UNITS: Final = COLUMN["units"] + 1
_UNIT_TYPES: Final = frozenset({int, str})
_EMPTY: Final[EventColumns] = ((),) * len(_FIELDS)


def _values(raw: Any, index: int) -> Sequence[Any]:
    """The field values of one event (in the order of ``_FIELDS``), checked; or why it is not one."""
    if type(raw) is list:
        if not raw or raw[0] != SCHEMA_VERSION:
            version = raw[0] if raw else None
            raise EventDecodeError(f"event {index}: unknown schema version {version!r:.40}")
        if len(raw) != _ROW_LENGTH:
            raise EventDecodeError(f"event {index}: expected {len(_FIELDS)} fields, got {len(raw) - 1}")
        return _checked(raw[1:], index)
    if type(raw) is not dict:
        raise EventDecodeError(f"event {index}: expected an array or a map, got {type(raw).__name__}")
    version = raw.get("v")
    if version != MAP_SCHEMA_VERSION:
        raise EventDecodeError(f"event {index}: unknown schema version {version!r:.40}")
    try:
        values = _values_of(raw)
    except KeyError as missing:
        raise EventDecodeError(f"event {index}: field {missing.args[0]!r} is missing") from None
    return _checked(values, index)


def _checked(values: Sequence[Any], index: int) -> Sequence[Any]:
    """``values`` (in the order of ``_FIELDS``), once each is of the right type and shape."""
    if tuple(map(type, values)) != _TYPES:
        for (short, _, kind), value in zip(_FIELDS, values, strict=True):
            if type(value) is not kind:
                raise EventDecodeError(
                    f"event {index}: field {short!r} must be {kind.__name__}, got {value!r:.40}"
                )
    if len(values[0]) != 16:
        raise EventDecodeError(f"event {index}: id must be 16 bytes")
    if values[8] not in _OUTCOME_SET:
        raise EventDecodeError(f"event {index}: unknown outcome {values[8]!r:.40}")
    for meter, units in values[11].items():
        if type(meter) is not str or type(units) not in (int, str):
            raise EventDecodeError(f"event {index}: bad units entry {meter!r:.40}")
    return values


def _well_formed(rows: tuple[Any, ...]) -> list[tuple[Any, ...]] | None:
    """The columns of ``rows`` (arrays decoded as tuples, version first) if they are all well-formed
    version 2 events, else None."""
    if set(map(type, rows)) != {tuple} or set(map(len, rows)) != {_ROW_LENGTH}:
        return None
    columns = list(zip(*rows, strict=True))
    if columns[0].count(SCHEMA_VERSION) != len(rows):
        return None
    try:
        # join() refuses anything but text (msgpack only makes plain str), at C speed.
        for position in _TEXT_COLUMNS:
            "".join(columns[position])
        "".join(chain.from_iterable(columns[_UNITS]))
    except TypeError:
        return None
    if any(set(map(type, columns[position])) != kinds for position, kinds in _TYPED_COLUMNS):
        return None
    units = chain.from_iterable(map(dict.values, columns[_UNITS]))
    if set(map(len, columns[_ID])) != {16} or not set(map(type, units)) <= _UNIT_TYPES:
        return None
    return columns if _OUTCOME_SET.issuperset(columns[_OUTCOME]) else None


def decode_columns(payload: bytes) -> EventColumns:
    """Decode one batch into columns; raise :class:`EventDecodeError` saying what is wrong with it."""
    try:
        # Tuples decode faster than lists; a batch that is not well-formed is decoded again as lists,
        # and its reason names values as they were written.
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=True, use_list=False)
    except Exception as error:  # msgpack raises several unrelated types for bad input
        raise EventDecodeError(f"not a msgpack document ({type(error).__name__}: {error})") from None
    if raw == ():
        return _EMPTY
    columns = _well_formed(raw) if type(raw) is tuple else None
    if columns is not None:
        return tuple(columns[1:])
    raw = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    if not isinstance(raw, list):
        raise EventDecodeError(f"expected a list of events, got {type(raw).__name__}")
    return tuple(zip(*(_values(item, index) for index, item in enumerate(raw)), strict=True))


def decode_batch(payload: bytes) -> list[UsageEvent]:
    """Decode one batch; raise :class:`EventDecodeError` saying what is wrong with it."""
    # _FIELDS follows the order of UsageEvent's fields.
    return list(starmap(UsageEvent, zip(*decode_columns(payload), strict=True)))
