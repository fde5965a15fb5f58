"""Alerts: thresholds, fired once per period through the backend, signed and delivered as webhooks."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from meterware.billing.accounts import Accounts
from meterware.billing.alerts import (
    Alert,
    AlertEvaluator,
    Crossing,
    WebhookSender,
    crossings,
    read_alerts,
    sign,
    verify_signature,
)
from meterware.config import AlertRules, Config, MeterTerms, Plan
from meterware.errors import ConfigError
from meterware.events import encode_batch
from meterware.metering.periods import period_bounds
from meterware.metering.records import Customer
from meterware.rollup import RollupWorker
from meterware.rollup.metrics import RollupMetrics
from meterware.storage._keyspace import shard_of
from meterware.storage.base import Batch, Settlement, Storage
from meterware.storage.memory import MemoryStorage
from meterware.storage.redis import RedisStorage
from tests.export.providers import Elsewhere, Redirector
from tests.rollup.helpers import event

C = 1_000_000  # micro-credits per credit
ANCHOR = 1_767_225_600  # 2026-01-01T00:00:00Z
PERIOD = ANCHOR  # January 2026
NEXT_PERIOD = 1_769_904_000  # 2026-02-01T00:00:00Z
JANUARY_MS = (ANCHOR + 86_400) * 1000

CONFIG: dict[str, Any] = {
    "storage": {"url": "memory://alerts-tests", "shards": 4},
    "plans": {
        "free": {"meters": {"calls": {"quota": 10}}},
        "payg": {"prepaid": True, "meters": {"calls": {"price": "0.5"}}},
        "pro": {"meters": {"calls": {"quota": 100, "quota_mode": "soft", "price": "1"}}},
    },
    "alerts": {
        "quota_percent": [50, 80, 100],
        "credits_below": ["10", "1"],
        "spend_above": ["20"],
        "plans": {"pro": {"quota_percent": [90]}},
    },
}


def plan(*, quota: int | None = 10, hard: bool = True, prepaid: bool = False) -> Plan:
    return Plan("p", prepaid=prepaid, meters={"calls": MeterTerms(quota=quota, hard=hard)})


RULES = AlertRules((50, 80, 100), (1 * C, 10 * C), (20 * C,))


@pytest.mark.parametrize(
    ("the_plan", "usage", "balance", "expected"),
    [
        pytest.param(plan(), {"calls": 4}, None, [], id="below-50%"),
        pytest.param(plan(), {"calls": 5}, None, ["quota:calls:50"], id="exactly-50%"),
        pytest.param(plan(), {"calls": 8}, None, ["quota:calls:50", "quota:calls:80"], id="exactly-80%"),
        pytest.param(
            plan(), {"calls": 10}, None, ["quota:calls:50", "quota:calls:80", "quota:calls:100"], id="100%"
        ),
        pytest.param(plan(hard=False), {"calls": 9}, None, ["quota:calls:50", "quota:calls:80"], id="soft"),
        pytest.param(plan(quota=None), {"calls": 10**6}, None, [], id="no-quota"),
        pytest.param(plan(quota=0), {"calls": 3}, None, [], id="zero-quota-has-no-percentage"),
        pytest.param(plan(prepaid=True, quota=None), {}, 10 * C, [], id="credits-at-threshold"),
        pytest.param(
            plan(prepaid=True, quota=None), {}, 10 * C - 1, ["credits:10000000"], id="credits-below"
        ),
        pytest.param(
            plan(prepaid=True, quota=None),
            {},
            -5,
            ["credits:1000000", "credits:10000000"],
            id="credits-negative",
        ),
        pytest.param(plan(quota=None), {}, 0, [], id="credits-only-on-prepaid-plans"),
        pytest.param(plan(quota=None), {"spend": 20 * C}, None, [], id="spend-at-threshold"),
        pytest.param(plan(quota=None), {"spend": 20 * C + 1}, None, ["spend:20000000"], id="spend-above"),
    ],
)
def test_crossings(the_plan: Plan, usage: dict[str, int], balance: int | None, expected: list[str]) -> None:
    """Quotas are reached at the percentage, credits are below and spend above their thresholds."""
    assert [c.rule for c in crossings(RULES, the_plan, usage, balance)] == expected


def test_a_crossing_shows_threshold_and_value_exactly() -> None:
    """Percentages and credits are exact decimal strings, never floats."""
    found = crossings(RULES, plan(quota=3, prepaid=True), {"calls": 2, "spend": 20_500_001}, 999_999)
    assert found == [
        Crossing("quota.threshold", "quota:calls:50", "50", "66.66", "calls", 3, 2),
        Crossing("credits.low", "credits:1000000", "1.000000", "0.999999"),
        Crossing("credits.low", "credits:10000000", "10.000000", "0.999999"),
        Crossing("spend.threshold", "spend:20000000", "20.000000", "20.500001"),
    ]


# -- configuration -------------------------------------------------------------------------------------


def test_plan_and_customer_thresholds_override_field_by_field() -> None:
    """A plan's list replaces everyone's; a customer's replaces its plan's; unset lists are inherited."""
    config = Config.from_dict(CONFIG)
    assert config.alerts.rules_for("free") == RULES
    assert config.alerts.rules_for("pro") == AlertRules((90,), RULES.credits_below, RULES.spend_above)
    own = AlertRules(credits_below=(5 * C,))
    assert own.over(config.alerts.rules_for("pro")) == AlertRules((90,), (5 * C,), (20 * C,))


@pytest.mark.parametrize(
    ("alerts", "message"),
    [
        ({"quota_percent": [0]}, "alerts.quota_percent[0]: must be a whole percentage from 1 to 1000, got 0"),
        ({"quota_percent": [50.5]}, "alerts.quota_percent[0]: must be a whole percentage"),
        ({"quota_percent": 80}, "alerts.quota_percent: must be a list, got an integer"),
        ({"credits_below": [1.5]}, 'alerts.credits_below[0]: must be a decimal string like "0.002"'),
        ({"spend_above": ["-1"]}, "alerts.spend_above[0]: must not be negative"),
        ({"webhook_url": "ftp://x"}, "alerts.webhook_url: must be an http:// or https:// URL"),
        ({"secret_env": "not a name"}, "alerts.secret_env: must name an environment variable"),
        ({"webhook_attempts": 0}, "alerts.webhook_attempts: must be at least 1"),
        ({"plans": {"gold": {}}}, "alerts.plans.gold: names no plan defined under [plans]"),
        (
            {"plans": {"free": {"credits_low": ["1"]}}},
            "alerts.plans.free.credits_low: is not a known setting",
        ),
        ({"quota": [1]}, "alerts.quota: is not a known setting"),
    ],
)
def test_bad_alert_settings_name_their_field(alerts: dict[str, Any], message: str) -> None:
    """Each mistake in [alerts] is one ConfigError naming the field."""
    with pytest.raises(ConfigError) as caught:
        Config.from_dict({**CONFIG, "alerts": alerts})
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_webhook_without_its_secret_fails_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """The secret comes from the environment only; a worker without it refuses to start."""
    monkeypatch.delenv("HOOK_SECRET", raising=False)
    alerts = {**CONFIG["alerts"], "webhook_url": "http://127.0.0.1:9/x", "secret_env": "HOOK_SECRET"}
    config = Config.from_dict({**CONFIG, "alerts": alerts})
    with pytest.raises(ConfigError, match=r"alerts\.secret_env: the environment variable HOOK_SECRET"):
        RollupWorker(MemoryStorage(4), config)


# -- firing once, over every backend -------------------------------------------------------------------


@pytest.fixture(
    params=[
        pytest.param("memory", id="memory"),
        pytest.param("redis", id="redis", marks=pytest.mark.redis),
        pytest.param("cluster", id="cluster", marks=pytest.mark.redis),
    ]
)
def storage(request: pytest.FixtureRequest) -> Iterator[Storage]:
    """An empty backend: memory, a real redis-server, a real 3-node Redis Cluster."""
    if request.param == "memory":
        yield MemoryStorage(4)
        return
    url = request.getfixturevalue("redis_url" if request.param == "redis" else "cluster_url")
    redis_storage = RedisStorage(url, shards=4, timeout=2.0)
    yield redis_storage
    redis_storage.close()


def customers(storage: Storage) -> None:
    for name, plan_name in (("hobby", "free"), ("wallet", "payg"), ("bigco", "pro")):
        storage.create_customer(Customer(name, plan_name, "active", ANCHOR))


def calls(storage: Storage, customer: str, count: int, *, ms: int = JANUARY_MS, price: int = 0) -> None:
    """Flush ``count`` successful calls of ``customer`` (``price`` micro-credits each, from its credits)."""
    start, _ = period_bounds(ANCHOR, "month", ms / 1000)
    events = [event(customer, ts=ms + i, period_start=start) for i in range(count)]
    settlement = Settlement(customer, True, start, "", True, price > 0, (("calls", 1, price, 0),))
    shard = shard_of(customer, storage.shards)
    assert storage.flush(Batch(shard, f"b-{time.time_ns()}", encode_batch(events), (settlement,) * count))


def fired(storage: Storage, customer: str | None = None) -> list[tuple[str, str, int]]:
    return [(a.customer, a.threshold, a.period_start) for a in read_alerts(storage, customer=customer)]


def test_fire_alert_is_set_if_absent(storage: Storage) -> None:
    """The backend appends an alert and sets its marker once; the second attempt writes nothing."""
    customers(storage)
    alert = Alert("alrt_1", "credits.low", "wallet", PERIOD, "1.000000", "0.500000", 1)
    first = storage.fire_alert("wallet", f"{PERIOD}:credits:1", int(time.time()) + 3600, alert.fields())
    again = storage.fire_alert("wallet", f"{PERIOD}:credits:1", int(time.time()) + 3600, alert.fields())
    assert first
    assert again is None
    assert read_alerts(storage) == [alert]
    assert read_alerts(storage)[0].entry_id == first


def test_customer_thresholds_are_stored_per_customer(storage: Storage) -> None:
    """Set, read back and clear a customer's own thresholds; unknown customers are refused."""
    customers(storage)
    accounts = Accounts(storage, Config.from_dict(CONFIG))
    accounts.set_alerts("hobby", quota_percent=[90], credits_below=["2.5"])
    assert accounts.alert_rules("hobby") == AlertRules((90,), (2_500_000,), (20 * C,))
    accounts.set_alerts("hobby", clear=True)
    assert accounts.alert_rules("hobby") == RULES
    with pytest.raises(Exception, match="no customer 'ghost'"):
        accounts.set_alerts("ghost", quota_percent=[50])


def test_quota_thresholds_fire_once_each_over_many_batches_and_two_workers(storage: Storage) -> None:
    """50/80/100% of a quota fire once each, in order, whichever of two racing workers commits."""
    customers(storage)
    config = Config.from_dict(CONFIG)
    workers = [RollupWorker(storage, config, owner=f"w{i}", shards=range(storage.shards)) for i in (1, 2)]
    for _ in range(12):  # one call per batch, past the quota of 10 (usage is what the events say)
        calls(storage, "hobby", 1)
        for worker in workers:
            worker.drain()
        workers.reverse()
        # Evaluating again (a restarted worker, a replay) never fires twice.
        AlertEvaluator(storage, config).evaluate("hobby", PERIOD)
    assert fired(storage, "hobby") == [
        ("hobby", "50", PERIOD),
        ("hobby", "80", PERIOD),
        ("hobby", "100", PERIOD),
    ]
    assert [a.used for a in read_alerts(storage)] == [5, 8, 10]


def test_a_new_period_fires_again(storage: Storage) -> None:
    """The same threshold fires again in the next billing period, and late events of the old one never."""
    customers(storage)
    config = Config.from_dict(CONFIG)
    worker = RollupWorker(storage, config)
    calls(storage, "hobby", 5)
    worker.drain()
    calls(storage, "hobby", 5, ms=NEXT_PERIOD * 1000 + 5)
    worker.drain()
    calls(storage, "hobby", 1)  # a late event of January: 50% fired already there
    worker.drain()
    assert fired(storage) == [("hobby", "50", PERIOD), ("hobby", "50", NEXT_PERIOD)]


def test_credits_below_and_spend_above(storage: Storage) -> None:
    """A prepaid balance below each threshold fires credits.low; period spend above fires spend.threshold."""
    customers(storage)
    config = Config.from_dict(CONFIG)
    storage.grant_credits("wallet", 30 * C)
    worker = RollupWorker(storage, config)
    now_ms = int(time.time() * 1000)
    for count in (10, 29, 3):  # 0.5 credits a call: 25, then 10.5, then 9 credits left
        calls(storage, "wallet", count, ms=now_ms, price=C // 2)
        worker.drain()
    alerts = read_alerts(storage, customer="wallet")
    assert [(a.type, a.threshold, a.value) for a in alerts] == [
        ("credits.low", "10.000000", "9.000000"),  # 30 - 21 credits: below 10, not below 1
        ("spend.threshold", "20.000000", "21.000000"),  # 19.5 after the second batch: not above 20
    ]
    assert storage.get_balance("wallet").balance == 9 * C


# -- signatures ----------------------------------------------------------------------------------------

SECRET = "whsec_test"
BODY = b'{"id":"alrt_1","type":"credits.low"}'


@pytest.mark.parametrize(
    ("body", "header", "secret", "now", "valid"),
    [
        pytest.param(BODY, sign(BODY, SECRET, 1000), SECRET, 1000, True, id="good"),
        pytest.param(
            BODY.decode(), sign(BODY, SECRET, 1000), SECRET, 1299, True, id="text-body-within-tolerance"
        ),
        pytest.param(BODY + b" ", sign(BODY, SECRET, 1000), SECRET, 1000, False, id="tampered-body"),
        pytest.param(BODY, sign(BODY, "other", 1000), SECRET, 1000, False, id="wrong-secret"),
        pytest.param(BODY, sign(BODY, SECRET, 1000), SECRET, 1301, False, id="stale"),
        pytest.param(BODY, sign(BODY, SECRET, 1000), SECRET, 699, False, id="from-the-future"),
        pytest.param(
            BODY, sign(BODY, SECRET, 1000).replace("t=1000", "t=1200"), SECRET, 1200, False, id="new-t"
        ),
        pytest.param(
            BODY, f"t=1000,v1=00,{sign(BODY, SECRET, 1000)[7:]}", SECRET, 1000, True, id="rolled-secret"
        ),
        pytest.param(BODY, "v1=abc", SECRET, 1000, False, id="no-timestamp"),
        pytest.param(BODY, "", SECRET, 1000, False, id="no-header"),
        pytest.param(BODY, "t=x,v1=abc", SECRET, 1000, False, id="garbage"),
    ],
)
def test_verify_signature(body: bytes | str, header: str, secret: str, now: int, valid: bool) -> None:
    """Only the exact body, signed with the secret within the tolerance (300 s), verifies."""
    assert verify_signature(body, header, secret, now=now) is valid


GOOD = sign(BODY, SECRET, 1000)
DIGEST = GOOD.rpartition("v1=")[2]


@pytest.mark.parametrize(
    ("body", "header"),
    [
        pytest.param(BODY, None, id="none"),
        pytest.param(BODY, "", id="empty"),
        pytest.param(BODY, ",,,", id="commas"),
        pytest.param(BODY, f"v1={DIGEST}", id="no-t"),
        pytest.param(BODY, "t=1000", id="no-v1"),
        pytest.param(BODY, f"t=,v1={DIGEST}", id="empty-t"),
        pytest.param(BODY, f"t=-1000,v1={DIGEST}", id="negative-t"),
        pytest.param(BODY, f"t=1e3,v1={DIGEST}", id="float-t"),
        pytest.param(BODY, f"t=²,v1={DIGEST}", id="superscript-t"),
        pytest.param(BODY, f"t=\u0661\u0660\u0660\u0660,v1={DIGEST}", id="arabic-indic-t"),
        pytest.param(BODY, f"t={'9' * 400},v1={DIGEST}", id="huge-t"),
        pytest.param(BODY, f"t={'9' * 5000},v1={DIGEST}", id="more-digits-than-int-reads"),
        pytest.param(BODY, "t=1000,v1=zz", id="non-hex-v1"),
        pytest.param(BODY, "t=1000,v1=é" + DIGEST[1:], id="non-ascii-v1"),
        pytest.param(BODY, f"t=1000,v1={DIGEST.upper()}é", id="non-ascii-after-v1"),
        pytest.param(BODY, f"t=1000,t=1000,v1={DIGEST}", id="repeated-t"),
        pytest.param(BODY, f"t=999,{GOOD}", id="two-different-t"),
        pytest.param(BODY, GOOD.encode(), id="bytes-header-is-read-as-ascii"),
        pytest.param(BODY, b"t=1000,v1=\xff\xfe", id="bytes-header-not-ascii"),
        pytest.param(BODY.decode() + "\ud800", GOOD, id="text-body-with-a-lone-surrogate"),
        pytest.param(BODY, GOOD + "\x00", id="nul"),
        pytest.param(1000, GOOD, id="body-not-bytes-or-text"),
        pytest.param(BODY, 1000, id="header-not-text"),
    ],
)
def test_verify_signature_returns_false_on_garbage(body: Any, header: Any) -> None:
    """A malformed header or body is a failed verification, never an exception (the receiver answers 400)."""
    expected = header == GOOD.encode()  # a well-formed bytes header (ASGI scopes carry bytes) verifies
    assert verify_signature(body, header, SECRET, now=1000) is expected


def test_an_empty_secret_verifies_nothing() -> None:
    """A receiver whose secret variable is empty refuses everything (anyone can sign with an empty key)."""
    assert not verify_signature(BODY, sign(BODY, "", 1000), "", now=1000)


@given(
    st.one_of(st.binary(), st.text()),
    st.one_of(
        st.none(), st.text(), st.binary(), st.builds(lambda t, v: f"t={t},v1={v}", st.text(), st.text())
    ),
    st.floats(allow_nan=True, allow_infinity=True) | st.integers(min_value=-(10**30), max_value=10**30),
)
@example(BODY, "t=²,v1=00", 1000)
@example(BODY, f"t={'9' * 400},v1={DIGEST}", 1000)
@example(BODY, "t=1000,v1=é", 1000)
def test_verify_signature_never_raises(body: bytes | str, header: str | bytes | None, now: float) -> None:
    """Fuzzed bodies, headers and clocks: verify_signature answers True or False, nothing else."""
    assert verify_signature(body, header, SECRET, now=now) in (True, False)


@given(st.binary(), st.integers(min_value=0, max_value=10**12 - 1))
def test_what_sign_makes_verify_signature_takes(body: bytes, timestamp: int) -> None:
    """Any body signed at any time (to year 33658) verifies at that time, the header as text or bytes."""
    header = sign(body, SECRET, timestamp)
    assert verify_signature(body, header, SECRET, now=timestamp)
    assert verify_signature(body, header.encode(), SECRET, now=timestamp)
    assert not verify_signature(body + b"x", header, SECRET, now=timestamp)


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    """The header is Stripe's scheme, reproducible with hmac alone (as the README shows receivers)."""
    import hashlib
    import hmac

    expected = hmac.new(SECRET.encode(), b"1000." + BODY, hashlib.sha256).hexdigest()
    assert sign(BODY, SECRET, 1000) == f"t=1000,v1={expected}"


# -- delivery to a real HTTP server --------------------------------------------------------------------


class Receiver:
    """A webhook endpoint on 127.0.0.1 answering from a script of statuses, recording every request."""

    def __init__(self, answers: list[tuple[int, dict[str, str]]]) -> None:
        self.answers = answers
        self.requests: list[tuple[float, dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((time.monotonic(), dict(self.headers), body))
                status, headers = receiver.answers.pop(0) if receiver.answers else (200, {})
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


ALERT = Alert("alrt_0123", "quota.threshold", "hobby", PERIOD, "80", "80.00", 1_767_300_000, "calls", 10, 8)


def test_a_webhook_is_retried_after_500_and_429_then_delivered_once() -> None:
    """500, then 429 with Retry-After: 1, then 200: three attempts, the second wait honours Retry-After."""
    registry = CollectorRegistry()
    metrics = RollupMetrics(registry)
    with Receiver([(500, {}), (429, {"Retry-After": "1"})]) as receiver:
        sender = WebhookSender(receiver.url, SECRET, attempts=4, base_delay=0.05, metrics=metrics)
        assert sender.submit(ALERT)  # returns at once: delivery is in the background
        sender.close(timeout=10)
    assert sender.delivered == 1
    assert sender.failed == 0
    assert len(receiver.requests) == 3
    (t0, _, _), (t1, _, _), (t2, headers, body) = receiver.requests
    assert 0.025 <= t1 - t0 < 0.5  # backoff with jitter: half to all of base_delay
    assert t2 - t1 >= 0.95  # Retry-After: 1
    assert json.loads(body) == ALERT.as_dict()
    assert headers["Meterware-Event-Id"] == "alrt_0123"
    assert headers["Content-Type"] == "application/json"
    assert verify_signature(body, headers["Meterware-Signature"], SECRET)
    assert registry.get_sample_value("meterware_alert_webhooks_delivered_total") == 1
    # Every attempt carries the same event id, so a receiver can drop what it has seen.
    assert {request[1]["Meterware-Event-Id"] for request in receiver.requests} == {"alrt_0123"}


def test_a_webhook_gives_up_after_its_attempts_and_on_a_4xx() -> None:
    """Attempts are bounded; a 4xx other than 408/429 is final; both count as failed deliveries."""
    no_headers: dict[str, str] = {}
    with Receiver([(503, no_headers)] * 3 + [(404, no_headers)]) as receiver:
        sender = WebhookSender(receiver.url, SECRET, attempts=3, base_delay=0.01)
        assert not sender.deliver(ALERT)
        assert len(receiver.requests) == 3
        assert not sender.deliver(ALERT)  # the 404
        assert len(receiver.requests) == 4
    assert (sender.delivered, sender.failed) == (0, 2)


def test_a_webhook_to_a_closed_port_is_retried_then_counted() -> None:
    """Connection errors are retried with backoff, then the alert stays on the stream only."""
    with Receiver([]) as receiver:
        url = receiver.url
    sender = WebhookSender(url, SECRET, attempts=2, base_delay=0.01, timeout=1)
    assert not sender.deliver(ALERT)
    assert sender.failed == 1


@pytest.mark.parametrize(
    "retry_after",
    [
        pytest.param("²", id="superscript-two"),
        pytest.param("-5", id="negative"),
        pytest.param("1.5", id="fraction"),
        pytest.param("soon", id="garbage"),
        pytest.param("Mon, 99 Jan 2020 00:00:00 GMT", id="impossible-date"),
        pytest.param("Wed, 21 Oct 2015 07:28:00 GMT", id="past-date"),
    ],
)
def test_an_unreadable_retry_after_falls_back_to_backoff_and_the_alert_is_delivered(retry_after: str) -> None:
    """A Retry-After that is not ASCII delta-seconds or an HTTP date is ignored: the sender's own backoff
    applies, its thread lives on, and the alert is delivered and counted."""
    registry = CollectorRegistry()
    metrics = RollupMetrics(registry)
    with Receiver([(503, {"Retry-After": retry_after})]) as receiver:
        sender = WebhookSender(receiver.url, SECRET, attempts=3, base_delay=0.01, metrics=metrics)
        assert sender.submit(ALERT)
        sender.close(timeout=10)
    assert (sender.delivered, sender.failed, len(receiver.requests)) == (1, 0, 2)
    assert registry.get_sample_value("meterware_alert_webhooks_delivered_total") == 1


def test_a_delivery_that_raises_is_counted_and_the_sender_carries_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Whatever one delivery raises is logged and counted failed; the thread goes on with the next alert."""
    registry = CollectorRegistry()
    metrics = RollupMetrics(registry)
    unencodable = replace(ALERT, id="alrt_unencodable", quota=Decimal(10))  # type: ignore[arg-type]  # json.dumps refuses a Decimal
    with Receiver([]) as receiver:
        sender = WebhookSender(receiver.url, SECRET, attempts=2, base_delay=0.01, metrics=metrics)
        assert sender.submit(unencodable)
        assert sender.submit(ALERT)
        sender.close(timeout=10)
    assert (sender.delivered, sender.failed) == (1, 1)
    assert [json.loads(body)["id"] for _, _, body in receiver.requests] == ["alrt_0123"]
    assert registry.get_sample_value("meterware_alert_webhooks_failed_total") == 1
    assert "alrt_unencodable" in caplog.text


SECRET_URL_PARTS = ("t0k3n", "pa55", "hooker")


def secret_url(url: str) -> str:
    """``url`` with userinfo and a query token, as a webhook endpoint may require."""
    return url.replace("http://", "http://hooker:pa55@") + "?token=t0k3n"


def test_the_webhook_url_is_logged_without_userinfo_or_query(caplog: pytest.LogCaptureFixture) -> None:
    """Logs show scheme, host, port and path of the endpoint; its credentials and query values never."""
    caplog.set_level(logging.DEBUG)
    with Receiver([(503, {}), (404, {})]) as receiver:
        sender = WebhookSender(secret_url(receiver.url), SECRET, attempts=2, base_delay=0.01)
        assert not sender.deliver(ALERT)
        # The credentials in the URL are sent, as Basic auth, to the URL's own host only.
        assert receiver.requests[0][1]["Authorization"] == "Basic aG9va2VyOnBhNTU="
        assert receiver.requests[0][1]["Host"] == receiver.url.split("/")[2]
    closed = WebhookSender(secret_url(receiver.url), SECRET, attempts=2, base_delay=0.01, timeout=1)
    assert not closed.deliver(ALERT)
    assert "not delivered to http://***@127.0.0.1:" in caplog.text
    assert "/hooks?token=***" in caplog.text
    assert not [part for part in SECRET_URL_PARTS if part in caplog.text]


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_webhook_redirect_is_not_followed_and_its_credentials_stay_home(status: int) -> None:
    """A 3xx is a refused delivery (counted failed): nothing, so no Basic auth, reaches the other host."""
    with Elsewhere() as elsewhere, Redirector(status, elsewhere.url) as moved:
        sender = WebhookSender(secret_url(moved.url + "/hooks"), SECRET, attempts=3, base_delay=0.01)
        assert not sender.deliver(ALERT)
        assert len(moved.requests) == 1
    assert (elsewhere.requests, sender.delivered, sender.failed) == ([], 0, 1)


def test_a_bad_webhook_url_is_refused_without_showing_its_secrets(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """`meterware config check` names alerts.webhook_url and shows the URL redacted."""
    from meterware.cli import main

    path = tmp_path / "meterware.toml"
    path.write_text('[alerts]\nwebhook_url = "hooks.example.com/in?token=t0k3n"\n')
    assert main(["config", "check", str(path)]) == 1
    error = capsys.readouterr().err
    assert (
        "alerts.webhook_url: must be an http:// or https:// URL, got 'hooks.example.com/in?token=***'"
        in error
    )
    with pytest.raises(ConfigError) as caught:
        Config.from_dict({"alerts": {"webhook_url": "ftp://hooker:pa55@example.com/x?token=t0k3n"}})
    assert not [part for part in SECRET_URL_PARTS if part in str(caught.value)]


def test_the_worker_fires_webhooks_without_waiting_for_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rollup goes on while an endpoint is slow; the alert is delivered in the background, once."""
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    with Receiver([(503, {"Retry-After": "1"})]) as receiver:
        alerts = {**CONFIG["alerts"], "webhook_url": receiver.url, "secret_env": "HOOK_SECRET"}
        config = Config.from_dict({**CONFIG, "alerts": alerts})
        storage = MemoryStorage(4)
        customers(storage)
        worker = RollupWorker(storage, config)
        calls(storage, "hobby", 5)
        started = time.monotonic()
        worker.drain()
        assert time.monotonic() - started < 0.5  # the 503 and its Retry-After did not hold the worker
        worker.release()  # shutting down waits for the deliveries in flight
    assert len(receiver.requests) == 2
    body = receiver.requests[-1][2]
    assert json.loads(body)["threshold"] == "50"
    assert verify_signature(body, receiver.requests[-1][1]["Meterware-Signature"], SECRET)


# -- the command line ----------------------------------------------------------------------------------

TOML = """
[storage]
url = "memory://alerts-cli"
shards = 4
[plans.free.meters.calls]
quota = 10
[alerts]
quota_percent = [50, 80, 100]
"""


def test_the_cli_sets_shows_and_lists_alerts(
    tmp_path: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`meterware alerts set/show/list`: a customer's own thresholds, and the alerts that fired."""
    from meterware.cli import main

    monkeypatch.delenv("METERWARE_STORAGE", raising=False)
    path = tmp_path / "meterware.toml"
    path.write_text(TOML)
    config = Config.from_file(path)
    accounts = Accounts.open(config)
    accounts.create_customer("hobby", plan="free", anchor=ANCHOR)

    def run(*args: str) -> Any:
        capsys.readouterr()
        assert main([*args, "--config", str(path), "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    shown = run("alerts", "set", "hobby", "--quota-percent", "80,100", "--credits-below", "5,0.5")
    assert shown == {
        "customer": "hobby",
        "quota_percent": [80, 100],
        "credits_below": ["0.500000", "5.000000"],
        "spend_above": [],
        "notify": {"email": None, "webhook_url": None},
    }
    assert run("alerts", "show", "hobby")["quota_percent"] == [80, 100]
    calls(accounts.storage, "hobby", 9)
    RollupWorker(accounts.storage, config).drain()
    listed = run("alerts", "list", "--customer", "hobby")
    assert [(a["type"], a["threshold"], a["used"]) for a in listed] == [("quota.threshold", "80", 9)]
    assert main(["alerts", "list", "--config", str(path)]) == 0
    assert "quota.threshold alrt_" in capsys.readouterr().out
    assert run("alerts", "set", "hobby", "--clear")["quota_percent"] == [50, 80, 100]


def test_the_readme_alerts_example_parses() -> None:
    """The [alerts] block of the README is a valid configuration, with the documented thresholds."""
    import re
    import tomllib
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Alerts and the customer's own account\n", 1)[1]
    block = re.search(r"^```\n(\[alerts\].*?)^```", section, flags=re.S | re.M)
    assert block is not None
    config = Config.from_dict({"plans": {"pro": {}}, **tomllib.loads(block[1])})
    assert config.alerts.rules_for("pro") == AlertRules((80, 100), (1 * C, 10 * C), (100 * C,))
    assert config.alerts.webhook_url == "https://hooks.example.com/meterware"


def test_racing_evaluators_fire_each_alert_once(storage: Storage) -> None:
    """Eight evaluators (as many workers) evaluating the same customer at once fire each threshold once."""
    customers(storage)
    config = Config.from_dict(CONFIG)
    calls(storage, "hobby", 10)
    silent = Config.from_dict({**CONFIG, "alerts": {}})  # alerts on, no threshold
    RollupWorker(storage, silent).drain()
    assert read_alerts(storage) == []
    barrier = threading.Barrier(8)
    fired: list[list[Alert]] = []

    def evaluate() -> None:
        barrier.wait()
        fired.append(AlertEvaluator(storage, config).evaluate("hobby", PERIOD))

    threads = [threading.Thread(target=evaluate) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(alert.threshold for batch in fired for alert in batch) == ["100", "50", "80"]
    assert len(read_alerts(storage)) == 3


def test_a_customers_own_thresholds_replace_its_plans(storage: Storage) -> None:
    """A customer's quota_percent replaces the plan's: only its own thresholds fire."""
    customers(storage)
    config = Config.from_dict(CONFIG)
    Accounts(storage, config).set_alerts("hobby", quota_percent=[70])
    calls(storage, "hobby", 10)
    RollupWorker(storage, config).drain()
    assert fired(storage) == [("hobby", "70", PERIOD)]


def test_the_worker_command_refuses_a_webhook_without_its_secret(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`meterware rollup` exits 2 with one line naming alerts.secret_env, before touching the backend."""
    from meterware.rollup import run_worker

    monkeypatch.delenv("HOOK_SECRET", raising=False)
    alerts = {"webhook_url": "http://127.0.0.1:9/x", "secret_env": "HOOK_SECRET"}
    config = Config.from_dict({"storage": "redis://127.0.0.1:9/0", "alerts": alerts})
    assert run_worker(config, once=True) == 2
    assert "alerts.secret_env: the environment variable HOOK_SECRET" in caplog.text
