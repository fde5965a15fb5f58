"""Events, meters and batches for the rollup tests."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from meterware.config import Config, Meter
from meterware.events import UsageEvent, encode_batch, new_event_id
from meterware.rollup.aggregate import fold
from meterware.storage._keyspace import shard_of
from meterware.storage.base import Batch, Settlement, Storage, Window, WindowTotals

#: 2026-03-14 15:09:26.535 UTC: not on any minute, hour or day boundary.
T0_MS = 1_773_500_966_535
PERIOD = 1_772_323_200  # 2026-03-01 00:00 UTC

METERS: Mapping[str, Meter] = {
    "calls": Meter("calls"),
    "tokens": Meter("tokens", "sum", "handler"),
    "peak": Meter("peak", "max", "handler"),
    "gauge": Meter("gauge", "last", "handler"),
    "users": Meter("users", "unique", "handler"),
}

_sequence = itertools.count()


def config(*, pipeline: dict[str, Any] | None = None, **rollup: Any) -> Config:
    """A configuration with the test meters and the given ``[rollup]`` settings."""
    meters = {name: {"aggregation": m.aggregation, "source": m.source} for name, m in METERS.items()}
    return Config.from_dict({"meters": meters, "rollup": rollup, "pipeline": pipeline or {}})


def event(
    customer: str = "acme",
    *,
    ts: int = T0_MS,
    outcome: str = "success",
    billable: bool | None = None,
    live: bool = True,
    units: dict[str, int | str] | None = None,
    period_start: int = PERIOD,
    reason: str | None = None,
) -> UsageEvent:
    """One event; successes are billable unless said otherwise, and count one call; a rejected call is
    refused for ``rate_limited`` unless ``reason`` says otherwise."""
    status = {"success": 200, "client_error": 404, "server_error": 500, "aborted": 499, "rejected": 429}
    return UsageEvent(
        id=new_event_id(ts),
        timestamp_ms=ts,
        customer=customer,
        key_id=f"key_{customer}",
        plan="default",
        route="/v1/things/{id}",
        method="GET",
        status=status[outcome],
        outcome=outcome,  # type: ignore[arg-type]
        duration_us=1200,
        ttfb_us=800,
        units={"calls": 1} if units is None else units,
        billable=outcome == "success" if billable is None else billable,
        live=live,
        period_start=period_start,
        reason=("rate_limited" if outcome == "rejected" else "") if reason is None else reason,
    )


def batch(shard: int, events: Sequence[UsageEvent], *, price: int = 0) -> Batch:
    """A flushable batch; with a ``price``, each billable event costs ``price`` per ``calls`` unit."""
    settlements = tuple(
        Settlement(
            customer=e.customer,
            live=e.live,
            period_start=e.period_start,
            reservation_id="",
            billable=e.billable,
            charges_credits=False,
            meters=(("calls", int(e.units.get("calls", 0)), price, 0),) if price else (),
        )
        for e in events
    )
    return Batch(shard, f"batch-{next(_sequence)}", encode_batch(events), settlements)


def flat(totals: WindowTotals) -> dict[str, int]:
    """A window's totals as ``read_usage`` reports them."""
    values = dict(totals.sums) | totals.maxes
    values |= {name: value for name, (_, value) in totals.lasts.items()}
    return values | {name: len(seen) for name, seen in totals.uniques.items()}


CUSTOMERS = tuple(f"cust-{i}" for i in range(12))
OUTCOMES = ("success",) * 6 + ("client_error", "server_error", "aborted", "rejected")
#: Why random events were refused (any outcome carries one, only rejected calls count it): known reasons,
#: and reasons no writer of this version makes.
REASONS = ("rate_limited",) * 3 + (
    "quota_exceeded",
    "insufficient_credits",
    "suspended",
    "",
    "from-the-future",
)


def random_events(rng: random.Random, count: int) -> list[UsageEvent]:
    """Events of several customers over three days (out of order, so some arrive late), live and test."""
    events: list[UsageEvent] = []
    for _ in range(count):
        units: dict[str, int | str] = {"calls": 1, "tokens": rng.randrange(200), "peak": rng.randrange(9999)}
        units |= {"gauge": rng.randrange(-50, 50), "users": f"user-{rng.randrange(30)}"}
        if rng.random() < 0.05:
            units["unconfigured"] = rng.randrange(5)
        events.append(
            event(
                rng.choice(CUSTOMERS),
                ts=T0_MS - rng.randrange(3 * 86_400_000),
                outcome=rng.choice(OUTCOMES),
                live=rng.random() < 0.8,
                units=units,
                period_start=PERIOD if rng.random() < 0.9 else PERIOD - 28 * 86_400,
                reason=REASONS[len(events) % len(REASONS)],  # not drawn: the draws stay as they were
            )
        )
    return events


def write_events(
    storage: Storage, events: Sequence[UsageEvent], *, batch_size: int, price: int = 0
) -> list[tuple[UsageEvent, int]]:
    """Flush events to their customers' shards in batches; return each event with its expected cost."""
    by_shard: dict[int, list[UsageEvent]] = {}
    for e in events:
        by_shard.setdefault(shard_of(e.customer, storage.shards), []).append(e)
    written = []
    for shard, shard_events in sorted(by_shard.items()):
        for start in range(0, len(shard_events), batch_size):
            chunk = shard_events[start : start + batch_size]
            assert storage.flush(batch(shard, chunk, price=price))
            written += [(e, price if e.billable else 0) for e in chunk]
    return written


def expected_usage(written: Sequence[tuple[UsageEvent, int]]) -> dict[Window, dict[str, int]]:
    """What ``read_usage`` must report for every window, folding all events in one go."""
    totals = fold([e for e, _ in written], [c for _, c in written], METERS)
    return {window: flat(window_totals) for window, window_totals in totals.items()}


def read_all(storage: Storage, windows: Iterable[Window]) -> dict[Window, dict[str, int]]:
    """What the backend reports for each window."""
    return {w: storage.read_usage(w.customer, w.live, w.window, w.start) for w in windows}
