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

import weakref
from collections.abc import Mapping, Sized
from typing import TYPE_CHECKING, Any, Final, get_args

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder, make_asgi_app, make_wsgi_app
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from starlette.requests import Request
from starlette.responses import Response

from meterware._tallies import Family, PerRegistry, Tallies, Tally, multiprocess_dir
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


#: What a billable call adds to ``meterware_units``: ``(meter, units)`` pairs.
UnitCounts = tuple[tuple[str, int], ...]


def unit_counts(units: Mapping[str, int | str], additive: tuple[str, ...]) -> UnitCounts:
    """The units of a call that ``meterware_units`` counts: whole, non-zero, of the ``additive`` meters
    (those that add up; their sub-meters are not counted apart)."""
    return tuple([(meter, value) for meter in additive if type(value := units.get(meter)) is int and value])


class _CallSeries:
    """The tallies a call adds to: its count and latency series, and its plan's units by meter."""

    __slots__ = ("count", "duration", "plan", "units", "units_family")

    def __init__(self, count: Tally, duration: Tally, units: Family, plan: str) -> None:
        self.count = count
        self.duration = duration
        self.units_family = units
        self.plan = plan
        self.units: dict[str, Tally] = {}

    def unit(self, meter: str) -> Tally:
        """The units tally of ``meter`` on the series' plan."""
        tally = self.units[meter] = self.units_family.labels(meter, self.plan)
        return tally


class AppMetrics(PerRegistry):
    """The app side's metrics in one registry, with the series the request path adds to cached.

    One instance per registry and process (:meth:`for_registry`), shared by every middleware instance
    that uses the registry, so nothing is registered twice.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        metrics = Tallies(registry)
        #: Whether the values stay in this process until scraped (not in multiprocess mode).
        self.tallied = metrics.tallied
        self.lock = metrics.lock
        self.requests = metrics.counters(
            "meterware_requests",
            "Metered calls by route template, method, outcome and plan.",
            ("route", "method", "outcome", "plan"),
        )
        self.duration = metrics.histograms(
            "meterware_request_duration_seconds",
            "Time from a call's arrival at the middleware to its last response byte (or its refusal).",
            ("route", "outcome"),
            REQUEST_BUCKETS,
        )
        self.units = metrics.counters(
            "meterware_units",
            "Billable units of successful live calls, by meter and plan (count and sum meters).",
            ("meter", "plan"),
        )
        self.units_rejected = metrics.counter(
            "meterware_units_rejected",
            "Units a handler or a usage header reported that could not be metered (ignored, never charged).",
        )
        rejections = metrics.counters("meterware_rejections", "Refused calls by reason.", ("reason",))
        backend_duration = metrics.histograms(
            "meterware_backend_duration_seconds",
            "Backend calls on the request path (key lookups, admissions), failed ones included.",
            ("operation",),
            BACKEND_BUCKETS,
        )
        backend_errors = metrics.counters(
            "meterware_backend_errors",
            "Backend calls that failed (timeouts, connection errors), by operation.",
            ("operation",),
        )
        #: The buffers whose depth the gauge reads when scraped (counting each event in and out would
        #: cost every call; in multiprocess mode, where a scrape reads files, their pipelines count).
        self._buffers: weakref.WeakSet[Sized] = weakref.WeakSet()
        self.buffer_events = metrics.gauge(
            "meterware_buffer_events",
            "Events waiting in the in-process buffer for the flusher.",
            multiprocess_mode="livesum",
            read=self.buffered_events,
        )
        self.buffer_capacity = metrics.gauge(
            "meterware_buffer_capacity_events",
            "Events the in-process buffer holds at most (summed over live processes).",
            multiprocess_mode="livesum",
        )
        self.spool_bytes = metrics.gauge(
            "meterware_spool_bytes",
            "Bytes of event batches waiting in the spool directory for the backend to return.",
            multiprocess_mode="livemax",
        )
        self.events_flushed = metrics.counter(
            "meterware_events_flushed", "Events written to the backend's streams."
        )
        self.events_spooled = metrics.counter(
            "meterware_events_spooled", "Events written to the spool directory because the backend failed."
        )
        self.events_dropped = metrics.counter(
            "meterware_events_dropped", "Events lost because the buffer or the spool was full."
        )
        self.batches_flushed = metrics.counter(
            "meterware_batches_flushed", "Event batches written to the backend."
        )
        self.batches_replayed = metrics.counter(
            "meterware_batches_replayed", "Spooled event batches replayed to the backend."
        )
        self.batches_quarantined = metrics.counter(
            "meterware_batches_quarantined",
            "Event batches (or one customer's part of one) the backend refuses as they are, set aside as "
            ".refused files.",
        )
        self.batches_expired = metrics.counter(
            "meterware_batches_expired",
            "Spooled event batches set aside as .expired, never replayed: older than the backend remembers "
            "batch ids, so a replay could charge them twice.",
        )
        self.flush_duration = metrics.histogram(
            "meterware_flush_duration_seconds",
            "Time of one batch flush (append to the stream and settle), failed ones included.",
            FLUSH_BUCKETS,
        )
        metrics.register()
        # Pre-bound series: the request path never looks a label up for these.
        self.resolve_duration = backend_duration.labels("resolve_key")
        self.admit_duration = backend_duration.labels("admit")
        self.resolve_errors = backend_errors.labels("resolve_key")
        self.admit_errors = backend_errors.labels("admit")
        self.flush_errors = backend_errors.labels("flush")
        self._rejections = {reason: rejections.labels(reason) for reason in REJECTION_REASONS}
        self._calls: dict[tuple[str, str, str, str], _CallSeries] = {}
        self._routes: set[str] = set()

    def call(
        self, route: str, method: str, outcome: str, plan: str, seconds: float, units: UnitCounts = ()
    ) -> None:
        """Count one call, observe its latency and add its billable ``units``: ``(meter, units)`` pairs
        of the meters whose units add up (:func:`unit_counts`)."""
        series = self._calls.get((route, method, outcome, plan))
        if series is None:
            series = self._call_series(route, method, outcome, plan)
        if not self.tallied:
            series.count.inc()
            series.duration.observe(seconds)
            for meter, amount in units:
                (series.units.get(meter) or series.unit(meter)).inc(amount)
            return
        with self.lock:  # one lock for everything a call adds
            series.count.amount += 1
            series.duration.add(seconds)
            for meter, amount in units:
                (series.units.get(meter) or series.unit(meter)).amount += amount

    def counts_buffer(self, buffer: Sized) -> bool:
        """Have ``meterware_buffer_events`` show ``buffer``'s depth: read at each scrape (False), or, in
        multiprocess mode, counted by its owner as events go in and out (True)."""
        if self.tallied:
            with self.lock:  # a scrape may be reading the set meanwhile
                self._buffers.add(buffer)
        return not self.tallied

    def buffered_events(self) -> float:
        """Events waiting in the buffers the depth gauge reads."""
        with self.lock:
            buffers = list(self._buffers)
        return float(sum(len(buffer) for buffer in buffers))

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
        series = _CallSeries(
            self.requests.labels(label, bounded_method(method), outcome, plan),
            self.duration.labels(label, outcome),
            self.units,
            plan,
        )
        if len(self._calls) < _MAX_CACHED:
            self._calls[(route, method, outcome, plan)] = series
        return series


# -- exposition -----------------------------------------------------------------------------------------


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
