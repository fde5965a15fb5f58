"""admit.lua's protocol, named once: the arguments of the calls to admit and the reply to each.

The Redis backend builds the arguments here and reads the reply with :func:`decision_from_reply`;
``MemoryStorage``, whose admission the script mirrors, builds the same ``Decision`` without a reply. The
header of ``admit.lua`` describes the same layout from the script's side.

The reply to one call is ``[allowed, reason, retry_after_ms, reserved_credits, available_credits,
calls_granted, (rate_remaining, rate_reset_ms) per rate limit (the plan's, then the scoped ones)...,
quota_remaining per hard-quota hold (a concurrency slot's too)..., spend_cap_remaining if capped]``.
A rate limit of a meter's units (``100000 tokens/minute``) is one more rate limit whose call takes its
estimate instead of 1 (the flush corrects the TAT by the call's actual units: ``flush.lua``).
A refusal decided before any limit was read (key, customer) stops after ``available_credits``.
The script also replies ``[SCRIPT_REFUSED, error]`` for a call whose keys hold garbage (it wrote nothing)
and ``[STALE_REPLY, "STALE"]`` for a guarded call to ask again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, TypeAlias

import msgpack

from meterware.metering.admission import (
    CONCURRENCY_METER,
    CONCURRENCY_RETRY_SECONDS,
    SPEND_CAP_NAME,
    AdmitRequest,
    Decision,
    LimitState,
    concurrency_state,
    holds_anything,
    meter_scope,
    quota_name,
    rate_limit_name,
)
from meterware.metering.cache import LRUCache
from meterware.metering.unsettled import Snapshot
from meterware.storage import _keyspace as ks

Arg: TypeAlias = str | int | bytes
Reply: TypeAlias = Sequence[int | bytes | str]

#: The first value of a reply to a call whose keys hold garbage (refused before its first write).
SCRIPT_REFUSED: Final = -1
#: The first value of the reply to a guarded call whose process wrote a batch since the call read its
#: unsettled calls: it wrote nothing and is to be asked again.
STALE_REPLY: Final = -2
#: Where the limit states start in a reply (after the six values every decided call has).
LIMITS_AT: Final = 6


def decision_from_reply(request: AdmitRequest, reply: Reply, now: float) -> Decision:
    """Read the reply to one call (see the module's docstring)."""
    allowed = bool(int(reply[0]))
    reason = reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1])
    until_period_end = max(0, request.period_end - int(now))
    limits: list[LimitState] = []
    # Refusals decided before the limits were looked at (key, customer) carry no limit state.
    if len(reply) > LIMITS_AT:
        index = LIMITS_AT
        for limit in request.plan.rate_limits:
            remaining, reset_ms = int(reply[index]), int(reply[index + 1])
            name = rate_limit_name(limit.seconds, limit.meter)
            limits.append(LimitState(name, limit.amount, limit.seconds, remaining, -(-reset_ms // 1000)))
            index += 2
        for scoped in request.scoped_limits:
            remaining, reset_ms = int(reply[index]), int(reply[index + 1])
            limit = scoped.limit
            limits.append(
                LimitState(scoped.name, limit.amount, limit.seconds, remaining, -(-reset_ms // 1000))
            )
            index += 2
        window = request.period_end - request.period_start
        for hold in request.holds:
            if hold.quota >= 0:
                remaining = max(0, int(reply[index]))
                if hold.meter == CONCURRENCY_METER:
                    limits.append(concurrency_state(hold.quota, remaining))
                else:
                    limits.append(
                        LimitState(quota_name(hold.meter), hold.quota, window, remaining, until_period_end)
                    )
                index += 1
        if request.spend_cap >= 0:
            remaining = max(0, int(reply[index]))
            limits.append(LimitState(SPEND_CAP_NAME, request.spend_cap, window, remaining, until_period_end))
    if reason == "quota_exceeded" or reason == "spend_cap_reached":
        retry_after = until_period_end
    elif reason == "concurrency_exceeded":
        retry_after = CONCURRENCY_RETRY_SECONDS
    else:
        retry_after = max(0, -(-int(reply[2]) // 1000))
    reserved_credits = int(reply[3])
    # Positional: this runs for every call admitted on its own.
    return Decision(
        allowed,
        reason or None,  # type: ignore[arg-type]
        request.reservation_id if allowed and holds_anything(request, reserved_credits) else "",
        reserved_credits,
        retry_after,
        tuple(limits),
        int(reply[4]) if request.charges_credits else None,
        int(reply[5]) if len(reply) > 5 else 0,
    )


#: Admission templates kept (a template per key, plan terms, period and route weight in use).
TEMPLATE_CACHE_SIZE: Final = 10_000
Template: TypeAlias = tuple[tuple[str, ...], tuple[Arg, ...]]
_templates: LRUCache[tuple[object, ...], Template] = LRUCache(TEMPLATE_CACHE_SIZE)


def admit_template(request: AdmitRequest) -> tuple[tuple[str, ...], tuple[Arg, ...]]:
    """The KEYS and arguments of one call in ``admit.lua``, less its reservation id (cached: calls with
    the same key, terms and period share them)."""
    identity = (
        request.shard,
        request.key_id,
        request.customer,
        request.live,
        request.plan.name,
        request.plan.prepaid,
        request.plan.rate_limits,
        request.period_start,
        request.period_end,
        request.holds,
        request.reservation_timeout_ms,
        request.calls,
        request.scoped_limits,
        request.spend_cap,
    )
    template = _templates.get(identity)
    if template is not None:
        return template
    shard, customer, live = request.shard, request.customer, request.live
    # KEY_RECORD, CUSTOMER, QUOTA, RESERVATIONS, DEADLINES, then FIRST_RATE on (admit.lua's names).
    keys = [
        ks.key_record(shard, request.key_id),
        ks.customer(shard, customer),
        ks.quota(shard, live, customer, request.period_start),
        ks.reservations(shard),
        ks.reservation_deadlines(shard),
    ]
    keys += [
        ks.rate(shard, live, customer, limit.seconds, meter_scope(limit.meter))
        for limit in request.plan.rate_limits
    ]
    keys += [ks.rate(shard, live, customer, s.limit.seconds, s.scope) for s in request.scoped_limits]
    # CUSTOMER_ID, CHARGES_CREDITS, RESERVATION_TIMEOUT_MS, QUOTA_EXPIRE_AT, RECORD_HEAD, CALLS, KEYED,
    # RATE_LIMITS (admit.lua's names), then the limits and the holds.
    args: list[Arg] = [
        customer,
        int(request.charges_credits),
        request.reservation_timeout_ms,
        request.period_end + ks.QUOTA_GRACE_SECONDS,
        f"{customer} {int(live)} {request.period_start}",
        request.calls,
        int(bool(request.key_id)),
        len(request.plan.rate_limits) + len(request.scoped_limits),
    ]
    for limit in request.plan.rate_limits:
        args += [limit.amount, limit.seconds]
    for scoped in request.scoped_limits:
        args += [scoped.limit.amount, scoped.limit.seconds]
    args.append(len(request.holds))
    for hold in request.holds:
        args += [hold.meter, hold.quota, hold.included, hold.price, hold.need, hold.hold, int(hold.exact)]
    if request.spend_cap >= 0:
        args.append(request.spend_cap)  # only when capped: a plan without a cap sends nothing more
    if request.plan.meter_limited or any(scoped.limit.meter for scoped in request.scoped_limits):
        # Only then: what each rate limit takes of a call (a meter's estimate; calls 1), after the cap.
        if request.spend_cap < 0:
            args.append("")
        args += [limit.estimate for limit in request.plan.rate_limits]
        args += [scoped.limit.estimate for scoped in request.scoped_limits]
    template = (tuple(keys), tuple(args))
    _templates.put(identity, template)
    return template


def admit_call(requests: Sequence[AdmitRequest], *, guarded: bool = True) -> tuple[list[str], list[Arg]]:
    """KEYS and ARGV of ``admit.lua`` admitting ``requests`` (of one shard) in order.

    ``guarded``: a call whose unsettled calls were read outside any batch is answered ``STALE`` (and
    writes nothing) if a batch its process made since has been written: it is to be asked again.
    """
    keys: list[str] = []
    args: list[Arg] = [0]
    calls: list[Arg] = []
    numbers: dict[int, int] = {}
    markers: list[str] = []  # batch markers, after every template's keys
    unsettled: list[tuple[int, list[list[int]]]] = []
    # The calls of a round are mostly one key's: their template is found once (cheap identities: the
    # objects all live while this runs). The customer too: calls without a key (customer_getter) share
    # the key id "" and, on one plan, the holds.
    seen: dict[tuple[object, ...], Template] = {}
    for request in requests:
        same = (
            request.key_id,
            request.customer,
            id(request.plan),
            id(request.holds),
            request.period_start,
            request.calls,
            id(request.scoped_limits),  # calls of one key to two limited routes share all the rest
        )
        template = seen.get(same)
        if template is None:
            template = seen[same] = admit_template(request)
        number = numbers.get(id(template))
        if number is None:
            number = numbers[id(template)] = len(numbers) + 1
            template_keys, template_args = template
            keys += template_keys
            args += (len(template_keys), len(template_args), *template_args)
        calls += (number, request.reservation_id, "")
        if snapshot := request.unsettled_changes():
            unsettled.append((len(calls) - 1, _unsettled_rows(request, snapshot, markers, guarded)))
    for at, rows in unsettled:
        for row in rows:
            row[0] = row[0] and row[0] + len(keys)
        calls[at] = msgpack.packb(rows)
    args[0] = len(numbers)
    return keys + markers, args + calls


#: What a change moves of a meter it does not name: ``[used, held]``.
_UNMOVED: Final = (0, 0)


def _unsettled_rows(
    request: AdmitRequest, snapshot: Snapshot, markers: list[str], guarded: bool
) -> list[list[int]]:
    """A call's changes still to come, as admit.lua reads them (key positions counted in ``markers``):
    first the guard (the key of its process's highest generation written, and the generation read),
    then per change the key of its batch marker, the credits it releases, and per hold the units."""
    rows = [[0, 0]]
    if guarded and snapshot.guarded:
        markers.append(ks.batch_writer(request.shard, snapshot.writer))
        rows[0] = [len(markers), snapshot.generation]
    for batch_id, change in snapshot.changes:
        marker = 0
        if batch_id:
            markers.append(ks.flushed_batch(request.shard, batch_id))
            marker = len(markers)
        row = [marker, change.released]
        for hold in request.holds:
            row += change.meters.get(hold.meter, _UNMOVED)  # [used, held]
        rows.append(row)
    return rows
