"""Old import path of the request path's pure types and rules (now in :mod:`meterware.metering`)."""

from meterware.metering.admission import (
    AdmitRequest,
    Decision,
    LimitState,
    MeterHold,
    Reason,
    call_units,
    decision_from_reply,
    holds_anything,
    meter_holds,
    quota_name,
    rate_limit_name,
)
from meterware.metering.outcomes import CLIENT_CLOSED_REQUEST, classify, is_billable
from meterware.metering.periods import period_bounds
from meterware.metering.records import Customer, CustomerStatus, KeyInfo, KeyRecord
from meterware.metering.responses import Problem, limit_headers, problem

__all__ = [
    "CLIENT_CLOSED_REQUEST",
    "AdmitRequest",
    "Customer",
    "CustomerStatus",
    "Decision",
    "KeyInfo",
    "KeyRecord",
    "LimitState",
    "MeterHold",
    "Problem",
    "Reason",
    "call_units",
    "classify",
    "decision_from_reply",
    "holds_anything",
    "is_billable",
    "limit_headers",
    "meter_holds",
    "period_bounds",
    "problem",
    "quota_name",
    "rate_limit_name",
]
