"""Prometheus metrics of the app side, and the ``/metrics`` endpoint to mount with one line.

    app.add_route("/metrics", meterware.metrics.endpoint)                   # Starlette / FastAPI
    app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/metrics": meterware.metrics.wsgi_app()})  # Flask

The middleware registers its metrics in prometheus-client's global ``REGISTRY`` unless given another
``registry=``; an app that already exposes prometheus-client serves them with everything else. Labels are
bounded: route *templates* (``<unmatched>`` when the router matched nothing, ``<other>`` past
:data:`MAX_ROUTES` distinct ones), standard methods, outcomes, plans, meters and reasons; never a customer
or a key (per-customer numbers come from the rollup worker's ``/metrics``).

Under a pre-fork server, set ``PROMETHEUS_MULTIPROC_DIR`` (an empty directory) in the environment before
it starts, and call :func:`child_exit` from gunicorn's ``child_exit`` hook: the endpoints here then
aggregate every worker process's values.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from bisect import bisect_left
from collections.abc import Callable, Mapping, Sized
from typing import TYPE_CHECKING, Any, Final, get_args

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, Metric
from prometheus_client.exposition import choose_encoder, make_asgi_app, make_wsgi_app
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from starlette.requests import Request
from starlette.responses import Response

from meterware.events import bounded_method
from meterware.metering.admission import Reason

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication
    from starlette.types import Receive, Scope, Send

__all__ = [
    "MetricsApp",
    "asgi_app",
    "child_exit",
    "endpoint",
    "exposition",
    "exposition_registry",
    "wsgi_app",
]

logger = logging.getLogger("meterware")

#: Distinct route labels kept per registry and process; later ones are counted as ``<other>``.
MAX_ROUTES: Final = 500
#: The label of a route, method or plan past its bound.
OTHER: Final = "<other>"
#: The plan label of calls refused before their customer was known (no key, unknown key, backend down).
NO_PLAN: Final = "<none>"
REJECTION_REASONS: Final = get_args(Reason)
#: Request latency buckets (seconds): API calls, up to minute-long streams.
REQUEST_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Backend call buckets (seconds): sub-millisecond Redis round trips up to the request-path timeout.
BACKEND_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
FLUSH_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: Cached label children per registry at most (each key is a distinct label tuple).
_MAX_CACHED: Final = 10_000


_registered: weakref.WeakKeyDictionary[CollectorRegistry, AppMetrics] = weakref.WeakKeyDictionary()
_registered_lock = threading.Lock()


class Tally:
    """What the request path adds to one metric child, kept in plain Python until the next fold.

    prometheus-client updates each value under a lock of its own, and a histogram observation walks its
    buckets in Python: counting a call, its latency, its units and its event that way costs about 4 us.
    Here a call adds to a few numbers under one lock; :meth:`AppMetrics.fold` hands the sums to
    prometheus-client at every scrape of the registry and at every flush pass.

    In multiprocess mode another process reads the values, with no way to ask for a fold first: there
    every update goes to prometheus-client at once.
    """

    __slots__ = ("amount", "bounds", "buckets", "child", "dirty", "owner")

    def __init__(self, owner: AppMetrics, child: Counter | Gauge | Histogram) -> None:
        self.owner = owner
        self.child = child
        #: A histogram's upper bounds (the last bucket is +Inf), or () for a counter or a gauge.
        self.bounds: tuple[float, ...] = tuple(child._upper_bounds) if isinstance(child, Histogram) else ()
        #: A counter's or gauge's increments, or a histogram's sum of observations.
        self.amount: float = 0
        #: Observations per bucket (not cumulative, as prometheus-client keeps them).
        self.buckets = [0] * len(self.bounds)
        self.dirty = False

    def inc(self, amount: float = 1) -> None:
        owner = self.owner
        if not owner.deferred:
            self.child.inc(amount)  # type: ignore[union-attr]
            return
        with owner.lock:
            self.amount += amount
            self.listed()

    def dec(self, amount: float = 1) -> None:
        self.inc(-amount)

    def observe(self, value: float) -> None:
        owner = self.owner
        if not owner.deferred:
            self.child.observe(value)  # type: ignore[union-attr]
            return
        with owner.lock:
            self.add(value)
            self.listed()

    def add(self, value: float) -> None:
        """Observe ``value`` (a histogram's; under the owner's lock)."""
        self.amount += value
        self.buckets[bisect_left(self.bounds, value)] += 1

    def listed(self) -> None:
        """Be listed for the next fold, once (under the owner's lock)."""
        if not self.dirty:
            self.dirty = True
            self.owner.dirty.append(self)

    def _fold(self) -> None:
        child, self.dirty = self.child, False
        if isinstance(child, Histogram):
            # What Histogram.observe does per observation, once per bucket: the sum, then each count.
            child._sum.inc(self.amount)
            for index, count in enumerate(self.buckets):
                if count:
                    child._buckets[index].inc(count)
                    self.buckets[index] = 0
        else:
            child.inc(self.amount)
        self.amount = 0


class _FoldOnCollect:
    """Registered ahead of the metrics: a scrape of the registry folds the tallies first."""

    def __init__(self, metrics: AppMetrics) -> None:
        self._metrics = weakref.ref(metrics)

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> list[Metric]:
        metrics = self._metrics()
        if metrics is not None:
            metrics.fold()
        return []


#: What a billable call adds to ``meterware_units``: ``(meter, units)`` pairs.
UnitCounts = tuple[tuple[str, int], ...]


def unit_counts(units: Mapping[str, int | str], additive: frozenset[str]) -> UnitCounts:
    """The units of a call that ``meterware_units`` counts: whole, non-zero, of meters that add up."""
    return tuple(
        (meter, value) for meter, value in units.items() if value and meter in additive and type(value) is int
    )


def _buffered_events(metrics: weakref.ReferenceType[AppMetrics]) -> Callable[[], float]:
    """The depth gauge's function (holding its metrics weakly, as the folding collector does)."""

    def buffered() -> float:
        owner = metrics()
        return 0.0 if owner is None else float(owner.buffered_events())

    return buffered


class _CallSeries:
    """The tallies a call adds to: its count and latency series, and its plan's units by meter."""

    __slots__ = ("count", "duration", "plan", "units")

    def __init__(self, count: Tally, duration: Tally, plan: str) -> None:
        self.count = count
        self.duration = duration
        self.plan = plan
        self.units: dict[str, Tally] = {}


class AppMetrics:
    """The app side's metrics in one registry, with label children cached for the request path.

    One instance per registry and process (:meth:`for_registry`), shared by every middleware instance
    that uses the registry, so nothing is registered twice. What the request path counts goes through
    :class:`Tally` objects.
    """

    @classmethod
    def for_registry(cls, registry: CollectorRegistry | None = None) -> AppMetrics:
        """The metrics registered in ``registry`` (prometheus-client's ``REGISTRY`` by default)."""
        registry = REGISTRY if registry is None else registry
        with _registered_lock:
            metrics = _registered.get(registry)
            if metrics is None:
                metrics = _registered[registry] = cls(registry)
            return metrics

    def __init__(self, registry: CollectorRegistry) -> None:
        #: Whether the request path's updates wait for a fold (not in multiprocess mode).
        self.deferred = multiprocess_dir() is None
        self.lock = threading.Lock()
        #: Tallies added to since the last fold, in the order they were first added to.
        self.dirty: list[Tally] = []
        registry.register(_FoldOnCollect(self))
        self.requests = Counter(
            "meterware_requests",
            "Metered calls by route template, method, outcome and plan.",
            ("route", "method", "outcome", "plan"),
            registry=registry,
        )
        self.duration = Histogram(
            "meterware_request_duration_seconds",
            "Time from a call's arrival at the middleware to its last response byte (or its refusal).",
            ("route", "outcome"),
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self.units = Counter(
            "meterware_units",
            "Billable units of successful live calls, by meter and plan (count and sum meters).",
            ("meter", "plan"),
            registry=registry,
        )
        self.units_rejected = Counter(
            "meterware_units_rejected",
            "Units a handler or a usage header reported that could not be metered (ignored, never charged).",
            registry=registry,
        )
        rejections = Counter(
            "meterware_rejections", "Refused calls by reason.", ("reason",), registry=registry
        )
        backend_duration = Histogram(
            "meterware_backend_duration_seconds",
            "Backend calls on the request path (key lookups, admissions), failed ones included.",
            ("operation",),
            buckets=BACKEND_BUCKETS,
            registry=registry,
        )
        backend_errors = Counter(
            "meterware_backend_errors",
            "Backend calls that failed (timeouts, connection errors), by operation.",
            ("operation",),
            registry=registry,
        )
        self.buffer_events = Gauge(
            "meterware_buffer_events",
            "Events waiting in the in-process buffer for the flusher.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        #: The buffers whose depth the gauge reads when scraped (counting each event in and out would
        #: cost every call; in multiprocess mode, where a scrape reads files, their pipelines count).
        self._buffers: weakref.WeakSet[Sized] = weakref.WeakSet()
        if self.deferred:
            self.buffer_events.set_function(_buffered_events(weakref.ref(self)))
        self.buffer_capacity = Gauge(
            "meterware_buffer_capacity_events",
            "Events the in-process buffer holds at most (summed over live processes).",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.spool_bytes = Gauge(
            "meterware_spool_bytes",
            "Bytes of event batches waiting in the spool directory for the backend to return.",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.events_flushed = Counter(
            "meterware_events_flushed", "Events written to the backend's streams.", registry=registry
        )
        self.events_spooled = Counter(
            "meterware_events_spooled",
            "Events written to the spool directory because the backend failed.",
            registry=registry,
        )
        self.events_dropped = Counter(
            "meterware_events_dropped",
            "Events lost because the buffer or the spool was full.",
            registry=registry,
        )
        self.batches_flushed = Counter(
            "meterware_batches_flushed", "Event batches written to the backend.", registry=registry
        )
        self.batches_replayed = Counter(
            "meterware_batches_replayed",
            "Spooled event batches replayed to the backend.",
            registry=registry,
        )
        self.batches_quarantined = Counter(
            "meterware_batches_quarantined",
            "Event batches (or one customer's part of one) the backend refuses as they are, set aside as "
            ".refused files.",
            registry=registry,
        )
        self.batches_expired = Counter(
            "meterware_batches_expired",
            "Spooled event batches set aside as .expired, never replayed: older than the backend remembers "
            "batch ids, so a replay could charge them twice.",
            registry=registry,
        )
        self.flush_duration = Histogram(
            "meterware_flush_duration_seconds",
            "Time of one batch flush (append to the stream and settle), failed ones included.",
            buckets=FLUSH_BUCKETS,
            registry=registry,
        )
        # Pre-bound children: the request path never looks a label up for these.
        self.resolve_duration = Tally(self, backend_duration.labels("resolve_key"))
        self.admit_duration = Tally(self, backend_duration.labels("admit"))
        self.resolve_errors = backend_errors.labels("resolve_key")
        self.admit_errors = backend_errors.labels("admit")
        self.flush_errors = backend_errors.labels("flush")
        self._rejections = {reason: rejections.labels(reason) for reason in REJECTION_REASONS}
        self._calls: dict[tuple[str, str, str, str], _CallSeries] = {}
        self._durations: dict[tuple[str, str], Tally] = {}
        self._units: dict[tuple[str, str], Tally] = {}
        self._routes: set[str] = set()

    def call(
        self, route: str, method: str, outcome: str, plan: str, seconds: float, units: UnitCounts = ()
    ) -> None:
        """Count one call, observe its latency and add its billable ``units``: ``(meter, units)`` pairs
        of the meters whose units add up (:func:`unit_counts`)."""
        series = self._calls.get((route, method, outcome, plan))
        if series is None:
            series = self._call_series(route, method, outcome, plan)
        if not self.deferred:
            series.count.child.inc()  # type: ignore[union-attr]
            series.duration.child.observe(seconds)  # type: ignore[union-attr]
            for meter, amount in units:
                self._units_of(series, meter).child.inc(amount)  # type: ignore[union-attr]
            return
        count, duration = series.count, series.duration
        with self.lock:  # one lock for everything a call adds
            count.amount += 1
            count.listed()
            duration.add(seconds)
            duration.listed()
            for meter, amount in units:
                tally = series.units.get(meter) or self._units_of(series, meter)
                tally.amount += amount
                tally.listed()

    def fold(self) -> None:
        """Hand what was tallied since the last fold to prometheus-client (never raises: it runs before
        every flush pass, which must go on whatever happens to the metrics)."""
        with self.lock:
            dirty, self.dirty = self.dirty, []
            for done, tally in enumerate(dirty):
                try:
                    tally._fold()
                except Exception:
                    logger.exception("meterware: folding the request metrics failed; they stay tallied")
                    tally.dirty = True
                    self.dirty = dirty[done:] + self.dirty
                    return

    def counts_buffer(self, buffer: Sized) -> bool:
        """Have ``meterware_buffer_events`` show ``buffer``'s depth: read at each scrape (False), or, in
        multiprocess mode, counted by its owner as events go in and out (True)."""
        if self.deferred:
            with self.lock:  # a scrape may be reading the set meanwhile
                self._buffers.add(buffer)
        return not self.deferred

    def buffered_events(self) -> int:
        """Events waiting in the buffers the depth gauge reads."""
        with self.lock:
            buffers = list(self._buffers)
        return sum(len(buffer) for buffer in buffers)

    def refused(self, reason: str, method: str, plan: str, route: str, seconds: float) -> None:
        """Count a refused call (a ``rejected`` call, and its reason)."""
        self._rejections[reason].inc()
        self.call(route, method, "rejected", plan, seconds)

    def _call_series(self, route: str, method: str, outcome: str, plan: str) -> _CallSeries:
        label = route
        if route not in self._routes:
            if len(self._routes) < MAX_ROUTES:
                self._routes.add(route)
            else:
                label = OTHER
        verb = bounded_method(method)
        duration = self._durations.get((label, outcome))
        if duration is None:
            duration = self._durations[(label, outcome)] = Tally(self, self.duration.labels(label, outcome))
        series = _CallSeries(Tally(self, self.requests.labels(label, verb, outcome, plan)), duration, plan)
        if len(self._calls) < _MAX_CACHED:
            self._calls[(route, method, outcome, plan)] = series
        return series

    def _units_of(self, series: _CallSeries, meter: str) -> Tally:
        """The units tally of ``meter`` on the series' plan (made once per meter and plan)."""
        tally = self._units.get((meter, series.plan))
        if tally is None:
            tally = self._units[(meter, series.plan)] = Tally(self, self.units.labels(meter, series.plan))
        series.units[meter] = tally
        return tally


# -- exposition -----------------------------------------------------------------------------------------


def multiprocess_dir() -> str | None:
    """The prometheus-client multiprocess directory of this process, if it runs in that mode."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def exposition_registry(registry: CollectorRegistry | None = None) -> CollectorRegistry:
    """The registry to expose: ``registry``, else every process's values in multiprocess mode, else
    prometheus-client's global ``REGISTRY``."""
    if registry is not None:
        return registry
    if multiprocess_dir():
        aggregated = CollectorRegistry()
        MultiProcessCollector(aggregated)  # type: ignore[no-untyped-call]
        return aggregated
    return REGISTRY


class MetricsApp:
    """An ASGI app serving the metrics (a class, so Starlette's ``add_route`` mounts it as a raw app)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._app = make_asgi_app(exposition_registry(registry))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)


def asgi_app(registry: CollectorRegistry | None = None) -> MetricsApp:
    """An ASGI app that serves the metrics of ``registry`` (every worker's in multiprocess mode).

    ``Route("/metrics", meterware.metrics.asgi_app())`` or ``app.mount("/metrics", ...)`` in Starlette or
    FastAPI; ``/metrics`` and ``/metrics/`` are excluded from metering unless the configuration lists its
    own ``routes.exclude``.
    """
    return MetricsApp(registry)


async def endpoint(request: Request) -> Response:
    """A Starlette / FastAPI endpoint serving the metrics: ``app.add_route("/metrics", metrics.endpoint)``."""
    body, content_type = exposition(request.headers.get("accept"))
    return Response(body, headers={"Content-Type": content_type})


def wsgi_app(registry: CollectorRegistry | None = None) -> WSGIApplication:
    """A WSGI app that serves the metrics (every worker's in multiprocess mode).

    Flask: ``app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/metrics": meterware.metrics.wsgi_app()})``.
    """
    app: WSGIApplication = make_wsgi_app(exposition_registry(registry))
    return app


def exposition(accept: str | None = None, registry: CollectorRegistry | None = None) -> tuple[bytes, str]:
    """The metrics as a response body and its content type, for a view of any framework.

    ``accept`` is the request's ``Accept`` header (OpenMetrics when the scraper asks for it).
    """
    encoder, content_type = choose_encoder(accept or "")
    return encoder(exposition_registry(registry)), content_type


def child_exit(server: Any, worker: Any) -> None:
    """gunicorn's ``child_exit`` hook: drop the live gauges of a worker that exited.

    In ``gunicorn.conf.py``: ``from meterware.metrics import child_exit``. Its counters stay: the totals
    keep what the worker counted.
    """
    if multiprocess_dir():
        mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
