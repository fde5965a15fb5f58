"""The portal's Alerts page: the thresholds in force and a form to set them, where alerts go, what fired."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from werkzeug.test import Client, TestResponse

import meterware.portal
from meterware.billing.accounts import Accounts
from meterware.billing.destinations import AlertDestinations
from meterware.config import AlertRules, Config
from meterware.rollup import RollupWorker
from tests.portal.test_portal_auth import follow_link
from tests.test_alerts import ANCHOR, SECRET, Receiver, calls

C = 1_000_000
PORTAL_SECRET = "s" * 40
HOOK = "https://hooks.acme.example/in?token=abc"


@dataclass
class Portal:
    """A signed-in browser (werkzeug's client) on one customer's portal, and the backend behind it."""

    client: Client
    accounts: Accounts
    config: Config
    customer: str

    def page(self) -> str:
        response = self.client.get("/alerts")
        assert response.status_code == 200
        return response.get_data(as_text=True)

    def post(self, fields: dict[str, str], *, token: str | None = None) -> TestResponse:
        """POST the page's form with ``fields`` and the session's form token (``token`` overrides it)."""
        if token is None:
            found = re.search(r'name="csrf" value="([^"]+)"', self.page())
            assert found is not None
            token = found[1]
        form = {**fields, "csrf": token} if token else fields
        return self.client.post("/alerts", data=form)


def settings(storage_url: str, webhook_url: str = "") -> dict[str, Any]:
    alerts: dict[str, Any] = {"quota_percent": [50, 80, 100], "credits_below": ["10"], "spend_above": ["20"]}
    if webhook_url:
        alerts |= {"webhook_url": webhook_url, "secret_env": "HOOK_SECRET"}
    return {
        "storage": {"url": storage_url, "shards": 4},
        "plans": {"free": {"meters": {"calls": {"quota": 10}}}, "payg": {"prepaid": True}},
        "alerts": alerts,
        "portal": {"secure_cookies": False, "base_url": "http://localhost"},
    }


def open_portal(data: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Iterator[Portal]:
    monkeypatch.setenv("METERWARE_PORTAL_SECRET", PORTAL_SECRET)
    config = Config.from_dict(data)
    accounts = Accounts.open(config)
    accounts.create_customer("hobby", plan="free", anchor=ANCHOR)
    app = meterware.portal.wsgi_app(config)
    client = Client(app)
    link = meterware.portal.sign_in_link("hobby", config=config)
    assert follow_link(client, link.removeprefix("http://localhost")).status_code == 303
    try:
        yield Portal(client, accounts, config, "hobby")
    finally:
        app.close()
        accounts.close()


@pytest.fixture
def portal(storage_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Portal]:
    """Customer hobby (plan free: quota 10 calls) signed in to its portal."""
    yield from open_portal(settings(storage_url), monkeypatch)


def fields(page: str, name: str) -> list[str]:
    """The text of every ``data-field="name"`` on the page."""
    return re.findall(rf'data-field="{re.escape(name)}" data-value="[^"]*">([^<]*)<', page)


def values(page: str, name: str) -> list[str]:
    """The exact value (``data-value``) of every ``data-field="name"`` on the page."""
    return re.findall(rf'data-field="{re.escape(name)}" data-value="([^"]*)"', page)


def test_the_page_shows_the_plans_thresholds_until_the_customer_sets_its_own(portal: Portal) -> None:
    """Without its own thresholds, the plan's are in force, marked as the plan's; no reset is offered."""
    page = portal.page()
    assert page.count("<h1>") == 1
    assert values(page, "alerts.quota_percent") == ["50,80,100"]
    assert fields(page, "alerts.quota_percent") == ["50%, 80%, 100%"]
    assert values(page, "alerts.credits_below") == ["10.000000"]
    assert values(page, "alerts.spend_above") == ["20.000000"]
    assert fields(page, "alerts.quota_percent.source") == ["your plan&#39;s"]
    assert 'data-form="reset-thresholds"' not in page
    assert "Credit balance below (prepaid plans only: not watched on yours)" in page
    for label, control in (("Quota percentages", "quota-percentages"), ("Email address", "email-address")):
        assert f'<label for="{control}">{label}</label>' in page
        assert f'id="{control}"' in page


def test_thresholds_set_in_the_form_are_the_customers_own(portal: Portal) -> None:
    """The form's lists become the customer's own (read back with Accounts.alert_rules); blank: the plan's."""
    response = portal.post(
        {"action": "thresholds", "quota_percent": "90, 75,90", "credits_below": "none", "spend_above": ""}
    )
    page = response.get_data(as_text=True)
    assert response.status_code == 200
    assert '<p class="notice ok" role="status">Your thresholds are saved.</p>' in page
    assert portal.accounts.alert_rules("hobby") == AlertRules((75, 90), (), (20 * C,))
    assert portal.accounts.own_alert_rules("hobby") == AlertRules((75, 90), (), None)
    assert values(page, "alerts.quota_percent") == ["75,90"]
    assert fields(page, "alerts.quota_percent.source") == ["yours"]
    assert fields(page, "alerts.credits_below") == ["none"]
    assert fields(page, "alerts.spend_above.source") == ["your plan&#39;s"]
    # The form shows the own lists back.
    assert 'value="75, 90"' in page
    assert 'value="none"' in page
    # The form states all the own lists: a field left blank goes back to the plan's list.
    portal.post({"action": "thresholds", "quota_percent": "", "spend_above": "1500, 0.25"})
    assert portal.accounts.own_alert_rules("hobby") == AlertRules(None, None, (250_000, 1500 * C))
    assert portal.accounts.alert_rules("hobby").quota_percent == (50, 80, 100)
    # Amounts round-trip through the form without thousands separators.
    assert 'value="0.25, 1500"' in portal.page()


def test_the_reset_falls_back_to_the_plans_thresholds(portal: Portal) -> None:
    """ "Use the plan's thresholds" drops the customer's own lists; its destinations stay."""
    portal.accounts.set_alerts("hobby", quota_percent=[60], spend_above=["5"])
    portal.accounts.set_alert_destinations("hobby", email="ops@acme.example")
    assert 'data-form="reset-thresholds"' in portal.page()
    page = portal.post({"action": "reset"}).get_data(as_text=True)
    assert "Your plan&#39;s thresholds apply again." in page
    assert portal.accounts.own_alert_rules("hobby") == AlertRules()
    assert portal.accounts.alert_rules("hobby") == AlertRules((50, 80, 100), (10 * C,), (20 * C,))
    assert portal.accounts.alert_destinations("hobby") == AlertDestinations("ops@acme.example")


@pytest.mark.parametrize(
    ("form", "invalid", "message"),
    [
        pytest.param(
            {"quota_percent": "50, lots"},
            "quota_percent",
            "Quota percentages: must be whole percentages from 1 to 1000, got &#39;lots&#39;",
            id="not-a-number",
        ),
        pytest.param(
            {"quota_percent": "0"},
            "quota_percent",
            "Quota percentages: must be whole percentages from 1 to 1000, got 0",
            id="zero-percent",
        ),
        pytest.param(
            {"quota_percent": "12.5"},
            "quota_percent",
            "Quota percentages: must be whole percentages",
            id="fraction-percent",
        ),
        pytest.param(
            {"quota_percent": "80", "credits_below": "-1"},
            "credits_below",
            "Credits below: must not be negative, got &#39;-1&#39;",
            id="negative-credits",
        ),
        pytest.param(
            {"spend_above": "0.0000001"},
            "spend_above",
            "Spend above: must be a number of credits with at most 6 decimals",
            id="too-precise",
        ),
        pytest.param(
            {"spend_above": ", ".join(str(n) for n in range(1, 12))},
            "spend_above",
            "Spend above: at most 10 thresholds, got 11",
            id="too-many",
        ),
    ],
)
def test_invalid_thresholds_are_refused_with_the_reason_and_nothing_is_saved(
    portal: Portal, form: dict[str, str], invalid: str, message: str
) -> None:
    """A wrong field shows the check's message as an error; no list is saved, not even the valid ones."""
    portal.accounts.set_alerts("hobby", quota_percent=[70])
    before = portal.accounts.own_alert_rules("hobby")
    page = portal.post({"action": "thresholds", "credits_below": "3", **form}).get_data(as_text=True)
    error = re.search(r'<p class="notice error" role="status">([^<]*)</p>', page)
    assert error is not None
    assert message in error[1]
    assert error[1].endswith(". Nothing was saved.")
    assert portal.accounts.own_alert_rules("hobby") == before
    assert values(page, "alerts.quota_percent") == ["70"]  # the page shows what is in force
    # The field at fault is marked, pointing at the notice; the others are not.
    marked = re.findall(r'name="(\w+)" value="[^"]*" autocomplete="off" aria-invalid="true"', page)
    assert marked == [invalid]
    assert 'aria-describedby="thresholds-status"' in page


def test_submitted_text_is_shown_back_escaped(portal: Portal) -> None:
    """A refused value is put back in its field for correcting, as text, never as markup."""
    page = portal.post({"action": "thresholds", "spend_above": '1"><b>x'}).get_data(as_text=True)
    assert 'value="1&#34;&gt;&lt;b&gt;x"' in page
    assert "<b>x" not in page


def test_destinations_are_validated_and_stored(portal: Portal) -> None:
    """A good address and URL are stored; a bad one is refused with the reason and changes nothing."""
    page = portal.post(
        {"action": "destinations", "email": " ops@acme.example ", "webhook_url": HOOK}
    ).get_data(as_text=True)
    assert "Where your alerts go is saved." in page
    assert portal.accounts.alert_destinations("hobby") == AlertDestinations("ops@acme.example", HOOK)
    assert values(page, "alerts.email") == ["ops@acme.example"]
    assert values(page, "alerts.webhook_url") == [HOOK.replace("&", "&amp;")]
    for email, url, reason in (
        ("a@acme.example, b@acme.example", "", "The email address must be one address"),
        ("ops@acme.example", "http://hooks.acme.example/in", "The webhook URL must start with https://"),
        ("ops@acme.example", "https://me:pw@hooks.acme.example/in", "must not carry a user name or password"),
        ("ops@acme.example", "https://169.254.169.254/latest/meta-data", "must not point at a private"),
        ("ops@acme.example", "https://hooks.acme.example/" + "x" * 2048, "must be at most 2048 characters"),
    ):
        page = portal.post({"action": "destinations", "email": email, "webhook_url": url}).get_data(
            as_text=True
        )
        error = re.search(r'<p class="notice error" role="status">([^<]*)</p>', page)
        assert error is not None
        assert reason in error[1]
        assert page.count('aria-invalid="true"') == 1
        assert portal.accounts.alert_destinations("hobby") == AlertDestinations("ops@acme.example", HOOK)
    portal.post({"action": "destinations", "email": "", "webhook_url": ""})
    assert portal.accounts.alert_destinations("hobby") == AlertDestinations()
    assert fields(portal.page(), "alerts.email") == ["none"]


@pytest.mark.parametrize(
    "token", [pytest.param("", id="no-token"), pytest.param("forged", id="forged-token")]
)
def test_a_post_without_the_form_token_is_refused(portal: Portal, token: str) -> None:
    """403, and neither thresholds nor destinations change."""
    for form in (
        {"action": "thresholds", "quota_percent": "5"},
        {"action": "destinations", "email": "evil@attacker.example"},
        {"action": "reset"},
    ):
        response = portal.post(form, token=token)
        assert response.status_code == 403
    assert portal.accounts.own_alert_rules("hobby") == AlertRules()
    assert portal.accounts.alert_destinations("hobby") == AlertDestinations()
    # The same post with the session's token goes through: the refusal was the token's.
    assert portal.post({"action": "thresholds", "quota_percent": "5"}).status_code == 200
    assert portal.accounts.own_alert_rules("hobby").quota_percent == (5,)


def test_a_fired_alerts_webhook_carries_the_destinations_set_in_the_page(
    storage_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thresholds and destinations set in the page drive the worker: its signed webhook to the seller
    carries notify, and the page lists what fired, newest first."""
    from meterware.billing.alerts import verify_signature

    monkeypatch.setenv("HOOK_SECRET", SECRET)
    with Receiver([]) as seller:
        for portal in open_portal(settings(storage_url, seller.url), monkeypatch):
            portal.post({"action": "thresholds", "quota_percent": "30, 60"})
            portal.post({"action": "destinations", "email": "ops@acme.example", "webhook_url": HOOK})
            worker = RollupWorker(portal.accounts.storage, portal.config)
            calls(portal.accounts.storage, "hobby", 3)
            worker.drain()
            calls(portal.accounts.storage, "hobby", 3)
            worker.drain()
            worker.release()  # waits for the deliveries in flight
            page = portal.page()
    bodies = [json.loads(body) for _, _, body in seller.requests]
    assert [(body["threshold"], body["notify"]) for body in bodies] == [
        ("30", {"email": "ops@acme.example", "webhook_url": HOOK}),
        ("60", {"email": "ops@acme.example", "webhook_url": HOOK}),
    ]
    for _, headers, body in seller.requests:
        assert verify_signature(body, headers["Meterware-Signature"], SECRET)
    assert values(page, "alert.threshold") == ["60", "30"]  # newest first
    assert fields(page, "alert.value") == ["60.00% (6 of 10)", "30.00% (3 of 10)"]


def test_the_page_says_when_the_service_evaluates_no_alerts(
    storage_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an [alerts] section the page warns that settings are kept but nothing fires."""
    data = settings(storage_url)
    del data["alerts"]
    for portal in open_portal(data, monkeypatch):
        page = portal.page()
        assert "Alerts are not switched on for this service yet" in page
        assert fields(page, "alerts.quota_percent") == ["none"]


def test_only_the_customers_own_alerts_are_listed(storage_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another customer's fired alerts never show on this customer's page."""
    for portal in open_portal(settings(storage_url), monkeypatch):
        portal.accounts.create_customer("other", plan="free", anchor=ANCHOR)
        calls(portal.accounts.storage, "other", 9)
        calls(portal.accounts.storage, "hobby", 5)
        RollupWorker(portal.accounts.storage, portal.config).drain()
        assert len(portal.accounts.alerts("other")) == 2
        page = portal.page()
        assert values(page, "alert.threshold") == ["50"]
        assert [alert.id for alert in portal.accounts.alerts("hobby")] == re.findall(
            r'data-alert="([^"]+)"', page
        )
