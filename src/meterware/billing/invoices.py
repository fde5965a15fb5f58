"""Invoices: a billing period's usage priced by its plan, previewed while it runs, frozen when it closes.

An invoice is built from the rollup's ``period`` window of the customer's live usage (one quantity per
meter, and ``spend``: the micro-credits charged call by call on prepaid plans), priced by
:class:`~.pricing.PlanPrices`. Closing a period stores the invoice as it is (JSON) in the backend,
once: a closed invoice is always read back from that snapshot, never recomputed.

Late events (rolled up after their period closed) still add to that period's window, which is right for
usage reports. They are billed on the invoice of the first period not closed yet, as adjustment lines:
the closed period is priced again with its own frozen terms and everything it now holds, minus what its
invoices billed so far. What was billed per closed period is recorded with each close (in the same
atomic step as the snapshot), so each late unit is billed exactly once.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final, Literal

from meterware.billing.pricing import ZERO, Line, PlanPrices, minor_unit, money, round_amount
from meterware.config import MICROS_PER_CREDIT, Meter, Plan
from meterware.config._overrides import (
    EFFECTIVE_GRANULARITY,
    TermsVersion,
    changes,
    effective_hour,
    load_versions,
    plan_with,
)
from meterware.errors import StorageError
from meterware.metering.periods import period_bounds
from meterware.metering.records import Customer
from meterware.storage.base import Billed, Storage

InvoiceStatus = Literal["running", "closed"]
#: Closes retried when other closes of the same customer keep landing in between.
CLOSE_ATTEMPTS: Final = 10
CSV_COLUMNS: Final = (
    "kind",
    "meter",
    "description",
    "quantity",
    "included",
    "billable",
    "pricing",
    "period_start",
    "amount",
)


@dataclass(frozen=True, slots=True)
class Invoice:
    """One billing period of one customer, priced. ``status``: ``running`` until the period is closed."""

    customer: str
    plan: str
    currency: str
    period_start: int
    period_end: int
    status: InvoiceStatus
    #: Base fee, one line per priced meter, and the minimum commitment if it lifts them.
    lines: tuple[Line, ...]
    #: Late usage of closed periods, billed here (amounts may be negative: volume tiers can lower a price).
    adjustments: tuple[Line, ...]
    #: Sum of ``lines``.
    subtotal: Decimal
    #: Micro-credits already charged from the prepaid balance for this usage (period and late usage).
    credits_charged: int
    #: What those credits pay of the invoice: rounded to the currency, at most what is due.
    credits_applied: Decimal
    #: What is left to pay: subtotal + adjustments - credits applied.
    total: Decimal
    closed_at: int | None = None

    @property
    def id(self) -> str:
        return f"{self.customer}-{self.period_start}"

    @property
    def decimals(self) -> int:
        return minor_unit(self.currency)

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe: amounts are strings with the currency's decimals; :meth:`from_dict` reads it back."""
        return {
            "id": self.id,
            "customer": self.customer,
            "plan": self.plan,
            "currency": self.currency,
            "period_start": self.period_start,
            "period_end": self.period_end,
            "status": self.status,
            "closed_at": self.closed_at,
            "lines": [line.as_dict() for line in self.lines],
            "adjustments": [line.as_dict() for line in self.adjustments],
            "subtotal": self._money(self.subtotal),
            "credits_charged": _credits(self.credits_charged),
            "credits_applied": self._money(self.credits_applied),
            "total": self._money(self.total),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Invoice:
        return cls(
            customer=data["customer"],
            plan=data["plan"],
            currency=data["currency"],
            period_start=data["period_start"],
            period_end=data["period_end"],
            status=data["status"],
            lines=tuple(Line.from_dict(line) for line in data["lines"]),
            adjustments=tuple(Line.from_dict(line) for line in data["adjustments"]),
            subtotal=Decimal(data["subtotal"]),
            credits_charged=round(Decimal(data["credits_charged"]) * MICROS_PER_CREDIT),
            credits_applied=Decimal(data["credits_applied"]),
            total=Decimal(data["total"]),
            closed_at=data["closed_at"],
        )

    def to_csv(self) -> str:
        """One row per line and adjustment, then the subtotal, credits applied and total rows."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for line in (*self.lines, *self.adjustments):
            row = line.as_dict()
            writer.writerow(["" if row[column] is None else row[column] for column in CSV_COLUMNS])
        for kind, amount in (
            ("subtotal", self.subtotal),
            ("credits_applied", -self.credits_applied),
            ("total", self.total),
        ):
            writer.writerow([kind, "", "", "", "", "", "", "", self._money(amount)])
        return out.getvalue()

    def to_text(self) -> str:
        """A readable invoice for the terminal."""
        status = f"closed {_day(self.closed_at)}" if self.closed_at is not None else self.status
        rows = [
            f"invoice {self.id}: {self.customer}, plan {self.plan}, "
            f"{_day(self.period_start)} .. {_day(self.period_end)} ({status}), {self.currency}"
        ]
        for line in self.lines:
            detail = ""
            if line.kind == "usage":
                detail = f"{line.quantity} units, {line.included} included, {line.billable} billed"
                detail += f", {line.price.describe()}" if line.price else ""
            rows.append(f"  {line.description:<24} {detail:<64} {self._money(line.amount):>14}")
        for line in self.adjustments:
            rows.append(f"  adjustment: {line.description:<76} {self._money(line.amount):>14}")
        rows.append(f"  {'subtotal':<89} {self._money(self.subtotal):>14}")
        if self.credits_applied:
            credits = f"credits applied ({_credits(self.credits_charged)} credits charged)"
            rows.append(f"  {credits:<89} {self._money(-self.credits_applied):>14}")
        rows.append(f"  {'total':<89} {self._money(self.total):>14}")
        return "\n".join(rows)

    def _money(self, amount: Decimal) -> str:
        return f"{round_amount(amount, self.decimals):f}"


def _credits(micros: int) -> str:
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), MICROS_PER_CREDIT)
    return f"{sign}{whole}.{fraction:06d}"


def _day(epoch: int | None) -> str:
    return datetime.fromtimestamp(epoch or 0, UTC).strftime("%Y-%m-%d %H:%MZ")


def first_period_from(anchor: int, period: str, instant: int) -> tuple[int, int]:
    """The first billing period that starts at or after ``instant``."""
    start, end = period_bounds(anchor, period, instant)
    return (start, end) if start >= instant else period_bounds(anchor, period, end)


# -- what was billed per closed period -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Record:
    """What the invoices billed of one closed period: its usage and spend at the last close."""

    end: int
    usage: Mapping[str, int]
    spend: int

    def dump(self) -> str:
        return json.dumps({"end": self.end, "usage": dict(self.usage), "spend": self.spend}, sort_keys=True)

    @classmethod
    def load(cls, text: str) -> _Record:
        data = json.loads(text)
        return cls(int(data["end"]), {k: int(v) for k, v in data["usage"].items()}, int(data["spend"]))


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """A closed period as stored: the invoice shown, and the terms that price its late usage."""

    invoice: Invoice
    prices: PlanPrices
    prepaid: bool

    def dump(self) -> str:
        data = {"invoice": self.invoice.as_dict(), "prices": self.prices.as_dict(), "prepaid": self.prepaid}
        return json.dumps(data, sort_keys=True)

    @classmethod
    def load(cls, text: str) -> _Snapshot:
        data = json.loads(text)
        return cls(Invoice.from_dict(data["invoice"]), PlanPrices.from_dict(data["prices"]), data["prepaid"])


def _usage(storage: Storage, customer: str, start: int, prices: PlanPrices) -> tuple[dict[str, int], int]:
    totals = storage.read_usage(customer, True, "period", start)
    return prices.quantities(totals), totals.get("spend", 0)


def _adjustments(
    storage: Storage, customer: str, period_start: int, billed: Billed
) -> tuple[list[Line], int, dict[int, str]]:
    """Late usage of every closed period: its lines, the credits it was charged, the new billed records."""
    lines: list[Line] = []
    credits = 0
    records: dict[int, str] = {}
    for start in sorted(billed.periods):
        if start >= period_start:
            continue
        record = _Record.load(billed.periods[start])
        text = storage.read_invoice(customer, start)
        if text is None:
            raise StorageError(f"the invoice of {customer}'s closed period {start} is missing")
        snapshot = _Snapshot.load(text)
        usage, spend = _usage(storage, customer, start, snapshot.prices)
        if usage == dict(record.usage) and spend == record.spend:
            continue
        lines += _late_lines(start, snapshot.prices, record.usage, usage)
        credits += spend - record.spend if snapshot.prepaid else 0
        records[start] = _Record(record.end, usage, spend).dump()
    return lines, credits, records


def _late_lines(
    start: int, prices: PlanPrices, before: Mapping[str, int], after: Mapping[str, int]
) -> list[Line]:
    """What a closed period's usage now costs beyond what was billed, with the period's own terms."""
    old = {line.meter or line.kind: line for line in prices.lines(before)}
    lines = []
    for line in prices.lines(after):
        key = line.meter or line.kind
        previous = old.pop(key, None)
        amount = line.amount - (previous.amount if previous else ZERO)
        units = (line.quantity or 0) - ((previous.quantity or 0) if previous else 0)
        if line.kind == "usage" and (units or amount):
            description = f"{line.meter}: {units:+d} late units of the period from {_day(start)}"
            lines.append(
                Line(
                    "adjustment", description, amount, line.meter, units, price=line.price, period_start=start
                )
            )
        elif line.kind == "minimum" and amount:
            description = f"minimum commitment of the period from {_day(start)}, after its late usage"
            lines.append(Line("adjustment", description, amount, period_start=start))
    for previous in old.values():  # late usage lifted the period above its minimum
        if previous.kind == "minimum":
            description = f"minimum commitment of the period from {_day(start)}, after its late usage"
            lines.append(Line("adjustment", description, -previous.amount, period_start=start))
    return lines


# -- the terms in force over a period ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Part:
    """A part of a period priced by one version of the customer's terms."""

    start: int
    end: int
    prices: PlanPrices
    #: Which terms priced it, for its lines ("": the plan's own).
    terms: str


def _parts(
    customer: Customer, plan: Plan, meters: Mapping[str, Meter], bounds: tuple[int, int]
) -> list[_Part]:
    """The period split at each effective time of the customer's terms, each part with its prices."""
    cuts = changes(load_versions(customer.terms), *bounds)
    ends = [cut for cut, _ in cuts[1:]] + [bounds[1]]
    return [
        _Part(cut, part_end, plan_with(plan, version, meters).prices(), _terms_note(version))
        for (cut, version), part_end in zip(cuts, ends, strict=True)
    ]


def _terms_note(version: TermsVersion | None) -> str:
    if version is None or not version.overrides:
        return ""
    return f"terms from {_day(version.effective_from)} set by {version.actor}"


def _part_usage(
    storage: Storage, customer: str, parts: list[_Part], totals: Mapping[str, int], peaks: frozenset[str]
) -> list[dict[str, int]]:
    """Each part's units per price, from the period's ``totals`` (meters and sub-meters): the rollup's hour
    windows for every part but the last, which gets the rest of the period's. A ``max`` or ``last`` meter
    (``peaks``) does not add up over hours: the last part gets its period value whole. An hour that starts
    before the period (its anchor is not on the hour) is not read: its usage in the period is priced with
    the last part's."""
    if len(parts) == 1:
        return [parts[0].prices.quantities(totals)]
    hours = range(effective_hour(parts[0].start), parts[-1].start, EFFECTIVE_GRANULARITY)
    windows = storage.read_usage_windows(customer, True, "hour", list(hours))
    counted: list[dict[str, int]] = []
    for part in parts[:-1]:
        part_totals: dict[str, int] = {}
        for hour, window in zip(hours, windows, strict=True):
            if part.start <= hour < part.end:
                for name, units in window.items():
                    if name not in peaks:
                        part_totals[name] = part_totals.get(name, 0) + units
        counted.append(part_totals)
    rest = {
        name: max(0, units - sum(part.get(name, 0) for part in counted)) for name, units in totals.items()
    }
    return [part.prices.quantities(units) for part, units in zip(parts, [*counted, rest], strict=True)]


def _part_lines(parts: list[_Part], usage: list[dict[str, int]], peaks: frozenset[str]) -> list[Line]:
    """The lines of a period: the base fee and minimum of the terms in force at its end, and each part's
    usage lines, saying which terms priced them. Included units are used up once in the period, in time
    order (as the request path's period counter does): a part gets what its terms include less what the
    parts before it used. A peak (``max``, ``last``) is priced once, by the terms at the period's end."""
    if len(parts) == 1 and not parts[0].terms:
        return parts[0].prices.lines(usage[0])
    last = parts[-1].prices
    decimals = last.decimals
    lines = []
    if last.base_fee:
        lines.append(Line("base_fee", "base fee", round_amount(last.base_fee, decimals)))
    by_meter: dict[str, list[Line]] = {}
    used: dict[str, int] = {}
    for part, quantities in zip(parts, usage, strict=True):
        span = f"{_day(part.start)} .. {_day(part.end)}, " if len(parts) > 1 else ""
        note = f" ({span}{part.terms or 'plan terms'})"
        meters = {
            name: replace(price, included=max(0, price.included - used.get(name, 0)))
            for name, price in part.prices.meters.items()
            if part is parts[-1] or name not in peaks
        }
        for name in meters:
            used[name] = used.get(name, 0) + quantities.get(name, 0)
        for line in replace(part.prices, base_fee=ZERO, minimum=ZERO, meters=meters).lines(quantities):
            by_meter.setdefault(line.description, []).append(
                replace(line, description=line.description + note)
            )
    lines += [line for meter_lines in by_meter.values() for line in meter_lines]
    minimum = round_amount(last.minimum, decimals)
    below = minimum - sum((line.amount for line in lines), ZERO)
    if below > 0:
        lines.append(Line("minimum", f"minimum commitment of {money(minimum, decimals)}", below))
    return lines


def _price(
    storage: Storage,
    customer: Customer,
    plan: Plan,
    bounds: tuple[int, int],
    meters: Mapping[str, Meter],
    *,
    billed: Billed,
    closed_at: int | None = None,
) -> tuple[Invoice, dict[int, str], PlanPrices, int]:
    """The invoice of one period, the billed records a close would write, the prices, and the spend."""
    start, end = bounds
    parts = _parts(customer, plan, meters, bounds)
    prices = parts[-1].prices
    totals = storage.read_usage(customer.id, True, "period", start)
    usage = {meter: units for part in parts for meter, units in part.prices.quantities(totals).items()}
    spend = totals.get("spend", 0)
    peaks = frozenset(name for name, meter in meters.items() if meter.level)
    lines = _part_lines(parts, _part_usage(storage, customer.id, parts, totals, peaks), peaks)
    adjustments: list[Line] = []
    late_credits = 0
    records: dict[int, str] = {}
    if billed.periods:
        last = _Record.load(billed.periods[max(billed.periods)])
        # Late usage goes on the first period after the last closed one, and on no other.
        if start == first_period_from(customer.anchor, plan.period, last.end)[0]:
            adjustments, late_credits, records = _adjustments(storage, customer.id, start, billed)
    records[start] = _Record(end, usage, spend).dump()
    decimals = prices.decimals
    subtotal = sum((line.amount for line in lines), round_amount(ZERO, decimals))
    due = subtotal + sum((line.amount for line in adjustments), ZERO)
    credits_charged = (spend if plan.prepaid else 0) + late_credits
    credits = round_amount(Decimal(credits_charged).scaleb(-6), decimals)
    applied = max(ZERO, min(credits, due))
    invoice = Invoice(
        customer=customer.id,
        plan=plan.name,
        currency=prices.currency,
        period_start=start,
        period_end=end,
        status="running" if closed_at is None else "closed",
        lines=tuple(lines),
        adjustments=tuple(adjustments),
        subtotal=subtotal,
        credits_charged=credits_charged,
        credits_applied=round_amount(applied, decimals),
        total=round_amount(due - applied, decimals),
        closed_at=closed_at,
    )
    return invoice, records, prices, spend


def preview(
    storage: Storage, customer: Customer, plan: Plan, bounds: tuple[int, int], meters: Mapping[str, Meter]
) -> Invoice:
    """The invoice of a period: frozen if it was closed, otherwise priced from its usage now."""
    text = storage.read_invoice(customer.id, bounds[0])
    if text is not None:
        return _Snapshot.load(text).invoice
    return _price(storage, customer, plan, bounds, meters, billed=storage.read_billed(customer.id))[0]


def close(
    storage: Storage,
    customer: Customer,
    plan: Plan,
    bounds: tuple[int, int],
    meters: Mapping[str, Meter],
    closed_at: int,
) -> tuple[Invoice, bool]:
    """Freeze a period's invoice; also say whether this call froze it (False: it was closed already)."""
    for _ in range(CLOSE_ATTEMPTS):
        text = storage.read_invoice(customer.id, bounds[0])
        if text is not None:
            return _Snapshot.load(text).invoice, False
        billed = storage.read_billed(customer.id)
        invoice, records, prices, _ = _price(
            storage, customer, plan, bounds, meters, billed=billed, closed_at=closed_at
        )
        snapshot = _Snapshot(invoice, prices, plan.prepaid).dump()
        # Written only if no one closed this period, nor billed anything, since ``billed`` was read.
        if storage.close_period(customer.id, bounds[0], snapshot, records, billed.version) == "closed":
            return invoice, True
    raise StorageError(f"could not close {customer.id}'s period {bounds[0]}: other closes kept landing")


def periods_to_close(storage: Storage, customer: Customer, plan: Plan, at: float) -> list[tuple[int, int]]:
    """The periods of ``customer`` that ended by ``at`` and are not closed, oldest first."""
    billed = storage.read_billed(customer.id)
    after = customer.anchor
    if billed.periods:
        after = _Record.load(billed.periods[max(billed.periods)]).end
    periods = []
    start, end = first_period_from(customer.anchor, plan.period, after)
    while end <= at:
        periods.append((start, end))
        start, end = period_bounds(customer.anchor, plan.period, end)
    return periods
