"""Metrics kept as plain tallies and exported at scrape time by one collector per registry.

prometheus-client updates each value under a lock of its own, and a histogram observation walks its
buckets in Python. A :class:`Tally` is a few plain numbers under a lock its :class:`Tallies` share, so the
request path adds everything a call counts in one step; at each scrape the collector reads them and yields
metric families, as prometheus-client's custom collectors do. On the wire they are what prometheus-client's
own ``Counter``, ``Gauge`` and ``Histogram`` would show: the same names, samples and ``_created`` series.

In multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``) another process reads the values from the files
prometheus-client's own metrics write, and it reads no custom collector: there every update goes to those
metrics at once.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Literal, Self

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import INF, floatToGoString

Kind = Literal["counter", "gauge", "histogram"]
#: How prometheus-client's multiprocess mode adds up a gauge over processes (meterware's gauges).
GaugeMode = Literal["all", "livesum", "livemax"]


def multiprocess_dir() -> str | None:
    """The prometheus-client multiprocess directory of this process, if it runs in that mode."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Tally:
    """One series: a counter's or gauge's value, or a histogram's buckets and sum, in plain numbers."""

    __slots__ = ("amount", "bounds", "buckets", "created", "lock")

    def __init__(self, lock: threading.Lock, bounds: tuple[float, ...] = ()) -> None:
        self.lock = lock
        #: A histogram's upper bounds, +Inf last; () for a counter or a gauge.
        self.bounds = bounds
        #: A counter's or gauge's value, or a histogram's sum of observations.
        self.amount: float = 0
        #: Observations per bucket (not cumulative).
        self.buckets = [0] * len(bounds)
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        with self.lock:
            self.amount += amount

    def dec(self, amount: float = 1) -> None:
        with self.lock:
            self.amount -= amount

    def set(self, value: float) -> None:
        with self.lock:
            self.amount = value

    def observe(self, value: float) -> None:
        with self.lock:
            self.add(value)

    def add(self, value: float) -> None:
        """Observe ``value`` (a histogram's; under the lock)."""
        self.amount += value
        self.buckets[bisect_left(self.bounds, value)] += 1


class ClientTally(Tally):
    """A series of prometheus-client's own (multiprocess mode): every update is handed to it at once."""

    # Slots named as Tally's methods hold the child's bound methods instead: an update costs no call
    # more than prometheus-client's own (a histogram's child has no ``inc``, a counter's no ``observe``).
    __slots__ = ("dec", "inc", "observe", "set")

    def __init__(self, lock: threading.Lock, child: Counter | Gauge | Histogram) -> None:
        super().__init__(lock)
        for method in ClientTally.__slots__:
            if hasattr(child, method):
                setattr(self, method, getattr(child, method))


class Family:
    """A metric: its name, help, label names and buckets, and a :class:`Tally` per label values."""

    def __init__(
        self,
        lock: threading.Lock,
        kind: Kind,
        name: str,
        documentation: str,
        labelnames: tuple[str, ...],
        buckets: tuple[float, ...],
        read: Callable[[], float] | None,
        client: Counter | Gauge | Histogram | None,
    ) -> None:
        self.kind = kind
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self.bounds = (*buckets, INF) if kind == "histogram" else ()
        #: The ``le`` label of each bucket, as prometheus-client writes it.
        self.le = tuple(floatToGoString(bound) for bound in self.bounds)  # type: ignore[no-untyped-call]
        #: A gauge's value read at each scrape, in place of a tally.
        self.read = read
        self.client = client
        self._values_lock = lock
        self._lock = threading.Lock()  # for making children: a call may do so holding the values' lock
        self.children: dict[tuple[str, ...], Tally] = {}

    def labels(self, *values: str) -> Tally:
        """The series of these label values (made on first use, as prometheus-client's ``labels``)."""
        child = self.children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
            with self._lock:
                child = self.children.get(values)
                if child is None:
                    child = self.children[values] = self._child(values)
        return child

    def _child(self, values: tuple[str, ...]) -> Tally:
        if self.client is None:
            return Tally(self._values_lock, self.bounds)
        return ClientTally(self._values_lock, self.client.labels(*values) if values else self.client)

    def series(self) -> list[tuple[tuple[str, ...], Tally]]:
        with self._lock:
            return list(self.children.items())

    def empty(self) -> Metric:
        """The family without samples, of its type."""
        labels = list(self.labelnames)
        if self.kind == "counter":
            return CounterMetricFamily(self.name, self.documentation, labels=labels)
        if self.kind == "gauge":
            return GaugeMetricFamily(self.name, self.documentation, labels=labels)
        return HistogramMetricFamily(self.name, self.documentation, labels=labels)

    def export(self, series: list[tuple[tuple[str, ...], float, list[int], float]], created: bool) -> Metric:
        """The family with a sample set per series: ``(label values, amount, buckets, created)``."""
        family = self.empty()
        if self.read is not None:
            family.add_sample(self.name, {}, float(self.read()))
            return family
        for values, amount, buckets, since in series:
            if isinstance(family, HistogramMetricFamily):
                cumulative, total = [], 0
                for le, count in zip(self.le, buckets, strict=True):
                    total += count
                    cumulative.append((le, float(total)))
                family.add_metric(values, cumulative, float(amount))
                if created:  # prometheus-client's Histogram writes one; the family type has no argument
                    labels = dict(zip(self.labelnames, values, strict=True))
                    family.add_sample(f"{self.name}_created", labels, since)
            elif isinstance(family, CounterMetricFamily):
                family.add_metric(values, float(amount), since if created else None)
            else:
                family.add_sample(self.name, dict(zip(self.labelnames, values, strict=True)), float(amount))
        return family


class Tallies(Collector):
    """The metrics of one registry: families of tallies, exported by this collector at each scrape.

    Declare the families, then :meth:`register`. In multiprocess mode each family is prometheus-client's
    own metric, registered as it is declared, and its tallies hand every update to it.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        #: Whether the values stay here until scraped (False in multiprocess mode).
        self.tallied = multiprocess_dir() is None
        #: Guards every tally's values: a caller may hold it to add to several in one step.
        self.lock = threading.Lock()
        self.families: list[Family] = []
        # Asked at each scrape whether counters and histograms export ``_created`` series: a user may
        # switch them off (PROMETHEUS_DISABLE_CREATED_SERIES, disable_created_metrics()).
        self._created_probe = Counter("meterware_probe", "", registry=None) if self.tallied else None

    def counters(self, name: str, documentation: str, labelnames: tuple[str, ...]) -> Family:
        """A counter per label values (``meterware_x`` exports ``meterware_x_total``)."""
        return self._declare("counter", name, documentation, labelnames)

    def counter(self, name: str, documentation: str) -> Tally:
        return self.counters(name, documentation, ()).labels()

    def histograms(
        self, name: str, documentation: str, labelnames: tuple[str, ...], buckets: tuple[float, ...]
    ) -> Family:
        """A histogram per label values, of these upper bounds (+Inf added)."""
        return self._declare("histogram", name, documentation, labelnames, buckets)

    def histogram(self, name: str, documentation: str, buckets: tuple[float, ...]) -> Tally:
        return self.histograms(name, documentation, (), buckets).labels()

    def gauge(
        self,
        name: str,
        documentation: str,
        *,
        multiprocess_mode: GaugeMode = "all",
        read: Callable[[], float] | None = None,
    ) -> Tally:
        """A gauge; ``read`` gives its value at each scrape instead (not in multiprocess mode, where a
        scrape runs in another process: there the owner counts with ``inc`` and ``dec``)."""
        return self._declare("gauge", name, documentation, (), (), multiprocess_mode, read).labels()

    def _declare(
        self,
        kind: Kind,
        name: str,
        documentation: str,
        labelnames: tuple[str, ...],
        buckets: tuple[float, ...] = (),
        multiprocess_mode: GaugeMode = "all",
        read: Callable[[], float] | None = None,
    ) -> Family:
        client: Counter | Gauge | Histogram | None = None
        if not self.tallied:
            read = None
            if kind == "counter":
                client = Counter(name, documentation, labelnames, registry=self.registry)
            elif kind == "gauge":
                client = Gauge(
                    name,
                    documentation,
                    labelnames,
                    registry=self.registry,
                    multiprocess_mode=multiprocess_mode,
                )
            else:
                client = Histogram(name, documentation, labelnames, registry=self.registry, buckets=buckets)
        family = Family(self.lock, kind, name, documentation, labelnames, buckets, read, client)
        self.families.append(family)
        return family

    def register(self) -> None:
        """Have the registry scrape the families declared (in multiprocess mode, they already are)."""
        if self.tallied:
            self.registry.register(self)

    def describe(self) -> Iterator[Metric]:
        for family in self.families:
            yield family.empty()

    def collect(self) -> Iterator[Metric]:
        created = (
            self._created_probe is not None and len(next(iter(self._created_probe.collect())).samples) > 1
        )
        listed = [(family, family.series()) for family in self.families]
        with self.lock:  # a consistent reading: what one call added shows in all its series or in none
            read = [
                (family, [(values, t.amount, list(t.buckets), t.created) for values, t in series])
                for family, series in listed
            ]
        for family, series in read:
            yield family.export(series, created)


_instances: weakref.WeakKeyDictionary[CollectorRegistry, dict[type, object]] = weakref.WeakKeyDictionary()
_instances_lock = threading.Lock()


class PerRegistry:
    """Metrics registered once per registry and process, shared by everything that counts into it."""

    def __init__(self, registry: CollectorRegistry) -> None:
        """Register the metrics in ``registry`` (once per registry: see :meth:`for_registry`)."""

    @classmethod
    def for_registry(cls, registry: CollectorRegistry | None = None) -> Self:
        """The instance registered in ``registry`` (prometheus-client's ``REGISTRY`` by default)."""
        registry = REGISTRY if registry is None else registry
        with _instances_lock:
            made = _instances.setdefault(registry, {})
            instance = made.get(cls)
            if not isinstance(instance, cls):
                instance = made[cls] = cls(registry)
            return instance
