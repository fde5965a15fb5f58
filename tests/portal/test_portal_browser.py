"""The portal in a real headless Chromium, after real traffic through a real server on a real Redis.

Each server (Starlette under uvicorn, Flask under gunicorn; ``tests/portal/portal_apps.py``) meters an API
with the portal at ``/portal`` and the operator view at ``/admin``, on one configuration file; the
rollup worker runs as its own ``meterware rollup`` process. Customers on one plan (prepaid, included units,
a hard quota, a rate limit, a handler-reported ``tokens`` meter) make calls with real keys: successes,
4xx, 5xx and refusals (quota_exceeded, insufficient_credits, rate_limited). Then, in the browser: every
page renders, passes the accessibility checks and is screenshotted (``test-artifacts/<server>/``); its
numbers are the ``meterware ... --json`` CLI's; its plots have a point per window; keys made and revoked
in the page act at once; bad links and forms are refused; a customer never reads another's pages; the
operator view grants credits and suspends.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from playwright.sync_api import Page

from meterware import Accounts, Config
from meterware.events import OUTCOMES
from meterware.keys import NewKey
from meterware.portal import sign_in_link
from meterware.portal.tokens import Signer
from tests.helpers import to_toml
from tests.portal.a11y import check_page
from tests.portal.browser import screenshot
from tests.servers import RedisServer, ServerProcess, child_env, free_port, gunicorn_command

pytestmark = [pytest.mark.redis, pytest.mark.slow]

SECRET = "portal-secret-for-browser-tests-0123456789"
ADMIN_TOKEN = "admin-token-for-browser-tests-0123456789ab"
DAY = 86_400
# Refusals recorded as the customer's rejected calls (an unknown or revoked key belongs to nobody).
REFUSALS = ("suspended", "rate_limited", "quota_exceeded", "insufficient_credits")


def settings(storage: str, base_url: str, spool: Path) -> dict[str, Any]:
    return {
        "default_plan": "pro",
        "storage": {"url": storage, "shards": 4},
        "meters": {
            "calls": {"aggregation": "count"},
            "tokens": {"aggregation": "sum", "source": "handler"},
        },
        "plans": {
            "pro": {
                "period": "day",
                "prepaid": True,
                "rate_limits": ["25/minute"],
                "meters": {
                    # 5 calls free, then 0.01 each, 12 at most a day; tokens 0.001 each.
                    "calls": {"included": 5, "price": "0.01", "quota": 12, "quota_mode": "hard"},
                    "tokens": {"price": "0.001"},
                },
            }
        },
        "routes": {"portal": "/portal", "admin": "/admin"},
        "portal": {"base_url": f"{base_url}/portal", "secure_cookies": False},
        "pipeline": {"flush_interval": 0.05, "spool_dir": str(spool)},
        # The worker's idle pause is a third of its lease: usage shows up within a second.
        "rollup": {"lease_seconds": 1.5},
    }


def server_command(kind: str, port: int) -> list[str]:
    if kind == "asgi":
        return [
            sys.executable, "-m", "uvicorn", "--factory", "tests.portal.portal_apps:starlette_app",
            "--port", str(port), "--log-level", "warning",
        ]  # fmt: skip
    return gunicorn_command(
        "tests.portal.portal_apps:flask_app()",
        "--bind", f"127.0.0.1:{port}", "--worker-class", "gthread", "--threads", "4",
    )  # fmt: skip


def outcome(response: httpx.Response) -> str:
    """What a call came to: a refusal's reason, else its outcome as the rollup counts it."""
    if response.headers.get("content-type", "").startswith("application/problem+json"):
        return str(response.json()["reason"])
    if response.status_code < 400:
        return "success"
    return "client_error" if response.status_code < 500 else "server_error"


def rolled_up_calls(outcomes: list[str]) -> dict[str, int]:
    """The calls per outcome the rollup must count for these calls."""
    seen = Counter("rejected" if name in REFUSALS else name for name in outcomes)
    return {name: seen.get(name, 0) for name in OUTCOMES}


#: What acme's calls come to: 10 successes, 3 not found, 2 failures, 2 successes (the quota's 12th), then
#: 2 refused as the quota is used up.
ACME_OUTCOMES = [
    *["success"] * 10,
    *["client_error"] * 3,
    *["server_error"] * 2,
    *["success"] * 2,
    *["quota_exceeded"] * 2,
]


# -- the deployment ----------------------------------------------------------------------------------------


@dataclass
class Served:
    """One server on loopback with its configuration, customers, keys and the calls they made."""

    kind: str
    url: str
    config_path: Path
    env: dict[str, str]
    accounts: Accounts
    #: Customer ids by role: acme (the main traffic), globex (runs out of credits), initech (rate
    #: limited), hooli (keys in the page), umbrella (the operator's target), wayne (sets a spend cap).
    ids: dict[str, str] = field(default_factory=dict)
    keys: dict[str, NewKey] = field(default_factory=dict)
    outcomes: dict[str, list[str]] = field(default_factory=dict)

    def shot(self, page: Page, name: str) -> None:
        """Check the page's accessibility, then write its screenshot under this server's folder."""
        check_page(page)
        screenshot(page, f"{self.kind}/{name}")

    def link(self, customer: str) -> str:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("METERWARE_PORTAL_SECRET", SECRET)
            return sign_in_link(customer, config=Config.load(self.config_path))

    def sign_in(self, page: Page, role: str) -> None:
        """Follow a fresh link and press Continue, as the customer does."""
        response = page.goto(self.link(self.ids[role]))
        assert response is not None
        assert response.status == 200, response.status
        page.get_by_role("button", name="Continue to the account").click()
        page.wait_for_url(f"{self.url}/portal/")
        assert field_value(page, "customer") == self.ids[role]

    def api(self, key: str, path: str = "/v1/hello") -> httpx.Response:
        return httpx.get(f"{self.url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=10)

    def cli(self, *commands: list[str]) -> Callable[[], list[Any]]:
        """Start ``python -m meterware COMMAND --json`` on this deployment's configuration for each command,
        all at once (the browser works meanwhile); the function returned waits for their answers."""
        config = ["--json", "--config", str(self.config_path)]
        running = [
            subprocess.Popen(
                [sys.executable, "-m", "meterware", *command, *config],
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for command in commands
        ]

        def answers() -> list[Any]:
            found = []
            for command, process in zip(commands, running, strict=True):
                out, err = process.communicate(timeout=60)
                assert process.returncode == 0, (command, err)
                found.append(json.loads(out))
            return found

        return answers


def make_traffic(served: Served) -> None:
    """The calls of acme, globex and initech, each response's outcome kept."""
    keys = {role: key.plaintext for role, key in served.keys.items()}
    with httpx.Client(base_url=served.url, timeout=10) as client:

        def call(role: str, path: str) -> str:
            return outcome(client.get(path, headers={"Authorization": f"Bearer {keys[role]}"}))

        # acme: 6 calls, 4 reporting 100 tokens in all, 3 not found, 2 failures, 4 calls (see ACME_OUTCOMES).
        paths = ["/v1/hello"] * 6 + [f"/v1/tokens/{n}" for n in (10, 20, 30, 40)]
        paths += ["/v1/missing"] * 3 + ["/v1/fail"] * 2 + ["/v1/hello"] * 4
        served.outcomes["acme"] = [call("acme", path) for path in paths]
        # globex: 5 free calls and 3 paid from its 0.031337 credits; then the balance cannot pay a call.
        served.outcomes["globex"] = [call("globex", "/v1/hello") for _ in range(10)]
        # initech: 30 calls at once against a limit of 25 a minute.
        with ThreadPoolExecutor(6) as pool:
            served.outcomes["initech"] = list(pool.map(lambda _: call("initech", "/v1/missing"), range(30)))
    assert served.outcomes["acme"] == ACME_OUTCOMES
    assert served.outcomes["globex"] == ["success"] * 8 + ["insufficient_credits"] * 2
    limited = Counter(served.outcomes["initech"])
    assert limited["rate_limited"] >= 1, limited
    assert set(limited) == {"client_error", "rate_limited"}, limited


def wait_for_rollup(served: Served, log: Path, timeout: float = 30.0) -> None:
    """Until the worker (its output in ``log``) has rolled up every call made, and nothing waits in the
    streams."""
    expected = {served.ids[role]: rolled_up_calls(outcomes) for role, outcomes in served.outcomes.items()}
    deadline = time.monotonic() + timeout
    while True:
        seen = {customer: served.accounts.usage(customer).calls for customer in expected}
        pending = [served.accounts.pending_events(customer) for customer in expected]
        if seen == expected and all(waiting == (0, True) for waiting in pending):
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"the rollup did not catch up: expected {expected}, got {seen}, pending {pending}\n"
                + log.read_text(errors="replace")
            )
        time.sleep(0.2)


@pytest.fixture(scope="module", params=["asgi", "wsgi"])
def served(
    request: pytest.FixtureRequest, redis_process: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """A server with the portal (uvicorn + Starlette, then gunicorn + Flask), its rollup worker, five
    customers and their traffic, rolled up. No browser here: a test's browser opens the pages."""
    kind = str(request.param)
    client = redis.Redis.from_url(redis_process.url)
    client.flushall()
    client.close()
    tmp = tmp_path_factory.mktemp(kind)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config_path = tmp / "meterware.toml"
    config_path.write_text(to_toml(settings(redis_process.url, url, tmp / "spool")), encoding="utf-8")
    env = child_env(
        METERWARE_CONFIG=str(config_path), METERWARE_PORTAL_SECRET=SECRET, METERWARE_ADMIN_TOKEN=ADMIN_TOKEN
    )
    accounts = Accounts.open(Config.load(config_path))
    served = Served(kind, url, config_path, env, accounts)
    now = int(time.time())
    # acme is 3 days into daily periods (3 closed invoices and the running one); globex's periods start
    # 10 minutes earlier.
    anchors = {"acme": now - 3 * DAY - 60, "globex": now - 3 * DAY - 660}
    credits = {
        "acme": "10",
        "globex": "0.031337",
        "initech": "10",
        "hooli": "10",
        "umbrella": "1",
        "wayne": "10",
    }
    for role, amount in credits.items():
        customer = served.ids[role] = f"{kind}-{role}"
        accounts.create_customer(customer, plan="pro", anchor=anchors.get(role))
        accounts.grant_credits(customer, amount, reason="welcome credits")
        served.keys[role] = accounts.create_key(customer)
    assert len(accounts.close_periods(at=now, customer_id=served.ids["acme"])) == 3
    # hooli has negotiated terms (shown on its overview).
    deal = {"calls.included": "50", "calls.price": "0.005"}
    accounts.set_overrides(served.ids["hooli"], deal, effective_from="period_start", actor="sales")

    with open(tmp / "rollup.log", "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "meterware", "rollup"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        server = ServerProcess(server_command(kind, port), env, port, tmp / "server.log")
        try:
            make_traffic(served)
            wait_for_rollup(served, tmp / "rollup.log")
            yield served
        finally:
            output = server.stop()
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        accounts.close()
    # Nothing went wrong in the server, and the middleware never metered the portal's own pages.
    assert "Traceback" not in output, output
    assert "meterware:" not in output, output


# -- reading pages -----------------------------------------------------------------------------------------


def fields(page: Page) -> list[tuple[str, str]]:
    """Every ``data-field`` of the page with its ``data-value``, in document order."""
    found = page.eval_on_selector_all(
        "[data-field]", "els => els.map(el => [el.dataset.field, el.dataset.value ?? el.textContent])"
    )
    return [(str(name), str(value)) for name, value in found]


def field_value(page: Page, name: str) -> str:
    (value,) = [value for field_name, value in fields(page) if field_name == name]
    return value


def field_values(page: Page, name: str) -> list[str]:
    return [value for field_name, value in fields(page) if field_name == name]


def points(page: Page, chart: str) -> list[tuple[int, str, int]]:
    """The data points of ``figure[data-chart=chart]``: (window start, series, value)."""
    found = page.eval_on_selector_all(
        f'figure[data-chart="{chart}"] .point',
        "els => els.map(el => [Number(el.dataset.start), el.dataset.series, Number(el.dataset.value)])",
    )
    return [(int(start), str(series), int(value)) for start, series, value in found]


def opened(page: Page, url: str) -> int:
    """Go to ``url``; the status of the page shown (after redirects)."""
    response = page.goto(url)
    assert response is not None
    return response.status


# -- every page --------------------------------------------------------------------------------------------


def test_every_customer_page_renders_accessibly(served: Served, page: Page) -> None:
    """Overview, usage, invoices, a closed and the running period's invoice, credits, keys, the new-key
    form and alerts: each 200, in the customer's name, accessible, screenshotted."""
    served.sign_in(page, "acme")
    acme = served.ids["acme"]
    anchor = served.accounts.customer(acme).anchor
    pages = {
        "overview": "/",
        "usage": "/usage",
        "invoices": "/invoices",
        "invoice-closed": f"/invoices/{anchor + DAY}",
        "invoice-current": "/invoices/current",
        "credits": "/credits",
        "keys": "/keys",
        "keys-new": "/keys/new",
        "alerts": "/alerts",
    }
    for name, path in pages.items():
        assert opened(page, f"{served.url}/portal{path}") == 200, path
        assert field_value(page, "customer") == acme, path
        assert page.locator("h1").count() == 1
        served.shot(page, name)
    # Every entry of the navigation leads to a page of the list above.
    hrefs = page.eval_on_selector_all('nav[aria-label="Account"] a', "els => els.map(el => el.pathname)")
    assert [href.removeprefix("/portal") for href in hrefs] == [
        "/",
        "/usage",
        "/invoices",
        "/credits",
        "/keys",
        "/alerts",
    ]


# -- the numbers are the CLI's -----------------------------------------------------------------------------


def test_the_numbers_on_the_pages_are_the_clis(served: Served, page: Page) -> None:
    """Overview, the running invoice and the credits page show what ``meterware usage``, ``invoice``,
    ``credits show`` and ``credits ledger`` print with ``--json``, and what the calls made add up to."""
    acme = served.ids["acme"]
    answers = served.cli(
        ["usage", acme],
        ["invoice", acme],
        ["invoice", acme, "--period", "previous"],
        ["credits", "show", acme],
        ["credits", "ledger", acme],
    )
    served.sign_in(page, "acme")
    usage, invoice, previous, balance, ledger = answers()
    # 12 calls, 7 past the 5 included at 0.01, and 100 tokens at 0.001: 0.17 credits.
    assert usage["meters"] == {"calls": 12, "tokens": 100}
    assert usage["calls"] == rolled_up_calls(served.outcomes["acme"])
    assert usage["spend_micros"] == 170_000
    assert balance["balance_micros"] == 10_000_000 - 170_000

    assert opened(page, f"{served.url}/portal/") == 200
    shown = dict(fields(page))
    for meter, used in usage["meters"].items():
        assert shown[f"usage.{meter}.used"] == str(used)
    assert (shown["usage.calls.included"], shown["usage.calls.quota"]) == ("5", "12")
    for name, count in usage["calls"].items():
        assert shown[f"calls.{name}"] == str(count)
    assert shown["spend"] == str(usage["spend_micros"])
    assert shown["invoice.subtotal"] == invoice["subtotal"]
    assert shown["credits.balance"] == str(balance["balance_micros"])
    assert shown["credits.reserved"] == str(balance["reserved_micros"])
    assert shown["credits.available"] == str(balance["balance_micros"] - balance["reserved_micros"])

    assert opened(page, f"{served.url}/portal/invoices/current") == 200
    shown = dict(fields(page))
    for name in ("id", "status", "subtotal", "credits_applied", "credits_charged", "total", "currency"):
        assert shown[f"invoice.{name}"] == str(invoice[name]), name
    assert invoice["lines"]
    for index, line in enumerate(invoice["lines"]):
        assert shown[f"line.{index}.amount"] == line["amount"]
        for name in ("quantity", "included", "billable"):
            if line[name] is not None:
                assert shown[f"line.{index}.{name}"] == str(line[name]), (index, name)
    assert opened(page, f"{served.url}/portal/invoices/{previous['period_start']}") == 200
    shown = dict(fields(page))
    assert previous["status"] == shown["invoice.status"] == "closed"
    for name in ("id", "subtotal", "credits_applied", "total"):
        assert shown[f"invoice.{name}"] == str(previous[name]), name
    assert opened(page, f"{served.url}/portal/invoices") == 200
    assert page.locator("table[data-table=invoices] tbody tr").count() == 4
    for listed in (invoice, previous):
        for name in ("status", "subtotal", "total"):
            assert field_value(page, f"invoices.{listed['period_start']}.{name}") == listed[name]

    assert opened(page, f"{served.url}/portal/credits") == 200
    shown = dict(fields(page))
    assert shown["credits.balance"] == str(balance["balance_micros"])
    assert shown["credits.available"] == str(balance["balance_micros"] - balance["reserved_micros"])
    newest_first = ledger["entries"][::-1]
    assert field_values(page, "ledger.amount") == [str(entry["amount_micros"]) for entry in newest_first][:50]
    assert field_values(page, "ledger.kind") == [entry["kind"] for entry in newest_first][:50]
    assert sum(int(value) for value in field_values(page, "ledger.amount")) == ledger["balance_micros"]


def test_refused_calls_count_on_the_overview_as_the_cli_counts_them(served: Served, page: Page) -> None:
    """globex (out of credits) and initech (rate limited): their overview's calls by outcome, spend and
    balance are ``meterware usage`` and ``credits show``'s, and what their calls came to."""
    globex, initech = served.ids["globex"], served.ids["initech"]
    waiting = served.cli(
        ["usage", globex], ["credits", "show", globex], ["usage", initech], ["credits", "show", initech]
    )
    shown_by_role = {}
    for role in ("globex", "initech"):
        served.sign_in(page, role)
        shown_by_role[role] = dict(fields(page))
        served.shot(page, f"overview-{role}")
    answers = waiting()
    for role, (usage, balance) in zip(("globex", "initech"), (answers[:2], answers[2:]), strict=True):
        assert usage["calls"] == rolled_up_calls(served.outcomes[role])
        assert usage["calls"]["rejected"] > 0
        shown = shown_by_role[role]
        assert {name: shown[f"calls.{name}"] for name in OUTCOMES} == {
            name: str(count) for name, count in usage["calls"].items()
        }
        assert shown["usage.calls.used"] == str(usage["meters"]["calls"])
        assert shown["spend"] == str(usage["spend_micros"])
        assert shown["credits.balance"] == str(balance["balance_micros"])
    # globex paid 3 calls at 0.01 from 0.031337; initech's calls all failed: nothing billed.
    assert answers[0]["spend_micros"] == 30_000
    assert answers[1]["balance_micros"] == 1337
    assert (answers[2]["meters"]["calls"], answers[2]["spend_micros"]) == (0, 0)


def test_the_overview_shows_negotiated_terms_as_customers_show_does(served: Served, page: Page) -> None:
    """hooli's overview lists its own terms next to the plan's, as ``customers show`` has them, and its
    usage card counts the included units of its terms; accessible, screenshotted."""
    (shown,) = served.cli(["customers", "show", served.ids["hooli"]])()
    served.sign_in(page, "hooli")
    served.shot(page, "overview-terms")
    assert {name: field_value(page, f"terms.{name}") for name in shown["terms"]} == {
        name: term["value"] for name, term in shown["terms"].items()
    }
    assert field_value(page, "terms.calls.price") == "0.005000"
    assert field_value(page, "usage.calls.included") == "50"


def test_the_plots_have_a_point_per_window_valued_as_the_cli_says(served: Served, page: Page) -> None:
    """48 hourly and 90 daily points per meter, 5 outcome series of as many, a bar per billing period;
    each point's value is ``meterware usage --window hour|day --json``'s for its window."""
    acme = served.ids["acme"]
    answers = served.cli(
        ["usage", acme], ["usage", acme, "--window", "hour"], ["usage", acme, "--window", "day"]
    )
    served.sign_in(page, "acme")
    assert opened(page, f"{served.url}/portal/usage") == 200
    usage, hours, days = answers()
    for window, history, count in (("hour", hours, 48), ("day", days, 90)):
        cli_points = {point["start"]: point for point in history["points"]}
        assert len(cli_points) == count
        busy = {start for start, point in cli_points.items() if any(point["calls"].values())}
        assert busy, f"no {window} with traffic"
        for meter in ("calls", "tokens"):
            drawn = points(page, f"{window}-{meter}")
            assert len(drawn) == count, (window, meter)
            assert {series for _, series, _ in drawn} == {meter}
            values = {start: value for start, _, value in drawn}
            # The page and the CLI each read the windows up to their own now: an hour may have begun
            # between them. Every window both show agrees, and both show every window with traffic.
            assert busy <= values.keys()
            common = values.keys() & cli_points.keys()
            assert len(common) >= count - 1
            assert {start: values[start] for start in common} == {
                start: cli_points[start]["meters"][meter] for start in common
            }, (window, meter)
            assert sum(values.values()) == usage["meters"][meter]
        drawn = points(page, f"{window}-outcomes")
        assert len(drawn) == 5 * count
        for name in OUTCOMES:
            values = {start: value for start, series, value in drawn if series == name.replace("_", " ")}
            assert len(values) == count, name
            common = values.keys() & cli_points.keys()
            assert {start: values[start] for start in common} == {
                start: cli_points[start]["calls"][name] for start in common
            }, (window, name)
            assert sum(values.values()) == usage["calls"][name]
    # The 4 daily billing periods (3 past, 1 running), the running one's bar the period's usage.
    for meter in ("calls", "tokens"):
        drawn = points(page, f"period-{meter}")
        assert len(drawn) == 4
        assert drawn[-1][0] == usage["period_start"]
        assert [value for _, _, value in drawn] == [0, 0, 0, usage["meters"][meter]]


# -- keys --------------------------------------------------------------------------------------------------


def test_a_key_made_in_the_page_works_at_once_and_a_revoked_one_is_refused_at_once(
    served: Served, page: Page
) -> None:
    """Create a key through the form, call the API with the plaintext shown; revoke it through the
    confirmation page: the next call is refused as revoked."""
    hooli = served.ids["hooli"]
    served.sign_in(page, "hooli")
    page.goto(f"{served.url}/portal/keys")
    page.get_by_role("link", name="Create a key").click()
    page.wait_for_url(f"{served.url}/portal/keys/new")
    page.get_by_label("Mode").select_option("live")
    page.get_by_role("button", name="Create key").click()
    plaintext = page.locator('[data-field="new-key"]').inner_text().strip()
    served.shot(page, "key-created")
    records = {record.key_id: record for record in served.accounts.list_keys(hooli)}
    assert len(records) == 2
    (new_id,) = [key_id for key_id in records if key_id != served.keys["hooli"].key_id]
    assert plaintext.startswith(records[new_id].prefix)
    answer = served.api(plaintext)
    assert answer.status_code == 200, answer.text

    page.goto(f"{served.url}/portal/keys")
    row = page.locator("table[data-table=keys] tbody tr").filter(has=page.locator(f'[data-key="{new_id}"]'))
    row.get_by_role("link", name="Revoke").click()
    page.wait_for_url(f"{served.url}/portal/keys/{new_id}/revoke")
    served.shot(page, "key-revoke")
    assert served.api(plaintext).status_code == 200  # the confirmation page changes nothing
    page.get_by_role("button", name="Revoke key").click()
    page.get_by_text("is revoked: calls with it are refused from now on").wait_for()
    refused = served.api(plaintext)
    assert (refused.status_code, refused.json()["reason"]) == (401, "revoked_key")
    assert served.api(served.keys["hooli"].plaintext).status_code == 200  # the customer's other key
    served.shot(page, "key-revoked")

    page.goto(f"{served.url}/portal/keys/{served.keys['hooli'].key_id}/rotate")
    served.shot(page, "key-rotate")


# -- links and forms ---------------------------------------------------------------------------------------


def signed_out(page: Page, served: Served) -> bool:
    """Whether the browser has no session: the portal's front page says signed out (401)."""
    return opened(page, f"{served.url}/portal/") == 401 and page.locator("h1").inner_text() == "Signed out"


def test_forged_expired_and_reused_links_open_no_session(
    served: Served, open_page: Callable[[], Page]
) -> None:
    """A link signed with another secret, one whose payload names another customer than its signature
    did, one past its time, and one followed a second time: 403, and the browser stays signed out."""
    customer = served.ids["initech"]
    login = f"{served.url}/portal/login?token="
    signer = Signer(SECRET.encode())
    forged = Signer(b"not-the-portal-secret-0123456789abcdef").link_token(customer, 600)
    signed_for_hooli = signer.link_token(served.ids["hooli"], 600).partition(".")[2]
    tampered = f"{signer.link_token(customer, 600).partition('.')[0]}.{signed_for_hooli}"
    expired = signer.sign("link", {"c": customer, "x": int(time.time()) - 1, "n": "x1"})
    first = open_page()
    link = served.link(customer)
    assert opened(first, link) == 200
    served.shot(first, "link-page")
    first.get_by_role("button", name="Continue to the account").click()
    first.wait_for_url(f"{served.url}/portal/")
    assert field_value(first, "customer") == customer
    browser_page = open_page()
    for name, url in (
        ("forged", login + forged),
        ("tampered", login + tampered),
        ("expired", login + expired),
        ("reused", link),
    ):
        assert opened(browser_page, url) == 403, name
        assert browser_page.locator("h1").inner_text() == "This link does not work"
        assert browser_page.context.cookies() == [], name
        served.shot(browser_page, f"link-{name}")
        assert signed_out(browser_page, served), name
    served.shot(browser_page, "signed-out")
    # The genuine link holds its one session, until the customer signs out.
    assert opened(first, f"{served.url}/portal/credits") == 200
    first.get_by_role("button", name="Sign out").click()
    first.get_by_role("heading", name="Signed out").wait_for()
    assert signed_out(first, served)


def test_a_form_without_its_csrf_token_is_refused(served: Served, page: Page) -> None:
    """The new-key form and the revoke form, their hidden token removed in the page: 403, nothing done."""
    hooli = served.ids["hooli"]
    served.sign_in(page, "hooli")
    before = {record.key_id: record.status for record in served.accounts.list_keys(hooli)}
    page.goto(f"{served.url}/portal/keys/new")
    page.evaluate("document.querySelector('form[data-form=create-key] input[name=csrf]').remove()")
    with page.expect_navigation() as navigation:
        page.get_by_role("button", name="Create key").click()
    response = navigation.value
    assert response is not None
    assert response.status == 403
    assert page.locator("h1").inner_text() == "Form expired"
    assert page.locator('[data-field="new-key"]').count() == 0
    served.shot(page, "form-refused")

    key_id = served.keys["hooli"].key_id
    page.goto(f"{served.url}/portal/keys/{key_id}/revoke")
    page.evaluate("document.querySelector('form[data-form=revoke-key] input[name=csrf]').value = 'forged'")
    with page.expect_navigation() as navigation:
        page.get_by_role("button", name="Revoke key").click()
    assert navigation.value is not None
    assert navigation.value.status == 403
    after = {record.key_id: record.status for record in served.accounts.list_keys(hooli)}
    assert after == before
    assert served.api(served.keys["hooli"].plaintext).status_code == 200


def test_a_customer_sets_and_lowers_a_spend_cap_in_the_page(served: Served, page: Page) -> None:
    """wayne (plan pro: no cap) follows the overview's link and sets a cap of 0.015 credits in the form; the
    page and the backend have it, the overview says whose; a raise is refused in one line; then wayne's
    calls: 5 included, 1 at 0.01, the seventh (0.02 in all) refused with 429 spend_cap_reached."""
    wayne, portal = served.ids["wayne"], f"{served.url}/portal"
    served.sign_in(page, "wayne")
    assert (field_value(page, "spend_cap"), field_value(page, "spend_cap.source")) == ("none", "none")
    page.get_by_role("link", name="Set a spend cap").click()
    page.wait_for_url(f"{portal}/spend-cap")
    served.shot(page, "spend-cap")
    page.get_by_label("New spend cap").fill("0.015")
    page.get_by_role("button", name="Set the spend cap").click()
    page.wait_for_url(f"{portal}/spend-cap?done=lowered")
    assert (
        page.get_by_role("status").inner_text() == "Your spend cap is now 0.015 credits per billing period."
    )
    assert (field_value(page, "spend_cap"), field_value(page, "spend_cap.source")) == ("15000", "customer")
    assert served.accounts.spend_cap(wayne) == 15_000

    page.get_by_label("New spend cap").fill("0.02")
    with page.expect_navigation():
        page.get_by_role("button", name="Lower the spend cap").click()
    assert page.get_by_role("status").inner_text() == (
        "You can lower your spend cap, not raise it: it is 0.015 credits per billing period. "
        "To raise it, contact us."
    )
    served.shot(page, "spend-cap-refused")
    assert served.accounts.spend_cap(wayne) == 15_000
    assert opened(page, f"{portal}/") == 200
    assert field_value(page, "spend_cap.source") == "customer"

    answers = [served.api(served.keys["wayne"].plaintext) for _ in range(7)]
    assert [outcome(answer) for answer in answers] == ["success"] * 6 + ["spend_cap_reached"]
    assert answers[-1].status_code == 429


# -- one customer's session, another customer's pages -----------------------------------------------------


def raw_get(served: Served, target: str, cookie: str) -> tuple[int, str, str]:
    """GET ``target`` exactly as written (no client normalises its dots or escapes), with ``cookie``: the
    status, the body and the ``Location``."""
    connection = http.client.HTTPConnection("127.0.0.1", int(served.url.rsplit(":", 1)[1]), timeout=10)
    try:
        connection.putrequest("GET", target, skip_accept_encoding=True)
        connection.putheader("Cookie", cookie)
        connection.endheaders()
        response = connection.getresponse()
        body = response.read().decode("utf-8", "replace")
        return response.status, body, response.getheader("Location") or ""
    finally:
        connection.close()


def test_a_customers_session_reads_no_other_customers_page_by_any_url(served: Served, page: Page) -> None:
    """acme's session, asking for globex's keys, invoices, folder, query, path tricks and the operator
    view: refused or acme's own page, never a trace of globex (its id, key, balance of 0.001337)."""
    acme, globex = served.ids["acme"], served.ids["globex"]
    other_key = served.keys["globex"]
    other_start = served.accounts.usage(globex).period_start
    assert other_start != served.accounts.usage(acme).period_start
    traces = [globex, other_key.key_id, other_key.prefix, "0.001337", 'data-value="1337"']
    assert served.accounts.balance(globex).balance == 1337

    def owns_nothing_of_globex(status: int, body: str, where: str) -> None:
        for trace in traces:
            assert trace not in body, (where, trace)
        if 'data-field="customer"' in body:
            assert status == 200, where
            assert f'data-field="customer">{acme}<' in body, where
        else:
            assert status in (401, 403, 404) or "Operator sign-in" in body, (where, status)

    served.sign_in(page, "acme")
    portal, admin = f"{served.url}/portal", f"{served.url}/admin"
    urls = [
        f"{portal}/keys/{other_key.key_id}/revoke",
        f"{portal}/keys/{other_key.key_id}/rotate",
        f"{portal}/invoices/{other_start}",
        f"{portal}/invoices/{other_start}.csv",
        f"{portal}/invoices/{other_start}.json",
        f"{portal}/customers/{globex}/",
        f"{portal}/customers/{globex}/credits",
        f"{portal}/?customer={globex}",
        f"{portal}/credits?customer={globex}&customer_id={globex}",
        f"{portal}/{globex}/",
        f"{portal}/../admin/customers/{globex}/",
        f"{portal}/%2e%2e/admin/customers/{globex}/credits",
        f"{admin}/",
        f"{admin}/customers/{globex}/",
        f"{admin}/customers/{globex}/credits",
        f"{admin}/customers/{globex}/manage",
    ]
    for url in urls:
        response = page.request.get(url) if url.endswith((".csv", ".json")) else page.goto(url)
        assert response is not None
        owns_nothing_of_globex(response.status, response.text(), url)
    # The forms of globex's key, posted with acme's own form token: not found, the key untouched.
    page.goto(f"{portal}/keys")
    token = page.locator("input[name=csrf]").first.get_attribute("value")
    assert token
    for action in ("revoke", "rotate"):
        response = page.request.post(
            f"{portal}/keys/{other_key.key_id}/{action}", form={"csrf": token, "grace": "0"}
        )
        assert response.status == 404, action
        owns_nothing_of_globex(response.status, response.text(), action)
    own_csv = page.request.get(f"{portal}/usage.csv?window=hour")
    asked = page.request.get(f"{portal}/usage.csv?window=hour&customer={globex}")
    assert asked.status == own_csv.status == 200
    assert asked.text() == own_csv.text()
    record = served.accounts.storage.get_key(other_key.key_id)
    assert record is not None
    assert (record.customer, record.status) == (globex, "active")

    # Paths exactly as sent, with acme's cookie attached even where a browser would not send it.
    cookie = "; ".join(f"{c['name']}={c['value']}" for c in page.context.cookies())
    for target in (
        f"/portal/../admin/customers/{globex}/",
        f"/portal/%2e%2e/admin/customers/{globex}/",
        f"/portal/%2E%2E%2Fadmin%2Fcustomers%2F{globex}%2F",
        f"/portal/..%2f..%2fadmin/customers/{globex}/credits",
        f"/portal//customers/{globex}/",
        f"/portal/./customers/{globex}/credits",
        f"/admin/customers/{globex}/",
        f"/admin/customers/{globex}/manage",
    ):
        status, body, location = raw_get(served, target, cookie)
        if status == 303:  # the operator view sends anyone without its own session to its sign-in
            assert location == "/admin/login", target
        else:
            owns_nothing_of_globex(status, body, target)


# -- the operator view -------------------------------------------------------------------------------------


def customer_rows(page: Page) -> list[tuple[str, int]]:
    """The operator's customer list as shown: (customer id, balance in micro-credits)."""
    ids = page.eval_on_selector_all(
        "table[data-table=customers] tbody tr td:first-child a", "els => els.map(el => el.textContent)"
    )
    return [(str(customer), int(field_value(page, f"{customer}.balance"))) for customer in ids]


def test_the_operator_signs_in_searches_sorts_grants_credits_and_suspends(
    served: Served, open_page: Callable[[], Page]
) -> None:
    """The admin token form opens the list; search and sort by balance; open umbrella; grant credits
    with a reason (umbrella's own Credits page shows it); suspend (umbrella's key is refused at once)."""
    umbrella = served.ids["umbrella"]
    admin, page = f"{served.url}/admin", open_page()
    assert opened(page, f"{admin}/") == 200
    assert page.url == f"{admin}/login"
    served.shot(page, "admin-sign-in")
    page.get_by_label("Admin token").fill("not-the-token")
    page.get_by_role("button", name="Sign in").click()
    page.get_by_text("That token is not the admin token.").wait_for()
    page.get_by_label("Admin token").fill(ADMIN_TOKEN)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{admin}/")
    everyone = customer_rows(page)
    assert sorted(everyone) == sorted(
        (customer, served.accounts.balance(customer).balance) for customer in served.ids.values()
    )
    served.shot(page, "admin-customers")

    page.get_by_role("link", name="Balance").click()
    page.wait_for_url("**sort=balance**")
    ascending = customer_rows(page)
    assert [balance for _, balance in ascending] == sorted(balance for _, balance in everyone)
    assert ascending[0] == (served.ids["globex"], 1337)
    page.get_by_role("link", name="Balance").click()
    page.wait_for_url("**order=desc**")
    assert customer_rows(page) == ascending[::-1]
    served.shot(page, "admin-customers-by-balance")

    page.get_by_label("Search customers").fill("umbrel")
    page.get_by_role("button", name="Search").click()
    page.wait_for_url("**q=umbrel**")
    assert customer_rows(page) == [(umbrella, 1_000_000)]
    page.get_by_role("link", name=umbrella).click()
    page.wait_for_url(f"{admin}/customers/{umbrella}/")
    assert field_value(page, "customer") == umbrella
    served.shot(page, "admin-customer-overview")
    for name in ("usage", "invoices", "credits", "keys"):
        page.locator(f'nav[aria-label="Account"] a[href$="/{name}"]').click()
        page.wait_for_url(f"{admin}/customers/{umbrella}/{name}")
        assert field_value(page, "customer") == umbrella
        served.shot(page, f"admin-customer-{name}")

    page.get_by_role("link", name="Credits and status").click()
    page.wait_for_url(f"{admin}/customers/{umbrella}/manage")
    served.shot(page, "admin-manage")
    page.get_by_label("Amount").fill("7.50")
    page.get_by_label("Reason", exact=True).fill("Goodwill for the outage")
    page.get_by_role("button", name="Grant credits").click()
    page.get_by_text(
        "The credits were granted."
    ).wait_for()  # after the redirect: a reload grants nothing more
    assert page.url.endswith("/manage?done=grant")
    assert field_value(page, "credits.balance") == "8500000"
    assert served.accounts.balance(umbrella).balance == 8_500_000

    customer = open_page()
    served.sign_in(customer, "umbrella")
    assert opened(customer, f"{served.url}/portal/credits") == 200
    assert field_value(customer, "credits.balance") == "8500000"
    newest = customer.locator("table[data-table=ledger] tbody tr").first
    assert "Goodwill for the outage" in newest.inner_text()
    assert newest.locator('[data-field="ledger.amount"]').get_attribute("data-value") == "7500000"
    served.shot(customer, "credits-after-grant")

    key = served.keys["umbrella"].plaintext
    assert served.api(key).status_code == 200
    page.get_by_label("Reason for the change").fill("Chargeback under review")
    page.get_by_role("button", name="Suspend").click()
    page.locator('[data-field="status"]', has_text="suspended").wait_for()
    refused = served.api(key)
    assert (refused.status_code, refused.json()["reason"]) == (403, "suspended")
    served.shot(page, "admin-suspended")
    assert opened(customer, f"{served.url}/portal/") == 200
    customer.get_by_text("This account is suspended").wait_for()
    assert opened(customer, f"{served.url}/portal/credits") == 200
    assert "suspended: Chargeback under review" in customer.locator("table[data-table=ledger]").inner_text()
