"""The in-process backend's invoices, alerts, export marks and portal link markers."""

from __future__ import annotations

import bisect
import time
from collections.abc import Mapping, Sequence

from meterware.storage._keyspace import shard_of
from meterware.storage.base import (
    ALERTS_MAXLEN,
    Billed,
    CloseResult,
    ExportMark,
    ExportMarks,
    StreamEntry,
)
from meterware.storage.memory._state import (
    MemoryState,
    entry_id_key,
    id_tuple,
)


class InvoiceMixin(MemoryState):
    """Frozen invoices."""

    def read_billed(self, customer_id: str) -> Billed:
        with self._lock:
            return self._billed.get(customer_id, Billed())

    def read_invoice(self, customer_id: str, period_start: int) -> str | None:
        with self._lock:
            return self._invoices.get((customer_id, period_start))

    def close_period(
        self, customer_id: str, period_start: int, invoice: str, billed: Mapping[int, str], version: int
    ) -> CloseResult:
        with self._lock:
            if (customer_id, period_start) in self._invoices:
                return "exists"
            current = self._billed.get(customer_id, Billed())
            if current.version != version:
                return "conflict"
            self._invoices[(customer_id, period_start)] = invoice
            self._billed[customer_id] = Billed(version + 1, {**current.periods, **billed})
            return "closed"


class AlertMixin(MemoryState):
    """Alert rules, destinations and fired alerts."""

    def set_alert_rules(self, customer_id: str, rules: str | None) -> None:
        with self._lock:
            self._account(customer_id)
            if rules is None:
                self._alert_rules.pop(customer_id, None)
            else:
                self._alert_rules[customer_id] = rules

    def get_alert_rules(self, customer_id: str) -> str | None:
        with self._lock:
            return self._alert_rules.get(customer_id)

    def set_alert_destinations(self, customer_id: str, destinations: str | None) -> None:
        with self._lock:
            self._account(customer_id)
            if destinations is None:
                self._alert_destinations.pop(customer_id, None)
            else:
                self._alert_destinations[customer_id] = destinations

    def get_alert_destinations(self, customer_id: str) -> str | None:
        with self._lock:
            return self._alert_destinations.get(customer_id)

    def fire_alert(
        self, customer_id: str, name: str, expires_at: int, fields: Mapping[str, str]
    ) -> str | None:
        with self._lock:
            marker = (customer_id, name)
            if self._alerts_fired.get(marker, 0) > time.time():
                return None
            encoded = {key.encode(): value.encode() for key, value in fields.items()}
            state = self._shards[shard_of(customer_id, self.shards)]
            entry = StreamEntry(state.next_id(), encoded)
            state.alerts.append(entry)
            del state.alerts[:-ALERTS_MAXLEN]
            self._alerts_fired[marker] = expires_at
            return entry.entry_id

    def read_alerts(self, shard: int, after: str, count: int) -> list[StreamEntry]:
        with self._lock:
            alerts = self._shards[shard].alerts
            start = bisect.bisect_right(alerts, id_tuple(after), key=entry_id_key)
            return alerts[start : start + max(0, count)]


class ExportMixin(MemoryState):
    """Export ids, marks and cursors."""

    def set_external_id(self, customer_id: str, provider: str, external_id: str | None) -> None:
        with self._lock:
            self._account(customer_id)
            if external_id is None:
                self._external_ids[customer_id].pop(provider, None)
            else:
                self._external_ids[customer_id][provider] = external_id

    def get_external_ids(self, customer_id: str) -> dict[str, str]:
        with self._lock:
            return dict(self._external_ids.get(customer_id, {}))

    def read_export_marks(
        self, provider: str, customer_id: str, window: str, starts: Sequence[int]
    ) -> dict[int, dict[str, ExportMark]]:
        with self._lock:
            marks = self._export_marks
            found = {start: marks.get((provider, customer_id, window, start)) for start in starts}
            return {start: dict(held) for start, held in found.items() if held}

    def write_export_marks(
        self, provider: str, customer_id: str, window: str, marks: ExportMarks, ttl: int
    ) -> None:
        with self._lock:
            for start, meters in marks.items():
                stored = self._export_marks[(provider, customer_id, window, start)]
                for meter, mark in meters.items():
                    if mark is None:
                        stored.pop(meter, None)
                    else:
                        stored[meter] = mark

    def read_export_cursor(self, provider: str, customer_id: str, window: str) -> int | None:
        with self._lock:
            return self._export_cursors.get((provider, customer_id, window))

    def write_export_cursor(self, provider: str, customer_id: str, window: str, end: int) -> None:
        with self._lock:
            self._export_cursors[(provider, customer_id, window)] = end


class PortalMixin(MemoryState):
    """The portal's one-use markers."""

    def use_once(self, customer_id: str, token_id: str, expires_ms: int) -> bool:
        now_ms = time.time_ns() // 1_000_000
        with self._lock:
            marker = (customer_id, token_id)
            if self._used_links.get(marker, 0) > now_ms:
                return False
            self._mark_used(marker, expires_ms)
            return True

    def is_used(self, customer_id: str, token_id: str) -> bool:
        with self._lock:
            return self._used_links.get((customer_id, token_id), 0) > time.time_ns() // 1_000_000
