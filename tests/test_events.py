"""Usage events: the batch codec, sortable event ids, and strict decoding of garbage."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterware.events import (
    OUTCOMES,
    SCHEMA_VERSION,
    EventDecodeError,
    UsageEvent,
    decode_batch,
    decode_columns,
    encode_batch,
    encode_rows_async,
    event_row,
    format_event_id,
    new_event_id,
)

MS_2026 = 1_767_225_600_000  # 2026-01-01T00:00:00Z in milliseconds
EVENT_ID = new_event_id(MS_2026)


def sample_event(**changes: Any) -> UsageEvent:
    event = UsageEvent(
        id=EVENT_ID,
        timestamp_ms=MS_2026,
        customer="acme",
        key_id="key_0123456789abcdef",
        plan="pro",
        route="/v1/chat",
        method="POST",
        status=200,
        outcome="success",
        duration_us=1500,
        ttfb_us=700,
        units={"calls": 1, "tokens": 42, "users": "u-1"},
        billable=True,
        live=True,
        period_start=1_767_225_600,
        reason="",
    )
    return replace(event, **changes)


def sample_map(**changes: Any) -> dict[str, Any]:
    """The sample event as version 1 wrote it (a map), with some fields changed (None removes a field)."""
    (row,) = msgpack.unpackb(encode_batch([sample_event()]), raw=False)
    keys = ["id", "ts", "c", "k", "p", "r", "m", "s", "o", "d", "f", "u", "b", "l", "ps", "x"]
    raw = {"v": 1, **dict(zip(keys, row[1:], strict=True))} | changes
    return {key: value for key, value in raw.items() if value is not None}


def sample_row(**changes: Any) -> list[Any]:
    """The sample event as written now (an array after its version), with some fields changed."""
    (row,) = msgpack.unpackb(encode_batch([sample_event()]), raw=False)
    keys = ["v", "id", "ts", "c", "k", "p", "r", "m", "s", "o", "d", "f", "u", "b", "l", "ps", "x"]
    return [changes.get(key, value) for key, value in zip(keys, row, strict=True)]


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


# -- round trip ----------------------------------------------------------------------------------------

_int64 = st.integers(-(2**63), 2**63 - 1)
_text = st.text(max_size=40)
_units = st.dictionaries(_text, st.one_of(_int64, _text), max_size=5)
_events = st.builds(
    UsageEvent,
    id=st.binary(min_size=16, max_size=16),
    timestamp_ms=_int64,
    customer=_text,
    key_id=_text,
    plan=_text,
    route=_text,
    method=_text,
    status=_int64,
    outcome=st.sampled_from(OUTCOMES),
    duration_us=_int64,
    ttfb_us=_int64,
    units=_units,
    billable=st.booleans(),
    live=st.booleans(),
    period_start=_int64,
    reason=_text,
    cost=st.just(0),
)


@given(st.lists(_events, max_size=5))
def test_codec_round_trip(events: list[UsageEvent]) -> None:
    """decode_batch(encode_batch(events)) gives back the same events, in order."""
    assert decode_batch(encode_batch(events)) == events


@given(st.lists(_events, max_size=12), st.integers(min_value=1, max_value=5))
def test_encoding_on_an_event_loop_gives_the_same_bytes(events: list[UsageEvent], slice_size: int) -> None:
    """encode_rows_async (a slice at a time, yielding between) writes exactly encode_batch's bytes."""
    rows = [event_row(event) for event in events]
    assert asyncio.run(encode_rows_async(rows, slice_size)) == encode_batch(events)


def test_encoded_batch_is_a_msgpack_list_of_versioned_arrays() -> None:
    """A batch is one msgpack list of arrays, each its schema version then the 16 fields in order."""
    raw = msgpack.unpackb(encode_batch([sample_event(), sample_event(status=404)]), raw=False)
    assert [item[0] for item in raw] == [SCHEMA_VERSION, SCHEMA_VERSION] == [2, 2]
    assert [len(item) for item in raw] == [17, 17]
    assert raw[1][8] == 404


def test_version_1_maps_still_decode() -> None:
    """Events written as maps before (spools, streams) decode to the same events."""
    assert decode_batch(pack([sample_map(), sample_map(s=404)])) == [sample_event(), sample_event(status=404)]
    assert decode_batch(pack([sample_map(), sample_row()])) == [sample_event(), sample_event()]


def test_empty_batch_round_trips() -> None:
    """An empty batch decodes to an empty list."""
    assert decode_batch(encode_batch([])) == []


def test_cost_is_not_on_the_wire() -> None:
    """The cost is filled in at settlement, so an encoded event always decodes with cost 0."""
    assert decode_batch(encode_batch([sample_event(cost=5)])) == [sample_event(cost=0)]


# -- event ids -----------------------------------------------------------------------------------------


def test_event_id_is_uuid_version_7() -> None:
    """Event ids are 16-byte RFC 9562 UUIDv7s with the time in the first 48 bits."""
    event_id = new_event_id(MS_2026)
    value = uuid.UUID(bytes=event_id)
    assert len(event_id) == 16
    assert value.version == 7
    assert value.variant == uuid.RFC_4122
    assert int.from_bytes(event_id[:6], "big") == MS_2026


def test_event_id_defaults_to_now() -> None:
    """Without a time, the id carries the current millisecond."""
    before = time.time_ns() // 1_000_000
    stamp = int.from_bytes(new_event_id()[:6], "big")
    after = time.time_ns() // 1_000_000
    assert before <= stamp <= after


def test_event_ids_sort_by_millisecond() -> None:
    """Ids of later milliseconds sort after earlier ones, as bytes and as text."""
    ids = [new_event_id(MS_2026 + offset) for offset in (0, 1, 2, 1000, 86_400_000)]
    assert sorted(ids) == ids
    texts = [format_event_id(event_id) for event_id in ids]
    assert sorted(texts) == texts


def test_event_ids_are_unique_within_one_millisecond() -> None:
    """Ids of the same millisecond differ (74 random bits)."""
    ids = {new_event_id(MS_2026) for _ in range(20_000)}
    assert len(ids) == 20_000


def test_format_event_id_is_canonical_uuid_text() -> None:
    """format_event_id gives the 36-character hyphenated form with the version digit 7."""
    text = format_event_id(new_event_id(MS_2026))
    assert len(text) == 36
    assert text[14] == "7"
    assert text[19] in "89ab"
    assert uuid.UUID(text).bytes[:6] == MS_2026.to_bytes(6, "big")


# -- garbage -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        pytest.param(b"", "not a msgpack document", id="empty-bytes"),
        pytest.param(b"\xc1", "not a msgpack document (FormatError", id="reserved-byte"),
        pytest.param(b"\x92\x01", "not a msgpack document", id="truncated"),
        pytest.param(b"\x90\x90", "not a msgpack document (ExtraData", id="extra-data"),
        pytest.param(b"\xd9\x01\xff", "not a msgpack document (UnicodeDecodeError", id="bad-utf8"),
        pytest.param(pack([{1: 2}]), "not a msgpack document (ValueError", id="int-map-key"),
        pytest.param(b"not msgpack at all", "not a msgpack document", id="text"),
        pytest.param(pack({"v": 1}), "expected a list of events, got dict", id="map"),
        pytest.param(pack("events"), "expected a list of events, got str", id="string"),
        pytest.param(pack(7), "expected a list of events, got int", id="int"),
        pytest.param(pack([sample_map(), 5]), "event 1: expected an array or a map, got int", id="item-int"),
        pytest.param(pack([[1, 2]]), "event 0: unknown schema version 1", id="array-version-1"),
        pytest.param(pack([[]]), "event 0: unknown schema version None", id="array-empty"),
        pytest.param(pack([[2, 1]]), "event 0: expected 16 fields, got 1", id="array-short"),
        pytest.param(pack([[*sample_row(), 0]]), "event 0: expected 16 fields, got 17", id="array-long"),
        pytest.param(
            pack([sample_row(ts="now")]), "event 0: field 'ts' must be int, got 'now'", id="array-ts-string"
        ),
        pytest.param(pack([sample_row(o="ok")]), "event 0: unknown outcome 'ok'", id="array-unknown-outcome"),
        pytest.param(pack([sample_map(v=2)]), "event 0: unknown schema version 2", id="version-2"),
        pytest.param(
            pack([sample_map(v=None)]), "event 0: unknown schema version None", id="version-missing"
        ),
        pytest.param(pack([sample_map(v="1")]), "event 0: unknown schema version '1'", id="version-string"),
        pytest.param(
            pack([sample_map(ts="now")]), "event 0: field 'ts' must be int, got 'now'", id="ts-string"
        ),
        pytest.param(pack([sample_map(ts=1.5)]), "event 0: field 'ts' must be int, got 1.5", id="ts-float"),
        pytest.param(
            pack([sample_map(s=True)]), "event 0: field 's' must be int, got True", id="status-bool"
        ),
        pytest.param(pack([sample_map(b=1)]), "event 0: field 'b' must be bool, got 1", id="billable-int"),
        pytest.param(
            pack([sample_map(c=b"acme")]), "event 0: field 'c' must be str, got b'acme'", id="customer-bytes"
        ),
        pytest.param(pack([sample_map(id="x" * 16)]), "event 0: field 'id' must be bytes", id="id-string"),
        pytest.param(pack([sample_map(u=[1])]), "event 0: field 'u' must be dict, got [1]", id="units-list"),
        pytest.param(pack([sample_map(x=None)]), "event 0: field 'x' is missing", id="reason-missing"),
        pytest.param(pack([sample_map(id=b"\x00" * 15)]), "event 0: id must be 16 bytes", id="id-15-bytes"),
        pytest.param(pack([sample_map(id=b"\x00" * 17)]), "event 0: id must be 16 bytes", id="id-17-bytes"),
        pytest.param(pack([sample_map(o="ok")]), "event 0: unknown outcome 'ok'", id="unknown-outcome"),
        pytest.param(
            pack([sample_map(u={"tokens": 1.5})]), "event 0: bad units entry 'tokens'", id="units-float"
        ),
        pytest.param(
            pack([sample_map(u={"tokens": None})]), "event 0: bad units entry 'tokens'", id="units-none"
        ),
        pytest.param(
            pack([sample_map(u={"tokens": True})]), "event 0: bad units entry 'tokens'", id="units-bool"
        ),
        pytest.param(
            pack([sample_map(u={"tokens": [1]})]), "event 0: bad units entry 'tokens'", id="units-list"
        ),
        pytest.param(
            pack([sample_map(u={b"tokens": 1})]), "event 0: bad units entry b'tokens'", id="units-bytes-key"
        ),
        pytest.param(
            pack([sample_map(), sample_map(o="lost")]), "event 1: unknown outcome 'lost'", id="second-bad"
        ),
    ],
)
def test_garbage_raises_event_decode_error_with_reason(payload: bytes, reason: str) -> None:
    """Anything that is not a batch of valid events (version 2 arrays, version 1 maps) raises
    EventDecodeError saying why."""
    with pytest.raises(EventDecodeError) as caught:
        decode_batch(payload)
    assert str(caught.value).startswith(reason)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        pytest.param({"v": 3}, "unknown schema version 3", id="version-3"),
        pytest.param({"v": True}, "unknown schema version True", id="version-true"),
        pytest.param({"ts": 1.5}, "field 'ts' must be int, got 1.5", id="ts-float"),
        pytest.param({"s": True}, "field 's' must be int, got True", id="status-bool"),
        pytest.param({"b": 1}, "field 'b' must be bool, got 1", id="billable-int"),
        pytest.param({"l": None}, "field 'l' must be bool, got None", id="live-none"),
        pytest.param({"c": b"acme"}, "field 'c' must be str, got b'acme'", id="customer-bytes"),
        pytest.param({"x": 0}, "field 'x' must be str, got 0", id="reason-int"),
        pytest.param({"id": "x" * 16}, "field 'id' must be bytes", id="id-string"),
        pytest.param({"id": b"\x00" * 15}, "id must be 16 bytes", id="id-15-bytes"),
        pytest.param({"u": "calls"}, "field 'u' must be dict, got 'calls'", id="units-string"),
        pytest.param({"u": [1]}, "field 'u' must be dict, got [1]", id="units-list"),
        pytest.param({"u": {"tokens": True}}, "bad units entry 'tokens'", id="units-bool"),
        pytest.param({"u": {"tokens": 1.5}}, "bad units entry 'tokens'", id="units-float"),
        pytest.param({"u": {b"tokens": 1}}, "bad units entry b'tokens'", id="units-bytes-key"),
        pytest.param({"o": "lost"}, "unknown outcome 'lost'", id="unknown-outcome"),
    ],
)
def test_a_bad_event_among_good_arrays_is_named(changes: dict[str, Any], reason: str) -> None:
    """However a batch of arrays is checked (whole columns at once first), the first bad event is named
    with what is wrong with it."""
    bad = sample_row(**changes)
    for batch, index in (([sample_row(), sample_row(), bad], 2), ([bad, sample_row(o="lost")], 0)):
        with pytest.raises(EventDecodeError) as caught:
            decode_batch(pack(batch))
        assert str(caught.value).startswith(f"event {index}: {reason}")


@given(st.lists(_events, min_size=1, max_size=8))
def test_columns_hold_the_events_fields_in_order(events: list[UsageEvent]) -> None:
    """decode_columns gives one column per field, the same from arrays and from version 1 maps."""
    fields = [name for name in UsageEvent.__slots__ if name not in ("cost", "sign")]  # type: ignore[attr-defined]
    expected = tuple(tuple(getattr(event, name) for event in events) for name in fields)
    assert decode_columns(encode_batch(events)) == expected
    keys = ["id", "ts", "c", "k", "p", "r", "m", "s", "o", "d", "f", "u", "b", "l", "ps", "x"]
    maps = [{"v": 1, **dict(zip(keys, row[1:], strict=True))} for row in map(event_row, events)]
    assert decode_columns(pack(maps)) == expected


def test_long_garbage_values_are_truncated_in_the_reason() -> None:
    """A huge bad value is cut short in the reason, so dead letters stay small."""
    with pytest.raises(EventDecodeError) as caught:
        decode_batch(pack([sample_map(ts="x" * 10_000)]))
    assert len(str(caught.value)) < 100


@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_event_decode_error(payload: bytes) -> None:
    """decode_batch never raises anything but EventDecodeError, whatever the bytes."""
    try:
        events = decode_batch(payload)
    except EventDecodeError:
        return
    assert all(isinstance(event, UsageEvent) for event in events)
