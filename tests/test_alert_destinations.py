"""A customer's alert destinations: checked, stored per customer, carried by the alerts webhook as notify."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from meterware.billing.accounts import Accounts
from meterware.billing.alerts import MAX_OWN_THRESHOLDS, verify_signature
from meterware.billing.destinations import AlertDestinations, check_email, check_webhook_url
from meterware.config import AlertRules, Config
from meterware.errors import NotFoundError, UsageError
from meterware.rollup import RollupWorker
from meterware.storage import _keyspace as ks
from meterware.storage.base import Storage
from meterware.storage.memory import MemoryStorage
from meterware.storage.redis import RedisStorage
from tests.test_alerts import ANCHOR, CONFIG, SECRET, Receiver, calls, customers

HOOK = "https://hooks.acme.example/meterware?token=abc"
LONGEST_EMAIL = "a" * 64 + "@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 57 + ".com"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("ops@acme.example", "ops@acme.example", id="plain"),
        pytest.param(
            "  first.last+alerts@mail.acme.co.uk \n", "first.last+alerts@mail.acme.co.uk", id="trimmed"
        ),
        pytest.param("o'neil@xn--bcher-kva.example", "o'neil@xn--bcher-kva.example", id="punycode-domain"),
        pytest.param(LONGEST_EMAIL, LONGEST_EMAIL, id="254-chars"),
    ],
)
def test_plausible_email_addresses_are_taken(text: str, expected: str) -> None:
    """One mailbox at a dotted host name is taken as given, surrounding spaces dropped."""
    assert len(LONGEST_EMAIL) == 254
    assert check_email(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("", "must be one address like name@example.com", id="empty"),
        pytest.param("ops", "must be one address", id="no-at"),
        pytest.param("ops@localhost", "must be one address", id="localhost"),
        pytest.param("ops@acme", "must be one address", id="single-label-domain"),
        pytest.param("a@x.com, b@y.com", "must be one address", id="two-addresses"),
        pytest.param("a@x.com;b@y.com", "must be one address", id="semicolon-list"),
        pytest.param("Ops <ops@acme.example>", "must be one address", id="display-name"),
        pytest.param("ops@acme.example\r\nBcc: x@evil.example", "must be one address", id="header-injection"),
        pytest.param("ops..x@acme.example", "must be one address", id="double-dot"),
        pytest.param("ops@-acme.example", "must be one address", id="label-starts-with-hyphen"),
        pytest.param("ops@acme.123", "must be one address", id="numeric-tld"),
        pytest.param("a" * 65 + "@acme.example", "must be one address", id="local-part-over-64"),
        pytest.param("x" + LONGEST_EMAIL, "at most 254 characters", id="255-chars"),
    ],
)
def test_implausible_email_addresses_are_refused(text: str, message: str) -> None:
    """Lists, display names, line breaks, local hosts and overlong addresses are refused, saying why."""
    with pytest.raises(UsageError, match=message):
        check_email(text)


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("https://hooks.acme.example/in", id="plain"),
        pytest.param(HOOK, id="query-token"),
        pytest.param("https://hooks.acme.example:8443/in#x", id="port-and-fragment"),
        pytest.param("https://93.184.216.34/hook", id="public-ipv4"),
        pytest.param("https://[2606:4700::1111]/hook", id="public-ipv6"),
        pytest.param("https://h.example/" + "p" * 2030, id="2048-chars"),
    ],
)
def test_public_https_urls_are_taken(url: str) -> None:
    """An https URL of a public host (name or global address), of at most 2048 characters, is taken."""
    assert check_webhook_url(url) == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        pytest.param("http://hooks.acme.example/in", "must start with https://", id="http"),
        pytest.param("ftp://hooks.acme.example/in", "must start with https://", id="ftp"),
        pytest.param("hooks.acme.example/in", "must start with https://", id="no-scheme"),
        pytest.param("https:/hooks.acme.example", "must start with https://", id="one-slash"),
        pytest.param("https://user:pw@hooks.acme.example/in", "must not carry a user name", id="credentials"),
        pytest.param("https://user@hooks.acme.example/in", "must not carry a user name", id="user-only"),
        pytest.param("https://localhost/in", "public host", id="localhost"),
        pytest.param("https://api.localhost/in", "public host", id="dot-localhost"),
        pytest.param("https://intranet/in", "public host", id="single-label"),
        pytest.param("https://metadata.google.internal/x", "public host", id="internal"),
        pytest.param("https://127.0.0.1/in", "private or local address", id="loopback-v4"),
        pytest.param("https://[::1]/in", "private or local address", id="loopback-v6"),
        pytest.param("https://10.1.2.3/in", "private or local address", id="private"),
        pytest.param("https://169.254.169.254/latest", "private or local address", id="link-local-metadata"),
        pytest.param("https://0.0.0.0/in", "private or local address", id="unspecified"),
        pytest.param("https://hooks.acme.example:x/in", "invalid host or port", id="bad-port"),
        pytest.param("https://hooks.acme.example:99999/in", "invalid host or port", id="port-out-of-range"),
        pytest.param("https://[::1/in", "invalid host or port", id="unclosed-bracket"),
        pytest.param("https://[v1.fe]/in", "public host", id="bracketed-name"),
        pytest.param("https://hooks.acme.example/a b", "without spaces", id="space"),
        pytest.param("https://hooks.acme.example/\u00e9", "without spaces", id="not-ascii"),
        pytest.param("https://h.example/" + "p" * 2031, "at most 2048 characters", id="2049-chars"),
    ],
)
def test_other_urls_are_refused(url: str, message: str) -> None:
    """Not https, credentials, local or private hosts, spaces and overlong URLs are refused, saying why."""
    with pytest.raises(UsageError, match=message):
        check_webhook_url(url)


@given(st.text(max_size=300) | st.builds(lambda tail: "https://" + tail, st.text(max_size=300)))
def test_the_checks_refuse_with_usage_error_and_nothing_else(text: str) -> None:
    """Any text: the checks answer it checked, or refuse with UsageError (what the portal shows)."""
    for check in (check_email, check_webhook_url):
        with contextlib.suppress(UsageError):
            assert check(text) == text.strip()


# -- stored per customer, over every backend ----------------------------------------------------------


@pytest.fixture(
    params=[pytest.param("memory", id="memory"), pytest.param("redis", id="redis", marks=pytest.mark.redis)]
)
def storage(request: pytest.FixtureRequest) -> Iterator[Storage]:
    """An empty backend: memory or a real redis-server."""
    if request.param == "memory":
        yield MemoryStorage(4)
        return
    redis_storage = RedisStorage(request.getfixturevalue("redis_url"), shards=4, timeout=2.0)
    yield redis_storage
    redis_storage.close()


def test_destinations_are_set_changed_and_removed_per_customer(storage: Storage) -> None:
    """None leaves a destination as it is, "" removes it; another customer's stay untouched."""
    customers(storage)
    accounts = Accounts(storage, Config.from_dict(CONFIG))
    assert accounts.alert_destinations("hobby") == AlertDestinations()
    assert accounts.set_alert_destinations("hobby", email=" ops@acme.example ") == AlertDestinations(
        "ops@acme.example"
    )
    accounts.set_alert_destinations("hobby", webhook_url=HOOK)
    accounts.set_alert_destinations("wallet", email="cfo@wallet.example")
    assert accounts.alert_destinations("hobby") == AlertDestinations("ops@acme.example", HOOK)
    assert accounts.set_alert_destinations("hobby", email="") == AlertDestinations(None, HOOK)
    assert accounts.alert_destinations("wallet") == AlertDestinations("cfo@wallet.example")
    accounts.set_alert_destinations("hobby", webhook_url="  ")
    assert storage.get_alert_destinations("hobby") is None  # nothing left: nothing stored
    # Thresholds and destinations are kept apart: resetting the thresholds keeps the destinations.
    accounts.set_alerts("wallet", quota_percent=[60])
    accounts.set_alerts("wallet", clear=True)
    assert accounts.alert_destinations("wallet") == AlertDestinations("cfo@wallet.example")
    with pytest.raises(NotFoundError, match="no customer 'ghost'"):
        accounts.set_alert_destinations("ghost", email="a@b.example")
    with pytest.raises(NotFoundError):
        storage.set_alert_destinations("ghost", "{}")


def test_an_invalid_destination_stores_nothing(storage: Storage) -> None:
    """A bad URL next to a good address: refused, and neither replaces what was stored."""
    customers(storage)
    accounts = Accounts(storage, Config.from_dict(CONFIG))
    accounts.set_alert_destinations("hobby", email="ops@acme.example", webhook_url=HOOK)
    with pytest.raises(UsageError, match="must not carry a user name"):
        accounts.set_alert_destinations(
            "hobby", email="new@acme.example", webhook_url="https://u:p@hooks.acme.example/"
        )
    assert accounts.alert_destinations("hobby") == AlertDestinations("ops@acme.example", HOOK)


@pytest.mark.redis
def test_destinations_live_in_the_customers_shard(redis_url: str) -> None:
    """The destinations key is in the customer's shard (one Cluster slot with the customer's other keys)."""
    storage = RedisStorage(redis_url, shards=4, timeout=2.0)
    try:
        customers(storage)
        Accounts(storage, Config.from_dict(CONFIG)).set_alert_destinations("hobby", email="ops@acme.example")
        shard = ks.shard_of("hobby", 4)
        key = ks.alert_destinations(shard, "hobby")
        assert key.startswith(ks.tag(shard))
        stored = redis.Redis.from_url(redis_url).get(key)
        assert json.loads(stored or b"") == {"email": "ops@acme.example", "webhook_url": None}
    finally:
        storage.close()


def test_too_many_thresholds_of_a_kind_are_refused_and_nothing_is_stored(storage: Storage) -> None:
    """A customer sets at most MAX_OWN_THRESHOLDS of each kind; a longer list stores nothing."""
    customers(storage)
    accounts = Accounts(storage, Config.from_dict(CONFIG))
    accounts.set_alerts("hobby", quota_percent=list(range(1, MAX_OWN_THRESHOLDS + 1)))
    with pytest.raises(UsageError, match=f"spend_above: at most {MAX_OWN_THRESHOLDS} thresholds"):
        accounts.set_alerts("hobby", quota_percent=[50], spend_above=[str(n) for n in range(11)])
    assert accounts.alert_rules("hobby").quota_percent == tuple(range(1, MAX_OWN_THRESHOLDS + 1))


# -- carried by the alerts webhook --------------------------------------------------------------------


def test_the_worker_sends_the_customers_destinations_as_notify(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fired alert's signed webhook body carries notify: the destinations of that customer, or nulls."""
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    customers(storage)
    with Receiver([]) as receiver:
        alerts = {**CONFIG["alerts"], "webhook_url": receiver.url, "secret_env": "HOOK_SECRET"}
        config = Config.from_dict({**CONFIG, "alerts": alerts})
        accounts = Accounts(storage, config)
        accounts.set_alert_destinations("hobby", email="ops@acme.example", webhook_url=HOOK)
        accounts.set_alerts("bigco", quota_percent=[1])
        worker = RollupWorker(storage, config)
        calls(storage, "hobby", 5)
        calls(storage, "bigco", 1)
        worker.drain()
        worker.release()  # waits for the deliveries in flight
    bodies = {}
    for _, headers, body in receiver.requests:
        assert verify_signature(body, headers["Meterware-Signature"], SECRET)
        bodies[json.loads(body)["customer"]] = json.loads(body)
    assert bodies["hobby"]["threshold"] == "50"
    assert bodies["hobby"]["notify"] == {"email": "ops@acme.example", "webhook_url": HOOK}
    assert bodies["bigco"]["notify"] == {"email": None, "webhook_url": None}
    # The stream keeps the alert itself; the destinations are the customer's settings, read when it fired.
    assert [alert.notify for alert in accounts.alerts("hobby")] == [None]


def test_alerts_without_a_seller_webhook_still_fire_and_no_customer_url_is_called(storage: Storage) -> None:
    """Without [alerts] webhook_url nothing is POSTed anywhere, whatever the customer's destinations say."""
    customers(storage)
    with Receiver([]) as customer_endpoint:
        config = Config.from_dict(CONFIG)
        accounts = Accounts(storage, config)
        # A local http URL, stored past the https check, proves the worker never calls a customer's URL.
        storage.set_alert_destinations(
            "hobby", json.dumps({"email": None, "webhook_url": customer_endpoint.url})
        )
        worker = RollupWorker(storage, config)
        calls(storage, "hobby", 5)
        worker.drain()
        worker.release()
    assert [alert.threshold for alert in accounts.alerts("hobby")] == ["50"]
    assert customer_endpoint.requests == []


# -- the command line ---------------------------------------------------------------------------------


def test_the_cli_sets_and_shows_destinations(
    tmp_path: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`meterware alerts set --email/--webhook-url` stores them (checked first), `show` lists them."""
    from meterware.cli import main

    monkeypatch.delenv("METERWARE_STORAGE", raising=False)
    path = tmp_path / "meterware.toml"
    path.write_text(
        '[storage]\nurl = "memory://alert-destinations-cli"\n[plans.free.meters.calls]\nquota = 10\n'
    )
    accounts = Accounts.open(Config.from_file(path))
    accounts.create_customer("hobby", plan="free", anchor=ANCHOR)

    def run(*args: str) -> Any:
        capsys.readouterr()
        assert main([*args, "--config", str(path), "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    shown = run("alerts", "set", "hobby", "--email", "ops@acme.example", "--webhook-url", HOOK)
    assert shown["notify"] == {"email": "ops@acme.example", "webhook_url": HOOK}
    assert run("alerts", "show", "hobby")["notify"] == shown["notify"]
    capsys.readouterr()
    bad = ["alerts", "set", "hobby", "--quota-percent", "70", "--webhook-url", "http://hooks.acme.example/x"]
    assert main([*bad, "--config", str(path)]) == 1
    assert "the webhook URL must start with https://" in capsys.readouterr().err
    assert accounts.own_alert_rules("hobby") == AlertRules()  # the valid threshold was not stored either
    assert run("alerts", "set", "hobby", "--email", "")["notify"] == {"email": None, "webhook_url": HOOK}
    assert main(["alerts", "show", "hobby", "--config", str(path)]) == 0
    assert f"notify email none, webhook {HOOK}" in capsys.readouterr().out
