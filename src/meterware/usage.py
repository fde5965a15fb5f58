"""Report value units (tokens, bytes, rows...) from inside a handler.

    import meterware

    @app.post("/v1/chat")
    async def chat(...):
        reply = await model.generate(...)
        meterware.usage.add("tokens", reply.usage.total_tokens)
        return reply

The units belong to the call being handled, through a context variable, so the same call works from async
and sync endpoints, from threads started by the framework, from nested helpers, and from work that runs
once the response is sent (Starlette/FastAPI background tasks, werkzeug's ``call_on_close``): the call's
event waits for it. Units reported outside a metered call, after its event was made, for an unknown meter,
or with a value that cannot be metered are ignored with a warning (never charged wrongly).

Who makes the call is read the same way, from the handler or anything it runs::

    call = meterware.current_call()
    if "files:write" not in call.scopes:
        raise PermissionDenied()

An adapter runs the app's code for a call inside :class:`reporting_to` (the three adapters here do; so can
one for another framework).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Final

from meterware.config import Meter
from meterware.dimensions import named, warn_refused

if TYPE_CHECKING:
    from meterware.metering.records import KeyInfo

logger = logging.getLogger("meterware.usage")

#: Units of one meter in one call stay below this (exact in Lua's doubles; the rollup refuses more).
UNITS_LIMIT: Final = 2**53


@dataclass(slots=True)
class CallUsage:
    """Units reported for one call so far."""

    meters: Mapping[str, Meter]
    #: Per meter, and per sub-meter of the dimension values reported (``tokens{model=large}``).
    units: dict[str, int | str] = field(default_factory=dict)
    rejected: int = 0
    #: Set once the call's event is made: counts each value reported later (ignored, never charged).
    late: Callable[[], object] | None = None
    #: The key the call was admitted with (read by :func:`current_call`).
    key: KeyInfo | None = None

    def add(self, meter: str, value: int | str, dimensions: Mapping[str, str] | None = None) -> None:
        """Add ``value`` units to ``meter`` (``max``/``last`` keep the latest; ``unique`` records a value),
        and to its sub-meter of ``dimensions`` if given."""
        if self.late is not None:
            self.late()
            logger.warning("meterware: ignored usage for meter %r: reported after its call had ended", meter)
            return
        definition = self.meters.get(meter)
        problem = _problem(definition, meter, value)
        if problem:
            self.rejected += 1
            logger.warning("meterware: ignored usage for meter %r: %s", meter, problem)
            return
        assert definition is not None
        sub = None
        if dimensions:
            try:
                sub = named(meter, definition.dimensions, dimensions)
            except ValueError as error:
                self.rejected += 1
                warn_refused(meter, str(error))
                return
        if definition.aggregation == "unique":
            self.units[meter] = str(value)
        elif definition.aggregation in ("count", "sum"):
            total = int(self.units.get(meter, 0)) + int(value)
            if total >= UNITS_LIMIT:
                self.rejected += 1
                logger.warning(
                    "meterware: ignored usage for meter %r: the call's total would be too large", meter
                )
                return
            self.units[meter] = total
        elif definition.aggregation == "max":
            self.units[meter] = max(int(self.units.get(meter, value)), int(value))
        else:
            self.units[meter] = int(value)
        if sub is not None:  # the total took them
            self.units[sub] = int(self.units.get(sub, 0)) + int(value)


def _problem(definition: Meter | None, meter: str, value: object) -> str | None:
    if definition is None:
        return "no such meter is configured"
    if definition.source != "handler":
        return f"its source is {definition.source!r}, not 'handler'"
    if definition.aggregation == "unique":
        problem = "a unique meter takes a string or integer of at most 256 characters"
        if not isinstance(value, str | int) or isinstance(value, bool):
            return problem
        # An int over 256 digits is too long anyway, and str() of one over 4300 digits would raise.
        if abs(value) >= 10**256 if isinstance(value, int) else len(value) > 256:
            return problem
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"units must be an integer, got {type(value).__name__}"
    if isinstance(value, float) and (not math.isfinite(value) or not value.is_integer()):
        return f"units must be a whole number, got {value!r}"
    if value < 0:
        return f"units must not be negative, got {value!r}"
    if value >= UNITS_LIMIT:
        return f"units are too large, got {value!r}"
    return None


_current: ContextVar[CallUsage | None] = ContextVar("meterware_usage", default=None)


class reporting_to:  # lower case, like contextlib.suppress: it reads as ``with usage.reporting_to(...)``
    """Send the units that :func:`add` reports inside the block to ``usage`` (the call being served).

    What an adapter wraps around the app's code for one call: the handler, a streamed body's chunks as
    they are made, the response's ``close()``. The context follows the block into the tasks it starts
    (and the threads frameworks run sync code in), so their units reach the same call::

        with meterware.usage.reporting_to(call.usage):
            response = app(request)

    Reusable, but not re-entrant (one block at a time per instance). A class rather than a
    ``contextlib.contextmanager``: it runs on every call, and a generator-based one costs more.
    """

    __slots__ = ("_token", "usage")
    _token: Token[CallUsage | None]

    def __init__(self, usage: CallUsage) -> None:
        self.usage = usage

    def __enter__(self) -> CallUsage:
        self._token = _current.set(self.usage)
        return self.usage

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        _current.reset(self._token)


def add(meter: str, value: int | str, **dimensions: str) -> None:
    """Report ``value`` units of ``meter`` for the call being handled, with the values of the meter's
    dimensions if it declares some (``usage.add("tokens", n, model="large")``: a value the meter does not
    declare is refused and counted, never charged)."""
    usage = _current.get()
    if usage is None:
        logger.warning("meterware: usage.add(%r) outside a metered call was ignored", meter)
        return
    usage.add(meter, value, dimensions)


def current() -> CallUsage | None:
    """The usage of the call being handled, if any."""
    return _current.get()


@dataclass(frozen=True, slots=True)
class CurrentCall:
    """Who makes the call being handled, as meterware admitted it (read-only)."""

    #: The customer's id, and the plan their call was admitted on.
    customer: str
    plan: str
    #: The key's id (``key_...``, never the key itself).
    key_id: str
    #: What the seller lets the key do (``Accounts.create_key(..., scopes=...)``), for the app to check.
    scopes: tuple[str, ...]
    #: A live key (``False``: a test key, metered apart and never charged).
    live: bool


def current_call() -> CurrentCall | None:
    """The customer, key, scopes and mode of the call being handled; None outside a metered call.

    Works wherever :func:`add` does: async and sync handlers, the threads and tasks they start, a
    streamed body, background work the call's event waits for.
    """
    usage = _current.get()
    key = usage.key if usage is not None else None
    if key is None:
        return None
    return CurrentCall(key.customer.id, key.customer.plan, key.key_id, key.scopes, key.live)
