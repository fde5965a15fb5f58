"""Events, meters and batches for the rollup tests."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from meterware.config import Config, Meter
from meterware.events import UsageEvent, encode_batch, new_event_id
from meterware.storage.base import Batch, Settlement, WindowTotals

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


def config(**rollup: Any) -> Config:
    """A configuration with the test meters and the given ``[rollup]`` settings."""
    meters = {name: {"aggregation": m.aggregation, "source": m.source} for name, m in METERS.items()}
    return Config.from_dict({"meters": meters, "rollup": rollup})


def event(
    customer: str = "acme",
    *,
    ts: int = T0_MS,
    outcome: str = "success",
    billable: bool | None = None,
    live: bool = True,
    units: dict[str, int | str] | None = None,
    period_start: int = PERIOD,
) -> UsageEvent:
    """One event; successes are billable unless said otherwise, and count one call."""
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
