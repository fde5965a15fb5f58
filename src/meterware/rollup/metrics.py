"""Prometheus metrics of the rollup worker: its progress, the lag of each shard, and per-customer numbers.

``meterware rollup --metrics-port 9464`` serves them. Per-customer series (usage of the current billing
period by meter, credit balance) are the only ones labelled by customer in meterware: they are read in the
background every ``--customer-metrics-interval`` seconds, for at most ``--customer-metrics`` customers
(``0`` switches them off), so their number stays bounded by customers x meters.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from meterware._tallies import PerRegistry, Tallies
from meterware.config import MICROS_PER_CREDIT, Config
from meterware.errors import StorageError
from meterware.metering.periods import period_bounds
from meterware.storage.base import Storage

logger = logging.getLogger("meterware.rollup")

BATCH_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Customers exported by default (``--customer-metrics``).
DEFAULT_CUSTOMER_LIMIT: Final = 1000
#: Seconds between two reads of the per-customer numbers by default.
DEFAULT_CUSTOMER_INTERVAL: Final = 30.0


@dataclass(frozen=True, slots=True)
class MetricsOptions:
    """Where the worker serves its metrics and how many per-customer series it exports."""

    port: int
    host: str = "127.0.0.1"
    #: Customers whose usage and balance are exported at most (0: none).
    customers: int = DEFAULT_CUSTOMER_LIMIT
    #: Seconds between two reads of the per-customer numbers.
    interval: float = DEFAULT_CUSTOMER_INTERVAL
    #: The registry served (prometheus-client's global ``REGISTRY`` by default).
    registry: CollectorRegistry | None = None


def add_metrics_arguments(parser: argparse.ArgumentParser) -> None:
    """The worker's metrics options, shared by ``meterware rollup`` and ``python -m meterware.rollup``."""
    parser.add_argument(
        "--metrics-port", type=int, metavar="PORT", help="serve Prometheus metrics on this port at /metrics"
    )
    parser.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="HOST",
        help="address to serve the metrics on (default 127.0.0.1; 0.0.0.0 for every interface)",
    )
    parser.add_argument(
        "--customer-metrics",
        type=int,
        default=DEFAULT_CUSTOMER_LIMIT,
        metavar="N",
        help=f"export usage and balance of at most N customers (default {DEFAULT_CUSTOMER_LIMIT}; 0: none)",
    )
    parser.add_argument(
        "--customer-metrics-interval",
        type=float,
        default=DEFAULT_CUSTOMER_INTERVAL,
        metavar="SECONDS",
        help=f"seconds between reads of the per-customer numbers (default {DEFAULT_CUSTOMER_INTERVAL:g})",
    )


def metrics_options(args: argparse.Namespace) -> MetricsOptions | None:
    """The options parsed by :func:`add_metrics_arguments` (None without ``--metrics-port``)."""
    if args.metrics_port is None:
        return None
    return MetricsOptions(
        port=args.metrics_port,
        host=args.metrics_host,
        customers=max(0, args.customer_metrics),
        interval=max(0.1, args.customer_metrics_interval),
    )


@dataclass(slots=True)
class ShardLag:
    """What the worker knows of a shard's backlog as of its last read."""

    #: Stream id time (epoch ms) of the oldest entry not yet committed; None when caught up.
    oldest_ms: int | None = None
    #: Entries after the committed offset; None until the worker could count them exactly.
    behind: int | None = None
    #: Stream length at the last read.
    length: int = 0


class RollupMetrics(PerRegistry):
    """The worker's metrics in one registry (one instance per registry and process)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        metrics = Tallies(registry)
        self.events = metrics.counter("meterware_rollup_events", "Events rolled up (committed exactly once).")
        self.entries = metrics.counter(
            "meterware_rollup_entries", "Stream entries (event batches) committed, dead letters included."
        )
        self.dead_letters = metrics.counter(
            "meterware_rollup_dead_letters",
            "Stream entries moved to the dead-letter stream (not valid event batches).",
        )
        self.batch_duration = metrics.histogram(
            "meterware_rollup_batch_duration_seconds",
            "Time to read, fold and commit one batch of one shard.",
            BATCH_BUCKETS,
        )
        self.refunded = metrics.counter(
            "meterware_rollup_reservations_refunded",
            "Reservations refunded after policy.reservation_timeout (their app process never settled).",
        )
        self.errors = metrics.counters(
            "meterware_rollup_errors", "Backend errors met by the worker, by shard.", ("shard",)
        )
        self.last_round = metrics.gauge(
            "meterware_rollup_last_round_timestamp_seconds",
            "When the worker last completed a round over its shards with the backend answering (Unix time).",
        )
        self.shards_owned = metrics.gauge(
            "meterware_rollup_shards_owned", "Shards this worker holds the lease of."
        )
        self.alerts = metrics.counters(
            "meterware_alerts",
            "Alerts fired (each once per customer, billing period and threshold), by type.",
            ("type",),
        )
        self.webhooks_delivered = metrics.counter(
            "meterware_alert_webhooks_delivered", "Alerts delivered to the webhook."
        )
        self.webhooks_failed = metrics.counter(
            "meterware_alert_webhooks_failed",
            "Alerts not delivered to the webhook (attempts used up, refused, or queue full): "
            "on the alerts stream only.",
        )
        metrics.register()
        #: Per shard this worker works on: its backlog (read by the lag collector at scrape time).
        self.lag: dict[int, ShardLag] = {}
        registry.register(_LagCollector(self.lag))


class _LagCollector(Collector):
    """The backlog of each shard, aged at scrape time (a stuck worker's lag keeps growing)."""

    def __init__(self, lag: dict[int, ShardLag]) -> None:
        self.lag = lag

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        seconds, entries = self._families()
        now_ms = time.time() * 1000
        for shard, state in sorted(self.lag.items()):
            label = [str(shard)]
            oldest = state.oldest_ms
            seconds.add_metric(label, 0.0 if oldest is None else max(0.0, now_ms - oldest) / 1000)
            if state.behind is not None:
                entries.add_metric(label, state.behind)
        yield seconds
        yield entries

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "meterware_rollup_lag_seconds",
                "Age of the oldest event batch of the shard not yet rolled up (0 when caught up).",
                labels=["shard"],
            ),
            GaugeMetricFamily(
                "meterware_rollup_lag_entries",
                "Stream entries (event batches) of the shard after its committed offset.",
                labels=["shard"],
            ),
        )


@dataclass(frozen=True, slots=True)
class _Snapshot:
    customers: int = 0
    usage: dict[tuple[str, str], int] = field(default_factory=dict)
    balances: dict[str, float] = field(default_factory=dict)


class CustomerMetrics(Collector):
    """Per-customer usage of the current billing period (live keys) and credit balances.

    Read by :meth:`run` in the background (never at scrape time), for at most ``limit`` customers in id
    order; ``meterware_customers`` tells how many there are in all.
    """

    def __init__(self, storage: Storage, config: Config, *, limit: int, interval: float) -> None:
        self.storage = storage
        self.config = config
        self.limit = limit
        self.interval = interval
        self._snapshot = _Snapshot()

    def refresh(self, now: float | None = None) -> None:
        """Read the numbers now (a few backend calls per customer, up to ``limit`` customers)."""
        now = time.time() if now is None else now
        ids = self.storage.list_customers()
        self.config.stored.refresh(self.config, self.storage.stored_plans)
        usage: dict[tuple[str, str], int] = {}
        balances: dict[str, float] = {}
        meters = tuple(self.config.meters)
        for customer_id in ids[: self.limit]:
            customer = self.storage.get_customer(customer_id)
            if customer is None:
                continue
            plan = self.config.plan(customer.plan)
            start, _ = period_bounds(customer.anchor, plan.period, now)
            totals = self.storage.read_usage(customer_id, True, "period", start)
            for meter in meters:
                usage[(customer_id, meter)] = totals.get(meter, 0)
            balances[customer_id] = self.storage.get_balance(customer_id).balance / MICROS_PER_CREDIT
        self._snapshot = _Snapshot(len(ids), usage, balances)

    def run(self, stop: threading.Event) -> None:
        """Refresh every ``interval`` seconds until ``stop`` is set."""
        while not stop.is_set():
            try:
                self.refresh()
            except StorageError as error:
                logger.warning("per-customer metrics not refreshed: %s", error)
            except Exception:
                logger.exception("per-customer metrics not refreshed")
            stop.wait(self.interval)

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snapshot = self._snapshot
        count, usage, balances = self._families()
        count.add_metric([], snapshot.customers)
        for (customer_id, meter), value in snapshot.usage.items():
            usage.add_metric([customer_id, meter], value)
        for customer_id, balance in snapshot.balances.items():
            balances.add_metric([customer_id], balance)
        yield count
        yield usage
        yield balances

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily("meterware_customers", "Customers in the backend (exported or not)."),
            GaugeMetricFamily(
                "meterware_customer_period_usage",
                "Usage of the customer's current billing period by meter (live keys, rolled up).",
                labels=["customer", "meter"],
            ),
            GaugeMetricFamily(
                "meterware_customer_balance_credits",
                "The customer's prepaid credit balance (credits; reservations in flight not deducted).",
                labels=["customer"],
            ),
        )
