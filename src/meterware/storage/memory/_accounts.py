"""The in-process backend's customers, keys, balances, credits ledger and corrections."""

from __future__ import annotations

import bisect
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace

from meterware.errors import NotFoundError
from meterware.metering.records import Customer, KeyRecord
from meterware.storage._keyspace import SPENT_FIELD, check_customer_id, shard_of
from meterware.storage.base import (
    Balance,
    Correction,
    LedgerEntry,
    StreamEntry,
    Window,
    default_grant,
)
from meterware.storage.memory._state import (
    Account,
    MemoryState,
    id_tuple,
    ledger_id_key,
)


class AccountMixin(MemoryState):
    """Customers, keys and balances."""

    def create_customer(self, customer: Customer) -> None:
        check_customer_id(customer.id)
        with self._lock:
            if customer.id in self._accounts:
                raise ValueError(f"customer {customer.id!r} already exists")
            self._accounts[customer.id] = Account(customer)

    def get_customer(self, customer_id: str) -> Customer | None:
        with self._lock:
            account = self._accounts.get(customer_id)
            return account.customer if account else None

    def update_customer(
        self,
        customer_id: str,
        *,
        plan: str | None = None,
        status: str | None = None,
        spend_cap: int | None = None,
    ) -> None:
        check_customer_id(customer_id)
        with self._lock:
            account = self._account(customer_id)
            customer = account.customer
            if spend_cap is not None:
                customer = replace(customer, spend_cap=None if spend_cap < 0 else spend_cap)
            account.customer = replace(
                customer,
                plan=plan or customer.plan,
                status=status or customer.status,  # type: ignore[arg-type]
            )

    def swap_customer_terms(self, customer_id: str, expected: str, terms: str) -> bool:
        check_customer_id(customer_id)
        with self._lock:
            account = self._account(customer_id)
            if account.customer.terms != expected:
                return False
            account.customer = replace(account.customer, terms=terms)
            return True

    def list_customers(self) -> list[str]:
        with self._lock:
            return sorted(self._accounts)

    def stored_plans(self) -> dict[str, str]:
        with self._lock:
            return dict(self._stored_plans)

    def swap_stored_plan(self, name: str, expected: str, record: str) -> bool:
        with self._lock:
            if self._stored_plans.get(name, "") != expected:
                return False
            self._stored_plans[name] = record
            return True

    def add_key(self, record: KeyRecord, key_hash: str) -> None:
        with self._lock:
            account = self._account(record.customer)
            if key_hash in self._key_ids_by_hash:  # as add_key_hash.lua: the first key keeps its hash
                raise ValueError("a key with this hash exists already")
            self._keys[record.key_id] = record
            self._key_ids_by_hash[key_hash] = record.key_id
            account.keys.append(record.key_id)

    def get_key(self, key_id: str) -> KeyRecord | None:
        with self._lock:
            return self._keys.get(key_id)

    def list_keys(self, customer_id: str) -> list[KeyRecord]:
        with self._lock:
            return [self._keys[key_id] for key_id in self._account(customer_id).keys]

    def set_key_state(self, key_id: str, *, status: str | None = None, expires_ms: int | None = None) -> None:
        with self._lock:
            record = self._keys.get(key_id)
            if record is None:
                raise NotFoundError(f"no key {key_id!r}")
            self._keys[key_id] = replace(
                record,
                status=status or record.status,  # type: ignore[arg-type]
                expires_ms=record.expires_ms if expires_ms is None else expires_ms,
            )

    def take_key_uses(self, key_id: str, expires_ms: int) -> int | None:
        with self._lock:
            # As take_key_uses.lua: one clock (read under the lock) says whether it has expired, and
            # stops it no later than now, so the later of two rotations finds it expired.
            now_ms = time.time_ns() // 1_000_000
            record = self._keys.get(key_id)
            if (
                record is None
                or record.status != "active"
                or record.remaining is None
                or 0 < record.expires_ms <= now_ms
            ):
                return None
            self._keys[key_id] = replace(record, remaining=0, expires_ms=min(expires_ms, now_ms))
            return record.remaining

    def record_key_use(self, uses: Mapping[str, int]) -> None:
        with self._lock:
            for key_id, used_ms in uses.items():
                record = self._keys.get(key_id)
                if record is not None and used_ms > record.last_used_ms:
                    self._keys[key_id] = replace(record, last_used_ms=used_ms)

    def get_balance(self, customer_id: str) -> Balance:
        with self._lock:
            account = self._account(customer_id)
            return Balance(account.balance, account.reserved)

    def read_usage(self, customer_id: str, live: bool, window: str, start: int) -> dict[str, int]:
        return self.read_usage_windows(customer_id, live, window, [start])[0]

    def read_usage_windows(
        self, customer_id: str, live: bool, window: str, starts: Sequence[int]
    ) -> list[dict[str, int]]:
        found: list[dict[str, int]] = []
        with self._lock:
            for start in starts:
                usage = self._usage.get(Window(live, customer_id, window, start))
                if usage is None:
                    found.append({})
                    continue
                totals = dict(usage.sums) | usage.maxes
                totals |= {name: value for name, (_, value) in usage.lasts.items()}
                totals |= {name: len(values) for name, values in usage.uniques.items()}
                found.append(totals)
        return found


class LedgerMixin(MemoryState):
    """The credits ledger and corrections."""

    def grant_credits(self, customer_id: str, micros: int) -> Balance:
        return self.move_credits(customer_id, default_grant(micros))

    def move_credits(self, customer_id: str, entry: LedgerEntry) -> Balance:
        with self._lock:
            account = self._account(customer_id)
            account.record(entry)
            if entry.expires_ms:
                shard = self._shards[shard_of(customer_id, self.shards)]
                shard.grant_expiries[(customer_id, entry.grant)] = entry.expires_ms
            return Balance(account.balance, account.reserved)

    def read_ledger(
        self, customer_id: str, start: str = "-", end: str = "+", count: int | None = None
    ) -> list[LedgerEntry]:
        with self._lock:
            entries = self._account(customer_id).ledger
            low = 0 if start == "-" else bisect.bisect_left(entries, id_tuple(start), key=ledger_id_key)
            # As XRANGE: an end without a sequence number means the last entry of that millisecond.
            high = len(entries)
            if end != "+":
                last = id_tuple(end) if "-" in end else (int(end), 2**64)
                high = bisect.bisect_right(entries, last, key=ledger_id_key)
            return entries[low:high] if count is None else entries[low:high][:count]

    def due_grant_expiries(self, shard: int, now_ms: int, limit: int) -> list[tuple[str, str]]:
        with self._lock:
            due = sorted(
                (at, customer, grant)
                for (customer, grant), at in self._shards[shard].grant_expiries.items()
                if at <= now_ms
            )
            return [(customer, grant) for _, customer, grant in due[:limit]]

    def expire_grants(
        self, customer_id: str, last_id: str, expiries: Sequence[tuple[str, int]], actor: str
    ) -> bool:
        with self._lock:
            account = self._account(customer_id)
            if (account.ledger[-1].id if account.ledger else "0-0") != last_id:
                return False
            for grant, amount in expiries:
                if amount:
                    account.record(LedgerEntry("expiry", amount, grant=grant, actor=actor, reason="expired"))
            shard = self._shards[shard_of(customer_id, self.shards)]
            for grant, _ in expiries:
                shard.grant_expiries.pop((customer_id, grant), None)
            return True

    def correction_state(self, shard: int, event_id: str) -> str:
        with self._lock:
            return self._shards[shard].corrections.get(event_id, "")

    def correct_event(self, correction: Correction) -> bool:
        with self._lock:
            state = self._shards[correction.shard]
            if state.corrections.get(correction.event_id, "") != correction.expected:
                return False
            fields = {
                b"b": correction.payload,
                b"c": ",".join(map(str, correction.costs)).encode(),
                b"n": ",".join(map(str, correction.signs)).encode(),
                b"i": f"fix:{correction.event_id}".encode(),
            }
            state.stream.append(StreamEntry(state.next_id(), fields))
            account = self._accounts.get(correction.customer)
            if correction.entry is not None and correction.entry.amount and account is not None:
                account.record(correction.entry)
            # The period's spend (the spend cap's count) moves by the event's change of cost, never below 0.
            counters = self._quotas.get((correction.live, correction.customer, correction.period_start))
            if correction.spent and counters is not None:
                counters[SPENT_FIELD] = max(0, counters.get(SPENT_FIELD, 0) + correction.spent)
            state.corrections[correction.event_id] = correction.state
            return True

    def imported_entries(self, shard: int, event_ids: Sequence[str]) -> dict[str, str]:
        with self._lock:
            imported = self._shards[shard].imported
            return {event_id: imported[event_id] for event_id in event_ids if event_id in imported}

    def import_events(self, shard: int, event_ids: Sequence[str], payload: bytes) -> bool:
        with self._lock:
            state = self._shards[shard]
            if any(event_id in state.imported for event_id in event_ids):
                return False
            fields = {
                b"b": payload,
                b"c": ",".join("0" for _ in event_ids).encode(),
                b"i": f"import:{event_ids[0]}:{len(event_ids)}".encode(),
            }
            entry = StreamEntry(state.next_id(), fields)
            state.stream.append(entry)
            for event_id in event_ids:
                state.imported[event_id] = entry.entry_id
            return True
