"""The customer's spend cap in the portal: the overview shows it (whose, and the period's spend against it);
its page lowers it, or sets one where there was none; raising, a bad value and another customer's cap are
refused and change nothing; a lowered cap refuses the next metered call past it (memory:// and Redis)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from werkzeug.test import Client, TestResponse

from meterware.billing.accounts import Accounts
from meterware.config import Config
from meterware.errors import UsageError
from meterware.portal.pages.spend_cap import parse_cap
from meterware.rollup import RollupWorker
from meterware.wsgi import WSGIMeteringMiddleware
from tests.portal.test_portal_auth import SECRET, form_token, signed_in

C = 1_000_000


@pytest.fixture(autouse=True)
def secret_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERWARE_PORTAL_SECRET", SECRET)


@pytest.fixture
def config(storage_url: str, tmp_path: Any) -> Config:
    """Plan capped: 0.25 a call, at most 10.00 credits a period; plan open: no cap. Every call reads the
    customer afresh (``key_cache_ttl = 0``), so a cap lowered in the portal applies to the next call."""
    return Config.from_dict(
        {
            "storage": {"url": storage_url, "shards": 4},
            "plans": {
                "capped": {"meters": {"calls": {"price": "0.25"}}, "spend_cap": "10.00"},
                "open": {"meters": {"calls": {"price": "0.25"}}},
            },
            "policy": {"key_cache_ttl": 0},
            "pipeline": {"spool_dir": str(tmp_path / "spool")},
            "portal": {"base_url": "http://testserver/portal", "secure_cookies": False},
        }
    )


@pytest.fixture
def accounts(config: Config) -> Iterator[Accounts]:
    """acme and globex on plan capped, nocap on plan open."""
    accounts = Accounts.open(config)
    for customer, plan in (("acme", "capped"), ("globex", "capped"), ("nocap", "open")):
        accounts.create_customer(customer, plan=plan)
    yield accounts
    accounts.close()


def values(page: str, name: str) -> list[str]:
    """The exact value (``data-value``) of every ``data-field="name"`` on the page."""
    return re.findall(rf'data-field="{re.escape(name)}" data-value="([^"]*)"', page)


def errors(page: str) -> list[str]:
    """The page's error notices (their text)."""
    return re.findall(r'<p class="notice error" role="status">([^<]*)</p>', page)


def lower(client: Client, cap: str, **extra: str) -> TestResponse:
    """Post the spend cap page's form with ``cap`` and the session's form token."""
    return client.post("/spend-cap", data={"cap": cap, "csrf": form_token(client, "/spend-cap"), **extra})


def own_caps(accounts: Accounts) -> dict[str, int | None]:
    """Each customer's own cap as stored (None: the plan's applies)."""
    return {customer: accounts.customer(customer).spend_cap for customer in ("acme", "globex", "nocap")}


def test_the_overview_shows_the_cap_whose_it_is_and_the_spend_against_it(
    config: Config, accounts: Accounts
) -> None:
    """The plan's cap, marked as the plan's, with the period's spend and what is left; a customer's own cap
    (set by the seller) marked as theirs; no cap at all said so."""
    page = signed_in(config).get("/").text
    assert values(page, "spend_cap") == [str(10 * C)]
    assert values(page, "spend_cap.source") == ["plan"]
    assert values(page, "spend_cap.spent") == ["0"]
    assert values(page, "spend_cap.left") == [str(10 * C)]
    assert 'href="/spend-cap"' in page
    accounts.set_spend_cap("acme", "12.50")
    page = signed_in(config).get("/").text
    assert values(page, "spend_cap") == [str(12_500_000)]
    assert values(page, "spend_cap.source") == ["customer"]
    page = signed_in(config, "nocap").get("/").text
    assert values(page, "spend_cap") == ["none"]
    assert values(page, "spend_cap.source") == ["none"]


def test_the_customer_lowers_the_plans_cap_to_one_of_their_own(config: Config, accounts: Accounts) -> None:
    """The page shows the plan's cap and a labelled form; the post lowers it (303 back to the page, which
    says so) and the cap in force is the customer's own from then on."""
    client = signed_in(config)
    page = client.get("/spend-cap")
    assert page.status_code == 200
    assert '<label for="new-spend-cap">New spend cap</label>' in page.text
    assert values(page.text, "spend_cap") == [str(10 * C)]
    assert values(page.text, "spend_cap.source") == ["plan"]
    response = lower(client, "7.5")
    assert response.status_code == 303
    assert response.headers["Location"] == "/spend-cap?done=lowered"
    assert accounts.spend_cap("acme") == 7_500_000
    assert own_caps(accounts) == {"acme": 7_500_000, "globex": None, "nocap": None}
    shown = client.get(response.headers["Location"]).text
    assert "Your spend cap is now 7.50 credits per billing period." in shown
    assert values(shown, "spend_cap") == ["7500000"]
    assert values(shown, "spend_cap.source") == ["customer"]
    # Lowering again, to zero: every priced call is refused from then on.
    assert lower(client, "0").status_code == 303
    assert accounts.spend_cap("acme") == 0


def test_a_customer_without_a_cap_may_set_one(config: Config, accounts: Accounts) -> None:
    client = signed_in(config, "nocap")
    assert values(client.get("/spend-cap").text, "spend_cap") == ["none"]
    assert lower(client, "250.000001").status_code == 303
    assert accounts.spend_cap("nocap") == 250_000_001


@pytest.mark.parametrize(
    ("own", "asked"),
    [
        pytest.param(None, "10.000001", id="above-the-plans"),
        pytest.param(None, "11", id="above-the-plans-whole"),
        pytest.param("5", "6", id="above-their-own-below-the-plans"),
    ],
)
def test_raising_the_cap_is_refused(config: Config, accounts: Accounts, own: str | None, asked: str) -> None:
    """A cap above the one in force is the seller's to set: refused in one line naming the cap in force,
    nothing changed."""
    if own is not None:
        accounts.set_spend_cap("acme", own)
    before = own_caps(accounts)
    response = lower(signed_in(config), asked)
    assert response.status_code == 200
    in_force = "5.00" if own else "10.00"
    assert errors(response.text) == [
        f"You can lower your spend cap, not raise it: it is {in_force} credits per billing period. "
        "To raise it, contact us."
    ]
    assert own_caps(accounts) == before


@pytest.mark.parametrize(
    "cap",
    [
        pytest.param("", id="blank"),
        pytest.param("   ", id="spaces"),
        pytest.param("ten", id="words"),
        pytest.param("-1", id="negative"),
        pytest.param("-0.01", id="negative-fraction"),
        pytest.param("1e3", id="exponent"),
        pytest.param("1_000", id="underscores"),
        pytest.param("1,000", id="thousands-separator"),
        pytest.param("0x10", id="hex"),
        pytest.param("NaN", id="nan"),
        pytest.param("Infinity", id="infinity"),
        pytest.param("+5", id="plus-sign"),
        pytest.param("5.", id="trailing-point"),
        pytest.param(".5", id="leading-point"),
        pytest.param("1.0000001", id="seven-decimals"),
        pytest.param("9007199255", id="past-the-largest-amount"),
        pytest.param("1" * 30, id="thirty-digits"),
        pytest.param("1" * 5000, id="five-thousand-digits"),
        pytest.param("\u0663", id="arabic-indic-digit"),
        pytest.param("\uff15", id="fullwidth-digit"),
        pytest.param("\u0967\u0966", id="devanagari-digits"),
        pytest.param("5\u00a0", id="no-break-space"),
        pytest.param("5\n6", id="two-lines"),
    ],
)
def test_a_bad_value_is_refused_in_one_line_and_changes_nothing(
    config: Config, accounts: Accounts, cap: str
) -> None:
    """On a customer without a cap (any number would be a lowering): one error line, no cap set. Python's
    Decimal takes some of these (non-ASCII digits, exponents, underscores); the form does not."""
    response = lower(signed_in(config, "nocap"), cap)
    assert response.status_code == 200
    (error,) = errors(response.text)
    assert "\n" not in error
    assert len(error) < 200
    assert accounts.spend_cap("nocap") is None
    assert own_caps(accounts) == {"acme": None, "globex": None, "nocap": None}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("20", 20 * C, id="whole"),
        pytest.param(" 20.5\t", 20_500_000, id="padded"),
        pytest.param("0.000001", 1, id="one-micro"),
        pytest.param("0", 0, id="zero"),
        pytest.param("", "enter a spend cap", id="blank"),
        pytest.param("-3", "cannot be negative", id="negative"),
        pytest.param("\u0663", "digits 0-9", id="arabic-indic"),
        pytest.param("2.1234567", "at most 6 decimals", id="seven-decimals"),
        pytest.param("9007199254.740992", "at most 9,007,199,254.740991 credits", id="one-micro-too-many"),
        pytest.param("9" * 11, "at most 9,007,199,254.740991 credits", id="eleven-digits"),
    ],
)
def test_parse_cap(text: str, expected: int | str) -> None:
    """The form's value in micro-credits, or the reason it is refused."""
    if isinstance(expected, int):
        assert parse_cap(text) == expected
    else:
        with pytest.raises(UsageError, match=expected):
            parse_cap(text)


def test_the_largest_amount_is_accepted(config: Config, accounts: Accounts) -> None:
    """The form takes what a credit amount allows: up to 9,007,199,254 credits, 6 decimals."""
    assert lower(signed_in(config, "nocap"), "9007199254.740991").status_code == 303
    assert accounts.spend_cap("nocap") == 2**53 - 1


def test_a_customer_changes_only_their_own_cap(config: Config, accounts: Accounts) -> None:
    """Another customer's id in the form, the query or the path reaches only the session's customer."""
    client = signed_in(config)
    assert lower(client, "3", customer="globex", customer_id="globex").status_code == 303
    token = form_token(client, "/spend-cap")
    assert client.post("/spend-cap?customer=globex", data={"cap": "2", "csrf": token}).status_code == 303
    for path in ("/customers/globex/spend-cap", "/globex/spend-cap", "/spend-cap/globex"):
        assert client.post(path, data={"cap": "1", "csrf": token}).status_code == 404, path
    assert own_caps(accounts) == {"acme": 2 * C, "globex": None, "nocap": None}
    # globex's own form token does not work in acme's session, nor acme's in globex's.
    globex = signed_in(config, "globex")
    assert client.post("/spend-cap", data={"cap": "1", "csrf": form_token(globex)}).status_code == 403
    assert globex.post("/spend-cap", data={"cap": "1", "csrf": token}).status_code == 403
    assert own_caps(accounts) == {"acme": 2 * C, "globex": None, "nocap": None}


def test_the_form_needs_its_sessions_token_and_origin(config: Config, accounts: Accounts) -> None:
    """As every portal form: no token, or a post from another site, is refused (403) and changes nothing."""
    client = signed_in(config)
    assert client.post("/spend-cap", data={"cap": "1"}).status_code == 403
    token = form_token(client, "/spend-cap")
    cross_site = client.post(
        "/spend-cap", data={"cap": "1", "csrf": token}, headers={"Origin": "https://evil.test"}
    )
    assert cross_site.status_code == 403
    assert Client(client.application).post("/spend-cap", data={"cap": "1", "csrf": token}).status_code == 401
    assert accounts.spend_cap("acme") == 10 * C


def test_a_cap_lowered_in_the_portal_refuses_the_next_call_past_it(
    config: Config, accounts: Accounts
) -> None:
    """acme lowers its cap to 0.50 in the portal: two calls at 0.25 are served, the third is refused with
    429 spend_cap_reached by the metering middleware (under the plan's 10.00 it would be served); rolled up,
    the overview shows the cap spent."""

    def api(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    metered = WSGIMeteringMiddleware(api, config=config, registry=CollectorRegistry())
    calls = Client(metered)
    auth = {"Authorization": f"Bearer {accounts.create_key('acme').plaintext}"}

    def call() -> tuple[int, str]:
        with calls.get("/v1/things", headers=auth) as response:
            body = response.get_data(as_text=True)  # read to its end: an unread body is an aborted call
            return response.status_code, body

    assert call()[0] == 200  # 0.25 of the plan's 10.00
    assert lower(signed_in(config), "0.50").status_code == 303
    served, refused = call(), call()
    assert served[0] == 200  # 0.50: the cap, not past it
    assert refused[0] == 429
    assert '"reason":"spend_cap_reached"' in refused[1].replace(" ", "")
    metered.drain()  # memory:// is rolled up here, in the app's process (its worker holds the shards)
    RollupWorker(accounts.storage, config, owner="spend-cap-test").drain()
    # Rolled up, the overview shows the cap spent: 0.50 of 0.50, nothing left.
    page = signed_in(config).get("/").text
    assert values(page, "spend_cap.spent") == [str(C // 2)]
    assert values(page, "spend_cap.left") == ["0"]
