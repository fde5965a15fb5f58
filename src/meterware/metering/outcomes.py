"""What a finished call's response makes of it: its outcome, and whether it is charged."""

from __future__ import annotations

from typing import Final

from meterware.config import Policy
from meterware.events import Outcome

CLIENT_CLOSED_REQUEST: Final = 499


def classify(status: int) -> Outcome:
    """The outcome of a call that completed its response, from its status."""
    if status >= 500:
        return "server_error"
    if status >= 400:
        return "client_error"
    return "success"


def is_billable(outcome: Outcome, status: int, policy: Policy) -> bool:
    """Whether a call is charged: a 2xx response, a 4xx one with ``policy.bill_client_errors``; never a
    redirect (3xx), a failure or a refusal.

    ``status`` is the status its client was sent: for an ``aborted`` call (the client left before the end),
    that of the response it had started to receive, or 0 if none had started. Such a call was served, and
    is charged unless ``policy.refund_aborted_streams``.
    """
    if outcome == "aborted":
        if policy.refund_aborted_streams:
            return False
    elif outcome != "success" and outcome != "client_error":
        return False
    return 200 <= status < 300 or (policy.bill_client_errors and 400 <= status < 500)
