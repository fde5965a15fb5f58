"""Invoices, alerts and export marks."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from meterware.errors import NotFoundError, StorageError
from meterware.storage import _keyspace as ks
from meterware.storage.base import (
    ALERTS_MAXLEN,
    Billed,
    CloseResult,
    ExportMark,
    ExportMarks,
    StreamEntry,
)
from meterware.storage.redis._connection import Connection
from meterware.storage.redis._scripts import Arg, Fields, as_str, stream_entries


def billed_from(fields: Fields) -> Billed:
    """What closed invoices billed, from the customer's billed hash (``v`` and one field per period)."""
    periods = {int(name): as_str(value) for name, value in fields.items() if as_str(name).isdigit()}
    return Billed(int(fields.get(b"v", 0)), periods)


def _export_mark(text: bytes | str) -> ExportMark:
    total, revision, value, confirmed = as_str(text).split()
    return ExportMark(int(total), int(revision), int(value), confirmed == "1")


class InvoiceCommands(Connection):
    """Frozen invoices of :class:`~meterware.storage.redis.RedisStorage`."""

    def read_billed(self, customer_id: str) -> Billed:
        key = ks.billed(self._shard(customer_id), customer_id)
        with self._call() as client:
            fields = client.hgetall(key)
        try:
            return billed_from(fields)
        except ValueError:
            where = self._errors.where
            raise StorageError(f"Redis at {where}: BADVALUE {key} field v is not an integer") from None

    def read_invoice(self, customer_id: str, period_start: int) -> str | None:
        with self._call() as client:
            invoice = client.get(ks.invoice(self._shard(customer_id), customer_id, period_start))
        return None if invoice is None else as_str(invoice)

    def close_period(
        self, customer_id: str, period_start: int, invoice: str, billed: Mapping[int, str], version: int
    ) -> CloseResult:
        shard = self._shard(customer_id)
        keys = [ks.invoice(shard, customer_id, period_start), ks.billed(shard, customer_id)]
        args: list[Arg] = [invoice, version]
        for start, record in billed.items():
            args += [start, record]
        with self._call():
            reply = int(self._run("close_period", keys, args))
        return "closed" if reply == 1 else "exists" if reply == 0 else "conflict"


class ExportCommands(Connection):
    """Export marks and cursors of :class:`~meterware.storage.redis.RedisStorage`."""

    def set_external_id(self, customer_id: str, provider: str, external_id: str | None) -> None:
        shard = self._shard(customer_id)
        with self._call() as client:
            if not client.exists(ks.customer(shard, customer_id)):
                raise NotFoundError(f"no customer {customer_id!r}")
            if external_id is None:
                client.hdel(ks.external_ids(shard, customer_id), provider)
            else:
                client.hset(ks.external_ids(shard, customer_id), provider, external_id)

    def get_external_ids(self, customer_id: str) -> dict[str, str]:
        with self._call() as client:
            ids = client.hgetall(ks.external_ids(self._shard(customer_id), customer_id))
        return {as_str(provider): as_str(external) for provider, external in ids.items()}

    def read_export_marks(
        self, provider: str, customer_id: str, window: str, starts: Sequence[int]
    ) -> dict[int, dict[str, ExportMark]]:
        if not starts:
            return {}
        shard = self._shard(customer_id)
        with self._call() as client:
            pipe = client.pipeline(transaction=False)
            for start in starts:
                pipe.hgetall(ks.export_marks(shard, provider, customer_id, window, start))
            replies = pipe.execute()
        marks: dict[int, dict[str, ExportMark]] = {}
        for start, fields in zip(starts, replies, strict=True):
            if fields:
                marks[start] = {as_str(meter): _export_mark(text) for meter, text in fields.items()}
        return marks

    def write_export_marks(
        self, provider: str, customer_id: str, window: str, marks: ExportMarks, ttl: int
    ) -> None:
        shard = self._shard(customer_id)
        with self._call() as client:
            pipe = client.pipeline(transaction=False)
            for start, meters in marks.items():
                key = ks.export_marks(shard, provider, customer_id, window, start)
                kept = {
                    meter: f"{m.total} {m.revision} {m.value} {int(m.confirmed)}"
                    for meter, m in meters.items()
                    if m is not None
                }
                dropped = [meter for meter, mark in meters.items() if mark is None]
                if kept:
                    pipe.hset(key, mapping=kept)  # type: ignore[arg-type]  # str values are fine
                if dropped:
                    pipe.hdel(key, *dropped)
                if ttl > 0:
                    pipe.expire(key, ttl)
            pipe.execute()

    def read_export_cursor(self, provider: str, customer_id: str, window: str) -> int | None:
        with self._call() as client:
            end = client.get(ks.export_cursor(self._shard(customer_id), provider, customer_id, window))
        return None if end is None else int(end)

    def write_export_cursor(self, provider: str, customer_id: str, window: str, end: int) -> None:
        with self._call() as client:
            client.set(ks.export_cursor(self._shard(customer_id), provider, customer_id, window), end)


class AlertCommands(Connection):
    """Alert rules, destinations and fired alerts of :class:`~meterware.storage.redis.RedisStorage`."""

    def set_alert_rules(self, customer_id: str, rules: str | None) -> None:
        self._set_customer_string(customer_id, ks.alert_rules, rules)

    def get_alert_rules(self, customer_id: str) -> str | None:
        with self._call() as client:
            rules = client.get(ks.alert_rules(self._shard(customer_id), customer_id))
        return None if rules is None else as_str(rules)

    def set_alert_destinations(self, customer_id: str, destinations: str | None) -> None:
        self._set_customer_string(customer_id, ks.alert_destinations, destinations)

    def get_alert_destinations(self, customer_id: str) -> str | None:
        with self._call() as client:
            destinations = client.get(ks.alert_destinations(self._shard(customer_id), customer_id))
        return None if destinations is None else as_str(destinations)

    def _set_customer_string(
        self, customer_id: str, key_of: Callable[[int, str], str], value: str | None
    ) -> None:
        """Set (None: delete) a string of an existing customer's."""
        shard = self._shard(customer_id)
        with self._call() as client:
            if not client.exists(ks.customer(shard, customer_id)):
                raise NotFoundError(f"no customer {customer_id!r}")
            if value is None:
                client.delete(key_of(shard, customer_id))
            else:
                client.set(key_of(shard, customer_id), value)

    def fire_alert(
        self, customer_id: str, name: str, expires_at: int, fields: Mapping[str, str]
    ) -> str | None:
        shard = self._shard(customer_id)
        keys = [ks.alert_fired(shard, customer_id, name), ks.alerts(shard)]
        args: list[Arg] = [expires_at, ALERTS_MAXLEN]
        args += [item for pair in fields.items() for item in pair]
        with self._call():
            entry_id = self._run("fire_alert", keys, args)
        return None if not entry_id else as_str(entry_id)

    def read_alerts(self, shard: int, after: str, count: int) -> list[StreamEntry]:
        if count <= 0:
            return []
        with self._call() as client:
            return stream_entries(client.xrange(ks.alerts(shard), min=f"({after}", max="+", count=count))


class PortalCommands(Connection):
    """The portal's one-use markers of :class:`~meterware.storage.redis.RedisStorage`."""

    def use_once(self, customer_id: str, token_id: str, expires_ms: int) -> bool:
        key = ks.portal_marker(self._shard(customer_id), customer_id, token_id)
        with self._call() as client:
            return bool(client.set(key, 1, nx=True, pxat=max(1, expires_ms)))

    def is_used(self, customer_id: str, token_id: str) -> bool:
        key = ks.portal_marker(self._shard(customer_id), customer_id, token_id)
        with self._call() as client:
            return bool(client.exists(key))
