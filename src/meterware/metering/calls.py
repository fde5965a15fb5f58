"""A metered call in flight, and what the plan holds of calls like it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from meterware.config import Plan
from meterware.metering.admission import AdmitRequest, Decision, MeterHold
from meterware.metering.leases import Lease
from meterware.metering.records import KeyInfo
from meterware.usage import CallUsage

#: The route of a call whose route template the framework never told (refused calls, unmatched paths).


@dataclass(slots=True)
class Call:
    """One metered call in flight: what the adapters record as the response goes out."""

    key: KeyInfo
    request: AdmitRequest
    decision: Decision
    method: str
    path: str
    started_ns: int
    usage: CallUsage
    status: int = 0
    ttfb_ns: int = 0
    response_bytes: int = 0
    request_bytes: int = 0
    #: Usage headers of the response, by meter (None until the response starts).
    header_units: dict[str, str] | None = None
    #: The route template, where the framework tells it before the call ends.
    route: str | None = None
    finished: bool = False
    #: When the middleware received the call (before the key lookup and admission); 0 if unknown.
    arrived_ns: int = 0
    #: The lease that admitted the call (``admission = "lease"``), or None when the backend did.
    lease: Lease | None = None
    #: Whether the response started while the client was there (a client that leaves later was served).
    responded: bool = False
    #: When the last chunk of the response went out, if the call ends later (its background tasks run).
    ended_ns: int = 0


@dataclass(frozen=True, slots=True)
class CallTerms:
    """What a plan holds of a call on one route weight, in one billing period (cached per process)."""

    plan: Plan
    holds: tuple[MeterHold, ...]
    period_start: int
    period_end: int
    #: When these terms stop holding: the period's end, or sooner the next version of the customer's terms.
    until: float


def header_map(headers: Iterable[tuple[bytes, bytes]], wanted: Mapping[bytes, str]) -> dict[str, str]:
    """Values of the usage headers among ``headers``, by meter name."""
    found: dict[str, str] = {}
    for name, value in headers:
        meter = wanted.get(name.lower())
        if meter is not None:
            found[meter] = value.decode("latin-1")
    return found
