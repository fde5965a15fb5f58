"""The request path: admit, flush and release, as script arguments and replies (pure, shared by the
synchronous and the asyncio client), and the synchronous commands.
"""

from __future__ import annotations

import itertools
import operator
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any, Final, Protocol

import msgpack
from redis.exceptions import ResponseError

from meterware.config._overrides import load_versions
from meterware.errors import StorageError
from meterware.keys import rate_limits_from
from meterware.metering.admission import AdmitRequest, Decision, rate_moves, rate_scope
from meterware.metering.records import Customer, KeyInfo
from meterware.storage import _keyspace as ks
from meterware.storage._admission import STALE_REPLY, admit_call, decision_from_reply
from meterware.storage._once import DUPLICATES_REPLY, without_events
from meterware.storage.base import (
    BATCH_MEMORY_SECONDS,
    Batch,
)
from meterware.storage.redis._connection import Connection, DriverErrors
from meterware.storage.redis._scripts import Arg, Fields, Keys, Text, as_str

#: Rounds of admissions in flight at once per asyncio storage (two: one is written while the other waits).
ADMISSION_ROUNDS: Final = 2
#: Times a call is admitted when a batch of its process was written while the admission was on its way
#: (so calls it counted as unwritten may be written: ``STALE``); the last time is not guarded.
ADMIT_ATTEMPTS: Final = 3


class Stale:
    """An admission to ask again: see :data:`STALE_REPLY`."""


STALE: Final = Stale()
#: The longest billing period; a settlement only knows its period's start.
LONGEST_PERIOD_SECONDS: Final = 31 * 86_400
CUSTOMER_FIELDS: Final = ("plan", "status", "anchor", "terms", "spend_cap")


def decisions_from_replies(
    requests: Sequence[AdmitRequest], replies: Sequence[Any], errors: DriverErrors
) -> list[Decision | StorageError | Stale]:
    """Each call's decision, the refusal of a call whose keys hold garbage (it wrote nothing), or
    ``STALE`` for a call to ask again (it wrote nothing either)."""
    now = time.time()
    return [_decision(request, reply, now, errors) for request, reply in zip(requests, replies, strict=True)]


def _decision(
    request: AdmitRequest, reply: Any, now: float, errors: DriverErrors
) -> Decision | StorageError | Stale:
    if int(reply[0]) >= 0:
        return decision_from_reply(request, reply, now)
    if int(reply[0]) == STALE_REPLY:
        return STALE
    return StorageError(errors.message(ResponseError(as_str(reply[1]))), refused=True)


_term_of: Final = operator.attrgetter(
    "customer", "live", "period_start", "billable", "charges_credits", "meters"
)
_reservation_of: Final = operator.attrgetter("reservation_id")


def flush_call(batch: Batch) -> tuple[list[str], list[Arg]]:
    """KEYS and ARGV of ``flush.lua`` (every settlement's customer lives in the batch's shard).

    A batch holds many calls of few customers: the settlements are sent as terms (what calls of one
    customer with the same flags and meters share), each once; every event names its term (by the
    position of the term's first event), and only the reservations to close go one by one.
    """
    shard = batch.shard
    keys = Keys(
        ks.flushed_batch(shard, batch.batch_id),
        ks.events(shard),
        ks.reservations(shard),
        ks.reservation_deadlines(shard),
    )
    settlements = batch.settlements
    identities: list[tuple[Any, ...] | None]
    reservation_ids: list[str | None]
    try:
        identities = list(map(_term_of, settlements))
        reservation_ids = list(map(_reservation_of, settlements))
    except AttributeError:  # refused calls (None) settle nothing
        identities = [None if item is None else _term_of(item) for item in settlements]
        reservation_ids = [None if item is None else item.reservation_id for item in settlements]
    first: dict[tuple[Any, ...] | None, int] = {}
    events = list(map(first.setdefault, identities, itertools.count(1)))
    counts = Counter(events)
    # The costs text of the batch if no call crosses its included units (flush.lua checks that).
    texts: dict[int, str] = {}
    term_args: list[Arg] = []
    for identity, number in first.items():
        if identity is None:
            texts[number] = "0"
            continue
        customer, live, period_start, billable, charges_credits, meters = identity
        texts[number] = str(sum(units * price for _, units, price, _ in meters) if billable else 0)
        term_args += [
            number,
            counts[number],
            keys.index(ks.customer(shard, customer)),
            keys.index(ks.ledger(shard, customer)),
            keys.index(ks.quota(shard, live, customer, period_start)),
            period_start + LONGEST_PERIOD_SECONDS + ks.QUOTA_GRACE_SECONDS,
            int(billable),
            int(charges_credits),
            len(meters),
        ]
        for meter in meters:
            term_args += meter
    reservations: list[Arg] = []
    if any(reservation_ids):
        for number, (settlement, reservation_id, term) in enumerate(
            zip(settlements, reservation_ids, events, strict=True), 1
        ):
            if reservation_id:
                assert settlement is not None
                reservations += (reservation_id, term, number, int(settlement.closes))
    # A release is a term of no event that bills nothing: it only closes its reservation.
    for number, release in enumerate(batch.releases, len(settlements) + 1):
        term_args += [
            number,
            0,
            keys.index(ks.customer(shard, release.customer)),
            keys.index(ks.ledger(shard, release.customer)),
            keys.index(ks.quota(shard, release.live, release.customer, release.period_start)),
            release.period_start + LONGEST_PERIOD_SECONDS + ks.QUOTA_GRACE_SECONDS,
            0,
            0,
            0,
        ]
        if release.reservation_id:
            reservations += (release.reservation_id, number, 0, 1)
    markers: list[Arg] = []
    for number, settlement in enumerate(settlements, 1):
        if settlement is not None and settlement.once:
            markers += (number, keys.index(ks.portal_marker(shard, settlement.customer, settlement.once)))
    # Beyond 14 digits Lua's numbers would print (and sum) otherwise: such a batch is priced per call.
    costs = ",".join(map(texts.__getitem__, events)) if max(map(len, texts.values()), default=0) < 15 else ""
    args: list[Arg] = [batch.batch_id, batch.payload, BATCH_MEMORY_SECONDS]
    args += [msgpack.packb(term_args), msgpack.packb(events), msgpack.packb(reservations), costs]
    writer = keys.index(ks.batch_writer(shard, batch.writer)) if batch.writer else 0
    args += [writer, batch.generation, msgpack.packb(markers)]
    if moves := rate_moves(settlements):
        # Only then: the meter rate limits' corrections, one sum per limit (a plan without one sends
        # what it always did).
        rates: list[Arg] = []
        for (live, customer, limit, amount, seconds), units in moves.items():
            rates += (
                keys.index(ks.rate(shard, live, customer, seconds, rate_scope(limit))),
                amount,
                seconds,
                units,
                keys.index(ks.customer(shard, customer)),
            )
        args.append(msgpack.packb(rates))
    return keys.keys, args


def duplicates_in(reply: Any) -> list[int]:
    """The events (positions from 0) that ``flush.lua`` found charged before (their markers are set)."""
    if isinstance(reply, list) and reply and as_str(reply[0]) == DUPLICATES_REPLY:
        return [int(number) - 1 for number in reply[1:]]
    return []


def flush_result(batch: Batch, reply: Any, errors: DriverErrors) -> bool:
    """Whether ``flush.lua`` applied ``batch`` (False: it had already); raise its refusal of a customer's
    stored values as a ``StorageError`` naming the customer (``customers``), so the rest can go."""
    if not isinstance(reply, list):
        return bool(reply)
    customer_key, problem = as_str(reply[0]), as_str(reply[1])
    settled = (*batch.settlements, *batch.releases)
    owners = {ks.customer(batch.shard, s.customer): s.customer for s in settled if s is not None}
    customer = owners.get(customer_key)
    message = errors.message(ResponseError(problem))
    raise StorageError(message, refused=True, customers=(customer,) if customer else ())


def release_calls(admissions: Sequence[AdmitRequest]) -> list[tuple[list[str], list[Arg]]]:
    """KEYS and ARGV of ``refund.lua`` closing the reservations of ``admissions``, one call per shard."""
    by_shard: dict[int, tuple[Keys, list[Arg]]] = {}
    for admission in admissions:
        shard, customer = admission.shard, admission.customer
        keys, args = by_shard.setdefault(
            shard, (Keys(ks.reservations(shard), ks.reservation_deadlines(shard)), [])
        )
        args += [
            admission.reservation_id,
            keys.index(ks.customer(shard, customer)),
            keys.index(ks.quota(shard, admission.live, customer, admission.period_start)),
        ]
    return [(keys.keys, args) for keys, args in by_shard.values()]


def renew_calls(admissions: Sequence[AdmitRequest]) -> list[tuple[list[str], list[Arg]]]:
    """KEYS and ARGV of ``renew_reservations.lua`` for the reservations of ``admissions``, one per shard."""
    by_shard: dict[int, list[Arg]] = {}
    for admission in admissions:
        by_shard.setdefault(admission.shard, []).extend(
            (admission.reservation_id, admission.reservation_timeout_ms)
        )
    return [
        ([ks.reservations(shard), ks.reservation_deadlines(shard)], args) for shard, args in by_shard.items()
    ]


def customer_from(customer_id: str, values: Sequence[Text | None]) -> Customer | None:
    """A customer from the ``plan, status, anchor, terms, spend_cap`` fields of its hash."""
    plan, status, anchor, terms, spend_cap = values
    if plan is None or status is None:
        return None
    text = as_str(terms) if terms else ""
    try:
        load_versions(text)  # cached: read once per stored value
        cap = int(spend_cap) if spend_cap else None  # "" once removed
        return Customer(customer_id, as_str(plan), as_str(status), int(anchor or 0), text, cap)  # type: ignore[arg-type]
    except (ValueError, KeyError, TypeError) as error:
        raise StorageError(
            f"customer {customer_id!r}: its stored anchor, terms or spend cap are not valid "
            f"({type(error).__name__})",
            refused=True,
        ) from None


def key_info_from(fields: Fields, customer: Customer | None) -> KeyInfo | None:
    """What a key hash resolves to, from the key-hash index entry and the owner's record."""
    if not fields or customer is None:
        return None
    return KeyInfo(
        as_str(fields[b"key_id"]),
        customer,
        fields[b"live"] == b"1",
        as_str(fields[b"prefix"]),
        fields.get(b"uses") == b"1",
        tuple(as_str(fields.get(b"scopes", b"")).split()),
        rate_limits_from(as_str(fields.get(b"rate_limits", b""))),
    )


class Answer(Protocol):
    """Where a waiting call's admission goes: an ``asyncio.Future``, or a thread's :class:`Waiting`."""

    def done(self) -> bool: ...
    def set_result(self, result: Decision, /) -> None: ...
    def set_exception(self, exception: BaseException, /) -> None: ...


def settle_admissions(
    answers: Sequence[Answer], decisions: Sequence[Decision | StorageError | Stale]
) -> None:
    """Answer the waiting calls of a script run (a ``STALE`` one waits for the next attempt)."""
    for answer, decision in zip(answers, decisions, strict=True):
        if not answer.done():
            if isinstance(decision, StorageError):
                answer.set_exception(decision)
            elif isinstance(decision, Decision):
                answer.set_result(decision)


def fail_admissions(answers: Sequence[Answer], error: StorageError) -> None:
    """Fail the calls still waiting: each raises its own exception (one object raised in many tasks or
    threads would gather all their tracebacks)."""
    for answer in answers:
        if not answer.done():
            answer.set_exception(StorageError(str(error), refused=error.refused))


class Waiting:
    """A thread's call waiting for its admission, or for its turn to lead a round."""

    __slots__ = ("_decision", "_error", "leads", "ready", "request")

    def __init__(self, request: AdmitRequest) -> None:
        self.request = request
        self.leads = False
        #: Set when answered or asked to lead; made only for a call that waits (a leader's never does).
        self.ready: threading.Event | None = None
        self._decision: Decision | None = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        return self._decision is not None or self._error is not None

    def set_result(self, result: Decision, /) -> None:
        self._decision = result
        self.wake()

    def set_exception(self, exception: BaseException, /) -> None:
        self._error = exception
        self.wake()

    def wake(self) -> None:
        if self.ready is not None:
            self.ready.set()

    def result(self) -> Decision:
        if self._error is not None:
            raise self._error
        assert self._decision is not None
        return self._decision


class RequestPathCommands(Connection):
    """The request path of :class:`~meterware.storage.redis.RedisStorage`."""

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        self._admissions = threading.Lock()
        self._waiting: list[Waiting] = []
        self._leading = False

    def resolve_customer(self, customer_id: str) -> KeyInfo | None:
        with self._call() as client:
            values = client.hmget(ks.customer(self._shard(customer_id), customer_id), CUSTOMER_FIELDS)
        customer = customer_from(customer_id, values)
        return None if customer is None else KeyInfo("", customer, True, "")

    def resolve_key(self, key_hash: str) -> KeyInfo | None:
        with self._call() as client:
            fields = client.hgetall(ks.key_by_hash(key_hash))
            if not fields:
                return None
            customer_id = as_str(fields[b"customer"])
            values = client.hmget(ks.customer(self._shard(customer_id), customer_id), CUSTOMER_FIELDS)
        return key_info_from(fields, customer_from(customer_id, values))

    def admit(self, request: AdmitRequest) -> Decision:
        """Admit a call together with the calls other threads ask for meanwhile.

        One thread at a time leads a round: it admits every call waiting when the round starts (one
        script run per shard), and the calls that arrive meanwhile go in the next round, led by the
        first of them. A round trip costs a process more than the rest of a call, and a threaded
        server's calls spend most of their admission waiting for one. Each call is still decided on its
        own, in order, exactly as alone.
        """
        waiting = Waiting(request)
        with self._admissions:
            self._waiting.append(waiting)
            waiting.leads = not self._leading
            if not waiting.leads:
                waiting.ready = threading.Event()
            self._leading = True
        if waiting.ready is not None:
            waiting.ready.wait()  # answered, or asked to lead the next round
        if waiting.leads:
            self._lead_round()
        return waiting.result()

    def _lead_round(self) -> None:
        with self._admissions:
            calls, self._waiting = self._waiting, []
        try:
            by_shard: dict[int, list[Waiting]] = {}
            for call in calls:
                by_shard.setdefault(call.request.shard, []).append(call)
            for shard_calls in by_shard.values():
                self._admit_shard(shard_calls)
        except BaseException as error:
            for call in calls:
                if not call.done():
                    call.set_exception(error)
            raise
        finally:
            with self._admissions:
                if self._waiting:
                    following = self._waiting[0]
                    following.leads = True
                    following.wake()
                else:
                    self._leading = False

    def _admit_shard(self, calls: list[Waiting]) -> None:
        """The twin of :meth:`AsyncRedisStorage._admit_shard`."""
        try:
            for attempt in range(1, ADMIT_ATTEMPTS + 1):
                requests = [call.request for call in calls]
                with self._call():
                    # Read at the last moment: the calls this process finished until then count.
                    keys, args = admit_call(requests, guarded=attempt < ADMIT_ATTEMPTS)
                    replies = self._run("admit", keys, args)
                decisions = decisions_from_replies(requests, replies, self._errors)
                settle_admissions(calls, decisions)
                calls = [call for call, decision in zip(calls, decisions, strict=True) if decision is STALE]
                if not calls:
                    return
        except StorageError as error:
            fail_admissions(calls, error)

    def flush(self, batch: Batch) -> bool:
        while True:  # each pass takes out at least one event found charged before
            keys, args = flush_call(batch)
            with self._call():
                reply = self._run("flush", keys, args)
            duplicates = duplicates_in(reply)
            if not duplicates:
                return flush_result(batch, reply, self._errors)
            batch = without_events(batch, duplicates)

    def release(self, admissions: Sequence[AdmitRequest]) -> int:
        with self._call():
            return sum(int(self._run("refund", keys, args)) for keys, args in release_calls(admissions))

    def renew_reservations(self, admissions: Sequence[AdmitRequest]) -> int:
        calls = renew_calls(admissions)
        with self._call():
            return sum(int(self._run("renew_reservations", keys, args)) for keys, args in calls)
