"""Leases (``admission = "lease"``): calls of one key reserved as a block by one admission, and the table of
a process's leases."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import Final

from meterware.config import Policy
from meterware.metering.admission import (
    AdmitRequest,
    Decision,
    MeterHold,
    ScopedLimit,
    SettledMeters,
    holds_full_price,
)
from meterware.metering.unsettled import CallChange, Unsettled
from meterware.storage.base import Settlement

#: Leases remembered per process; past this, idle ones are forgotten (the worker refunds their holds).
LEASE_TABLE_MAX: Final = 10_000
#: A lease's reservation outlives its serving time by this much before the worker refunds it.
LEASE_RESERVATION_GRACE_SECONDS: Final = 30.0

#: The key id, the holds' identity (plan terms, route weight, live or test; the holds are kept alive by
#: the leases listed under it), the billing period and the scoped rate limits' identity (route and key).
LeaseKey = tuple[str, int, int, int]


@dataclass(slots=True)
class Lease:
    """Calls of one key (at one route weight, in one period) reserved as a block by one admission.

    The block's reservation holds every call of the lease, so no hard quota or balance is ever passed;
    each call is settled on its own, charged from scratch, and the block's reservation is closed by the
    settlement of the lease's last call, or by the flusher once the lease is spent and its calls are
    written (when its last call finished before the lease ran out of time).
    """

    #: The block's admission (``calls`` calls) and its reservation.
    block: AdmitRequest
    #: What one call of the lease is (how its settlement is priced).
    call_request: AdmitRequest
    decision: Decision
    headers: list[tuple[bytes, bytes]]
    left: int
    #: ``time.monotonic()`` after which the lease serves no more calls.
    until: float
    in_flight: int = 0
    #: Whether a call's settlement has been given the block's reservation to close.
    released: bool = False
    #: Whether the next lease is being fetched ahead of need.
    renewing: bool = False
    #: Whether its calls take their share out of the block as they settle: only when every meter a call
    #: holds counts calls, so a call's units are its own hold. (A value meter's call may use more than
    #: its hold: it would take what the block holds for the calls still running.)
    captures: bool = False
    #: The settlement most of its calls share (when it ``captures``).
    capture: Settlement | None = None
    #: What the block's reservation still holds, as its calls' settlements will leave it: credits, and
    #: units per hold (what closing it releases).
    credits_left: int = 0
    held_left: list[int] = field(default_factory=list)

    def releases(
        self, settlement: Settlement, settled: SettledMeters, billable: bool
    ) -> tuple[int, list[int]]:
        """What one call's settlement releases of the block, as the flush will (under the lease lock):
        what is left when it closes the block; a capture's units and cost, at most what is left."""
        if settlement.reservation_id != self.block.reservation_id or not (settlement.closes or billable):
            return 0, [0] * len(self.held_left)
        if settlement.closes:
            released, freed = self.credits_left, self.held_left
        else:
            freed = [min(units, left) for (_, units, _, _), left in zip(settled, self.held_left, strict=True)]
            released = min(sum(units * price for _, units, price, _ in settled), self.credits_left)
        self.credits_left -= released
        self.held_left = [left - free for left, free in zip(self.held_left, freed, strict=True)]
        return released, freed


def lease_key(
    key_id: str, holds: tuple[MeterHold, ...], period_start: int, scoped: tuple[ScopedLimit, ...]
) -> LeaseKey:
    """What calls sharing a lease have in common: the key, the holds (plan terms, route weight, live or
    test), the billing period and the route's and key's rate limits."""
    return (key_id, id(holds), period_start, id(scoped))


def lease_block(request: AdmitRequest, policy: Policy) -> AdmitRequest | None:
    """The admission of a lease for calls like ``request``: up to ``lease_calls`` of them at once (the
    backend grants as many as fit, fewer near a limit).

    None when a lease would hold too little to be worth it (a rate limit allows so few calls that a
    block would take a large share of it), or cannot bound what its calls use: a value meter that is
    priced or under a hard quota is admitted call by call, each counting the calls finished before; so
    is a key's call that takes one of its remaining uses (``one_by_one``).
    """
    if request.one_by_one or any(
        not hold.exact and (hold.price or hold.quota >= 0) for hold in request.holds
    ):
        return None
    calls = policy.lease_calls
    for limit in request.plan.rate_limits:
        calls = min(calls, limit.amount // (4 * limit.estimate))  # a meter's: each call takes its estimate
    for scoped in request.scoped_limits:
        calls = min(calls, scoped.limit.amount // (4 * scoped.limit.estimate))
    if calls < 2:
        return None
    deadline = policy.lease_seconds + LEASE_RESERVATION_GRACE_SECONDS
    return replace(request, calls=calls, reservation_timeout_ms=int(deadline * 1000))


def captures(request: AdmitRequest, decision: Decision) -> bool:
    """Whether a lease's calls take their share out of its block as they settle: when the block holds
    each call's full price (a block that spans the included units holds less for some calls: what a
    call's settlement takes of it then depends on the order the calls are flushed in, which admission
    cannot know)."""
    return holds_full_price(request, decision.reserved_credits, decision.calls)


class LeaseTable:
    """A process's leases, by :func:`lease_key` (thread-safe: threaded servers share them)."""

    def __init__(self, policy: Policy, unsettled: Unsettled) -> None:
        self.policy = policy
        self.unsettled = unsettled
        #: The leases of each key, oldest first (two while the next one is fetched ahead of need).
        self._leases: dict[LeaseKey, list[Lease]] = {}
        self.lock = threading.Lock()
        #: Spent leases' blocks being closed by the flusher: what closing each releases.
        self._closing_blocks: dict[str, CallChange] = {}

    def __bool__(self) -> bool:
        return bool(self._leases)

    def grant(
        self,
        request: AdmitRequest,
        block: AdmitRequest,
        decision: Decision,
        headers: list[tuple[bytes, bytes]],
        *,
        take: bool,
    ) -> Lease:
        """Keep the lease the backend granted for calls like ``request`` (``take``: this call is its
        first)."""
        lease = Lease(
            block,
            request,
            decision,
            headers,
            left=decision.calls,
            until=time.monotonic() + self.policy.lease_seconds,
            captures=captures(request, decision),
            credits_left=decision.reserved_credits,
            held_left=[hold.hold * decision.calls for hold in request.holds],
        )
        with self.lock:
            if len(self._leases) >= LEASE_TABLE_MAX:
                # Forget keys whose leases are all idle (the flusher or the worker closes them).
                for identity, leases in list(self._leases.items()):
                    if not any(old.in_flight for old in leases):
                        del self._leases[identity]
            self._leases.setdefault(
                lease_key(request.key_id, request.holds, request.period_start, request.scoped_limits), []
            ).append(lease)
            if take:
                lease.left -= 1
                lease.in_flight += 1
        return lease

    def take(self, identity: LeaseKey) -> Lease | None:
        """Take one call from a serving lease of a key (``lease_key``), the oldest first."""
        with self.lock:
            now = time.monotonic()
            for lease in self._leases.get(identity, ()):
                if lease.left > 0 and now < lease.until:
                    lease.left -= 1
                    lease.in_flight += 1
                    return lease
        return None

    def finished(self, lease: Lease) -> bool:
        """One of the lease's calls finished: whether its settlement closes the block (the lease serves no
        more calls and this was the last one in flight)."""
        with self.lock:
            lease.in_flight -= 1
            spent = lease.left <= 0 or time.monotonic() >= lease.until
            closing = spent and lease.in_flight == 0 and not lease.released
            lease.released |= closing
        return closing

    def releases(
        self, lease: Lease, settlement: Settlement, settled: SettledMeters, billable: bool
    ) -> tuple[int, list[int]]:
        """:meth:`Lease.releases`, under the table's lock."""
        with self.lock:
            return lease.releases(settlement, settled, billable)

    def spent(self, final: bool) -> list[AdmitRequest]:
        """Take (and forget) the leases that serve no more calls and have none in flight: their blocks, to
        close once everything buffered is written (``final``: every idle lease, the process is stopping)."""
        now = time.monotonic()
        spent: list[AdmitRequest] = []
        with self.lock:
            for identity, leases in list(self._leases.items()):
                for lease in list(leases):
                    if lease.in_flight or not (final or lease.left <= 0 or now >= lease.until):
                        continue
                    leases.remove(lease)
                    if not lease.released:
                        lease.released = True
                        spent.append(lease.block)
                        self._closing_blocks[lease.block.reservation_id] = change = _block_change(lease)
                        self.unsettled.add(change)
                if not leases:
                    del self._leases[identity]
        return spent

    def closed(self, blocks: list[AdmitRequest]) -> None:
        """Spent leases' blocks are closed: their releases are written."""
        self.unsettled.discard(
            change for block in blocks if (change := self._closing_blocks.pop(block.reservation_id, None))
        )


def _block_change(lease: Lease) -> CallChange:
    """What closing a spent lease's block releases (counted at admission until it is closed)."""
    block = lease.block
    meters = tuple((hold.meter, 0, held) for hold, held in zip(block.holds, lease.held_left, strict=True))
    change = (block.customer, block.live, block.period_start), lease.credits_left, meters
    lease.credits_left, lease.held_left = 0, [0] * len(lease.held_left)
    return change
