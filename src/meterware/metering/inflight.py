"""The calls in flight in this process that hold a reservation, whose deadlines the flusher renews.

A reservation's deadline (``policy.reservation_timeout`` after its admission) is when the worker takes its
process for dead and refunds what it holds: its credits, its units, its concurrency slot. A call may rightly
run longer (a stream, a slow handler); while it does, its process pushes the deadline forward, so only the
reservations of a process that died are refunded.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Final

from meterware.errors import StorageError
from meterware.metering.admission import AdmitRequest
from meterware.metering.calls import Call

logger = logging.getLogger("meterware.flusher")

#: A call's reservation is renewed once this share of its timeout has passed since its admission (or its
#: last renewal): the deadline is then still two thirds of the timeout away, many flush intervals.
RENEW_AFTER: Final = 1 / 3


@dataclass(slots=True)
class Renewal:
    """A flush pass's step: renew the reservations of ``admissions`` (calls still running)."""

    admissions: list[AdmitRequest]
    #: When they were found due (``time.perf_counter_ns()``): their deadlines are renewed from then on.
    at_ns: int


class CallsInFlight:
    """The admitted calls of this process that hold a reservation, by reservation id (thread-safe: a
    threaded server's calls add, the flusher reads and forgets).

    A call is held by a weak reference: one its adapter never finishes (a server that drops the response
    unclosed) is forgotten once collected, and its reservation is then the worker's to refund.
    """

    def __init__(self) -> None:
        self._calls: dict[str, weakref.ref[Call]] = {}
        self._lock = threading.Lock()
        #: When each call's reservation was last renewed (by the flusher only).
        self._renewed: dict[str, int] = {}

    def add(self, call: Call) -> None:
        """Keep ``call``'s reservation alive while it runs (the request path's only step here)."""
        ref = weakref.ref(call)
        with self._lock:
            self._calls[call.decision.reservation_id] = ref

    def due(self) -> Renewal | None:
        """The reservations of the calls still running that are due for renewal (None: none is), and the
        calls that ended forgotten (their settlements close their reservations)."""
        now = time.perf_counter_ns()
        due: list[AdmitRequest] = []
        ended: list[str] = []
        renewed = self._renewed
        with self._lock:
            calls = list(self._calls.items())
        for reservation_id, ref in calls:
            call = ref()
            if call is None or call.finished:
                ended.append(reservation_id)
                continue
            request = call.request
            since = renewed.get(reservation_id, call.started_ns)
            if now - since >= request.reservation_timeout_ms * 1_000_000 * RENEW_AFTER:
                due.append(request)
        if ended:
            with self._lock:
                for reservation_id in ended:
                    del self._calls[reservation_id]
            for reservation_id in ended:
                renewed.pop(reservation_id, None)
        return Renewal(due, now) if due else None

    def renewed(self, renewal: Renewal, outcome: object) -> None:
        """How writing ``renewal`` went (the :class:`StorageError` it raised, or None): its reservations'
        deadlines are pushed forward from ``renewal.at_ns``, or renewed again with the next pass."""
        if isinstance(outcome, StorageError):
            # The deadlines are still two thirds of a timeout away: many flush passes.
            count = len(renewal.admissions)
            logger.warning("meterware: renewing %d reservations failed (%s)", count, outcome)
            return
        for request in renewal.admissions:
            if request.reservation_id in self._calls:
                self._renewed[request.reservation_id] = renewal.at_ns
