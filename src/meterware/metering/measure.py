"""The measurement of a finished call: its outcome, its units, its settlement and its event row."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Final

from meterware.config import MAX_CALL_COST, UNMATCHED_ROUTE, Config
from meterware.dimensions import base_of
from meterware.events import Outcome, bounded_method, bounded_route, make_row, new_event_id
from meterware.metering.admission import (
    AdmitRequest,
    MeterHold,
    RateCorrections,
    Reason,
    SettledMeters,
    call_units,
    hold_pricing,
    holds_full_price,
    rate_corrections,
    settled_meters,
)
from meterware.metering.batching import Pending
from meterware.metering.cache import LRUCache
from meterware.metering.calls import Call
from meterware.metering.leases import LeaseTable
from meterware.metering.logs import BAD_USAGE_HEADER_WARNING_SECONDS, ThrottledWarning, logger
from meterware.metering.outcomes import CLIENT_CLOSED_REQUEST, classify, is_billable
from meterware.metering.records import KeyInfo
from meterware.metering.unsettled import CallChange
from meterware.metrics import AppMetrics, UnitCounts, unit_counts
from meterware.storage.base import Settlement

#: Route weights and plan terms whose measurements are remembered (when every meter counts calls).
MEASURED_MAX_ENTRIES: Final = 100_000

#: A call's holds, its units per meter, what its settlement charges per held meter, and what it adds to
#: ``meterware_units`` if billable.
Measured = tuple[tuple[MeterHold, ...], dict[str, int | str], SettledMeters, UnitCounts]


class Measurer:
    """Turns finished (and refused) calls into events and settlements queued for the flusher."""

    def __init__(
        self, config: Config, metrics: AppMetrics, leases: LeaseTable, queue: Callable[[Pending], None]
    ) -> None:
        self.config = config
        self.routes = config.routes
        self.policy = config.policy
        self.metrics = metrics
        self.leases = leases
        self.queue = queue
        #: Meters whose units add up: the ones counted in ``meterware_units_total``.
        self._additive = tuple(name for name, meter in config.meters.items() if meter.chargeable)
        #: Meters whose units are measured here, not reported by the handler.
        self._unreported = [
            (name, meter) for name, meter in config.meters.items() if meter.source != "handler"
        ]
        #: Whether every meter counts calls (a call's units then follow from its holds alone).
        self._calls_only = all(meter.source == "call" for meter in config.meters.values())
        #: Whether some meter has dimensions (only then are sub-meters carried and priced).
        self._dimensioned = any(meter.dimensions for meter in config.meters.values())
        #: By the holds' identity and the route weight (when ``_calls_only``).
        self._measured: LRUCache[tuple[int, int], Measured] = LRUCache(MEASURED_MAX_ENTRIES)
        self._reject_late_units = metrics.units_rejected.inc
        self._bad_usage_headers = {
            name: ThrottledWarning(BAD_USAGE_HEADER_WARNING_SECONDS, "")
            for name, meter in config.meters.items()
            if meter.header
        }

    def finish(self, call: Call, route: str | None, *, failed: bool = False, aborted: bool = False) -> None:
        """Record a finished call: classify it, measure its units, and queue its event.

        ``failed``: the app raised or never completed its response (not charged); ``aborted``: the client
        went away before the end (charged as the response it had started to receive, if any: see
        :func:`~meterware.metering.outcomes.is_billable`).
        """
        if call.finished:
            return
        call.finished = True
        ended = call.ended_ns or time.perf_counter_ns()
        outcome: Outcome
        sent = call.status
        if aborted:
            status, outcome = call.status or CLIENT_CLOSED_REQUEST, "aborted"
            if not call.responded:
                sent = 0
        elif failed:
            status, outcome = call.status if call.status >= 500 else 500, "server_error"
        else:
            status, outcome = call.status, classify(call.status)
        billable = is_billable(outcome, sent, self.policy)
        request = call.request
        # Units reported from now on (by work the handler left running) miss the event: counted as rejected.
        call.usage.late = self._reject_late_units
        _, units, settled, counted = self._measure(call, ended)
        if call.usage.rejected:
            self.metrics.units_rejected.inc(call.usage.rejected)
        now_ms = time.time_ns() // 1_000_000
        recorded = bounded_route(route or call.path)
        row = make_row(
            new_event_id(now_ms),
            now_ms,
            request.customer,
            call.key.key_id,
            request.plan.name,
            recorded,
            bounded_method(call.method),
            status,
            outcome,
            (ended - call.started_ns) // 1000,
            (call.ttfb_ns - call.started_ns) // 1000 if call.ttfb_ns else 0,
            units,
            billable,
            request.live,
            request.period_start,
            "",
        )
        rates = rate_corrections(request.plan, units, bool(call.decision.limits), request.scoped_limits)
        settlement = self._settlement(call, billable, settled, rates)
        change = self._change(call, billable, settled, settlement) if request.holds else None
        self.queue(Pending(request.shard, row, settlement, change))
        self.metrics.call(
            recorded if route else UNMATCHED_ROUTE,
            call.method,
            outcome,
            request.plan.name,
            (ended - (call.arrived_ns or call.started_ns)) / 1e9,
            counted if billable and request.live else (),
        )

    def reject(
        self, key: KeyInfo, request: AdmitRequest, reason: Reason, status: int, method: str, route: str
    ) -> None:
        """Record a refused call of a known customer (it is never charged)."""
        now_ms = time.time_ns() // 1_000_000
        row = make_row(
            new_event_id(),
            now_ms,
            request.customer,
            key.key_id,
            request.plan.name,
            bounded_route(route),
            bounded_method(method),
            status,
            "rejected",
            0,
            0,
            {},
            False,
            request.live,
            request.period_start,
            reason,
        )
        self.queue(Pending(request.shard, row, None))

    def _measure(self, call: Call, ended_ns: int) -> Measured:
        """A finished call's :data:`Measured`.

        When every meter counts calls, it depends only on the route's weight and the plan's terms: it is
        made once (a call's units are never changed once measured, so calls share them; micro:
        Metering.finish).
        """
        holds = call.request.holds
        if not self._calls_only:
            units = self._units(call, ended_ns)
            pricing = hold_pricing(holds) if self._dimensioned else None
            priced = pricing.units(units) if pricing is not None and pricing.filtered else units
            settled = settled_meters(holds, priced)
            # Rare (units priced past what a call may cost): bounded, then priced again without them.
            if sum([used * price for _, used, price, _ in settled]) > MAX_CALL_COST:
                bound_cost(call, units, priced)
                priced = pricing.units(units) if pricing is not None and pricing.filtered else units
                settled = settled_meters(holds, priced)
            return holds, units, settled, unit_counts(units, self._additive)
        weight = self.routes.weight(call.path) if self.routes.weights else 1
        measured = (id(holds), weight)
        known = self._measured.get(measured)
        if known is None or known[0] is not holds:
            units = self._units(call, ended_ns)
            # The holds are kept with their id, so the id names them while the entry lives.
            known = (holds, units, settled_meters(holds, units), unit_counts(units, self._additive))
            self._measured.put(measured, known)
        return known

    def _units(self, call: Call, ended_ns: int) -> dict[str, int | str]:
        # The handler's reports, with their sub-meters, as they are (only handler meters take reports).
        units = call.usage.units.copy()
        weight = self.routes.weight(call.path) if self.routes.weights else 1
        for name, meter in self._unreported:
            source = meter.source
            if source == "call":
                units[name] = call_units(meter, weight)
            elif source == "response_bytes":
                units[name] = call.response_bytes
            elif source == "request_bytes":
                units[name] = call.request_bytes
            elif source == "duration_ms":
                units[name] = (ended_ns - call.started_ns) // 1_000_000
            elif call.header_units and name in call.header_units:
                value = call.header_units[name].strip()
                # isdigit() alone takes '²' and other digits that int() refuses (once the response is gone).
                if value.isascii() and value.isdigit() and len(value) < 16:
                    units[name] = int(value)
                else:
                    call.usage.rejected += 1
                    self._bad_usage_headers[name].warn(
                        "ignored usage header for meter %r: not a whole number", name
                    )
        return units

    def _settlement(
        self, call: Call, billable: bool, settled: SettledMeters, rates: RateCorrections
    ) -> Settlement:
        """How a finished call's reservation is settled.

        A call closes its own. A lease's call is charged from scratch and takes its share out of the
        lease's block (if the lease ``captures``), and the last one closes the block, once no call can
        take from it any more.
        """
        request, lease = call.request, call.lease
        if lease is None:
            reservation_id, closes = call.decision.reservation_id, True
        else:
            closing = self.leases.finished(lease)
            closes = closing or not lease.captures
            reservation_id = lease.block.reservation_id if closing or lease.captures else ""
            # A capture is the same for most of the lease's calls: made once (settlements never change).
            shared = None if rates else lease.capture
            if not closes and shared is not None and shared.billable is billable and shared.meters is settled:
                return shared
        settlement = Settlement(
            request.customer,
            request.live,
            request.period_start,
            reservation_id,
            billable,
            request.charges_credits,
            settled,
            closes,
            rates=rates,
        )
        if not closes:
            assert lease is not None
            lease.capture = settlement
        return settlement

    def _change(
        self, call: Call, billable: bool, settled: SettledMeters, settlement: Settlement
    ) -> CallChange | None:
        """What a finished call's settlement will change of its customer's counters once it is written:
        the units it charges, and what it releases of its reservation (its own, or its lease's block).

        None when that nets out to nothing at admission (most calls: see :func:`nets_out`), so the
        calls that do change something are the only ones carried to every admission.
        """
        request, lease = call.request, call.lease
        account = (request.customer, request.live, request.period_start)
        if lease is not None:
            released, freed = self.leases.releases(lease, settlement, settled, billable)
            return account, released, _meter_changes(settled, billable, freed)
        holding = bool(call.decision.reservation_id)  # else served fail-open: it only charges
        if billable and holding and nets_out(request, call.decision.reserved_credits):
            return None
        released = call.decision.reserved_credits if holding else 0
        freed = [hold.hold for hold in request.holds] if holding else [0] * len(request.holds)
        return account, released, _meter_changes(settled, billable, freed)


def bound_cost(call: Call, units: dict[str, int | str], priced: Mapping[str, int | str]) -> None:
    """Ignore priced value units that would take the call past :data:`MAX_CALL_COST` (``priced``: the
    units of each hold, :func:`priced_holds`)."""
    holds = call.request.holds
    cost = sum(hold.hold * hold.price for hold in holds if hold.exact)  # the call's own price
    ignored = False
    for hold in holds:
        value = priced.get(hold.meter)
        if hold.exact or not hold.price or not isinstance(value, int) or not value:
            continue
        meter = base_of(hold.meter)
        if ignored and meter not in units:
            continue  # its units were ignored already
        if cost + value * hold.price > MAX_CALL_COST:
            for name in [name for name in units if base_of(name) == meter]:
                del units[name]  # with its sub-meters: a meter's units are taken whole
            ignored = True
            call.usage.rejected += 1
            logger.warning(
                "meterware: ignored usage for meter %r: %d units would cost more than one call may",
                hold.meter,
                value,
            )
        else:
            cost += value * hold.price


def nets_out(request: AdmitRequest, reserved_credits: int) -> bool:
    """Whether a charged call, settled from its own reservation, changes nothing an admission reads:
    it holds its full price (:func:`holds_full_price`) and no included units could make it cheaper."""
    return holds_full_price(request, reserved_credits, 1) and not (
        request.charges_credits and any(hold.included for hold in request.holds)
    )


def _meter_changes(
    settled: SettledMeters, billable: bool, freed: list[int]
) -> tuple[tuple[str, int, int], ...]:
    """Per held meter the settlement moves, ``(meter, units charged, units released)``; the others are
    left out (every admission until the flush reads the change: a filter the call reported nothing of
    would cost each of them for nothing)."""
    changes = []
    for (meter, units, _, _), free in zip(settled, freed, strict=True):
        used = units if billable else 0
        if used or free:
            changes.append((meter, used, free))
    return tuple(changes)
