"""Rate limits on a value meter (``1000 tokens/minute``): a call takes the meter's estimate at admission,
its actual units correct the bucket when it is flushed, and a refusal says when the estimate fits again.

Hand-computed: 1,000 tokens a minute is one token per 60 ms; the meter's reserve (the estimate) is 100
tokens, 6 s of the bucket. Timing slack: the calls of a test run in well under a second, so a Retry-After
or a reset rounded up to whole seconds is the hand-computed one, and the tokens left are at most
:data:`DRAINED` more (the bucket drains a token per 60 ms meanwhile).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from werkzeug.test import Client

import meterware
from meterware import Accounts, Config, Recorder
from meterware.config import RateLimit
from meterware.errors import UsageError
from meterware.metering.admission import AdmitRequest
from meterware.metering.calls import route_limits
from meterware.metering.leases import lease_block
from meterware.wsgi import WSGIMeteringMiddleware


@pytest.fixture
def config(backend_url: str, tmp_path: Path) -> Config:
    return Config.from_dict(
        {
            "storage": {"url": backend_url, "shards": 4},
            "meters": {
                "calls": {"aggregation": "count", "source": "call"},
                "tokens": {"aggregation": "sum", "source": "handler", "reserve": 100},
            },
            "plans": {"tpm": {"rate_limits": ["600/minute", "1000 tokens/minute"]}},
            "pipeline": {"flush_interval": 60, "spool_dir": str(tmp_path / "spool")},
            "policy": {"timeout": 5.0},
        }
    )


@pytest.fixture
def accounts(config: Config) -> Iterator[Accounts]:
    accounts = Accounts.open(config)
    accounts.create_customer("acme", plan="tpm")
    yield accounts
    accounts.close()


@pytest.fixture
def middleware(config: Config, accounts: Accounts) -> Iterator[WSGIMeteringMiddleware]:
    def app(environ: Any, start_response: Any) -> list[bytes]:
        meterware.usage.add("tokens", int(environ["QUERY_STRING"].removeprefix("tokens=")))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    middleware = WSGIMeteringMiddleware(app, config, customer_getter=lambda environ: "acme")
    yield middleware
    middleware.drain()


def call(middleware: WSGIMeteringMiddleware, tokens: int) -> Any:
    """One call reporting ``tokens``, flushed before the next (so its actual units are in the bucket)."""
    response = Client(middleware).get(f"/v1/chat?tokens={tokens}", buffered=True)
    middleware.drain()
    return response


#: Tokens the bucket may drain while a test's calls run (0.6 s).
DRAINED = 10


def entry(response: Any, name: str = "tokens-rate-60s") -> tuple[int, int]:
    """The tokens left and the reset (s) in the ``RateLimit`` entry of the policy ``name``."""
    found = next(part for part in response.headers["ratelimit"].split(", ") if part.startswith(f'"{name}"'))
    left, reset = found.split(";")[1:]
    return int(left.removeprefix("r=")), int(reset.removeprefix("t="))


def near(found: tuple[int, int], left: int, reset: int) -> bool:
    """Whether ``found`` is ``(left, reset)`` but for the tokens drained meanwhile."""
    return left <= found[0] <= left + DRAINED and found[1] == reset


def test_calls_past_the_tokens_limit_are_refused_until_the_estimate_fits(
    middleware: WSGIMeteringMiddleware,
) -> None:
    """Calls reporting 500 tokens: each takes 100 (6 s) at admission, its flush adds 400 more (24 s). After
    two the bucket is 60 s ahead (1,000 tokens: full); the third needs 6 s more than the 60 s burst, so it
    is refused, 429 rate_limited, Retry-After 6 (60 + 6 - 60), with its own entry (0 tokens left, the
    bucket empties in 60 s) next to the calls' limit, which it does not move."""
    first = call(middleware, 500)
    assert first.status_code == 200
    policy = first.headers["ratelimit-policy"]
    assert policy == '"rate-60s";q=600;w=60, "tokens-rate-60s";q=1000;w=60'
    # Admitted with 100 taken: 900 left, the TAT 6 s ahead.
    assert near(entry(first), 900, 6)
    second = call(middleware, 500)
    # 500 used then 100 more taken: 400 left, 36 s ahead.
    assert near(entry(second), 400, 36)
    refused = call(middleware, 500)
    assert refused.status_code == 429
    assert json.loads(refused.get_data())["reason"] == "rate_limited"
    assert refused.headers["retry-after"] == "6"
    assert near(entry(refused), 0, 60)
    # As if admitted (only the refusing limit stands where it is): three calls, 100 ms each.
    assert near(entry(refused, "rate-60s"), 597, 1)


def test_a_call_using_less_than_its_estimate_gives_the_difference_back(
    middleware: WSGIMeteringMiddleware,
) -> None:
    """A call reporting 10 tokens takes 100 and gives 90 back at its flush: the next call sees 990 left
    before taking its own 100 (890 after it, 110 tokens = 6.6 s ahead, t rounded up to 7)."""
    assert near(entry(call(middleware, 10)), 900, 6)
    assert near(entry(call(middleware, 10)), 890, 7)


def test_a_call_past_the_burst_leaves_a_debt_of_at_most_one_period(
    middleware: WSGIMeteringMiddleware,
) -> None:
    """A call reporting 5,000 tokens (five minutes of the limit) takes the bucket one period ahead at most:
    the next call is refused for 6 s (its estimate), not for four minutes."""
    assert call(middleware, 5000).status_code == 200
    refused = call(middleware, 10)
    assert (refused.status_code, refused.headers["retry-after"]) == (429, "6")


def test_records_count_against_the_tokens_limit(config: Config, middleware: WSGIMeteringMiddleware) -> None:
    """A record of 950 tokens is never refused by the limit, but once flushed it leaves 50 tokens: the next
    call (estimate 100) is refused for 3 s (950 + 100 - 1000 = 50 tokens, 3 s)."""
    with Recorder(config) as recorder:
        recorder.record("acme", {"tokens": 950}, event_id="batch-1")
        recorder.flush()
    refused = call(middleware, 10)
    assert (refused.status_code, refused.headers["retry-after"]) == (429, "3")


@pytest.mark.parametrize(("limit", "calls"), [("100000 tokens/minute", 32), ("1200 tokens/minute", 3)])
def test_a_lease_takes_at_most_a_quarter_of_a_tokens_limit(limit: str, calls: int) -> None:
    """A lease's block takes each call's estimate (100 tokens): at most a quarter of the limit, so 1,200
    tokens a minute lease 3 calls (300 tokens), 100,000 the policy's lease_calls (32) whole."""
    meters = {"tokens": {"aggregation": "sum", "source": "handler", "reserve": 100}}
    config = Config.from_dict(
        {"meters": meters, "plans": {"p": {"rate_limits": [limit]}}, "policy": {"lease_calls": 32}}
    )
    request = AdmitRequest(0, "acme", "k1", True, config.plan("p"), 0, 86_400, (), "r", 1000)
    block = lease_block(request, config.policy)
    assert block is not None
    assert block.calls == calls


def test_a_lease_takes_at_most_a_quarter_of_a_routes_tokens_limit() -> None:
    """A route's limit of 1,200 tokens a minute leases 3 calls of a 100-token estimate (300 tokens), as a
    plan's would; its bucket is the route's own (``r<crc32>:mtokens``)."""
    meters = {"tokens": {"aggregation": "sum", "source": "handler", "reserve": 100}}
    routes = {"/v1/chat": {"rate_limits": ["1200 tokens/minute"]}}
    config = Config.from_dict(
        {"meters": meters, "plans": {"p": {"routes": routes}}, "policy": {"lease_calls": 32}}
    )
    plan = config.plan("p")
    [scoped] = route_limits(plan, plan.route_of("/v1/chat"))
    assert (scoped.scope.endswith(":mtokens"), scoped.name) == (True, "route-tokens-rate-60s")
    request = AdmitRequest(0, "acme", "k1", True, plan, 0, 86_400, (), "r", 1000, scoped_limits=(scoped,))
    block = lease_block(request, config.policy)
    assert block is not None
    assert block.calls == 3


def test_a_routes_tokens_limit_refuses_its_route_only(config: Config, tmp_path: Path) -> None:
    """``/v1/chat`` at 1,000 tokens a minute on a plan without limits of its own: calls reporting 500
    tokens, as on a plan's limit, fill the route's bucket after two (400 left after the second's 100), the
    third is refused 429 rate_limited, Retry-After 6, by its ``route-tokens-rate-60s`` entry (0 left, 60 s);
    a call to another route is not limited by it (no entry), and its tokens do not count there."""
    routed = Config.from_dict(
        {
            "storage": {"url": config.storage, "shards": 4},
            "meters": {"tokens": {"aggregation": "sum", "source": "handler", "reserve": 100}},
            "plans": {"routed": {"routes": {"/v1/chat": {"rate_limits": ["1000 tokens/minute"]}}}},
            "pipeline": {"flush_interval": 60, "spool_dir": str(tmp_path / "routed-spool")},
            "policy": {"timeout": 5.0},
        }
    )
    accounts = Accounts.open(routed)
    accounts.create_customer("beta", plan="routed")

    def app(environ: Any, start_response: Any) -> list[bytes]:
        meterware.usage.add("tokens", int(environ["QUERY_STRING"].removeprefix("tokens=")))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    middleware = WSGIMeteringMiddleware(app, routed, customer_getter=lambda environ: "beta")

    def on(path: str, tokens: int) -> Any:
        response = Client(middleware).get(f"{path}?tokens={tokens}", buffered=True)
        middleware.drain()
        return response

    try:
        first = on("/v1/chat", 500)
        assert first.headers["ratelimit-policy"] == '"route-tokens-rate-60s";q=1000;w=60'
        assert near(entry(first, "route-tokens-rate-60s"), 900, 6)
        other = on("/v1/other", 5000)
        assert other.status_code == 200
        assert "ratelimit" not in other.headers
        second = on("/v1/chat", 500)
        assert near(entry(second, "route-tokens-rate-60s"), 400, 36)
        refused = on("/v1/chat", 500)
        assert refused.status_code == 429
        assert json.loads(refused.get_data())["reason"] == "rate_limited"
        assert refused.headers["retry-after"] == "6"
        assert near(entry(refused, "route-tokens-rate-60s"), 0, 60)
        assert on("/v1/other", 10).status_code == 200
    finally:
        middleware.drain()
        middleware.clients.flusher.storage.close()
        middleware.clients.storage.close()
        accounts.close()


def test_a_keys_tokens_limit_counts_that_keys_tokens(config: Config, accounts: Accounts) -> None:
    """A key created with ``500 tokens/minute`` (120 ms a token; stored with the key, its estimate the
    meter's reserve: 100 tokens, 12 s) under the plan's 1,000: a call reporting 200 leaves 400 (12 s
    ahead), one reporting 300 then 200 (36 s), and once flushed the bucket is full (60 s): its third call
    is refused 429 rate_limited, Retry-After 12 (60 + 12 - 60), by its ``key-tokens-rate-60s`` entry,
    while the plan's bucket (510 tokens) has room. The customer's other key is not limited by it."""
    limited = accounts.create_key("acme", rate_limits=["500 tokens/minute"])
    other = accounts.create_key("acme")
    [stored] = accounts.key(limited.key_id).rate_limits
    assert (str(stored), stored.estimate) == ("500 tokens/60s", 100)

    def app(environ: Any, start_response: Any) -> list[bytes]:
        meterware.usage.add("tokens", int(environ["QUERY_STRING"].removeprefix("tokens=")))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    middleware = WSGIMeteringMiddleware(app, config)

    def by(key: str, tokens: int) -> Any:
        headers = {"Authorization": f"Bearer {key}"}
        response = Client(middleware).get(f"/v1/chat?tokens={tokens}", headers=headers, buffered=True)
        middleware.drain()
        return response

    try:
        assert near(entry(by(limited.plaintext, 200), "key-tokens-rate-60s"), 400, 12)
        assert near(entry(by(limited.plaintext, 300), "key-tokens-rate-60s"), 200, 36)
        served = by(other.plaintext, 10)
        assert served.status_code == 200
        assert "key-tokens-rate-60s" not in served.headers["ratelimit"]
        refused = by(limited.plaintext, 10)
        assert refused.status_code == 429
        assert json.loads(refused.get_data())["reason"] == "rate_limited"
        assert refused.headers["retry-after"] == "12"
        assert near(entry(refused, "key-tokens-rate-60s"), 0, 60)
        assert entry(refused)[0] >= 1000 - 610  # the plan's bucket had room
    finally:
        middleware.drain()
        middleware.clients.flusher.storage.close()
        middleware.clients.storage.close()


@pytest.mark.parametrize(
    "limit",
    [
        pytest.param(RateLimit(500, 60, "tokens", 0), id="estimate-zero"),
        pytest.param(RateLimit(500, 60, "tokens", 600), id="estimate-past-the-limit"),
        pytest.param(RateLimit(500, 60, "nosuch", 100), id="unknown-meter"),
        pytest.param(RateLimit(500, 60, "calls", 1), id="count-meter"),
        pytest.param(RateLimit(500, 60, "to kens", 1), id="meter-name-with-a-space"),
    ],
)
def test_a_keys_meter_limit_given_as_a_rate_limit_is_checked_as_its_text_is(
    accounts: Accounts, limit: RateLimit
) -> None:
    """A ``RateLimit`` given to ``create_key`` is checked as ``"500 tokens/minute"`` is: a meter the config
    has as ``sum``, an estimate a call can take (at least 1, at most the limit). Unchecked, an estimate of 0
    divided a lease block by zero, and a meter name with a space was stored as text that
    ``rate_limits_from`` cannot read back (the key no longer resolved on Redis)."""
    with pytest.raises(UsageError):
        accounts.create_key("acme", rate_limits=[limit])
