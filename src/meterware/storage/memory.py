"""``memory://``: a complete in-process backend for development, demos and tests of user apps.

It implements the same contract as the Redis backend, step for step the same as the Lua scripts in
``storage/lua/`` (the storage contract tests run both). Everything lives in one process and is lost when
it exits; one lock makes each operation atomic across threads.

Each operation is also all or nothing, as the scripts are: everything that can raise (reading, deciding,
encoding) happens before its first change, and the changes themselves are assignments and arithmetic on
Python ints, which have no bound to overflow and no type to mismatch. Where a script checks the types and
ranges of what Redis holds, there is nothing to check here: the store only ever holds what it wrote.
"""

from __future__ import annotations

import bisect
import functools
import threading
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from meterware.billing.ledger import default_grant
from meterware.errors import NotFoundError, StorageError
from meterware.metering.admission import AdmitRequest, Decision, decision_from_reply
from meterware.metering.records import Customer, KeyInfo, KeyRecord
from meterware.storage._keyspace import check_customer_id, shard_of
from meterware.storage.base import (
    ALERTS_MAXLEN,
    BATCH_MEMORY_SECONDS,
    Balance,
    Batch,
    Billed,
    CloseResult,
    Correction,
    ExportMark,
    LedgerEntry,
    RollupCommit,
    Settlement,
    StreamEntry,
    Window,
)


@functools.cache
def _counter_names(meter: str) -> tuple[str, str]:
    """The keys of a meter's used and held units in a period's counters (as in Redis)."""
    return f"{meter}:u", f"{meter}:h"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(slots=True)
class _Account:
    customer: Customer
    balance: int = 0
    reserved: int = 0
    keys: list[str] = field(default_factory=list)
    #: The credits ledger: every movement of ``balance``, in order, with its stream-like id.
    ledger: list[LedgerEntry] = field(default_factory=list)
    ledger_last: tuple[int, int] = (0, 0)

    def record(self, entry: LedgerEntry) -> None:
        """Append a ledger entry and move the balance by its amount (one step: the balance is the sum)."""
        ms = _now_ms()
        last_ms, last_seq = self.ledger_last
        self.ledger_last = (ms, 0) if ms > last_ms else (last_ms, last_seq + 1)
        self.ledger.append(replace(entry, id=f"{self.ledger_last[0]}-{self.ledger_last[1]}"))
        self.balance += entry.amount


@dataclass(frozen=True, slots=True)
class _Reservation:
    customer: str
    live: bool
    period_start: int
    credits: int
    holds: tuple[tuple[str, int], ...]
    deadline_ms: int


def _captured(reservation: _Reservation, settlement: Settlement, cost: int) -> _Reservation:
    """What a lease's call takes out of its block: its units and its cost, at most what the block holds
    (flush.lua does the same)."""
    units = {meter: units for meter, units, _, _ in settlement.meters}
    holds = tuple((meter, max(0, min(units.get(meter, 0), held))) for meter, held in reservation.holds)
    return replace(reservation, credits=max(0, min(cost, reservation.credits)), holds=holds)


def _less(reservation: _Reservation, taken: _Reservation) -> _Reservation:
    holds = tuple(
        (meter, held - took) for (meter, held), (_, took) in zip(reservation.holds, taken.holds, strict=True)
    )
    return replace(reservation, credits=reservation.credits - taken.credits, holds=holds)


#: The largest units, price, included units or cost per meter a settlement may hold (flush.lua's too).
MAX_AMOUNT = 2**53 - 1


def _check_amount(batch: Batch, settlement: Settlement, meter: str, name: str, value: object) -> None:
    """Raise the refusal flush.lua replies with if ``value`` is not an integer from 0 to 2^53-1."""
    if type(value) is not int or not 0 <= value <= MAX_AMOUNT:
        raise StorageError(
            f"memory: BADVALUE batch {batch.batch_id} customer {settlement.customer} meter {meter}: "
            f"{name} {value!r:.40} is not an integer from 0 to 2^53-1",
            refused=True,
        )


@dataclass(slots=True)
class _Admission:
    """What admitting some calls would do (the state an admission reply reports)."""

    reason: str
    retry_ms: float
    credits: int
    rates: list[int]
    quotas: list[int]
    holds: list[int]
    new_tats: list[tuple[tuple[bool, str, int], float]]


@dataclass(slots=True)
class _Shard:
    stream: list[StreamEntry] = field(default_factory=list)
    dead: list[StreamEntry] = field(default_factory=list)
    alerts: list[StreamEntry] = field(default_factory=list)
    last_id: tuple[int, int] = (0, 0)
    batches: dict[str, int] = field(default_factory=dict)
    reservations: dict[str, _Reservation] = field(default_factory=dict)
    lease: tuple[str, int] | None = None
    fence: int = 0
    offset: str = "0-0"
    #: (customer, grant id) -> expiry (ms), for grants that expire.
    grant_expiries: dict[tuple[str, str], int] = field(default_factory=dict)
    #: event id -> the state of its corrections.
    corrections: dict[str, str] = field(default_factory=dict)
    #: Backfilled event id -> the stream entry holding it.
    imported: dict[str, str] = field(default_factory=dict)

    def next_id(self) -> str:
        ms = _now_ms()
        last_ms, last_seq = self.last_id
        self.last_id = (ms, 0) if ms > last_ms else (last_ms, last_seq + 1)
        return f"{self.last_id[0]}-{self.last_id[1]}"


def _id_tuple(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _entry_id(entry: StreamEntry) -> tuple[int, int]:
    return _id_tuple(entry.entry_id)


def _ledger_id(entry: LedgerEntry) -> tuple[int, int]:
    return _id_tuple(entry.id)


@dataclass(slots=True)
class _Usage:
    sums: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    maxes: dict[str, int] = field(default_factory=dict)
    lasts: dict[str, tuple[int, int]] = field(default_factory=dict)
    uniques: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))


class MemoryStorage:
    """The embedded backend (synchronous; see :class:`AsyncMemoryStorage` for asyncio)."""

    def __init__(self, shards: int = 16) -> None:
        self.shards = shards
        self._lock = threading.Lock()
        self._accounts: dict[str, _Account] = {}
        self._keys: dict[str, KeyRecord] = {}
        self._key_ids_by_hash: dict[str, str] = {}
        self._rates: dict[tuple[bool, str, int], float] = {}
        self._quotas: dict[tuple[bool, str, int], dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._shards = [_Shard() for _ in range(shards)]
        self._usage: dict[Window, _Usage] = defaultdict(_Usage)
        #: (customer, period start) -> frozen invoice; customer -> what closed invoices billed.
        self._invoices: dict[tuple[str, int], str] = {}
        self._billed: dict[str, Billed] = {}
        self._alert_rules: dict[str, str] = {}
        #: (customer, alert name) -> epoch seconds the marker expires at.
        self._alerts_fired: dict[tuple[str, str], int] = {}
        self._external_ids: dict[str, dict[str, str]] = defaultdict(dict)
        #: (provider, customer, window, start) -> meter -> mark; kept for good (as the windows are here).
        self._export_marks: dict[tuple[str, str, str, int], dict[str, ExportMark]] = defaultdict(dict)
        self._export_cursors: dict[tuple[str, str, str], int] = {}

    # -- the request path ---------------------------------------------------------------------------

    def resolve_key(self, key_hash: str) -> KeyInfo | None:
        with self._lock:
            key_id = self._key_ids_by_hash.get(key_hash)
            if key_id is None:
                return None
            record = self._keys[key_id]
            account = self._accounts[record.customer]
            return KeyInfo(key_id, account.customer, record.live, record.prefix)

    def admit(self, request: AdmitRequest) -> Decision:
        with self._lock:
            now_ms = _now_ms()
            reply = self._admit(request, now_ms)
        return decision_from_reply(request, reply, now_ms / 1000)

    def _admit(self, request: AdmitRequest, now: int) -> list[int | str]:
        record = self._keys.get(request.key_id)
        account = self._accounts.get(request.customer)
        # A key presented for another customer is as good as unknown (the Redis script finds no record).
        if record is None or account is None or record.customer != request.customer:
            return [0, "unknown_key", 0, 0, 0]
        if record.status != "active":
            return [0, "revoked_key", 0, 0, 0]
        if record.expires_ms and now >= record.expires_ms:
            return [0, "expired_key", 0, 0, 0]
        if account.customer.status != "active":
            return [0, "suspended", 0, 0, 0]
        for limit in request.plan.rate_limits:
            # As admit.lua: a TAT more than one period ahead was never written so; clamped and repaired.
            rate_key, latest = (request.live, request.customer, limit.seconds), now + limit.seconds * 1000
            if self._rates.get(rate_key, now) > latest:
                self._rates[rate_key] = latest

        counters = self._quotas[(request.live, request.customer, request.period_start)]
        seen, available = self._unsettled(request, counters, account, now)
        calls = request.calls
        decision = self._decide(request, seen, available, now, calls)
        if decision.reason and calls > 1:
            # As admit.lua: the largest of calls, calls/2, calls/4... that fits, halved once more.
            while decision.reason and calls > 1:
                calls //= 2
                decision = self._decide(request, seen, available, now, calls)
            if not decision.reason and calls > 1:
                calls //= 2
                decision = self._decide(request, seen, available, now, calls)
        limits = [*decision.rates, *decision.quotas]
        if decision.reason:
            retry = int(decision.retry_ms) if decision.reason == "rate_limited" else 0
            return [0, decision.reason, retry, 0, available, 0, *limits]

        credits = decision.credits
        reservation = None
        if credits or any(decision.holds):
            reservation = _Reservation(
                request.customer,
                request.live,
                request.period_start,
                credits,
                tuple((hold.meter, held) for hold, held in zip(request.holds, decision.holds, strict=True)),
                now + request.reservation_timeout_ms,
            )
        for rate_key, new_tat in decision.new_tats:
            self._rates[rate_key] = new_tat
        for hold, held in zip(request.holds, decision.holds, strict=True):
            counters[_counter_names(hold.meter)[1]] += held
        account.reserved += credits
        if reservation is not None:
            self._shards[request.shard].reservations[request.reservation_id] = reservation
        return [1, "", 0, credits, available - credits, calls, *limits]

    def _unsettled(
        self, request: AdmitRequest, counters: Mapping[str, int], account: _Account, now: int
    ) -> tuple[Mapping[str, int], int]:
        """The counters and the credits available as the admission sees them: with the changes this
        process's finished calls still make, counted while their batches are not written (admit.lua)."""
        available = account.balance - account.reserved
        batches = self._shards[request.shard].batches
        # Read under the storage's lock, as the flush writes: no batch lands in between (no guard needed).
        snapshot = request.unsettled_changes()
        if snapshot is None:
            return counters, available
        released, moved = 0, dict[str, list[int]]()  # meter -> [units charged, units released]
        for batch_id, change in snapshot.changes:
            if batch_id and batches.get(batch_id, 0) > now / 1000:
                continue  # written: in the counters already
            released += change.released
            for meter, (used, held) in change.meters.items():
                totals = moved.setdefault(meter, [0, 0])
                totals[0] += used
                totals[1] += held
        if not released and not moved:
            return counters, available
        seen = dict(counters)
        cost = 0
        for hold in request.holds:
            charged, freed = moved.get(hold.meter, (0, 0))
            used_key, held_key = _counter_names(hold.meter)
            used = seen.get(used_key, 0)
            seen[used_key] = used + charged
            seen[held_key] = max(0, seen.get(held_key, 0) - freed)
            cost += (max(hold.included, used + charged) - max(hold.included, used)) * hold.price
        reserved = max(0, account.reserved - released)
        return seen, account.balance - reserved - (cost if request.charges_credits else 0)

    def _decide(
        self, request: AdmitRequest, counters: Mapping[str, int], available: int, now: int, calls: int
    ) -> _Admission:
        """What admitting ``calls`` calls would do (admit.lua's decide())."""
        retry_ms = 0.0
        rates: list[int] = []
        new_tats: list[tuple[tuple[bool, str, int], float]] = []
        for limit in request.plan.rate_limits:
            period_ms = limit.seconds * 1000
            interval = period_ms / limit.amount
            rate_key = (request.live, request.customer, limit.seconds)
            tat = max(self._rates.get(rate_key, now), now)
            new_tat = tat + interval * calls
            if new_tat - now > period_ms:
                retry_ms = max(retry_ms, new_tat - period_ms - now)
                rates += (int((period_ms - (tat - now)) // interval), int(tat - now))
            else:
                rates += (int((period_ms - (new_tat - now)) // interval), int(new_tat - now))
                new_tats.append((rate_key, new_tat))
        over_quota = needs_positive_balance = False
        credits = 0
        quotas: list[int] = []
        holds: list[int] = []
        for hold in request.holds:
            # A value meter's size is unknown until the end: one unit left admits it, however many calls.
            need, held_now = (hold.need * calls if hold.exact else hold.need), hold.hold * calls
            used_key, held_key = _counter_names(hold.meter)
            used, held = counters.get(used_key, 0), counters.get(held_key, 0)
            holds.append(held_now)
            if hold.quota >= 0:
                if used + held + need > hold.quota:
                    over_quota = True
                    quotas.append(hold.quota - used - held)
                else:
                    quotas.append(hold.quota - used - held - held_now)
            if hold.price:
                base = used + held
                credits += (max(hold.included, base + held_now) - max(hold.included, base)) * hold.price
                if not hold.exact and base + held_now >= hold.included:
                    needs_positive_balance = True
        if not request.charges_credits:
            credits = 0
        reason = ""
        if retry_ms:
            reason = "rate_limited"
        elif over_quota:
            reason = "quota_exceeded"
        elif request.charges_credits and (
            available < credits or (needs_positive_balance and available - credits <= 0)
        ):
            reason = "insufficient_credits"
        return _Admission(reason, retry_ms, credits, rates, quotas, holds, new_tats)

    def flush(self, batch: Batch) -> bool:
        with self._lock:
            shard = self._shards[batch.shard]
            now = time.time()
            if batch.batch_id in shard.batches and shard.batches[batch.batch_id] > now:
                return False
            # As flush.lua: a settlement's numbers come from the client (a spool file at worst).
            for settlement in batch.settlements:
                if settlement is not None:
                    for meter, units, price, included in settlement.meters:
                        for name, value in (("units", units), ("price", price), ("included", included)):
                            _check_amount(batch, settlement, meter, name, value)
                        _check_amount(batch, settlement, meter, "cost", units * price)
            # Plan every change, then make them (flush.lua does the same): the entry first, then the
            # settlements. A unit counter reads what the batch's earlier settlements added to it.
            # What the reservations named still hold (None once closed), and what goes back.
            holding: dict[str, _Reservation | None] = {}
            freed: list[_Reservation] = []
            used: dict[tuple[bool, str, int], dict[str, int]] = defaultdict(lambda: defaultdict(int))
            charges: dict[str, int] = defaultdict(int)
            costs = []
            for settlement in batch.settlements:
                cost = 0
                if settlement is not None:
                    if settlement.billable:
                        quota = (settlement.live, settlement.customer, settlement.period_start)
                        counters, added = self._quotas.get(quota, {}), used[quota]
                        for meter, units, price, included in settlement.meters:
                            before = counters.get(f"{meter}:u", 0) + added[f"{meter}:u"]
                            added[f"{meter}:u"] += units
                            cost += (max(included, before + units) - max(included, before)) * price
                        if settlement.charges_credits and settlement.customer in self._accounts:
                            charges[settlement.customer] += cost
                    reservation_id = settlement.reservation_id
                    if reservation_id and reservation_id not in holding:
                        holding[reservation_id] = shard.reservations.get(reservation_id)
                    reservation = holding.get(reservation_id)
                    if reservation is not None:
                        if settlement.closes:
                            freed.append(reservation)
                            holding[reservation_id] = None
                        elif settlement.billable:
                            taken = _captured(reservation, settlement, cost)
                            freed.append(taken)
                            holding[reservation_id] = _less(reservation, taken)
                costs.append(cost)
            fields = {
                b"b": batch.payload,
                b"c": ",".join(map(str, costs)).encode(),
                b"i": batch.batch_id.encode(),
            }

            shard.stream.append(StreamEntry(shard.next_id(), fields))
            shard.batches[batch.batch_id] = int(now) + BATCH_MEMORY_SECONDS
            for reservation_id, reservation in holding.items():
                if reservation is None:
                    shard.reservations.pop(reservation_id, None)
                elif reservation_id in shard.reservations:
                    shard.reservations[reservation_id] = reservation
            for reservation in freed:
                self._release(reservation)
            for quota, added in used.items():
                counters = self._quotas[quota]
                for name, units in added.items():
                    counters[name] += units
            for customer, cost in charges.items():
                if cost:  # one ledger entry per customer and batch (as flush.lua)
                    self._accounts[customer].record(LedgerEntry("charge", -cost, ref=batch.batch_id))
            return True

    def release(self, admissions: Sequence[AdmitRequest]) -> int:
        with self._lock:
            released = 0
            for admission in admissions:
                reservation = self._shards[admission.shard].reservations.pop(admission.reservation_id, None)
                if reservation is not None:
                    self._release(reservation)
                    released += 1
            return released

    def _release(self, reservation: _Reservation) -> None:
        counters = self._quotas[(reservation.live, reservation.customer, reservation.period_start)]
        for meter, held in reservation.holds:
            counters[f"{meter}:h"] -= held
        account = self._accounts.get(reservation.customer)
        if account is not None:
            account.reserved -= reservation.credits

    # -- the rollup worker --------------------------------------------------------------------------

    def acquire_lease(self, shard: int, owner: str, ttl_ms: int) -> int | None:
        if ttl_ms < 1:
            raise ValueError(f"a lease lasts at least 1 ms, not {ttl_ms}")
        with self._lock:
            state = self._shards[shard]
            now = _now_ms()
            if state.lease is not None and state.lease[0] != owner and state.lease[1] > now:
                return None
            if state.lease is None or state.lease[0] != owner or state.lease[1] <= now:
                state.fence += 1
            state.lease = (owner, now + ttl_ms)
            return state.fence

    def release_lease(self, shard: int, owner: str) -> None:
        with self._lock:
            state = self._shards[shard]
            if state.lease is not None and state.lease[0] == owner:
                state.lease = None

    def committed_offset(self, shard: int) -> str:
        with self._lock:
            return self._shards[shard].offset

    def read_stream(self, shard: int, after: str, count: int) -> list[StreamEntry]:
        with self._lock:
            # The stream is in id order: find the offset by bisection, not by scanning a day of entries.
            stream = self._shards[shard].stream
            start = bisect.bisect_right(stream, _id_tuple(after), key=_entry_id)
            return stream[start : start + count]

    def commit_rollup(self, commit: RollupCommit) -> bool:
        with self._lock:
            state = self._shards[commit.shard]
            if state.fence != commit.token or state.offset != commit.expected_offset:
                return False
            # As commit.lua: what can fail (here, encoding) comes first, and the dead letters lead the writes.
            by_id = {entry.entry_id: entry for entry in state.stream} if commit.dead_letters else {}
            dead = []
            for entry_id, reason in commit.dead_letters:
                fields = dict(by_id[entry_id].fields) if entry_id in by_id else {}
                dead.append(fields | {b"entry": entry_id.encode(), b"reason": reason.encode()})

            for fields in dead:
                state.dead.append(StreamEntry(state.next_id(), fields))
            for window, totals in commit.windows.items():
                usage = self._usage[window]
                for name, amount in totals.sums.items():
                    usage.sums[name] += amount
                for name, value in totals.maxes.items():
                    usage.maxes[name] = max(value, usage.maxes.get(name, value))
                for name, (stamp, value) in totals.lasts.items():
                    if name not in usage.lasts or usage.lasts[name][0] <= stamp:
                        usage.lasts[name] = (stamp, value)
                for name, values in totals.uniques.items():
                    usage.uniques[name] |= values
            state.offset = commit.new_offset
            return True

    def expire_reservations(self, shard: int, limit: int) -> int:
        with self._lock:
            state = self._shards[shard]
            now = _now_ms()
            due = [rid for rid, r in state.reservations.items() if r.deadline_ms <= now][:limit]
            for reservation_id in due:
                self._release(state.reservations.pop(reservation_id))
            return len(due)

    def trim_stream(self, shard: int, min_id: str) -> int:
        with self._lock:
            state = self._shards[shard]
            trimmed = bisect.bisect_left(state.stream, _id_tuple(min_id), key=_entry_id)
            del state.stream[:trimmed]
            return trimmed

    def stream_length(self, shard: int) -> int:
        with self._lock:
            return len(self._shards[shard].stream)

    def lease_holder(self, shard: int) -> tuple[str, int] | None:
        """Who holds the shard's rollup lease, and until when (epoch ms); None when no one does."""
        with self._lock:
            lease = self._shards[shard].lease
            return lease if lease is not None and lease[1] > _now_ms() else None

    def dead_letters(self, shard: int) -> list[StreamEntry]:
        """Entries the worker could not decode (for inspection)."""
        with self._lock:
            return list(self._shards[shard].dead)

    # -- accounts -----------------------------------------------------------------------------------

    def create_customer(self, customer: Customer) -> None:
        check_customer_id(customer.id)
        with self._lock:
            if customer.id in self._accounts:
                raise ValueError(f"customer {customer.id!r} already exists")
            self._accounts[customer.id] = _Account(customer)

    def get_customer(self, customer_id: str) -> Customer | None:
        with self._lock:
            account = self._accounts.get(customer_id)
            return account.customer if account else None

    def update_customer(
        self, customer_id: str, *, plan: str | None = None, status: str | None = None
    ) -> None:
        check_customer_id(customer_id)
        with self._lock:
            account = self._account(customer_id)
            customer = account.customer
            account.customer = replace(
                customer,
                plan=plan or customer.plan,
                status=status or customer.status,  # type: ignore[arg-type]
            )

    def list_customers(self) -> list[str]:
        with self._lock:
            return sorted(self._accounts)

    def add_key(self, record: KeyRecord, key_hash: str) -> None:
        with self._lock:
            account = self._account(record.customer)
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

    def grant_credits(self, customer_id: str, micros: int) -> Balance:
        return self.move_credits(customer_id, default_grant(micros))

    # -- the credits ledger and corrections ----------------------------------------------------------

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
            low = 0 if start == "-" else bisect.bisect_left(entries, _id_tuple(start), key=_ledger_id)
            # As XRANGE: an end without a sequence number means the last entry of that millisecond.
            high = len(entries)
            if end != "+":
                last = _id_tuple(end) if "-" in end else (int(end), 2**64)
                high = bisect.bisect_right(entries, last, key=_ledger_id)
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

    def get_balance(self, customer_id: str) -> Balance:
        with self._lock:
            account = self._account(customer_id)
            return Balance(account.balance, account.reserved)

    def read_usage(self, customer_id: str, live: bool, window: str, start: int) -> dict[str, int]:
        with self._lock:
            usage = self._usage.get(Window(live, customer_id, window, start))
            if usage is None:
                return {}
            totals = dict(usage.sums) | usage.maxes
            totals |= {name: value for name, (_, value) in usage.lasts.items()}
            totals |= {name: len(values) for name, values in usage.uniques.items()}
            return totals

    # -- invoices -----------------------------------------------------------------------------------

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

    # -- alerts -------------------------------------------------------------------------------------

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
            start = bisect.bisect_right(alerts, _id_tuple(after), key=_entry_id)
            return alerts[start : start + max(0, count)]

    # -- export to billing providers ----------------------------------------------------------------

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
        self,
        provider: str,
        customer_id: str,
        window: str,
        marks: Mapping[int, Mapping[str, ExportMark | None]],
        ttl: int,
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

    def _account(self, customer_id: str) -> _Account:
        account = self._accounts.get(customer_id)
        if account is None:
            raise NotFoundError(f"no customer {customer_id!r}")
        return account

    def close(self) -> None:
        pass


class AsyncMemoryStorage:
    """The embedded backend's request path for asyncio: the same store, without I/O to wait on."""

    def __init__(self, storage: MemoryStorage) -> None:
        self.sync = storage
        self.shards = storage.shards

    async def resolve_key(self, key_hash: str) -> KeyInfo | None:
        return self.sync.resolve_key(key_hash)

    async def admit(self, request: AdmitRequest) -> Decision:
        return self.sync.admit(request)

    async def flush(self, batch: Batch) -> bool:
        return self.sync.flush(batch)

    async def release(self, admissions: Sequence[AdmitRequest]) -> int:
        return self.sync.release(admissions)

    async def aclose(self) -> None:
        pass
