"""The calls in flight in this process that hold a reservation, whose deadlines the flusher renews.

A reservation's deadline (``policy.reservation_timeout`` after its admission) is when the worker takes its
process for dead and refunds what it holds: its credits, its units, its concurrency slot. A call may rightly
run longer (a stream, a slow handler); while it does, its process pushes the deadline forward, so only the
reservations of a process that died are refunded.
"""

from __future__ import annotations

import itertools
import logging
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
    """A flush pass's step: renew the reservations of ``calls`` (still running)."""

    calls: list[Call]
    #: When they were found due (``time.perf_counter_ns()``): their deadlines are renewed from then on.
    at_ns: int

    @property
    def admissions(self) -> list[AdmitRequest]:
        return [call.request for call in self.calls]


class CallsInFlight:
    """This process's admitted calls until they finish: the flusher renews the reservations of those that
    run long, and the exit drain waits for them (a threaded server finishes a call in its own thread after
    the client has the response, so a SIGTERM can reach the exit first).

    A call is held by a weak reference: one its adapter never finishes (a server that drops the response
    unclosed) is forgotten once collected, and its reservation is then the worker's to refund. Each
    dictionary step is atomic, so threads add while the flusher reads without a lock (a lock cost four
    times as much per call).
    """

    def __init__(self) -> None:
        self._calls: dict[int, weakref.ref[Call]] = {}
        self._keys = itertools.count()

    def add(self, call: Call) -> None:
        """Follow ``call`` until it finishes (the request path's only step here)."""
        self._calls[next(self._keys)] = weakref.ref(call)

    def running(self) -> int:
        """How many calls have not finished."""
        calls = [ref() for ref in list(self._calls.values())]
        return sum(1 for call in calls if call is not None and not call.finished)

    def wait(self, timeout: float) -> int:
        """Wait until every call has finished, at most ``timeout`` seconds: how many are still running."""
        deadline = time.monotonic() + timeout
        while (running := self.running()) and time.monotonic() < deadline:
            time.sleep(0.01)
        return running

    def due(self) -> Renewal | None:
        """The calls still running whose reservations are due for renewal (None: none is); the calls that
        ended are forgotten (their settlements close their reservations). Called by every flush pass."""
        now = time.perf_counter_ns()
        due: list[Call] = []
        ended: list[int] = []
        # A copy made in one step: walking the dict itself makes a tuple per call, and a collection
        # that one sets off may run a finalizer, and another thread's pass, in the middle of it.
        for key, ref in self._calls.copy().items():
            call = ref()
            if call is None or call.finished:
                ended.append(key)
            elif call.lease is None and call.decision.reservation_id:  # a lease's block has its own life
                since = call.renewed_ns or call.started_ns
                if now - since >= call.request.reservation_timeout_ms * 1_000_000 * RENEW_AFTER:
                    due.append(call)
        for key in ended:
            self._calls.pop(key, None)  # a pass running at once (the exit drain's) may forget it first
        return Renewal(due, now) if due else None

    def renewed(self, renewal: Renewal, outcome: object) -> None:
        """How writing ``renewal`` went (the :class:`StorageError` it raised, or None): its reservations'
        deadlines are pushed forward from ``renewal.at_ns``, or renewed again with the next pass."""
        if isinstance(outcome, StorageError):
            # The deadlines are still two thirds of a timeout away: many flush passes.
            count = len(renewal.calls)
            logger.warning("meterware: renewing %d reservations failed (%s)", count, outcome)
            return
        for call in renewal.calls:
            call.renewed_ns = renewal.at_ns
