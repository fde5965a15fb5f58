"""Record usage outside an HTTP call: a batch job, a websocket session, a queue consumer.

    import meterware

    meterware.record("acme", {"tokens": 1200}, event_id=job.id)          # sync code
    await meterware.arecord("acme", {"tokens": 1200}, event_id=job.id)   # asyncio code

A record goes through the same atomic admission as a call (hard quotas and credits are checked and what
its units cost is reserved: concurrent records never overspend), then into the same buffer, flush and
settlement (the credits ledger, the stream, the rollup windows) as an event with no route: route ``""``,
method ``RECORD``. One the credits or a quota cannot cover raises :class:`Refused`. Records never count
against the plan's rate limits of calls, and are never refused by one of a meter's units (their units
count against it once flushed). They are never served without the backend (fail-open is for calls): a
backend failure raises :class:`~meterware.StorageError`, to retry with the same ``event_id``.

An ``event_id`` is charged once within :data:`IDEMPOTENCY_SECONDS`: the record's settlement carries its
one-use marker, set by the flush that charges it in the same atomic step (``storage/_once.py``). So a
process that dies between admission and flush leaves it neither charged nor marked (the rollup worker
refunds the reservation), and a retry is charged. What a caller is told:

* ``recorded=True``: admitted and buffered; the id is charged once, by this record or by an attempt with
  the same id another process flushed first (whose flush drops this one's event, refunding its hold);
* ``recorded=False``: the id was charged before. A retry made while this process's first attempt is still
  buffered waits until it is written, so it is never told this of a record a crash could still lose;
* :class:`Refused`: nothing was charged by this attempt. A retry from another process while the first
  still holds the credits may be refused; once the first is charged, a retry is told ``recorded=False``.

The module-level :func:`record` and :func:`arecord` use a :class:`Recorder` made on first use, with the
configuration of the process's metering middleware if one was made before, else ``METERWARE_CONFIG`` (or
``./meterware.toml``): a worker or queue consumer needs only the configuration. Make your own with
``Recorder(config)`` to choose it.
Buffered records are flushed in the background, by :meth:`Recorder.close`, and at interpreter exit.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Final

from meterware.config import MAX_CALL_COST, Config, Meter, Plan, resolve_config
from meterware.dimensions import base_of, canonical
from meterware.errors import MeterwareError, UsageError
from meterware.events import format_event_id, make_row, new_event_id
from meterware.metering.admission import (
    AdmitRequest,
    Decision,
    MeterHold,
    RateCorrections,
    Reason,
    SettledMeters,
    meter_holds,
    priced_holds,
    rate_corrections,
    settled_meters,
)
from meterware.metering.batching import Pending
from meterware.metering.calls import spend_cap_of
from meterware.metering.facade import Metering, first_config
from meterware.metering.flushers import ThreadFlusher
from meterware.metering.measure import nets_out
from meterware.metering.periods import period_bounds
from meterware.metering.records import KeyInfo
from meterware.metering.unsettled import CallChange
from meterware.storage._keyspace import shard_of
from meterware.storage.base import BATCH_MEMORY_SECONDS, AsyncStorage, Batch, Settlement, Storage
from meterware.usage import UNITS_LIMIT

#: A retry with the same ``event_id`` within this many seconds is charged once.
IDEMPOTENCY_SECONDS: Final = BATCH_MEMORY_SECONDS
#: What a record's event holds as its route and method (a call's route is never empty).
RECORD_ROUTE: Final = ""
RECORD_METHOD: Final = "RECORD"
#: The longest ``event_id`` taken (its marker is a backend key).
MAX_EVENT_ID_LENGTH: Final = 200


class Refused(MeterwareError):
    """The backend refused a record: ``reason`` is the problem reason a call would get
    (``insufficient_credits``, ``quota_exceeded``, ``suspended``, ``unknown_customer``)."""

    def __init__(self, customer: str, reason: Reason, retry_after: int = 0) -> None:
        super().__init__(f"record for customer {customer!r} refused: {reason}")
        self.customer = customer
        self.reason = reason
        #: Seconds until it may be admitted (``quota_exceeded``: the end of the period); 0 if unknown.
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Recorded:
    """What a record did."""

    #: The caller's ``event_id``.
    event_id: str
    #: The id of the event to be written to the stream (UUIDv7: what ``Accounts.void_event`` takes), or
    #: "" when nothing is written (a duplicate, or no units). Never written if another process's attempt
    #: with the same ``event_id`` is flushed first.
    stream_event_id: str
    #: False: the same ``event_id`` was charged before (nothing charged this time). True: it is charged
    #: once, by this record or a concurrent attempt (see the module's docstring).
    recorded: bool
    #: Micro-credits reserved for it (its settlement charges them, less what included units cover).
    reserved_credits: int = 0


def checked_units(
    config: Config, units: Mapping[str, int], dimensions: Mapping[str, str] | None = None
) -> dict[str, int]:
    """``units`` once every meter is one a record can add to and every value a whole number of units,
    with each meter's sub-meter of ``dimensions`` if given; :class:`UsageError` naming the first that is
    not (a dimension value the meter does not declare among them)."""
    if not isinstance(units, Mapping) or not units:
        raise UsageError("record() takes a non-empty mapping of meter name to units")
    if dimensions is not None and not isinstance(dimensions, Mapping):
        raise UsageError("record(): dimensions must be a mapping of dimension to value")
    checked: dict[str, int] = {}
    for meter, value in units.items():
        definition = config.meters.get(meter) if isinstance(meter, str) else None
        if definition is None:
            raise UsageError(f"record(): no such meter is configured: {meter!r}")
        if definition.source != "handler" or not definition.chargeable:
            raise UsageError(
                f"record(): meter {meter!r} is not one a record adds to (source 'handler', "
                f"aggregation 'sum' or 'count'; it has {definition.source!r}, {definition.aggregation!r})"
            )
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < UNITS_LIMIT:
            raise UsageError(f"record(): units of meter {meter!r} must be an integer from 0 to 2^53-1")
        checked[meter] = value
        if dimensions:
            try:
                checked[canonical(meter, definition.dimensions, dimensions.items())] = value
            except ValueError as error:
                raise DimensionRefused(f"record(): {error}") from None
    return checked


class DimensionRefused(UsageError):
    """A record named a dimension or value its meter does not declare (counted as rejected units)."""


def checked_event_id(event_id: str) -> str:
    if not isinstance(event_id, str) or not 0 < len(event_id) <= MAX_EVENT_ID_LENGTH:
        raise UsageError(f"record(): event_id must be text of 1 to {MAX_EVENT_ID_LENGTH} characters")
    return event_id


def record_holds(
    key: KeyInfo, config: Config, units: Mapping[str, int], plan: Plan | None = None
) -> tuple[MeterHold, ...]:
    """What a record holds of each recorded meter the customer's terms (``plan``: default, those in force
    now) limit or price (per filter of dimension values too): its exact units (known before admission,
    unlike a call's), so admission reserves exactly what they cost; under a spend cap, also
    :func:`spend_holds`."""
    plan = plan or config.plan_for(key.customer)
    holds = meter_holds(plan, config.meters, 1, key.live)
    priced = priced_holds(holds, units)
    exact = tuple(
        replace(hold, need=priced[hold.meter], hold=priced[hold.meter], exact=True)
        for hold in holds
        if base_of(hold.meter) in units
    )
    cost = sum(hold.hold * hold.price for hold in exact)
    if cost > MAX_CALL_COST:
        raise UsageError(f"record(): {cost} micro-credits are more than one record may cost")
    if spend_cap_of(key, plan) >= 0:
        exact += spend_holds(plan, config.meters, exact, key.live)
    return exact


def spend_holds(
    plan: Plan, meters: Mapping[str, Meter], holds: tuple[MeterHold, ...], live: bool
) -> tuple[MeterHold, ...]:
    """Under a spend cap, the priced holds a call would have that a record does not, holding nothing: the
    admission then counts what calls in flight hold of them and what this process's finished calls will
    be charged for them (what was charged it reads whole: a call's admission holds every priced one)."""
    held = {hold.meter for hold in holds}
    return tuple(
        replace(hold, quota=-1, need=0, hold=0, exact=True)
        for hold in meter_holds(plan, meters, 1, live)
        if hold.price and hold.meter not in held
    )


def marker(event_id: str) -> str:
    """The one-use marker of a record's ``event_id`` (kept with the customer, like the portal's)."""
    return f"record:{event_id}"


class InFlight:
    """This process's records not known to be written yet, by ``(customer, marker)``: a retry of one made
    here waits until it is written, so it is told "recorded before" only once that is true."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[tuple[str, str], threading.Event] = {}

    def claim(self, key: tuple[str, str]) -> tuple[threading.Event, threading.Event | None]:
        """A new event the caller sets once its record is queued or refused (:meth:`settle`), and the
        earlier one of ``key`` to wait for (None: the caller's is the first)."""
        mine = threading.Event()
        with self._lock:
            earlier = self._records.get(key)
            if earlier is None:
                self._records[key] = mine
        return mine, earlier

    def settle(self, key: tuple[str, str], mine: threading.Event, queued: bool) -> None:
        """The record of ``key`` is queued (kept until written) or not (forgotten): wake who waits."""
        if not queued:
            with self._lock:
                if self._records.get(key) is mine:
                    del self._records[key]
        mine.set()

    def written(self, batch: Batch) -> None:
        """Forget the records ``batch`` wrote (the flusher calls it)."""
        with self._lock:
            for settlement in batch.settlements:
                if settlement is not None and settlement.once:
                    self._records.pop((settlement.customer, settlement.once), None)


def _refused(customer: str, decision: Decision) -> Refused:
    assert decision.reason is not None
    return Refused(customer, decision.reason, decision.retry_after)


def _both(first: Callable[[Batch], None], second: Callable[[Batch], None]) -> Callable[[Batch], None]:
    def both(batch: Batch) -> None:
        first(batch)
        second(batch)

    return both


class Recorder:
    """Records usage outside HTTP calls for one configuration (thread-safe; see the module's docstring).

    :param config: a :class:`~meterware.Config`, a path to a TOML file, a dict shaped like the file, or
        ``None`` to load ``METERWARE_CONFIG`` or ``./meterware.toml``.

    Use it as a context manager, or call :meth:`close` (:meth:`aclose` with asyncio) once done: buffered
    records are flushed then (and at interpreter exit in any case).
    """

    def __init__(self, config: Config | str | os.PathLike[str] | dict[str, Any] | None = None) -> None:
        self.metering = Metering(resolve_config(config, {}))
        self.config = self.metering.config
        self._async: tuple[asyncio.AbstractEventLoop, AsyncStorage] | None = None
        self._making = threading.Lock()
        self._storage: Storage | None = None
        self._flusher: ThreadFlusher | None = None
        self._in_flight = InFlight()
        batcher, flushed = self.metering.batcher, self.metering.batcher.on_flushed
        batcher.on_flushed = (
            self._in_flight.written if flushed is None else _both(self._in_flight.written, flushed)
        )

    @property
    def storage(self) -> Storage:
        """The synchronous client, made on first use (by one thread: each client holds a pool)."""
        if self._storage is None:
            with self._making:
                if self._storage is None:
                    self._storage = self.metering.backend()
        return self._storage

    @property
    def flusher(self) -> ThreadFlusher:
        """The flusher thread's client and thread, made on first use, started by the first record."""
        if self._flusher is None:
            with self._making:
                if self._flusher is None:
                    storage = self.metering.backend(flushing=True)
                    self._flusher = ThreadFlusher(self.metering.batcher, storage)
        return self._flusher

    def async_storage(self) -> AsyncStorage:
        """The asyncio client of the running loop: a client belongs to the loop that made it, so a
        recorder used on another loop makes another (``aclose()`` on the first loop before moving)."""
        loop = asyncio.get_running_loop()
        if self._async is None or self._async[0] is not loop:
            self._async = (loop, self.metering.async_backend())
        return self._async[1]

    # -- the two twins -------------------------------------------------------------------------------

    def record(
        self,
        customer: str,
        units: Mapping[str, int],
        *,
        event_id: str,
        dimensions: Mapping[str, str] | None = None,
    ) -> Recorded:
        """Charge ``units`` to ``customer`` once per ``event_id`` (:class:`Refused`: they cannot be), with
        the values of the meters' ``dimensions``."""
        checked, event_id = self._checked(units, dimensions), checked_event_id(event_id)
        storage = self.storage
        if not any(checked.values()):
            return Recorded(event_id, "", True)
        key = (customer, marker(event_id))
        mine, earlier = self._in_flight.claim(key)
        queued = False
        try:
            if earlier is not None:  # recorded by this process just now: answered once it is written
                earlier.wait()
                self.flush()
            if storage.is_used(*key):
                return Recorded(event_id, "", False)
            found = storage.resolve_customer(customer)
            unknown = found is not None and not self.config.knows_plan(found.customer.plan)
            self.config.stored.refresh(self.config, storage.stored_plans, force=unknown)
            request, rates = self._request(customer, checked, found)
            decision = storage.admit(request)
            if not decision.allowed:
                if storage.is_used(*key):  # charged meanwhile (by another process's attempt)
                    return Recorded(event_id, "", False)
                raise _refused(customer, decision)
            done = self._queue(request, decision, checked, event_id, rates)
            queued = True
            return done
        finally:
            self._in_flight.settle(key, mine, queued)

    async def arecord(
        self,
        customer: str,
        units: Mapping[str, int],
        *,
        event_id: str,
        dimensions: Mapping[str, str] | None = None,
    ) -> Recorded:
        """The asyncio twin of :meth:`record`."""
        checked, event_id = self._checked(units, dimensions), checked_event_id(event_id)
        storage = self.async_storage()
        if not any(checked.values()):
            return Recorded(event_id, "", True)
        key = (customer, marker(event_id))
        mine, earlier = self._in_flight.claim(key)
        queued = False
        try:
            if earlier is not None:
                await asyncio.to_thread(earlier.wait)
                await asyncio.to_thread(self.flush)
            if await storage.is_used(*key):
                return Recorded(event_id, "", False)
            found = await storage.resolve_customer(customer)
            unknown = found is not None and not self.config.knows_plan(found.customer.plan)
            await self.config.stored.arefresh(self.config, storage.stored_plans, force=unknown)
            request, rates = self._request(customer, checked, found)
            decision = await storage.admit(request)
            if not decision.allowed:
                if await storage.is_used(*key):
                    return Recorded(event_id, "", False)
                raise _refused(customer, decision)
            done = self._queue(request, decision, checked, event_id, rates)
            queued = True
            return done
        finally:
            self._in_flight.settle(key, mine, queued)

    # -- what both twins share -----------------------------------------------------------------------

    def _checked(self, units: Mapping[str, int], dimensions: Mapping[str, str] | None) -> dict[str, int]:
        try:
            return checked_units(self.config, units, dimensions)
        except DimensionRefused:
            self.metering.metrics.units_rejected.inc()
            raise

    def _request(
        self, customer: str, units: Mapping[str, int], key: KeyInfo | None
    ) -> tuple[AdmitRequest, RateCorrections]:
        """The admission of a record of ``units`` by ``key``'s customer (Refused: unknown customer), and what
        its settlement moves of the plan's meter rate limits (its units count; they never refuse it)."""
        if key is None:
            raise Refused(customer, "unknown_customer")
        now = time.time()
        plan = self.config.plan_for(key.customer, now)
        start, end = period_bounds(key.customer.anchor, plan.period, now)
        holds = record_holds(key, self.config, units, plan)
        request = AdmitRequest(
            shard=shard_of(customer, self.config.shards),
            customer=customer,
            key_id="",
            live=key.live,
            # Never refused by a rate limit: those count calls, or units a call is about to use.
            plan=replace(plan, rate_limits=()),
            period_start=start,
            period_end=end,
            holds=holds,
            reservation_id=f"{random.getrandbits(64):016x}",
            reservation_timeout_ms=int(self.config.policy.reservation_timeout * 1000),
            unsettled=self.metering.batcher.unsettled if holds else None,
            one_by_one=True,
            spend_cap=spend_cap_of(key, plan),
        )
        return request, rate_corrections(plan, units, False)

    def _queue(
        self,
        request: AdmitRequest,
        decision: Decision,
        units: dict[str, int],
        event_id: str,
        rates: RateCorrections,
    ) -> Recorded:
        """Queue the admitted record's event and settlement for the flusher (as a finished call's)."""
        now_ms = time.time_ns() // 1_000_000
        stream_id = new_event_id(now_ms)
        row = make_row(
            stream_id,
            now_ms,
            request.customer,
            "",
            request.plan.name,
            RECORD_ROUTE,
            RECORD_METHOD,
            200,
            "success",
            0,
            0,
            units,
            True,
            request.live,
            request.period_start,
            "",
        )
        settled = settled_meters(request.holds, priced_holds(request.holds, units))
        settlement = Settlement(
            request.customer,
            request.live,
            request.period_start,
            decision.reservation_id,
            True,
            request.charges_credits,
            settled,
            once=marker(event_id),
            rates=rates,
        )
        self.metering.queue(Pending(request.shard, row, settlement, _change(request, decision, settled)))
        self.flusher.ensure_running()
        return Recorded(event_id, format_event_id(stream_id), True, decision.reserved_credits)

    # -- closing -------------------------------------------------------------------------------------

    def flush(self) -> None:
        """Write every buffered record now."""
        self.flusher.drain()

    def close(self) -> None:
        """Flush every buffered record and close the clients."""
        with self._making:
            flusher, storage, self._flusher, self._storage = self._flusher, self._storage, None, None
        if flusher is not None:
            flusher.drain()
            flusher.storage.close()
        else:
            self.metering.drain()
        if storage is not None:
            storage.close()

    async def aclose(self) -> None:
        """The asyncio twin of :meth:`close` (also closes the running loop's client)."""
        if self._async is not None and self._async[0] is asyncio.get_running_loop():
            await self._async[1].aclose()
        self._async = None
        await asyncio.to_thread(self.close)

    def __enter__(self) -> Recorder:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> Recorder:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.aclose()


_default: Recorder | None = None
_default_lock = threading.Lock()


def _change(request: AdmitRequest, decision: Decision, settled: SettledMeters) -> CallChange | None:
    """What an admitted record's settlement changes of its customer's counters (as a finished call's)."""
    if not request.holds or (decision.reservation_id and nets_out(request, decision.reserved_credits)):
        return None
    account = (request.customer, request.live, request.period_start)
    released = decision.reserved_credits if decision.reservation_id else 0
    freed = [hold.hold if decision.reservation_id else 0 for hold in request.holds]
    meters = tuple((meter, used, free) for (meter, used, _, _), free in zip(settled, freed, strict=True))
    return account, released, meters


def default_recorder() -> Recorder:
    """The process's recorder for :func:`record` and :func:`arecord`, made on first use: with the
    configuration of the first middleware made in this process, else ``METERWARE_CONFIG`` (or
    ``./meterware.toml``)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Recorder(first_config())
        return _default


def record(
    customer: str, units: Mapping[str, int], *, event_id: str, dimensions: Mapping[str, str] | None = None
) -> Recorded:
    """Charge ``units`` (meter name -> units) to ``customer`` once per ``event_id``, outside an HTTP call,
    with the values of the meters' ``dimensions`` (``{"model": "large"}``).

    Raises :class:`Refused` when the credits or a hard quota cannot cover them, ``UsageError`` for an
    unknown meter, a bad value or a dimension value the meter does not declare. See :class:`Recorder`."""
    return default_recorder().record(customer, units, event_id=event_id, dimensions=dimensions)


async def arecord(
    customer: str, units: Mapping[str, int], *, event_id: str, dimensions: Mapping[str, str] | None = None
) -> Recorded:
    """The asyncio twin of :func:`record`."""
    return await default_recorder().arecord(customer, units, event_id=event_id, dimensions=dimensions)
