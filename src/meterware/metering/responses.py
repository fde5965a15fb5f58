"""What a refused call is answered, and the ``RateLimit`` headers of an admitted one."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Final

from meterware.metering.admission import Decision, LimitState, Reason


@dataclass(frozen=True, slots=True)
class Problem:
    """An RFC 9457 problem document for a refused call."""

    status: int
    title: str
    detail: str
    reason: Reason
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    def body(self) -> bytes:
        return json.dumps(
            {
                "type": f"https://meterware.dev/problems/{self.reason.replace('_', '-')}",
                "title": self.title,
                "status": self.status,
                "detail": self.detail,
                "reason": self.reason,
            },
            separators=(",", ":"),
        ).encode()

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        body_length = str(len(self.body())).encode()
        return [
            (b"content-type", b"application/problem+json"),
            (b"content-length", body_length),
            *self.headers,
        ]


_PROBLEMS: Final[dict[Reason, tuple[int, str, str]]] = {
    "missing_key": (401, "API key required", "Send your key as 'Authorization: Bearer <key>'."),
    "malformed_key": (401, "Malformed API key", "The key does not have the shape of an API key."),
    "unknown_key": (401, "Unknown API key", "No active key matches the one presented."),
    "revoked_key": (401, "Revoked API key", "This key has been revoked."),
    "expired_key": (401, "Expired API key", "This key has expired."),
    # 403, not 429: like Unkey's USAGE_EXCEEDED it is the key's state, and waiting does not bring uses back.
    "key_exhausted": (403, "API key used up", "This key has no uses left."),
    # The app authenticated the caller (customer_getter), but meterware has no such customer.
    "unknown_customer": (403, "Unknown customer", "The account you signed in with has no access to the API."),
    "suspended": (403, "Account suspended", "The account this key belongs to is suspended."),
    "rate_limited": (429, "Rate limit exceeded", "Too many calls; retry after the time in Retry-After."),
    "quota_exceeded": (429, "Quota exhausted", "The quota of this billing period is used up."),
    "insufficient_credits": (402, "Insufficient credits", "The credit balance cannot cover this call."),
    "backend_unavailable": (503, "Service unavailable", "Metering is unavailable; retry shortly."),
    "test_key_not_allowed": (403, "Live key required", "This route serves live keys only, not test keys."),
    "concurrency_exceeded": (
        429,
        "Too many concurrent calls",
        "Too many of your calls are in flight; retry when one has finished.",
    ),
    # 429, not 402: as OpenAI's spend limits, a cap the customer (or the seller) chose was reached; nothing
    # is owed. It lifts when the period ends (Retry-After) or the cap is raised.
    "spend_cap_reached": (429, "Spend cap reached", "This billing period's spend cap is reached."),
}


def problem(reason: Reason, decision: Decision | None = None) -> Problem:
    """The response for a call refused for ``reason``."""
    status, title, detail = _PROBLEMS[reason]
    headers = limit_headers(decision.limits) if decision else []
    if decision and decision.retry_after and status in (429, 503):
        headers.append((b"retry-after", str(decision.retry_after).encode()))
    return Problem(status, title, detail, reason, headers)


def limit_headers(limits: tuple[LimitState, ...]) -> list[tuple[bytes, bytes]]:
    """``RateLimit-Policy`` and ``RateLimit`` (draft-ietf-httpapi-ratelimit-headers-10)."""
    if not limits:
        return []
    # One loop, no generators: this runs for every call admitted on its own (micro: limit_headers).
    policy, state = [], []
    for limit in limits:
        policy.append(f'"{limit.name}";q={limit.quota};w={limit.window}')
        state.append(f'"{limit.name}";r={limit.remaining};t={limit.reset}')
    return [(b"ratelimit-policy", ", ".join(policy).encode()), (b"ratelimit", ", ".join(state).encode())]
