"""The storage contract: records exchanged with a backend, and the interface every backend implements.

A backend keeps customers, keys, balances, counters, the event streams and the rollups. Its three atomic
operations carry meterware's promises:

* ``admit`` checks key status, rate limits, the period quota and credits, and reserves the call's units and
  credits, all at once, so concurrent calls can never overspend;
* ``flush`` appends a batch of events to its shard's stream and settles their reservations (charges the
  billable calls, refunds the rest) at once, idempotently by batch id;
* ``commit_rollup`` adds a batch of aggregates and moves the shard's stream offset at once, fenced by the
  worker's shard claim token, so every event is counted exactly once.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal, Protocol, TypeAlias

if TYPE_CHECKING:
    from meterware.metering.admission import AdmitRequest, Decision
    from meterware.metering.records import Customer, KeyInfo, KeyRecord

#: Flushed batch ids are remembered this long (the batch marker), so a retried flush is recognised; a
#: spooled batch older than this is never replayed (it may have been applied: it would be charged twice).
BATCH_MEMORY_SECONDS = 86_400
#: Seconds each backend call may take when the caller gives no timeout (the worker, the CLI, Accounts).
DEFAULT_TIMEOUT: Final = 5.0


@dataclass(frozen=True, slots=True)
class ReplicaWait:
    """After each write that moves money (flush, ledger writes, period close), wait until ``replicas``
    replicas have it, at most ``timeout`` seconds; if fewer do, the call fails though its write stays on
    the primary: a flush is kept and retried (applied once), a grant must not be repeated blindly.
    Redis replicates asynchronously: without this, a failover can lose the last writes the primary
    acknowledged."""

    replicas: int
    timeout: float

    @property
    def timeout_ms(self) -> int:
        return max(1, round(self.timeout * 1000))  # WAIT's 0 would wait for ever


# Built for every call: not frozen, as a frozen dataclass's __init__ costs an object.__setattr__ per field.
@dataclass(slots=True)
class Settlement:
    """How to close one call's reservation when its event is flushed."""

    customer: str
    live: bool
    period_start: int
    #: The reservation opened at admission, or "" (nothing held, or the call was served fail-open).
    reservation_id: str
    billable: bool
    charges_credits: bool
    #: ``(meter, units, price, included)`` for each meter the plan limits or prices.
    meters: tuple[tuple[str, int, int, int], ...] = ()
    #: Whether the settlement closes ``reservation_id`` (a call's own, or a lease's block by its last
    #: call). If not (the other calls of a lease whose meters all count calls), a billable call takes its
    #: units and cost out of the block, at most what it still holds, so its usage never counts both as
    #: used and as held.
    closes: bool = True
    #: A record's one-use marker (``record:<event_id>``), or "": the flush sets it with the charge, and
    #: applies a settlement whose marker is set already (or set by an earlier event of the batch) never:
    #: it writes neither its event nor its charge and releases its reservation (:func:`without_events`).
    once: str = ""
    #: ``(limit, amount, seconds, units)`` per rate limit of a meter's units on the plan (``limit``: its
    #: meter) or the call's route (its scope, ``r<crc32>:m<meter>``): the flush moves its TAT by ``units``
    #: (the call's actual units less the estimate its admission took) intervals.
    rates: tuple[tuple[str, int, int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Batch:
    """Events of one shard, flushed together as one stream entry."""

    shard: int
    batch_id: str
    #: The events, encoded with :func:`meterware.events.encode_batch`.
    payload: bytes
    #: One settlement per event, in order; ``None`` for events that hold nothing (refused calls).
    settlements: tuple[Settlement | None, ...]
    #: The process that made it ("" if unknown, e.g. read from the spool) and its number among the
    #: batches that process made: the backend keeps the highest number written, so an admission can tell
    #: that a batch made after it read the process's unsettled calls has been written (_unsettled.py).
    writer: str = ""
    generation: int = 0
    #: Settlements whose events were taken out of the batch (duplicates of records charged before): the
    #: flush only closes their reservations, refunding what they hold. Made by ``flush``, never spooled.
    releases: tuple[Settlement, ...] = ()


@dataclass(frozen=True, slots=True)
class StreamEntry:
    """One raw entry of a shard's event stream (decoded by the worker, which tolerates garbage)."""

    entry_id: str
    fields: Mapping[bytes, bytes]


@dataclass(frozen=True, slots=True)
class Window:
    """One rollup bucket: a customer's live or test usage in one window."""

    live: bool
    customer: str
    #: ``minute``, ``hour``, ``day`` or ``period`` (the customer's billing period).
    window: str
    #: Start of the window, epoch seconds.
    start: int


@dataclass(slots=True)
class WindowTotals:
    """What one rollup batch adds to a :class:`Window`."""

    sums: dict[str, int] = field(default_factory=dict)
    maxes: dict[str, int] = field(default_factory=dict)
    #: field -> (timestamp_ms, value): the newest value wins, whatever the order of arrival.
    lasts: dict[str, tuple[int, int]] = field(default_factory=dict)
    uniques: dict[str, set[str]] = field(default_factory=dict)
    #: Seconds the window is kept after this commit (0: forever).
    ttl: int = 0


@dataclass(frozen=True, slots=True)
class RollupCommit:
    """One atomic step of the rollup worker on one shard."""

    shard: int
    token: int
    #: The offset the worker read from; the commit fails if another worker has moved it.
    expected_offset: str
    new_offset: str
    windows: Mapping[Window, WindowTotals]
    #: ``(entry_id, reason)`` of entries that are not valid batches, moved to the dead-letter stream.
    dead_letters: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Balance:
    """A customer's prepaid credits, in micro-credits."""

    balance: int
    reserved: int

    @property
    def available(self) -> int:
        return self.balance - self.reserved


#: The offset of a shard nobody has consumed yet.
START_OFFSET = "0-0"

#: What :meth:`Storage.close_period` did: froze the invoice, found one frozen already, or found that
#: another close changed what was billed since ``version`` was read (nothing written: recompute).
CloseResult = Literal["closed", "exists", "conflict"]


@dataclass(frozen=True, slots=True)
class Billed:
    """What a customer's closed invoices billed, per closed period (see :mod:`meterware.billing.invoices`)."""

    #: Moved by every close; a close computed from another version is refused.
    version: int = 0
    #: Closed period start -> what was billed for it so far (JSON: its usage and spend at the last close).
    periods: Mapping[int, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """A movement of the balance (see :mod:`meterware.billing.ledger`); ``amount`` is signed micros.

    ``kind`` is ``grant``, ``purchase``, ``charge``, ``refund``, ``adjustment``, ``expiry``, or ``status`` (a
    suspension or reactivation with its reason, amount 0). Written with
    ``id=""``; read back with the ledger stream's entry id, whose first part is the time in ms.
    """

    kind: str
    amount: int
    #: The grant it creates (grant, purchase) or ends (expiry); "" otherwise.
    grant: str = ""
    actor: str = ""
    reason: str = ""
    #: What it refers to: the flushed batch of a charge, the event of a correction.
    ref: str = ""
    #: Burn order of a grant: lower first.
    priority: int = 0
    #: When a grant expires, epoch ms (0: never).
    expires_ms: int = 0
    id: str = ""

    @property
    def at_ms(self) -> int:
        return int(self.id.partition("-")[0] or 0)


#: Default burn priority of promotional grants (lower burns first; see :mod:`meterware.billing.ledger`).
GRANT_PRIORITY: Final = 10


def new_grant_id() -> str:
    """A fresh grant id (``g_`` and 16 hex digits)."""
    return f"g_{uuid.uuid4().hex[:16]}"


def default_grant(micros: int) -> LedgerEntry:
    """The entry of a plain ``grant_credits(customer, micros)``: a promotional grant that never expires."""
    return LedgerEntry("grant", micros, grant=new_grant_id(), priority=GRANT_PRIORITY)


@dataclass(frozen=True, slots=True)
class Correction:
    """One atomic correction of an event (void or amend), applied only if its marker still holds ``expected``.

    ``payload``/``costs``/``signs`` form a stream entry the rollup folds (``signs``: ``-1`` subtracts the
    event); ``entry`` moves the balance (signed micros) as its ledger entry.
    """

    shard: int
    customer: str
    event_id: str
    #: The marker's current value ("" if the event was never corrected).
    expected: str
    #: The marker's new value (the event's state after this correction).
    state: str
    payload: bytes
    costs: tuple[int, ...]
    signs: tuple[int, ...]
    entry: LedgerEntry | None = None
    #: What the correction changes of the spend of the event's period (signed micro-credits: the spend
    #: cap's count), and which period: the event's live flag and period start.
    spent: int = 0
    live: bool = True
    period_start: int = 0


#: Entries an alerts stream keeps at most (the oldest go first).
ALERTS_MAXLEN = 10_000


@dataclass(frozen=True, slots=True)
class ExportMark:
    """What was exported of one meter of one window to one provider (see :mod:`meterware.billing.export`).

    Written before the event is sent (``confirmed`` false), and again once the provider took it, so a run
    that died in between sends the very same event (id and value) again, and the provider dedupes it.
    """

    #: The window total the events up to ``revision`` add up to.
    total: int
    #: The revision of the last event (1: the window's first event).
    revision: int
    #: The value of that event (a delta from revision 2 on).
    value: int
    confirmed: bool


#: Marks to write, per window start and meter (``None`` removes a meter's mark).
ExportMarks: TypeAlias = Mapping[int, Mapping[str, ExportMark | None]]


# -- the roles of a backend: each consumer types against the one it uses ------------------------------


class RequestPathStorage(Protocol):
    """What the synchronous request path (WSGI) and the flusher use."""

    shards: int

    def resolve_key(self, key_hash: str) -> KeyInfo | None: ...
    #: A customer the app authenticated itself (``customer_getter``), as a key without a key id.
    def resolve_customer(self, customer_id: str) -> KeyInfo | None: ...
    def admit(self, request: AdmitRequest) -> Decision: ...
    def flush(self, batch: Batch) -> bool: ...
    #: Close the reservations of these admissions (leases whose calls are all flushed), refunding what
    #: they still hold; ones already closed are left alone. Returns how many were closed.
    def release(self, admissions: Sequence[AdmitRequest]) -> int: ...
    #: Push the deadlines of these admissions' reservations to their timeout from now (their calls are
    #: still running in this live process: not for the worker to refund); ones closed are left alone.
    #: Returns how many are still open.
    def renew_reservations(self, admissions: Sequence[AdmitRequest]) -> int: ...


class RollupStorage(Protocol):
    """What the rollup worker uses: a shard is claimed by one worker at a time, under a fencing token.

    ``rollup_heartbeat`` says ``owner`` is alive for ``ttl_ms`` more and returns the names of the live
    workers, sorted (``owner`` included; expired ones are forgotten); ``rollup_leave`` forgets ``owner`` at
    once. The workers share the shards by it.
    """

    shards: int

    def rollup_heartbeat(self, owner: str, ttl_ms: int) -> list[str]: ...
    def rollup_leave(self, owner: str) -> None: ...
    def claim_shard(self, shard: int, owner: str, ttl_ms: int) -> int | None: ...
    def release_shard(self, shard: int, owner: str) -> None: ...
    def shard_holder(self, shard: int) -> tuple[str, int] | None: ...
    def committed_offset(self, shard: int) -> str: ...
    def read_stream(self, shard: int, after: str, count: int) -> list[StreamEntry]: ...
    def commit_rollup(self, commit: RollupCommit) -> bool: ...
    def expire_reservations(self, shard: int, limit: int) -> int: ...
    def trim_stream(self, shard: int, min_id: str) -> int: ...
    def stream_length(self, shard: int) -> int: ...


class UsageStorage(Protocol):
    """The rolled-up usage, which accounts, invoices, alerts and exports read."""

    def read_usage(self, customer_id: str, live: bool, window: str, start: int) -> dict[str, int]: ...
    #: What ``read_usage`` reports for each of ``starts``, in order, read at once (one round trip).
    def read_usage_windows(
        self, customer_id: str, live: bool, window: str, starts: Sequence[int]
    ) -> list[dict[str, int]]: ...


class AccountStorage(UsageStorage, Protocol):
    """Customers, keys and balances (an id that is not 1-128 of [A-Za-z0-9_.@-] raises ValueError:
    ``_keyspace.CUSTOMER_ID_RE``)."""

    shards: int

    def create_customer(self, customer: Customer) -> None: ...
    def get_customer(self, customer_id: str) -> Customer | None: ...
    #: ``spend_cap``: micro-credits per period, negative to remove it, None to leave it.
    def update_customer(
        self,
        customer_id: str,
        *,
        plan: str | None = None,
        status: str | None = None,
        spend_cap: int | None = None,
    ) -> None: ...
    #: Set the customer's terms (:attr:`Customer.terms`) only if they still are ``expected``: False when
    #: they changed meanwhile (nothing written).
    def swap_customer_terms(self, customer_id: str, expected: str, terms: str) -> bool: ...
    def list_customers(self) -> list[str]: ...
    #: The stored plans' records (:mod:`meterware.config._stored`), by plan name.
    def stored_plans(self) -> dict[str, str]: ...
    #: Set a stored plan's record only if it still is ``expected`` ("": none); False when it changed.
    def swap_stored_plan(self, name: str, expected: str, record: str) -> bool: ...
    #: Add a key (``NotFoundError``: no such customer; ``ValueError``: a key has this hash already).
    def add_key(self, record: KeyRecord, key_hash: str) -> None: ...
    def get_key(self, key_id: str) -> KeyRecord | None: ...
    def list_keys(self, customer_id: str) -> list[KeyRecord]: ...
    def set_key_state(
        self, key_id: str, *, status: str | None = None, expires_ms: int | None = None
    ) -> None: ...
    #: Stop a key that counts its uses and take the uses it has left, at once (a rotation hands them over):
    #: they go to 0 and it expires at ``expires_ms``. None (nothing changed) if no such key is active,
    #: unexpired and counting its uses: two rotations at once never both take them.
    def take_key_uses(self, key_id: str, expires_ms: int) -> int | None: ...
    #: Raise each key's ``last_used_ms`` to the time given (epoch ms) unless it is later already; a key id
    #: that names no key is skipped (no record is made). A max, so replays and racing workers are harmless.
    def record_key_use(self, uses: Mapping[str, int]) -> None: ...
    def grant_credits(self, customer_id: str, micros: int) -> Balance: ...
    def get_balance(self, customer_id: str) -> Balance: ...


class LedgerStorage(Protocol):
    """The credits ledger and corrections (:mod:`meterware.billing.ledger`, ``billing.corrections``)."""

    def move_credits(self, customer_id: str, entry: LedgerEntry) -> Balance: ...
    def read_ledger(
        self, customer_id: str, start: str = "-", end: str = "+", count: int | None = None
    ) -> list[LedgerEntry]: ...
    def due_grant_expiries(self, shard: int, now_ms: int, limit: int) -> list[tuple[str, str]]: ...
    def expire_grants(
        self, customer_id: str, last_id: str, expiries: Sequence[tuple[str, int]], actor: str
    ) -> bool: ...
    def correction_state(self, shard: int, event_id: str) -> str: ...
    def correct_event(self, correction: Correction) -> bool: ...
    def imported_entries(self, shard: int, event_ids: Sequence[str]) -> dict[str, str]: ...
    def import_events(self, shard: int, event_ids: Sequence[str], payload: bytes) -> bool: ...


class InvoiceStorage(UsageStorage, Protocol):
    """Frozen invoices. ``close_period`` stores the frozen invoice of a closed period unless one is stored
    ("exists"), with the billed records of the periods it bills, only if the customer's billed version is
    still ``version`` ("conflict" otherwise); all in one atomic step, or nothing."""

    def read_billed(self, customer_id: str) -> Billed: ...
    def read_invoice(self, customer_id: str, period_start: int) -> str | None: ...
    def close_period(
        self, customer_id: str, period_start: int, invoice: str, billed: Mapping[int, str], version: int
    ) -> CloseResult: ...


class AlertStorage(Protocol):
    """Alert rules and destinations (JSON of an existing customer; None removes them) and fired alerts.
    ``fire_alert`` appends ``fields`` to the shard's alerts stream and sets the marker ``name`` (until
    ``expires_at``, epoch seconds) in one atomic step, unless the marker is there already: then it writes
    nothing and returns None. So an alert fires once, whoever evaluates."""

    def set_alert_rules(self, customer_id: str, rules: str | None) -> None: ...
    def get_alert_rules(self, customer_id: str) -> str | None: ...
    def set_alert_destinations(self, customer_id: str, destinations: str | None) -> None: ...
    def get_alert_destinations(self, customer_id: str) -> str | None: ...
    def fire_alert(
        self, customer_id: str, name: str, expires_at: int, fields: Mapping[str, str]
    ) -> str | None: ...
    def read_alerts(self, shard: int, after: str, count: int) -> list[StreamEntry]: ...


class PortalStorage(Protocol):
    """One-use markers of the customer portal (sign-in links used, sessions signed out) and of records
    (``meterware.record``'s event ids, deduplicated through them). ``use_once``
    records ``token_id`` of ``customer_id`` as used until ``expires_ms`` (epoch ms; the marker is gone
    after) and says whether this call was the first to use it: True once, then False until it expires.
    ``is_used`` says whether it is marked, marking nothing."""

    def use_once(self, customer_id: str, token_id: str, expires_ms: int) -> bool: ...
    def is_used(self, customer_id: str, token_id: str) -> bool: ...


class ExportStorage(Protocol):
    """Export to billing providers: external customer ids, and what was exported of each window (a mark
    per meter; ``None`` removes one) and up to where (a cursor), per provider."""

    def set_external_id(self, customer_id: str, provider: str, external_id: str | None) -> None: ...
    def get_external_ids(self, customer_id: str) -> dict[str, str]: ...
    def read_export_marks(
        self, provider: str, customer_id: str, window: str, starts: Sequence[int]
    ) -> dict[int, dict[str, ExportMark]]: ...
    def write_export_marks(
        self, provider: str, customer_id: str, window: str, marks: ExportMarks, ttl: int
    ) -> None: ...
    def read_export_cursor(self, provider: str, customer_id: str, window: str) -> int | None: ...
    def write_export_cursor(self, provider: str, customer_id: str, window: str, end: int) -> None: ...


class Storage(
    RequestPathStorage,
    RollupStorage,
    AccountStorage,
    LedgerStorage,
    InvoiceStorage,
    AlertStorage,
    ExportStorage,
    PortalStorage,
    Protocol,
):
    """A whole synchronous backend (WSGI request path, rollup worker, CLI): every role."""

    def close(self) -> None: ...


class AsyncStorage(Protocol):
    """The request path of a backend for asyncio (ASGI)."""

    shards: int

    async def resolve_key(self, key_hash: str) -> KeyInfo | None: ...
    async def resolve_customer(self, customer_id: str) -> KeyInfo | None: ...
    async def admit(self, request: AdmitRequest) -> Decision: ...
    async def flush(self, batch: Batch) -> bool: ...
    async def release(self, admissions: Sequence[AdmitRequest]) -> int: ...
    async def renew_reservations(self, admissions: Sequence[AdmitRequest]) -> int: ...

    async def stored_plans(self) -> dict[str, str]: ...
    async def use_once(self, customer_id: str, token_id: str, expires_ms: int) -> bool: ...
    async def is_used(self, customer_id: str, token_id: str) -> bool: ...
    async def ready(self) -> None:
        """Connect and run the start-up checks (raise ``UnsafeStorageError`` or ``StorageError``)."""

    async def aclose(self) -> None: ...
