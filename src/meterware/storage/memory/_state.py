"""What the in-process backend holds, and the helpers its operations share."""

from __future__ import annotations

import functools
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import TypeAlias

from meterware.errors import NotFoundError, StorageError
from meterware.metering.admission import (
    AdmitRequest,
    Decision,
    Reason,
)
from meterware.metering.records import Customer, KeyRecord
from meterware.storage.base import (
    Batch,
    Billed,
    ExportMark,
    LedgerEntry,
    Settlement,
    StreamEntry,
    Window,
)

#: Markers kept before the expired ones are first swept (then again each time their number doubles).
USED_LINKS_PRUNE_AT = 1024


@functools.cache
def counter_names(meter: str) -> tuple[str, str]:
    """The keys of a meter's used and held units in a period's counters (as in Redis)."""
    return f"{meter}:u", f"{meter}:h"


def clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(slots=True)
class Account:
    customer: Customer
    balance: int = 0
    reserved: int = 0
    keys: list[str] = field(default_factory=list)
    #: The credits ledger: every movement of ``balance``, in order, with its stream-like id.
    ledger: list[LedgerEntry] = field(default_factory=list)
    ledger_last: tuple[int, int] = (0, 0)

    def record(self, entry: LedgerEntry) -> None:
        """Append a ledger entry and move the balance by its amount (one step: the balance is the sum)."""
        ms = clock_ms()
        last_ms, last_seq = self.ledger_last
        self.ledger_last = (ms, 0) if ms > last_ms else (last_ms, last_seq + 1)
        self.ledger.append(replace(entry, id=f"{self.ledger_last[0]}-{self.ledger_last[1]}"))
        self.balance += entry.amount


#: ``(meter, units held)`` for each hold of a call.
Holds: TypeAlias = tuple[tuple[str, int], ...]
#: A rate limit's key in the store and the TAT an admission moves it to.
#: A rate limit's key: live, customer, seconds, scope ("" for the plan's; admit.lua's rate key).
RateKey: TypeAlias = tuple[bool, str, int, str]
NewTat: TypeAlias = tuple[RateKey, float]


# Made for every admitted call: not frozen, as a frozen dataclass's __init__ costs an object.__setattr__
# per field; never changed once made (captured() and less() make new ones).
@dataclass(slots=True)
class Reservation:
    customer: str
    live: bool
    period_start: int
    credits: int
    holds: Holds
    deadline_ms: int


def captured(reservation: Reservation, settlement: Settlement, cost: int) -> Reservation:
    """What a lease's call takes out of its block: its units and its cost, at most what the block holds
    (flush.lua does the same)."""
    units = {meter: units for meter, units, _, _ in settlement.meters}
    holds = tuple((meter, max(0, min(units.get(meter, 0), held))) for meter, held in reservation.holds)
    return replace(reservation, credits=max(0, min(cost, reservation.credits)), holds=holds)


def less(reservation: Reservation, taken: Reservation) -> Reservation:
    holds = tuple(
        (meter, held - took) for (meter, held), (_, took) in zip(reservation.holds, taken.holds, strict=True)
    )
    return replace(reservation, credits=reservation.credits - taken.credits, holds=holds)


#: The largest units, price, included units or cost per meter a settlement may hold (flush.lua's too).
MAX_AMOUNT = 2**53 - 1


def check_amounts(batch: Batch, settlement: Settlement) -> None:
    """Raise the refusal flush.lua replies with if a meter's units, price, included units or cost is not
    an integer from 0 to 2^53-1."""
    for meter, units, price, included in settlement.meters:
        if (
            type(units) is int
            and type(price) is int
            and type(included) is int
            and 0 <= units <= MAX_AMOUNT
            and 0 <= price <= MAX_AMOUNT
            and 0 <= included <= MAX_AMOUNT
            and units * price <= MAX_AMOUNT
        ):
            continue
        # Name the first bad value, as flush.lua does.
        for name, value in (("units", units), ("price", price), ("included", included)):
            _check_amount(batch, settlement, meter, name, value)
        _check_amount(batch, settlement, meter, "cost", units * price)


def _check_amount(batch: Batch, settlement: Settlement, meter: str, name: str, value: object) -> None:
    if type(value) is not int or not 0 <= value <= MAX_AMOUNT:
        raise StorageError(
            f"memory: BADVALUE batch {batch.batch_id} customer {settlement.customer} meter {meter}: "
            f"{name} {value!r:.40} is not an integer from 0 to 2^53-1",
            refused=True,
        )


def refusal(request: AdmitRequest, reason: Reason) -> Decision:
    """The decision refusing a call before any limit is read (unknown, revoked or expired key, suspended)."""
    return Decision(False, reason, "", 0, 0, (), 0 if request.charges_credits else None, 0)


@dataclass(slots=True)
class Shard:
    stream: list[StreamEntry] = field(default_factory=list)
    dead: list[StreamEntry] = field(default_factory=list)
    alerts: list[StreamEntry] = field(default_factory=list)
    last_id: tuple[int, int] = (0, 0)
    batches: dict[str, int] = field(default_factory=dict)
    reservations: dict[str, Reservation] = field(default_factory=dict)
    claim: tuple[str, int] | None = None
    fence: int = 0
    offset: str = "0-0"
    #: (customer, grant id) -> expiry (ms), for grants that expire.
    grant_expiries: dict[tuple[str, str], int] = field(default_factory=dict)
    #: event id -> the state of its corrections.
    corrections: dict[str, str] = field(default_factory=dict)
    #: Backfilled event id -> the stream entry holding it.
    imported: dict[str, str] = field(default_factory=dict)

    def next_id(self) -> str:
        ms = clock_ms()
        last_ms, last_seq = self.last_id
        self.last_id = (ms, 0) if ms > last_ms else (last_ms, last_seq + 1)
        return f"{self.last_id[0]}-{self.last_id[1]}"


def id_tuple(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def entry_id_key(entry: StreamEntry) -> tuple[int, int]:
    return id_tuple(entry.entry_id)


def ledger_id_key(entry: LedgerEntry) -> tuple[int, int]:
    return id_tuple(entry.id)


@dataclass(slots=True)
class Usage:
    sums: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    maxes: dict[str, int] = field(default_factory=dict)
    lasts: dict[str, tuple[int, int]] = field(default_factory=dict)
    uniques: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))


class MemoryState:
    """The store's data and its lock; the role mixins of :class:`~meterware.storage.memory.MemoryStorage`
    work on it."""

    def __init__(self, shards: int = 16) -> None:
        self.shards = shards
        self._lock = threading.Lock()
        self._accounts: dict[str, Account] = {}
        #: Stored plan name -> its record (versions, as JSON).
        self._stored_plans: dict[str, str] = {}
        self._keys: dict[str, KeyRecord] = {}
        self._key_ids_by_hash: dict[str, str] = {}
        self._rates: dict[RateKey, float] = {}
        self._quotas: dict[tuple[bool, str, int], dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._shards = [Shard() for _ in range(shards)]
        #: Live rollup workers -> epoch ms their heartbeat expires at.
        self._rollup_workers: dict[str, int] = {}
        self._usage: dict[Window, Usage] = defaultdict(Usage)
        #: (customer, period start) -> frozen invoice; customer -> what closed invoices billed.
        self._invoices: dict[tuple[str, int], str] = {}
        self._billed: dict[str, Billed] = {}
        self._alert_rules: dict[str, str] = {}
        self._alert_destinations: dict[str, str] = {}
        #: (customer, alert name) -> epoch seconds the marker expires at.
        self._alerts_fired: dict[tuple[str, str], int] = {}
        self._external_ids: dict[str, dict[str, str]] = defaultdict(dict)
        #: (provider, customer, window, start) -> meter -> mark; kept for good (as the windows are here).
        self._export_marks: dict[tuple[str, str, str, int], dict[str, ExportMark]] = defaultdict(dict)
        self._export_cursors: dict[tuple[str, str, str], int] = {}
        #: (customer, portal link id or record marker) -> epoch ms its one-use marker expires at.
        self._used_links: dict[tuple[str, str], int] = {}
        self._used_links_prune_at = USED_LINKS_PRUNE_AT

    def _account(self, customer_id: str) -> Account:
        account = self._accounts.get(customer_id)
        if account is None:
            raise NotFoundError(f"no customer {customer_id!r}")
        return account

    def _mark_used(self, marker: tuple[str, str], expires_ms: int) -> None:
        """Set a one-use marker (a portal link's, a record's) until ``expires_ms`` (under the lock)."""
        used = self._used_links
        if len(used) >= self._used_links_prune_at:  # markers that expired are dropped, as Redis would
            now_ms = time.time_ns() // 1_000_000
            for expired in [marker for marker, until in used.items() if until <= now_ms]:
                del used[expired]
            # Records' markers live a day: many may be live, and a sweep per marker would cost each O(n).
            self._used_links_prune_at = max(USED_LINKS_PRUNE_AT, 2 * len(used))
        used[marker] = expires_ms

    def _release(self, reservation: Reservation) -> None:
        counters = self._quotas[(reservation.live, reservation.customer, reservation.period_start)]
        for meter, held in reservation.holds:
            counters[counter_names(meter)[1]] -= held
        account = self._accounts.get(reservation.customer)
        if account is not None:
            account.reserved -= reservation.credits
