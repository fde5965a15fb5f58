"""The metered request path, as a customer of the API and its seller see it.

Every test runs on each framework (Starlette, FastAPI, Flask, a bare WSGI app, Django sync and async) and
each backend (memory, real Redis).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
from prometheus_client import REGISTRY

from meterware.events import MAX_ROUTE_LENGTH
from tests.behaviour.apps import BACKGROUND_TOKENS, CALLS

Api = Any


def test_successful_call_is_served_counted_and_charged(api: Api) -> None:
    """A call with a valid key reaches the app, is counted once and charged its price."""
    key = api.customer("payg", credits="1")
    response = api.call("GET", "/v1/hello", key)
    assert response.status_code == 200
    assert CALLS == ["hello"]
    api.settle()
    usage = api.usage(key)
    assert usage.meters["calls"] == 1
    assert usage.calls["success"] == 1
    assert usage.spend == 10_000
    assert api.balance(key).balance == 1_000_000 - 10_000
    assert api.balance(key).reserved == 0


def test_only_successes_are_charged(api: Api) -> None:
    """Successes, 5xx, exceptions and 4xx: usage and charges count the successes only."""
    key = api.customer("payg", credits="10")
    statuses = [api.call("GET", path, key).status_code for path in ["/v1/hello"] * 4]
    statuses += [api.call("GET", "/v1/fail", key).status_code for _ in range(3)]
    statuses += [api.call("GET", "/v1/boom", key).status_code for _ in range(2)]
    statuses += [api.call("GET", "/v1/bad", key).status_code for _ in range(2)]
    assert statuses == [200] * 4 + [502] * 3 + [500] * 2 + [422] * 2
    api.settle()
    usage = api.usage(key)
    assert usage.meters["calls"] == 4
    assert usage.calls == {"success": 4, "client_error": 2, "server_error": 5, "aborted": 0, "rejected": 0}
    assert api.balance(key).balance == 10_000_000 - 4 * 10_000
    assert api.balance(key).reserved == 0


def test_client_errors_are_charged_when_configured(make_api: Any) -> None:
    """With ``bill_client_errors``, 4xx responses are charged like successes (5xx still never)."""
    api = make_api(policy={"bill_client_errors": True})
    key = api.customer("payg", credits="1")
    api.call("GET", "/v1/bad", key)
    api.call("GET", "/v1/fail", key)
    api.settle()
    assert api.balance(key).balance == 1_000_000 - 10_000
    assert api.usage(key).spend == 10_000


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        pytest.param({}, "missing_key", id="no-key"),
        pytest.param({"Authorization": "Bearer nope"}, "malformed_key", id="malformed"),
        pytest.param({"Authorization": "Basic " + "a" * 20}, "missing_key", id="not-bearer"),
        pytest.param({"Authorization": "Bearer mw_live_" + "A" * 32}, "unknown_key", id="unknown"),
        pytest.param({"X-API-Key": "mw_test_" + "b" * 32}, "unknown_key", id="unknown-x-api-key"),
    ],
)
def test_calls_without_a_valid_key_are_refused_with_401(
    api: Api, headers: dict[str, str], reason: str
) -> None:
    """Missing, malformed and unknown keys get a 401 problem document, and the app never runs."""
    response = api.call("GET", "/v1/hello", headers=headers)
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["reason"] == reason
    assert CALLS == []


def test_x_api_key_header_is_accepted(api: Api) -> None:
    """A key in ``X-API-Key`` works like a Bearer token."""
    key = api.customer("open")
    assert api.call("GET", "/v1/hello", headers={"X-API-Key": key}).status_code == 200


def test_revoked_key_is_refused_at_once_despite_the_cache(api: Api) -> None:
    """Revocation takes effect on the next call, even while the key's resolution is cached."""
    key = api.customer("open")
    assert api.call("GET", "/v1/hello", key).status_code == 200
    key_id = api.accounts.list_keys(api.customer_of(key))[0].key_id
    api.accounts.revoke_key(key_id)
    response = api.call("GET", "/v1/hello", key)
    assert response.status_code == 401
    assert response.json()["reason"] == "revoked_key"
    assert key not in response.text


def test_rotated_key_works_during_grace_and_the_new_key_works(api: Api) -> None:
    """Rotation issues a working key; the old one keeps working during the grace period, then stops."""
    key = api.customer("open")
    old_id = api.accounts.list_keys(api.customer_of(key))[0].key_id
    new = api.accounts.rotate_key(old_id, grace_seconds=3600)
    assert api.call("GET", "/v1/hello", key).status_code == 200
    assert api.call("GET", "/v1/hello", new.plaintext).status_code == 200
    newer = api.accounts.rotate_key(new.key_id, grace_seconds=0)
    response = api.call("GET", "/v1/hello", new.plaintext)
    assert (response.status_code, response.json()["reason"]) == (401, "expired_key")
    assert api.call("GET", "/v1/hello", newer.plaintext).status_code == 200


def test_hard_quota_refuses_with_429_before_the_app_runs(api: Api) -> None:
    """The free plan's 5 calls are served; the 6th gets 429 with Retry-After and never reaches the app."""
    key = api.customer("free")
    statuses = [api.call("GET", "/v1/hello", key).status_code for _ in range(7)]
    assert statuses == [200] * 5 + [429] * 2
    refused = api.call("GET", "/v1/hello", key)
    assert refused.json()["reason"] == "quota_exceeded"
    assert int(refused.headers["retry-after"]) > 0
    assert CALLS == ["hello"] * 5
    api.settle()
    usage = api.usage(key)
    assert usage.meters["calls"] == 5
    assert usage.calls["rejected"] == 3


def test_failed_calls_give_their_quota_back(api: Api) -> None:
    """A failed call does not use up quota: after 5 failures the free plan still serves 5 calls."""
    key = api.customer("free")
    assert [api.call("GET", "/v1/fail", key).status_code for _ in range(5)] == [502] * 5
    api.settle()
    assert [api.call("GET", "/v1/hello", key).status_code for _ in range(6)] == [200] * 5 + [429]


def test_insufficient_credits_refuses_with_402(api: Api) -> None:
    """A prepaid balance of 0.03 credits pays for exactly 3 calls at 0.01; the 4th gets 402."""
    key = api.customer("percall", credits="0.03")
    statuses = [api.call("GET", "/v1/hello", key).status_code for _ in range(5)]
    assert statuses == [200, 200, 200, 402, 402]
    assert api.call("GET", "/v1/hello", key).json()["reason"] == "insufficient_credits"
    api.settle()
    assert api.balance(key).balance == 0


def test_prepaid_responses_say_the_credits_left(api: Api) -> None:
    """Each response of a prepaid plan carries the credits left once the call is paid for; others none."""
    key = api.customer("percall", credits="0.03")
    remaining = [api.call("GET", "/v1/hello", key).headers.get("x-credits-remaining") for _ in range(3)]
    assert remaining == ["0.020000", "0.010000", "0.000000"]
    assert "x-credits-remaining" not in api.call("GET", "/v1/hello", api.customer("free")).headers


def test_token_priced_plans_need_credit_left_after_the_call_price(api: Api) -> None:
    """When tokens are priced (size unknown until the end), a call needs more than its call price left."""
    key = api.customer("payg", credits="0.03")
    statuses = [api.call("GET", "/v1/hello", key).status_code for _ in range(4)]
    assert statuses == [200, 200, 402, 402]


def test_rate_limit_refuses_with_429_and_retry_after(api: Api) -> None:
    """A '3/minute' plan serves a burst of 3, then answers 429 with Retry-After and RateLimit headers."""
    key = api.customer("tight")
    responses = [api.call("GET", "/v1/hello", key) for _ in range(4)]
    assert [r.status_code for r in responses] == [200, 200, 200, 429]
    assert responses[0].headers["ratelimit-policy"] == '"rate-60s";q=3;w=60'
    assert responses[0].headers["ratelimit"].startswith('"rate-60s";r=2;t=')
    assert responses[2].headers["ratelimit"].startswith('"rate-60s";r=0;')
    refused = responses[3]
    assert refused.json()["reason"] == "rate_limited"
    assert 0 < int(refused.headers["retry-after"]) <= 20


def test_quota_is_reported_in_ratelimit_headers(api: Api) -> None:
    """A hard quota appears as a policy in the RateLimit headers, counting down."""
    key = api.customer("free")
    first = api.call("GET", "/v1/hello", key)
    second = api.call("GET", "/v1/hello", key)
    assert '"quota-calls";q=5;w=' in first.headers["ratelimit-policy"]
    assert '"quota-calls";r=4;' in first.headers["ratelimit"]
    assert '"quota-calls";r=3;' in second.headers["ratelimit"]


def test_handler_reported_units_are_charged_from_async_and_sync_endpoints(api: Api) -> None:
    """``meterware.usage.add`` works in async and sync endpoints; units are charged at settle."""
    key = api.customer("payg", credits="1")
    assert api.call("POST", "/v1/chat", key, json={"tokens": 150}).status_code == 200
    assert api.call("GET", "/v1/chat-sync?tokens=50", key).status_code == 200
    api.settle()
    usage = api.usage(key)
    assert usage.meters["tokens"] == 200
    assert usage.meters["calls"] == 2
    assert api.balance(key).balance == 1_000_000 - 2 * 10_000 - 200 * 100


def test_units_of_failed_calls_are_not_charged(api: Api) -> None:
    """Units reported by a handler that then fails are not charged."""
    key = api.customer("payg", credits="1")
    assert api.call("POST", "/v1/chat", key, json={"tokens": "many"}).status_code == 200
    api.settle()
    # "many" is not a number: ignored with a warning, the call itself is still charged.
    assert api.usage(key).meters["tokens"] == 0


def test_usage_header_is_metered_and_stripped(api: Api) -> None:
    """Units in a configured response header are metered, and the header does not reach the client."""
    key = api.customer("open")
    response = api.call("GET", "/v1/header-tokens", key)
    assert response.status_code == 200
    assert "x-usage-tokens" not in response.headers
    api.settle()
    assert api.usage(key).meters["header_tokens"] == 42


def test_a_usage_header_that_is_not_an_ascii_number_is_rejected_and_the_call_still_charged(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    """``X-Usage-Tokens: ²`` (a digit to ``str.isdigit``, not to ``int``): the call is still recorded and
    charged, the value ignored, counted in ``meterware_units_rejected_total`` and warned about once."""
    key = api.customer("payg", credits="1")
    rejected = REGISTRY.get_sample_value("meterware_units_rejected_total") or 0
    with caplog.at_level(logging.WARNING, logger="meterware"):
        for value in ["\N{SUPERSCRIPT TWO}", "7", "\N{SUPERSCRIPT THREE}"]:
            response = api.call("GET", "/v1/header-tokens", key, params={"value": value})
            assert response.status_code == 200
            assert "x-usage-tokens" not in response.headers
        api.settle()
    assert REGISTRY.get_sample_value("meterware_units_rejected_total") == rejected + 2
    warnings = [r.getMessage() for r in caplog.records if "usage header" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert [event.outcome for event in api.events()] == ["success"] * 3
    usage = api.usage(key)
    assert (usage.meters["calls"], usage.meters["header_tokens"]) == (3, 7)
    assert api.balance(key).balance == 1_000_000 - 3 * 10_000


def test_redirects_are_recorded_but_not_charged(api: Api) -> None:
    """A 3xx (the app's own redirect, or the router's for a trailing slash) is not charged and its hold
    goes back: the client pays once, for the call it was sent on to."""
    key = api.customer("payg", credits="1")
    paths = ["/v1/moved", *([api.framework.slash_redirect] if api.framework.slash_redirect else [])]
    for path in paths:
        response = api.call("GET", path, key, follow_redirects=False)
        assert response.is_redirect, (path, response.status_code)
        assert api.call("GET", response.headers["location"], key).status_code == 200
    api.settle()
    redirects = [event for event in api.events() if 300 <= event.status < 400]
    assert len(redirects) == len(paths)
    assert not any(event.billable for event in redirects)
    usage = api.usage(key)
    assert usage.meters["calls"] == len(paths)
    assert usage.spend == len(paths) * 10_000
    assert (api.balance(key).balance, api.balance(key).reserved) == (1_000_000 - len(paths) * 10_000, 0)


@pytest.mark.parametrize("framework", ["starlette", "fastapi", "flask", "wsgi"])
def test_units_reported_after_the_response_was_sent_count_against_the_call(api: Api) -> None:
    """Units reported by work that runs once the response is sent (Starlette's ``BackgroundTask``,
    FastAPI's ``BackgroundTasks``, werkzeug's ``call_on_close``) are charged with the call."""
    key = api.customer("payg", credits="1")
    assert api.call("GET", "/v1/background", key).status_code == 200
    api.settle()
    (event,) = api.events()
    tokens = sum(BACKGROUND_TOKENS)
    assert (event.outcome, event.billable, event.units["tokens"]) == ("success", True, tokens)
    assert api.usage(key).meters["tokens"] == tokens
    assert api.balance(key).balance == 1_000_000 - 10_000 - tokens * 100


def test_excluded_routes_need_no_key_and_are_not_metered(api: Api) -> None:
    """``/health`` is excluded: served without a key, no event."""
    assert api.call("GET", "/health").status_code == 200
    api.settle()
    assert api.events() == []


def test_route_weights_count_weighted_units(api: Api) -> None:
    """A call to a route of weight 5 adds 5 to summed call meters and 1 to counted ones."""
    key = api.customer("open")
    api.call("GET", "/v1/heavy", key)
    api.settle()
    assert api.usage(key).meters["weighted"] == 5
    assert api.usage(key).meters["calls"] == 1


def test_events_carry_route_templates_and_no_key(api: Api) -> None:
    """Events name the route template, the method, the outcome and the key id, never the key."""
    key = api.customer("open")
    api.call("GET", "/v1/items/12345", key)
    api.settle()
    (event,) = api.events()
    assert event.route == api.framework.item_route
    assert (event.method, event.status, event.outcome, event.billable) == ("GET", 200, "success", True)
    assert event.key_id.startswith("key_")
    assert key.encode() not in repr(event).encode()
    assert event.duration_us > 0


def test_events_hold_bounded_fields_whatever_the_client_sends(api: Api) -> None:
    """A 20 KB path and a 1 KB method, on served and refused calls: each event's route is at most
    ``MAX_ROUTE_LENGTH`` characters and its method a standard one or ``<other>``."""
    served = api.customer("open")
    broke = api.customer("percall")  # no credits: refused with 402
    huge_path = "/v1/items/" + "a" * 20_000
    for key in (served, broke):
        api.call("GET", huge_path, key)
        api.call("X" * 1_000, "/v1/hello", key)
    api.settle()
    events = api.events()
    assert len(events) == 4
    assert [event.outcome for event in events].count("rejected") == 2
    assert max(len(event.route) for event in events) <= MAX_ROUTE_LENGTH
    assert {event.method for event in events} == {"GET", "<other>"}


def test_streaming_response_is_timed_to_its_last_chunk(api: Api) -> None:
    """A streamed response arrives whole and its event's duration covers every chunk."""
    key = api.customer("open")
    response = api.call("GET", "/v1/stream", key)
    assert response.text == "chunk 0\nchunk 1\nchunk 2\n"
    api.settle()
    (event,) = api.events()
    assert event.outcome == "success"
    assert event.duration_us >= 25_000  # three chunks, 10 ms apart
    assert 0 < event.ttfb_us < event.duration_us


def test_error_while_streaming_is_a_failure(api: Api) -> None:
    """A streamed response that breaks after its first chunk is recorded as a failed, uncharged call."""
    key = api.customer("payg", credits="1")
    response = api.call("GET", "/v1/stream-broken", key)
    assert response.text == "chunk 0\n"  # the status line had gone out: the body just stops
    api.settle()
    (event,) = api.events()
    assert (event.status, event.outcome, event.billable) == (500, "server_error", False)
    assert api.balance(key).balance == 1_000_000
    assert api.balance(key).reserved == 0


def test_test_keys_are_metered_separately_and_never_charged(api: Api) -> None:
    """Sandbox keys are served and metered as test usage; the balance is untouched."""
    key = api.customer("payg", credits="1", live=False)
    assert key.startswith("mw_test_")
    assert api.call("GET", "/v1/hello", key).status_code == 200
    api.settle()
    assert api.usage(key, live=False).meters["calls"] == 1
    assert api.usage(key, live=True).meters["calls"] == 0
    assert api.balance(key).balance == 1_000_000


def test_exceptions_propagate_and_are_recorded_as_failures(make_api: Any) -> None:
    """An exception in the app is re-raised to the server and recorded as a failed, uncharged call."""
    api = make_api()
    key = api.customer("payg", credits="1")
    api.raise_server_exceptions = True
    api.settle()
    with pytest.raises(RuntimeError, match="boom"):
        api.call("GET", "/v1/boom", key)
    api.settle()
    (event,) = api.events()
    assert (event.status, event.outcome, event.billable) == (500, "server_error", False)
    assert api.balance(key).balance == 1_000_000


def test_a_key_created_with_an_expiry_stops_at_it(api: Api) -> None:
    """A key created to expire is served until then, and refused with 401 expired_key after."""
    key = api.customer("open")
    customer = api.customer_of(key)
    expiring = api.accounts.create_key(customer, expires_at=time.time() + 0.5).plaintext
    assert api.call("GET", "/v1/hello", expiring).status_code == 200
    time.sleep(0.6)
    response = api.call("GET", "/v1/hello", expiring)
    assert (response.status_code, response.json()["reason"]) == (401, "expired_key")
    assert api.call("GET", "/v1/hello", key).status_code == 200


def test_a_key_with_remaining_uses_is_refused_with_403_once_they_are_used(api: Api) -> None:
    """A key with 3 uses serves 3 calls (a failed one takes its use too, as Unkey's credits), then gets
    403 key_exhausted without reaching the app; the customer's other keys still work."""
    key = api.customer("open")
    customer = api.customer_of(key)
    counted = api.accounts.create_key(customer, remaining=3).plaintext
    statuses = [api.call("GET", path, counted).status_code for path in ("/v1/hello", "/v1/fail", "/v1/hello")]
    assert statuses == [200, 502, 200]
    response = api.call("GET", "/v1/hello", counted)
    assert (response.status_code, response.json()["reason"]) == (403, "key_exhausted")
    assert CALLS == ["hello", "fail", "hello"]
    assert api.call("GET", "/v1/hello", key).status_code == 200
    assert api.accounts.list_keys(customer)[1].remaining == 0


def test_the_handler_reads_who_calls(api: Api) -> None:
    """``meterware.current_call()`` gives the handler (async or sync, in a worker thread or not) the
    admitted customer, plan, key id, scopes and mode of the call; a test key reads as not live."""
    key = api.customer("open")
    customer = api.customer_of(key)
    scoped = api.accounts.create_key(customer, scopes=["files:read", "files:write"])
    assert api.call("GET", "/v1/whoami", scoped.plaintext).json() == {
        "customer": customer,
        "plan": "open",
        "key_id": scoped.key_id,
        "scopes": ["files:read", "files:write"],
        "live": True,
    }
    test_key = api.accounts.create_key(customer, live=False)
    found = api.call("GET", "/v1/whoami", test_key.plaintext).json()
    assert (found["key_id"], found["scopes"], found["live"]) == (test_key.key_id, [], False)
    assert CALLS == ["whoami", "whoami"]


def test_keys_with_a_custom_prefix_and_imported_keys_are_served(api: Api) -> None:
    """A key made with the seller's prefix and a key imported from another system by its hash both work
    like meterware's own; an unknown key of another system's shape is 401 unknown_key."""
    from meterware.keys import hash_key

    key = api.customer("open")
    customer = api.customer_of(key)
    custom = api.accounts.create_key(customer, prefix="acme_live").plaintext
    legacy = "sk_live_" + "Legacy0123456789" * 2
    imported = api.accounts.import_key(customer, key_hash=hash_key(legacy), scopes=["read"])
    assert api.call("GET", "/v1/hello", custom).status_code == 200
    assert api.call("GET", "/v1/whoami", legacy).json()["key_id"] == imported.key_id
    response = api.call("GET", "/v1/hello", "sk_live_" + "Unknown0123456789" * 2)
    assert (response.status_code, response.json()["reason"]) == (401, "unknown_key")
