"""The portal's Invoices and Credits pages, through the real WSGI and ASGI apps, on memory:// and a real
Redis: the numbers shown are the invoice's and the ledger's, the downloads are the CLI's, and a customer
reads only their own."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient
from werkzeug.test import Client

import meterware.portal
from meterware import Accounts, Config, MeteringMiddleware
from meterware.cli import main
from meterware.metering.periods import period_bounds, period_count, period_starts
from meterware.portal.pages.billing import INVOICES_PER_PAGE, LEDGER_PER_PAGE
from meterware.rollup import RollupWorker
from meterware.storage import open_storage
from tests.helpers import to_toml
from tests.portal.test_portal_auth import follow_link

DAY = 86_400
SECRET = "s" * 40


def settings(url: str) -> dict[str, Any]:
    return {
        "storage": {"url": url, "shards": 4},
        "meters": {"calls": {}},
        "plans": {
            # A 5.00 base fee; 2 calls included, then 0.50 each.
            "daily": {
                "period": "day",
                "base_fee": "5.00",
                "meters": {"calls": {"included": 2, "price": "0.5"}},
            },
            "payg": {"period": "day", "prepaid": True, "meters": {"calls": {"price": "0.25"}}},
        },
        "pipeline": {"flush_interval": 0.01},
        "portal": {"secure_cookies": False},
    }


# -- reading pages -----------------------------------------------------------------------------------------


class Page(HTMLParser):
    """What a page shows: its ``data-field`` values in order, its tables' rows, its links."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.fields: list[tuple[str, str]] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.links: dict[str, str] = {}
        self._table = ""
        self._cell: list[str] | None = None
        self._href = ""
        self._link_text: list[str] = []
        self.feed(text)
        self.text = text

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if "data-field" in found:
            self.fields.append((found["data-field"] or "", found.get("data-value") or ""))
        if tag == "table":
            self._table = found.get("data-table") or ""
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag == "td" and self._table:
            self._cell = []
        elif tag == "a":
            self._href, self._link_text = found.get("href") or "", []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = ""
        elif tag == "a":
            self.links["".join(self._link_text).strip()] = self._href

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        self._link_text.append(data)

    def field(self, name: str) -> str:
        (value,) = [value for field, value in self.fields if field == name]
        return value

    def values(self, name: str) -> list[str]:
        return [value for field, value in self.fields if field == name]

    def rows(self, table: str) -> list[list[str]]:
        """The rows of a table's body (the header row has no cells)."""
        return [row for row in self.tables[table] if row]


# -- the deployment ----------------------------------------------------------------------------------------


class Deployment:
    """Accounts on one backend, the customer portal as a WSGI app, and clients signed in to it."""

    def __init__(self, url: str) -> None:
        self.config = Config.from_dict(settings(url))
        self.accounts = Accounts(open_storage(self.config.storage, shards=self.config.shards), self.config)
        self.app = meterware.portal.wsgi_app(self.config)

    def customer(self, name: str, plan: str, anchor: int) -> str:
        customer = f"{name}-{uuid.uuid4().hex[:6]}"
        self.accounts.create_customer(customer, plan=plan, anchor=anchor)
        return customer

    def client(self, customer: str) -> Client:
        client = Client(self.app)
        link = meterware.portal.sign_in_link(customer, config=self.config, base_url="http://localhost")
        assert follow_link(client, link).status_code == 303
        return client

    def page(self, client: Client, path: str) -> Page:
        response = client.get(path)
        assert response.status_code == 200, (path, response.status_code)
        assert response.content_type == "text/html; charset=utf-8"
        return Page(response.get_data(as_text=True))

    def backfill(self, tmp_path: Path, customer: str, instants: list[int]) -> None:
        """One call of ``customer`` at each instant (a real import, rolled up)."""
        path = tmp_path / f"{uuid.uuid4().hex}.csv"
        path.write_text(
            "id,customer,timestamp,calls\n"
            + "".join(f"{uuid.uuid4()},{customer},{instant * 1000},1\n" for instant in instants)
        )
        assert self.accounts.import_events(str(path)).imported == len(instants)
        self.roll_up()

    def roll_up(self) -> None:
        # The owner name memory://'s in-process rollup uses: its lease would otherwise hold the shards.
        RollupWorker(self.accounts.storage, self.config, owner=f"in-process-{os.getpid()}").drain()

    def calls(self, customer: str, times: int) -> None:
        """Real calls through the middleware (charged on prepaid plans), then rolled up."""
        key = self.accounts.create_key(customer).plaintext

        async def api(scope: Any, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        middleware = MeteringMiddleware(api, config=self.config)

        async def serve() -> None:
            transport = httpx.ASGITransport(app=middleware)
            async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
                for _ in range(times):
                    response = await client.get("/v1/x", headers={"Authorization": f"Bearer {key}"})
                    assert response.status_code == 200
            await middleware.drain()
            # Connections belong to this loop, which is ending (as the lifespan's shutdown does).
            await middleware.storage.aclose()
            await middleware.flusher.storage.aclose()

        asyncio.run(serve())
        self.roll_up()

    def close(self) -> None:
        self.app.close()
        self.accounts.close()


@pytest.fixture(params=["memory", "redis"])
def deployment(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Deployment]:
    """The portal on memory://, then on a real Redis."""
    monkeypatch.setenv("METERWARE_PORTAL_SECRET", SECRET)
    url = (
        f"memory://{uuid.uuid4().hex}" if request.param == "memory" else request.getfixturevalue("redis_url")
    )
    served = Deployment(url)
    yield served
    served.close()


def summary(invoice: dict[str, Any]) -> dict[str, Any]:
    return {name: invoice[name] for name in ("status", "subtotal", "credits_applied", "total")}


def history(deployment: Deployment, tmp_path: Path) -> tuple[str, list[int]]:
    """A daily customer three periods and an hour in: 3 calls in its second period, closed with the
    first three; then 2 late calls of that period, billed on the running one. Its period starts."""
    now = int(time.time())
    customer = deployment.customer("acme", "daily", now - 3 * DAY - 3600)
    anchor = deployment.accounts.customer(customer).anchor
    starts = [anchor + n * DAY for n in range(4)]
    deployment.backfill(tmp_path, customer, [starts[1] + 60, starts[1] + 61, starts[1] + 62])
    closed = deployment.accounts.close_periods(at=now, customer_id=customer)
    assert [invoice.period_start for invoice in closed] == starts[:3]
    deployment.backfill(tmp_path, customer, [starts[1] + 120, starts[1] + 121])
    return customer, starts


# -- invoices ----------------------------------------------------------------------------------------------


def test_the_invoices_list_shows_every_period_newest_first_as_priced(
    deployment: Deployment, tmp_path: Path
) -> None:
    """A row per period, the running one first: status and amounts are the invoice's own, each linked."""
    customer, starts = history(deployment, tmp_path)
    page = deployment.page(deployment.client(customer), "/invoices")
    rows = page.rows("invoices")
    assert len(rows) == 4
    for start in reversed(starts):
        expected = deployment.accounts.invoice(customer, period_start=start).as_dict()
        shown = {name: page.field(f"invoices.{start}.{name}") for name in summary(expected)}
        assert shown == summary(expected)
    assert [page.field(f"invoices.{start}.status") for start in reversed(starts)] == [
        "running",
        "closed",
        "closed",
        "closed",
    ]
    # 5.00 + 1 billed call of 3; the running period bills its 2 late calls (0.50 each) as adjustments.
    assert page.field(f"invoices.{starts[1]}.total") == "5.50"
    assert page.field(f"invoices.{starts[3]}.total") == "6.00"
    hrefs = [href for href in page.links.values() if href.startswith("/invoices/")]
    assert hrefs == [f"/invoices/{start}" for start in reversed(starts)]


def test_a_closed_period_shows_its_frozen_invoice_line_by_line(
    deployment: Deployment, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The closed period keeps its 3 calls though 2 more arrived late; lines and totals are the CLI's."""
    customer, starts = history(deployment, tmp_path)
    page = deployment.page(deployment.client(customer), f"/invoices/{starts[1]}")
    config = tmp_path / "meterware.toml"
    config.write_text(to_toml(settings(deployment.config.storage)), encoding="utf-8")
    capsys.readouterr()
    period = ["--period", str(starts[1])]
    assert main(["--json", "invoice", customer, *period, "--config", str(config)]) == 0
    cli = json.loads(capsys.readouterr().out)
    assert cli == deployment.accounts.invoice(customer, period_start=starts[1]).as_dict()

    assert page.field("invoice.id") == cli["id"]
    assert page.field("invoice.status") == "closed"
    assert {name: page.field(f"invoice.{name}") for name in summary(cli)} == summary(cli)
    assert page.field("invoice.credits_charged") == cli["credits_charged"]
    assert [[row[0], row[1], row[2], row[3], row[4], row[5]] for row in page.rows("lines")] == [
        [
            line["description"],
            "" if line["quantity"] is None else str(line["quantity"]),
            "" if line["included"] is None else str(line["included"]),
            "" if line["billable"] is None else str(line["billable"]),
            line["pricing"] or "",
            line["amount"],
        ]
        for line in cli["lines"]
    ]
    assert page.field("line.1.quantity") == "3"  # the late calls are not on the frozen invoice
    assert page.rows("adjustments") == [["No late usage is billed on this invoice."]]


def test_the_running_invoice_bills_late_usage_as_adjustments(deployment: Deployment, tmp_path: Path) -> None:
    """`current` is the running period: its 2 late units of the closed period, linked to that period."""
    customer, starts = history(deployment, tmp_path)
    client = deployment.client(customer)
    page = deployment.page(client, "/invoices/current")
    running = deployment.accounts.invoice(customer).as_dict()
    assert page.field("invoice.id") == f"{customer}-{starts[3]}"
    assert page.field("invoice.status") == "running"
    assert {name: page.field(f"invoice.{name}") for name in summary(running)} == summary(running)
    (adjustment,) = running["adjustments"]
    assert page.values("adjustment.0.amount") == [adjustment["amount"]] == ["1.00"]
    assert page.field("adjustment.0.quantity") == "2"
    assert page.rows("adjustments")[0][0] == adjustment["description"]
    assert f"/invoices/{starts[1]}" in page.links.values()
    assert page.text == deployment.page(client, f"/invoices/{starts[3]}").text


def test_downloads_are_the_invoice_as_csv_and_json(deployment: Deployment, tmp_path: Path) -> None:
    """CSV is to_csv() and JSON is as_dict(), as attachments named after the invoice."""
    customer, starts = history(deployment, tmp_path)
    client = deployment.client(customer)
    for period, start in ((str(starts[1]), starts[1]), ("current", starts[3])):
        invoice = deployment.accounts.invoice(customer, period_start=start)
        as_csv = client.get(f"/invoices/{period}.csv")
        assert as_csv.status_code == 200
        assert as_csv.content_type == "text/csv; charset=utf-8"
        assert as_csv.headers["Content-Disposition"] == f'attachment; filename="invoice-{invoice.id}.csv"'
        assert as_csv.get_data(as_text=True) == invoice.to_csv()
        assert list(csv.reader(io.StringIO(as_csv.get_data(as_text=True))))[-1][-1] == str(invoice.total)
        as_json = client.get(f"/invoices/{period}.json")
        assert as_json.status_code == 200
        assert as_json.content_type == "application/json"
        assert as_json.headers["Content-Disposition"] == f'attachment; filename="invoice-{invoice.id}.json"'
        assert json.loads(as_json.get_data()) == invoice.as_dict()
    page = deployment.page(client, f"/invoices/{starts[1]}")
    assert page.links["Download CSV"] == f"/invoices/{starts[1]}.csv"
    assert page.links["Download JSON"] == f"/invoices/{starts[1]}.json"


def test_periods_that_do_not_exist_are_not_found(deployment: Deployment, tmp_path: Path) -> None:
    """Before the anchor, not a period start, not started yet, or not a number: 404, page and download."""
    customer, starts = history(deployment, tmp_path)
    client = deployment.client(customer)
    for period in (
        str(starts[0] - DAY),
        str(starts[1] + 1),
        str(starts[3] + DAY),
        f"0{starts[1]}",
        f"+{starts[1]}",
        "-5",
        "9" * 200,
        "previous",
        "x.pdf",
    ):
        for suffix in ("", ".csv", ".json"):
            response = client.get(f"/invoices/{period}{suffix}")
            assert response.status_code == 404, (period, suffix)
            assert "Content-Disposition" not in response.headers
    assert client.get(f"/invoices/{starts[0]}").status_code == 200


def test_a_customer_reads_only_their_own_invoices(deployment: Deployment, tmp_path: Path) -> None:
    """URLs carry no customer: another customer's period start is that customer's own invoice, or 404."""
    acme, starts = history(deployment, tmp_path)
    twin = deployment.customer("twin", "daily", starts[0])  # the same periods, no usage
    other = deployment.customer("other", "daily", starts[0] + 600)  # periods 10 minutes later
    twin_page = deployment.page(deployment.client(twin), f"/invoices/{starts[1]}")
    assert twin_page.field("invoice.id") == f"{twin}-{starts[1]}"
    assert twin_page.field("line.1.quantity") == "0"
    assert acme not in twin_page.text
    other_client = deployment.client(other)
    for suffix in ("", ".csv", ".json"):
        assert other_client.get(f"/invoices/{starts[1]}{suffix}").status_code == 404
    assert deployment.page(deployment.client(acme), f"/invoices/{starts[1]}").field("line.1.quantity") == "3"


def test_the_invoices_list_is_paginated(deployment: Deployment) -> None:
    """30 days of daily periods and the running one: pages of 12, 12 and 7, newest first; no page 4."""
    now = int(time.time())
    customer = deployment.customer("long", "daily", now - 30 * DAY - 60)
    anchor = deployment.accounts.customer(customer).anchor
    current = period_bounds(anchor, "day", now)[0]
    client = deployment.client(customer)
    seen: list[int] = []
    for number, size in ((1, 12), (2, 12), (3, 7)):
        page = deployment.page(client, f"/invoices?page={number}")
        rows = page.rows("invoices")
        assert len(rows) == size
        seen += [int(href.rsplit("/", 1)[1]) for href in page.links.values() if href.startswith("/invoices/")]
        assert ("Newer" in page.links) == (number > 1)
        assert ("Older" in page.links) == (number < 3)
        if number < 3:
            assert page.links["Older"] == f"/invoices?page={number + 1}"
    assert seen == [current - n * DAY for n in range(31)]
    assert seen[-1] == anchor
    assert deployment.page(client, "/invoices").text == deployment.page(client, "/invoices?page=1").text
    for bad in ("4", "0", "-1", "01", "x", ""):
        assert client.get(f"/invoices?page={bad}").status_code == 404, bad


def test_years_of_daily_periods_cost_a_page_a_page_of_reads(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ten years of daily periods: the newest and the oldest page each take a few commands of a real
    Redis per invoice shown, not one per period."""
    monkeypatch.setenv("METERWARE_PORTAL_SECRET", SECRET)
    deployment = Deployment(redis_url)
    now = int(time.time())
    customer = deployment.customer("old", "daily", now - 3650 * DAY)
    client = deployment.client(customer)
    server = redis.Redis.from_url(redis_url)
    periods = 3651
    last = -(-periods // INVOICES_PER_PAGE)
    counts = []
    for number, rows in ((1, INVOICES_PER_PAGE), (last, periods % INVOICES_PER_PAGE)):
        server.config_resetstat()
        page = deployment.page(client, f"/invoices?page={number}")
        stats = server.info("commandstats")
        counts.append(sum(int(stat["calls"]) for stat in stats.values()))
        assert len(page.rows("invoices")) == rows
    server.close()
    deployment.close()
    assert max(counts) <= 6 * INVOICES_PER_PAGE, counts


@pytest.mark.parametrize(
    ("anchor", "period"),
    [
        pytest.param(datetime(2024, 1, 31, 12, tzinfo=UTC), "month", id="month-from-the-31st"),
        pytest.param(datetime(2023, 2, 28, tzinfo=UTC), "month", id="month-from-february"),
        pytest.param(datetime(2025, 3, 3, 7, 30, tzinfo=UTC), "week", id="week"),
        pytest.param(datetime(2025, 11, 2, 23, 59, tzinfo=UTC), "day", id="day"),
    ],
)
def test_period_walk_matches_the_calendar(anchor: datetime, period: str) -> None:
    """Counting and listing periods back from the current one agrees with period_bounds step by step."""
    start = int(anchor.timestamp())
    now = datetime(2026, 6, 15, tzinfo=UTC).timestamp()
    every = []
    bounds = period_bounds(start, period, start)
    while bounds[0] <= now:
        every.append(bounds[0])
        bounds = period_bounds(start, period, bounds[1])
    newest_first = every[::-1]
    current = period_bounds(start, period, now)[0]
    assert current == newest_first[0]
    assert period_count(start, period, current) == len(every)
    for skip in (0, 1, 5, len(every) - 3, len(every)):
        assert period_starts(start, period, current, skip, 4) == newest_first[skip : skip + 4]


def test_invoices_through_a_starlette_app(deployment: Deployment, tmp_path: Path) -> None:
    """Mounted in Starlette at /portal, the same pages and downloads, links under the mount."""
    customer, starts = history(deployment, tmp_path)
    portal = meterware.portal.asgi_app(deployment.config)
    app = Starlette(routes=[Mount("/portal", app=portal)])
    with TestClient(app, base_url="http://testserver") as client:
        link = meterware.portal.sign_in_link(
            customer, config=deployment.config, base_url="http://testserver/portal"
        )
        assert follow_link(client, link, follow_redirects=False).status_code == 303
        page = Page(client.get("/portal/invoices").text)
        assert f"/portal/invoices/{starts[3]}" in page.links.values()
        response = client.get(f"/portal/invoices/{starts[2]}.json")
        assert response.json() == deployment.accounts.invoice(customer, period_start=starts[2]).as_dict()


# -- credits -----------------------------------------------------------------------------------------------


def test_credits_show_the_balance_the_grants_left_and_the_ledger_newest_first(deployment: Deployment) -> None:
    """Grants, a purchase, charges of real calls, an adjustment, an expiry, status entries: newest first."""
    now = time.time()
    customer = deployment.customer("payg", "payg", int(now) - 3600)
    accounts = deployment.accounts
    accounts.grant_credits(customer, "2", reason="welcome", expires_at=now + 7 * DAY, actor="alice")
    accounts.grant_credits(customer, "10", kind="purchase", reason="order 7", actor="alice")
    accounts.grant_credits(customer, "1", reason="trial", expires_at=now - 1)
    accounts.expire_credits(customer_id=customer)
    deployment.calls(customer, 4)  # 4 x 0.25, from the welcome grant first
    accounts.adjust_credits(customer, "-0.5", reason="goodwill reversed", actor="alice")
    accounts.set_status(customer, "suspended", reason="card declined", actor="alice")
    accounts.set_status(customer, "active", reason="card updated", actor="alice")

    page = deployment.page(deployment.client(customer), "/credits")
    balance = accounts.balance(customer)
    assert int(page.field("credits.balance")) == balance.balance == 10_500_000
    assert int(page.field("credits.available")) == balance.available
    assert int(page.field("credits.reserved")) == balance.reserved

    ledger = accounts.ledger(customer)[::-1]
    assert page.values("ledger.kind") == [entry.kind for entry in ledger]
    assert page.values("ledger.amount") == [str(entry.amount) for entry in ledger]
    assert page.values("ledger.kind")[:2] == ["status", "status"]
    rows = page.rows("ledger")
    assert [row[3] for row in rows[:2]] == ["active: card updated", "suspended: card declined"]
    assert rows[0][2] == "0.00"
    assert "expiry" in page.values("ledger.kind")
    (welcome,) = [row for row in rows if row[3] == "welcome"]
    assert welcome[4].startswith("priority 10, expires ")
    (order,) = [row for row in rows if row[3] == "order 7"]
    assert order[4] == "priority 50, never expires"
    assert "alice" not in page.text  # who did it is the seller's business

    alive = sorted(
        (lot for lot in accounts.grants(customer) if lot.remaining and not lot.expired),
        key=lambda lot: lot.burn_key(),
    )
    assert page.values("grant.remaining") == [str(lot.remaining) for lot in alive]
    assert [row[6] for row in page.rows("grants")] == ["welcome", "order 7"]
    # The welcome grant paid the 4 calls and the adjustment; the trial grant expired.
    assert page.values("grant.remaining") == ["500000", "10000000"]


def test_the_ledger_is_paginated(deployment: Deployment) -> None:
    """120 entries: pages of 50, 50 and 20, newest first, linked Newer and Older; no page 4."""
    customer = deployment.customer("busy", "payg", int(time.time()) - 60)
    for n in range(120):
        deployment.accounts.adjust_credits(customer, "1", reason=f"n{n}")
    client = deployment.client(customer)
    reasons: list[str] = []
    for number, size in ((1, 50), (2, 50), (3, 20)):
        page = deployment.page(client, f"/credits?page={number}")
        rows = page.rows("ledger")
        assert len(rows) == size == min(LEDGER_PER_PAGE, 120 - (number - 1) * LEDGER_PER_PAGE)
        reasons += [row[3] for row in rows]
        assert ("Newer" in page.links) == (number > 1)
        assert ("Older" in page.links) == (number < 3)
        assert page.field("credits.balance") == "120000000"
    assert reasons == [f"n{n}" for n in reversed(range(120))]
    for bad in ("4", "0", "x"):
        assert client.get(f"/credits?page={bad}").status_code == 404, bad


def test_an_empty_account(deployment: Deployment) -> None:
    """A customer whose first period has not begun: no invoice, a zero balance, an empty ledger."""
    customer = deployment.customer("new", "daily", int(time.time()) + 2 * DAY)
    client = deployment.client(customer)
    invoices = deployment.page(client, "/invoices")
    assert invoices.rows("invoices")[0][0].startswith("Your first billing period starts ")
    assert client.get("/invoices/current").status_code == 404
    credits = deployment.page(client, "/credits")
    assert credits.field("credits.balance") == "0"
    assert credits.rows("ledger") == [["No movement yet."]]


def test_the_operator_view_shows_who_moved_the_credits(deployment: Deployment, tmp_path: Path) -> None:
    """An operator sees the same pages under the customer's folder, the ledger with who did each entry."""
    customer, starts = history(deployment, tmp_path)
    deployment.accounts.grant_credits(customer, "3", reason="sorry", actor="alice")
    view = meterware.portal.admin_wsgi_app(deployment.config, authorize=lambda request: "ops")
    admin = Client(view)
    base = f"/customers/{customer}"
    credits = Page(admin.get(f"{base}/credits").get_data(as_text=True))
    assert credits.rows("ledger")[0][3:] == ["sorry", "priority 10, never expires", "alice"]
    invoices = Page(admin.get(f"{base}/invoices").get_data(as_text=True))
    assert f"{base}/invoices/{starts[0]}" in invoices.links.values()
    download = admin.get(f"{base}/invoices/{starts[0]}.json")
    assert (
        json.loads(download.get_data())
        == deployment.accounts.invoice(customer, period_start=starts[0]).as_dict()
    )
    view.close()
