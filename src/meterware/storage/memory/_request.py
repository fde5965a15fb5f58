"""The in-process backend's request path: admission (as admit.lua), flush (as flush.lua), release."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace

from meterware.config import RateLimit
from meterware.metering.admission import (
    CONCURRENCY_METER,
    CONCURRENCY_RETRY_SECONDS,
    SPEND_CAP_NAME,
    AdmitRequest,
    Decision,
    LimitState,
    Reason,
    ScopedLimit,
    concurrency_state,
    meter_scope,
    moved_tat,
    quota_name,
    rate_limit_name,
    rate_moves,
    rate_scope,
)
from meterware.metering.records import KeyInfo
from meterware.storage._keyspace import SPENT_FIELD
from meterware.storage._once import without_events
from meterware.storage.base import (
    BATCH_MEMORY_SECONDS,
    Batch,
    LedgerEntry,
    StreamEntry,
)
from meterware.storage.memory._state import (
    Account,
    Holds,
    MemoryState,
    NewTat,
    Reservation,
    captured,
    check_amounts,
    clock_ms,
    counter_names,
    less,
    refusal,
)


class AdmissionMixin(MemoryState):
    """Resolve keys and admit calls."""

    def resolve_key(self, key_hash: str) -> KeyInfo | None:
        with self._lock:
            key_id = self._key_ids_by_hash.get(key_hash)
            if key_id is None:
                return None
            record = self._keys[key_id]
            account = self._accounts[record.customer]
            return KeyInfo(
                key_id,
                account.customer,
                record.live,
                record.prefix,
                record.remaining is not None,
                record.scopes,
                record.rate_limits,
            )

    def resolve_customer(self, customer_id: str) -> KeyInfo | None:
        with self._lock:
            account = self._accounts.get(customer_id)
            return None if account is None else KeyInfo("", account.customer, True, "")

    def admit(self, request: AdmitRequest) -> Decision:
        with self._lock:
            return self._admit(request, clock_ms())

    def _admit(self, request: AdmitRequest, now: int) -> Decision:
        # No key id: a customer the app authenticated itself (admit.lua's KEYED is 0).
        record = self._keys.get(request.key_id) if request.key_id else None
        account = self._accounts.get(request.customer)
        if request.key_id:
            # A key presented for another customer is as good as unknown (the Redis script finds no record).
            if record is None or account is None or record.customer != request.customer:
                return refusal(request, "unknown_key")
            if record.status != "active":
                return refusal(request, "revoked_key")
            if record.expires_ms and now >= record.expires_ms:
                return refusal(request, "expired_key")
            if record.remaining is not None and record.remaining <= 0:
                return refusal(request, "key_exhausted")
        elif account is None:
            return refusal(request, "unknown_customer")
        if account.customer.status != "active":
            return refusal(request, "suspended")
        counters = self._quotas[(request.live, request.customer, request.period_start)]
        seen, available = self._unsettled(request, counters, account, now)
        calls = request.calls
        if record is not None and record.remaining is not None:
            calls = min(calls, record.remaining)  # as admit.lua: never more calls than uses left
        decision, holds, new_tats = self._decide(request, seen, available, now, calls)
        if not decision.allowed and calls > 1:
            # As admit.lua: the largest of calls, calls/2, calls/4... that fits, halved once more.
            while not decision.allowed and calls > 1:
                calls //= 2
                decision, holds, new_tats = self._decide(request, seen, available, now, calls)
            if decision.allowed and calls > 1:
                calls //= 2
                decision, holds, new_tats = self._decide(request, seen, available, now, calls)
        if not decision.allowed:
            return decision

        credits = decision.reserved_credits
        if credits or any(held for _, held in holds):
            self._shards[request.shard].reservations[request.reservation_id] = Reservation(
                request.customer,
                request.live,
                request.period_start,
                credits,
                holds,
                now + request.reservation_timeout_ms,
            )
        for rate_key, new_tat in new_tats:
            self._rates[rate_key] = new_tat
        for meter, held in holds:
            counters[counter_names(meter)[1]] += held
        account.reserved += credits
        if record is not None and record.remaining is not None:
            self._keys[request.key_id] = replace(record, remaining=record.remaining - decision.calls)
        return decision

    def _unsettled(
        self, request: AdmitRequest, counters: Mapping[str, int], account: Account, now: int
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
            used_key, held_key = counter_names(hold.meter)
            used = seen.get(used_key, 0)
            seen[used_key] = used + charged
            seen[held_key] = max(0, seen.get(held_key, 0) - freed)
            cost += (max(hold.included, used + charged) - max(hold.included, used)) * hold.price
        # Counted as charged at these terms (the spend cap's count), as their credits are.
        seen[SPENT_FIELD] = seen.get(SPENT_FIELD, 0) + cost
        reserved = max(0, account.reserved - released)
        return seen, account.balance - reserved - (cost if request.charges_credits else 0)

    def _decide(
        self, request: AdmitRequest, counters: Mapping[str, int], available: int, now: int, calls: int
    ) -> tuple[Decision, Holds, list[NewTat]]:
        """What admitting ``calls`` calls would do (admit.lua's decide()): the decision, then what to write
        if it admits them: the units each meter holds and the rate limits' new TATs.

        A rate limit's TAT more than a period ahead is clamped first, in the store (admit.lua too)."""
        retry_ms = 0.0
        limits: list[LimitState] = []
        new_tats: list[NewTat] = []
        rates: tuple[RateLimit | ScopedLimit, ...] = request.plan.rate_limits
        if request.scoped_limits:
            rates += request.scoped_limits
        for rate in rates:
            if isinstance(rate, ScopedLimit):
                limit, scope, name = rate.limit, rate.scope, rate.name
            else:
                limit, scope, name = rate, meter_scope(rate.meter), rate_limit_name(rate.seconds, rate.meter)
            period_ms = limit.seconds * 1000
            interval = period_ms / limit.amount
            rate_key = (request.live, request.customer, limit.seconds, scope)
            tat = max(self._rates.get(rate_key, now), now)
            if tat - now > period_ms:
                # As admit.lua: a TAT more than one period ahead was never written so; clamped and repaired.
                tat = self._rates[rate_key] = now + period_ms
            new_tat = tat + interval * limit.estimate * calls
            if new_tat - now > period_ms:
                retry_ms = max(retry_ms, new_tat - period_ms - now)
                new_tat = tat  # refused: the caller stands where the TAT is
            else:
                new_tats.append((rate_key, new_tat))
            remaining, reset_ms = int((period_ms - (new_tat - now)) // interval), int(new_tat - now)
            limits.append(LimitState(name, limit.amount, limit.seconds, remaining, -(-reset_ms // 1000)))
        over_quota = over_concurrency = needs_positive_balance = False
        credits = 0
        # What the period's flushes charged (and this process's finished calls will), read under a cap only.
        spent = counters.get(SPENT_FIELD, 0) if request.spend_cap >= 0 else 0
        holds: list[tuple[str, int]] = []
        window = request.period_end - request.period_start
        until_period_end = max(0, request.period_end - now // 1000)
        for hold in request.holds:
            # A value meter's size is unknown until the end: one unit left admits it, however many calls.
            need, held_now = (hold.need * calls if hold.exact else hold.need), hold.hold * calls
            used_key, held_key = counter_names(hold.meter)
            used, held = counters.get(used_key, 0), counters.get(held_key, 0)
            holds.append((hold.meter, held_now))
            if hold.quota >= 0:
                remaining = hold.quota - used - held
                if used + held + need > hold.quota:
                    if hold.meter == CONCURRENCY_METER:
                        over_concurrency = True
                    else:
                        over_quota = True
                else:
                    remaining -= held_now
                if hold.meter == CONCURRENCY_METER:
                    limits.append(concurrency_state(hold.quota, max(0, remaining)))
                else:
                    name = quota_name(hold.meter)
                    limits.append(LimitState(name, hold.quota, window, max(0, remaining), until_period_end))
            if hold.price:
                base = used + held
                if request.spend_cap >= 0:
                    # Held calls at these terms; what was charged is counted as it was charged.
                    spent += (max(hold.included, base) - max(hold.included, used)) * hold.price
                credits += (max(hold.included, base + held_now) - max(hold.included, base)) * hold.price
                if not hold.exact and base + held_now >= hold.included:
                    needs_positive_balance = True
        cap, over_cap = request.spend_cap, False
        if cap >= 0:
            # As credits: a value meter's call past its included units needs room left after its hold.
            over_cap = spent + credits > cap or (needs_positive_balance and spent + credits >= cap)
            left = cap - spent - (0 if over_cap else credits)
            limits.append(LimitState(SPEND_CAP_NAME, cap, window, max(0, left), until_period_end))
        charges_credits = request.charges_credits
        if not charges_credits:
            credits = 0
        reason: Reason | None = None
        retry_after = 0
        if retry_ms:
            # admit.lua replies the whole milliseconds; the caller is told the seconds, rounded up.
            reason, retry_after = "rate_limited", -(-int(retry_ms) // 1000)
        elif over_concurrency:
            reason, retry_after = "concurrency_exceeded", CONCURRENCY_RETRY_SECONDS
        elif over_quota:
            reason, retry_after = "quota_exceeded", until_period_end
        elif over_cap:
            reason, retry_after = "spend_cap_reached", until_period_end
        elif charges_credits and (
            available < credits or (needs_positive_balance and available - credits <= 0)
        ):
            reason = "insufficient_credits"
        # Positional: this runs for every call.
        if reason:
            decision = Decision(
                False,
                reason,
                "",
                0,
                retry_after,
                tuple(limits),
                available if charges_credits else None,
                0,
            )
        else:
            holding = credits or any(held for _, held in holds)
            decision = Decision(
                True,
                None,
                request.reservation_id if holding else "",
                credits,
                0,
                tuple(limits),
                available - credits if charges_credits else None,
                calls,
            )
        return decision, tuple(holds), new_tats


class SettlementMixin(MemoryState):
    """Flush batches and release admissions."""

    def flush(self, batch: Batch) -> bool:
        with self._lock:
            shard = self._shards[batch.shard]
            now = time.time()
            if batch.batch_id in shard.batches and shard.batches[batch.batch_id] > now:
                return False
            # As flush.lua: a record whose marker is set (or set by an earlier record of the batch) is
            # taken out of the batch, its reservation closed (storage/_once.py).
            used_links, now_ms, duplicates, marked = self._used_links, int(now * 1000), [], set()
            for position, settlement in enumerate(batch.settlements):
                if settlement is not None and settlement.once:
                    marker = (settlement.customer, settlement.once)
                    if marker in marked or used_links.get(marker, 0) > now_ms:
                        duplicates.append(position)
                    marked.add(marker)
            if duplicates:
                batch = without_events(batch, duplicates)
                marked = {(s.customer, s.once) for s in batch.settlements if s is not None and s.once}
            # Plan every change, then make them (flush.lua does the same): the entry first, then the
            # settlements. A unit counter reads what the batch's earlier settlements added to it.
            # What the reservations named still hold (None once closed), and what goes back.
            holding: dict[str, Reservation | None] = {}
            freed: list[Reservation] = []
            used: dict[tuple[bool, str, int], dict[str, int]] = {}
            charges: dict[str, int] = {}
            costs = []
            reservations = shard.reservations
            for settlement in batch.settlements:
                cost = 0
                if settlement is not None:
                    # As flush.lua: a settlement's numbers come from the client (a spool file at worst).
                    # Checked before anything is changed: the plan changes nothing.
                    check_amounts(batch, settlement)
                    if settlement.billable:
                        quota = (settlement.live, settlement.customer, settlement.period_start)
                        counters = self._quotas.get(quota, {})
                        added = used.get(quota)
                        if added is None:
                            added = used[quota] = {}
                        for meter, units, price, included in settlement.meters:
                            name = counter_names(meter)[0]
                            before = counters.get(name, 0) + added.get(name, 0)
                            added[name] = added.get(name, 0) + units
                            cost += (max(included, before + units) - max(included, before)) * price
                        if cost:  # spend, charged to credits or not (as flush.lua)
                            added[SPENT_FIELD] = added.get(SPENT_FIELD, 0) + cost
                        if settlement.charges_credits and settlement.customer in self._accounts:
                            charges[settlement.customer] = charges.get(settlement.customer, 0) + cost
                    reservation_id = settlement.reservation_id
                    if reservation_id:
                        if reservation_id in holding:
                            reservation = holding[reservation_id]
                        else:
                            reservation = holding[reservation_id] = reservations.get(reservation_id)
                        if reservation is not None:
                            if settlement.closes:
                                freed.append(reservation)
                                holding[reservation_id] = None
                            elif settlement.billable:
                                taken = captured(reservation, settlement, cost)
                                freed.append(taken)
                                holding[reservation_id] = less(reservation, taken)
                costs.append(cost)
            fields = {
                b"b": batch.payload,
                b"c": ",".join(map(str, costs)).encode(),
                b"i": batch.batch_id.encode(),
            }

            shard.stream.append(StreamEntry(shard.next_id(), fields))
            shard.batches[batch.batch_id] = int(now) + BATCH_MEMORY_SECONDS
            for marker in marked:
                self._mark_used(marker, now_ms + BATCH_MEMORY_SECONDS * 1000)
            for release in batch.releases:
                if release.reservation_id in reservations:
                    freed.append(reservations.pop(release.reservation_id))
            for reservation_id, reservation in holding.items():
                if reservation is None:
                    reservations.pop(reservation_id, None)
                elif reservation_id in reservations:
                    reservations[reservation_id] = reservation
            for reservation in freed:
                self._release(reservation)
            for quota, added in used.items():
                counters = self._quotas[quota]
                for name, units in added.items():
                    counters[name] += units
            for customer, cost in charges.items():
                if cost:  # one ledger entry per customer and batch (as flush.lua)
                    self._accounts[customer].record(LedgerEntry("charge", -cost, ref=batch.batch_id))
            for (live, customer, limit, amount, seconds), units in rate_moves(batch.settlements).items():
                rate_key = (live, customer, seconds, rate_scope(limit))
                tat = moved_tat(self._rates.get(rate_key), now_ms, amount, seconds, units)
                if tat > now_ms:
                    self._rates[rate_key] = tat
                else:
                    self._rates.pop(rate_key, None)  # a full bucket, as no key
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

    def renew_reservations(self, admissions: Sequence[AdmitRequest]) -> int:
        with self._lock:
            now, renewed = clock_ms(), 0
            for admission in admissions:
                reservations = self._shards[admission.shard].reservations
                reservation = reservations.get(admission.reservation_id)
                if reservation is not None:
                    deadline = max(reservation.deadline_ms, now + admission.reservation_timeout_ms)
                    reservations[admission.reservation_id] = replace(reservation, deadline_ms=deadline)
                    renewed += 1
            return renewed
